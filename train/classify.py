"""Finetune GPT-2 as a spam classifier (the book's chapter 6) with a hand-written Accelerate loop.

    accelerate launch train/classify.py [--model DIR|PRESET|HF_ID] [--random-init] [--data PATH|URL]
        [--out OUT] [--epochs 5] [--batch-size 8] [--lr 5e-5] [--max-steps N] [--resume [PATH]]
        [--trainable last-block|last-N|all] [--pad-to-context] [--seed 123] [--mixed-precision bf16|no|auto]
        [--push-to-hub USER/NAME] ...
    python train/classify.py ...            # the same, one process (= gpt2-scratch classify ...)

Defaults reproduce the chapter: gpt2-small with OpenAI's weights; the SMS Spam Collection (downloaded
from UCI, or a local ``label<TAB>text`` file) balanced to 747/747 by undersampling ham with seed 123,
shuffled and split 70/10/20 (1045/149/300); every message padded with <|endoftext|> to the longest
training message (validation/test truncated to it); a new ``score`` head (emb_dim → 2); everything
frozen except the last transformer block, the final LayerNorm and the head; AdamW lr 5e-5, weight
decay 0.1, batch 8, 5 epochs; train/validation loss every 50 steps over 5 batches; accuracy after
every epoch (5 batches of each split, as the book; plus test), and on the full splits at the end. The
book's training-loss estimate draws its few shuffled training batches anew for each evaluation; here
they come from (seed, which estimate), so a resumed run draws the same ones.

One difference, on purpose: the book reads the logits at position -1, which for every message shorter
than the longest is a padding token; ``GPT2ScratchForSequenceClassification`` reads the last *real*
token (from the attention mask), so predictions do not depend on how much padding a batch has.

It runs in the one training loop (train/loop.py) as ``ClassifyTask``, so it has everything SFT has:
gradient accumulation, checkpoints and ``--resume`` (bit-identical to an uninterrupted run), Ctrl-C, the
divergence guard, trackers. What a run leaves in OUT (the same layout as train/sft.py, so ``gpt2-scratch
push`` and ``predict`` take OUT directly):

    config.json (id2label/label2id) model.safetensors tokenizer files modeling code   the classifier
    args.json                 the arguments of the run
    metrics.jsonl             one JSON object per evaluation, per epoch, and the final accuracies
    loss.png loss.pdf         train/validation loss over steps (examples and tokens seen)
    accuracy.png accuracy.pdf train/validation accuracy after each epoch
    checkpoints/step-N/       as train/sft.py's (each epoch, every --save-every steps, on Ctrl-C)
"""

from __future__ import annotations

if __name__ == "__main__":  # `python train/classify.py ARGS` and `accelerate launch train/classify.py ARGS`
    from gpt2_scratch.core.cli import run_script

    run_script("classify")

import copy
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from gpt2_scratch.convert.resolve import load_model
from gpt2_scratch.core.args import arg, redefault
from gpt2_scratch.core.download import is_url
from gpt2_scratch.core.errors import InputError
from gpt2_scratch.model_dir import is_classifier_config, is_our_model_dir, load_model_dir, read_config
from gpt2_scratch.modeling_gpt2_scratch import GPT2ScratchForSequenceClassification
from gpt2_scratch.tokenizer import get_encoding
from gpt2_scratch.train.data import EpochBatchSampler
from gpt2_scratch.train.loop import sums_over
from gpt2_scratch.train.metrics import plot_curves
from gpt2_scratch.train.options import ModelOptions, RunOptions
from gpt2_scratch.train.run import launch, run_training, start
from gpt2_scratch.train.spam_data import (DEFAULT_LABELS, SPAM_BACKUP_URL, SPAM_URL, SpamDataset, fetch_spam_data,
                                          prepare_splits)
from gpt2_scratch.train.state import fingerprint
from gpt2_scratch.train.task import Task

logger = logging.getLogger(__name__)

_TRAINABLE = re.compile(r"^(last-block|all|last-(\d+))$")
# The training-loss estimates and the per-epoch accuracy estimates draw their batches from separate ranges.
_ACCURACY_DRAWS = 1_000_000


