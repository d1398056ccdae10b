"""Instruction finetuning (the book's chapter 7) with a hand-written Accelerate loop.

    accelerate launch train/sft.py [--model DIR|HF_ID|PRESET] [--random-init] [--data PATH|URL|HUB_ID]
        [--out OUT] [--epochs 2] [--batch-size 8] [--lr 5e-5] [--weight-decay 0.1] [--eval-freq 5]
        [--eval-iter 5] [--max-steps N] [--mask-prompt] [--prompt-style alpaca|phi3]
        [--mixed-precision bf16|no] [--seed 123] [--save-every N] [--resume [PATH]] [--book-exact] ...
    python train/sft.py ...                       # the same, one process (= gpt2-scratch sft ...)
    python train/sft.py --offline-demo            # no network: small random model, synthetic tasks, 2-5 min

Defaults reproduce the book: gpt2-medium with OpenAI's weights, the book's instruction data (85/10/5
split in file order), 2 epochs, batch 8, AdamW lr 5e-5 weight decay 0.1, evaluation every 5 steps over
5 batches. What a run leaves in OUT:

    config.json model.safetensors generation_config.json tokenizer files   the final model (from_pretrained(OUT));
                         config.json records the prompt style it was trained with
    args.json            the arguments of the run
    metrics.jsonl        the initial losses, then one JSON object per evaluation (and per epoch sample)
    loss.png loss.pdf    train/validation loss over steps, tokens seen on the second x-axis
    instruction-data-with-response.json   the test split with a greedy ``model_response`` per record
    checkpoints/step-N/  accelerator.save_state + train_state.json, every --save-every steps and each epoch
    adapter/             with --lora (train/lora.py): the peft adapter; the model at the top is then the merged
                         one (none with --no-merge)

The script reads top to bottom: ``set_up`` checks everything that can be checked before anything is
written (arguments, the output folder, the data, the model, the limits), ``fit`` runs the loop over a
``TrainState``, ``evaluate`` measures, ``finish`` writes the outputs. The loop follows accelerate's
examples: the loss summed over target tokens and divided by the target-token count of the whole
accumulation window (all processes), ``no_sync`` on all but the window's last micro-batch, clipping,
optional warmup + cosine. ``--batch-size`` is the global batch, so a run's losses do not depend on the
number of processes. A checkpoint records how far into its epoch the run was, so ``--resume`` replays
exactly; Ctrl-C saves one and stops; a NaN loss stops the run without saving anything broken.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python train/sft.py ARGS` and `accelerate launch train/sft.py ARGS`
    from gpt2_scratch.core.cli import run_script

    run_script("sft")

import dataclasses
import logging
import math
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch

from gpt2_scratch.core.args import arg
from gpt2_scratch.core.errors import InputError
from gpt2_scratch.core.records import BOOK_DATA_URL
from gpt2_scratch.train.book_exact import (BOOK_SAMPLE_TOKENS, check_book_exact_args, fit_book_exact, plot_book_curves,
                              set_up_book_exact)
from gpt2_scratch.train.data import IGNORE_INDEX
from gpt2_scratch.train.lora import lora_arg
from gpt2_scratch.train.run import TrainState, run_arg

logger = logging.getLogger(__name__)


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
    models_dir: str | None = arg(None, "cache folder for OpenAI's weights (default $GPT2_SCRATCH_CACHE/openai "
                                       "or ~/.cache/gpt2-scratch/openai)")
    data: str = arg(BOOK_DATA_URL, "instruction data: .json/.jsonl file, URL, Hub data set id (tatsu-lab/alpaca), "
                                   "or 'synthetic[:N]' (generated offline tasks)")
    prompt_style: Literal["alpaca", "phi3"] = arg("alpaca", "prompt template (alpaca: the book's)",
                                                  aliases=("--style",))
    shuffle_split: bool = arg(False, "shuffle the records (with --seed) before the 85/10/5 split; the book "
                                     "splits in file order")
    max_length: int | None = arg(None, "longest training example in tokens (default: the model's context)")
    too_long: Literal["truncate", "drop"] = arg("truncate", "what to do with longer examples")
    mask_prompt: bool = arg(False, "compute the loss on the response only (the book's exercise 7.2)")
    group_by_length: bool = arg(False, "batch examples of similar length together (less padding; the order "
                                       "still changes every epoch; evaluation regroups its same examples)")
    out: str = run_arg("out", "runs/sft")
    overwrite: bool = run_arg("overwrite")
    resume: str | None = run_arg("resume")
    epochs: int = arg(2, "passes over the training split")
    max_steps: int | None = run_arg("max_steps")
    batch_size: int = arg(8, "global batch size (examples per micro-batch, over all processes)")
    grad_accum: int = run_arg("grad_accum")
    lr: float = arg(5e-5, "peak learning rate (AdamW)")
    weight_decay: float = arg(0.1, "AdamW weight decay")
    lr_schedule: Literal["constant", "cosine"] = arg("constant", "learning-rate schedule after warmup "
                                                                 "(the book: constant)")
    warmup_steps: int = arg(0, "linear warmup steps")
    max_grad_norm: float = run_arg("max_grad_norm")
    mixed_precision: Literal["no", "bf16", "auto"] = run_arg("mixed_precision")
    seed: int = arg(123, "seed for initialisation, data order and synthetic data")
    eval_freq: int = run_arg("eval_freq")
    eval_iter: int = run_arg("eval_iter")
    save_every: int = run_arg("save_every")
    keep_checkpoints: int = run_arg("keep_checkpoints")
    sample_tokens: int = run_arg("sample_tokens")
    max_new_tokens: int = run_arg("max_new_tokens")
    response_batch_size: int = run_arg("response_batch_size")
    lora: Literal["default", "book"] | None = lora_arg("lora")
    lora_r: int | None = lora_arg("lora_r")
    lora_alpha: float | None = lora_arg("lora_alpha")
    lora_dropout: float | None = lora_arg("lora_dropout")
    lora_targets: list[str] | None = lora_arg("lora_targets")
    lora_init: Literal["peft", "book"] | None = lora_arg("lora_init")
    base_dtype: Literal["fp32", "bf16"] = lora_arg("base_dtype")
    merge: bool = lora_arg("merge")
    push_to_hub: str | None = run_arg("push_to_hub")
    offline_demo: bool = arg(False, "the offline demo profile: a small random GPT-2 on synthetic tasks; "
                                    "options you give explicitly still win")
    book_exact: bool = arg(False, "follow the book's gpt_instruction_finetuning.py step for step (one process, fp32; "
                                  "train/book_exact.py): its batches, evaluations and 50-token epoch-end sample, so "
                                  "the log equals the book's from the same weights; the LM head is untied")

    def with_explicit(self, explicit: set[str]) -> "SFTArgs":
        """Apply the --offline-demo profile to every option not given on the command line."""
        if self.book_exact and "sample_tokens" not in explicit:  # the book's sample length
            self = dataclasses.replace(self, sample_tokens=BOOK_SAMPLE_TOKENS)
        if not self.offline_demo:
            return self
        return dataclasses.replace(self, **{k: v for k, v in OFFLINE_DEMO.items() if k not in explicit})


# The offline demo: small enough to learn the synthetic tasks in a few minutes on a 2-core CPU.
OFFLINE_DEMO = dict(
    model="gpt2-small", random_init=True, n_layers=4, emb_dim=128, n_heads=4, context_length=128,
    data="synthetic", prompt_style="phi3", out="runs/offline-demo", epochs=10, batch_size=32, lr=2e-3,
    weight_decay=0.1, lr_schedule="cosine", warmup_steps=20, max_grad_norm=1.0, mask_prompt=True,
    group_by_length=False, eval_freq=40, eval_iter=5, max_new_tokens=12, response_batch_size=100,
    sample_tokens=12, mixed_precision="auto",
)
# What a --resume may change: how the run is watched and what happens after it, not what it computes.
MAY_CHANGE_ON_RESUME = {"out", "overwrite", "resume", "eval_freq", "eval_iter", "save_every", "keep_checkpoints",
                        "sample_tokens", "max_new_tokens", "response_batch_size", "push_to_hub", "offline_demo",
                        "models_dir"}


def run(args: SFTArgs) -> int:
    """set-up → fit → finish; returns the exit code (130 when stopped by Ctrl-C with a checkpoint saved)."""
    from gpt2_scratch.train.run import run_training

    return run_training(args, set_up, fit_book_exact if args.book_exact else fit, finish)


# ---------------------------------------------------------------------------------------------------
# Set-up: every check first, then the first write
# ---------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything the loop and the outputs need, made by ``set_up``."""

    accelerator: Any
    model: Any  # prepared by accelerate (DDP-wrapped with several processes)
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    train_sampler: Any
    train_loader: Any
    train_eval_loader: Any  # the first eval_iter training batches in file order: the initial train loss
    val_loader: Any
    data: Any  # train.data.InstructionData
    out: Path
    metrics: Any  # train.metrics.MetricsLog
    total_steps: int
    state: TrainState
    sample_prompt: str


