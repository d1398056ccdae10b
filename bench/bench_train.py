"""Training throughput and memory: our GPT-2 and loop vs transformers' GPT2LMHeadModel vs the book's loop.

    python bench/bench_train.py                 # both shapes, fp32 and bf16 (~45 min on 2 cores)
    python bench/bench_train.py --shapes gpt2-small --no-memory
    python bench/bench_train.py --shapes gpt2-small --precisions bf16 --impls ours ours@system --no-memory

For each shape and precision, one process builds every implementation and they take turns (a few
steps each, round after round), so the noise of a shared machine hits them alike; peak RSS comes
from separate short runs of one implementation per process. All train on the same batches: the
book's instruction data (train split, tokenized as train/sft.py does), batch 8, shuffled with one
seed, AdamW lr 5e-5 weight decay 0.1, randomly initialised weights at the named shape. Every loop
also evaluates the way it does in real use, every 5 steps over 5 batches (the book's eval_freq and
eval_iter), and the "with evaluation" rate counts that time too: it is what a user waits for.

  ours          GPT2ScratchForCausalLM in train/sft.py's loop: Accelerate, autocast, the model's
                return_logits=False path (vocabulary projection only where there is a target), loss
                summed and divided by the target-token count, fused AdamW; evaluation on 5 validation
                batches (the training loss is the running mean of the steps, as train/sft.py logs it)
  ours+group    the same with --group-by-length batches (less padding; evaluation regroups the same
                validation examples)
  transformers  transformers' GPT2LMHeadModel (sdpa attention) in exactly the same loop; it has no
                way to skip positions without a target, so its logits cover every position and the
                same summed cross-entropy is taken over the targets
  transformers+slice   (opt-in) transformers' model with the target-only projection done outside it,
                on its .transformer and .lm_head: how much of the difference is that projection
  book          the book's reference loop (train_model_simple): a model written the book's way
                (separate q/k/v, a stored causal mask, explicit softmax, untied output head), plain
                PyTorch, logits for every position, F.cross_entropy mean per batch, default AdamW,
                fp32 only; every 5 steps it evaluates 5 training and 5 validation batches

Memory allocator: train/sft.py runs with a caching malloc preloaded (core/allocator.py: mimalloc,
else tcmalloc), so ours and transformers run that way too; the book's loop is plain PyTorch and runs
with glibc's malloc. An implementation name takes an allocator after "@" (ours@system, book@mimalloc);
implementations with different allocators run in different processes, one after the other.

Reported: padded tokens/s (input_ids.numel(), what the book counts as "tokens seen"), non-pad
tokens/s (real tokens), both for the training steps alone and with evaluation, and peak RSS. The
first step is warm-up and not timed.
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
# One implementation's loop (runs in a child process)
# ---------------------------------------------------------------------------------------------------


EVAL_FREQ = EVAL_ITER = 5  # the book's settings, also train/sft.py's defaults


def load_batches(steps: int, group: bool) -> tuple[list[dict], list[dict]]:
    """`steps` training batches (this sampler's order) and EVAL_ITER batches of the validation split."""
    from gpt2_scratch import get_tokenizer
    from gpt2_scratch.core.records import load_records
    from gpt2_scratch.train.data import EpochBatchSampler, InstructionCollator, evaluation_sampler, prepare_instruction_data

    data = prepare_instruction_data(load_records(str(BOOK_DATA)), get_tokenizer(), max_length=1024)
    collate = InstructionCollator(allowed_max_length=1024)
    sampler = EpochBatchSampler(list(data.train["length"]), 8, shuffle=True, group_by_length=group, seed=123)
    val_sampler = evaluation_sampler(list(data.validation["length"]), 8, eval_iter=EVAL_ITER, group_by_length=group)
    train = [collate([data.train[i] for i in idx]) for idx in list(sampler)[:steps]]
    val = [collate([data.validation[i] for i in idx]) for idx in list(val_sampler)[:EVAL_ITER]]
    return train, val


def transformers_task(impl: str, args):
    """train/sft.py's task with the loss taken on transformers' GPT2LMHeadModel, which has no way to skip
    positions without a target: its logits cover every position and the same summed cross-entropy is taken
    over the targets (``transformers+slice``: the target-only projection done outside it)."""
    import torch
    import torch.nn.functional as F

    from gpt2_scratch.train.sft import SFTTask

    class TransformersSFT(SFTTask):
        def loss(self, model, batch):
            labels = batch["labels"]
            if impl == "transformers":
                logits = model(batch["input_ids"], use_cache=False).logits
                total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
            else:
                hidden = model.transformer(batch["input_ids"], use_cache=False)[0]
                keep = labels != -100
                total = F.cross_entropy(model.lm_head(hidden[keep]).float(), labels[keep], reduction="sum")
            count = torch.tensor(float((labels != -100).sum()), dtype=torch.float64, device=total.device)
            return total, torch.stack([total.detach().double(), count])

    return TransformersSFT(args, None, None, None, None, "", None)


class Trainer:
    """One implementation's training step and evaluation on its batches, timed separately."""

    def __init__(self, label: str, shape: str, precision: str, steps: int, shared_lm=None):
        import torch
        import torch.nn.functional as F

        from gpt2_scratch import PRESETS

        self.impl = label  # the name in the table (with its "@allocator", if any)
        impl = label.split("@")[0]
        torch.manual_seed(123)
        cfg = dict(vocab_size=50257, context_length=1024, **PRESETS[shape])
        self.batches, val_batches = load_batches(steps + 1, group=impl == "ours+group")
        self.steps_done = 0
        self.padded = self.real = 0
        self.step_seconds = self.eval_seconds = 0.0

        if impl == "book":
            model = book_style_model(cfg)
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)

            def batch_loss(batch):
                logits = model(batch["input_ids"])
                return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

            def step(batch):
                optimizer.zero_grad()
                loss = batch_loss(batch)
                loss.backward()
                optimizer.step()
                return loss.item()

            def evaluate():  # the book's evaluate_model: eval_iter training and eval_iter validation batches
                model.eval()
                with torch.no_grad():
                    for batch in self.batches[:EVAL_ITER] + val_batches:
                        batch_loss(batch).item()
                model.train()
        else:
            from bench_chapter7 import step_run  # this script runs from bench/, first on sys.path

            from gpt2_scratch.train.loop import sums_over, train_step
            from gpt2_scratch.train.sft import SFTArgs, SFTTask

            if shared_lm is not None:  # ours and ours+group differ only in their batches
                lm = shared_lm
            elif impl.startswith("transformers"):
                from transformers import GPT2Config, GPT2LMHeadModel

                lm = GPT2LMHeadModel(GPT2Config(n_embd=cfg["emb_dim"], n_layer=cfg["n_layers"], n_head=cfg["n_heads"],
                                                n_positions=1024, vocab_size=50257, resid_pdrop=0.0, embd_pdrop=0.0,
                                                attn_pdrop=0.0))
            else:
                from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

                lm = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset(shape))
            self.lm = lm
            lm.train()
            run = step_run(lm, SFTArgs(), mixed_precision=precision)  # fused AdamW and the schedule, as train/sft.py
            model = run.model
            task = (transformers_task(impl, run.args) if impl.startswith("transformers")
                    else SFTTask(run.args, None, None, None, None, "", None))  # ours: train/sft.py's loss

            def step(batch):  # train/loop.py's train_step, one micro-batch per step
                sums, _ = train_step(run, task, [batch])
                return sums[0].item() / max(sums[1].item(), 1)

            def evaluate():  # train/sft.py's evaluate: eval_iter validation batches, through loop.sums_over
                sums_over(run, val_batches, None, task.batch_sums)

        self.step, self.evaluate = step, evaluate
        self.params = sum(p.numel() for p in model.parameters())
        step(self.batches[0])  # warm-up: allocator, optimizer state; not timed

    def run(self, n: int) -> None:
        """The next n steps, evaluating after steps 0, 5, 10, ... as the book and train/sft.py do."""
        for batch in self.batches[1 + self.steps_done: 1 + self.steps_done + n]:
            start = time.perf_counter()
            self.step(batch)
            self.step_seconds += time.perf_counter() - start
            if self.steps_done % EVAL_FREQ == 0:
                start = time.perf_counter()
                self.evaluate()
                self.eval_seconds += time.perf_counter() - start
            self.steps_done += 1
            self.padded += batch["input_ids"].numel()
            self.real += int((batch["labels"] != -100).sum())  # = real tokens per row (tokens - 1 + the eos target)

    def row(self, shape: str, precision: str) -> dict:
        wall = self.step_seconds + self.eval_seconds
        return {"impl": self.impl, "shape": shape, "precision": precision, "steps": self.steps_done,
                "params": self.params, "padded_tok_s": self.padded / self.step_seconds,
                "real_tok_s": self.real / self.step_seconds, "padded_tok_s_wall": self.padded / wall,
                "real_tok_s_wall": self.real / wall, "sec_per_step": self.step_seconds / self.steps_done,
                "pad_fraction": 1 - self.real / self.padded}