@dataclass
class ClassifyArgs(ModelOptions, RunOptions):
    """Finetune GPT-2 to classify text (the book's chapter 6: SMS spam)."""

    model: str = redefault(ModelOptions, "model", "gpt2-small")
    data: str = arg(SPAM_URL, "label<TAB>text file, or URL of it / of the UCI zip (downloaded once into "
                              "$GPT2_SCRATCH_CACHE/sms_spam, default ~/.cache/gpt2-scratch/sms_spam)")
    labels: str = arg(",".join(DEFAULT_LABELS), "comma-separated class names; their order gives the label ids")
    balance: bool = arg(True, "undersample larger classes to the smallest one (the book)")
    trainable: str = arg("last-block", "what to train besides the final LayerNorm and the head: last-block "
                                       "(the book), last-N (the last N blocks), or all (every parameter)")
    pad_to_context: bool = arg(False, "pad/truncate every message to the model's context length instead of the "
                                      "longest training message (the book's exercise 6.1)")
    out: str = redefault(RunOptions, "out", "runs/classify")
    epochs: int = redefault(RunOptions, "epochs", 5)
    eval_freq: int = redefault(RunOptions, "eval_freq", 50, "evaluate the losses every this many optimizer steps")


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


def build_classifier(spec: str, *, labels: tuple[str, ...], random_init: bool = False, models_dir: str | None = None,
                     seed: int = 123):
    """A ``GPT2ScratchForSequenceClassification`` whose body comes from ``spec`` and whose head is new.

    ``spec`` is what ``convert.resolve.load_model`` accepts (our model folder, an OpenAI or HF checkpoint,
    a preset, a Hub id). A folder that already holds a classifier with the same labels is loaded as is
    (to continue training it). The head is initialised after ``torch.manual_seed(seed)``, as in the book.
    """
    id2label = dict(enumerate(labels))
    label2id = {label: i for i, label in id2label.items()}
    path = Path(spec).expanduser()
    if path.is_dir() and not random_init and is_our_model_dir(path):
        if is_classifier_config(read_config(path)):
            model = load_model_dir(path, head="classifier")
            if [model.config.id2label[i] for i in range(model.config.num_labels)] != list(labels):
                raise InputError(f"{path} classifies into {list(model.config.id2label.values())}, not {list(labels)}; "
                                "pass matching --labels or start from a language model")
            return model

    body = load_model(spec, random_init=random_init, models_dir=models_dir)  # GPT2ScratchForCausalLM
    config = copy.deepcopy(body.config)
    config.num_labels = len(labels)  # also resets id2label to LABEL_0.. — set ours after it
    config.id2label, config.label2id = id2label, label2id
    torch.manual_seed(seed)
    model = GPT2ScratchForSequenceClassification(config)
    # The whole body carries over; the LM head (tied to wte) gives way to the new `score` head.
    model.transformer.load_state_dict(body.transformer.state_dict())
    return model


def parse_trainable(spec: str) -> int | None:
    """--trainable as the number of last blocks to train (None: all); one InputError when it is none of the
    forms. ``last-block`` = ``last-1``: the last transformer block (the book's choice)."""
    match = _TRAINABLE.match(spec)
    if match is None:
        raise InputError(f"--trainable {spec!r}: expected last-block, last-N (e.g. last-2) or all")
    return None if spec == "all" else 1 if spec == "last-block" else int(match.group(2))


def set_trainable(model, spec: str) -> int:
    """Freeze the model except what ``spec`` (--trainable) names; return the number of trainable parameters."""
    return freeze_except(model, parse_trainable(spec), spec)


def freeze_except(model, n_last: int | None, spec: str) -> int:
    """Freeze the model except its last ``n_last`` blocks (None: nothing frozen), the final LayerNorm and the
    ``score`` head; return the number of trainable parameters. ``spec`` is how --trainable said it."""
    blocks = model.transformer.h
    if n_last is not None and not 1 <= n_last <= len(blocks):
        raise InputError(f"--trainable {spec}: the model has {len(blocks)} blocks; choose N in 1..{len(blocks)}")
    n_last = len(blocks) if n_last is None else n_last
    for p in model.parameters():
        p.requires_grad = spec == "all"
    for module in [*blocks[len(blocks) - n_last:], model.transformer.ln_f, model.score]:
        for p in module.parameters():
            p.requires_grad = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------
# Set-up: every check first, then the first write
# ---------------------------------------------------------------------------------------------------


def run(args: ClassifyArgs) -> int:
    """set-up → the loop → finish; returns the exit code (130 / 143 when Ctrl-C / SIGTERM stopped it with a
    checkpoint saved)."""
    return run_training(args, set_up)


def parse_labels(args: ClassifyArgs) -> tuple[str, ...]:
    """The run's labels; one InputError for a setting it cannot start with."""
    labels = tuple(label.strip() for label in args.labels.split(",") if label.strip())
    if len(labels) < 2:
        raise InputError(f"--labels {args.labels!r}: need at least two comma-separated class names")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:  # two outputs of one name: the head would learn to split a class against itself
        raise InputError(f"--labels {args.labels!r}: {', '.join(map(repr, repeated))} is named twice; give each "
                         "class once")
    return labels


