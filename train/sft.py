"""Instruction finetuning (the book's chapter 7) with a hand-written Accelerate loop.

    accelerate launch train/sft.py [--model DIR|HF_ID|PRESET] [--random-init] [--data PATH|URL|HUB_ID]
        [--out OUT] [--epochs 2] [--batch-size 8] [--lr 5e-5] [--weight-decay 0.1] [--eval-freq 5]
        [--eval-iter 5] [--max-steps N] [--mask-prompt] [--prompt-style alpaca|phi3]
        [--mixed-precision bf16|no|auto] [--seed 123] [--save-every N] [--resume [PATH]] [--book-exact]
        [--sample N] [--split 0.85,0.1] [--lora [book]] [--compile] [--report-to tensorboard ...] ...
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
written (arguments, the output folder, the data, the model, the limits) and hands train/run.py's
``launch`` what the run is made of; ``SFTTask`` is what is SFT's own in the one loop (train/loop.py):
the loss of a batch (summed over its target tokens, from the model's ``label_logprobs``), what an
evaluation measures, the epoch-end sample and the outputs. The loop itself (accumulation normalised by
the window's target tokens on all processes, clipping, checkpoints, ``--resume``, Ctrl-C, the NaN
guard, trackers) is the same for DPO and the classifier. ``--book-exact`` runs the book's own loop
(train/book_exact.py) instead.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python train/sft.py ARGS` and `accelerate launch train/sft.py ARGS`
    from gpt2_scratch.core.cli import run_script

    run_script("sft")

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from gpt2_scratch.commands import ShapeOptions, preset_config, shape_options
from gpt2_scratch.configuration_gpt2_scratch import PRESETS
from gpt2_scratch.convert.resolve import load_model as resolve_model
from gpt2_scratch.core.args import arg, redefault
from gpt2_scratch.core.conversations import check_style, load_conversations
from gpt2_scratch.core.errors import InputError
from gpt2_scratch.core.files import write_json_atomic
from gpt2_scratch.core.prompts import CHAT_STYLE, format_input
from gpt2_scratch.core.records import BOOK_DATA_URL, parse_split
from gpt2_scratch.modeling_gpt2_scratch import GPT2ScratchForCausalLM
from gpt2_scratch.tokenizer import get_tokenizer
from gpt2_scratch.train import book_exact as book_loop
from gpt2_scratch.train import lora
from gpt2_scratch.train.data import (IGNORE_INDEX, EpochBatchSampler, InstructionCollator, evaluation_sampler,
                                     prepare_instruction_data)
from gpt2_scratch.train.lm_outputs import check_generation_limits, epoch_sample, save_language_model, write_test_responses
from gpt2_scratch.train.lora import LoRAOptions
from gpt2_scratch.train.loop import sums_over
from gpt2_scratch.train.metrics import plot_curves
from gpt2_scratch.train.options import (ConversationDataOptions, DataFilesOptions, GenerationOptions,
                                        InstructionDataOptions, ModelOptions, RunOptions)
from gpt2_scratch.train.run import launch, launch_own_loop, run_training, start
from gpt2_scratch.train.state import fingerprint
from gpt2_scratch.train.synthetic import exact_match_report, synthetic_records
from gpt2_scratch.train.task import Task, mean_loss

logger = logging.getLogger(__name__)


@dataclass
class SFTArgs(ShapeOptions, ModelOptions, InstructionDataOptions, ConversationDataOptions, DataFilesOptions, RunOptions,
              GenerationOptions, LoRAOptions):
    """Instruction-finetune a GPT-2 (the book's chapter 7) with Accelerate."""

    data: str = redefault(InstructionDataOptions, "data", BOOK_DATA_URL,
                          "instruction data: .json/.jsonl file, URL, Hub data set id (tatsu-lab/alpaca), or "
                          "'synthetic[:N]' (generated offline tasks)")
    too_long: Literal["truncate", "drop"] = arg("truncate", "what to do with examples longer than --max-length (a "
                                                            "conversation is cut after its last whole answer, or "
                                                            "dropped)")
    mask_prompt: bool | None = arg(None, "compute the loss on the response only (the book's exercise 7.2); for "
                                         "conversations on every assistant turn only (default: on with --prompt-style "
                                         "chat, off with the book's styles)")
    group_by_length: bool = arg(False, "batch examples of similar length together (less padding; the order "
                                       "still changes every epoch; evaluation regroups its same examples)")
    out: str = redefault(RunOptions, "out", "runs/sft")
    offline_demo: bool = arg(False, "the offline demo profile: a small random GPT-2 on synthetic tasks; "
                                    "options you give explicitly still win", resume_may_change=True)
    book_exact: bool = arg(False, "follow the book's gpt_instruction_finetuning.py step for step (one process, fp32; "
                                  "train/book_exact.py): its batches, evaluations and 50-token epoch-end sample, so "
                                  "the log equals the book's from the same weights; the LM head is untied")

    def with_explicit(self, explicit: set[str]) -> "SFTArgs":
        """Apply the --offline-demo profile to every option not given on the command line."""
        if self.book_exact and "sample_tokens" not in explicit:  # the book's sample length
            self = dataclasses.replace(self, sample_tokens=book_loop.BOOK_SAMPLE_TOKENS)
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


def run(args: SFTArgs) -> int:
    """set-up → the loop → finish; returns the exit code (130 / 143 when Ctrl-C / SIGTERM stopped it with a
    checkpoint saved)."""
    return run_training(args, set_up)


# ---------------------------------------------------------------------------------------------------
# Set-up: every check first, then the first write
# ---------------------------------------------------------------------------------------------------


def load_model(args: SFTArgs):
    """The model ``--model`` names (``convert.resolve.load_model``: folder, preset, Hub id); a preset with
    ``--random-init`` and shape overrides is built here."""
    overrides = shape_options(args)
    if overrides:
        if not (args.random_init and args.model in PRESETS):
            raise InputError("--n-layers/--emb-dim/--n-heads/--context-length need --random-init and a preset "
                             f"--model ({', '.join(PRESETS)})")
        return GPT2ScratchForCausalLM(preset_config(args.model, overrides, command=f"--model {args.model} "
                                                    "--random-init"))
    return resolve_model(args.model, random_init=args.random_init, models_dir=args.models_dir)


def load_instruction_records(spec: str, args: SFTArgs, flag: str = "--data") -> list[dict]:
    """The records ``spec`` names (the synthetic tasks, or any format core/conversations.py reads), checked
    against the prompt style."""
    records = synthetic_records(spec, args.seed)
    if records is None:
        records = load_conversations(spec, data_format=args.data_format, columns=args.columns, flag=flag)
    check_style(records, args.prompt_style, spec)
    return records


def check_learnable(data, args: SFTArgs) -> None:
    """With --mask-prompt only response tokens are targets: an example cut inside its prompt teaches nothing
    but <|endoftext|>. None left to learn from is an error before training; some, a warning with the count."""
    if not args.mask_prompt:
        return
    lengths, prompts = data.train["length"], data.train["prompt_length"]
    empty = sum(1 for n, p in zip(lengths, prompts) if n <= p)
    if empty == len(lengths):
        raise InputError(f"{args.data}: with --mask-prompt every training example's prompt fills its "
                         f"{max(lengths)}-token budget, so no response token is left to learn from (only "
                         "<|endoftext|>); raise --max-length, use a model with a longer context, or drop --mask-prompt")
    if empty:
        logger.warning("warning: %d of %d training examples keep no response token after truncation (with "
                       "--mask-prompt they teach only <|endoftext|>)", empty, len(lengths))


def check_answers(train_records: list[dict], source: str) -> None:
    """A record whose output is empty or only whitespace teaches the model to end its answer before it starts
    (<|endoftext|> right after the response header). All of them is an error before training; some, a warning
    with the count."""
    blank = sum(1 for record in train_records if not record["output"].strip())
    if blank == len(train_records):
        raise InputError(f"{source}: every training record's 'output' is empty or whitespace, so there is no answer "
                         "to learn (only <|endoftext|>); give records whose 'output' holds the answer")
    if blank:
        logger.warning("warning: %d of %d training records have an empty or whitespace-only 'output' (they teach "
                       "the model to answer with nothing)", blank, len(train_records))


def set_up(args: SFTArgs):
    """Every check, the data and the model, then ``launch``: (Run, SFTTask). ``--book-exact`` chooses the
    book's loop (train/book_exact.py) as the run's ``fit`` and launches only what it uses."""
    from accelerate.utils import set_seed  # deferred: accelerate is heavy and only training needs it

    # 1. Arguments and the output folder: nothing is written or deleted until every check has passed.
    if args.mask_prompt is None:  # conversations learn the assistant's turns only; the book's loss covers all
        args.mask_prompt = args.prompt_style == CHAT_STYLE
    if args.book_exact:
        book_loop.check_args(args)
    extra = args.held_out_inputs()  # --val-data, --test-data
    started = start(args, inputs=[("--model", args.model), ("--data", args.data), *extra])
    lora_settings = lora.settings(args)  # None: full finetuning
    fractions = parse_split(args.split)

    # 2. The data (seconds: a bad record fails before the model loads), then the model.
    records = load_instruction_records(args.data, args)
    held_out = {flag: load_instruction_records(value, args, flag) for flag, value in extra}
    data_sha256 = fingerprint(records if not held_out else [records, *held_out.values()])
    started.check_data(data_sha256, args.data_described(args.data))
    tokenizer = get_tokenizer()
    set_seed(args.seed)  # the same random init on every process
    model = load_model(args)
    model = lora.wrap(model, lora_settings, base_model=lora.base_model_name(args.model))
    model.train()
    context = model.config.max_position_embeddings
    max_length = min(args.max_length or context, context)
    data = prepare_instruction_data(records, tokenizer, source=args.data, style=args.prompt_style,
                                    max_length=max_length, too_long=args.too_long, shuffle_split=args.shuffle_split,
                                    seed=args.seed, fractions=fractions, sample=args.sample,
                                    validation_records=held_out.get("--val-data"),
                                    test_records=held_out.get("--test-data"))

    # 3. The limits, checked now rather than after hours of training.
    check_generation_limits(args, context, args.model)
    check_answers(data.train_records, args.data)
    check_learnable(data, args)
    train_sampler = EpochBatchSampler(list(data.train["length"]), args.batch_size, shuffle=True, drop_last=True,
                                      group_by_length=args.group_by_length, seed=args.seed)
    if len(train_sampler) == 0:
        raise InputError(f"{args.data}: {len(data.train)} training examples make no full batch of "
                         f"{args.batch_size}; lower --batch-size")

    # 4. Only now: the processes, the output folder, the loop's objects.
    evaluation = {}
    if args.book_exact:  # the book's model (its own LM head, no dropout) and loop, on examples it would not cut
        book_loop.set_up(model, data, context)
        run = launch_own_loop(started, model=model, batches_per_epoch=len(train_sampler), data_sha256=data_sha256,
                              fit=book_loop.fit_book_exact)
    else:
        collate = InstructionCollator(allowed_max_length=max_length, mask_prompt=args.mask_prompt)
        train_ds = data.train.select_columns(example_columns(data.train))
        run, evaluation = launch(started, model=model, train_dataset=train_ds, train_sampler=train_sampler,
                                 collate=collate, eval_loaders=evaluation_loaders(args, data, collate),
                                 data_sha256=data_sha256)
    if run.accelerator.is_main_process:
        print_header(run, args, model, data, lora_settings)
    first_val = data.validation_records[0]  # never empty: parse_split and check_validation_left saw to it
    return run, SFTTask(args, tokenizer, data, evaluation.get("validation"), evaluation.get("train"),
                        format_input(first_val, args.prompt_style), lora_settings)


def example_columns(split) -> list[str]:
    """What the collate reads of an example (conversations add their assistant mask)."""
    return ["input_ids", "prompt_length", *(["assistant_mask"] if "assistant_mask" in split.column_names else [])]


def evaluation_loaders(args: SFTArgs, data, collate) -> dict:
    """Evaluation reads the first eval_iter batches: of the validation split, and (for the initial losses) of
    the training split, both in file order."""
    return {name: DataLoader(split.select_columns(example_columns(split)), collate_fn=collate, batch_sampler=evaluation_sampler(
        list(split["length"]), args.batch_size, eval_iter=args.eval_iter, group_by_length=args.group_by_length))
        for name, split in (("validation", data.validation), ("train", data.train))}


def print_header(run, args: SFTArgs, model, data, lora_settings) -> None:
    """The run's first line: the model, the data, the steps, the precision."""
    print(f"model {args.model}{' (random init)' if args.random_init else ''}: {model_parameters(model):,} "
          f"parameters, context {model.config.max_position_embeddings}; data {args.data}: {len(data.train)} train / "
          f"{len(data.validation)} validation / {len(data.test)} test; {run.steps_line('examples')}", flush=True)
    if lora_settings is not None:
        print(lora.describe(model, lora_settings), flush=True)


def model_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# The task: what is SFT's own in the one loop
# ---------------------------------------------------------------------------------------------------


@dataclass
class SFTTask(Task):
    """Next-token cross-entropy on the targets the book's collate makes (train/loop.py runs it)."""

    args: SFTArgs
    tokenizer: Any
    data: Any  # train.data.InstructionData
    val_loader: Any  # None with --book-exact (its loop makes the book's loaders)
    train_eval_loader: Any  # the first eval_iter training batches in file order: the initial train loss
    sample_prompt: str
    lora_settings: Any
    name: str = "sft"
    units_seen_key: str = "target_tokens_seen"

    def units(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy summed over the batch's targets, and [that sum, the target count].

        ``return_logits=False``: the model projects only the positions that have a target onto the vocabulary
        (padding, and with --mask-prompt the prompt, cost no [tokens, E] x [E, 50257] product);
        ``num_items_in_batch=1`` keeps the sum, which the loop divides by the window's target count.
        """
        out = model(batch["input_ids"], shift_labels=batch["labels"], use_cache=False, return_logits=False,
                    num_items_in_batch=1)
        count = torch.tensor(float(out.label_logprobs.numel()), dtype=torch.float64, device=out.loss.device)
        return out.loss, torch.stack([out.loss.detach().double(), count])

    def loss_over(self, run, loader) -> float:
        return mean_loss(sums_over(run, loader, self.args.eval_iter, self.batch_sums))

    def initial(self, run) -> dict:
        """The losses before any training, as the book prints them: the first eval_iter batches of each split."""
        return {"train_loss": self.loss_over(run, self.train_eval_loader), "val_loss": self.loss_over(run, self.val_loader)}

    def evaluate(self, run, running: torch.Tensor) -> dict:
        return {"train_loss_running": mean_loss(running), "val_loss": self.loss_over(run, self.val_loader)}

    def eval_line(self, run, row: dict) -> str:
        if row.get("initial"):
            return f"initial losses | train {row['train_loss']:.3f} | val {row['val_loss']:.3f}"
        return (f"epoch {row['epoch']}/{self.args.epochs} | step {row['step']:>5}/{run.total_steps} | train (running) "
                f"{row['train_loss_running']:.3f} | val {row['val_loss']:.3f} | lr {row['lr']:.2e} | tokens "
                f"{row['tokens_seen']:,} | {row['tokens_per_sec']:,.0f} tok/s")

    def end_of_epoch(self, run, epoch: int):
        return epoch_sample(run, epoch, self.tokenizer, self.sample_prompt, self.args.sample_tokens)

    def finish(self, run) -> None:
        """The model at the top of OUT, the loss plot, the test responses (and the demo's exact match)."""
        args, out, state = self.args, run.out, run.state
        model = save_language_model(run, run.unwrapped(), self.tokenizer, prompt_style=args.prompt_style,
                                    lora_settings=self.lora_settings, load_base=lora.base_reloader(load_model, args))
        if args.book_exact:
            book_loop.plot_book_curves(run.metrics.read(), out)
        else:
            rows = [{**r, "train_loss_running": r.get("train_loss_running", r.get("train_loss"))}
                    for r in run.metrics.read()]
            plot_curves(rows, out, series={"train_loss_running": "training loss (running mean of steps)",
                                           "val_loss": "validation loss"})
        records = self.data.test_records
        responses = write_test_responses(run, model, self.tokenizer, records, args.prompt_style)
        if records and all("task" in r for r in records):
            report = exact_match_report(records, responses)
            write_json_atomic(out / "exact_match.json", {k: {"correct": c, "total": n, "accuracy": c / n}
                                                         for k, (c, n) in report.items()})
            per_task = ", ".join(f"{k} {c}/{n}" for k, (c, n) in report.items() if k != "all")
            c, n = report["all"]
            print(f"held-out exact match: {c}/{n} = {100 * c / n:.1f}% ({per_task})", flush=True)
        print(f"done: {state.step} steps, {state.tokens_seen:,} tokens in {state.train_seconds / 60:.1f} min of "
              f"training; model, metrics, loss.png/pdf and responses in {out}", flush=True)
