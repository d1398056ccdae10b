"""Activation checkpointing (``--gradient-checkpointing``): peak memory and step time with and without it.

    python bench/bench_checkpointing.py                    # gpt2-large's shape, fp32: the two batches below
    python bench/bench_checkpointing.py --shape gpt2-medium --steps 3 --batches book

Two batches: the longest the chapter-7 run meets (``book``: the 8 longest examples of the book's training split,
collated as train/sft.py collates them, 8 x 91 tokens) and one sequence filling the whole context (``context``:
1 x 1024 random tokens), where activations, not weights, are what fills memory. Each setting runs in a fresh
process (peak RSS is per process: ``ru_maxrss``) and times the project's own step, ``train.loop.train_step``
with SFT's loss (fused AdamW included), after one untimed step that allocates AdamW's moments. What
checkpointing saves is the activations kept for the backward pass; weights, gradients and AdamW's moments (16
bytes per parameter) are the same in both rows, so the table also prints the peak minus that fixed part. The
machine is shared: compare the step times of one run only, as a ratio.
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


def context_batch(length: int, vocab: int) -> dict:
    """One sequence of ``length`` random tokens, every position a target."""
    import torch

    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1)}


def saved_for_backward(model, batch: dict) -> int:
    """Bytes of the tensors the forward pass keeps for the backward pass, weights not counted: the activations
    that checkpointing trades for recomputation (the backward pass of a checkpointed block adds its own, one
    block at a time)."""
    import torch

    weights = {p.data_ptr() for p in model.parameters()}
    total = 0

    def keep(t):
        nonlocal total
        if t.data_ptr() not in weights:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(batch["input_ids"], shift_labels=batch["labels"], use_cache=False, return_logits=False,
              num_items_in_batch=1)
    model.zero_grad(set_to_none=True)
    return total


def measure(shape: str, checkpointing: bool, steps: int, batch_size: int, batch_kind: str) -> dict:
    """One setting, in this process: seconds per step (median of ``steps`` after a warm-up) and peak RSS."""
    import torch

    from bench_chapter7 import step_run  # bench/ is first on sys.path when this script runs
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
    from gpt2_scratch.train.loop import train_step
    from gpt2_scratch.train.step_options import enable_activation_checkpointing
    from gpt2_scratch.train.sft import SFTArgs, SFTTask

    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset(shape)).train()
    batch = (longest_batch(batch_size) if batch_kind == "book" else
             context_batch(model.config.context_length, model.config.vocab_size))
    if checkpointing:
        enable_activation_checkpointing(model)
    kept = saved_for_backward(model, batch)
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
            "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "params": params, "saved": kept,
            "batch": list(batch["input_ids"].shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="gpt2-large", choices=["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples in the book batch")
    parser.add_argument("--batches", nargs="+", default=["book", "context"], choices=["book", "context"])
    parser.add_argument("--child", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.shape, args.child == "checkpointed", args.steps, args.batch_size,
                                 args.batches[0])))
        return
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    print(f"CPU: {cpu}, {'AVX512-BF16' if 'avx512_bf16' in flags else 'AVX-512' if 'avx512f' in flags else 'AVX2'}; "
          f"{args.shape}, fp32, {args.steps} timed step(s) per row")
    print(f"| batch | {'--gradient-checkpointing':<24} | saved for backward | {'peak RSS':>9} | {'peak - fixed':>12} "
          f"| {'s/step':>7} | loss |")
    print(f"|-------|{'-' * 26}|-------------------:|{'-' * 11}:|{'-' * 14}:|{'-' * 9}:|------|")
    summary = []
    for kind in args.batches:
        rows = []
        for mode in ("plain", "checkpointed"):  # each in a fresh process: ru_maxrss is the process's peak
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--shape", args.shape, "--steps",
                                  str(args.steps), "--batch-size", str(args.batch_size), "--batches", kind],
                                 capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        fixed = 16 * rows[0]["params"]  # fp32 weights + gradients + AdamW's two moments
        shape = "x".join(map(str, rows[0]["batch"]))
        for r in rows:
            print(f"| {shape:<5} | {'on' if r['checkpointing'] else 'off':<24} | {r['saved'] / 2**20:14,.0f} MiB "
                  f"| {r['peak_bytes'] / 2**30:6.2f} GiB | "
                  f"{(r['peak_bytes'] - fixed) / 2**30:8.2f} GiB | {r['seconds']:7.1f} | {r['loss']:.4f} |", flush=True)
        plain, ckpt = rows
        summary.append(f"{shape}: saved for backward x{ckpt['saved'] / plain['saved']:.3f}, peak "
                       f"x{ckpt['peak_bytes'] / plain['peak_bytes']:.2f}, above the fixed "
                       f"{fixed / 2**30:.2f} GiB x{(ckpt['peak_bytes'] - fixed) / (plain['peak_bytes'] - fixed):.2f}, "
                       f"step time x{ckpt['seconds'] / plain['seconds']:.2f}, same loss: {plain['loss'] == ckpt['loss']}")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
