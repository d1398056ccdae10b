"""Classification finetuning speed and memory at the gpt2-small shape: frozen (the book's last block) vs all.

    python bench/bench_classify.py [--steps 5] [--warmup 2] [--batch-size 8] [--precisions no,bf16]
        [--trainable last-block,all] [--preset gpt2-small]

Each configuration runs in its own fresh process (so peak RSS is that configuration's alone): a randomly
initialised classifier of the preset's shape, the real SMS training split padded to its longest message
(120 tokens, as chapter 6), AdamW lr 5e-5 wd 0.1, the same training step as train/classify.py
(forward with attention mask, cross-entropy, backward, optimizer step), ``--warmup`` untimed steps then
``--steps`` timed ones. Tokens/s counts processed (padded) tokens, batch × 120 per step. Prints a table.
Speed only depends on the shape, so random weights measure the same as OpenAI's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "SMSSpamCollection.tsv"


def run_one(preset: str, trainable: str, precision: str, steps: int, warmup: int, batch_size: int, data: str) -> dict:
    """One configuration, in this process; returns its measurements."""
    import torch

    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForSequenceClassification, get_encoding
    from gpt2_scratch.train.classify import set_trainable
    from gpt2_scratch.train.spam_data import SpamDataset, prepare_splits

    torch.manual_seed(123)
    splits = prepare_splits(data)
    train = SpamDataset(splits.train, get_encoding().encode_ordinary, splits.label2id)
    config = GPT2ScratchConfig.from_preset(preset, num_labels=2)
    model = GPT2ScratchForSequenceClassification(config)
    n_trainable = set_trainable(model, trainable)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(123))
    batches = iter(loader)
    model.train()
    step_times = []
    for i in range(warmup + steps):
        batch = next(batches)
        tick = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss)  # host sync before stopping the clock
        if i >= warmup:
            step_times.append(time.perf_counter() - tick)
    tokens_per_step = batch_size * train.max_length
    mean = sum(step_times) / len(step_times)
    return {
        "preset": preset, "trainable": trainable, "precision": precision,
        "params": sum(p.numel() for p in model.parameters()), "trainable_params": n_trainable,
        "seq_len": train.max_length, "batch_size": batch_size, "steps": steps,
        "step_s": mean, "tok_s": tokens_per_step / mean,
        # ru_maxrss is in KiB on Linux: the process's peak resident set, model + optimizer + activations.
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--trainable", default="last-block,all", help="comma-separated --trainable values")
    parser.add_argument("--precisions", default="no,bf16", help="comma-separated: no (fp32), bf16 (autocast)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="SMS Spam Collection TSV")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = parser.parse_args()

    if args.one:
        trainable, precision = args.one.split(":")
        print(json.dumps(run_one(args.preset, trainable, precision, args.steps, args.warmup, args.batch_size,
                                 args.data)))
        return

    rows = []
    for precision in args.precisions.split(","):
        for trainable in args.trainable.split(","):
            cmd = [sys.executable, __file__, "--one", f"{trainable}:{precision}", "--preset", args.preset,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                   "--data", args.data]
            print(f"running {trainable} / {precision} ...", file=sys.stderr, flush=True)
            result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if result.returncode != 0:
                raise SystemExit(f"error: {' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))

    r0 = rows[0]
    print(f"\n{args.preset}: {r0['params']:,} parameters; batch {r0['batch_size']} x {r0['seq_len']} tokens; "
          f"{args.steps} timed steps after {args.warmup} warm-up; torch {__import__('torch').__version__}, "
          f"{os.cpu_count()} CPU cores\n")
    print("| trainable | precision | trainable params | s/step | tokens/s | peak RSS (GiB) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['trainable']} | {'fp32' if r['precision'] == 'no' else r['precision']} | "
              f"{r['trainable_params']:,} | {r['step_s']:.2f} | {r['tok_s']:,.0f} | {r['peak_rss_gib']:.2f} |")


if __name__ == "__main__":
    main()
