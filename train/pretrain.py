"""Pretraining on raw text (the book's chapter 5), from its short story to a corpus bigger than memory.

    accelerate launch train/pretrain.py --data PATH|FOLDER|GLOB|FILE.jsonl|FILE.parquet|DATASET [--val-data ...]
        [--text-column text] [--val-fraction 0.1] [--model gpt2-small|DIR] [--random-init [--n-layers N ...]]
        [--context-length L] [--stride S] [--epochs 10] [--batch-size 2] [--lr 5e-4] [--weight-decay 0.1]
        [--eval-freq 5] [--eval-iter 1] [--sample-prompt "Every effort moves you"] [--book-exact] ...
    python train/pretrain.py ...                 # the same, one process (= gpt2-scratch pretrain ...)
    python train/pretrain.py --book-exact --data ../shared/data/the-verdict.txt    # the book's run, line for line

The defaults are the book's chapter-5 settings (gpt_train.py): batch 2, AdamW lr 5e-4 weight decay 0.1,
10 epochs, evaluation every 5 steps over 1 batch, windows of the model's context with a stride of one
window, a 50-token greedy sample of "Every effort moves you" after each epoch. The corpus is tokenized
once into a cached token file and read memory-mapped (train/token_cache.py); the training part is cut
into windows exactly as the book's ``GPTDatasetV1``. What a run leaves in OUT:

    config.json model.safetensors generation_config.json tokenizer files    the model (no chat template)
    pretraining.json     what it was trained on: the corpus's fingerprint, its tokens, the tokens seen
    args.json metrics.jsonl loss.png loss.pdf checkpoints/      as every training command

``PretrainTask`` is what is pretraining's own in the one loop (train/loop.py): the next-token loss of a
batch of windows, what an evaluation measures (validation loss and perplexity), the epoch-end sample and
the outputs. ``--book-exact`` runs chapter 5's own loop instead (train/book_pretrain.py).
"""

from __future__ import annotations

if __name__ == "__main__":  # `python train/pretrain.py ARGS` and `accelerate launch train/pretrain.py ARGS`
    from gpt2_scratch.core.cli import run_script

    run_script("pretrain")

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from gpt2_scratch.commands import preset_config, shape_options
from gpt2_scratch.configuration_gpt2_scratch import PRESETS
from gpt2_scratch.convert.resolve import load_model
from gpt2_scratch.core.args import arg, option_name, redefault
from gpt2_scratch.core.errors import InputError
from gpt2_scratch.modeling_gpt2_scratch import GPT2ScratchForCausalLM
from gpt2_scratch.tokenizer import get_tokenizer
from gpt2_scratch.train import book_pretrain
from gpt2_scratch.train.data import EpochBatchSampler, evaluation_sampler
from gpt2_scratch.train.lm_outputs import epoch_sample, save_language_model
from gpt2_scratch.train.loop import sums_over
from gpt2_scratch.train.metrics import plot_curves
from gpt2_scratch.train.options import ModelOptions, RunOptions
from gpt2_scratch.train.pretrain_record import write_record
from gpt2_scratch.train.run import launch, launch_own_loop, run_training, start
from gpt2_scratch.train.state import fingerprint
from gpt2_scratch.train.task import Task, mean_loss
from gpt2_scratch.train.token_cache import TokenWindows, WindowCheck, collate_windows, tokenized_corpus



