"""LoRA and DPO speed and memory: LoRA vs full finetuning in train/sft.py's step, a DPO step vs an SFT step.

    python bench/bench_lora.py                                   # all three tables (~1 h on 2 cores)
    python bench/bench_lora.py --parts medium --precisions bf16 --no-memory
    python bench/bench_lora.py --parts xl                        # gpt2-xl LoRA with a bf16 base: peak RSS

Tables (markdown), with the CPU's model name and bf16 flags in the header:

  medium  gpt2-medium shape (355M): full finetuning, LoRA (default: rank 8 on c_attn/c_proj/c_fc) and
          --lora book (rank 16, every linear layer incl. the head), fp32 and bf16, plus LoRA with
          --base-dtype bf16 under bf16; tokens/s (padded, as the book counts) and peak RSS.
  xl      gpt2-xl shape (1558M): peak RSS of LoRA training, fp32 base (and with --base-dtype bf16 when
          bf16 is asked for), and of full finetuning of gpt2-large, the largest that fits; full finetuning
          of gpt2-xl needs >= 16 bytes per parameter for weights, gradients and AdamW's two moments,
          25 GB before any activation, and is not run.

bf16 needs a CPU whose BLAS has bf16 GEMMs (AVX512-BF16 or AMX: see the header's flags). On an
AVX2-only CPU torch computes bf16 matrix products with its reference kernel, 10-70x slower than fp32
(a [600, 768] x [768, 3072] product: 6.5 s against 0.09 s), so there pass --precisions no.
  dpo     gpt2-small shape: a DPO step (chosen + rejected in one forward, and the frozen reference's
          forward, or a precomputed reference) vs an SFT step, tokens/s counting every input position.

Every implementation trains on the same batches (the book's data, batch 8, the sampler's order with
seed 123, random weights at the named shape: OpenAI's are not needed for speed) with train/sft.py's
and train/dpo.py's own step code (Accelerate autocast, fused AdamW, the loss over target positions
only). Throughput: one process per shape and precision builds all implementations and they take turns
(a few steps each, round after round), so a shared machine's noise hits them alike; the first step of
each is warm-up. Peak RSS: a separate process per implementation, two steps, ``ru_maxrss`` (model
creation included). Processes run with the caching malloc train/sft.py uses.
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
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def cpu_header() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "CPU unknown"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    bf16 = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} CPUs, bf16 flags: {' '.join(bf16) or 'none'}, "
            f"torch {__import__('torch').__version__}")


# ---------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------


def sft_batches(n: int) -> list[dict]:
    from gpt2_scratch.core.records import load_records
    from gpt2_scratch import get_tokenizer
    from gpt2_scratch.train.data import EpochBatchSampler, InstructionCollator, prepare_instruction_data

    data = prepare_instruction_data(load_records(str(DATA / "instruction-data.json")), get_tokenizer(), max_length=1024)
    ds = data.train.select_columns(["input_ids", "prompt_length"])
    collate = InstructionCollator(allowed_max_length=1024)
    sampler = EpochBatchSampler(list(data.train["length"]), 8, shuffle=True, seed=123)
    return [collate([ds[i] for i in idx]) for idx in list(sampler)[:n]]


def dpo_batches(n: int) -> list[dict]:
    from gpt2_scratch import get_tokenizer
    from gpt2_scratch.train.data import EpochBatchSampler
    from gpt2_scratch.train.preference_data import PreferenceCollator, load_preference_records, prepare_preference_data

    records = load_preference_records(str(DATA / "instruction-data-with-preference.json"))
    data = prepare_preference_data(records, get_tokenizer(), max_length=1024)
    collate = PreferenceCollator(allowed_max_length=1024)
    sampler = EpochBatchSampler(list(data.train["length"]), 8, shuffle=True, seed=123)
    return [collate([data.train[i] for i in idx]) for idx in list(sampler)[:n]]


# ---------------------------------------------------------------------------------------------------
# One implementation's step
# ---------------------------------------------------------------------------------------------------

LORA = {"lora": dict(lora="default"), "lora-book": dict(lora="book"),
        "lora+bf16base": dict(lora="default", base_dtype="bf16"),
        "lora-book+bf16base": dict(lora="book", base_dtype="bf16")}


def lora_settings(impl: str, precision: str):
    from gpt2_scratch.train import lora

    options = dict(lora=None, lora_r=None, lora_alpha=None, lora_dropout=None, lora_targets=None, lora_init=None,
                   base_dtype="fp32", merge=True, mixed_precision=precision, push_to_hub=None)
    options.update(LORA.get(impl.removeprefix("dpo-"), {}))
    return lora.settings(SimpleNamespace(**options))


class Trainer:
    """An implementation's training step on its batches, timed."""

    def __init__(self, impl: str, shape: str, precision: str, steps: int):
        import torch
        from bench_chapter7 import step_run  # this script runs from bench/, first on sys.path

        from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
        from gpt2_scratch.train import lora
        from gpt2_scratch.train.loop import train_step

        self.impl, self.steps_done, self.tokens, self.seconds = impl, 0, 0, 0.0
        torch.manual_seed(123)
        model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset(shape))
        settings = lora_settings(impl, precision)
        is_dpo = impl.startswith("dpo")
        self.batches = dpo_batches(steps + 1) if is_dpo else sft_batches(steps + 1)

        if not is_dpo:
            from gpt2_scratch.train.sft import SFTArgs, SFTTask

            model = lora.wrap(model, settings).train()
            self.trainable, self.total = lora.parameter_counts(model)
            run = step_run(model, SFTArgs(), mixed_precision=precision)  # fused AdamW over the trained parameters
            task = SFTTask(run.args, None, None, None, None, "", settings)  # train/sft.py's loss
        else:
            import copy

            from gpt2_scratch.train.dpo import DPOArgs, DPOTask, Reference

            precomputed = impl.endswith("precomputed")
            frozen = None if settings or precomputed else copy.deepcopy(model).eval().requires_grad_(False)
            policy = lora.wrap(model, settings).train()
            if settings:
                reference = Reference(adapters_of=policy)
            elif precomputed:  # the table lookup costs nothing: give every pair a fixed reference value
                reference = Reference()
                table = torch.full((10_000, 2), -2.0)
                reference.tables = {"train": table}
            else:
                reference = Reference(model=frozen)
            self.trainable, self.total = lora.parameter_counts(policy)
            run = step_run(policy, DPOArgs(logprob="mean", beta=0.1), mixed_precision=precision)  # lr 5e-6, wd 0.01
            task = DPOTask(run.args, None, None, reference, None, None, "", "alpaca", settings)  # train/dpo.py's loss

        def step(batch):  # train/loop.py's train_step, one micro-batch per step
            train_step(run, task, [batch])
            return task.tokens(batch)

        self.step = step
        step(self.batches[0])  # warm-up: allocator, optimizer state; not timed

    def run(self, n: int) -> None:
        for batch in self.batches[1 + self.steps_done: 1 + self.steps_done + n]:
            start = time.perf_counter()
            self.tokens += self.step(batch)
            self.seconds += time.perf_counter() - start
            self.steps_done += 1

    def row(self, shape: str, precision: str) -> dict:
        return {"impl": self.impl, "shape": shape, "precision": precision, "steps": self.steps_done,
                "tok_s": self.tokens / self.seconds, "sec_per_step": self.seconds / self.steps_done,
                "trainable": self.trainable, "total": self.total}