def check_learnable(splits, labels: tuple[str, ...], source) -> None:
    """A class missing from the training split cannot be learned (a two-class model trained on one class
    reports 50% accuracy): an error before training. One missing from validation or test: a warning."""
    counts = splits.train["Label"].value_counts()
    missing = [label for label in labels if counts.get(label, 0) == 0]
    if missing:
        raise InputError(f"{source}: the training split has no example of {', '.join(map(repr, missing))}, so the "
                         "classifier cannot learn it; give data with every class of --labels (or change --labels)")
    for name in ("val", "test"):
        split_counts = getattr(splits, name)["Label"].value_counts()
        absent = [label for label in labels if split_counts.get(label, 0) == 0]
        if absent:
            logger.warning("warning: the %s split has no example of %s: its accuracy says nothing about that class",
                           name, ", ".join(map(repr, absent)))


def set_up(args: ClassifyArgs):
    from accelerate.utils import set_seed  # deferred: accelerate is heavy and only training needs it

    # 1. Arguments, the output folder, the data, the model: checked before anything is written.
    labels = parse_labels(args)
    n_last = parse_trainable(args.trainable)
    started = start(args, inputs=[("--model", args.model), ("--data", args.data)])
    if is_url(args.data):
        # The book's backup copy of the UCI zip is the mirror of the default URL.
        data_path = fetch_spam_data(args.data, mirrors=(SPAM_BACKUP_URL,) if args.data == SPAM_URL else ())
    else:
        data_path = Path(args.data)
    splits = prepare_splits(data_path, labels=labels, seed=args.seed, balance=args.balance)
    check_learnable(splits, labels, data_path)
    data_sha256 = fingerprint(data_path.read_bytes())
    started.check_data(data_sha256, f"--data {data_path}")
    set_seed(args.seed)
    model = build_classifier(args.model, labels=labels, random_init=args.random_init, models_dir=args.models_dir,
                             seed=args.seed)
    n_trainable = freeze_except(model, n_last, args.trainable)
    context = model.config.max_position_embeddings

    encode = get_encoding().encode_ordinary  # the book's tokenizer.encode(text) on texts without special tokens
    if args.pad_to_context:
        max_length = context
        train_ds = SpamDataset(splits.train, encode, splits.label2id, max_length=context)
    else:
        train_ds = SpamDataset(splits.train, encode, splits.label2id)
        max_length = train_ds.max_length
        if max_length > context:
            raise InputError(f"the longest training message is {max_length} tokens but {args.model} has a "
                             f"{context}-token context; pass --pad-to-context to truncate to it")
    val_ds = SpamDataset(splits.val, encode, splits.label2id, max_length=max_length)
    test_ds = SpamDataset(splits.test, encode, splits.label2id, max_length=max_length)
    # Predict-time truncation must match training: keep the length in the saved config.
    model.config.classification_max_length = max_length

    # The book shuffles the training batches each epoch and drops the last partial one; the order comes from
    # (seed, epoch) alone, so --resume replays it.
    train_sampler = EpochBatchSampler([max_length] * len(train_ds), args.batch_size, shuffle=True, drop_last=True,
                                      seed=args.seed)
    if len(train_sampler) == 0:
        raise InputError(f"{data_path}: {len(train_ds)} training examples make no full batch of {args.batch_size}; "
                         "lower --batch-size")
    # The book estimates the training loss and accuracy on a few shuffled training batches: a sampler of its
    # own, whose order is set per estimate (ClassifyTask.estimate), so the training order does not change.
    train_estimate_sampler = EpochBatchSampler([max_length] * len(train_ds), args.batch_size, shuffle=True,
                                               drop_last=False, seed=args.seed + 1)
    evaluation = {"train": DataLoader(train_ds, batch_sampler=train_estimate_sampler),
                  "validation": DataLoader(val_ds, batch_size=args.batch_size),
                  "test": DataLoader(test_ds, batch_size=args.batch_size)}

    # 2. Only now: the processes and the output folder.
    run, evaluation = launch(started, model=model, train_dataset=train_ds, train_sampler=train_sampler, collate=None,
                             eval_loaders=evaluation, data_sha256=data_sha256)
    if run.accelerator.is_main_process:
        n_params = sum(p.numel() for p in model.parameters())
        counts = ", ".join(f"{k} {v}" for k, v in splits.train["Label"].value_counts().sort_index().items())
        print(f"model {args.model}{' (random init)' if args.random_init else ''}: {n_params:,} parameters, "
              f"{n_trainable:,} trainable ({args.trainable}); data {data_path}: {len(train_ds)} train ({counts}) / "
              f"{len(val_ds)} val / {len(test_ds)} test, padded to {max_length} tokens; {run.steps_line('texts')}",
              flush=True)
    return run, ClassifyTask(args, evaluation, train_estimate_sampler)