@dataclass
class PretrainArgs(ModelOptions, RunOptions):
    """Pretrain (or continue pretraining) a GPT-2 on raw text (the book's chapter 5) with Accelerate."""

    data: str = arg("", "the corpus: a text file, a folder or glob of text files, a JSONL/JSON/Parquet file with a "
                        "text column, or a datasets save_to_disk folder / Hub id")
    val_data: str | None = arg(None, "a separate validation corpus (same forms as --data); default: the last "
                                     "--val-fraction of --data's characters")
    text_column: str = arg("text", "the column holding the text, for records and data sets")
    val_fraction: float = arg(0.1, "without --val-data: the last fraction of the corpus's characters held out "
                                   "(the book's 90/10 split)", above=0, at_most=0.5)
    context_length: int | None = arg(None, "window length in tokens (default: the model's context); with "
                                           "--random-init and a preset also the model's context", at_least=2)
    stride: int | None = arg(None, "tokens between the starts of two windows (default: the window length, no "
                                   "overlap, as the book)", at_least=1)
    n_layers: int | None = arg(None, "with --random-init and a preset: override the number of layers", at_least=1)
    emb_dim: int | None = arg(None, "with --random-init and a preset: override the embedding width", at_least=1)
    n_heads: int | None = arg(None, "with --random-init and a preset: override the number of attention heads",
                              at_least=1)
    drop_rate: float | None = arg(None, "with --random-init: dropout rate (the book's chapter 5: 0.1)", at_least=0,
                                  at_most=0.9)
    qkv_bias: bool = arg(True, "with --random-init: a bias on the query/key/value projection (GPT-2's; "
                               "--no-qkv-bias: the book's chapter 5 model)")
    tie_head: bool = arg(True, "with --random-init: the output head is the token embedding (GPT-2's; "
                               "--no-tie-head: a head of its own, the book's out_head)")
    sample_prompt: str = arg("Every effort moves you", "the prompt greedily continued after each epoch",
                             resume_may_change=True)
    sample_tokens: int = arg(50, "new tokens of that sample", at_least=1, resume_may_change=True)
    token_cache: str | None = arg(None, "folder of tokenized corpora (default $GPT2_SCRATCH_CACHE/tokens or "
                                        "~/.cache/gpt2-scratch/tokens)", resume_may_change=True)
    tokenize_threads: int | None = arg(None, "threads that tokenize (default: the CPUs this process may use)",
                                       at_least=1, resume_may_change=True)
    book_exact: bool = arg(False, "run the book's chapter-5 gpt_train.py step for step (one process, fp32, its "
                                  "model and init, dropout 0.1; train/book_pretrain.py): its log lines and numbers")
    model: str = redefault(ModelOptions, "model", "gpt2-small")
    out: str = redefault(RunOptions, "out", "runs/pretrain")
    epochs: int = redefault(RunOptions, "epochs", 10, "passes over the training windows (the book: 10)")
    batch_size: int = redefault(RunOptions, "batch_size", 2, "global batch size in windows (the book: 2)")
    lr: float = redefault(RunOptions, "lr", 5e-4, "peak learning rate (AdamW; the book's chapter 5: 5e-4)")
    eval_iter: int = redefault(RunOptions, "eval_iter", 1, "batches per evaluation (the book's chapter 5: 1)")

    def with_explicit(self, explicit: set[str]) -> "PretrainArgs":
        """--book-exact fills in the book's settings for every option not given on the command line."""
        if not self.book_exact:
            return self
        return dataclasses.replace(self, **{k: v for k, v in book_pretrain.BOOK_DEFAULTS.items() if k not in explicit})


def run(args: PretrainArgs) -> int:
    """set-up → the loop (or the book's) → finish; returns the exit code."""
    return run_training(args, set_up)


# ---------------------------------------------------------------------------------------------------
# Set-up: every check first, then the first write
# ---------------------------------------------------------------------------------------------------


def build_model(args: PretrainArgs):
    """The model to pretrain: ``--model`` loaded (continued pretraining), or a preset's shape with the shape
    options and ``--random-init``."""
    shape = shape_options(args)
    fields = {k: v for k, v in (("drop_rate", args.drop_rate), ("qkv_bias", False if not args.qkv_bias else None),
                                ("tie_word_embeddings", False if not args.tie_head else None)) if v is not None}
    if args.random_init and args.model in PRESETS:
        return GPT2ScratchForCausalLM(preset_config(args.model, shape, command=f"--model {args.model} --random-init",
                                                    **fields))
    given = [option_name(k) for k in shape if k != "context_length"] + [
        flag for flag, on in (("--drop-rate", args.drop_rate is not None), ("--no-qkv-bias", not args.qkv_bias),
                              ("--no-tie-head", not args.tie_head)) if on]
    if given:
        raise InputError(f"{given[0]} shapes a new model: it needs --random-init and a preset --model "
                         f"({', '.join(PRESETS)})")
    return load_model(args.model, random_init=args.random_init, models_dir=args.models_dir)


