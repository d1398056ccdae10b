"""The book's whole chapter-7 run, on this machine: wall clock of full finetuning and LoRA, and the step's MFU.

    python bench/bench_chapter7.py                        # full and LoRA, book order and --group-by-length
    python bench/bench_chapter7.py --steps 20 --configs full lora

The run the book's readers wait for: gpt2-medium, the book's 1100 records (935 train), batch 8, 2 epochs
(232 optimizer steps), evaluation after steps 1, 6, 11, ... over 5 validation batches, the initial
losses. Each configuration runs the real ``train/sft.py`` (random weights at gpt2-medium's shape: OpenAI's
are not needed for speed) for ``--steps`` steps in its own process, and the whole run is extrapolated
from the moments its log lines arrive:

    whole run = start-up (process start to the first log line: imports, model init, data)
              + the initial losses
              + seconds per step, evaluations included, over the measured steps × 232

With the default 16 steps the measured stretch holds 4 evaluations (one per 4 steps; the whole run has
47 in 232 steps), so the estimate leans slightly high. ``--book-exact`` is measured the same way.
Not counted: the 35-token sample after each epoch and the test responses (`bench/bench_eval.py`).

The same run also measures the machine's matrix-multiply rate at the model's shapes (fp32, and bf16
where it is fast) and reports the model FLOP utilisation of the training steps (their own time, from
metrics.jsonl): useful FLOPs per padded token are 2 (forward) + 2 (input gradients) + 2 (weight
gradients, trainable weights only) times the parameters each token passes through; the output head
only runs on target positions (train/sft.py projects nothing else), so it counts for target tokens alone.
"""

from __future__ import annotations

import argparse
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
EPOCHS, BATCH, EVAL_FREQ, EVAL_ITER = 2, 8, 5, 5

CONFIGS = {  # name: extra train/sft.py options
    "full": [],
    "full+group": ["--group-by-length"],
    "lora": ["--lora", "book"],
    "lora+group": ["--lora", "book", "--group-by-length"],
    "book-exact": ["--book-exact"],
}


def full_run_steps(group: bool) -> int:
    """Optimizer steps of the whole 2-epoch run (the sampler drops the last incomplete batch, as the book)."""
    from gpt2_scratch.core.records import load_records
    from gpt2_scratch import get_tokenizer
    from gpt2_scratch.train.data import EpochBatchSampler, prepare_instruction_data

    data = prepare_instruction_data(load_records(str(BOOK_DATA)), get_tokenizer(), max_length=1024)
    sampler = EpochBatchSampler(list(data.train["length"]), BATCH, shuffle=True, group_by_length=group, seed=123)
    return EPOCHS * len(list(sampler))


def run_config(name: str, steps: int, precision: str) -> dict:
    """Run train/sft.py for ``steps`` steps; time its phases from the moments its log lines arrive."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, str(REPO / "train" / "sft.py"), "--model", "gpt2-medium", "--random-init",
               "--data", str(BOOK_DATA), "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
               "--eval-freq", str(EVAL_FREQ), "--eval-iter", str(EVAL_ITER), "--max-steps", str(steps),
               "--mixed-precision", "no" if name == "book-exact" else precision,  # the book trains in fp32
               "--max-new-tokens", "1", "--sample-tokens", "1",
               "--out", str(out), *CONFIGS[name]]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        moments: list[tuple[float, str]] = []
        for line in proc.stdout:
            moments.append((time.perf_counter() - start, line.rstrip()))
        if proc.wait() != 0:
            raise SystemExit(f"{name}: train/sft.py failed (exit {proc.returncode}); run it by hand:\n  "
                             + " ".join(cmd))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    header = next(t for t, line in moments if line.startswith("model "))
    first = next(t for t, line in moments if line.startswith("initial losses"))
    logged = [(t, int(m.group(1))) for t, line in moments if (m := re.match(r"epoch \d+/\d+ \| step\s+(\d+)/", line))]
    last_t, n = logged[-1]
    last_row = next(r for r in reversed(rows) if r["step"] in (n, n - 1) and not r.get("initial"))
    train_seconds, previous = 0.0, 0
    for r in rows:  # our rows' throughput covers the steps since the row before (--book-exact's rows have none)
        if r.get("tokens_per_sec"):
            train_seconds += (r["tokens_seen"] - previous) / r["tokens_per_sec"]
            previous = r["tokens_seen"]
    return {"name": name, "startup_s": header, "initial_s": first - header, "steps": n, "loop_s": last_t - first,
            "tokens": last_row["tokens_seen"], "targets": last_row.get("target_tokens_seen", 0),
            "train_s": train_seconds or None}


def matmul_rate(dtype_name: str, rows: int, repeats: int = 5) -> float:
    """FLOP/s of the block's four weight products on [rows, in] inputs (median of repeats)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    shapes = [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)]  # c_attn, attn c_proj, c_fc, mlp c_proj
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="steps measured per configuration")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--precision", default="auto", choices=["no", "bf16", "auto"],
                        help="train/sft.py's --mixed-precision (auto: bf16 only where it is fast)")
    args = parser.parse_args()

    from bench_lora import cpu_header  # a sibling script: bench/ is sys.path[0]
    from gpt2_scratch.train.run import fast_bf16, quiet_libraries

    quiet_libraries()

    precision = ("bf16" if fast_bf16() else "no") if args.precision == "auto" else args.precision
    print(f"# {cpu_header()}; precision {'fp32' if precision == 'no' else precision}; {args.steps} measured steps each\n")
    full_steps = {group: full_run_steps(group) for group in (False, True)}
    results = []
    for name in args.configs:
        result = run_config(name, args.steps, precision)
        steps = full_steps["group" in name]
        result.update(full_steps=steps, total_min=(result["startup_s"] + result["initial_s"]
                                                   + result["loop_s"] / result["steps"] * steps) / 60)
        results.append(result)
        print(f"  measured {name}: {result['steps']} steps in {result['loop_s']:.0f} s", flush=True)

    plain = next((r for r in results if r["train_s"]), None)
    avg_rows = BATCH * round(plain["tokens"] / plain["steps"] / BATCH) if plain else 560
    rates = {"fp32": matmul_rate("fp32", avg_rows)}
    if precision == "bf16" or fast_bf16():
        rates["bf16"] = matmul_rate("bf16", avg_rows)
    rate = rates["bf16" if precision == "bf16" else "fp32"]
    print("\n| config | measured | per step (evals incl.) | training tok/s | MFU | whole run (232 steps) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        rate_cell = mfu_cell = "—"
        if r["train_s"]:
            rate_cell = f"{r['tokens'] / r['train_s']:,.0f}"
            flops = useful_flops(r["tokens"], r["targets"], lora=r["name"].startswith("lora"))
            mfu_cell = f"{flops / r['train_s'] / rate:.0%}"
        print(f"| {r['name']} | {r['steps']} steps | {r['loop_s'] / r['steps']:.1f} s | {rate_cell} | {mfu_cell} | "
              f"{r['total_min']:.1f} min |")
    print("\nmatrix-multiply rate at the block's shapes, " + ", ".join(
        f"{k}: {v / 1e9:,.0f} GFLOP/s" for k, v in rates.items()) + f" ([{avg_rows}, 1024] inputs)")


if __name__ == "__main__":
    main()