def check_args(args: SFTArgs) -> None:
    """The numbers a run cannot start with, as one line each."""
    from gpt2_scratch.train.run import check_number

    for name in ("epochs", "batch_size", "grad_accum", "eval_freq", "eval_iter", "sample_tokens",
                 "max_new_tokens", "response_batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("max_steps", "max_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("save_every", "keep_checkpoints", "warmup_steps"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    check_number("lr", args.lr, above=0)
    check_number("weight_decay", args.weight_decay, minimum=0)
    check_number("max_grad_norm", args.max_grad_norm, minimum=0)
    if args.book_exact:
        check_book_exact_args(args)


def load_model(args: SFTArgs):
    """The model ``--model`` names (``convert.resolve.load_model``: folder, preset, Hub id); a preset with
    ``--random-init`` and shape overrides is built here."""
    from gpt2_scratch import PRESETS, GPT2ScratchConfig, GPT2ScratchForCausalLM

    overrides = {k: getattr(args, k) for k in ("n_layers", "emb_dim", "n_heads", "context_length")
                 if getattr(args, k) is not None}
    if overrides:
        if not (args.random_init and args.model in PRESETS):
            raise InputError("--n-layers/--emb-dim/--n-heads/--context-length need --random-init and a preset "
                             f"--model ({', '.join(PRESETS)})")
        try:
            return GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset(args.model, **overrides))
        except ValueError as err:
            raise InputError(f"bad model shape {overrides}: {err}") from None
    from gpt2_scratch.convert.resolve import load_model as resolve_model

    return resolve_model(args.model, random_init=args.random_init, models_dir=args.models_dir)


def load_instruction_records(spec: str, seed: int) -> list[dict]:
    from gpt2_scratch.core.records import load_records
    from gpt2_scratch.train.synthetic import synthetic_records

    records = synthetic_records(spec, seed)
    return records if records is not None else load_records(spec)


def set_up(args: SFTArgs) -> Setup:
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from gpt2_scratch.core.prompts import format_input
    from gpt2_scratch import get_tokenizer
    from gpt2_scratch.train import lora
    from gpt2_scratch.train.data import EpochBatchSampler, InstructionCollator, evaluation_sampler, prepare_instruction_data
    from gpt2_scratch.train.metrics import MetricsLog
    from gpt2_scratch.train.run import (check_output, check_resume_args, clear_output, find_checkpoint, load_checkpoint,
                           make_accelerator, quiet_libraries, resolve_precision, write_args)

    # 1. Arguments and the output folder: nothing is written or deleted until every check has passed.
    quiet_libraries()
    if args.book_exact and args.mixed_precision == "auto":
        args.mixed_precision = "no"  # the book trains in fp32, whatever the machine could do
    check_args(args)
    resolve_precision(args)
    lora_settings = lora.settings(args)  # None: full finetuning
    resuming = args.resume is not None
    out = check_output(args.out, resume=resuming, overwrite=args.overwrite,
                       inputs=[("--model", args.model), ("--data", args.data)])
    resume_from = find_checkpoint(args.resume, out / "checkpoints") if resuming else None
    if resuming:
        # With a constant learning rate the length of the run changes nothing it computes.
        lengths = {"max_steps", "epochs"} if args.lr_schedule == "constant" else set()
        check_resume_args(out, args, MAY_CHANGE_ON_RESUME | lengths)

    # 2. The data (seconds: a bad record fails before the model loads), then the model.
    records = load_instruction_records(args.data, args.seed)
    tokenizer = get_tokenizer()
    set_seed(args.seed)  # the same random init on every process
    model = load_model(args)
    model = lora.wrap(model, lora_settings, base_model=lora.base_model_name(args.model))
    model.train()
    context = model.config.max_position_embeddings
    max_length = min(args.max_length or context, context)
    data = prepare_instruction_data(records, tokenizer, source=args.data, style=args.prompt_style,
                                    max_length=max_length, too_long=args.too_long, shuffle_split=args.shuffle_split,
                                    seed=args.seed)

    # 3. The limits, checked now rather than after hours of training.
    for name in ("max_new_tokens", "sample_tokens"):
        if getattr(args, name) >= context:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)} leaves no room for a prompt in the "
                             f"{context}-token context of {args.model}; pass at most {context - 1}")
    train_sampler = EpochBatchSampler(list(data.train["length"]), args.batch_size, shuffle=True, drop_last=True,
                                      group_by_length=args.group_by_length, seed=args.seed)
    if len(train_sampler) == 0:
        raise InputError(f"{args.data}: {len(data.train)} training examples make no full batch of "
                         f"{args.batch_size}; lower --batch-size")
    if args.book_exact:  # the book's model (its own LM head, no dropout), on examples it would not cut
        set_up_book_exact(model, data, context)

    # 4. Only now: the processes, the output folder, the loop's objects.
    accelerator = make_accelerator(args.mixed_precision, args.batch_size)
    clear_output(out, overwrite=args.overwrite and not resuming, is_main_process=accelerator.is_main_process)
    accelerator.wait_for_everyone()

    columns = ["input_ids", "prompt_length"]
    train_ds, val_ds = data.train.select_columns(columns), data.validation.select_columns(columns)
    collate = InstructionCollator(allowed_max_length=max_length, mask_prompt=args.mask_prompt)
    train_loader = DataLoader(train_ds, batch_sampler=train_sampler, collate_fn=collate)
    # Evaluation reads the first eval_iter batches: of the validation split, and (for the initial losses)
    # of the training split, both in file order.
    val_loader = DataLoader(val_ds, collate_fn=collate, batch_sampler=evaluation_sampler(
        list(data.validation["length"]), args.batch_size, eval_iter=args.eval_iter, group_by_length=args.group_by_length))
    train_eval_loader = DataLoader(train_ds, collate_fn=collate, batch_sampler=evaluation_sampler(
        list(data.train["length"]), args.batch_size, eval_iter=args.eval_iter, group_by_length=args.group_by_length))

    steps_per_epoch = math.ceil(len(train_sampler) / args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    # The book decays every parameter (AdamW over model.parameters()); so do we. The fused kernel does
    # AdamW's arithmetic in one pass over each tensor: 4x faster than the default on CPU, same updates.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scheduler = make_scheduler(optimizer, args, total_steps)
    prepared = accelerator.prepare(model, optimizer, train_loader, val_loader, train_eval_loader, scheduler)
    model, optimizer, train_loader, val_loader, train_eval_loader, scheduler = prepared

    main = accelerator.is_main_process
    metrics = MetricsLog(out / "metrics.jsonl", enabled=main)
    state = TrainState()
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from)
        metrics.truncate_after(state.step)
        if main:
            print(f"resumed from {resume_from}: step {state.step}, epoch {state.epoch + 1}, "
                  f"{state.batches_done} batches into it", flush=True)
    if main:
        write_args(out, args)
        from gpt2_scratch.core.allocator import loaded_allocator

        print(f"model {args.model}{' (random init)' if args.random_init else ''}: {model_parameters(model):,} "
              f"parameters, context {context}; data {args.data}: {len(data.train)} train / {len(data.validation)} "
              f"validation / {len(data.test)} test; {total_steps} steps of {args.batch_size}x{args.grad_accum} "
              f"examples on {accelerator.num_processes} process(es), "
              f"{'fp32' if accelerator.mixed_precision == 'no' else accelerator.mixed_precision} precision, "
              f"{loaded_allocator()} malloc", flush=True)
        if lora_settings is not None:
            print(lora.describe(model, lora_settings), flush=True)
    first_val = data.validation_records[0] if data.validation_records else data.test_records[0]
    return Setup(accelerator, model, tokenizer, optimizer, scheduler, train_sampler, train_loader, train_eval_loader,
                 val_loader, data, out, metrics, total_steps, state, format_input(first_val, args.prompt_style))


