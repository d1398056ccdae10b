"""GPU check: is our model right on a CUDA GPU, how fast is chapter 7 there, and what would the book's run cost?

    python bench/gpu_check.py                      # CUDA: gpt2-medium's shape; a few minutes on one H200
    python bench/gpu_check.py --device cpu         # the same code on a tiny shape, no compiled row: < 1 min here
    python bench/gpu_check.py --json out.json      # also write the rows (rewritten after every row)
    python bench/gpu_check.py --rows fsdp          # only the FSDP rows (bench/gpu_check_fsdp.py)

Prints one table. Its rows, in order:

  matmul      the bf16 matrix-product rate measured here (an [8192, 8192] @ [8192, 8192] product on CUDA,
              [512, 512] on the CPU): the peak that MFU is quoted against
  parity      the same weights' logits on the device and on the CPU, fp32 with TF32 off: max |difference|
  train ...   chapter 7's training step, bf16 autocast: full finetuning eager, full finetuning at micro-batch
              1 (one DDP rank's share of the book's batch of 8 over 8 GPUs), LoRA (rank 8 on c_attn, c_proj,
              c_fc), and full finetuning under torch.compile
  generate    batched greedy generation with the KV cache (model.generate, batch 8, 256 new tokens), with
              fp32 weights (what eval/generate.py runs) and with bf16 weights
  fsdp ...    one process of Accelerate's FSDP2 (Block as the wrap unit): two training steps, a sharded
              checkpoint resumed (the same weights as without the interruption), the gathered final model
              saved and reloaded with from_pretrained (bench/gpu_check_fsdp.py; on the CPU: torch's
              fully_shard instead of Accelerate's, which needs an accelerator)

The training step is the project's: ``model(input_ids, shift_labels=labels, use_cache=False,
return_logits=False, num_items_in_batch=1).loss`` (the summed loss over target tokens; only positions
with a target are projected onto the vocabulary) divided by the batch's target count, backward, fused
AdamW (lr 5e-5, weight decay 0.1), zero_grad; no gradient clipping (the book has none). Weights are
random at gpt2-medium's shape (24 layers, 1024 wide, 16 heads, context 1024; speed depends on the shape
only). Batches of 8 come from the book's instruction data (../shared/data/instruction-data.json, else a
copy under wheelhouse/data/, else a synthetic stand-in: random token ids with the book's example
lengths), split 935/55/110 and collated by the book's rules (train/data.py's InstructionCollator),
in the random order of train/data.py's EpochBatchSampler (seed 123).

Columns: tokens/s counts padded tokens (the book's ``tokens_seen``); MFU is the useful FLOPs of the
timed steps (bench/bench_chapter7.py's definition: 2 + 2 + 2 FLOPs per trained weight per token, the
head on target tokens only, attention's T² products not counted) over their time and the matmul row's
rate; peak memory is torch.cuda.max_memory_allocated during the row. The chapter-7 column extrapolates
the book's whole run from the row: the padded tokens of its 232 steps (2 epochs x 116 batches of 8
from 935 records, last partial batch dropped) at the row's tokens/s, plus 48 evaluations (the initial
losses and one after steps 0, 5, ..., 230; each 5 training + 5 validation batches, forward only) at the
time one took here. Process start, model loading and the epoch-end samples are not counted. The book's
own figures for this run (gpt2-medium): 0.86 min on an A100, 1.83 min on an L4, 15.8 min on an M3 CPU.

Every row is measured in its own try: a piece that is missing or fails (no peft, torch.compile unable to
build kernels, out of memory, a row over its time limit) becomes a row saying why, and the rest still run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import random
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from bench_chapter7 import useful_flops  # a sibling script (bench/ is sys.path[0]): one definition of MFU's FLOPs
from gpu_check_fsdp import fsdp_rows  # a sibling: the FSDP rows

REPO = Path(__file__).resolve().parents[1]
DATA_CANDIDATES = (REPO.parent / "shared" / "data" / "instruction-data.json",
                   REPO / "wheelhouse" / "data" / "instruction-data.json")

# The book's chapter-7 run: batch 8, 2 epochs, evaluation every 5 steps over 5 batches (of the training
# and of the validation loader), the 1100 records split 935 / 110 test / 55 validation.
BATCH, EPOCHS, EVAL_FREQ, EVAL_ITER = 8, 2, 5, 5
TRAIN_RECORDS, VAL_RECORDS = 935, 55
BOOK_MINUTES = {"A100": 0.86, "L4": 1.83, "M3 CPU": 15.8}  # the book's table, gpt2-medium, chapter 7
IGNORE_INDEX = -100

# Token lengths of the book's data, for the synthetic stand-in when the file is not there: training
# examples (prompt + response, GPT-2 BPE) at 5% quantiles, test prompts at 10% quantiles. Measured on
# instruction-data.json: examples 40-91 tokens (mean 56.4), prompts 30-56 (mean 37.7).
EXAMPLE_LENGTH_QUANTILES = (40, 45, 47, 48, 50, 51, 51, 52, 53, 54, 56, 56, 57, 58, 60, 61, 62, 64, 67, 71, 91)
PROMPT_LENGTH_QUANTILES = (30, 32, 32, 33, 34, 35, 36, 40, 45, 47, 56)

COLUMNS = ("check", "result", "tokens/s", "MFU", "peak memory", "chapter-7 run (est.)", "note")


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------


@dataclass
class Row:
    check: str
    result: str
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    run_minutes: float | None = None
    note: str = ""
    figures: dict = field(default_factory=dict)  # the measured quantities behind the row (for --json)

    def cells(self) -> list[str]:
        return [self.check, self.result,
                "—" if self.tokens_per_s is None else f"{self.tokens_per_s:,.0f}",
                "—" if self.mfu is None else f"{self.mfu:.1%}",
                "—" if self.peak_gib is None else f"{self.peak_gib:.2f} GiB",
                "—" if self.run_minutes is None else f"{self.run_minutes:.2f} min",
                self.note.replace("|", "/")]  # a "|" inside a cell would split it


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread after ``seconds``; no limit off the main thread or without SIGALRM."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"stopped after its limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------------
# The workload: the book's examples (or a stand-in of the same lengths), batched the book's way
# ---------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    source: str
    train: list[list[int]]  # token ids of each training example
    validation: list[list[int]]
    prompts: list[list[int]]  # generation prompts (test split)


def draw_lengths(quantiles: tuple[int, ...], n: int, rng: random.Random) -> list[int]:
    """``n`` lengths distributed as ``quantiles`` (evenly spaced, min to max), by linear interpolation."""
    steps = len(quantiles) - 1
    out = []
    for _ in range(n):
        u = rng.random() * steps
        i = min(int(u), steps - 1)
        out.append(round(quantiles[i] + (u - i) * (quantiles[i + 1] - quantiles[i])))
    return out


def synthetic_workload(reason: str) -> Workload:
    rng = random.Random(123)

    def examples(lengths):
        return [[rng.randrange(50256) for _ in range(n)] for n in lengths]  # any id but <|endoftext|>

    return Workload(source=f"synthetic stand-in with the book's lengths ({reason})",
                    train=examples(draw_lengths(EXAMPLE_LENGTH_QUANTILES, TRAIN_RECORDS, rng)),
                    validation=examples(draw_lengths(EXAMPLE_LENGTH_QUANTILES, VAL_RECORDS, rng)),
                    prompts=examples(draw_lengths(PROMPT_LENGTH_QUANTILES, 16, rng)))


def load_workload(path: Path | None) -> Workload:
    """The book's data tokenized as train/sft.py does, or the stand-in (saying why) when it cannot be."""
    if path is None:
        return synthetic_workload("instruction-data.json not found; --data names one")
    try:
        from gpt2_scratch import format_input, get_tokenizer
        from gpt2_scratch.core.records import load_records
        from gpt2_scratch.train.data import prepare_instruction_data

        tokenizer = get_tokenizer()
        data = prepare_instruction_data(load_records(str(path)), tokenizer, source=str(path))
    except Exception as err:  # the tokenizer package or the data file is missing/broken: speed needs lengths only
        return synthetic_workload(f"{path} not usable: {type(err).__name__}: {one_line(err, 120)}")
    prompts = [tokenizer.encode(format_input(r)) for r in data.test_records]
    return Workload(source=f"the book's instruction data ({path})", train=list(data.train["input_ids"]),
                    validation=list(data.validation["input_ids"]), prompts=prompts)


