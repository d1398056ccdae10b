"""Direct Preference Optimization (the book's bonus notebook to chapter 7) with a hand-written Accelerate loop.

    accelerate launch train/dpo.py [--model runs/sft] [--data PATH|URL] [--out runs/dpo] [--beta 0.1]
        [--logprob mean|sum] [--precompute-ref] [--lr 5e-6] [--weight-decay 0.01] [--epochs 1] [--batch-size 8]
        [--eval-freq 5] [--eval-iter 5] [--lora [book]] [--mixed-precision bf16|no] [--resume [PATH]] ...
    python train/dpo.py ...                       # the same, one process (= gpt2-scratch dpo ...)

DPO makes a finetuned model prefer the ``chosen`` answer of each pair to the ``rejected`` one (the
book's data: polite vs impolite answers to the chapter's 1100 instructions), while a frozen reference
(the starting model) keeps it from drifting: with ``r = log π(y|x) − log π_ref(y|x)`` for each answer,
the loss of a pair is ``−log σ(β (r_chosen − r_rejected))``.

Defaults are the book's recipe: the starting model (train/sft.py's OUT) as policy and, frozen, as
reference; a response's log-probability is the mean over its tokens with the prompt masked
(``--logprob sum``: the sum, as the DPO paper and TRL); β 0.1; AdamW lr 5e-6 weight decay 0.01;
1 epoch; batch 8; evaluation every 5 steps over 5 batches; the 85/10/5 split in file order and the
Alpaca prompt. ``--precompute-ref`` computes the reference log-probabilities once before training, so
no second model is held (half the weights in memory, one forward less per step). With ``--lora`` the
policy is the starting model plus adapters (train/lora.py) and the reference is the same model with
the adapters disabled: no copy at all.

Logged per evaluation (metrics.jsonl) and plotted: the DPO loss, the chosen and rejected rewards
(``r`` above, the book's definition; TRL logs them times β), the reward margin (chosen − rejected)
and the reward accuracy (pairs whose chosen reward is higher); validation over ``--eval-iter``
batches, training as the running mean of the steps since the last evaluation. What a run leaves in
OUT is what train/sft.py leaves (the model at the top, args.json, metrics.jsonl, loss/rewards/
margins/accuracy plots, the test split with ``model_response``, checkpoints/, and adapter/ with
LoRA), and it resumes the same way.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python train/dpo.py ARGS` and `accelerate launch train/dpo.py ARGS`
    from gpt2_scratch.core.cli import run_script

    run_script("dpo")

import copy
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gpt2_scratch.core.args import arg
from gpt2_scratch.core.errors import InputError
from gpt2_scratch.core.records import BOOK_PREFERENCE_DATA_URL
from gpt2_scratch.train.lora import lora_arg
from gpt2_scratch.train.run import TrainState, run_arg

logger = logging.getLogger(__name__)

# The per-pair quantities summed over a window or an evaluation, in this order.
SUMS = ("loss", "chosen_reward", "rejected_reward", "correct", "pairs")


@dataclass
class DPOArgs:
    """Preference-tune an instruction model with DPO (the book's bonus notebook to chapter 7) with Accelerate."""

    model: str = arg("runs/sft", "the model to start from (policy and reference): a model folder such as "
                                 "train/sft.py's OUT, a Hub repo id or a preset")
    models_dir: str | None = arg(None, "cache folder for OpenAI's weights, when --model is a preset")
    data: str = arg(BOOK_PREFERENCE_DATA_URL, "preference data (.json/.jsonl, URL, Hub id) with instruction, input "
                                              "(optional), chosen, rejected (default: the book's, = "
                                              "shared/data/instruction-data-with-preference.json)")
    prompt_style: Literal["alpaca", "phi3"] | None = arg(None, "prompt template (default: the one the model was "
                                                               "trained with, else alpaca)", aliases=("--style",))
    shuffle_split: bool = arg(False, "shuffle the records (with --seed) before the 85/10/5 split")
    max_length: int | None = arg(None, "drop pairs longer than this many tokens (default: the model's context)")
    out: str = run_arg("out", "runs/dpo")
    overwrite: bool = run_arg("overwrite")
    resume: str | None = run_arg("resume")
    epochs: int = arg(1, "passes over the training pairs")
    max_steps: int | None = run_arg("max_steps")
    batch_size: int = arg(8, "global batch size in pairs (over all processes)")
    grad_accum: int = run_arg("grad_accum")
    lr: float = arg(5e-6, "learning rate (AdamW, constant)")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    max_grad_norm: float = run_arg("max_grad_norm")
    beta: float = arg(0.1, "DPO's β: how strongly the policy is held to the reference")
    logprob: Literal["mean", "sum"] = arg("mean", "a response's log-probability: mean over its tokens (the book) "
                                                  "or sum (the DPO paper, TRL)")
    precompute_ref: bool = arg(False, "compute the reference log-probs once before training instead of keeping a "
                                      "frozen copy of the model (less memory, fewer forward passes)")
    mixed_precision: Literal["no", "bf16", "auto"] = run_arg("mixed_precision")
    seed: int = arg(123, "seed for the data order")
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
    push_to_hub: str | None = arg(None, "after training, upload the model to this Hub repo (USER/NAME)")


MAY_CHANGE_ON_RESUME = {"out", "overwrite", "resume", "eval_freq", "eval_iter", "save_every", "keep_checkpoints",
                        "sample_tokens", "max_new_tokens", "response_batch_size", "push_to_hub", "models_dir", "merge"}


def run(args: DPOArgs) -> int:
    """set-up → fit → finish; returns the exit code (130 when stopped by Ctrl-C with a checkpoint saved)."""
    from gpt2_scratch.train.run import run_training

    return run_training(args, set_up, fit, finish)


# ---------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss ``−log σ(β ((π_c − ref_c) − (π_r − ref_r)))`` and the chosen / rejected rewards
    (``π − ref``, detached; the book's, TRL's are β times these). All arguments are per-pair log-probs [B]."""
    chosen_rewards = policy_chosen - ref_chosen
    rejected_rewards = policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_rewards - rejected_rewards))
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


class ResponseLogProbs(nn.Module):
    """Per sequence: the summed log-probability of its target tokens (labels != -100) and their count.

    Wraps a causal LM (ours, or a peft model of it) so that only positions with a target are projected
    onto the vocabulary: the prompt and the padding cost no [tokens, E] x [E, 50257] product. It is a
    module of its own so Accelerate/DDP wrap it and gradients are synchronised as for any model.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def base(self) -> nn.Module:
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.base()
        hidden, _ = base.transformer(input_ids, use_cache=False)  # (N, T, E)
        supervised = labels != -100  # (N, T)
        logits = base.lm_head(hidden[supervised]).float()  # (S, vocab): only positions with a target
        token_logps = -F.cross_entropy(logits, labels[supervised], reduction="none")  # (S,)
        rows = supervised.nonzero()[:, 0]  # the sequence of each supervised position
        sums = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=labels.device).index_add(0, rows, token_logps)
        return sums, supervised.sum(-1)


