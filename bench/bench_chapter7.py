"""The book's whole chapter-7 run, on this machine: its wall clock by phase, full finetuning and LoRA, and MFU.

    python bench/bench_chapter7.py --precision no --configs full full+group --steps 12   # the phase breakdown, fp32
    python bench/bench_chapter7.py                        # every configuration, bf16 where it is fast
    python bench/bench_chapter7.py --steps 20 --configs full lora

The run the book's readers wait for: gpt2-medium, the book's 1100 records (935 train), batch 8, 2 epochs
(232 optimizer steps), evaluation after steps 1, 6, 11, ..., 231 and after the last (48) over 5 validation
batches, the initial losses (5 training + 5 validation batches), a 35-token greedy sample and a checkpoint
after each epoch, the final model, and greedy responses (up to 256 tokens) to the 110 test records. Each
configuration runs the real ``train/sft.py`` (random weights at gpt2-medium's shape: OpenAI's are not needed
for speed) for ``--steps`` steps in its own process, with ``--save-every STEPS`` (one checkpoint) and
``--max-new-tokens`` ``--response-tokens`` (every test response, since random weights never emit
<|endoftext|>), and reads the ``timing`` row a run writes at the end of metrics.jsonl (``finish`` in
train/run.py). The whole run, phase by phase:

    start-up            measured once: process start to the end of set-up (imports, data, model, accelerator)
    training steps      their measured time × the whole run's padded tokens / the measured steps' tokens
    evaluations         the initial losses (measured) + 48 × one measured evaluation (the same 5 batches each time)
    epoch-end samples   2 × the 35-token greedy sample, timed here in-process (a short run ends no epoch)
    checkpoints         2 (one per epoch) × the measured one
    final save          measured once
    test responses      the 110 records at the lengths a finetuned model answers with: generated here
                        in-process by ``generate_responses`` on random weights whose argmax is overridden so
                        that each record stops after as many tokens as the book's finetuned gpt2-medium took
                        (its instruction-data-with-response.json, "\\n\\n### Response:\\n" and <|endoftext|>
                        included: mean 22, one runaway at the 256 cap); and the worst case, every response
                        256 tokens, from the same run's prefill time and decoding step at a full batch
    other               measured once: the rest of the process (logging, the loss plot, exit)

The in-process generation runs on this process's allocator (the training scripts' caching malloc) in fp32,
as ``train/sft.py`` generates. Whole-run MFU is the training steps' useful FLOPs over the whole run's time;
step MFU over the steps' own time (from the timing row). Useful FLOPs per padded token are 2 (forward) +
2 (input gradients) + 2 (weight gradients, trainable weights only) times the parameters each token passes
through; the output head only runs on target positions (train/sft.py projects nothing else), so it counts
for target tokens alone. Both are against the matrix-multiply rate measured here at the model's shapes
(fp32, and bf16 where it is fast; the run's precision decides which). ``--book-exact`` (its own loop, no
timing row) is extrapolated from the moments its log lines arrive: start-up + initial losses + seconds per
step, evaluations included, × 232.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOOK_DATA = REPO.parent / "shared" / "data" / "instruction-data.json"
BOOK_RESPONSES = REPO.parent / "shared" / "data" / "instruction-data-with-response.json"
EPOCHS, BATCH, EVAL_FREQ, EVAL_ITER = 2, 8, 5, 5
SAMPLE_TOKENS, MAX_NEW_TOKENS, RESPONSE_BATCH = 35, 256, 8  # train/sft.py's defaults

CONFIGS = {  # name: extra train/sft.py options
    "full": [],
    "full+group": ["--group-by-length"],
    "lora": ["--lora", "book"],
    "lora+group": ["--lora", "book", "--group-by-length"],
    "book-exact": ["--book-exact"],
}
PHASES = ("start-up", "training steps", "evaluations", "epoch-end samples", "checkpoints", "final save",
          "test responses", "other")


def book_data():
    from gpt2_scratch import get_tokenizer
    from gpt2_scratch.core.records import load_records
    from gpt2_scratch.train.data import prepare_instruction_data

    tokenizer = get_tokenizer()
    return prepare_instruction_data(load_records(str(BOOK_DATA)), tokenizer, max_length=1024), tokenizer


def evaluations(steps: int) -> int:
    """Evaluations after the initial losses: after steps 1, 1 + EVAL_FREQ, ..., and after the last step."""
    return len(range(1, steps + 1, EVAL_FREQ)) + (1 if (steps - 1) % EVAL_FREQ else 0)


def full_run_shape(data, group: bool) -> dict:
    """Steps, padded input tokens and target tokens of the whole 2-epoch run (train/sft.py's sampler and
    the book's collate: each batch padded to its longest example; the last incomplete batch dropped)."""
    from gpt2_scratch.train.data import EpochBatchSampler, evaluation_sampler

    lengths = list(data.train["length"])
    sampler = EpochBatchSampler(lengths, BATCH, shuffle=True, group_by_length=group, seed=123)
    steps = tokens = targets = 0
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for batch in sampler:
            steps += 1
            tokens += len(batch) * min(max(lengths[i] for i in batch), 1024)
            targets += sum(min(lengths[i], 1024) for i in batch)
    evaluated = {}  # split: (padded tokens, target tokens) of one evaluation's first EVAL_ITER batches
    for split in ("validation", "train"):
        split_lengths = list(getattr(data, split)["length"])
        batches = list(evaluation_sampler(split_lengths, BATCH, eval_iter=EVAL_ITER, group_by_length=group))[:EVAL_ITER]
        evaluated[split] = (sum(len(b) * min(max(split_lengths[i] for i in b), 1024) for b in batches),
                            sum(min(split_lengths[i], 1024) for b in batches for i in b))
    n = evaluations(steps)
    val, initial_train = evaluated["validation"], evaluated["train"]
    return {"steps": steps, "tokens": tokens, "targets": targets, "evaluations": n,
            # every evaluation reads the validation batches; the initial losses read the training batches too
            "eval_tokens": (n + 1) * val[0] + initial_train[0], "eval_targets": (n + 1) * val[1] + initial_train[1]}


def run_config(name: str, steps: int, precision: str, response_tokens: int) -> dict:
    """Run train/sft.py for ``steps`` steps; its timing row, and the moments its log lines arrive."""
    phased = name != "book-exact"  # --book-exact runs the book's own loop: no checkpoints, no timing of its phases
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, str(REPO / "train" / "sft.py"), "--model", "gpt2-medium", "--random-init",
               "--data", str(BOOK_DATA), "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
               "--eval-freq", str(EVAL_FREQ), "--eval-iter", str(EVAL_ITER), "--max-steps", str(steps),
               "--mixed-precision", "no" if name == "book-exact" else precision,  # the book trains in fp32
               "--max-new-tokens", str(response_tokens if phased else 1), "--sample-tokens", "1",
               *(["--save-every", str(steps)] if phased else []), "--out", str(out), *CONFIGS[name]]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        moments: list[tuple[float, str]] = []
        for line in proc.stdout:
            moments.append((time.perf_counter() - start, line.rstrip()))
        if proc.wait() != 0:
            raise SystemExit(f"{name}: train/sft.py failed (exit {proc.returncode}); run it by hand:\n  "
                             + " ".join(cmd))
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    header = next(t for t, line in moments if line.startswith("model "))
    first = next(t for t, line in moments if line.startswith("initial losses"))
    logged = [(t, int(m.group(1))) for t, line in moments if (m := re.match(r"epoch \d+/\d+ \| step\s+(\d+)/", line))]
    last_t, n = logged[-1]
    last_row = next(r for r in reversed(rows)
                    if r["step"] in (n, n - 1) and "tokens_seen" in r and not r.get("initial"))
    timing = next((r for r in rows if r.get("timing") and r.get("seconds_train_steps")), None)
    result = {"name": name, "startup_s": header, "initial_s": first - header, "steps": n, "loop_s": last_t - first,
              "tokens": last_row["tokens_seen"], "targets": last_row.get("target_tokens_seen", 0), "wall_s": wall,
              "timing": timing, "evaluations": sum(1 for r in rows if "val_loss" in r and not r.get("initial"))}
    if timing:
        result["initial_s"] = min(result["initial_s"], timing["seconds_evaluation"])
        result["train_s"] = timing["seconds_train_steps"]
        accounted = sum(v for k, v in timing.items() if k.startswith("seconds_") and k != "seconds_startup")
        result["other_s"] = max(wall - header - accounted, 0.0)
    else:  # our rows' throughput covers the steps since the row before (--book-exact's rows have none)
        train_seconds, previous = 0.0, 0
        for r in rows:
            if r.get("tokens_per_sec"):
                train_seconds += (r["tokens_seen"] - previous) / r["tokens_per_sec"]
                previous = r["tokens_seen"]
        result["train_s"] = train_seconds or None
    return result


