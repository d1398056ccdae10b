"""Activation checkpointing (``--gradient-checkpointing``): peak memory and step time with and without it.

    python bench/bench_checkpointing.py                    # gpt2-large's shape, the book's longest batch, fp32
    python bench/bench_checkpointing.py --shape gpt2-medium --steps 3

The batch is the longest the chapter-7 run can meet: the 8 longest examples of the book's training split, collated
as train/sft.py collates them (padded to the longest). Each setting runs in a fresh process (peak RSS is per process:
``ru_maxrss``) and times the project's own step, ``train.loop.train_step`` with SFT's loss (fused AdamW included),
after one untimed step that allocates AdamW's moments. What checkpointing saves is the activations kept for the
backward pass; weights, gradients and AdamW's moments (16 bytes per parameter) are the same in both rows, so the
table also prints the peak minus that fixed part.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOOK_DATA = REPO.parent / "shared" / "data" / "instruction-data.json"


def longest_batch(batch_size: int) -> dict:
    """The ``batch_size`` longest examples of the book's training split, collated as train/sft.py does."""
    from gpt2_scratch import get_tokenizer
    from gpt2_scratch.core.records import load_records
    from gpt2_scratch.train.data import InstructionCollator, prepare_instruction_data

    data = prepare_instruction_data(load_records(str(BOOK_DATA)), get_tokenizer(), max_length=1024)
    lengths = list(data.train["length"])
    longest = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:batch_size]
    train = data.train.select_columns(["input_ids", "prompt_length"])
    return InstructionCollator(allowed_max_length=1024)([train[i] for i in longest])


def measure(shape: str, checkpointing: bool, steps: int, batch_size: int) -> dict:
    """One setting, in this process: seconds per step (median of ``steps`` after a warm-up) and peak RSS."""
    import torch

    from bench_chapter7 import step_run  # bench/ is first on sys.path when this script runs
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
    from gpt2_scratch.train.loop import train_step
    from gpt2_scratch.train.run import enable_activation_checkpointing
    from gpt2_scratch.train.sft import SFTArgs, SFTTask

    batch = longest_batch(batch_size)
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset(shape)).train()
    if checkpointing:
        enable_activation_checkpointing(model)
    run = step_run(model, SFTArgs())
    task = SFTTask(run.args, None, None, None, None, "", None)
    times = []
    for i in range(steps + 1):
        tick = time.perf_counter()
        sums, _ = train_step(run, task, [batch])
        if i:
            times.append(time.perf_counter() - tick)
    params = sum(p.numel() for p in model.parameters())
    return {"checkpointing": checkpointing, "seconds": sorted(times)[len(times) // 2], "loss": sums[0].item() / sums[1].item(),
            "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "params": params,
            "batch": list(batch["input_ids"].shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="gpt2-large", choices=["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.shape, args.child == "checkpointed", args.steps, args.batch_size)))
        return
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    print(f"CPU: {cpu}, {'AVX512-BF16' if 'avx512_bf16' in flags else 'AVX-512' if 'avx512f' in flags else 'AVX2'}; "
          f"{args.shape}, fp32, the {args.batch_size} longest examples of the book's training split in one batch")
    rows = []
    for mode in ("plain", "checkpointed"):  # each in a fresh process: ru_maxrss is the process's peak
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--shape", args.shape, "--steps",
                              str(args.steps), "--batch-size", str(args.batch_size)], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).parent)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    fixed = 16 * rows[0]["params"]  # fp32 weights + gradients + AdamW's two moments
    print(f"batch {rows[0]['batch'][0]} x {rows[0]['batch'][1]} tokens; weights + gradients + AdamW: {fixed / 2**30:.2f} GiB")
    print(f"| {'--gradient-checkpointing':<24} | {'peak RSS':>9} | {'peak - fixed':>12} | {'s/step':>7} | loss |")
    print(f"|{'-' * 26}|{'-' * 11}:|{'-' * 14}:|{'-' * 9}:|------|")
    for r in rows:
        print(f"| {'on' if r['checkpointing'] else 'off':<24} | {r['peak_bytes'] / 2**30:6.2f} GiB | "
              f"{(r['peak_bytes'] - fixed) / 2**30:8.2f} GiB | {r['seconds']:7.1f} | {r['loss']:.4f} |")
    plain, ckpt = rows
    print(f"checkpointing: peak x{ckpt['peak_bytes'] / plain['peak_bytes']:.2f}, activations part "
          f"x{(ckpt['peak_bytes'] - fixed) / (plain['peak_bytes'] - fixed):.2f}, step time x{ckpt['seconds'] / plain['seconds']:.2f} "
          f"(same losses: {plain['loss'] == ckpt['loss']})")


if __name__ == "__main__":
    main()