def pair_logprobs(module: nn.Module, batch: dict, logprob: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs [B] of a batch, both in one forward pass."""
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # (2B, T)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    sums, counts = module(ids, labels)
    logps = sums / counts.clamp(min=1) if logprob == "mean" else sums
    return logps.chunk(2)


class Reference:
    """The reference log-probs of a batch: from a frozen copy of the starting model, from the policy with its
    LoRA adapters disabled, or from a table computed once before training (``--precompute-ref``)."""

    def __init__(self, *, model: nn.Module | None = None, adapters_of: nn.Module | None = None,
                 logprob: str = "mean"):
        self.model = model  # a ResponseLogProbs over the frozen copy
        self.adapters_of = adapters_of  # the policy's ResponseLogProbs (unwrapped), its lm a PeftModel
        self.logprob = logprob
        self.tables: dict[str, torch.Tensor] = {}  # split -> (pairs, 2) chosen/rejected

    @torch.no_grad()
    def compute(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.adapters_of is not None:
            with self.adapters_of.lm.disable_adapter():
                return pair_logprobs(self.adapters_of, batch, self.logprob)
        return pair_logprobs(self.model, batch, self.logprob)

    def __call__(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split in self.tables:
            rows = self.tables[split][batch["index"].cpu()].to(batch["chosen_ids"].device)
            return rows[:, 0], rows[:, 1]
        return self.compute(batch)

    def precompute(self, split: str, loader, autocast, num_pairs: int, desc: str) -> None:
        """Fill the table of ``split`` from every batch of ``loader`` (in this process, before training)."""
        from tqdm.auto import tqdm

        table = torch.full((num_pairs, 2), float("nan"), dtype=torch.float64)
        with autocast():
            for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
                chosen, rejected = self.compute(batch)
                table[batch["index"], 0], table[batch["index"], 1] = chosen.double().cpu(), rejected.double().cpu()
        self.tables[split] = table.float()


def batch_sums(policy: nn.Module, reference: Reference, batch: dict, split: str, args: DPOArgs,
               accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss with its graph, the detached sums of SUMS) of one micro-batch."""
    with accelerator.autocast():
        ref_chosen, ref_rejected = reference(batch, split)
        chosen, rejected = pair_logprobs(policy, batch, args.logprob)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen.float(), rejected.float(), ref_chosen.float(),
                                                        ref_rejected.float(), args.beta)
    sums = torch.stack([losses.detach().sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                        (chosen_rewards > rejected_rewards).sum(), losses.new_tensor(len(losses))]).double()
    return losses.sum(), sums


