"""Pretraining speed (train/pretrain.py) against the book's chapter-5 step, and the tokenizing pass on a big corpus.

    python bench/bench_pretrain.py                          # the book's shape (gpt2-small, context 256, batch 2)
    python bench/bench_pretrain.py --tokenize-mb 200        # and a generated 200 MB corpus: MB/s, peak RSS
    python bench/bench_pretrain.py --n-layers 2 --steps 2 --precisions fp32 --tokenize-mb 2   # a smoke run

**The step.** The same windows of ../shared/data/the-verdict.txt (train/token_cache.py, the book's
``GPTDatasetV1`` cut) in the order of the run's first epoch, at the book's chapter-5 shape (gpt2-small,
context 256, dropout 0.1, no qkv bias, an untied head; batch 2):
  ours        the training loop's own step, ``train/loop.py``'s ``train_step`` with ``PretrainTask.loss`` on a
              run made as train/run.py's ``launch`` makes it (bench_chapter7.step_run: the Accelerator and its
              autocast, fused AdamW, the schedule), the model's dropout masks as the training commands draw
              them (modeling's ``keep_mask``; ``--torch-masks``: torch's, as the book), the caching malloc
  the book's  ``train_model_simple``'s step on the book's ``GPTModel`` (tests/book_reference.py, our faithful
              re-implementation): ``cross_entropy(logits.flatten(0, 1), targets.flatten())``, backward, torch's
              default AdamW; in bf16 the same step under the same autocast
alternated step by step in one process (a shared machine drifts: only ratios from one run mean anything), and
two floors no implementation of this step goes under (``floor_rows``): its weight products alone, timed at
their shapes, and those plus fused AdamW's update of the 163 M parameters.
Each row also gives the step's useful FLOPs (bench_chapter7.useful_flops: 6 per weight per token, the head
at every position) over its time and over the matmul rate measured right after, at the step's token count
and precision (bench_chapter7.matmul_rate): the share of the machine's matrix speed the step reaches.

**The corpus** (``--tokenize-mb``): a text file of that size made from the short story's paragraphs in a
seeded random order, tokenized into the cache in a child process (MB/s, tokens, the child's peak RSS); then
``gpt2-scratch pretrain`` on it (cached) for 3 steps of a tiny model, whose peak RSS is set against what its
tokens would take as a Python list of ints and against the same run on the short story alone (the batch's
activations, mostly its [8 x 256, 50257] logits, are the same in both: the difference is what the corpus costs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_chapter7 import matmul_rate, step_run, useful_flops  # this script runs from bench/, first on sys.path

REPO = Path(__file__).resolve().parents[1]
VERDICT = REPO.parent / "shared" / "data" / "the-verdict.txt"


def book_reference():
    """tests/book_reference.py (the book's model and loss, rewritten for the tests), loaded by path."""
    spec = importlib.util.spec_from_file_location("book_reference", REPO / "tests" / "book_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["book_reference"] = module  # its dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


def windows_batches(context: int, batch_size: int, count: int, cache: str) -> list[dict]:
    """The first ``count`` batches of the run's first epoch over the story's training windows."""
    from gpt2_scratch.train.data import EpochBatchSampler
    from gpt2_scratch.train.token_cache import TokenWindows, collate_windows, tokenized_corpus

    corpus = tokenized_corpus(str(VERDICT), cache_dir=cache, progress=False)
    windows = TokenWindows(corpus.train.path, corpus.train.tokens, context, context)
    sampler = EpochBatchSampler([context] * len(windows), batch_size, shuffle=True, drop_last=True, seed=123)
    order = list(sampler)
    return [collate_windows([windows[i] for i in order[k % len(order)]]) for k in range(count)]


def step_rows(args) -> list[dict]:
    """Ours and the book's step, alternated, per precision."""
    import torch
    from accelerate.state import AcceleratorState

    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
    from gpt2_scratch.convert.book import book_cfg
    from gpt2_scratch.train.loop import train_step
    from gpt2_scratch.train.pretrain import PretrainArgs, PretrainTask

    book = book_reference()
    shape = dict(context_length=args.context, drop_rate=0.1, qkv_bias=False, tie_word_embeddings=False,
                 **({"n_layers": args.n_layers} if args.n_layers else {}))
    config = GPT2ScratchConfig.from_preset("gpt2-small", **shape)
    torch.manual_seed(123)
    ours = GPT2ScratchForCausalLM(config).train()
    ours.use_fast_dropout_masks(not args.torch_masks)  # as train/run.py's launch does (train/step_options.py)
    theirs = book.BookGPT(book_cfg(config)).train()
    book_opt = torch.optim.AdamW(theirs.parameters(), lr=5e-4, weight_decay=0.1)  # the book's
    with tempfile.TemporaryDirectory() as cache:
        batches = windows_batches(args.context, args.batch_size, args.steps, cache)
    pretrain_args = PretrainArgs(data="the-verdict.txt", lr=5e-4, weight_decay=0.1)  # no clipping, constant lr
    task = PretrainTask(pretrain_args, None, None, None, None, None, None, None)  # only its loss is used

    def book_step(batch, dtype) -> float:  # train_model_simple: zero_grad, calc_loss_batch, backward, step
        tick = time.perf_counter()
        book_opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = book.calc_loss_batch(batch["input_ids"], batch["labels"], theirs)
        loss.backward()
        book_opt.step()
        return time.perf_counter() - tick

    rows = []
    for precision in args.precisions:
        dtype = torch.bfloat16 if precision == "bf16" else None
        # An Accelerator's precision is fixed for its process; accelerate's own tests reset its state so.
        AcceleratorState._reset_state(reset_partial_state=True)
        run = step_run(ours, pretrain_args, mixed_precision="bf16" if dtype else "no")  # fused AdamW, as launch

        def ours_step(batch, _dtype) -> float:  # train/loop.py's step: the task's summed loss, backward, AdamW
            tick = time.perf_counter()
            train_step(run, task, [batch])
            return time.perf_counter() - tick

        ours_step(batches[0], dtype), book_step(batches[0], dtype)  # warm-up: kernels, pools, AdamW state
        seconds = {"ours": [], "book": []}
        for batch in batches:
            seconds["ours"].append(ours_step(batch, dtype))
            seconds["book"].append(book_step(batch, dtype))
        tokens = batches[0]["input_ids"].numel()
        flops = useful_flops(tokens, tokens, lora=False, layers=config.n_layers, width=config.emb_dim,
                             vocab=config.vocab_size)
        rate = matmul_rate(precision, tokens, width=config.emb_dim)
        timed = [(impl, statistics.median(seconds[impl])) for impl in ("ours", "book")]
        timed += [(floor["what"], floor["step_s"]) for floor in floor_rows(config, tokens, precision)]
        for impl, step in timed:
            rows.append({"precision": precision, "impl": impl, "step_s": step, "tok_s": tokens / step,
                         "tflop": flops / 1e12, "achieved_gflops": flops / step / 1e9, "matmul_gflops": rate / 1e9,
                         "mfu": flops / step / rate})
    return rows


def floor_rows(config, tokens: int, precision: str) -> list[dict]:
    """What no implementation of this step can go under on this machine: its weight products alone (each
    Linear's forward, input-gradient and weight-gradient product at the step's shapes, timed one shape at a
    time and counted per layer; the head's as modeling's ``VocabProjection`` computes them, its weight
    gradient in slices of the vocabulary, the fastest way found), and those plus fused AdamW over the model's
    parameters (fp32 state, the moments and weights read and written once per step whatever the batch)."""
    import torch

    from gpt2_scratch.modeling_gpt2_scratch import VocabProjection

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    d, vocab = config.emb_dim, config.vocab_size
    counts = {(d, 3 * d): config.n_layers, (d, d): config.n_layers, (d, 4 * d): config.n_layers,
              (4 * d, d): config.n_layers}  # c_attn, attn c_proj, c_fc, mlp c_proj

    def median_seconds(work, repeats: int = 5) -> float:
        work()  # warm-up
        times = []
        for _ in range(repeats):
            tick = time.perf_counter()
            work()
            times.append(time.perf_counter() - tick)
        return statistics.median(times)

    products = 0.0
    for (k, n), count in counts.items():
        x, w, g = torch.randn(tokens, k, dtype=dtype), torch.randn(k, n, dtype=dtype), torch.randn(tokens, n, dtype=dtype)
        products += count * median_seconds(lambda: (x @ w, g @ w.t(), x.t() @ g))
    x, head, g = torch.randn(tokens, d, dtype=dtype), torch.randn(vocab, d, dtype=dtype), torch.randn(tokens, vocab, dtype=dtype)
    head_grad = torch.empty_like(head)

    def head_products():
        x @ head.t(), g @ head
        for start in range(0, vocab, VocabProjection.chunk):
            torch.mm(g[:, start:start + VocabProjection.chunk].t(), x, out=head_grad[start:start + VocabProjection.chunk])

    products += median_seconds(head_products)
    params = [torch.randn(k, n) for (k, n), count in counts.items() for _ in range(count)]
    params += [torch.randn(vocab, d), torch.randn(vocab, d)]  # the head and the token embedding (untied)
    # what the rest of the model holds: the position table, the biases and LayerNorms
    params += [torch.randn(config.context_length, d)] + [torch.randn(d) for _ in range(config.n_layers * 9 + 2)]
    for p in params:
        p.grad = torch.randn_like(p)
    adamw = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.1, fused=True)
    optimizer = median_seconds(adamw.step, repeats=3)
    return [{"what": "the weight products alone", "step_s": products},
            {"what": "the weight products + fused AdamW", "step_s": products + optimizer}]


def make_corpus(path: Path, megabytes: int) -> None:
    """About ``megabytes`` MB of English: the story's paragraphs in a seeded random order."""
    paragraphs = [p for p in VERDICT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng = random.Random(0)
    target, written = megabytes * 1_000_000, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            block = "\n\n".join(rng.choices(paragraphs, k=200)) + "\n\n"
            f.write(block)
            written += len(block.encode("utf-8"))


def child(code: str, env: dict) -> dict:
    """Run ``code`` in a fresh interpreter; the JSON object it prints last, with its own peak RSS in GB added."""
    # VmHWM (the peak resident set of this process image): ru_maxrss would carry the forking parent's over exec.
    code += ("\nhwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))"
             "\nprint(json.dumps({**result, 'rss_gb': int(hwm.split()[1]) / 2**20}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def corpus_rows(megabytes: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = tmp / "corpus.txt"
        make_corpus(text, megabytes)
        size = text.stat().st_size
        env = {**os.environ, "GPT2_SCRATCH_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1"}
        tokenized = child(f"""
import json, time
from gpt2_scratch.train.token_cache import tokenized_corpus
tick = time.perf_counter()
c = tokenized_corpus({str(text)!r}, progress=False)
result = {{"seconds": time.perf_counter() - tick, "tokens": c.train.tokens + c.val.tokens}}
""", env)
        reread = child(f"""
import json, time
from gpt2_scratch.train.token_cache import tokenized_corpus
tick = time.perf_counter()
c = tokenized_corpus({str(text)!r}, progress=False)
result = {{"seconds": time.perf_counter() - tick, "reused": c.reused}}
""", env)
        trained = {name: child(f"""
import json
from gpt2_scratch.core.cli import main
code = main(["pretrain", "--data", {str(data)!r}, "--random-init", "--n-layers", "2", "--emb-dim", "64",
             "--n-heads", "4", "--context-length", "256", "--batch-size", "8", "--max-steps", "3",
             "--sample-tokens", "4", "--out", {str(tmp / name)!r}])
result = {{"code": code}}
""", env) for name, data in (("story", VERDICT), ("corpus", text))}
    tokens = tokenized["tokens"]
    as_ints = tokens * (28 + 8) / 2**30  # a list of Python ints: 8-byte pointers to 28-byte int objects
    return [{"what": "tokenize (cache miss)", "mb": size / 1e6, "seconds": tokenized["seconds"],
             "mb_s": size / 1e6 / tokenized["seconds"], "tokens": tokens, "rss_gb": tokenized["rss_gb"], "ints_gb": as_ints},
            {"what": "open (cache hit: hash only)", "mb": size / 1e6, "seconds": reread["seconds"],
             "mb_s": size / 1e6 / reread["seconds"], "tokens": tokens, "rss_gb": reread["rss_gb"], "ints_gb": as_ints},
            {"what": f"pretrain a tiny model 3 steps of 8x256 on it (exit {trained['corpus']['code']})",
             "mb": size / 1e6, "seconds": None, "mb_s": None, "tokens": tokens, "rss_gb": trained["corpus"]["rss_gb"],
             "ints_gb": as_ints},
            {"what": f"the same on the story alone (exit {trained['story']['code']})", "mb": VERDICT.stat().st_size / 1e6,
             "seconds": None, "mb_s": None, "tokens": 5145, "rss_gb": trained["story"]["rss_gb"],
             "ints_gb": 5145 * 36 / 2**30}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-layers", type=int, help="override gpt2-small's 12 blocks (a quick run)")
    parser.add_argument("--context", type=int, default=256, help="window length (the book's chapter 5: 256)")
    parser.add_argument("--batch-size", type=int, default=2, help="windows per step (the book's chapter 5: 2)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per implementation and precision (0: "
                                                              "no step table)")
    parser.add_argument("--torch-masks", action="store_true", help="ours with torch's dropout masks (the book's), "
                                                                      "not the training commands' faster ones")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--tokenize-mb", type=int, default=0, help="also a generated corpus of this many MB")
    args = parser.parse_args()

    from gpt2_scratch.core.allocator import use_caching_allocator

    use_caching_allocator()  # the training scripts' malloc (re-executes this script once)
    import torch

    flags = [f for f in ("avx512_bf16", "amx_tile", "avx512f") if f in Path("/proc/cpuinfo").read_text()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU flags: {' '.join(flags) or 'AVX2 only'}")
    rows = step_rows(args) if args.steps else []
    if rows:
        print(f"gpt2-small{f' ({args.n_layers} layers)' if args.n_layers else ''} at context {args.context}, batch "
              f"{args.batch_size}, dropout 0.1, untied head; medians of {args.steps} alternated steps")
    if rows:
        print()
        print("| precision | step | s/step | tokens/s | vs the book's | useful GFLOP/s | matmul GFLOP/s | of matmul rate |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        book = next(r for r in rows if r["precision"] == row["precision"] and r["impl"] == "book")
        name = {"ours": "ours (train_step)", "book": "the book's train_model_simple"}.get(row["impl"],
                                                                                      f"floor: {row['impl']}")
        print(f"| {row['precision']} | {name} | {row['step_s']:.3f} | {row['tok_s']:,.0f} | "
              f"{book['step_s'] / row['step_s']:.2f}x | {row['achieved_gflops']:,.0f} | {row['matmul_gflops']:,.0f} | "
              f"{row['mfu']:.0%} |")
    if args.tokenize_mb:
        print()
        print("| corpus pass | MB | seconds | MB/s | tokens | peak RSS GB | its tokens as Python ints GB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in corpus_rows(args.tokenize_mb):
            def shown(value, fmt):
                return "" if value is None else format(value, fmt)

            print(f"| {r['what']} | {r['mb']:,.0f} | {shown(r['seconds'], '.1f')} | {shown(r['mb_s'], ',.1f')} | "
                  f"{r['tokens']:,} | {shown(r['rss_gb'], '.2f')} | {r['ints_gb']:.2f} |")


if __name__ == "__main__":
    main()