# ---------------------------------------------------------------------------------------------------
# The task: what is the classifier's own in the one loop
# ---------------------------------------------------------------------------------------------------


@dataclass
class ClassifyTask(Task):
    """Cross-entropy of the class logits (read at each message's last real token); train/loop.py runs it."""

    args: ClassifyArgs
    loaders: dict  # train (the shuffled estimate), validation, test
    train_estimate_sampler: Any
    name: str = "classify"
    units_seen_key: str = "examples_seen"
    final: dict | None = None  # the full-split numbers, for the summary line

    def units(self, batch: dict) -> int:
        return batch["labels"].numel()

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy summed over the batch's examples (the model's classification head computes it), and
        [that sum, examples, correct predictions]."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    num_items_in_batch=1)
        logits, loss_sum = out.logits.float(), out.loss
        correct = (logits.argmax(-1) == batch["labels"]).sum()
        return loss_sum, torch.stack([loss_sum.detach(), logits.new_tensor(len(logits)), correct.float()]).double()

    def estimate(self, run, split: str, draw: int | None = None, num_batches: int | None = -1) -> tuple[float, float]:
        """(mean loss per example, accuracy) over the first ``eval_iter`` batches of ``split`` (``num_batches``
        None: all of them); the training split's batches are those of estimate number ``draw``."""
        if split == "train" and draw is not None:
            self.train_estimate_sampler.set_epoch(draw)
        sums = sums_over(run, self.loaders[split], self.args.eval_iter if num_batches == -1 else num_batches,
                         self.batch_sums)
        loss, examples, correct = sums.tolist()
        return loss / max(examples, 1), correct / max(examples, 1)

    def evaluate(self, run, running: torch.Tensor) -> dict:
        return {"train_loss": self.estimate(run, "train", draw=run.state.evaluations)[0],
                "val_loss": self.estimate(run, "validation")[0]}

    def eval_line(self, run, row: dict) -> str:
        return (f"epoch {row['epoch']}/{self.args.epochs} | step {row['step']:>4}/{run.total_steps} | train loss "
                f"{row['train_loss']:.3f} | val loss {row['val_loss']:.3f} | {row['examples_seen']} examples | "
                f"{row['tokens_per_sec']:,.0f} tok/s")

    def end_of_epoch(self, run, epoch: int):
        """The book's per-epoch accuracy: a few batches of each split."""
        accuracy = {"train": self.estimate(run, "train", draw=_ACCURACY_DRAWS + epoch)[1],
                    "val": self.estimate(run, "validation")[1], "test": self.estimate(run, "test")[1]}
        row = {"examples_seen": run.state.units_seen, "tokens_seen": run.state.tokens_seen,
               **{f"{k}_accuracy": v for k, v in accuracy.items()}}
        return row, (f"epoch {epoch}/{self.args.epochs} | accuracy ({self.args.eval_iter} batches) train "
                     f"{accuracy['train']:.2%} | val {accuracy['val']:.2%} | test {accuracy['test']:.2%}")

    def final_evaluation(self, run) -> dict:
        """The chapter's final numbers: loss and accuracy over the full splits (every process)."""
        final = {}
        for name, split in (("train", "train"), ("val", "validation"), ("test", "test")):
            final[f"{name}_loss"], final[f"{name}_accuracy"] = self.estimate(run, split, num_batches=None)
        self.final = final
        return {"split": "full", **final}

    def finish(self, run) -> None:
        """The classifier at the top of OUT (``Task.finish``), the loss and accuracy plots, the summary line."""
        super().finish(run)
        out, state, final = run.out, run.state, self.final
        rows = [r for r in run.metrics.read() if r.get("split") != "full"]
        plot_curves(rows, out)
        plot_curves(rows, out, stem="accuracy", series={"train_accuracy": "training accuracy",
                                                         "val_accuracy": "validation accuracy"}, ylabel="Accuracy")
        rate = state.tokens_seen / state.train_seconds if state.train_seconds else 0.0
        print(f"done: {state.step} steps, {state.units_seen} examples in {state.train_seconds / 60:.1f} min "
              f"({rate:,.0f} tok/s); accuracy train {final['train_accuracy']:.2%} | val {final['val_accuracy']:.2%} | "
              f"test {final['test_accuracy']:.2%}; model, metrics, loss.png and accuracy.png in {out}", flush=True)