def means(sums: torch.Tensor, prefix: str) -> dict:
    """The logged numbers of summed SUMS: loss, rewards, margin, accuracy (means over pairs)."""
    loss, chosen, rejected, correct, pairs = sums.tolist()
    pairs = max(pairs, 1)
    return {f"{prefix}_loss": loss / pairs, f"{prefix}_chosen_reward": chosen / pairs,
            f"{prefix}_rejected_reward": rejected / pairs, f"{prefix}_reward_margin": (chosen - rejected) / pairs,
            f"{prefix}_reward_accuracy": correct / pairs}


# ---------------------------------------------------------------------------------------------------
# Set-up: every check first, then the first write
# ---------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    accelerator: Any
    model: Any  # the prepared ResponseLogProbs over the policy
    reference: Reference
    tokenizer: Any
    optimizer: Any
    train_sampler: Any
    train_loader: Any
    train_eval_loader: Any
    val_loader: Any
    data: Any  # train.preference_data.PreferenceData
    out: Path
    metrics: Any
    total_steps: int
    state: TrainState
    sample_prompt: str
    style: str
    lora: Any  # train.lora.LoRASettings or None

    def policy_lm(self):
        """The policy language model (a PeftModel with LoRA), unwrapped from DDP."""
        return self.accelerator.unwrap_model(self.model).lm