def window_length(args: PretrainArgs, context: int) -> int:
    """The windows' length: --context-length, at most the model's context (its default)."""
    length = args.context_length or context
    if length > context:
        raise InputError(f"--context-length {length} is longer than the {context}-token context of --model "
                         f"{args.model}; pass at most {context}")
    return length


def window_check(args: PretrainArgs, length: int, *, validation_corpus: bool = False) -> WindowCheck:
    """Refuses a part of --data (or the --val-data corpus) too short for one window, naming it and the fixes;
    token_cache applies it before anything is written."""
    flag, spec = ("--val-data", args.val_data) if validation_corpus else ("--data", args.data)

    def refuse(part: str, tokens: int) -> InputError:
        what = "validation" if validation_corpus or part == "val" else "training"
        fix = ("give a longer validation corpus or a shorter --context-length" if validation_corpus else
               "raise --val-fraction, give more text, pass --val-data, or use a shorter --context-length"
               if part == "val" else "give more text or a shorter --context-length")
        return InputError(f"{flag} {spec}: the {what} part is {tokens:,} tokens, too short for one window of "
                          f"{length} tokens plus its next-token target; {fix}")

    return WindowCheck(length, refuse)


def load_corpora(args: PretrainArgs, length: int):
    """(training corpus, validation corpus or None): tokenized now (a line says so, from the one process that
    did), or found in the token cache; a corpus too short for one window of ``length`` is refused first."""
    wanted = [("--data", args.data, args.val_fraction if args.val_data is None else 0.0, False)]
    if args.val_data is not None:  # all of --data trains, the other corpus validates
        wanted.append(("--val-data", args.val_data, 0.0, True))
    corpora = []
    for flag, spec, val_fraction, validates in wanted:
        corpus = tokenized_corpus(spec, val_fraction=val_fraction, flag=flag, text_column=args.text_column,
                                  cache_dir=args.token_cache, threads=args.tokenize_threads,
                                  check=window_check(args, length, validation_corpus=validates),
                                  on_wait=lambda line: print(line, flush=True))
        if not corpus.reused:
            print(f"tokenized {flag} {spec}: {corpus.train.tokens + (corpus.val.tokens if corpus.val else 0):,} "
                  f"tokens into {corpus.train.path.parent}", flush=True)
        corpora.append(corpus)
    return corpora[0], corpora[1] if len(corpora) > 1 else None


def corpus_windows(args: PretrainArgs, train, validation, length: int):
    """(training windows, validation windows): the book's windows of ``length`` over each part."""
    stride = args.stride or length
    val_file = validation.train if validation is not None else train.val
    return TokenWindows(train.train.path, train.train.tokens, length, stride), \
        TokenWindows(val_file.path, val_file.tokens, length, stride)


