"""Instruction finetuning (the book's chapter 7) with a hand-written Accelerate loop.

    accelerate launch train/sft.py [--model DIR|HF_ID|PRESET] [--random-init] [--data PATH|URL|HUB_ID]
        [--output-dir OUT] [--epochs 2] [--batch-size 8] [--lr 5e-5] [--weight-decay 0.1] [--eval-freq 5]
        [--eval-iter 5] [--max-steps N] [--mask-prompt] [--prompt-style alpaca|phi3]
        [--mixed-precision bf16|no] [--seed 123] [--save-every N] [--resume [PATH]] ...
    python train/sft.py ...                       # the same, one process
    python train/sft.py --offline-demo            # no network: small random model, synthetic tasks, 2-5 min

Defaults reproduce the book: gpt2-medium with OpenAI's weights, the book's instruction data (85/10/5
split in file order), 2 epochs, batch 8, AdamW lr 5e-5 weight decay 0.1, evaluation every 5 steps over
5 batches. What a run leaves in OUT:

    config.json model.safetensors generation_config.json tokenizer files   the final model (from_pretrained(OUT))
    args.json            the arguments of the run
    metrics.jsonl        one JSON object per evaluation (and per epoch sample)
    loss.png loss.pdf    train/validation loss over steps, tokens seen on the second x-axis
    instruction-data-with-response.json   the test split with a greedy ``model_response`` per record
    checkpoints/step-N/  accelerator.save_state + train_state.json, every --save-every steps and each epoch

The loop follows accelerate's examples: ``accelerator.prepare``, the loss summed over target tokens and
divided by the target-token count of the whole accumulation window (all processes), ``no_sync`` on all
but the window's last micro-batch, clipping, optional warmup + cosine. ``--batch-size`` is the global
batch: with N processes each gets batch/N examples of the same global batch (``split_batches``), so
a run's losses do not depend on the number of processes. Batch order depends only on (seed, epoch), and
a checkpoint records how many batches of the epoch were done, so ``--resume`` replays exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (`python train/sft.py`, `accelerate launch train/sft.py`): import this project's
    # packages from the repository root, not from train/ (whose module names would shadow others).
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

if __name__ == "__main__":
    # Before torch is imported: re-run this command with a caching malloc preloaded (train/allocator.py
    # says why: about 1.5x faster CPU training steps). GPT2_SCRATCH_ALLOCATOR=system turns it off.
    from train.allocator import use_caching_allocator_or_exit

    use_caching_allocator_or_exit()

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from typing import Literal

import torch

from train.common import (
    MetricsLog,
    UserError,
    arg,
    find_checkpoint,
    load_checkpoint,
    parse_dataclass_args,
    plot_losses,
    prepare_output_dir,
    push_to_hub,
    relaunch_multi_cpu,
    run_main,
    save_checkpoint,
    save_final_model,
    write_json_atomic,
)
from train.allocator import loaded_allocator
from train.data import BOOK_DATA_URL, IGNORE_INDEX, DataError

logger = logging.getLogger("train.sft")


@dataclass
class SFTArgs:
    """Instruction-finetune a GPT-2 (the book's chapter 7) with Accelerate."""

    model: str = arg("gpt2-medium", "model folder, Hugging Face repo id, or preset (gpt2-small|gpt2-medium|"
                                    "gpt2-large|gpt2-xl: OpenAI's weights, or untrained with --random-init)")
    random_init: bool = arg(False, "start from random weights instead of pretrained ones (offline runs, tests)")
    n_layers: int | None = arg(None, "with --random-init and a preset: override the number of layers")
    emb_dim: int | None = arg(None, "with --random-init and a preset: override the embedding width")
    n_heads: int | None = arg(None, "with --random-init and a preset: override the number of attention heads")
    context_length: int | None = arg(None, "with --random-init and a preset: override the context length")
    models_dir: str | None = arg(None, "cache folder for OpenAI's weights (default ~/.cache/gpt2-scratch/openai)")
    data: str = arg(BOOK_DATA_URL, "instruction data: .json/.jsonl file, URL, Hub data set id "
                                   "(tatsu-lab/alpaca), or 'synthetic[:N]' (generated offline tasks)")
    prompt_style: Literal["alpaca", "phi3"] = arg("alpaca", "prompt template (alpaca: the book's)")
    shuffle_split: bool = arg(False, "shuffle the records (with --seed) before the 85/10/5 split; the book "
                                     "splits in file order")
    max_length: int | None = arg(None, "longest training example in tokens (default: the model's context)")
    too_long: Literal["truncate", "drop"] = arg("truncate", "what to do with longer examples")
    mask_prompt: bool = arg(False, "compute the loss on the response only (the book's exercise 7.2)")
    group_by_length: bool = arg(False, "batch examples of similar length together (less padding; the order "
                                       "still changes every epoch; evaluation regroups its same examples)")
    output_dir: str = arg("runs/sft", "output directory (refused if it exists, unless --resume/--overwrite)")
    overwrite: bool = arg(False, "delete an existing output directory first")
    resume: str | None = arg(None, "continue from the latest checkpoint in OUT/checkpoints, or from the "
                                   "given checkpoint directory", nargs="?", const="latest")
    epochs: int = arg(2, "passes over the training split")
    max_steps: int | None = arg(None, "stop after this many optimizer steps")
    batch_size: int = arg(8, "global batch size (examples per micro-batch, over all processes)")
    grad_accum: int = arg(1, "micro-batches per optimizer step (gradient accumulation)")
    lr: float = arg(5e-5, "peak learning rate (AdamW)")
    weight_decay: float = arg(0.1, "AdamW weight decay")
    lr_schedule: Literal["constant", "cosine"] = arg("constant", "learning-rate schedule after warmup "
                                                                 "(the book: constant)")
    warmup_steps: int = arg(0, "linear warmup steps")
    max_grad_norm: float = arg(0.0, "clip the gradient norm to this value (0: no clipping, as the book)")
    mixed_precision: Literal["no", "bf16"] = arg("no", "bf16 autocast (fast on CPUs with AMX and on GPUs)")
    seed: int = arg(123, "seed for initialisation, data order and synthetic data")
    eval_freq: int = arg(5, "evaluate (and log a line) every this many optimizer steps")
    eval_iter: int = arg(5, "validation batches per evaluation")
    save_every: int = arg(0, "also checkpoint every this many steps (0: only at the end of each epoch)")
    keep_checkpoints: int = arg(2, "how many of the newest checkpoints to keep (0: all)")
    sample_tokens: int = arg(35, "tokens of the greedy sample printed after each epoch")
    max_new_tokens: int = arg(256, "longest response generated for the test split")
    response_batch_size: int = arg(8, "prompts per batch when generating the test responses")
    push_to_hub: str | None = arg(None, "after training, upload the model to this Hub repo (USER/NAME)")
    offline_demo: bool = arg(False, "the offline demo profile: a small random GPT-2 on synthetic tasks; "
                                    "options you give explicitly still win")


# The offline demo: small enough to learn the synthetic tasks in a few minutes on a 2-core CPU.
OFFLINE_DEMO = dict(
    model="gpt2-small", random_init=True, n_layers=4, emb_dim=128, n_heads=4, context_length=128,
    data="synthetic", prompt_style="phi3", output_dir="runs/offline-demo", epochs=10, batch_size=32, lr=2e-3,
    weight_decay=0.1,
    lr_schedule="cosine", warmup_steps=20, max_grad_norm=1.0, mask_prompt=True, group_by_length=False,
    eval_freq=40, eval_iter=5, max_new_tokens=12, response_batch_size=100, sample_tokens=12,
    mixed_precision="bf16",
)


# ---------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------


def load_model(args: SFTArgs):
    """The model ``--model`` names, via ``convert.resolve.load_model`` (folder, preset, Hub id); a preset
    with ``--random-init`` and shape overrides is built here."""
    from gpt2_scratch import PRESETS, GPT2ScratchConfig, GPT2ScratchForCausalLM

    overrides = {k: getattr(args, k) for k in ("n_layers", "emb_dim", "n_heads", "context_length")
                 if getattr(args, k) is not None}
    if overrides:
        if not (args.random_init and args.model in PRESETS):
            raise UserError("--n-layers/--emb-dim/--n-heads/--context-length need --random-init and a preset "
                            f"--model ({', '.join(PRESETS)})")
        try:
            config = GPT2ScratchConfig.from_preset(args.model, **overrides)
            return GPT2ScratchForCausalLM(config)
        except ValueError as err:
            raise UserError(f"bad model shape {overrides}: {err}") from None
    from convert.resolve import load_model as resolve_model

    return resolve_model(args.model, random_init=args.random_init, models_dir=args.models_dir)


def apply_profile(args: SFTArgs, explicit: set[str]) -> SFTArgs:
    if not args.offline_demo:
        return args
    return dataclasses.replace(args, **{k: v for k, v in OFFLINE_DEMO.items() if k not in explicit})


def make_scheduler(optimizer, args: SFTArgs, total_steps: int):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if args.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, max(total_steps, 1))
    return get_constant_schedule_with_warmup(optimizer, args.warmup_steps)