def batch_order(lengths: list[int], batch_size: int, epoch: int) -> list[list[int]]:
    from gpt2_scratch.train.data import EpochBatchSampler

    sampler = EpochBatchSampler(lengths, batch_size, shuffle=True, seed=123)
    sampler.set_epoch(epoch)
    return list(sampler)


def collate(examples: list[list[int]], context: int) -> dict:
    from gpt2_scratch.train.data import InstructionCollator

    return InstructionCollator(allowed_max_length=context)([{"input_ids": ids} for ids in examples])


def whole_run_tokens(train: list[list[int]], context: int) -> tuple[int, int]:
    """(optimizer steps, padded input tokens) of the book's 2-epoch run: a batch is as wide as its longest example."""
    lengths = [len(x) for x in train]
    steps = tokens = 0
    for epoch in range(EPOCHS):
        for batch in batch_order(lengths, BATCH, epoch):
            steps += 1
            tokens += len(batch) * min(max(lengths[i] for i in batch), context)
    return steps, tokens


def evaluations(steps: int) -> int:
    """Evaluation passes of the book's run: the initial losses, then after every EVAL_FREQ-th step from step 0."""
    return 1 + -(-steps // EVAL_FREQ)


# ---------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------


class Check:
    """Everything the rows share: the device, the shape, the data, the measured peak."""

    def __init__(self, args):
        import torch

        self.torch = torch
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise SystemExit("error: torch sees no CUDA device (torch.cuda.is_available() is False); "
                             "run with --device cpu, or on a machine with a GPU and a CUDA build of torch")
        self.dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        from gpt2_scratch import GPT2ScratchConfig

        overrides = dict(n_layers=2, emb_dim=64, n_heads=4) if args.tiny else {}
        self.config = GPT2ScratchConfig.from_preset("gpt2-medium", **overrides)
        self.workload = load_workload(args.data)
        self.peak_flops: float | None = None
        self.started = time.perf_counter()
        self.rows: list[Row] = []
        self.header_lines: list[str] = []

    # --- helpers -----------------------------------------------------------------------------------

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()  # host sync: the GPU has finished what was queued

    def autocast(self):
        if self.dtype == self.torch.float32:
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.dtype)

    def fresh(self) -> None:
        """Free the previous row's memory and start this row's peak from here."""
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def new_model(self, config=None):
        """Random weights (seed 123) on the device, fp32, as train/sft.py's --random-init builds them."""
        from gpt2_scratch import GPT2ScratchForCausalLM

        self.torch.manual_seed(123)
        return GPT2ScratchForCausalLM(config or self.config).to(self.device)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    # --- rows --------------------------------------------------------------------------------------

    def run_row(self, label: str, measure, limit: float) -> None:
        """Measure one row; whatever goes wrong becomes the row's result."""
        left = self.args.budget - self.elapsed()
        if left < 5:
            self.add(Row(label, "skipped", note=f"the run's --budget of {self.args.budget:.0f} s is spent"))
            return
        self.fresh()
        start = time.perf_counter()
        try:
            with time_limit(min(limit, left)):
                row = measure()
        except Exception as err:  # anything: a missing package, a compiler error, out of memory, the time limit
            row = Row(label, f"failed: {type(err).__name__}", note=one_line(err))
        with contextlib.suppress(Exception):  # a failed kernel may fail the sync too; the row already says so
            self.sync()
        row.check = label
        row.figures["row_seconds"] = round(time.perf_counter() - start, 2)
        self.add(row)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"[{self.elapsed():6.1f} s] {row.check}: {row.result}"
              + (f", {row.tokens_per_s:,.0f} tok/s" if row.tokens_per_s else "")
              + (f" ({row.note})" if row.note else ""), file=sys.stderr, flush=True)
        if self.args.json:
            self.write_json()

    def matmul(self) -> Row:
        torch = self.torch
        n, repeats = (8192, 10) if self.cuda else (512, 5)
        a = torch.randn(n, n, device=self.device, dtype=self.dtype)
        b = torch.randn(n, n, device=self.device, dtype=self.dtype)
        for _ in range(3):  # warm-up: cuBLAS picks its kernel, clocks rise
            a @ b
        self.sync()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        self.sync()
        seconds = time.perf_counter() - start
        self.peak_flops = 2 * n**3 * repeats / seconds
        name = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        rate = f"{self.peak_flops / 1e12:,.1f} TFLOP/s" if self.cuda else f"{self.peak_flops / 1e9:,.1f} GFLOP/s"
        return Row("", rate,
                   note=f"{name} [{n}, {n}] @ [{n}, {n}], mean of {repeats} after 3 warm-ups: the MFU peak",
                   figures={"flops_per_s": self.peak_flops, "n": n, "dtype": name})

    def parity(self) -> Row:
        """Logits of one set of weights on the CPU and on the device (fp32, TF32 off, 4 layers x 256 wide)."""
        torch = self.torch
        from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

        config = GPT2ScratchConfig.from_preset("gpt2-medium", n_layers=4, emb_dim=256, n_heads=4)
        torch.manual_seed(0)
        reference = GPT2ScratchForCausalLM(config).eval()
        on_device = copy.deepcopy(reference).to(self.device)
        batch = collate(self.workload.train[:4], config.context_length)
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.no_grad():
                expected = reference(batch["input_ids"]).logits
                got = on_device(batch["input_ids"].to(self.device)).logits.cpu()
                loss_cpu = reference(batch["input_ids"], shift_labels=batch["labels"], return_logits=False).loss
                loss_dev = on_device(batch["input_ids"].to(self.device), shift_labels=batch["labels"].to(self.device),
                                     return_logits=False).loss.cpu()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        diff = (expected - got).abs().max().item()
        scale = expected.abs().max().item()
        ok = diff <= 1e-4 * max(1.0, scale)
        shape = f"{tuple(batch['input_ids'].shape)}"
        note = (f"{self.device.type} vs cpu, 4 layers x 256 wide, batch {shape}, logits up to {scale:.1f}; "
                f"loss {loss_cpu.item():.6f} vs {loss_dev.item():.6f}")
        if not self.cuda:
            note += "; the device is the CPU, so this checks the code path only"
        return Row("", f"max abs diff {diff:.2e} ({'ok' if ok else 'MISMATCH'})", note=note,
                   figures={"max_abs_diff": diff, "max_abs_logit": scale, "ok": ok})

    def train(self, *, lora: bool = False, compiled: bool = False, micro_batch: int = BATCH) -> Row:
        torch, args = self.torch, self.args
        model = self.new_model()
        how = []
        if lora:
            model, described = add_lora(model)
            how.append(described)
        if compiled:
            how.append(compile_in_place(model, self.device.type))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.1, fused=True)
        model.train()
        context = self.config.context_length
        lengths = [len(x) for x in self.workload.train]
        order = batch_order(lengths, micro_batch, epoch=0)
        warmup = args.compile_warmup if compiled else args.warmup
        needed = warmup + args.steps
        batches = [collate([self.workload.train[i] for i in order[k % len(order)]], context) for k in range(needed)]

        def step(batch):
            input_ids = batch["input_ids"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            if compiled:  # one graph for every length: no recompile per new batch width
                torch._dynamo.maybe_mark_dynamic(input_ids, 1)
                torch._dynamo.maybe_mark_dynamic(labels, 1)
            with self.autocast():
                loss_sum = model(input_ids, shift_labels=labels, use_cache=False, return_logits=False,
                                 num_items_in_batch=1).loss
            loss = loss_sum / (labels != IGNORE_INDEX).sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        start = time.perf_counter()
        for batch in batches[:warmup]:  # allocator, cuBLAS and optimizer state; for torch.compile, the compile
            step(batch)
        self.sync()
        warmup_s = time.perf_counter() - start
        times, losses = [], []
        for batch in batches[warmup:]:
            tick = time.perf_counter()
            losses.append(step(batch))
            self.sync()  # host sync per step: per-step times show a late recompile
            times.append(time.perf_counter() - tick)
        seconds = sum(times)
        tokens = sum(b["input_ids"].numel() for b in batches[warmup:])
        targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches[warmup:])
        final_loss = losses[-1].item()
        if final_loss != final_loss or final_loss in (float("inf"), float("-inf")):
            raise FloatingPointError(f"training loss is {final_loss} after {len(losses)} timed steps")
        tok_s = tokens / seconds
        flops = useful_flops(tokens, targets, layers=self.config.n_layers, width=self.config.emb_dim,
                             vocab=self.config.vocab_size, lora=lora)
        mfu = flops / seconds / self.peak_flops if self.peak_flops else None

        run_steps, run_tokens = whole_run_tokens(self.workload.train, context)
        figures = {"step_s_median": statistics.median(times), "step_s_mean": seconds / len(times),
                   "timed_steps": len(times), "tokens": tokens, "targets": targets, "warmup_s": warmup_s,
                   "run_steps": run_steps, "run_tokens": run_tokens, "run_evaluations": evaluations(run_steps),
                   "micro_batch": micro_batch}
        trainable = sum(p.numel() for p in {id(p): p for p in params}.values())
        note = [f"median step {statistics.median(times) * 1e3:.1f} ms (max {max(times) * 1e3:.1f}) over "
                f"{len(times)} steps of batch {micro_batch}, {tokens / len(times):.0f} tokens/step; "
                f"warm-up {warmup} steps {warmup_s:.1f} s; {trainable:,} trainable parameters; loss {final_loss:.3f}",
                *how]
        row = Row("", f"{statistics.median(times) * 1e3:.1f} ms/step", tokens_per_s=tok_s, mfu=mfu,
                  peak_gib=self.peak_gib(), note="", figures={**figures, "trainable_params": trainable})
        if micro_batch != BATCH:  # feeds the DDP estimate (bench/README.md); the whole run is batch 8's
            note.append(f"one rank's share of batch {BATCH} over {BATCH // micro_batch} DDP ranks "
                        "(gradient all-reduce not included)")
            row.note = "; ".join(note)
            return row

        # One evaluation pass as the book makes it: 5 training + 5 validation batches of 8, forward only
        # (--tiny times 1 + 1 of them and scales by 5: the same code, a fifth of the CPU time).
        per_split = 1 if args.tiny else EVAL_ITER
        first_train = batch_order(lengths, BATCH, 0)[:per_split]
        eval_batches = ([collate([self.workload.train[i] for i in idx], context) for idx in first_train]
                        + [collate(self.workload.validation[s:s + BATCH], context)
                           for s in range(0, min(len(self.workload.validation), per_split * BATCH), BATCH)])
        passes = 2 if (compiled or self.cuda) else 1  # the first pass warms up (and compiles): keep the faster
        eval_s = min(self.evaluate(model, eval_batches, compiled) for _ in range(passes)) * EVAL_ITER / per_split
        row.run_minutes = (run_tokens / tok_s + evaluations(run_steps) * eval_s) / 60
        row.figures["eval_pass_s"] = eval_s
        note.insert(1, f"eval pass {eval_s * 1e3:.0f} ms" + (f" (from {2 * per_split} batches)" if args.tiny else ""))
        row.note = "; ".join(note)
        row.peak_gib = self.peak_gib()  # the evaluation's peak too
        return row

    def evaluate(self, model, batches, compiled: bool) -> float:
        torch = self.torch
        model.eval()
        start = time.perf_counter()
        with torch.no_grad(), self.autocast():
            total = torch.zeros((), device=self.device)
            for batch in batches:
                input_ids = batch["input_ids"].to(self.device)
                labels = batch["labels"].to(self.device)
                if compiled:
                    torch._dynamo.maybe_mark_dynamic(input_ids, 1)
                    torch._dynamo.maybe_mark_dynamic(labels, 1)
                total += model(input_ids, shift_labels=labels, use_cache=False, return_logits=False,
                               num_items_in_batch=1).loss.float()
            total.item()  # host sync
        model.train()
        return time.perf_counter() - start

    def generate(self, weights: str) -> Row:
        torch, args = self.torch, self.args
        model = self.new_model().eval()
        if weights == "bf16":
            model.to(torch.bfloat16)
        prompts = (self.workload.prompts * args.gen_batch)[: args.gen_batch]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), 50256, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):  # left padding, as gpt2_scratch.responses does
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)

        def run(new_tokens: int) -> float:
            start = time.perf_counter()
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=50256, eos_token_id=50256)
            self.sync()
            assert out.shape[1] == width + new_tokens, f"generated {out.shape[1] - width} tokens, not {new_tokens}"
            return time.perf_counter() - start

        run(4)  # warm-up
        seconds = run(args.new_tokens)
        generated = len(prompts) * args.new_tokens
        return Row("", f"{seconds:.2f} s", tokens_per_s=generated / seconds, peak_gib=self.peak_gib(),
                   note=f"{len(prompts)} prompts of {min(map(len, prompts))}-{width} tokens, left-padded, "
                        f"{args.new_tokens} new tokens each, greedy, KV cache, {weights} weights",
                   figures={"seconds": seconds, "generated_tokens": generated})

    # --- output ------------------------------------------------------------------------------------

    def header(self) -> list[str]:
        torch = self.torch
        import transformers

        versions = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
        for name in ("peft", "accelerate", "datasets", "pyarrow"):
            versions.append(f"{name} {package_version(name)}")
        versions.append(f"python {platform.python_version()}")
        if self.cuda:
            p = torch.cuda.get_device_properties(self.device)
            where = (f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB), "
                     f"CUDA {torch.version.cuda}")
        else:
            where = f"CPU, {torch.get_num_threads()} threads"
        c = self.config
        e = c.emb_dim  # embeddings, then per block: c_attn, attn c_proj, c_fc, mlp c_proj, two LayerNorms; ln_f
        n_params = (c.vocab_size + c.context_length) * e + c.n_layers * (12 * e * e + 13 * e) + 2 * e
        train_lengths = [len(x) for x in self.workload.train]
        steps, tokens = whole_run_tokens(self.workload.train, c.context_length)
        return [
            f"# gpu_check on {where}; host CPU: {cpu_model()}",
            f"# {', '.join(versions)}",
            f"# shape: {'tiny (--tiny)' if self.args.tiny else 'gpt2-medium'}: {c.n_layers} layers, {c.emb_dim} wide, "
            f"{c.n_heads} heads, context {c.context_length}, {n_params / 1e6:.1f}M parameters, random weights; "
            f"{'bf16 autocast' if self.dtype == torch.bfloat16 else 'fp32'}",
            f"# data: {self.workload.source}: {len(train_lengths)} training examples of {min(train_lengths)}-"
            f"{max(train_lengths)} tokens (mean {statistics.mean(train_lengths):.1f}), {len(self.workload.validation)} "
            f"validation; the book's run: {steps} steps of batch {BATCH}, {tokens:,} padded tokens, "
            f"{evaluations(steps)} evaluations",
        ]

    def table(self) -> str:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---:|---:|---:|---:|---|"]
        lines += ["| " + " | ".join(row.cells()) + " |" for row in self.rows]
        return "\n".join(lines)

    def write_json(self) -> None:
        payload = {"header": self.header_lines, "book_minutes": BOOK_MINUTES,
                   "rows": [{"check": r.check, "result": r.result, "tokens_per_s": r.tokens_per_s, "mfu": r.mfu,
                             "peak_gib": r.peak_gib, "run_minutes": r.run_minutes, "note": r.note, **r.figures}
                            for r in self.rows]}
        tmp = self.args.json.with_name(self.args.json.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(self.args.json)


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """lscpu's model name, family/model and bf16 flags (a GPU's host matters too: it launches every kernel)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                      if ":" in line)
    except OSError:
        return f"{platform.processor() or 'unknown'}, {os.cpu_count()} CPUs"
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in fields.get("flags", "").split()]
    return (f"{fields.get('model name', 'unknown')} (family {fields.get('cpu family', '?')} model "
            f"{fields.get('model', '?')}, bf16 flags: {' '.join(bf16) or 'none'}), {os.cpu_count()} CPUs")


def add_lora(model):
    """Rank-8 LoRA on c_attn, c_proj, c_fc (the project's --lora default): through gpt2_scratch.train.lora
    when it imports, else with peft directly. Raises ImportError (a row: "peft is not installed") without peft."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError("peft is not installed (pip install peft): no LoRA row") from None
    try:
        from gpt2_scratch.train import lora
    except ImportError as err:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                            bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, config), f"peft directly (gpt2_scratch.train.lora: {one_line(err, 80)})"
    options = dict(lora="default", lora_r=None, lora_alpha=None, lora_dropout=None, lora_targets=None, lora_init=None,
                   base_dtype="fp32", merge=True, mixed_precision="bf16", push_to_hub=None)
    settings = lora.settings(SimpleNamespace(**options))
    return lora.wrap(model, settings), f"gpt2_scratch.train.lora: {settings.describe()}"


def compile_in_place(model, device: str) -> str:
    """torch.compile the model in place as ``--compile`` does (gpt2_scratch.core.compile), else plainly."""
    try:
        from gpt2_scratch.core.compile import compile_model
    except ImportError:
        model.compile()
        return "model.compile() (inductor)"
    compile_model(model, device)
    return "gpt2_scratch.core.compile (inductor)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[1:6]))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="where to run (cpu implies --tiny); default cuda")
    parser.add_argument("--tiny", action="store_true", help="2 layers, 64 wide (the same code on a small shape)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="training and matmul dtype (bf16 autocast, the default, or fp32)")
    parser.add_argument("--data", type=Path, help="the book's instruction-data.json (default: ../shared/data/, "
                                                  "then wheelhouse/data/; else a synthetic stand-in)")
    parser.add_argument("--steps", type=int, help="timed training steps per row (default 30; 2 with --tiny)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them (default 3; 1 with --tiny)")
    parser.add_argument("--compile-warmup", type=int, default=4, help="untimed steps of the compiled row (default 4)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="the torch.compile row; auto (the default): on CUDA only, since inductor's C++ build of "
                             "even the tiny model takes about 3 minutes on 2 CPU cores")
    parser.add_argument("--gen-batch", type=int, default=8, help="prompts per generate call (default 8)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per prompt (default 256 on CUDA, 16 on CPU)")
    parser.add_argument("--row-limit", type=float, default=240, help="seconds one row may take (default 240)")
    parser.add_argument("--budget", type=float, default=420,
                        help="seconds for the whole check; rows left when it is spent are skipped (default 420)")
    parser.add_argument("--json", type=Path, help="also write the rows here (rewritten after every row)")
    parser.add_argument("--rows", choices=["all", "fsdp"], default="all",
                        help="all rows (the default), or only the FSDP rows (bench/gpu_check_fsdp.py)")
    args = parser.parse_args()
    if args.device == "cpu":
        args.tiny = True
    args.steps = args.steps or (2 if args.tiny else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.new_tokens = args.new_tokens or (16 if args.tiny else 256)
    if args.data is None:
        args.data = next((p for p in DATA_CANDIDATES if p.is_file()), None)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # before datasets is imported
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    check = Check(args)
    check.header_lines = check.header()
    print("\n".join(check.header_lines), flush=True)
    if args.rows == "fsdp":
        fsdp_rows(check, Row, args.row_limit)
        print(f"\n{check.table()}\n\nTotal time of this check: {check.elapsed():.0f} s.", flush=True)
        return
    check.run_row("matmul (MFU peak)", check.matmul, 60)
    check.run_row("parity: logits on the device vs the CPU (fp32)", check.parity, 120)
    check.run_row("train: full finetuning, eager", check.train, args.row_limit)
    check.run_row("train: full finetuning, eager, micro-batch 1", lambda: check.train(micro_batch=1), args.row_limit)
    check.run_row("train: LoRA r8 (c_attn c_proj c_fc), eager", lambda: check.train(lora=True), args.row_limit)
    check.run_row("generate: batch 8, fp32 weights", lambda: check.generate("fp32"), args.row_limit)
    check.run_row("generate: batch 8, bf16 weights", lambda: check.generate("bf16"), args.row_limit)
    fsdp_rows(check, Row, args.row_limit)
    label = "train: full finetuning, torch.compile"
    if args.compile == "on" or (args.compile == "auto" and check.cuda):  # last: the slowest, least predictable row
        check.run_row(label, lambda: check.train(compiled=True), args.row_limit)
    else:
        why = ("--compile off" if args.compile == "off" else
               "on the CPU only with --compile on: inductor builds C++ kernels for minutes (about 3 on 2 cores)")
        check.add(Row(label, "skipped", note=why))
    book = ", ".join(f"{k} {v} min" for k, v in BOOK_MINUTES.items())
    print(f"\n{check.table()}\n\nThe book's chapter-7 run (gpt2-medium): {book}. Total time of this check: "
          f"{check.elapsed():.0f} s.", flush=True)


if __name__ == "__main__":
    main()