def model_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def make_scheduler(optimizer, args: SFTArgs, total_steps: int):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if args.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, max(total_steps, 1))
    return get_constant_schedule_with_warmup(optimizer, args.warmup_steps)


# ---------------------------------------------------------------------------------------------------
# Loss and evaluation
# ---------------------------------------------------------------------------------------------------


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Cross-entropy summed over the batch's target tokens (labels are pre-shifted, -100 = none).

    ``return_logits=False`` makes the model project only the positions that have a target onto the
    vocabulary: padding (and, with --mask-prompt, the prompt) costs no [tokens, E] x [E, 50257] product,
    the costliest layer of a small GPT-2. The cross-entropy runs in fp32 even under bf16 autocast.
    ``num_items_in_batch=1`` keeps the sum, which the loop divides by the target count of the whole
    accumulation window.
    """
    return model(batch["input_ids"], shift_labels=batch["labels"], use_cache=False, return_logits=False,
                 num_items_in_batch=1).loss


@torch.no_grad()
def evaluate(accelerator, model, loader, num_batches: int) -> float:
    """Mean loss per target token over the first ``num_batches`` batches (all processes)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [loss sum, target tokens]
    with accelerator.autocast():  # one context for all batches: bf16 weight copies are made once, not per batch
        for batch in islice(loader, num_batches):
            totals[0] += token_loss_sum(model, batch).double()
            totals[1] += (batch["labels"] != IGNORE_INDEX).sum()
    model.train(was_training)
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
# Fit: the loop
# ---------------------------------------------------------------------------------------------------