def set_up(args: PretrainArgs):
    """Every check, the corpus (tokenized once) and the model, then ``launch``: (Run, PretrainTask).
    ``--book-exact`` chooses chapter 5's loop (train/book_pretrain.py) as the run's ``fit``."""
    from accelerate.utils import set_seed  # deferred: accelerate is heavy and only training needs it

    # 1. Arguments and the output folder: nothing is written or deleted until every check has passed.
    if args.book_exact:
        book_pretrain.check_args(args)
    started = start(args, inputs=[("--model", args.model), ("--data", args.data), ("--val-data", args.val_data)])

    # 2. The model (its context sets the windows), then the corpus (tokenized once, then cached): a corpus too
    #    short for one window is refused before it is tokenized into the cache.
    set_seed(args.seed)  # the same random init on every process
    model = build_model(args)
    model.train()
    context = model.config.max_position_embeddings
    length = window_length(args, context)
    if args.sample_tokens >= context:
        raise InputError(f"--sample-tokens {args.sample_tokens} leaves no room for a prompt in the {context}-token "
                         f"context of {args.model}; pass at most {context - 1}")
    train, validation = load_corpora(args, length)
    data_sha256 = fingerprint({"train": train.fingerprint, "val": validation.fingerprint if validation else None})
    started.check_data(data_sha256, f"--data {args.data}")
    train_windows, val_windows = corpus_windows(args, train, validation, length)

    # 3. The batches: shuffled windows, a new order each epoch from (seed, epoch) alone.
    lengths = [train_windows.context] * len(train_windows)
    train_sampler = EpochBatchSampler(lengths, args.batch_size, shuffle=True, drop_last=True, seed=args.seed)
    if len(train_sampler) == 0:
        raise InputError(f"--data {args.data}: {len(train_windows)} training windows make no full batch of "
                         f"{args.batch_size}; lower --batch-size or --stride")

    # 4. Only now: the processes, the output folder, the loop's objects.
    evaluation = {}
    if args.book_exact:
        run = launch_own_loop(started, model=model, batches_per_epoch=len(train_sampler), data_sha256=data_sha256,
                              fit=book_pretrain.fit_book_pretrain)
    else:
        loaders = {name: DataLoader(windows, collate_fn=collate_windows, batch_sampler=evaluation_sampler(
            [windows.context] * len(windows), args.batch_size, eval_iter=args.eval_iter))
            for name, windows in (("validation", val_windows), ("train", train_windows))}
        run, evaluation = launch(started, model=model, train_dataset=train_windows, train_sampler=train_sampler,
                                 collate=collate_windows, eval_loaders=loaders, data_sha256=data_sha256)
    if run.accelerator.is_main_process:
        print_header(run, args, model, train, train_windows, val_windows)
    return run, PretrainTask(args, get_tokenizer(), train, validation, train_windows, val_windows,
                             evaluation.get("validation"), evaluation.get("train"))


def print_header(run, args: PretrainArgs, model, train, train_windows, val_windows) -> None:
    """The run's first line: the model, the corpus, the windows, the steps, the precision."""
    print(f"model {args.model}{' (random init)' if args.random_init else ''}: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, context {model.config.max_position_embeddings}; "
          f"data {args.data}: {train.train.tokens:,} training / {val_windows.n_tokens:,} validation tokens "
          f"({'cached' if train.reused else 'tokenized now'}, corpus {train.fingerprint[:12]}), "
          f"{len(train_windows):,} / {len(val_windows):,} windows of {train_windows.context} (stride "
          f"{train_windows.stride}); {run.steps_line('windows')}", flush=True)


# ---------------------------------------------------------------------------------------------------
# The task: what is pretraining's own in the one loop
# ---------------------------------------------------------------------------------------------------


