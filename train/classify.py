"""Finetune GPT-2 as a spam classifier (the book's chapter 6) with a hand-written Accelerate loop.

    accelerate launch train/classify.py [--model DIR|PRESET|HF_ID] [--random-init] [--data PATH|URL]
        [--out OUT] [--epochs 5] [--batch-size 8] [--lr 5e-5] [--max-steps N]
        [--trainable last-block|last-N|all] [--pad-to-context] [--seed 123] [--mixed-precision bf16|no]
        [--push-to-hub USER/NAME]
    python train/classify.py ...            # the same, one process (= gpt2-scratch classify ...)

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

It shares train/sft.py's set-up and outputs (train/run.py: the pre-flight of the output folder, the
Accelerator, the divergence guard, Ctrl-C, the final model; train/metrics.py). What a run leaves in OUT
(the same layout as train/sft.py, so ``gpt2-scratch push`` and ``predict`` take OUT directly):

    config.json (id2label/label2id) model.safetensors tokenizer files modeling code   the classifier
    args.json                 the arguments of the run
    metrics.jsonl             one JSON object per evaluation, per epoch, and the final accuracies
    loss.png loss.pdf         train/validation loss over steps (examples and tokens seen)
    accuracy.png accuracy.pdf train/validation accuracy after each epoch
"""

from __future__ import annotations

if __name__ == "__main__":  # `python train/classify.py ARGS` and `accelerate launch train/classify.py ARGS`
    from gpt2_scratch.core.cli import run_script

    run_script("classify")

import re
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Literal

import torch

from gpt2_scratch.core.args import arg
from gpt2_scratch.core.download import is_url
from gpt2_scratch.core.errors import InputError
from gpt2_scratch.train.run import TrainState, run_arg
from gpt2_scratch.train.spam_data import DEFAULT_LABELS, SPAM_BACKUP_URL, SPAM_URL

_TRAINABLE = re.compile(r"^(last-block|all|last-(\d+))$")


@dataclass
class ClassifyArgs:
    """Finetune GPT-2 to classify text (the book's chapter 6: SMS spam)."""

    model: str = arg("gpt2-small", "model folder, Hugging Face repo id, or preset (gpt2-small|gpt2-medium|"
                                   "gpt2-large|gpt2-xl: OpenAI's weights, or untrained with --random-init)")
    random_init: bool = arg(False, "start from random weights instead of pretrained ones (offline runs, tests)")
    models_dir: str | None = arg(None, "cache folder for OpenAI's weights (default $GPT2_SCRATCH_CACHE/openai "
                                       "or ~/.cache/gpt2-scratch/openai)")
    data: str = arg(SPAM_URL, "label<TAB>text file, or URL of it / of the UCI zip (downloaded once into "
                              "$GPT2_SCRATCH_CACHE/sms_spam, default ~/.cache/gpt2-scratch/sms_spam)")
    labels: str = arg(",".join(DEFAULT_LABELS), "comma-separated class names; their order gives the label ids")
    balance: bool = arg(True, "undersample larger classes to the smallest one (the book)")
    out: str = run_arg("out", "runs/classify", "output folder (refused if it exists, unless --overwrite)")
    overwrite: bool = run_arg("overwrite")
    epochs: int = arg(5, "passes over the training split")
    max_steps: int | None = run_arg("max_steps")
    batch_size: int = arg(8, "global batch size (examples per step, over all processes)")
    lr: float = arg(5e-5, "learning rate (AdamW)")
    weight_decay: float = arg(0.1, "AdamW weight decay")
    trainable: str = arg("last-block", "what to train besides the final LayerNorm and the head: last-block "
                                       "(the book), last-N (the last N blocks), or all (every parameter)")
    pad_to_context: bool = arg(False, "pad/truncate every message to the model's context length instead of the "
                                      "longest training message (the book's exercise 6.1)")
    mixed_precision: Literal["no", "bf16", "auto"] = run_arg("mixed_precision")
    seed: int = arg(123, "seed for balancing, splitting, the head's init and the batch order")
    eval_freq: int = run_arg("eval_freq", 50, "evaluate the losses every this many optimizer steps")
    eval_iter: int = run_arg("eval_iter", 5, "batches per loss/accuracy estimate")
    push_to_hub: str | None = run_arg("push_to_hub")


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

    from gpt2_scratch import GPT2ScratchForSequenceClassification
    from gpt2_scratch.model_dir import is_classifier_config, is_our_model_dir, load_model_dir, read_config

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

    from gpt2_scratch.convert.resolve import load_model

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
        raise InputError(f"--trainable {spec!r}: expected last-block, last-N (e.g. last-2) or all")
    blocks = model.transformer.h
    if spec == "all":
        n_last = len(blocks)
    else:
        n_last = 1 if spec == "last-block" else int(match.group(2))
        if not 1 <= n_last <= len(blocks):
            raise InputError(f"--trainable {spec}: the model has {len(blocks)} blocks; choose N in 1..{len(blocks)}")
    for p in model.parameters():
        p.requires_grad = spec == "all"
    for module in [*blocks[len(blocks) - n_last:], model.transformer.ln_f, model.score]:
        for p in module.parameters():
            p.requires_grad = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------