def check_args(args: SFTArgs) -> None:
    for name in ("epochs", "batch_size", "grad_accum", "eval_freq", "eval_iter", "sample_tokens",
                 "max_new_tokens", "response_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")


# ---------------------------------------------------------------------------------------------------
# Loss and evaluation
# ---------------------------------------------------------------------------------------------------


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Cross-entropy summed over the batch's target tokens (labels are pre-shifted, -100 = none).

    ``return_logits=False`` makes the model project only the positions that have a target onto the
    vocabulary: padding (and, with --mask-prompt, the prompt) costs no [tokens, E] x [E, 50257] product,
    the costliest layer of a small GPT-2. The cross-entropy runs in fp32 even under bf16 autocast.
    ``num_items_in_batch`` is what the summed loss is divided by; 1 keeps the sum, which the loop
    divides by the target count of the whole accumulation window.
    """
    return model(batch["input_ids"], shift_labels=batch["labels"], use_cache=False, return_logits=False,
                 num_items_in_batch=1).loss


@torch.no_grad()
def evaluate(accelerator, model, loader, num_batches: int) -> float:
    """Mean loss per target token over the first ``num_batches`` batches (all processes)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [loss sum, target tokens]
    with accelerator.autocast():  # one context for all batches: bf16 weight copies are made once, not per batch
        for batch in islice(loader, num_batches):
            totals[0] += token_loss_sum(model, batch).double()
            totals[1] += (batch["labels"] != IGNORE_INDEX).sum()
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    return (totals[0] / totals[1].clamp(min=1)).item()  # host sync