def script_stops(model, lengths: dict[tuple[int, ...], int], countdown: int = 1000) -> list[tuple[int, int, float]]:
    """Make ``model`` answer each prompt (its token ids, as the key of ``lengths``) with exactly that many
    new tokens, <|endoftext|> the last; the model's own compute is unchanged, only the argmax of its last
    logits is overridden: the first new token is ``countdown + n - 1``, each next one the token before
    minus 1, and <|endoftext|> once ``countdown`` is reached. Returns the list its forward calls are timed
    into: (positions, rows, seconds)."""
    import torch

    from gpt2_scratch import ENDOFTEXT_ID

    forward, calls = model.forward, []

    @functools.wraps(forward)  # generate reads the signature (logits_to_keep) through __wrapped__
    def scripted(input_ids, attention_mask=None, **kwargs):
        tick = time.perf_counter()
        out = forward(input_ids, attention_mask=attention_mask, **kwargs)
        rows, positions = input_ids.shape
        if positions > 1:  # the prompt
            keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            forced = torch.tensor([countdown + lengths[tuple(ids[m].tolist())] - 1 for ids, m in zip(input_ids, keep)])
        else:
            forced = input_ids[:, 0].cpu() - 1
        forced = torch.where(forced <= countdown, ENDOFTEXT_ID, forced).to(out.logits.device)
        last = out.logits[:, -1]
        last[torch.arange(rows, device=last.device), forced] = last.max(-1).values + 1.0
        calls.append((positions, rows, time.perf_counter() - tick))
        return out

    model.forward = scripted
    return calls


