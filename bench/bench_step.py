"""Where one chapter-7 training step's time goes, op by op, and what torch.compile changes at that shape.

    python bench/bench_step.py                       # gpt2-medium, fp32, the book's first batches
    python bench/bench_step.py --compile             # and eager vs compiled, alternated batch by batch
    python bench/bench_step.py --preset gpt2-small --n-layers 2 --lengths 16 24 --rounds 1   # a smoke run

The step is the training loop's own (train/loop.py ``train_step`` with ``SFTTask.loss``, on a run made by
``bench_chapter7.step_run`` as train/run.py's ``launch`` makes it): the model's ``return_logits=False`` loss
(only positions with a target reach the vocabulary projection), backward, gradient clipping at 1.0, fused
AdamW and the schedule, on the caching allocator the training scripts use. The batches are the
book's: its 1100 records, tokenized and split as ``train/sft.py`` does, batch 8 in the order of the run's
first epoch (seed 123), each padded to its longest record; ``--lengths`` replaces them with random tokens at
the given padded lengths.

Printed, for one profiled step per batch (``torch.profiler``, self CPU time of each operator):
  op groups       matrix products, attention, the loss's log-softmax, the tied embedding's gradient (the
                  dense zero-fill and scatter of the lookup's gradient and its sum with the head's), the
                  optimizer, GELU, LayerNorm, gradient clipping, the rest; seconds per step and share
  matmul rate     the fp32 rate of the block's four weight products at the step's token count
                  (``bench_chapter7.matmul_rate``), and the rate the step's own matrix products ran at
  step MFU        the step's useful FLOPs (``bench_chapter7.useful_flops``: 6 per block weight per input
                  token, the head only at target positions) over its unprofiled time and that rate
With ``--compile``: the same batches through the eager model and ``torch.compile`` of it (the same weights,
gradients dropped without an optimizer step, so both see the same model), alternated, with the
compilation time (a first pass over the batches: the first length compiles, the next ones recompile until
inductor marks the length dynamic) reported apart.
Speed is never asserted; compare figures only within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench_chapter7 import matmul_rate, step_run, useful_flops  # this script runs from bench/, first on sys.path

REPO = Path(__file__).resolve().parents[1]
BOOK_DATA = REPO.parent / "shared" / "data" / "instruction-data.json"

GROUPS = ("matrix products", "attention (SDPA)", "loss (log-softmax over the vocabulary)", "tied embedding gradient",
          "optimizer (fused AdamW)", "GELU", "LayerNorm", "gradient clipping", "other")


def book_batches(count: int, batch_size: int) -> list[dict]:
    """The first ``count`` batches of the chapter-7 run's first epoch, as train/sft.py collates them."""
    from gpt2_scratch import get_tokenizer
    from gpt2_scratch.core.records import load_records
    from gpt2_scratch.train.data import EpochBatchSampler, InstructionCollator, prepare_instruction_data

    data = prepare_instruction_data(load_records(str(BOOK_DATA)), get_tokenizer(), max_length=1024)
    sampler = EpochBatchSampler(list(data.train["length"]), batch_size, shuffle=True, drop_last=True, seed=123)
    sampler.set_epoch(0)
    collate = InstructionCollator(allowed_max_length=1024)
    train = data.train.select_columns(["input_ids", "prompt_length"])
    return [collate([train[i] for i in batch]) for batch in list(sampler)[:count]]


def random_batches(lengths: list[int], batch_size: int, vocab: int) -> list[dict]:
    """Random tokens at the given padded lengths, every position a target."""
    import torch

    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (batch_size, n), generator=g),
             "labels": torch.randint(0, vocab, (batch_size, n), generator=g)} for n in lengths]