@dataclass
class PretrainTask(Task):
    """Next-token cross-entropy over every position of each window (train/loop.py runs it)."""

    args: PretrainArgs
    tokenizer: Any
    corpus: Any  # token_cache.TokenizedCorpus of --data
    val_corpus: Any  # of --val-data, or None
    train_windows: Any
    val_windows: Any
    val_loader: Any
    train_eval_loader: Any  # the first eval_iter training batches in order: the initial train loss
    name: str = "pretrain"
    units_seen_key: str = "target_tokens_seen"

    def units(self, batch: dict) -> int:
        return batch["labels"].numel()

    def tokens(self, batch: dict) -> int:
        return batch["input_ids"].numel()

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy summed over the batch's positions, and [that sum, their count] (the loop divides by the
        window's count on all processes)."""
        out = model(batch["input_ids"], shift_labels=batch["labels"], use_cache=False, return_logits=False,
                    num_items_in_batch=1)
        count = torch.tensor(float(batch["labels"].numel()), dtype=torch.float64, device=out.loss.device)
        return out.loss, torch.stack([out.loss.detach().double(), count])

    def loss_over(self, run, loader) -> float:
        return mean_loss(sums_over(run, loader, self.args.eval_iter, self.batch_sums))

    def initial(self, run) -> dict:
        """The losses before any training: the first eval_iter batches of each part, in order."""
        val = self.loss_over(run, self.val_loader)
        return {"train_loss": self.loss_over(run, self.train_eval_loader), "val_loss": val,
                "val_perplexity": perplexity(val)}

    def evaluate(self, run, running: torch.Tensor) -> dict:
        val = self.loss_over(run, self.val_loader)
        return {"train_loss_running": mean_loss(running), "val_loss": val, "val_perplexity": perplexity(val)}

    def eval_line(self, run, row: dict) -> str:
        if row.get("initial"):
            return (f"initial losses | train {row['train_loss']:.3f} | val {row['val_loss']:.3f} | val perplexity "
                    f"{row['val_perplexity']:,.1f}")
        return (f"epoch {row['epoch']}/{self.args.epochs} | step {row['step']:>5}/{run.total_steps} | train (running) "
                f"{row['train_loss_running']:.3f} | val {row['val_loss']:.3f} | val ppl {row['val_perplexity']:,.1f} | "
                f"lr {row['lr']:.2e} | tokens {row['tokens_seen']:,} | {row['tokens_per_sec']:,.0f} tok/s")

    def end_of_epoch(self, run, epoch: int):
        return epoch_sample(run, epoch, self.tokenizer, self.args.sample_prompt, self.args.sample_tokens)

    def record(self) -> dict:
        """What the model was trained on: pretraining.json, and the model card's data line."""
        parts = {"train": {"fingerprint": self.corpus.fingerprint, "tokens": self.train_windows.n_tokens,
                           "windows": len(self.train_windows)},
                 "validation": {"fingerprint": (self.val_corpus or self.corpus).fingerprint,
                                "tokens": self.val_windows.n_tokens, "windows": len(self.val_windows)}}
        return {"data": self.args.data, "val_data": self.args.val_data, "text_column": self.args.text_column,
                "tokenizer": "gpt2 BPE (tiktoken r50k)", "context_length": self.train_windows.context,
                "stride": self.train_windows.stride, **parts}

    def finish(self, run) -> None:
        """The model at the top of OUT (no chat template: raw text teaches none), pretraining.json, the loss plot."""
        out, state = run.out, run.state
        model = run.unwrapped()
        if getattr(model.config, "prompt_style", None) is not None:  # continued from an instruction model
            del model.config.prompt_style
        save_language_model(run, model, self.tokenizer, prompt_style=None, lora_settings=None, load_base=None)
        write_record(out, {**self.record(), "tokens_seen": state.tokens_seen, "steps": state.step,
                           "epochs": state.epoch})
        if self.args.book_exact:
            book_pretrain.plot_book_curves(run.metrics.read(), out)
        else:
            rows = [{**r, "train_loss_running": r.get("train_loss_running", r.get("train_loss"))}
                    for r in run.metrics.read()]
            plot_curves(rows, out, series={"train_loss_running": "training loss (running mean of steps)",
                                           "val_loss": "validation loss"})
        print(f"done: {state.step} steps, {state.tokens_seen:,} tokens in {state.train_seconds / 60:.1f} min of "
              f"training; model, pretraining.json, metrics and loss.png/pdf in {out}", flush=True)


def perplexity(loss: float) -> float:
    """exp(loss), or infinity where that overflows (an untrained model's perplexity is about the vocabulary size)."""
    return math.exp(loss) if loss < 700 else math.inf
