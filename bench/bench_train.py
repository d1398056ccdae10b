"""Training throughput and memory: our GPT-2 and loop vs transformers' GPT2LMHeadModel vs the book's loop.

    python bench/bench_train.py                 # every cell, a few steps each (~15-30 min on 2 cores)
    python bench/bench_train.py --shapes gpt2-small --steps 2

Each cell runs in its own subprocess (so peak RSS is that cell's alone) on the same batches: the
book's instruction data (train split, tokenized as train/sft.py does), batch 8, shuffled with one
seed, AdamW lr 5e-5 weight decay 0.1, randomly initialised weights at the named shape.

  ours          GPT2ScratchForCausalLM in train/sft.py's loop (Accelerate, TargetTokenLoss: logits only
                where there is a target, loss summed and divided by the target-token count)
  ours+group    the same with --group-by-length batches (less padding)
  transformers  transformers' GPT2LMHeadModel (sdpa attention) in exactly the same loop
  book          the book's reference loop: a model written the book's way (separate q/k/v, a stored
                causal mask, explicit softmax, untied output head), plain PyTorch, logits for every
                position, F.cross_entropy mean per batch, no accumulation normalisation, fp32 only

Reported: padded tokens/s (input_ids.numel(), what the book counts as "tokens seen"), non-pad
tokens/s (real tokens), peak RSS. The first step is warm-up and not timed.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BOOK_DATA = REPO.parent / "shared" / "data" / "instruction-data.json"


# ---------------------------------------------------------------------------------------------------
# The book's way of writing GPT-2 (chapter 4), in our own words, for the reference loop only.
# ---------------------------------------------------------------------------------------------------


def book_style_model(cfg: dict):
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            d, self.h = cfg["emb_dim"], cfg["n_heads"]
            self.q, self.k, self.v = (nn.Linear(d, d, bias=True) for _ in range(3))
            self.out = nn.Linear(d, d)
            # A stored upper-triangular mask, sliced per call, as the book does.
            self.register_buffer("mask", torch.triu(torch.ones(cfg["context_length"], cfg["context_length"]), 1))

        def forward(self, x):
            B, T, D = x.shape
            hd = D // self.h
            q, k, v = (f(x).view(B, T, self.h, hd).transpose(1, 2) for f in (self.q, self.k, self.v))  # (B, h, T, hd)
            scores = q @ k.transpose(2, 3)  # (B, h, T, T)
            scores = scores.masked_fill(self.mask.bool()[:T, :T], -torch.inf)
            weights = torch.softmax(scores / hd**0.5, dim=-1)
            return self.out((weights @ v).transpose(1, 2).reshape(B, T, D))

    class LayerNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.scale, self.shift = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

        def forward(self, x):
            mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
            return self.scale * (x - mean) / torch.sqrt(var + 1e-5) + self.shift

    class GELU(nn.Module):
        def forward(self, x):
            return 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            d = cfg["emb_dim"]
            self.norm1, self.att, self.norm2 = LayerNorm(d), Attention(), LayerNorm(d)
            self.ff = nn.Sequential(nn.Linear(d, 4 * d), GELU(), nn.Linear(4 * d, d))

        def forward(self, x):
            x = x + self.att(self.norm1(x))
            return x + self.ff(self.norm2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            d = cfg["emb_dim"]
            self.tok_emb, self.pos_emb = nn.Embedding(cfg["vocab_size"], d), nn.Embedding(cfg["context_length"], d)
            self.blocks = nn.Sequential(*(Block() for _ in range(cfg["n_layers"])))
            self.final_norm = LayerNorm(d)
            self.out_head = nn.Linear(d, cfg["vocab_size"], bias=False)  # untied, as in the book

        def forward(self, idx):
            x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
            return self.out_head(self.final_norm(self.blocks(x)))

    return GPT()


# ---------------------------------------------------------------------------------------------------
# One cell (runs in a child process)
# ---------------------------------------------------------------------------------------------------


def batches(steps: int, group: bool) -> list[dict]:
    from gpt2_scratch import get_tokenizer
    from train.data import EpochBatchSampler, InstructionCollator, prepare_instruction_data

    data = prepare_instruction_data(str(BOOK_DATA), get_tokenizer(), max_length=1024)
    sampler = EpochBatchSampler(list(data.train["length"]), 8, shuffle=True, group_by_length=group, seed=123)
    collate = InstructionCollator(allowed_max_length=1024)
    return [collate([data.train[i] for i in idx]) for idx in list(sampler)[:steps]]


def run_cell(impl: str, shape: str, precision: str, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from gpt2_scratch import PRESETS

    torch.manual_seed(123)
    cfg = dict(vocab_size=50257, context_length=1024, **PRESETS[shape])
    data = batches(steps + 1, group=impl == "ours+group")

    if impl == "book":
        model = book_style_model(cfg)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)

        def step(batch):
            optimizer.zero_grad()
            logits = model(batch["input_ids"])
            loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
            loss.backward()
            optimizer.step()
            return loss.item()
    else:
        from accelerate import Accelerator

        from train.sft import TargetTokenLoss

        if impl == "transformers":
            from transformers import GPT2Config, GPT2LMHeadModel

            hf_cfg = GPT2Config(n_embd=cfg["emb_dim"], n_layer=cfg["n_layers"], n_head=cfg["n_heads"],
                                n_positions=1024, vocab_size=50257, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            lm = GPT2LMHeadModel(hf_cfg)
        else:
            from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

            lm = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset(shape))
        lm.train()
        accelerator = Accelerator(mixed_precision=precision, cpu=True)
        model = TargetTokenLoss(lm)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)

        def step(batch):  # train/sft.py's step, without accumulation (one micro-batch per step)
            n_targets = int((batch["labels"] != -100).sum())
            with accelerator.autocast():
                loss_sum = model(batch["input_ids"], batch["labels"])
            accelerator.backward(loss_sum / n_targets)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss_sum.item() / n_targets

    n_params = sum(p.numel() for p in model.parameters())
    step(data[0])  # warm-up
    padded = real = 0
    start = time.perf_counter()
    losses = []
    for batch in data[1:]:
        losses.append(step(batch))
        padded += batch["input_ids"].numel()
        real += int((batch["labels"] != -100).sum())  # = real tokens per row (its tokens - 1 + the eos target)
    seconds = time.perf_counter() - start
    return {"impl": impl, "shape": shape, "precision": precision, "steps": steps, "params": n_params,
            "padded_tok_s": padded / seconds, "real_tok_s": real / seconds, "sec_per_step": seconds / steps,
            "pad_fraction": 1 - real / padded, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "first_loss": losses[0]}


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["gpt2-small", "gpt2-medium"])
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"])
    parser.add_argument("--impls", nargs="+", default=["ours", "ours+group", "transformers", "book"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per cell (after one warm-up step)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # impl,shape,precision: run one cell, print JSON
    args = parser.parse_args()

    if args.cell:
        impl, shape, precision = args.cell.split(",")
        print(json.dumps(run_cell(impl, shape, precision, args.steps)))
        return

    rows = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for shape in args.shapes:
        for precision in args.precisions:
            for impl in args.impls:
                if impl == "book" and precision != "no":
                    continue  # the book trains in fp32
                print(f"running {impl} {shape} {precision} ...", file=sys.stderr, flush=True)
                proc = subprocess.run([sys.executable, __file__, "--cell", f"{impl},{shape},{precision}",
                                       "--steps", str(args.steps)], capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    print(f"  failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    continue
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    print(f"\nTraining throughput, book data, batch 8, {args.steps} timed steps per cell "
          f"({os.cpu_count()} CPUs, torch {__import__('torch').__version__})\n")
    print("| shape | precision | implementation | padded tok/s | non-pad tok/s | s/step | pad % | peak RSS GB | vs transformers (non-pad) | vs book fp32 (non-pad) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        hf = next((x for x in rows if x["impl"] == "transformers" and x["shape"] == r["shape"]
                   and x["precision"] == r["precision"]), None)
        book = next((x for x in rows if x["impl"] == "book" and x["shape"] == r["shape"]), None)
        vs_hf = f"{r['real_tok_s'] / hf['real_tok_s']:.2f}x" if hf else "-"
        vs_book = f"{r['real_tok_s'] / book['real_tok_s']:.2f}x" if book else "-"
        print(f"| {r['shape']} | {'fp32' if r['precision'] == 'no' else r['precision']} | {r['impl']} | "
              f"{r['padded_tok_s']:.0f} | {r['real_tok_s']:.0f} | {r['sec_per_step']:.2f} | "
              f"{100 * r['pad_fraction']:.0f} | {r['peak_rss_gb']:.2f} | {vs_hf} | {vs_book} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