def fit(setup: Setup, args: SFTArgs) -> tuple[TrainState, bool]:
    """Train until the epochs (or --max-steps) are done; returns (state, whether Ctrl-C stopped it)."""
    from tqdm.auto import tqdm

    from gpt2_scratch.train.run import StopRequest, check_loss, save_checkpoint

    accelerator, model, state = setup.accelerator, setup.model, setup.state
    main = accelerator.is_main_process
    checkpoint_root = setup.out / "checkpoints"

    def checkpoint() -> None:
        save_checkpoint(accelerator, model, checkpoint_root, state, keep=args.keep_checkpoints or None)

    if state.step == 0 and state.batches_done == 0:
        # The losses before any training, as the book prints them: the first eval_iter batches of each split.
        row = {"epoch": 0, "step": 0, "train_loss": evaluate(accelerator, model, setup.train_eval_loader, args.eval_iter),
               "val_loss": evaluate(accelerator, model, setup.val_loader, args.eval_iter), "tokens_seen": 0,
               "initial": True}
        setup.metrics.log(row)
        if main:
            print(f"initial losses | train {row['train_loss']:.3f} | val {row['val_loss']:.3f}", flush=True)

    bar = tqdm(total=setup.total_steps, initial=state.step, desc="sft", unit="step", disable=not main,
               dynamic_ncols=True)
    window_tokens, window_seconds = 0, 0.0  # throughput since the last log line (timing only, not checkpointed)

    def eval_and_log() -> None:
        nonlocal window_tokens, window_seconds
        row = {"epoch": min(state.epoch + 1, args.epochs), "step": state.step,
               "train_loss_running": state.running_loss(),
               "val_loss": evaluate(accelerator, model, setup.val_loader, args.eval_iter),
               "lr": setup.scheduler.get_last_lr()[0], "tokens_seen": state.tokens_seen,
               "target_tokens_seen": state.target_tokens_seen,
               "tokens_per_sec": window_tokens / window_seconds if window_seconds else 0.0}
        check_loss(row["val_loss"], state.step, checkpoint_root, "validation loss")
        setup.metrics.log(row)
        if main:
            bar.write(f"epoch {row['epoch']}/{args.epochs} | step {row['step']:>5}/{setup.total_steps} | train "
                      f"(running) {row['train_loss_running']:.3f} | val {row['val_loss']:.3f} | lr {row['lr']:.2e} | "
                      f"tokens {row['tokens_seen']:,} | {row['tokens_per_sec']:,.0f} tok/s")
        state.loss_sum, state.loss_tokens, state.last_eval_step = 0.0, 0, state.step
        window_tokens, window_seconds = 0, 0.0

    done = state.step >= setup.total_steps
    with StopRequest() as stop, closing(bar):  # the bar ends its line before any error or final line
        while state.epoch < args.epochs and not done:
            epoch = state.epoch
            setup.train_sampler.set_epoch(epoch)
            setup.train_loader.set_epoch(epoch)
            loader = (accelerator.skip_first_batches(setup.train_loader, state.batches_done) if state.batches_done
                      else setup.train_loader)
            batches = iter(loader)
            while True:
                tick = time.perf_counter()
                window = list(islice(batches, args.grad_accum))  # this optimizer step's micro-batches
                if not window:
                    break
                step_loss, n_targets, n_tokens = train_step(setup, args, window)
                state.step += 1
                state.batches_done += len(window)
                state.tokens_seen += n_tokens
                state.target_tokens_seen += n_targets
                state.loss_sum += step_loss
                state.loss_tokens += n_targets
                elapsed = time.perf_counter() - tick
                state.train_seconds += elapsed
                window_tokens += n_tokens
                window_seconds += elapsed
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss / max(n_targets, 1):.3f}")
                check_loss(step_loss / max(n_targets, 1), state.step, checkpoint_root)

                # The book evaluates after its steps 0, 5, 10, ... (0-based); ours count from 1.
                if (state.step - 1) % args.eval_freq == 0:
                    eval_and_log()
                if args.save_every and state.step % args.save_every == 0:
                    checkpoint()
                if stop.agreed(accelerator):
                    checkpoint()
                    bar.close()
                    if main:
                        print(f"stopped at step {state.step}: checkpoint saved in {checkpoint_root}; continue with the "
                              "same command and --resume", flush=True)
                    return state, True
                if state.step >= setup.total_steps:
                    done = True
                    break

            if state.batches_done >= len(setup.train_sampler):  # the epoch ran to its end
                if main:
                    sample = greedy_sample(accelerator.unwrap_model(model), setup.tokenizer, setup.sample_prompt,
                                           args.sample_tokens)
                    bar.write(f"epoch {epoch + 1} sample: {sample}")
                    setup.metrics.log({"epoch": epoch + 1, "step": state.step, "sample": sample})
                accelerator.wait_for_everyone()
                state.epoch += 1
                state.batches_done = 0
                checkpoint()
    if state.last_eval_step != state.step:
        eval_and_log()
    return state, False