def op_group(name: str, shapes: list, vocab: int, emb: int) -> str:
    """Which of ``GROUPS`` a profiled operator (its name and input shapes) belongs to."""
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "matrix products"
    if "scaled_dot_product" in name:
        return "attention (SDPA)"
    if "log_softmax" in name:
        return "loss (log-softmax over the vocabulary)"
    if "adamw" in name:
        return "optimizer (fused AdamW)"
    if name in ("aten::embedding_dense_backward", "aten::index_add_", "aten::index_put_",
                "aten::_index_put_impl_") or (name in ("aten::add", "aten::add_", "aten::fill_", "aten::zero_")
                                              and shapes and list(shapes[0]) == [vocab, emb]):
        return "tied embedding gradient"
    if "gelu" in name:
        return "GELU"
    if "layer_norm" in name:
        return "LayerNorm"
    if name in ("aten::linalg_vector_norm", "aten::_foreach_norm", "aten::mul_", "aten::_foreach_mul_",
                "aten::clamp", "aten::stack"):
        return "gradient clipping"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2-medium")
    parser.add_argument("--n-layers", type=int, help="override the preset's number of blocks (a quick run)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4, help="the book's first N batches (default 4)")
    parser.add_argument("--lengths", type=int, nargs="+", help="random batches at these padded lengths instead")
    parser.add_argument("--rounds", type=int, default=2, help="unprofiled timing rounds over the batches")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the model, alternated")
    args = parser.parse_args()

    from gpt2_scratch.core.allocator import use_caching_allocator

    use_caching_allocator()  # the training scripts' malloc (re-executes this script once)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
    from gpt2_scratch.train.loop import train_step
    from gpt2_scratch.train.sft import SFTArgs, SFTTask

    overrides = {"n_layers": args.n_layers} if args.n_layers else {}
    config = GPT2ScratchConfig.from_preset(args.preset, **overrides)
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(config).train()
    run = step_run(model, SFTArgs(max_grad_norm=1.0))
    task = SFTTask(run.args, None, None, None, None, "", None)
    batches = (random_batches(args.lengths, args.batch_size, config.vocab_size) if args.lengths
               else book_batches(args.batches, args.batch_size))

    def forward_backward(module, batch) -> None:  # the step without its optimizer: eager vs compiled below
        loss_sum, sums = task.loss(module, batch)
        (loss_sum / max(sums[1].item(), 1)).backward()

    def step(batch) -> float:
        tick = time.perf_counter()
        train_step(run, task, [batch])
        return time.perf_counter() - tick

    step(batches[0])  # warm-up: the allocator's pools, oneDNN's kernels, AdamW's state
    seconds = [step(b) for _ in range(args.rounds) for b in batches]
    step_seconds = statistics.fmean(seconds)
    flops = statistics.fmean(useful_flops(b["input_ids"].numel(), int((b["labels"] != -100).sum()), lora=False,
                                          layers=config.n_layers, width=config.emb_dim, vocab=config.vocab_size)
                             for b in batches)
    tokens = statistics.fmean(b["input_ids"].numel() for b in batches)
    # The block's four weight products at this step's token count (bench_chapter7's measure), right after the steps.
    rate = matmul_rate("fp32", int(tokens), width=config.emb_dim)

    shares = dict.fromkeys(GROUPS, 0.0)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for b in batches:
            step(b)
    for event in prof.key_averages(group_by_input_shape=True):
        shares[op_group(event.key, event.input_shapes, config.vocab_size, config.emb_dim)] += \
            event.self_cpu_time_total / 1e6 / len(batches)
    profiled = sum(shares.values())

    lengths = sorted({b["input_ids"].shape[1] for b in batches})
    print(f"{args.preset}{f' ({args.n_layers} layers)' if args.n_layers else ''}, fp32, batch "
          f"{args.batch_size}, padded lengths {lengths}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"step: {step_seconds:.2f} s ({len(seconds)} unprofiled steps), {tokens / step_seconds:,.0f} padded tok/s, "
          f"{flops / 1e12:.3f} useful TFLOP")
    print(f"matmul rate (the block's four weight products on [{int(tokens)}, {config.emb_dim}] inputs): "
          f"{rate / 1e9:.0f} GFLOP/s; step MFU {flops / step_seconds / rate:.0%}; the step's matrix products "
          f"ran at {flops / shares['matrix products'] / 1e9:.0f} GFLOP/s")
    print()
    print(f"{'op group (profiled, self CPU time)':40} {'s/step':>8} {'share':>7}")
    for group in GROUPS:
        print(f"{group:40} {shares[group]:8.3f} {shares[group] / profiled:7.1%}")
    print(f"{'total (profiler overhead included)':40} {profiled:8.3f}")

    if args.compile:
        from gpt2_scratch.core.compile import check_compiler

        check_compiler("cpu")
        compiled = torch.compile(model)  # shares the weights: both see the same model
        tick = time.perf_counter()
        for b in batches:  # the first length compiles, the next recompile until the length is dynamic
            forward_backward(compiled, b)
            model.zero_grad(set_to_none=True)
        warmup = time.perf_counter() - tick
        timed = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            for b in batches:
                for name, module in (("eager", model), ("compiled", compiled)):
                    tick = time.perf_counter()
                    forward_backward(module, b)
                    timed[name].append(time.perf_counter() - tick)
                    model.zero_grad(set_to_none=True)
        eager, fast = statistics.fmean(timed["eager"]), statistics.fmean(timed["compiled"])
        print()
        print(f"forward + backward (no optimizer), {len(timed['eager'])} batches each, alternated:")
        print(f"  eager {eager:.2f} s, compiled {fast:.2f} s: compiled / eager {eager / fast:.3f}x; "
              f"compilation (a first pass over the batches) {warmup:.0f} s")
        saved = eager - fast
        print(f"  compilation pays for itself after {warmup / saved:,.0f} steps" if saved > 0
              else "  compiled is not faster at this shape")


if __name__ == "__main__":
    main()