def run_throughput(impls: list[str], shape: str, precision: str, rounds: int, steps_per_round: int) -> list[dict]:
    """All implementations in one process, taking turns round by round, so the machine's noise
    (it is shared) hits each of them alike."""
    trainers = []
    for impl in impls:
        shared = next((t.lm for t in trainers if {t.impl, impl} == {"ours", "ours+group"}), None)
        trainers.append(Trainer(impl, shape, precision, rounds * steps_per_round, shared_lm=shared))
    from gpt2_scratch.core.allocator import loaded_allocator

    malloc = loaded_allocator()
    for _ in range(rounds):
        for trainer in trainers:
            trainer.run(steps_per_round)
    return [dict(t.row(shape, precision), malloc=malloc) for t in trainers]


def run_memory(impl: str, shape: str, precision: str) -> dict:
    """Peak RSS of one implementation alone: two training steps and one evaluation."""
    trainer = Trainer(impl, shape, precision, steps=1)
    trainer.run(1)
    return {"impl": impl, "shape": shape, "precision": precision,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


def allocator_of(impl: str) -> str:
    """The malloc an implementation runs with: its "@name", else sft.py's (auto) or, for the book, glibc's."""
    if "@" in impl:
        return impl.split("@", 1)[1]
    return "system" if impl == "book" else "auto"


def child(args_list: list[str], env: dict, allocator: str) -> list[dict] | None:
    env = {**env, "GPT2_SCRATCH_ALLOCATOR": allocator}
    proc = subprocess.run([sys.executable, __file__, *args_list], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["gpt2-small", "gpt2-medium"])
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"])
    parser.add_argument("--impls", nargs="+", default=["ours", "ours+group", "transformers", "book"],
                        help="implementations to compare; transformers+slice is also available")
    parser.add_argument("--rounds", type=int, default=3, help="turns each implementation takes")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per turn (after one warm-up step)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS runs")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # "throughput|memory:impl,...:shape:precision"
    args = parser.parse_args()

    if args.child:
        from gpt2_scratch.core.allocator import use_caching_allocator

        use_caching_allocator()  # as train/sft.py does: re-exec with GPT2_SCRATCH_ALLOCATOR's malloc
        kind, impls, shape, precision = args.child.split(":")
        if kind == "throughput":
            print(json.dumps(run_throughput(impls.split(","), shape, precision, args.rounds, args.steps)))
        else:
            print(json.dumps([run_memory(impls, shape, precision)]))
        return

    rows, memory = [], {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for shape in args.shapes:
        for precision in args.precisions:
            # The book trains in fp32 only.
            impls = [i for i in args.impls if i.split("@")[0] != "book" or precision == "no"]
            # One process per allocator (a preloaded malloc is per process), in the order first named.
            for allocator in dict.fromkeys(allocator_of(i) for i in impls):
                group = [i for i in impls if allocator_of(i) == allocator]
                print(f"timing {', '.join(group)} at {shape} {precision} ({allocator} malloc) ...",
                      file=sys.stderr, flush=True)
                rows += child(["--child", f"throughput:{','.join(group)}:{shape}:{precision}",
                               "--rounds", str(args.rounds), "--steps", str(args.steps)], env, allocator) or []
            for impl in [] if args.no_memory else impls:
                print(f"peak RSS of {impl} at {shape} {precision} ...", file=sys.stderr, flush=True)
                for r in child(["--child", f"memory:{impl}:{shape}:{precision}"], env, allocator_of(impl)) or []:
                    memory[(impl, shape, precision)] = r["peak_rss_gb"]

    print(f"\nTraining throughput, book data, batch 8, {args.rounds} turns of {args.steps} timed steps per "
          f"implementation, evaluation every {EVAL_FREQ} steps ({os.cpu_count()} CPUs, "
          f"torch {__import__('torch').__version__})\n")
    print("| shape | precision | implementation | malloc | padded tok/s | non-pad tok/s | padded tok/s with eval | "
          "non-pad tok/s with eval | s/step | pad % | peak RSS GB | vs transformers (non-pad) | "
          "vs book fp32 (non-pad, with eval) |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        hf = next((x for x in rows if x["impl"] == "transformers" and x["shape"] == r["shape"]
                   and x["precision"] == r["precision"]), None)
        book = next((x for x in rows if x["impl"] == "book" and x["shape"] == r["shape"]), None)
        vs_hf = f"{r['real_tok_s'] / hf['real_tok_s']:.2f}x" if hf else "-"
        vs_book = f"{r['real_tok_s_wall'] / book['real_tok_s_wall']:.2f}x" if book else "-"
        rss = memory.get((r["impl"], r["shape"], r["precision"]))
        r["peak_rss_gb"] = rss
        precision = "fp32" if r["precision"] == "no" else r["precision"]
        print(f"| {r['shape']} | {precision} | {r['impl']} | {r['malloc']} | "
              f"{r['padded_tok_s']:.0f} | {r['real_tok_s']:.0f} | {r['padded_tok_s_wall']:.0f} | "
              f"{r['real_tok_s_wall']:.0f} | {r['sec_per_step']:.2f} | {100 * r['pad_fraction']:.0f} | "
              f"{'-' if rss is None else f'{rss:.2f}'} | {vs_hf} | {vs_book} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
