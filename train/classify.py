"""Finetune GPT-2 as a spam classifier (the book's chapter 6) with a hand-written Accelerate loop.

    accelerate launch train/classify.py [--model DIR|PRESET|HF_ID] [--random-init] [--data PATH|URL]
        [--output-dir OUT] [--epochs 5] [--batch-size 8] [--lr 5e-5] [--max-steps N]
        [--trainable last-block|last-N|all] [--pad-to-context] [--seed 123] [--mixed-precision bf16|no]
        [--push-to-hub USER/NAME]
    python train/classify.py ...            # the same, one process

Defaults reproduce the chapter: gpt2-small with OpenAI's weights; the SMS Spam Collection (downloaded
from UCI, or a local ``label<TAB>text`` file) balanced to 747/747 by undersampling ham with seed 123,
shuffled and split 70/10/20 (1045/149/300); every message padded with <|endoftext|> to the longest
training message (validation/test truncated to it); a new ``score`` head (emb_dim → 2); everything
frozen except the last transformer block, the final LayerNorm and the head; AdamW lr 5e-5, weight
decay 0.1, batch 8, 5 epochs; train/validation loss every 50 steps over 5 batches; accuracy after
every epoch (5 batches of each split, as the book; plus test), and on the full splits at the end.

One difference, on purpose: the book reads the logits at position -1, which for every message shorter
than the longest is a padding token; ``GPT2ScratchForSequenceClassification`` reads the last *real*
token (from the attention mask), so predictions do not depend on how much padding a batch has.

What a run leaves in OUT (the same layout as train/sft.py, so ``python -m gpt2_scratch push`` and
``classify`` take OUT directly):

    config.json (id2label/label2id) model.safetensors tokenizer files modeling code   the classifier
    args.json                 the arguments of the run
    metrics.jsonl             one JSON object per evaluation, per epoch, and the final accuracies
    loss.png loss.pdf         train/validation loss over steps (examples and tokens seen)
    accuracy.png accuracy.pdf train/validation accuracy after each epoch
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import this project's packages from the repository root, not from train/.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

if __name__ == "__main__":
    # Before torch is imported: re-run this command with a caching malloc preloaded (train/allocator.py
    # says why: about 1.5x faster CPU training steps). GPT2_SCRATCH_ALLOCATOR=system turns it off.
    from train.allocator import use_caching_allocator_or_exit

    use_caching_allocator_or_exit()

import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass
from itertools import islice
from typing import Literal

import torch

from train.allocator import loaded_allocator
from train.common import (
    MetricsLog,
    UserError,
    arg,
    parse_dataclass_args,
    plot_losses,
    prepare_output_dir,
    push_to_hub,
    run_main,
    save_final_model,
    write_json_atomic,
)
from train.spam_data import (
    DEFAULT_LABELS,
    SPAM_BACKUP_URL,
    SPAM_URL,
    SpamDataError,
    SpamDataset,
    fetch_spam_data,
    is_url,
    prepare_splits,
)

logger = logging.getLogger(__name__)

_TRAINABLE = re.compile(r"^(last-block|all|last-(\d+))$")


@dataclass
class ClassifyArgs:
    """Finetune GPT-2 to classify text (the book's chapter 6: SMS spam)."""

    model: str = arg("gpt2-small", "model folder, Hugging Face repo id, or preset (gpt2-small|gpt2-medium|"
                                   "gpt2-large|gpt2-xl: OpenAI's weights, or untrained with --random-init)")
    random_init: bool = arg(False, "start from random weights instead of pretrained ones (offline runs, tests)")
    models_dir: str | None = arg(None, "cache folder for OpenAI's weights (default ~/.cache/gpt2-scratch/openai)")
    data: str = arg(SPAM_URL, "label<TAB>text file, or URL of it / of the UCI zip (downloaded once into "
                              "--data-cache)")
    data_cache: str | None = arg(None, "where a downloaded --data URL is kept (default "
                                       "$GPT2_SCRATCH_CACHE/sms_spam or ~/.cache/gpt2-scratch/sms_spam)")
    labels: str = arg(",".join(DEFAULT_LABELS), "comma-separated class names; their order gives the label ids")
    balance: bool = arg(True, "undersample larger classes to the smallest one (the book)")
    output_dir: str = arg("runs/classify", "output directory (refused if it exists, unless --overwrite)")
    overwrite: bool = arg(False, "delete an existing output directory first")
    epochs: int = arg(5, "passes over the training split")
    max_steps: int | None = arg(None, "stop after this many optimizer steps")
    batch_size: int = arg(8, "global batch size (examples per step, over all processes)")
    lr: float = arg(5e-5, "learning rate (AdamW)")
    weight_decay: float = arg(0.1, "AdamW weight decay")
    trainable: str = arg("last-block", "what to train besides the final LayerNorm and the head: last-block "
                                       "(the book), last-N (the last N blocks), or all (every parameter)")
    pad_to_context: bool = arg(False, "pad/truncate every message to the model's context length instead of the "
                                      "longest training message (the book's exercise 6.1)")
    mixed_precision: Literal["no", "bf16"] = arg("no", "bf16 autocast (fast on CPUs with AMX and on GPUs)")
    seed: int = arg(123, "seed for balancing, splitting, the head's init and the batch order")
    eval_freq: int = arg(50, "evaluate the losses every this many optimizer steps")
    eval_iter: int = arg(5, "batches per loss/accuracy estimate")
    push_to_hub: str | None = arg(None, "after training, upload the classifier with a model card to this Hub repo "
                                        "(USER/NAME)")


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
    import copy
    import json

    from gpt2_scratch import GPT2ScratchForSequenceClassification

    id2label = dict(enumerate(labels))
    label2id = {label: i for i, label in id2label.items()}
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and not random_init:
        saved = json.loads((path / "config.json").read_text())
        if (saved.get("model_type") == "gpt2-scratch"
                and any(a.endswith("ForSequenceClassification") for a in saved.get("architectures") or [])):
            model = GPT2ScratchForSequenceClassification.from_pretrained(path)
            if [model.config.id2label[i] for i in range(model.config.num_labels)] != list(labels):
                raise UserError(f"{path} classifies into {list(model.config.id2label.values())}, not {list(labels)}; "
                                "pass matching --labels or start from a language model")
            return model

    from convert.resolve import load_model

    body = load_model(spec, random_init=random_init, models_dir=models_dir)  # GPT2ScratchForCausalLM
    config = copy.deepcopy(body.config)
    config.num_labels = len(labels)  # also resets id2label to LABEL_0.. — set ours after it
    config.id2label, config.label2id = id2label, label2id
    torch.manual_seed(seed)
    model = GPT2ScratchForSequenceClassification(config)
    # The whole body carries over; the LM head (tied to wte) gives way to the new `score` head.
    model.transformer.load_state_dict(body.transformer.state_dict())
    return model


def set_trainable(model, spec: str) -> int:
    """Freeze the model except what ``spec`` names; return the number of trainable parameters.

    ``last-block`` = ``last-1``: the last transformer block, the final LayerNorm and the ``score`` head
    (the book's choice). ``last-N``: the last N blocks, ln_f and the head. ``all``: everything.
    """
    match = _TRAINABLE.match(spec)
    if match is None:
        raise UserError(f"--trainable {spec!r}: expected last-block, last-N (e.g. last-2) or all")
    blocks = model.transformer.h
    if spec == "all":
        n_last = len(blocks)
    else:
        n_last = 1 if spec == "last-block" else int(match.group(2))
        if not 1 <= n_last <= len(blocks):
            raise UserError(f"--trainable {spec}: the model has {len(blocks)} blocks; choose N in 1..{len(blocks)}")
    for p in model.parameters():
        p.requires_grad = spec == "all"
    for module in [*blocks[len(blocks) - n_last:], model.transformer.ln_f, model.score]:
        for p in module.parameters():
            p.requires_grad = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(accelerator, model, loader, num_batches: int | None) -> tuple[float, float]:
    """(mean loss per batch, accuracy) over the first ``num_batches`` batches (None: all), all processes."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # [loss sum, batches, correct, examples]
    for batch in islice(loader, num_batches):
        with accelerator.autocast():
            out = model(**batch)
        totals[0] += out.loss.double()
        totals[1] += 1
        totals[2] += (out.logits.argmax(-1) == batch["labels"]).sum()
        totals[3] += batch["labels"].numel()
    model.train(was_training)
    totals = accelerator.reduce(totals, reduction="sum").tolist()  # host sync
    return totals[0] / max(totals[1], 1), totals[2] / max(totals[3], 1)


def plot_accuracy(records: list[dict], out: Path) -> list[Path]:
    return plot_losses(records, out, stem="accuracy", series=("train_accuracy", "val_accuracy"), ylabel="Accuracy")


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def train(args: ClassifyArgs) -> Path:
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from torch.utils.data import DataLoader

    from gpt2_scratch import get_encoding

    labels = tuple(label.strip() for label in args.labels.split(",") if label.strip())
    if len(labels) < 2:
        raise UserError(f"--labels {args.labels!r}: need at least two comma-separated class names")
    for name in ("epochs", "batch_size", "eval_freq", "eval_iter"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be at least 1, got {args.max_steps}")
    if _TRAINABLE.match(args.trainable) is None:
        raise UserError(f"--trainable {args.trainable!r}: expected last-block, last-N (e.g. last-2) or all")

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        # --batch-size is the global batch: each process takes its slice of every batch.
        dataloader_config=DataLoaderConfiguration(split_batches=True, even_batches=False),
    )
    main = accelerator.is_main_process
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, stream=sys.stdout,
                        format="%(message)s", force=True)
    for noisy in ("accelerate", "gpt2_scratch", "httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    if args.batch_size % accelerator.num_processes:
        raise UserError(f"--batch-size {args.batch_size} is the global batch; it must be divisible by the "
                        f"{accelerator.num_processes} processes")

    # ---- data (before the output directory, so a bad file leaves nothing behind) ----
    if is_url(args.data):
        with accelerator.main_process_first():
            # The book's backup copy of the UCI zip is the mirror of the default URL.
            mirrors = (SPAM_BACKUP_URL,) if args.data == SPAM_URL else ()
            cache = args.data_cache or Path(os.environ.get("GPT2_SCRATCH_CACHE") or "~/.cache/gpt2-scratch",
                                            "sms_spam")
            data_path = fetch_spam_data(args.data, Path(cache).expanduser(), mirrors=mirrors)
    else:
        data_path = Path(args.data)
    splits = prepare_splits(data_path, labels=labels, seed=args.seed, balance=args.balance)

    out = prepare_output_dir(args.output_dir, resume=False, overwrite=args.overwrite, is_main_process=main)
    accelerator.wait_for_everyone()

    set_seed(args.seed)
    model = build_classifier(args.model, labels=labels, random_init=args.random_init, models_dir=args.models_dir,
                             seed=args.seed)
    n_trainable = set_trainable(model, args.trainable)
    context = model.config.max_position_embeddings

    encoding = get_encoding()
    encode = encoding.encode_ordinary  # the book's tokenizer.encode(text) on texts without special tokens
    if args.pad_to_context:
        max_length = context
        train_ds = SpamDataset(splits.train, encode, splits.label2id, max_length=context)
    else:
        train_ds = SpamDataset(splits.train, encode, splits.label2id)
        max_length = train_ds.max_length
        if max_length > context:
            raise UserError(f"the longest training message is {max_length} tokens but {args.model} has a "
                            f"{context}-token context; pass --pad-to-context to truncate to it")
    val_ds = SpamDataset(splits.val, encode, splits.label2id, max_length=max_length)
    test_ds = SpamDataset(splits.test, encode, splits.label2id, max_length=max_length)
    # Predict-time truncation must match training: keep the length in the saved config.
    model.config.classification_max_length = max_length

    def loader(ds, shuffle: bool, seed_offset: int = 0, drop_last: bool = False) -> DataLoader:
        g = torch.Generator().manual_seed(args.seed + seed_offset)
        return DataLoader(ds, batch_size=args.batch_size, shuffle=shuffle, drop_last=drop_last, generator=g)

    train_loader = loader(train_ds, shuffle=True, drop_last=True)  # the book drops the last partial batch
    if len(train_loader) == 0:
        raise UserError(f"{data_path}: {len(train_ds)} training examples make no full batch of {args.batch_size}; "
                        "lower --batch-size")
    # The book estimates training loss/accuracy on a few shuffled training batches; a separate loader with
    # its own generator does that without changing the training order.
    train_eval_loader = loader(train_ds, shuffle=True, seed_offset=1)
    val_loader, test_loader = loader(val_ds, shuffle=False), loader(test_ds, shuffle=False)

    total_steps = len(train_loader) * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    # As the book: AdamW over model.parameters(); frozen ones have no gradient and are skipped.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, train_loader, train_eval_loader, val_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, train_eval_loader, val_loader, test_loader)

    metrics = MetricsLog(out / "metrics.jsonl", enabled=main)
    if main:
        write_json_atomic(out / "args.json", dataclasses.asdict(args))
        n_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
        counts = ", ".join(f"{k} {v}" for k, v in splits.train["Label"].value_counts().sort_index().items())
        print(f"model {args.model}{' (random init)' if args.random_init else ''}: {n_params:,} parameters, "
              f"{n_trainable:,} trainable ({args.trainable}); data {data_path}: {len(train_ds)} train ({counts}) / "
              f"{len(val_ds)} val / {len(test_ds)} test, padded to {max_length} tokens; {total_steps} steps of "
              f"{args.batch_size} on {accelerator.num_processes} process(es), "
              f"{'fp32' if args.mixed_precision == 'no' else args.mixed_precision}, {loaded_allocator()} malloc",
              flush=True)

    step, examples_seen, tokens_seen, train_seconds = 0, 0, 0, 0.0
    window_tokens, window_seconds = 0, 0.0

    def log_eval(epoch: int) -> None:
        nonlocal window_tokens, window_seconds
        train_loss, _ = evaluate(accelerator, model, train_eval_loader, args.eval_iter)
        val_loss, _ = evaluate(accelerator, model, val_loader, args.eval_iter)
        row = {"epoch": epoch, "step": step, "examples_seen": examples_seen, "tokens_seen": tokens_seen,
               "train_loss": train_loss, "val_loss": val_loss,
               "tokens_per_sec": window_tokens / window_seconds if window_seconds else 0.0}
        metrics.log(row)
        if main:
            print(f"epoch {epoch}/{args.epochs} | step {step:>4}/{total_steps} | train loss {train_loss:.3f} | "
                  f"val loss {val_loss:.3f} | {examples_seen} examples | {row['tokens_per_sec']:,.0f} tok/s",
                  flush=True)
        window_tokens, window_seconds = 0, 0.0

    model.train()
    done = False
    for epoch in range(1, args.epochs + 1):
        for batch in train_loader:
            tick = time.perf_counter()
            with accelerator.autocast():
                loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            n = batch["labels"].numel() * accelerator.num_processes
            examples_seen += n
            tokens_seen += n * max_length  # processed (padded) tokens: that is what the compute scales with
            elapsed = time.perf_counter() - tick
            train_seconds += elapsed
            window_tokens += n * max_length
            window_seconds += elapsed
            # The book evaluates after its steps 0, 50, 100, ... (0-based); ours count from 1.
            if (step - 1) % args.eval_freq == 0:
                log_eval(epoch)
            if step >= total_steps:
                done = True
                break
        # The book's per-epoch accuracy: a few batches of each split.
        _, train_acc = evaluate(accelerator, model, train_eval_loader, args.eval_iter)
        _, val_acc = evaluate(accelerator, model, val_loader, args.eval_iter)
        _, test_acc = evaluate(accelerator, model, test_loader, args.eval_iter)
        metrics.log({"epoch": epoch, "step": step, "examples_seen": examples_seen, "tokens_seen": tokens_seen,
                     "train_accuracy": train_acc, "val_accuracy": val_acc, "test_accuracy": test_acc})
        if main:
            print(f"epoch {epoch}/{args.epochs} | accuracy ({args.eval_iter} batches) train {train_acc:.2%} | "
                  f"val {val_acc:.2%} | test {test_acc:.2%}", flush=True)
        if done:
            break
    if (step - 1) % args.eval_freq != 0:
        log_eval(epoch)  # the last step's losses, for the plot and the model card

    # The chapter's final numbers: accuracy over the full splits.
    final = {}
    for name, split_loader in (("train", train_eval_loader), ("val", val_loader), ("test", test_loader)):
        final[f"{name}_loss"], final[f"{name}_accuracy"] = evaluate(accelerator, model, split_loader, None)
    metrics.log({"epoch": epoch, "step": step, "split": "full", **final})

    accelerator.wait_for_everyone()
    if main:
        final_model = accelerator.unwrap_model(model)
        final_model.eval()
        save_final_model(final_model, None, out)
        records = metrics.read()
        plot_losses([r for r in records if "train_loss" in r and r.get("split") != "full"], out)
        plot_accuracy([r for r in records if "train_accuracy" in r and r.get("split") != "full"], out)
        rate = tokens_seen / train_seconds if train_seconds else 0.0
        print(f"done: {step} steps, {examples_seen} examples in {train_seconds / 60:.1f} min ({rate:,.0f} tok/s); "
              f"accuracy train {final['train_accuracy']:.2%} | val {final['val_accuracy']:.2%} | "
              f"test {final['test_accuracy']:.2%}; model, metrics, loss.png and accuracy.png in {out}", flush=True)
        if args.push_to_hub:
            push_to_hub(out, args.push_to_hub)  # the model files + a card built from OUT's args/metrics/plots
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def main(argv: list[str] | None = None) -> None:
    args, _ = parse_dataclass_args(ClassifyArgs, argv)

    from convert.errors import ConvertError
    from gpt2_scratch.hub import HubError

    run_main(lambda: train(args), SpamDataError, ConvertError, HubError, FileExistsError)


if __name__ == "__main__":
    main()