def train_step(setup: Setup, args: SFTArgs, window: list[dict]) -> tuple[float, int, int]:
    """One optimizer step over the micro-batches of ``window``: (summed loss, target tokens, input tokens),
    all processes together."""
    accelerator, model = setup.accelerator, setup.model
    # Normalise by the target tokens of the whole window on all processes (accelerate's recipe), so
    # accumulation and the process count do not change the gradient.
    counts = torch.tensor([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in window),
                           sum(b["input_ids"].numel() for b in window)], device=accelerator.device)
    n_targets, n_tokens = accelerator.reduce(counts, reduction="sum").tolist()
    step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for i, batch in enumerate(window):
        with accelerator.no_sync(model) if i < len(window) - 1 else nullcontext():
            with accelerator.autocast():
                loss_sum = token_loss_sum(model, batch)
            # DDP averages gradients over processes; scaling by their number turns that into a sum.
            accelerator.backward(loss_sum * accelerator.num_processes / max(n_targets, 1))
        step_loss += loss_sum.detach().double()
    if args.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    setup.optimizer.step()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(step_loss, reduction="sum").item(), int(n_targets), int(n_tokens)  # host sync


# ---------------------------------------------------------------------------------------------------
# Finish: the outputs
# ---------------------------------------------------------------------------------------------------


