"""Direct Preference Optimization (the book's bonus notebook to chapter 7) with a hand-written Accelerate loop.

    accelerate launch train/dpo.py [--model runs/sft] [--data PATH|URL] [--val-data PATH|URL]
        [--test-data PATH|URL] [--columns SRC=DST,...] [--out runs/dpo] [--beta 0.1]
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
Alpaca prompt. The data options are SFT's: ``--val-data`` / ``--test-data`` are the validation / test pairs
instead of a share of ``--data`` (which then trains too; ``--resume`` checks all three files' contents),
and ``--columns SRC=DST,...`` renames the records' fields first (a Hugging Face data set's
``question``/``response_chosen``/``response_rejected``). ``--precompute-ref`` computes the reference
log-probabilities once before training, so no second model is held (half the weights in memory, one
forward less per step). With ``--lora`` the policy is the starting model plus adapters (train/lora.py)
and the reference is the same model with the adapters disabled: no copy at all.

Logged per evaluation (metrics.jsonl) and plotted: the DPO loss, the chosen and rejected rewards
(``r`` above, the book's definition; TRL logs them times β), the reward margin (chosen − rejected)
and the reward accuracy (pairs whose chosen reward is higher); validation over ``--eval-iter``
batches, training as the running mean of the steps since the last evaluation. What a run leaves in
OUT is what train/sft.py leaves (the model at the top, args.json, metrics.jsonl, loss/rewards/
margins/accuracy plots, the test split with ``model_response``, checkpoints/, and adapter/ with
LoRA), and it resumes the same way: DPO runs in the one training loop (train/loop.py) as ``DPOTask``.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python train/dpo.py ARGS` and `accelerate launch train/dpo.py ARGS`
    from gpt2_scratch.core.cli import run_script

    run_script("dpo")

import copy
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from gpt2_scratch.tokenizer import get_tokenizer
from gpt2_scratch.convert.resolve import load_model as resolve_model
from gpt2_scratch.core.args import arg, redefault
from gpt2_scratch.core.errors import InputError
from gpt2_scratch.core.conversations import check_style
from gpt2_scratch.core.prompts import format_input
from gpt2_scratch.core.records import BOOK_PREFERENCE_DATA_URL, parse_split
from gpt2_scratch.train import lora
from gpt2_scratch.train.data import IGNORE_INDEX, EpochBatchSampler, evaluation_sampler
from gpt2_scratch.train.lm_outputs import check_generation_limits, epoch_sample, save_language_model, write_test_responses
from gpt2_scratch.train.lora import LoRAOptions
from gpt2_scratch.train.loop import sums_over
from gpt2_scratch.train.metrics import plot_curves
from gpt2_scratch.train.options import (DataFilesOptions, GenerationOptions, InstructionDataOptions, ModelOptions,
                                        RunOptions)
from gpt2_scratch.train.preference_data import PreferenceCollator, load_preference_records, prepare_preference_data
from gpt2_scratch.train.run import launch, run_training, start
from gpt2_scratch.train.sharded import forward_dtype
from gpt2_scratch.train.state import fingerprint
from gpt2_scratch.train.task import Task

logger = logging.getLogger(__name__)

# The per-pair quantities summed over a step or an evaluation, in this order (the loop reads the first two).
SUMS = ("loss", "pairs", "chosen_reward", "rejected_reward", "correct")


@dataclass
class DPOArgs(ModelOptions, InstructionDataOptions, DataFilesOptions, RunOptions, GenerationOptions, LoRAOptions):
    """Preference-tune an instruction model with DPO (the book's bonus notebook to chapter 7) with Accelerate."""

    model: str = redefault(ModelOptions, "model", "runs/sft", "the model to start from (policy and reference): a "
                                                              "model folder such as train/sft.py's OUT, a Hub repo id "
                                                              "or a preset")
    data: str = redefault(InstructionDataOptions, "data", BOOK_PREFERENCE_DATA_URL,
                          "preference data (.json/.jsonl, URL, Hub id) with instruction, input (optional), chosen, "
                          "rejected (default: the book's, = shared/data/instruction-data-with-preference.json)")
    columns: str | None = redefault(DataFilesOptions, "columns", None,
                                    "rename the records' fields first: SRC=DST pairs, DST one of instruction, input, "
                                    "chosen, rejected, prompt; e.g. question=instruction,response_chosen=chosen,"
                                    "response_rejected=rejected")
    prompt_style: Literal["alpaca", "phi3", "chat"] | None = redefault(
        InstructionDataOptions, "prompt_style", None, "prompt template (default: the one the model was trained "
                                                      "with, else alpaca)")
    max_length: int | None = redefault(InstructionDataOptions, "max_length", None,
                                       "drop pairs longer than this many tokens (default: the model's context)")
    out: str = redefault(RunOptions, "out", "runs/dpo")
    epochs: int = redefault(RunOptions, "epochs", 1)
    batch_size: int = redefault(RunOptions, "batch_size", 8, "global batch size in pairs (over all processes)")
    lr: float = redefault(RunOptions, "lr", 5e-6)
    weight_decay: float = redefault(RunOptions, "weight_decay", 0.01)
    beta: float = arg(0.1, "DPO's β: how strongly the policy is held to the reference", above=0)
    logprob: Literal["mean", "sum"] = arg("mean", "a response's log-probability: mean over its tokens (the book) "
                                                  "or sum (the DPO paper, TRL)")
    precompute_ref: bool = arg(False, "compute the reference log-probs once before training instead of keeping a "
                                      "frozen copy of the model (less memory, fewer forward passes)")


def run(args: DPOArgs) -> int:
    """set-up → the loop → finish; returns the exit code (130 / 143 when Ctrl-C / SIGTERM stopped it with a
    checkpoint saved)."""
    return run_training(args, set_up)


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


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of its targets and their count, from the model's one loss
    path (``label_logprobs``: only positions with a target are projected onto the vocabulary). ``model`` is
    ours, a peft model of it, or either wrapped by DDP: the call goes through its forward."""
    token_logps = model(input_ids, shift_labels=labels, use_cache=False, return_logits=False).label_logprobs  # (S,)
    supervised = labels != IGNORE_INDEX  # (N, T)
    rows = supervised.nonzero()[:, 0]  # the sequence of each supervised position
    sums = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=labels.device).index_add(0, rows, token_logps)
    return sums, supervised.sum(-1)


def pair_logprobs(model: nn.Module, batch: dict, logprob: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs [B] of a batch, both in one forward pass."""
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # (2B, T)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    sums, counts = sequence_logprobs(model, ids, labels)
    logps = sums / counts.clamp(min=1) if logprob == "mean" else sums
    return logps.chunk(2)


class Reference:
    """The reference log-probs of a batch: from a frozen copy of the starting model, from the policy with its
    LoRA adapters disabled, or from a table computed once before training (``--precompute-ref``)."""

    def __init__(self, *, model: nn.Module | None = None, adapters_of: nn.Module | None = None,
                 logprob: str = "mean"):
        self.model = model  # the frozen copy
        self.adapters_of = adapters_of  # the policy (unwrapped), a PeftModel
        self.logprob = logprob
        self.tables: dict[str, torch.Tensor] = {}  # split -> (pairs, 2) chosen/rejected

    @torch.no_grad()
    def compute(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.adapters_of is not None:
            with self.adapters_of.disable_adapter():
                return pair_logprobs(self.adapters_of, batch, self.logprob)
        return pair_logprobs(self.model, batch, self.logprob)

    def __call__(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split in self.tables:
            rows = self.tables[split][batch["index"].cpu()].to(batch["chosen_ids"].device)
            return rows[:, 0], rows[:, 1]
        return self.compute(batch)

    def precompute(self, split: str, loader, accelerator, num_pairs: int, desc: str) -> None:
        """Fill the table of ``split`` from every batch of ``loader`` (in this process, before training)."""
        from tqdm.auto import tqdm  # deferred: tqdm.auto probes for notebooks at import

        table = torch.full((num_pairs, 2), float("nan"), dtype=torch.float64)
        with accelerator.autocast():
            for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                chosen, rejected = self.compute(batch)
                table[batch["index"], 0], table[batch["index"], 1] = chosen.double().cpu(), rejected.double().cpu()
        self.tables[split] = table.float()


def frozen_reference(frozen_copy: nn.Module, policy: nn.Module, device) -> nn.Module:
    """The frozen copy on ``device``, computing as the policy does: whole on each process (it is never trained,
    so never sharded with the policy), and with FSDP's mixed precision in the policy's weight dtype (FSDP2 gathers
    the policy's weights in bf16: an fp32 copy would give other log-probs, and rewards that are not 0 at step 0)."""
    dtype = forward_dtype(policy)
    return frozen_copy.to(device) if dtype is None else frozen_copy.to(device, dtype)


def means(sums: torch.Tensor, prefix: str) -> dict:
    """The logged numbers of summed SUMS: loss, rewards, margin, accuracy (means over pairs)."""
    loss, pairs, chosen, rejected, correct = sums.tolist()
    pairs = max(pairs, 1)
    return {f"{prefix}_loss": loss / pairs, f"{prefix}_chosen_reward": chosen / pairs,
            f"{prefix}_rejected_reward": rejected / pairs, f"{prefix}_reward_margin": (chosen - rejected) / pairs,
            f"{prefix}_reward_accuracy": correct / pairs}


# ---------------------------------------------------------------------------------------------------
# Set-up: every check first, then the first write
# ---------------------------------------------------------------------------------------------------


def load_model(args: DPOArgs):
    """The starting model (``convert.resolve.load_model``: folder, preset, Hub id), in train mode."""
    return resolve_model(args.model, random_init=args.random_init, models_dir=args.models_dir).train()


def check_learnable(data, args: DPOArgs) -> None:
    """A pair whose chosen and rejected answers are the same tokens has no gradient (its loss stays at log 2):
    none left to learn from is an error before training; some, a warning with the count."""
    same = sum(1 for c, r in zip(data.train["chosen_ids"], data.train["rejected_ids"]) if c == r)
    if same == len(data.train):
        raise InputError(f"{args.data}: every training pair has the same chosen and rejected answer, so DPO has "
                         "nothing to learn (its loss stays at log 2 = 0.693); give pairs whose answers differ")
    if same:
        logger.warning("warning: %d of %d training pairs have the same chosen and rejected answer (they teach "
                       "nothing)", same, len(data.train))


def set_up(args: DPOArgs):
    """Every check, the data, the policy and its reference, then ``launch``: (Run, DPOTask)."""
    from accelerate.utils import set_seed  # deferred: accelerate is heavy and only training needs it

    # 1. Arguments and the output folder: nothing is written or deleted until every check has passed.
    extra = args.held_out_inputs()  # --val-data, --test-data
    started = start(args, inputs=[("--model", args.model), ("--data", args.data), *extra])
    lora_settings = lora.settings(args)
    fractions = parse_split(args.split)

    # 2. The data (a bad record fails before the model loads), then the model.
    records = load_preference_records(args.data, columns=args.columns)
    held_out = {flag: load_preference_records(value, columns=args.columns, flag=flag) for flag, value in extra}
    data_sha256 = fingerprint(records if not held_out else [records, *held_out.values()])  # as sft.py's
    started.check_data(data_sha256, args.data_described(args.data))
    tokenizer = get_tokenizer()
    set_seed(args.seed)
    model = load_model(args)
    style = args.prompt_style or getattr(model.config, "prompt_style", None) or "alpaca"
    for source, part in ((args.data, records), *((value, held_out[flag]) for flag, value in extra)):
        check_style(part, style, source)  # a prompt of several exchanges needs the chat style
    context = model.config.max_position_embeddings
    max_length = min(args.max_length or context, context)
    data = prepare_preference_data(records, tokenizer, source=args.data, style=style, max_length=max_length,
                                   shuffle_split=args.shuffle_split, seed=args.seed, fractions=fractions,
                                   sample=args.sample, validation_records=held_out.get("--val-data"),
                                   test_records=held_out.get("--test-data"))
    check_generation_limits(args, context, args.model)
    check_learnable(data, args)
    train_sampler = EpochBatchSampler(list(data.train["length"]), args.batch_size, shuffle=True, drop_last=True,
                                      seed=args.seed)
    if len(train_sampler) == 0:
        raise InputError(f"{args.data}: {len(data.train)} training pairs make no full batch of {args.batch_size}; "
                         "lower --batch-size")

    # 3. The policy and the reference.
    frozen_copy = None
    if lora_settings is None and not args.precompute_ref:
        frozen_copy = copy.deepcopy(model).eval().requires_grad_(False)
    policy = lora.wrap(model, lora_settings, base_model=lora.base_model_name(args.model))
    policy.train()
    collate = PreferenceCollator(allowed_max_length=max_length)
    reference = Reference(logprob=args.logprob)

    def precompute_reference(accelerator) -> None:
        """--precompute-ref: the policy before its first step is the reference; every process computes the
        whole table (the pairs are few), before a checkpoint is restored into the policy."""
        reference.model = policy.to(accelerator.device)
        policy.eval()
        for split, ds in (("train", data.train), ("validation", data.validation)):
            loader = DataLoader(ds, batch_size=args.batch_size, collate_fn=collate)
            reference.precompute(split, loader, accelerator, len(ds), f"reference log-probs ({split})")
        policy.train()
        reference.model = None  # the tables hold everything now

    # 4. Only now: the processes, the output folder, the loop's objects.
    evaluation = {name: DataLoader(ds, collate_fn=collate, batch_sampler=evaluation_sampler(
        list(ds["length"]), args.batch_size, eval_iter=args.eval_iter))
        for name, ds in (("validation", data.validation), ("train", data.train))}
    run, evaluation = launch(started, model=policy, train_dataset=data.train, train_sampler=train_sampler,
                             collate=collate, eval_loaders=evaluation, data_sha256=data_sha256,
                             before_prepare=precompute_reference if args.precompute_ref else None)
    if lora_settings is not None and not args.precompute_ref:
        reference.adapters_of = run.unwrapped()
    elif frozen_copy is not None:
        reference.model = frozen_reference(frozen_copy, run.model, run.accelerator.device)
    if run.accelerator.is_main_process:
        print_header(run, args, policy, context, data, lora_settings)
    first_val = data.validation_records[0]  # never empty: parse_split and check_validation_left saw to it
    task = DPOTask(args, tokenizer, data, reference, evaluation["validation"], evaluation["train"],
                   format_input(first_val, style), style, lora_settings)
    return run, task


# ---------------------------------------------------------------------------------------------------
# The task: what is DPO's own in the one loop
# ---------------------------------------------------------------------------------------------------


def print_header(run, args: DPOArgs, policy, context: int, data, lora_settings) -> None:
    """The run's first line: the model, the pairs, the steps, the precision, the reference."""
    trainable_n, total_n = lora.parameter_counts(policy)
    ref = ("precomputed" if args.precompute_ref else "the base with adapters disabled" if lora_settings
           else "a frozen copy")
    print(f"model {args.model}: {total_n:,} parameters ({trainable_n:,} trainable), context {context}; data "
          f"{args.data}: {len(data.train)} train / "
          f"{len(data.validation)} validation / {len(data.test)} test pairs; {run.steps_line('pairs')}; β {args.beta}, "
          f"{args.logprob} log-probs, reference {ref}", flush=True)
    if lora_settings is not None:
        print(lora.describe(policy, lora_settings), flush=True)


@dataclass
class DPOTask(Task):
    """The DPO loss of preference pairs against a reference (train/loop.py runs it)."""

    args: DPOArgs
    tokenizer: Any
    data: Any  # train.preference_data.PreferenceData
    reference: Reference
    val_loader: Any
    train_eval_loader: Any
    sample_prompt: str
    style: str
    lora_settings: Any
    name: str = "dpo"
    units_seen_key: str = "pairs_seen"

    def units(self, batch: dict) -> int:
        return batch["chosen_ids"].shape[0]

    def tokens(self, batch: dict) -> int:
        # chosen + rejected positions, padding included (the book counts chosen only)
        return batch["chosen_ids"].numel() + batch["rejected_ids"].numel()

    def pair_sums(self, model, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss with its graph, the detached SUMS) of one micro-batch of ``split``."""
        ref_chosen, ref_rejected = self.reference(batch, split)
        chosen, rejected = pair_logprobs(model, batch, self.args.logprob)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen.float(), rejected.float(), ref_chosen.float(),
                                                            ref_rejected.float(), self.args.beta)
        sums = torch.stack([losses.detach().sum(), losses.new_tensor(len(losses)), chosen_rewards.sum(),
                            rejected_rewards.sum(), (chosen_rewards > rejected_rewards).sum()]).double()
        return losses.sum(), sums

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pair_sums(model, batch, "train")

    def measure(self, run, loader, split: str, prefix: str) -> dict:
        return means(sums_over(run, loader, self.args.eval_iter, lambda m, b: self.pair_sums(m, b, split)[1]), prefix)

    def initial(self, run) -> dict:
        return {**self.measure(run, self.train_eval_loader, "train", "train"),
                **self.measure(run, self.val_loader, "validation", "val")}

    def evaluate(self, run, running: torch.Tensor) -> dict:
        return {**means(running, "train"), **self.measure(run, self.val_loader, "validation", "val")}

    def eval_line(self, run, row: dict) -> str:
        if row.get("initial"):
            return (f"initial | loss train {row['train_loss']:.3f} val {row['val_loss']:.3f} | reward margin train "
                    f"{row['train_reward_margin']:.3f} val {row['val_reward_margin']:.3f}")
        return (f"epoch {row['epoch']}/{self.args.epochs} | step {row['step']:>5}/{run.total_steps} | loss train "
                f"{row['train_loss']:.3f} val {row['val_loss']:.3f} | reward margin train "
                f"{row['train_reward_margin']:.3f} val {row['val_reward_margin']:.3f} | accuracy train "
                f"{row['train_reward_accuracy']:.2f} val {row['val_reward_accuracy']:.2f} | tokens "
                f"{row['tokens_seen']:,} | {row['tokens_per_sec']:,.0f} tok/s")

    def end_of_epoch(self, run, epoch: int):
        return epoch_sample(run, epoch, self.tokenizer, self.sample_prompt, self.args.sample_tokens)

    def finish(self, run) -> None:
        """The model at the top of OUT (and OUT/adapter with LoRA), the plots, the test responses."""
        model = save_language_model(run, run.unwrapped(), self.tokenizer, prompt_style=self.style,
                                    lora_settings=self.lora_settings,
                                    load_base=lora.base_reloader(load_model, self.args))
        rows = run.metrics.read()
        for stem, (series, ylabel) in PLOTS.items():
            plot_curves(rows, run.out, stem=stem, series=series, ylabel=ylabel)
        write_test_responses(run, model, self.tokenizer, self.data.test_records, self.style)
        state = run.state
        print(f"done: {state.step} steps, {state.tokens_seen:,} tokens in {state.train_seconds / 60:.1f} min of "
              f"training; model, metrics, plots and responses in {run.out}", flush=True)


PLOTS = {
    "loss": ({"train_loss": "training DPO loss (running mean)", "val_loss": "validation DPO loss"}, "DPO loss"),
    "rewards": ({"train_chosen_reward": "chosen, training", "train_rejected_reward": "rejected, training",
                 "val_chosen_reward": "chosen, validation", "val_rejected_reward": "rejected, validation"}, "Reward"),
    "margins": ({"train_reward_margin": "training", "val_reward_margin": "validation"}, "Reward margin"),
    "accuracy": ({"train_reward_accuracy": "training", "val_reward_accuracy": "validation"}, "Reward accuracy"),
}
