"""Benchmark: greedy batch-1 generation speed, our model (transformers `generate`, KV cache) vs llama.cpp
running our GGUF exports of the same weights. Prints a markdown table.

    python bench/bench_gguf.py                      # gpt2-small shape, f16 and q8_0, ~3-5 min on 2 cores
    python bench/bench_gguf.py --dtypes f32,f16,bf16,q8_0 --rounds 5 --new-tokens 256
    python bench/bench_gguf.py --quick              # tiny model: checks the script works

The model has gpt2-small's shape with random weights (seed 123): speed depends on the shape only.
Prompts are the book's first test-split instructions (instruction-data.json [935:]) in the Alpaca
format. Every method generates exactly --new-tokens tokens per prompt (our generate with
min_new_tokens, llama.cpp's token generator stopped by count), timed from prompt to last token, so
prefill is included the same way. Methods alternate prompt by prompt (the order rotating each time),
so a neighbour's load on the shared cores hits all of them alike; the table reports the median and
the spread over all (round, prompt) samples. Both sides use the same number of threads (torch's
intra-op threads = llama.cpp n_threads) and run in one process with the project's caching malloc
(core/allocator.py), as eval/generate.py does.

Needs the `llama` extra (llama-cpp-python). The CPU can change between sessions here: compare ratios
within one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def cpu_description() -> tuple[str, str]:
    """(lscpu model name, the SIMD flags that matter for these kernels)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown", ""
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown").strip()
    flags = set(fields.get("Flags", "").split())
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8"]
    return name, " ".join(f for f in wanted if f in flags)


def prompts(n: int, quick: bool) -> list[str]:
    from gpt2_scratch.core.prompts import format_input, response_header

    path = SHARED / "data" / "instruction-data.json"
    if path.is_file():
        records = json.loads(path.read_text(encoding="utf-8"))[935:935 + n]
    else:  # outside the project's layout: any instruction will do, speed depends on length only
        records = [{"instruction": f"Rewrite sentence number {i} in the passive voice.", "input": "The cat ate."}
                   for i in range(n)]
    return [format_input(r) + response_header() for r in records]


def time_ours(model, ids: list[int], new_tokens: int) -> float:
    import torch

    x = torch.tensor([ids])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=50256)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - len(ids) == new_tokens
    return elapsed


def time_llama(llm, ids: list[int], new_tokens: int) -> float:
    start = time.perf_counter()
    n = 0
    # Greedy: top_k=1, no repeat penalty (llama-cpp-python's default is 1.1), the prompt evaluated anew.
    for _ in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        n += 1
        if n == new_tokens:
            break
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="f16,q8_0", help="GGUF dtypes to run in llama.cpp (comma-separated)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds over the prompts; the table reports medians")
    parser.add_argument("--prompts", type=int, default=5, help="prompts per round")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--threads", type=int, help="threads for both sides (default: torch's intra-op threads)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 round: checks the script works")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.prompts, args.new_tokens = 1, 1, 16

    from gpt2_scratch.core.allocator import AllocatorError, loaded_allocator, use_caching_allocator

    try:  # before torch is imported: re-run with the caching malloc our generation uses (core/allocator.py)
        use_caching_allocator()
    except AllocatorError as err:
        sys.exit(f"error: {err}")
    import torch

    if args.threads is None:
        args.threads = torch.get_num_threads()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("error: llama_cpp is not importable; install it with `pip install -e .[llama]`")
    from gpt2_scratch.convert.gguf import export_gguf
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM, get_encoding, save_model_dir

    torch.set_num_threads(args.threads)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    torch.manual_seed(123)
    overrides = dict(n_layers=2, emb_dim=64, n_heads=4) if args.quick else {}
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **overrides)).eval()
    enc = get_encoding()
    texts = prompts(args.prompts, args.quick)
    token_lists = [enc.encode(t) for t in texts]

    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        tmp = Path(tmp)
        model_dir = save_model_dir(model, tmp / "model")
        sizes = {"ours": (model_dir / "model.safetensors").stat().st_size}
        llms = {}
        for dtype in dtypes:
            path, _ = export_gguf(model_dir, tmp / f"model-{dtype}.gguf", dtype=dtype, prompt_style="alpaca")
            sizes[dtype] = path.stat().st_size
            llms[dtype] = llama_cpp.Llama(model_path=str(path), n_ctx=model.config.context_length,
                                          n_threads=args.threads, n_threads_batch=args.threads, verbose=False)

        methods = ["ours", *dtypes]
        run = {m: (lambda ids, m=m: time_ours(model, ids, args.new_tokens) if m == "ours"
                   else time_llama(llms[m], ids, args.new_tokens)) for m in methods}
        for m in methods:  # warm-up: first-call allocations, lazy weight paging
            run[m](token_lists[0][:8])
        speeds: dict[str, list[float]] = {m: [] for m in methods}
        sample = 0
        for r in range(args.rounds):
            for ids in token_lists:
                order = methods[sample % len(methods):] + methods[:sample % len(methods)]
                for m in order:
                    speeds[m].append(args.new_tokens / run[m](ids))
                sample += 1
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{m} {statistics.median(speeds[m][-len(token_lists):]):.1f} tok/s" for m in methods),
                file=sys.stderr, flush=True)
        for llm in llms.values():
            llm.close()

    name, flags = cpu_description()
    base = statistics.median(speeds["ours"])
    shape = "tiny (2 layers, emb 64)" if args.quick else "gpt2-small shape (124M, random weights)"
    print(f"\n{shape}; greedy, batch 1, {len(token_lists)} prompts of {min(map(len, token_lists))}-"
          f"{max(map(len, token_lists))} tokens + {args.new_tokens} new tokens each, {args.rounds} rounds; "
          f"{args.threads} threads; malloc: {loaded_allocator()}")
    print(f"CPU: {name} ({flags}); load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}\n")
    print("| method | file | size (MB) | tokens/s (median) | quartiles | vs ours |")
    print("|---|---|---:|---:|---:|---:|")
    for m in methods:
        label = "ours: transformers generate (fp32, KV cache)" if m == "ours" else f"llama.cpp, {m} GGUF"
        file = "model.safetensors" if m == "ours" else f"model-{m}.gguf"
        s = speeds[m]
        q1, _, q3 = statistics.quantiles(s, n=4) if len(s) > 1 else (s[0], s[0], s[0])
        print(f"| {label} | {file} | {sizes[m] / 1e6:.0f} | {statistics.median(s):.1f} | "
              f"{q1:.1f}-{q3:.1f} | {statistics.median(s) / base:.2f}x |")


if __name__ == "__main__":
    main()