@torch.no_grad()
def greedy_sample(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The book's per-epoch check: greedily continue a fixed validation prompt (newlines shown as spaces)."""
    from gpt2_scratch import ENDOFTEXT_ID

    was_training = model.training
    model.eval()
    context = model.config.max_position_embeddings
    ids = tokenizer.encode(prompt)[-(context - max_new_tokens):]
    device = next(model.parameters()).device
    out = model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                         device=device), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=ENDOFTEXT_ID,
                         eos_token_id=None)
    model.train(was_training)
    return tokenizer.decode(out[0]).replace("\n", " ")


# ---------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def train(args: SFTArgs) -> Path:
    import datasets
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from gpt2_scratch import format_input, generate_responses, get_tokenizer
    from train.data import (EpochBatchSampler, InstructionCollator, evaluation_sampler, load_records,
                            prepare_instruction_data)

    check_args(args)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        # --batch-size is the global batch: each process gets its slice of every batch, and the
        # scheduler steps once per optimizer step whatever the number of processes.
        dataloader_config=DataLoaderConfiguration(split_batches=True, even_batches=False),
    )
    main = accelerator.is_main_process
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, stream=sys.stdout,
                        format="%(message)s", force=True)
    # Our own lines say what happened; the libraries' INFO chatter (every file save_state writes) and
    # datasets' progress bars (a few seconds of tokenizing at most) would bury them.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    # save_state's note that the tied lm_head is stored once is expected (reload re-ties it).
    logging.getLogger("accelerate.utils.other").addFilter(lambda record: "Removed shared tensor" not in record.getMessage())
    logging.getLogger("gpt2_scratch").setLevel(logging.WARNING)
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_warning()
    transformers.logging.set_verbosity_error()
    if args.batch_size % accelerator.num_processes:
        raise UserError(f"--batch-size {args.batch_size} is the global batch; it must be divisible by the "
                        f"{accelerator.num_processes} processes")

    resuming = args.resume is not None
    out = prepare_output_dir(args.output_dir, resume=resuming, overwrite=args.overwrite, is_main_process=main)
    accelerator.wait_for_everyone()
    checkpoint_root = out / "checkpoints"
    resume_from = find_checkpoint(args.resume, checkpoint_root) if resuming else None

    # Check the data before building the model: a bad record should fail in seconds.
    with accelerator.main_process_first():  # the main process fills the datasets cache, the others read it
        records = load_records(args.data, seed=args.seed)

    set_seed(args.seed)  # same init on every process
    tokenizer = get_tokenizer()
    lm = load_model(args)
    lm.train()
    context = lm.config.max_position_embeddings
    max_length = min(args.max_length or context, context)

    with accelerator.main_process_first():
        data = prepare_instruction_data(records, tokenizer, style=args.prompt_style, max_length=max_length,
                                        too_long=args.too_long, shuffle_split=args.shuffle_split, seed=args.seed, name=args.data)
    columns = ["input_ids", "prompt_length"]
    train_ds, val_ds = data.train.select_columns(columns), data.validation.select_columns(columns)
    train_sampler = EpochBatchSampler(list(data.train["length"]), args.batch_size, shuffle=True, drop_last=True,
                                      group_by_length=args.group_by_length, seed=args.seed)
    val_sampler = evaluation_sampler(list(data.validation["length"]), args.batch_size, eval_iter=args.eval_iter,
                                     group_by_length=args.group_by_length)
    if len(train_sampler) == 0:
        raise UserError(f"{args.data}: {len(train_ds)} training examples make no full batch of {args.batch_size}; "
                        "lower --batch-size")
    collate = InstructionCollator(allowed_max_length=max_length, mask_prompt=args.mask_prompt)
    train_loader = DataLoader(train_ds, batch_sampler=train_sampler, collate_fn=collate)
    val_loader = DataLoader(val_ds, batch_sampler=val_sampler, collate_fn=collate)

    steps_per_epoch = math.ceil(len(train_sampler) / args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    # The book decays every parameter (AdamW over model.parameters()); so do we. The fused kernel does
    # AdamW's arithmetic in one pass over each tensor: 4x faster than the default on CPU, same updates.
    model = lm
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scheduler = make_scheduler(optimizer, args, total_steps)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler)

    metrics = MetricsLog(out / "metrics.jsonl", enabled=main)
    state = {"step": 0, "epoch": 0, "batches_done": 0, "tokens_seen": 0, "target_tokens_seen": 0,
             "loss_sum": 0.0, "loss_tokens": 0, "last_eval_step": -1, "train_seconds": 0.0}
    if resume_from is not None:
        state.update(load_checkpoint(accelerator, resume_from))
        metrics.truncate_after(state["step"])
        if main:
            print(f"resumed from {resume_from}: step {state['step']}, epoch {state['epoch'] + 1}, "
                  f"{state['batches_done']} batches into it", flush=True)
    if main:
        write_json_atomic(out / "args.json", dataclasses.asdict(args))
        n_params = lm.num_parameters()
        print(f"model {args.model}{' (random init)' if args.random_init else ''}: {n_params:,} parameters, "
              f"context {context}; data {args.data}: {len(train_ds)} train / {len(val_ds)} val / "
              f"{len(data.test)} test; {total_steps} steps of {args.batch_size}x{args.grad_accum} examples on "
              f"{accelerator.num_processes} process(es), {args.mixed_precision} precision, "
              f"{loaded_allocator()} malloc", flush=True)

    sample_prompt = format_input(data.validation_records[0] if data.validation_records else data.test_records[0],
                                 args.prompt_style)
    bar = tqdm(total=total_steps, initial=state["step"], desc="sft", unit="step", disable=not main, dynamic_ncols=True)
    log_tokens, log_seconds = 0, 0.0  # throughput since the last log line (not checkpointed: timing only)

    def checkpoint() -> None:
        save_checkpoint(accelerator, checkpoint_root, state["step"], state, keep=args.keep_checkpoints or None)

    def eval_and_log() -> None:
        nonlocal log_tokens, log_seconds
        val_loss = evaluate(accelerator, model, val_loader, args.eval_iter)
        train_loss = state["loss_sum"] / max(state["loss_tokens"], 1)
        row = {"epoch": min(state["epoch"] + 1, args.epochs), "step": state["step"], "train_loss": train_loss, "val_loss": val_loss,
               "lr": scheduler.get_last_lr()[0], "tokens_seen": state["tokens_seen"],
               "target_tokens_seen": state["target_tokens_seen"],
               "tokens_per_sec": log_tokens / log_seconds if log_seconds else 0.0}
        metrics.log(row)
        if main:
            bar.write(f"epoch {row['epoch']}/{args.epochs} | step {row['step']:>5}/{total_steps} | train {train_loss:.3f} "
                      f"| val {val_loss:.3f} | lr {row['lr']:.2e} | tokens {row['tokens_seen']:,} | "
                      f"{row['tokens_per_sec']:,.0f} tok/s")
        state.update(loss_sum=0.0, loss_tokens=0, last_eval_step=state["step"])
        log_tokens, log_seconds = 0, 0.0

    done = state["step"] >= total_steps
    while state["epoch"] < args.epochs and not done:
        epoch = state["epoch"]
        train_sampler.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        loader = (accelerator.skip_first_batches(train_loader, state["batches_done"]) if state["batches_done"]
                  else train_loader)
        batches = iter(loader)
        while True:
            tick = time.perf_counter()
            window = list(islice(batches, args.grad_accum))  # this optimizer step's micro-batches
            if not window:
                break
            # Normalise by the target tokens of the whole window on all processes (accelerate's recipe),
            # so accumulation and the process count do not change the gradient.
            counts = torch.tensor([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in window),
                                   sum(b["input_ids"].numel() for b in window)], device=accelerator.device)
            n_targets, n_tokens = accelerator.reduce(counts, reduction="sum").tolist()
            step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            for i, batch in enumerate(window):
                last = i == len(window) - 1
                with accelerator.no_sync(model) if not last else nullcontext():
                    with accelerator.autocast():
                        loss_sum = token_loss_sum(model, batch)
                    # DDP averages gradients over processes; scaling by their number turns that into a sum.
                    accelerator.backward(loss_sum * accelerator.num_processes / max(n_targets, 1))
                step_loss += loss_sum.detach().double()
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = accelerator.reduce(step_loss, reduction="sum").item()  # host sync

            state["step"] += 1
            state["batches_done"] += len(window)
            state["tokens_seen"] += n_tokens
            state["target_tokens_seen"] += n_targets
            state["loss_sum"] += step_loss
            state["loss_tokens"] += n_targets
            elapsed = time.perf_counter() - tick
            state["train_seconds"] += elapsed
            log_tokens += n_tokens
            log_seconds += elapsed
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss / max(n_targets, 1):.3f}")

            # The book evaluates after its steps 0, 5, 10, ... (0-based); ours count from 1.
            if (state["step"] - 1) % args.eval_freq == 0:
                eval_and_log()
            if args.save_every and state["step"] % args.save_every == 0:
                checkpoint()
            if state["step"] >= total_steps:
                done = True
                break

        if state["batches_done"] >= len(train_sampler):  # the epoch ran to its end
            if main:
                sample = greedy_sample(accelerator.unwrap_model(model), tokenizer, sample_prompt, args.sample_tokens)
                bar.write(f"epoch {epoch + 1} sample: {sample}")
                metrics.log({"epoch": epoch + 1, "step": state["step"], "sample": sample})
            accelerator.wait_for_everyone()
            state["epoch"] += 1
            state["batches_done"] = 0
            checkpoint()
    bar.close()
    if state["last_eval_step"] != state["step"]:
        eval_and_log()

    # ---- outputs (main process only) ----
    accelerator.wait_for_everyone()
    if main:
        final_model = accelerator.unwrap_model(model)
        final_model.eval()
        save_final_model(final_model, tokenizer, out)
        plot_losses(metrics.read(), out)
        records = data.test_records
        print(f"generating {len(records)} test responses (greedy, up to {args.max_new_tokens} new tokens)", flush=True)
        responses = generate_responses(final_model, tokenizer, records, batch_size=args.response_batch_size,
                                       max_new_tokens=args.max_new_tokens, style=args.prompt_style)
        write_json_atomic(out / "instruction-data-with-response.json",
                          [dict(r, model_response=resp) for r, resp in zip(records, responses)])
        if records and all("task" in r for r in records):
            from train.synthetic import exact_match_report

            report = exact_match_report(records, responses)
            write_json_atomic(out / "exact_match.json", {k: {"correct": c, "total": n, "accuracy": c / n}
                                                         for k, (c, n) in report.items()})
            per_task = ", ".join(f"{k} {c}/{n}" for k, (c, n) in report.items() if k != "all")
            c, n = report["all"]
            print(f"held-out exact match: {c}/{n} = {100 * c / n:.1f}% ({per_task})", flush=True)
        minutes = state["train_seconds"] / 60
        print(f"done: {state['step']} steps, {state['tokens_seen']:,} tokens in {minutes:.1f} min of training; "
              f"model, metrics, loss.png/pdf and responses in {out}", flush=True)
        if args.push_to_hub:
            push_to_hub(out, args.push_to_hub)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def main(argv: list[str] | None = None) -> None:
    relaunch_multi_cpu(__file__, argv)
    args, explicit = parse_dataclass_args(SFTArgs, argv)
    args = apply_profile(args, explicit)

    def run() -> None:
        train(args)

    from convert.errors import ConvertError

    error_types: list[type[BaseException]] = [DataError, ConvertError, FileExistsError]
    try:
        from gpt2_scratch.hub import HubError

        error_types.append(HubError)
    except ImportError:
        pass
    run_main(run, *error_types)


if __name__ == "__main__":
    main()