def run_throughput(impls: list[str], shape: str, precision: str, rounds: int, steps: int) -> list[dict]:
    trainers = [Trainer(impl, shape, precision, rounds * steps) for impl in impls]
    for _ in range(rounds):
        for trainer in trainers:
            trainer.run(steps)
    return [t.row(shape, precision) for t in trainers]


def run_memory(impl: str, shape: str, precision: str) -> dict:
    trainer = Trainer(impl, shape, precision, steps=1)
    trainer.run(1)
    return {"impl": impl, "shape": shape, "precision": precision, "trainable": trainer.trainable,
            "total": trainer.total, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "sec_per_step": trainer.seconds}


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


def child(spec: str, rounds: int, steps: int) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", spec, "--rounds", str(rounds), "--steps", str(steps)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  {spec} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr, flush=True)
        return []
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["medium", "xl", "dpo"], choices=["medium", "xl", "dpo"])
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"])
    parser.add_argument("--rounds", type=int, default=3, help="turns each implementation takes")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per turn (after one warm-up step)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS runs")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # "throughput|memory:impl,...:shape:precision"
    args = parser.parse_args()

    if args.child:
        from gpt2_scratch.core.allocator import use_caching_allocator

        use_caching_allocator()  # as the training scripts do
        kind, impls, shape, precision = args.child.split(":")
        rows = (run_throughput(impls.split(","), shape, precision, args.rounds, args.steps) if kind == "throughput"
                else [run_memory(impls, shape, precision)])
        print(json.dumps(rows))
        return

    print(f"# bench_lora: {cpu_header()}\n", flush=True)
    results: dict[str, list[dict]] = {}
    if "medium" in args.parts:
        rows, memory = [], {}
        for precision in args.precisions:
            impls = ["full", "lora", "lora-book"] + (["lora+bf16base"] if precision == "bf16" else [])
            print(f"timing {', '.join(impls)} at gpt2-medium {precision} ...", file=sys.stderr, flush=True)
            rows += child(f"throughput:{','.join(impls)}:gpt2-medium:{precision}", args.rounds, args.steps)
            for impl in [] if args.no_memory else impls:
                print(f"peak RSS of {impl} at gpt2-medium {precision} ...", file=sys.stderr, flush=True)
                for r in child(f"memory:{impl}:gpt2-medium:{precision}", 1, 1):
                    memory[(impl, precision)] = r["peak_rss_gb"]
        print("## gpt2-medium shape: LoRA vs full finetuning (train/sft.py's step, book data, batch 8)\n")
        print("| precision | training | trainable params | tokens/s | s/step | vs full (tokens/s) | peak RSS GB | "
              "vs full (RSS) |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            full = next(x for x in rows if x["impl"] == "full" and x["precision"] == r["precision"])
            rss, full_rss = memory.get((r["impl"], r["precision"])), memory.get(("full", r["precision"]))
            r["peak_rss_gb"] = rss
            print(f"| {'fp32' if r['precision'] == 'no' else 'bf16'} | {r['impl']} | {r['trainable']:,} | "
                  f"{r['tok_s']:.0f} | {r['sec_per_step']:.2f} | {r['tok_s'] / full['tok_s']:.2f}x | "
                  f"{'-' if rss is None else f'{rss:.2f}'} | "
                  f"{'-' if rss is None or full_rss is None else f'{100 * rss / full_rss:.0f}%'} |", flush=True)
        print()
        results["medium"] = rows
    if "xl" in args.parts:
        rows = []
        runs = [("lora", "gpt2-xl", "no"), ("full", "gpt2-large", "no")]
        if "bf16" in args.precisions:
            runs.insert(1, ("lora+bf16base", "gpt2-xl", "bf16"))
        for impl, shape, precision in runs:
            print(f"peak RSS of {impl} at {shape} {precision} ...", file=sys.stderr, flush=True)
            rows += child(f"memory:{impl}:{shape}:{precision}", 1, 1)
        print("## Memory of the big shapes (batch 8, two steps)\n")
        print("| shape | precision | training | trainable / total params | peak RSS GB | s/step |")
        print("|---|---|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['shape']} | {'fp32' if r['precision'] == 'no' else 'bf16'} | {r['impl']} | {r['trainable']:,} / "
                  f"{r['total']:,} | {r['peak_rss_gb']:.2f} | {r['sec_per_step']:.1f} |", flush=True)
        print("| gpt2-xl | fp32 | full | 1,557,611,200 / 1,557,611,200 | not run: weights + grads + AdamW = 16 B/param "
              "= 24.9 GB before activations | - |\n")
        results["xl"] = rows
    if "dpo" in args.parts:
        rows = []
        for precision in args.precisions:
            impls = ["sft-full", "dpo-full", "dpo-full-precomputed", "dpo-lora"]
            print(f"timing {', '.join(impls)} at gpt2-small {precision} ...", file=sys.stderr, flush=True)
            rows += child(f"throughput:{','.join(i.replace('sft-full', 'full') for i in impls)}:gpt2-small:{precision}",
                          args.rounds, args.steps)
        print("## gpt2-small shape: a DPO step vs an SFT step (tokens = every input position; DPO: chosen + "
              "rejected)\n")
        print("| precision | step | tokens/s | s/step | vs SFT (tokens/s) |")
        print("|---|---|---:|---:|---:|")
        for r in rows:
            sft = next(x for x in rows if x["impl"] == "full" and x["precision"] == r["precision"])
            name = {"full": "SFT, full", "dpo-full": "DPO, full, frozen reference copy",
                    "dpo-full-precomputed": "DPO, full, precomputed reference",
                    "dpo-lora": "DPO, LoRA (reference = adapters off)"}[r["impl"]]
            print(f"| {'fp32' if r['precision'] == 'no' else 'bf16'} | {name} | {r['tok_s']:.0f} | "
                  f"{r['sec_per_step']:.2f} | {r['tok_s'] / sft['tok_s']:.2f}x |", flush=True)
        print()
        results["dpo"] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