def measure_generation(data, tokenizer) -> dict:
    """The epoch-end sample and the test responses at the book's finetuned lengths, timed in-process on a
    random gpt2-medium (fp32, as train/sft.py generates)."""
    import torch

    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM, generate_responses
    from gpt2_scratch.core.prompts import format_input
    from gpt2_scratch.train.lm_outputs import greedy_sample

    torch.manual_seed(123)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-medium")).eval()
    tick = time.perf_counter()
    greedy_sample(model, tokenizer, format_input(data.validation_records[0]), SAMPLE_TOKENS)
    sample_s = time.perf_counter() - tick

    records = data.test_records
    book = {(r["instruction"], r["input"]): r["model_response"] for r in json.loads(BOOK_RESPONSES.read_text())}
    lengths = {}
    for r in records:
        n = len(tokenizer.encode("\n\n### Response:\n" + book[r["instruction"], r["input"]])) + 1  # + <|endoftext|>
        lengths[tuple(tokenizer.encode(format_input(r)))] = min(n, MAX_NEW_TOKENS)
    calls = script_stops(model, lengths)
    tick = time.perf_counter()
    generate_responses(model, tokenizer, records, batch_size=RESPONSE_BATCH, max_new_tokens=MAX_NEW_TOKENS,
                       progress=False)
    book_s = time.perf_counter() - tick
    full_steps = [s for positions, rows, s in calls if positions == 1 and rows == RESPONSE_BATCH]
    batches = -(-len(records) // RESPONSE_BATCH)
    return {"sample_s": sample_s, "book_s": book_s, "prefill_s": sum(s for p, _, s in calls if p > 1),
            "step_s": sum(full_steps) / len(full_steps), "batches": batches, "records": len(records),
            "mean_tokens": sum(lengths.values()) / len(lengths),
            "decode_calls": sum(1 for p, _, _ in calls if p == 1)}


def matmul_rate(dtype_name: str, rows: int, repeats: int = 5, width: int = 1024) -> float:
    """FLOP/s of the block's four weight products on [rows, in] inputs (median of repeats); gpt2-medium's width
    unless told."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    d = width
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]  # c_attn, attn c_proj, c_fc, mlp c_proj
    pairs = [(torch.randn(rows, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for k, n in shapes]
    flops = sum(2 * rows * k * n for k, n in shapes)
    for x, w in pairs:  # warm-up
        x @ w
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        for x, w in pairs:
            x @ w
        times.append(time.perf_counter() - tick)
    return flops / sorted(times)[len(times) // 2]


def useful_flops(tokens: int, targets: int, *, lora: bool, layers: int = 24, width: int = 1024,
                 vocab: int = 50257) -> float:
    """FLOPs the measured steps had to do (see the module docstring); gpt2-medium's shape unless told.

    Per padded token: forward 2, input gradients 2, weight gradients 2 (trained weights only) per block
    weight; the head (the tied embedding, trained in full finetuning) on target positions only.
    """
    block = layers * 12 * width * width  # c_attn 3d², attn c_proj d², c_fc 4d², mlp c_proj 4d²
    weight_grads = 0 if lora else 2
    return (4 + weight_grads) * (block * tokens + vocab * width * targets)


def step_run(model, args, *, mixed_precision: str = "no"):
    """A ``train.state.Run`` holding what the project's own training step (``train.loop.train_step``) uses: an
    Accelerator, the prepared model, fused AdamW over the trained parameters and the schedule, made as
    train/run.py's ``launch`` makes them; no output folder. bench_step.py, bench_train.py and bench_lora.py
    time ``train_step(run, task, [batch])`` with it, and the tasks' own losses."""
    import torch
    from accelerate import Accelerator

    from gpt2_scratch.train.loop import fit
    from gpt2_scratch.train.run import make_scheduler
    from gpt2_scratch.train.state import Run, TrainState

    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scheduler = make_scheduler(optimizer, args, total_steps=1_000_000)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return Run(args, accelerator, model, Path("."), None, 1_000_000, TrainState(), fit=fit, optimizer=optimizer,
               scheduler=scheduler)


def phase_table(r: dict, shape: dict, gen: dict, rate: float, response_tokens: int) -> dict:
    """Print the whole run of ``r`` by phase; return its totals (book-length and worst-case responses)."""
    t = r["timing"]
    per_eval = (t["seconds_evaluation"] - r["initial_s"]) / max(r["evaluations"], 1)
    worst = gen["prefill_s"] + gen["batches"] * (MAX_NEW_TOKENS - 1) * gen["step_s"]
    rows = {  # phase: (what was measured, how it is scaled, whole-run seconds)
        "start-up": (f"{r['startup_s']:.0f} s (set-up alone {t['seconds_startup']:.0f} s)", "once", r["startup_s"]),
        "training steps": (f"{r['steps']} steps, {r['tokens']:,} tokens: {t['seconds_train_steps']:.0f} s",
                           f"× {shape['tokens']:,} tokens ({shape['steps']} steps)",
                           t["seconds_train_steps"] * shape["tokens"] / r["tokens"]),
        "evaluations": (f"initial {r['initial_s']:.0f} s + {r['evaluations']} × {per_eval:.1f} s",
                        f"initial + {shape['evaluations']}", r["initial_s"] + per_eval * shape["evaluations"]),
        "epoch-end samples": (f"{SAMPLE_TOKENS} tokens: {gen['sample_s']:.1f} s (in-process)", f"× {EPOCHS}",
                              gen["sample_s"] * EPOCHS),
        "checkpoints": (f"1: {t['seconds_checkpoints']:.1f} s", f"× {EPOCHS}", t["seconds_checkpoints"] * EPOCHS),
        "final save": (f"{t['seconds_save_model']:.1f} s", "once", t["seconds_save_model"]),
        "test responses": (f"{gen['records']} × {response_tokens} tokens: {t['seconds_responses']:.0f} s; at the "
                           f"book's lengths (in-process): {gen['book_s']:.0f} s",
                           f"book's lengths, mean {gen['mean_tokens']:.0f} tokens", gen["book_s"]),
        "other": (f"{r['other_s']:.1f} s", "once", r["other_s"]),
    }
    total = sum(seconds for _, _, seconds in rows.values())
    lora = r["name"].startswith("lora")
    flops = useful_flops(shape["tokens"], shape["targets"], lora=lora)
    measured_flops = useful_flops(r["tokens"], r["targets"], lora=lora)
    print(f"\n### {r['name']}: the whole run by phase ({r['steps']} measured steps)\n")
    print("| phase | measured | scaled by | whole run | share |")
    print("|---|---|---|---:|---:|")
    for phase, (measured, scaled, seconds) in rows.items():
        print(f"| {phase} | {measured} | {scaled} | {seconds / 60:.1f} min | {seconds / total:.0%} |")
    print(f"| **whole run** | | | **{total / 60:.1f} min** | 100% |")
    worst_total = total - gen["book_s"] + worst
    # The evaluations' forward passes (a third of a training token's FLOPs each) are work the run must do too.
    eval_flops = useful_flops(shape["eval_tokens"], shape["eval_targets"], lora=True) / 2
    print(f"\nthe evaluations' forward passes: {eval_flops / 1e12:.0f} TFLOP against the training steps' "
          f"{flops / 1e12:.0f}; so the training steps' share of the run's FLOPs caps whole-run MFU at "
          f"{flops / (flops + eval_flops):.0%}; counting both, model-FLOP utilisation "
          f"{(flops + eval_flops) / total / rate:.0%}")
    print(f"\nwhole-run MFU {flops / total / rate:.0%} (step MFU {measured_flops / r['train_s'] / rate:.0%}); "
          f"every response 256 tokens instead: responses {worst / 60:.1f} min ({worst / worst_total:.0%}), whole run "
          f"{worst_total / 60:.1f} min, MFU {flops / worst_total / rate:.0%}")
    print(f"responses model: prefill of the {gen['records']} prompts {gen['prefill_s']:.1f} s + decoding steps at "
          f"{RESPONSE_BATCH} rows {gen['step_s'] * 1000:.0f} ms each; at {response_tokens} tokens it predicts "
          f"{gen['prefill_s'] + gen['batches'] * (response_tokens - 1) * gen['step_s']:.0f} s, the run measured "
          f"{t['seconds_responses']:.0f} s")
    return {"total_min": total / 60, "worst_min": worst_total / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="steps measured per configuration")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--precision", default="auto", choices=["no", "bf16", "auto"],
                        help="train/sft.py's --mixed-precision (auto: bf16 only where it is fast)")
    parser.add_argument("--response-tokens", type=int, default=8,
                        help="--max-new-tokens of the measured runs (their 110 test responses, each this long)")
    args = parser.parse_args()

    from gpt2_scratch.core.allocator import use_caching_allocator

    use_caching_allocator()  # as train/sft.py does, for the in-process generation: re-exec with a caching malloc

    from bench_lora import cpu_header  # a sibling script: bench/ is sys.path[0]
    from gpt2_scratch.core.process import fast_bf16, quiet_libraries

    quiet_libraries()

    precision = ("bf16" if fast_bf16() else "no") if args.precision == "auto" else args.precision
    print(f"# {cpu_header()}; precision {'fp32' if precision == 'no' else precision}; "
          f"{args.steps} measured steps each\n")
    data, tokenizer = book_data()
    shapes = {group: full_run_shape(data, group) for group in (False, True)}
    results = []
    for name in args.configs:
        result = run_config(name, args.steps, precision, args.response_tokens)
        shape = shapes["group" in name]
        result.update(full_steps=shape["steps"], total_min=(result["startup_s"] + result["initial_s"]
                                                            + result["loop_s"] / result["steps"] * shape["steps"]) / 60)
        results.append(result)
        print(f"  measured {name}: {result['steps']} steps, process {result['wall_s']:.0f} s", flush=True)

    plain = next((r for r in results if r["train_s"]), None)
    avg_rows = BATCH * round(plain["tokens"] / plain["steps"] / BATCH) if plain else 560
    rates = {"fp32": matmul_rate("fp32", avg_rows)}
    if precision == "bf16" or fast_bf16():
        rates["bf16"] = matmul_rate("bf16", avg_rows)
    rate = rates["bf16" if precision == "bf16" else "fp32"]

    if any(r["timing"] for r in results):
        generation = measure_generation(data, tokenizer)
        for r in results:
            if r["timing"]:
                r.update(phase_table(r, shapes["group" in r["name"]], generation, rate, args.response_tokens))

    print("\n| config | measured | per step (evals incl.) | training tok/s | step MFU | whole run |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        rate_cell = mfu_cell = "—"
        if r["train_s"]:
            rate_cell = f"{r['tokens'] / r['train_s']:,.0f}"
            flops = useful_flops(r["tokens"], r["targets"], lora=r["name"].startswith("lora"))
            mfu_cell = f"{flops / r['train_s'] / rate:.0%}"
        if r["timing"]:  # the steps and evaluations after the initial losses, from the timing row
            per_step = (r["train_s"] + r["timing"]["seconds_evaluation"] - r["initial_s"]) / r["steps"]
            whole = f"{r['total_min']:.1f} min (256-token responses: {r['worst_min']:.1f})"
        else:
            per_step, whole = r["loop_s"] / r["steps"], f"{r['total_min']:.1f} min (steps, evaluations, start-up)"
        print(f"| {r['name']} | {r['steps']} steps | {per_step:.1f} s | {rate_cell} | {mfu_cell} | {whole} |")
    print("\nmatrix-multiply rate at the block's shapes, " + ", ".join(
        f"{k}: {v / 1e9:,.0f} GFLOP/s" for k, v in rates.items()) + f" ([{avg_rows}, 1024] inputs)")


if __name__ == "__main__":
    main()