# The run: set-up → fit → finish
# ---------------------------------------------------------------------------------------------------


def run(args: ClassifyArgs) -> int:
    from gpt2_scratch.train.run import run_training

    return run_training(args, set_up, fit, finish)


@dataclass
class Setup:
    accelerator: object
    model: object
    optimizer: object
    train_loader: object
    train_eval_loader: object  # shuffled with its own generator: the book's few-batch estimates
    val_loader: object
    test_loader: object
    out: Path
    metrics: object
    total_steps: int
    max_length: int  # every message is padded/truncated to this many tokens


def check_args(args: ClassifyArgs) -> tuple[str, ...]:
    """The run's labels; one InputError for a setting it cannot start with."""
    from gpt2_scratch.train.run import check_number

    labels = tuple(label.strip() for label in args.labels.split(",") if label.strip())
    if len(labels) < 2:
        raise InputError(f"--labels {args.labels!r}: need at least two comma-separated class names")
    for name in ("epochs", "batch_size", "eval_freq", "eval_iter"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise InputError(f"--max-steps must be at least 1, got {args.max_steps}")
    if _TRAINABLE.match(args.trainable) is None:
        raise InputError(f"--trainable {args.trainable!r}: expected last-block, last-N (e.g. last-2) or all")
    check_number("lr", args.lr, above=0)
    check_number("weight_decay", args.weight_decay, minimum=0)
    return labels


def set_up(args: ClassifyArgs) -> Setup:
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from gpt2_scratch import get_encoding
    from gpt2_scratch.train.metrics import MetricsLog
    from gpt2_scratch.train.run import (check_output, clear_output, make_accelerator, quiet_libraries, resolve_precision,
                           write_args)
    from gpt2_scratch.train.spam_data import SpamDataset, fetch_spam_data, prepare_splits

    # 1. Arguments, the output folder, the data, the model: checked before anything is written.
    quiet_libraries()
    labels = check_args(args)
    resolve_precision(args)
    out = check_output(args.out, resume=False, overwrite=args.overwrite,
                       inputs=[("--model", args.model), ("--data", args.data)])
    if is_url(args.data):
        # The book's backup copy of the UCI zip is the mirror of the default URL.
        data_path = fetch_spam_data(args.data, mirrors=(SPAM_BACKUP_URL,) if args.data == SPAM_URL else ())
    else:
        data_path = Path(args.data)
    splits = prepare_splits(data_path, labels=labels, seed=args.seed, balance=args.balance)
    set_seed(args.seed)
    model = build_classifier(args.model, labels=labels, random_init=args.random_init, models_dir=args.models_dir,
                             seed=args.seed)
    n_trainable = set_trainable(model, args.trainable)
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

    def loader(ds, shuffle: bool, seed_offset: int = 0, drop_last: bool = False) -> DataLoader:
        g = torch.Generator().manual_seed(args.seed + seed_offset)
        return DataLoader(ds, batch_size=args.batch_size, shuffle=shuffle, drop_last=drop_last, generator=g)

    train_loader = loader(train_ds, shuffle=True, drop_last=True)  # the book drops the last partial batch
    if len(train_loader) == 0:
        raise InputError(f"{data_path}: {len(train_ds)} training examples make no full batch of {args.batch_size}; "
                         "lower --batch-size")
    # The book estimates training loss/accuracy on a few shuffled training batches; a separate loader with
    # its own generator does that without changing the training order.
    train_eval_loader = loader(train_ds, shuffle=True, seed_offset=1)
    val_loader, test_loader = loader(val_ds, shuffle=False), loader(test_ds, shuffle=False)

    # 2. Only now: the processes and the output folder.
    accelerator = make_accelerator(args.mixed_precision, args.batch_size)
    clear_output(out, overwrite=args.overwrite, is_main_process=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    total_steps = len(train_loader) * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    # As the book: AdamW over model.parameters(); frozen ones have no gradient and are skipped.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, train_loader, train_eval_loader, val_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, train_eval_loader, val_loader, test_loader)

    main = accelerator.is_main_process
    if main:
        from gpt2_scratch.core.allocator import loaded_allocator

        write_args(out, args)
        n_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
        counts = ", ".join(f"{k} {v}" for k, v in splits.train["Label"].value_counts().sort_index().items())
        print(f"model {args.model}{' (random init)' if args.random_init else ''}: {n_params:,} parameters, "
              f"{n_trainable:,} trainable ({args.trainable}); data {data_path}: {len(train_ds)} train ({counts}) / "
              f"{len(val_ds)} val / {len(test_ds)} test, padded to {max_length} tokens; {total_steps} steps of "
              f"{args.batch_size} on {accelerator.num_processes} process(es), "
              f"{'fp32' if accelerator.mixed_precision == 'no' else accelerator.mixed_precision}, {loaded_allocator()} malloc",
              flush=True)
    return Setup(accelerator, model, optimizer, train_loader, train_eval_loader, val_loader, test_loader, out,
                 MetricsLog(out / "metrics.jsonl", enabled=main), total_steps, max_length)


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


def fit(setup: Setup, args: ClassifyArgs) -> tuple[TrainState, bool]:
    """The book's loop; returns (state, whether Ctrl-C stopped it). Classifier runs keep no checkpoints."""
    from gpt2_scratch.train.run import StopRequest, check_loss

    accelerator, model, metrics = setup.accelerator, setup.model, setup.metrics
    main = accelerator.is_main_process
    step, examples_seen, tokens_seen, train_seconds = 0, 0, 0, 0.0
    window_tokens, window_seconds = 0, 0.0

    def state() -> TrainState:
        return TrainState(step=step, epoch=epoch, tokens_seen=tokens_seen, train_seconds=train_seconds,
                          extra={"examples_seen": examples_seen})

    def log_eval(epoch: int) -> None:
        nonlocal window_tokens, window_seconds
        train_loss, _ = evaluate(accelerator, model, setup.train_eval_loader, args.eval_iter)
        val_loss, _ = evaluate(accelerator, model, setup.val_loader, args.eval_iter)
        check_loss(val_loss, step, setup.out / "checkpoints", "validation loss")
        row = {"epoch": epoch, "step": step, "examples_seen": examples_seen, "tokens_seen": tokens_seen,
               "train_loss": train_loss, "val_loss": val_loss,
               "tokens_per_sec": window_tokens / window_seconds if window_seconds else 0.0}
        metrics.log(row)
        if main:
            print(f"epoch {epoch}/{args.epochs} | step {step:>4}/{setup.total_steps} | train loss {train_loss:.3f} | "
                  f"val loss {val_loss:.3f} | {examples_seen} examples | {row['tokens_per_sec']:,.0f} tok/s",
                  flush=True)
        window_tokens, window_seconds = 0, 0.0

    model.train()
    done = False
    epoch = 0
    with StopRequest() as stop:
        for epoch in range(1, args.epochs + 1):
            for batch in setup.train_loader:
                tick = time.perf_counter()
                with accelerator.autocast():
                    loss = model(**batch).loss
                accelerator.backward(loss)
                setup.optimizer.step()
                setup.optimizer.zero_grad(set_to_none=True)
                step += 1
                check_loss(accelerator.reduce(loss.detach(), reduction="mean").item(), step, setup.out / "checkpoints")
                n = batch["labels"].numel() * accelerator.num_processes
                examples_seen += n
                tokens_seen += n * setup.max_length  # processed (padded) tokens: what the compute scales with
                elapsed = time.perf_counter() - tick
                train_seconds += elapsed
                window_tokens += n * setup.max_length
                window_seconds += elapsed
                # The book evaluates after its steps 0, 50, 100, ... (0-based); ours count from 1.
                if (step - 1) % args.eval_freq == 0:
                    log_eval(epoch)
                if stop.agreed(accelerator):
                    if main:
                        print(f"stopped at step {step}; a classifier run keeps no checkpoints (it takes minutes): "
                              "run the command again with --overwrite", flush=True)
                    return state(), True
                if step >= setup.total_steps:
                    done = True
                    break
            # The book's per-epoch accuracy: a few batches of each split.
            accuracy = {name: evaluate(accelerator, model, loader, args.eval_iter)[1] for name, loader in
                        (("train", setup.train_eval_loader), ("val", setup.val_loader), ("test", setup.test_loader))}
            metrics.log({"epoch": epoch, "step": step, "examples_seen": examples_seen, "tokens_seen": tokens_seen,
                         **{f"{k}_accuracy": v for k, v in accuracy.items()}})
            if main:
                print(f"epoch {epoch}/{args.epochs} | accuracy ({args.eval_iter} batches) train {accuracy['train']:.2%} "
                      f"| val {accuracy['val']:.2%} | test {accuracy['test']:.2%}", flush=True)
            if done:
                break
    if (step - 1) % args.eval_freq != 0:
        log_eval(epoch)  # the last step's losses, for the plot and the model card
    return state(), False


def finish(setup: Setup, state: TrainState, args: ClassifyArgs) -> None:
    """The chapter's final numbers (accuracy over the full splits), the classifier, the plots, a push."""
    from gpt2_scratch.train.metrics import plot_curves
    from gpt2_scratch.train.run import save_model_into

    accelerator, model, out = setup.accelerator, setup.model, setup.out
    final = {}
    for name, loader in (("train", setup.train_eval_loader), ("val", setup.val_loader), ("test", setup.test_loader)):
        final[f"{name}_loss"], final[f"{name}_accuracy"] = evaluate(accelerator, model, loader, None)
    setup.metrics.log({"step": state.step, "split": "full", **final})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_model = accelerator.unwrap_model(model)
        final_model.eval()
        save_model_into(out, final_model, None)
        rows = [r for r in setup.metrics.read() if r.get("split") != "full"]
        plot_curves(rows, out)
        plot_curves(rows, out, stem="accuracy", series={"train_accuracy": "training accuracy",
                                                         "val_accuracy": "validation accuracy"}, ylabel="Accuracy")
        rate = state.tokens_seen / state.train_seconds if state.train_seconds else 0.0
        print(f"done: {state.step} steps, {state.extra['examples_seen']} examples in {state.train_seconds / 60:.1f} min "
              f"({rate:,.0f} tok/s); accuracy train {final['train_accuracy']:.2%} | val {final['val_accuracy']:.2%} | "
              f"test {final['test_accuracy']:.2%}; model, metrics, loss.png and accuracy.png in {out}", flush=True)
        if args.push_to_hub:
            from gpt2_scratch.train.publish import push_run

            push_run(out, args.push_to_hub)  # the model files + a card built from OUT's args/metrics/plots
    accelerator.wait_for_everyone()
    accelerator.end_training()