def check_args(args: DPOArgs) -> None:
    from gpt2_scratch.train.run import check_number

    for name in ("epochs", "batch_size", "grad_accum", "eval_freq", "eval_iter", "sample_tokens", "max_new_tokens",
                 "response_batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("max_steps", "max_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("save_every", "keep_checkpoints"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    check_number("lr", args.lr, above=0)
    check_number("weight_decay", args.weight_decay, minimum=0)
    check_number("max_grad_norm", args.max_grad_norm, minimum=0)
    check_number("beta", args.beta, above=0)


def load_model(args: DPOArgs):
    """The starting model (``convert.resolve.load_model``: folder, preset, Hub id), in train mode."""
    from gpt2_scratch.convert.resolve import load_model as resolve_model

    return resolve_model(args.model, models_dir=args.models_dir).train()


def set_up(args: DPOArgs) -> Setup:
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from gpt2_scratch.core.prompts import format_input
    from gpt2_scratch import get_tokenizer
    from gpt2_scratch.train import lora
    from gpt2_scratch.train.data import EpochBatchSampler, evaluation_sampler
    from gpt2_scratch.train.metrics import MetricsLog
    from gpt2_scratch.train.preference_data import PreferenceCollator, load_preference_records, prepare_preference_data
    from gpt2_scratch.train.run import (check_output, check_resume_args, clear_output, find_checkpoint, load_checkpoint,
                           make_accelerator, quiet_libraries, resolve_precision, write_args)

    # 1. Arguments and the output folder: nothing is written or deleted until every check has passed.
    quiet_libraries()
    check_args(args)
    resolve_precision(args)
    lora_settings = lora.settings(args)
    resuming = args.resume is not None
    out = check_output(args.out, resume=resuming, overwrite=args.overwrite,
                       inputs=[("--model", args.model), ("--data", args.data)])
    resume_from = find_checkpoint(args.resume, out / "checkpoints") if resuming else None
    if resuming:
        check_resume_args(out, args, MAY_CHANGE_ON_RESUME)

    # 2. The data (a bad record fails before the model loads), then the model.
    records = load_preference_records(args.data)
    tokenizer = get_tokenizer()
    set_seed(args.seed)
    model = load_model(args)
    style = args.prompt_style or getattr(model.config, "prompt_style", None) or "alpaca"
    context = model.config.max_position_embeddings
    max_length = min(args.max_length or context, context)
    data = prepare_preference_data(records, tokenizer, source=args.data, style=style, max_length=max_length,
                                   shuffle_split=args.shuffle_split, seed=args.seed)
    for name in ("max_new_tokens", "sample_tokens"):
        if getattr(args, name) >= context:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)} leaves no room for a prompt in the "
                             f"{context}-token context of {args.model}; pass at most {context - 1}")
    train_sampler = EpochBatchSampler(list(data.train["length"]), args.batch_size, shuffle=True, drop_last=True,
                                      seed=args.seed)
    if len(train_sampler) == 0:
        raise InputError(f"{args.data}: {len(data.train)} training pairs make no full batch of {args.batch_size}; "
                         "lower --batch-size")

    # 3. The policy and the reference.
    frozen_copy = None
    if lora_settings is None and not args.precompute_ref:
        frozen_copy = copy.deepcopy(model).eval().requires_grad_(False)
    policy = ResponseLogProbs(lora.wrap(model, lora_settings, base_model=lora.base_model_name(args.model)))
    policy.train()

    # 4. Only now: the processes, the output folder, the loop's objects.
    accelerator = make_accelerator(args.mixed_precision, args.batch_size)
    clear_output(out, overwrite=args.overwrite and not resuming, is_main_process=accelerator.is_main_process)
    accelerator.wait_for_everyone()

    collate = PreferenceCollator(allowed_max_length=max_length)
    train_loader = DataLoader(data.train, batch_sampler=train_sampler, collate_fn=collate)
    val_loader = DataLoader(data.validation, collate_fn=collate, batch_sampler=evaluation_sampler(
        list(data.validation["length"]), args.batch_size, eval_iter=args.eval_iter))
    train_eval_loader = DataLoader(data.train, collate_fn=collate, batch_sampler=evaluation_sampler(
        list(data.train["length"]), args.batch_size, eval_iter=args.eval_iter))

    if lora_settings is not None:
        reference = Reference(adapters_of=policy, logprob=args.logprob)
    elif frozen_copy is not None:
        reference = Reference(model=ResponseLogProbs(frozen_copy).to(accelerator.device), logprob=args.logprob)
    else:  # --precompute-ref: the policy before its first step is the reference
        reference = Reference(model=policy.to(accelerator.device), logprob=args.logprob)
    if args.precompute_ref:
        # Every process computes the whole table (the pairs are few); before any checkpoint is restored.
        policy.eval()
        for split, ds in (("train", data.train), ("validation", data.validation)):
            loader = DataLoader(ds, batch_size=args.batch_size, collate_fn=collate)
            reference.precompute(split, loader, accelerator.autocast, len(ds), f"reference log-probs ({split})")
        policy.train()
        reference.model = reference.adapters_of = None  # the tables hold everything now

    steps_per_epoch = math.ceil(len(train_sampler) / args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    prepared = accelerator.prepare(policy, optimizer, train_loader, val_loader, train_eval_loader)
    policy, optimizer, train_loader, val_loader, train_eval_loader = prepared
    if lora_settings is not None:
        reference.adapters_of = accelerator.unwrap_model(policy) if reference.adapters_of is not None else None

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
        trainable_n, total_n = lora.parameter_counts(policy)
        ref = ("precomputed" if args.precompute_ref else "the base with adapters disabled" if lora_settings
               else "a frozen copy")
        print(f"model {args.model}: {total_n:,} parameters ({trainable_n:,} trainable), context {context}; data "
              f"{args.data}: {len(data.train)} train / {len(data.validation)} validation / {len(data.test)} test "
              f"pairs; {total_steps} steps of {args.batch_size}x{args.grad_accum} pairs on "
              f"{accelerator.num_processes} process(es), {'fp32' if accelerator.mixed_precision == 'no' else 'bf16'}; "
              f"β {args.beta}, {args.logprob} log-probs, reference {ref}", flush=True)
        if lora_settings is not None:
            print(lora.describe(policy, lora_settings), flush=True)
    first_val = data.validation_records[0] if data.validation_records else data.test_records[0]
    return Setup(accelerator, policy, reference, tokenizer, optimizer, train_sampler, train_loader, train_eval_loader,
                 val_loader, data, out, metrics, total_steps, state, format_input(first_val, style), style,
                 lora_settings)


# ---------------------------------------------------------------------------------------------------
# Evaluation and the loop
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(setup: Setup, args: DPOArgs, loader, split: str, prefix: str) -> dict:
    """Loss, rewards, margin and accuracy over the first ``eval_iter`` batches of ``loader`` (all processes)."""
    accelerator, model = setup.accelerator, setup.model
    model.eval()
    totals = torch.zeros(len(SUMS), dtype=torch.float64, device=accelerator.device)
    for batch in islice(loader, args.eval_iter):
        totals += batch_sums(model, setup.reference, batch, split, args, accelerator)[1].to(totals.device)
    model.train()
    return means(accelerator.reduce(totals, reduction="sum").cpu(), prefix)  # host sync


def train_step(setup: Setup, args: DPOArgs, window: list[dict]) -> torch.Tensor:
    """One optimizer step over the micro-batches of ``window``; returns the SUMS of all processes."""
    accelerator, model = setup.accelerator, setup.model
    # Every window holds batch_size x len(window) pairs over all processes (drop_last): the mean loss per pair.
    n_pairs = args.batch_size * len(window)
    totals = torch.zeros(len(SUMS), dtype=torch.float64, device=accelerator.device)
    for i, batch in enumerate(window):
        with accelerator.no_sync(model) if i < len(window) - 1 else nullcontext():
            loss_sum, sums = batch_sums(model, setup.reference, batch, "train", args, accelerator)
            # DDP averages gradients over processes; scaling by their number turns that into a sum.
            accelerator.backward(loss_sum * accelerator.num_processes / n_pairs)
        totals += sums.to(totals.device)
    if args.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(totals, reduction="sum").cpu()  # host sync


def fit(setup: Setup, args: DPOArgs) -> tuple[TrainState, bool]:
    """Train until the epochs (or --max-steps) are done; returns (state, whether Ctrl-C stopped it)."""
    from tqdm.auto import tqdm

    from gpt2_scratch.train.run import StopRequest, check_loss, save_checkpoint
    from gpt2_scratch.train.sft import greedy_sample

    accelerator, state = setup.accelerator, setup.state
    main = accelerator.is_main_process
    checkpoint_root = setup.out / "checkpoints"
    running = torch.tensor(state.extra.get("running", [0.0] * len(SUMS)), dtype=torch.float64)

    def checkpoint() -> None:
        state.extra["running"] = running.tolist()
        save_checkpoint(accelerator, setup.model, checkpoint_root, state, keep=args.keep_checkpoints or None)

    if state.step == 0 and state.batches_done == 0:
        row = {"epoch": 0, "step": 0, **evaluate(setup, args, setup.train_eval_loader, "train", "train"),
               **evaluate(setup, args, setup.val_loader, "validation", "val"), "tokens_seen": 0, "initial": True}
        setup.metrics.log(row)
        if main:
            print(f"initial | loss train {row['train_loss']:.3f} val {row['val_loss']:.3f} | reward margin train "
                  f"{row['train_reward_margin']:.3f} val {row['val_reward_margin']:.3f}", flush=True)

    bar = tqdm(total=setup.total_steps, initial=state.step, desc="dpo", unit="step", disable=not main,
               dynamic_ncols=True)
    window_tokens, window_seconds = 0, 0.0

    def eval_and_log() -> None:
        nonlocal window_tokens, window_seconds, running
        row = {"epoch": min(state.epoch + 1, args.epochs), "step": state.step, **means(running, "train"),
               **evaluate(setup, args, setup.val_loader, "validation", "val"), "tokens_seen": state.tokens_seen,
               "tokens_per_sec": window_tokens / window_seconds if window_seconds else 0.0}
        setup.metrics.log(row)
        if main:
            bar.write(f"epoch {row['epoch']}/{args.epochs} | step {row['step']:>5}/{setup.total_steps} | loss train "
                      f"{row['train_loss']:.3f} val {row['val_loss']:.3f} | reward margin train "
                      f"{row['train_reward_margin']:.3f} val {row['val_reward_margin']:.3f} | accuracy train "
                      f"{row['train_reward_accuracy']:.2f} val {row['val_reward_accuracy']:.2f} | tokens "
                      f"{row['tokens_seen']:,} | {row['tokens_per_sec']:,.0f} tok/s")
        running = torch.zeros(len(SUMS), dtype=torch.float64)
        state.last_eval_step = state.step
        window_tokens, window_seconds = 0, 0.0

    done = state.step >= setup.total_steps
    with StopRequest() as stop:
        while state.epoch < args.epochs and not done:
            epoch = state.epoch
            setup.train_sampler.set_epoch(epoch)
            setup.train_loader.set_epoch(epoch)
            loader = (accelerator.skip_first_batches(setup.train_loader, state.batches_done) if state.batches_done
                      else setup.train_loader)
            batches = iter(loader)
            while True:
                tick = time.perf_counter()
                window = list(islice(batches, args.grad_accum))
                if not window:
                    break
                sums = train_step(setup, args, window)
                # chosen + rejected positions, padding included, all processes (the book counts chosen only)
                n_tokens = sum(b["chosen_ids"].numel() + b["rejected_ids"].numel() for b in window)
                n_tokens *= accelerator.num_processes
                running += sums
                state.step += 1
                state.batches_done += len(window)
                state.tokens_seen += n_tokens
                elapsed = time.perf_counter() - tick
                state.train_seconds += elapsed
                window_tokens += n_tokens
                window_seconds += elapsed
                step_loss = sums[0].item() / max(sums[-1].item(), 1)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}")
                check_loss(step_loss, state.step, checkpoint_root)
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
                    sample = greedy_sample(setup.policy_lm(), setup.tokenizer, setup.sample_prompt, args.sample_tokens)
                    bar.write(f"epoch {epoch + 1} sample: {sample}")
                    setup.metrics.log({"epoch": epoch + 1, "step": state.step, "sample": sample})
                accelerator.wait_for_everyone()
                state.epoch += 1
                state.batches_done = 0
                checkpoint()
    bar.close()
    if state.last_eval_step != state.step:
        eval_and_log()
    return state, False