def finish(setup: Setup, state: TrainState, args: SFTArgs) -> None:
    """The model at the top of OUT, the loss plot, the test responses (and the demo's exact match), a push."""
    from gpt2_scratch.core.files import write_json_atomic
    from gpt2_scratch import generate_responses
    from gpt2_scratch.train import lora
    from gpt2_scratch.train.metrics import plot_curves
    from gpt2_scratch.train.run import save_model_into

    accelerator, out = setup.accelerator, setup.out
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(setup.model)
        model.eval()
        lora_settings = lora.settings(args)
        if lora_settings is None:
            save_model_into(out, model, setup.tokenizer, prompt_style=args.prompt_style)
        else:  # OUT/adapter, and the merged model at the top of OUT unless --no-merge
            model = lora.save_outputs(out, model, setup.tokenizer, lora_settings, prompt_style=args.prompt_style,
                                      load_base=lora.base_reloader(load_model, args))
        if args.book_exact:
            plot_book_curves(setup.metrics.read(), out)
        else:
            rows = [{**r, "train_loss_running": r.get("train_loss_running", r.get("train_loss"))}
                    for r in setup.metrics.read()]
            plot_curves(rows, out, series={"train_loss_running": "training loss (running mean of steps)",
                                           "val_loss": "validation loss"})
        records = setup.data.test_records
        print(f"generating {len(records)} test responses (greedy, up to {args.max_new_tokens} new tokens)", flush=True)
        responses = generate_responses(model, setup.tokenizer, records, batch_size=args.response_batch_size,
                                       max_new_tokens=args.max_new_tokens, style=args.prompt_style)
        write_json_atomic(out / "instruction-data-with-response.json",
                          [dict(r, model_response=resp) for r, resp in zip(records, responses)])
        if records and all("task" in r for r in records):
            from gpt2_scratch.train.synthetic import exact_match_report

            report = exact_match_report(records, responses)
            write_json_atomic(out / "exact_match.json", {k: {"correct": c, "total": n, "accuracy": c / n}
                                                         for k, (c, n) in report.items()})
            per_task = ", ".join(f"{k} {c}/{n}" for k, (c, n) in report.items() if k != "all")
            c, n = report["all"]
            print(f"held-out exact match: {c}/{n} = {100 * c / n:.1f}% ({per_task})", flush=True)
        print(f"done: {state.step} steps, {state.tokens_seen:,} tokens in {state.train_seconds / 60:.1f} min of "
              f"training; model, metrics, loss.png/pdf and responses in {out}", flush=True)
        if args.push_to_hub:
            from gpt2_scratch.train.publish import push_run

            push_run(out, args.push_to_hub)
    accelerator.wait_for_everyone()
    accelerator.end_training()