# ---------------------------------------------------------------------------------------------------
# Finish: the outputs
# ---------------------------------------------------------------------------------------------------


PLOTS = {
    "loss": ({"train_loss": "training DPO loss (running mean)", "val_loss": "validation DPO loss"}, "DPO loss"),
    "rewards": ({"train_chosen_reward": "chosen, training", "train_rejected_reward": "rejected, training",
                 "val_chosen_reward": "chosen, validation", "val_rejected_reward": "rejected, validation"}, "Reward"),
    "margins": ({"train_reward_margin": "training", "val_reward_margin": "validation"}, "Reward margin"),
    "accuracy": ({"train_reward_accuracy": "training", "val_reward_accuracy": "validation"}, "Reward accuracy"),
}


def finish(setup: Setup, state: TrainState, args: DPOArgs) -> None:
    """The model at the top of OUT (and OUT/adapter with LoRA), the plots, the test responses, a push."""
    from gpt2_scratch.core.files import write_json_atomic
    from gpt2_scratch import generate_responses
    from gpt2_scratch.train import lora
    from gpt2_scratch.train.metrics import plot_curves
    from gpt2_scratch.train.run import save_model_into

    accelerator, out = setup.accelerator, setup.out
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = setup.policy_lm()
        model.eval()
        if setup.lora is None:
            save_model_into(out, model, setup.tokenizer, prompt_style=setup.style)
        else:
            model = lora.save_outputs(out, model, setup.tokenizer, setup.lora, prompt_style=setup.style,
                                      load_base=lambda: load_model(args))
        rows = setup.metrics.read()
        for stem, (series, ylabel) in PLOTS.items():
            plot_curves(rows, out, stem=stem, series=series, ylabel=ylabel)
        records = setup.data.test_records
        print(f"generating {len(records)} test responses (greedy, up to {args.max_new_tokens} new tokens)", flush=True)
        responses = generate_responses(model, setup.tokenizer, records, batch_size=args.response_batch_size,
                                       max_new_tokens=args.max_new_tokens, style=setup.style)
        write_json_atomic(out / "instruction-data-with-response.json",
                          [dict(r, model_response=resp) for r, resp in zip(records, responses)])
        print(f"done: {state.step} steps, {state.tokens_seen:,} tokens in {state.train_seconds / 60:.1f} min of "
              f"training; model, metrics, plots and responses in {out}", flush=True)
        if args.push_to_hub:
            from gpt2_scratch.train.publish import push_run

            push_run(out, args.push_to_hub)
    accelerator.wait_for_everyone()
    accelerator.end_training()
