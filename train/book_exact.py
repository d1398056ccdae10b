"""``train/sft.py --book-exact``: the book's own finetuning loop, step for step.

Chapter 7's ``gpt_instruction_finetuning.py`` (shared/docs/FACTS.md, "The book's code") as a mode of
train/sft.py: from the same weights, its log equals the book's line for line. What makes it exact:

* The model: the book's ``GPTModel`` always has its own ``out_head``, a copy of the token embedding
  when it starts from OpenAI's weights, and the two train apart. So the head is untied (a copy)
  whatever model the run starts from, and the finetuned model is saved untied. No dropout (the
  book finetunes with ``drop_rate`` 0).
* The batches: torch's own ``DataLoader(shuffle=True, drop_last=True)`` under
  ``torch.manual_seed(seed)``, the book's collate with ``allowed_max_length=1024``, and every draw
  the book makes from the global RNG, in its order: each new loader iterator draws its base seed, a
  shuffled one also its permutation's seed, and the book builds its model (whose random init draws
  too) between the first seed and the initial losses. ``replay_book_init`` makes those init draws
  on throw-away tensors of the same shapes, so the batches of the initial train loss are the book's.
* The arithmetic: AdamW(lr, weight_decay) with torch's default implementation, the loss of a batch
  is ``cross_entropy`` over the full-vocabulary logits (mean over its targets), the loss of a loader
  the plain mean of its first ``eval_iter`` batch losses, the epoch-end sample greedy without a KV
  cache (softmax, then argmax, as the book).

What it logs: the book's lines (``Initial losses`` ..., ``Ep 1 (Step 000000): Train loss 2.611, Val
loss 2.668``, each epoch's sample) beside ours. ``metrics.jsonl``: the initial losses as
``{"initial": true, "step": -1, ...}`` (-1 is where the book's ``global_step`` starts, so no row
collides with the 0-based step 0), then one row per evaluation with the book's 0-based ``step``,
``train_loss`` (first ``eval_iter`` batches of the shuffled training loader) and ``val_loss``, and one
``sample`` row per epoch. ``loss.png`` plots the evaluated train and validation losses, as the book's.

It is slower than the default loop on purpose: every evaluation also runs ``eval_iter`` training
batches, the loss projects every position onto the vocabulary (the default projects only those
with a target), and the sample recomputes the whole sequence for each new token.

The numbers the book's script fixes are train/sft.py's defaults (2 epochs, batch 8, lr 5e-5, weight
decay 0.1, evaluation every 5 steps over 5 batches, seed 123, a 50-token sample) and may be changed:
the loop stays the book's. ``--max-steps`` stops it early (the log is then the first lines of the
book's). Options that would change what the loop computes are refused (``check_args``), as are examples
that had to be cut to fit the model's context and models with dropout (``set_up``). There are no
checkpoints, so no ``--resume``: a run restarts from its first step.

How it plugs in: train/sft.py's set-up calls ``check_args`` and ``set_up``, then chooses ``fit_book_exact``
as the run's loop (train/run.py's ``launch_own_loop``, which builds none of what this loop does not use:
no fused AdamW, scheduler or prepared training loader). The chapter 5 loop would plug in the same way.
"""

from __future__ import annotations

import math
import os
import time
from functools import partial
from itertools import islice

import torch
from torch.utils.data import DataLoader

from gpt2_scratch.tokenizer import ENDOFTEXT, ENDOFTEXT_ID, get_encoding
from gpt2_scratch.convert.book import book_cfg
from gpt2_scratch.core.args import option_name
from gpt2_scratch.core.errors import InputError
from gpt2_scratch.train.data import collate_instruction_batch
from gpt2_scratch.train.metrics import plot_curves
from gpt2_scratch.train.state import Run
from gpt2_scratch.train.stopping import StopRequest, check_loss

BOOK_ALLOWED_MAX_LENGTH = 1024  # the book's collate cuts every batch to this many positions
BOOK_SAMPLE_TOKENS = 50  # new tokens of the book's epoch-end sample

# (field, the book's value, what the book does instead): any other value changes what the loop computes.
BOOK_SETTINGS = (
    ("offline_demo", False, "its profile changes a dozen settings"),
    ("mixed_precision", "no", "the book trains in fp32"),
    ("grad_accum", 1, "the book steps after every batch"),
    ("max_grad_norm", 0.0, "the book does not clip gradients"),
    ("lr_schedule", "constant", "the book keeps the learning rate constant"),
    ("warmup_steps", 0, "the book has no warmup"),
    ("group_by_length", False, "the book's batches come from a shuffled DataLoader"),
    ("mask_prompt", False, "the book's loss covers the prompt (masking it is exercise 7.2)"),
    ("shuffle_split", False, "the book splits in file order"),
    ("prompt_style", "alpaca", "the book's prompt is alpaca (phi3 is exercise 7.1)"),
    ("max_length", None, f"the book's collate cuts batches at {BOOK_ALLOWED_MAX_LENGTH} tokens"),
    ("too_long", "truncate", "the book drops no example"),
    ("resume", None, "a --book-exact run saves no checkpoint to resume from"),
    ("save_every", 0, "a --book-exact run saves no checkpoint (it cannot be resumed)"),
)


# ---------------------------------------------------------------------------------------------------
# Checks and set-up (called from train/sft.py's set_up, before anything is written)
# ---------------------------------------------------------------------------------------------------


def check_args(args) -> None:
    """``--mixed-precision auto`` made fp32 (the book's, whatever the machine could do); one InputError naming
    the first option --book-exact cannot honour."""
    if args.mixed_precision == "auto":
        args.mixed_precision = "no"
    check_book_settings(args, BOOK_SETTINGS, script="train/sft.py")
    if getattr(args, "lora", None) is not None or getattr(args, "lora_r", None) is not None:
        raise InputError("--book-exact cannot run with --lora: the book's chapter 7 script finetunes every weight "
                         "(its LoRA exercise is another script); leave --lora out, or drop --book-exact")


def check_book_settings(args, settings, *, script: str) -> None:
    """One InputError naming the first option a book-exact loop (chapter 7's here, chapter 5's in
    train/book_pretrain.py) cannot honour: ``settings`` are (field, the book's value, what the book does
    instead); and the book's loops are single-process."""
    for name, book_value, why in settings:
        value = getattr(args, name)
        if value != book_value:
            flag = option_name(name)
            shown = flag if isinstance(value, bool) else f"{flag} {value}"
            raise InputError(f"--book-exact cannot run with {shown}: {why}; leave it out, or drop --book-exact")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        raise InputError(f"--book-exact runs the book's single-process loop, but {processes} processes were "
                         f"launched; run it with `python {script}` (or accelerate launch --num_processes 1)")


def set_up(model, data, context: int) -> None:
    """Make the loaded model the book's (its own LM head, no dropout) and check the data fits the loop.

    Examples as long as the context were cut by ``prepare_instruction_data``, and the book cuts
    nothing below 1024 tokens (with a shorter context its model fails on them), so they are refused.
    """
    drop_rate = getattr(model.config, "drop_rate", 0.0)
    if drop_rate:
        raise InputError(f"--book-exact: the model has drop_rate {drop_rate}, but the book finetunes without "
                         "dropout (and dropout draws from the RNG that orders its batches); set drop_rate to 0.0 "
                         "in the model's config.json")
    for split in ("train", "validation"):
        for index, ids in enumerate(getattr(data, split)["input_ids"]):
            if len(ids) >= context:
                raise InputError(f"--book-exact: {split} example {index} is {len(ids)} tokens, the model's whole "
                                 f"{context}-token context, so it was cut to fit, which the book's loop does not do; "
                                 f"use examples shorter than {context} tokens or a model with a longer context")
            if ENDOFTEXT_ID in ids:
                raise InputError(f"--book-exact: {split} example {index} contains <|endoftext|> as text, which the "
                                 "book's tokenizer refuses; remove it from the record")
    untie_head(model)


def untie_head(model) -> None:
    """Give the LM head its own copy of the token embedding (the book's separate ``out_head``)."""
    head, embedding = model.lm_head, model.transformer.wte
    if head.weight is embedding.weight or model.config.tie_word_embeddings:
        head.weight = torch.nn.Parameter(embedding.weight.detach().clone())
        model.config.tie_word_embeddings = False  # saved so: from_pretrained keeps the head apart
        if hasattr(model, "all_tied_weights_keys"):  # transformers' record of what it ties, made at init
            model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


# ---------------------------------------------------------------------------------------------------
# The book's RNG, data, losses and sample
# ---------------------------------------------------------------------------------------------------


def replay_book_init(cfg: dict) -> None:
    """Draw from the global RNG exactly what building the book's ``GPTModel(cfg)`` draws, in its order.

    Each module initialises its parameters as it is built: the two embeddings ``normal_``, every
    ``nn.Linear`` ``uniform_`` on its weight, then on its bias. How many numbers a draw takes depends
    only on the tensor's size and dtype, not on the bounds, so the same calls on throw-away float32
    tensors of the same shapes, one at a time, leave the generator where the book's model leaves it.
    """
    vocab, context, emb, layers = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"], cfg["n_layers"]

    def normal(*shape: int) -> None:
        torch.empty(shape, dtype=torch.float32).normal_()

    def linear(d_in: int, d_out: int, bias: bool = True) -> None:
        torch.empty((d_out, d_in), dtype=torch.float32).uniform_()
        if bias:
            torch.empty((d_out,), dtype=torch.float32).uniform_()

    normal(vocab, emb)  # tok_emb
    normal(context, emb)  # pos_emb
    for _ in range(layers):
        for _ in range(3):  # W_query, W_key, W_value
            linear(emb, emb, bias=bool(cfg["qkv_bias"]))
        linear(emb, emb)  # out_proj (its causal mask is ones, not random)
        linear(emb, 4 * emb)  # ff.layers.0
        linear(4 * emb, emb)  # ff.layers.2 (LayerNorms start at ones and zeros)
    linear(emb, vocab, bias=False)  # out_head


def book_loaders(data, batch_size: int):
    """(train, validation) loaders as the book makes them; the caller seeds the global RNG first."""
    collate = partial(collate_instruction_batch, allowed_max_length=BOOK_ALLOWED_MAX_LENGTH)
    # No generator: the loaders draw from the global RNG, as the book's do (what orders its batches).
    train = DataLoader(list(data.train["input_ids"]), batch_size=batch_size, collate_fn=collate, shuffle=True,
                       drop_last=True, num_workers=0)
    validation = DataLoader(list(data.validation["input_ids"]), batch_size=batch_size, collate_fn=collate,
                            shuffle=False, drop_last=False, num_workers=0)
    return train, validation


def book_batch_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch's targets (``IGNORE_INDEX`` skipped), from the full-vocabulary logits
    (the book projects every position; the model's one loss path, ``label_logprobs``, takes their mean)."""
    return model(inputs, shift_labels=targets, use_cache=False).loss


@torch.no_grad()
def book_loader_loss(model, loader, num_batches: int, device) -> float:
    """Plain mean of the first ``num_batches`` batch losses; a new iterator (RNG draws) as in the book."""
    if len(loader) == 0:
        return math.nan  # the book returns before making an iterator: no draw
    num_batches = min(num_batches, len(loader))
    total = 0.0
    for inputs, targets in islice(loader, num_batches):
        total += book_batch_loss(model, inputs.to(device), targets.to(device)).item()
    return total / num_batches


@torch.no_grad()
def book_sample(model, prompt: str, max_new_tokens: int, device) -> str:
    """The book's epoch-end sample: greedy, the whole (cropped) sequence through the model for every new
    token, softmax then argmax, decoded by tiktoken; newlines shown as spaces."""
    encoding = get_encoding()
    context = model.config.max_position_embeddings
    ids = torch.tensor([encoding.encode(prompt, allowed_special={ENDOFTEXT})], device=device)  # (1, T)
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:], use_cache=False, logits_to_keep=1).logits[:, -1, :]  # (1, vocab)
        # softmax first, as the book: probabilities that round to equal values resolve to the first index
        next_id = torch.softmax(logits, dim=-1).argmax(dim=-1, keepdim=True)  # (1, 1)
        ids = torch.cat([ids, next_id], dim=1)
    return encoding.decode(ids[0].tolist()).replace("\n", " ")


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------


def book_initial_losses(run: Run, model, train_loader, val_loader) -> None:
    """The book's step 4: the losses before training, logged, and printed as ours and as the book's lines."""
    args, device = run.args, run.accelerator.device
    model.eval()
    initial = {"epoch": 0, "step": -1, "initial": True,
               "train_loss": book_loader_loss(model, train_loader, args.eval_iter, device),
               "val_loss": book_loader_loss(model, val_loader, args.eval_iter, device), "tokens_seen": 0}
    run.log(initial)
    print(f"initial losses | train {initial['train_loss']:.3f} | val {initial['val_loss']:.3f}", flush=True)
    print(f"Initial losses\n   Training loss: {initial['train_loss']}\n   Validation loss: {initial['val_loss']}",
          flush=True)


def book_step(model, optimizer, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """One step of the book's ``train_model_simple``; returns the batch's loss (a host sync, as the book's)."""
    optimizer.zero_grad()
    loss = book_batch_loss(model, inputs, targets)
    loss.backward()
    optimizer.step()
    return loss.item()


def book_evaluate(run: Run, model, loaders, epoch: int, global_step: int, bar, rate: float) -> None:
    """An evaluation of the book's loop (``evaluate_model``: the first eval_iter batches of the shuffled
    training loader and of the validation loader), logged, and printed as our line and the book's."""
    args, state, device = run.args, run.state, run.accelerator.device
    train_loader, val_loader = loaders
    model.eval()
    row = {"epoch": epoch + 1, "step": global_step,
           "train_loss": book_loader_loss(model, train_loader, args.eval_iter, device),
           "val_loss": book_loader_loss(model, val_loader, args.eval_iter, device),
           "tokens_seen": state.tokens_seen}
    model.train()
    run.log(row)
    bar.write(f"epoch {epoch + 1}/{args.epochs} | step {state.step:>5}/{run.total_steps} | train "
              f"{row['train_loss']:.3f} | val {row['val_loss']:.3f} | tokens {state.tokens_seen:,} | "
              f"{rate:,.0f} tok/s")
    bar.write(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {row['train_loss']:.3f}, "
              f"Val loss {row['val_loss']:.3f}")
    state.last_eval_step = state.step


def fit_book_exact(run: Run, task) -> int | None:
    """The book's steps 2-5 (FACTS.md) on the run's model and the task's data (``task.data``,
    ``task.sample_prompt``: an SFTTask); returns None, or the exit code when Ctrl-C or SIGTERM stopped it. It
    uses the shared pieces that change no number: the run's state, metrics (and trackers), the stop request
    and the NaN guard.

    The run's optimizer, scheduler and loaders are not used: the book's AdamW and DataLoaders are
    made here, in the book's order relative to its seeds.
    """
    from tqdm.auto import tqdm  # deferred: tqdm.auto probes for notebooks at import

    args, accelerator, state = run.args, run.accelerator, run.state
    model = accelerator.unwrap_model(run.model)
    device = accelerator.device
    checkpoint_root = run.checkpoint_root  # never written; named by check_loss's message

    # 2.-3. Seed, the loaders, and the draws of the book's model init that come between them and step 4.
    torch.manual_seed(args.seed)
    train_loader, val_loader = book_loaders(task.data, args.batch_size)
    replay_book_init(book_cfg(model.config))

    book_initial_losses(run, model, train_loader, val_loader)  # 4.

    # 5. The optimizer (torch's default AdamW, as the book's), the second seed, the loop.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    torch.manual_seed(args.seed)
    bar = tqdm(total=run.total_steps, desc="sft --book-exact", unit="step", dynamic_ncols=True)
    window_tokens, window_seconds = 0, 0.0  # throughput since the last evaluation line

    with StopRequest() as stop:
        for epoch in range(args.epochs):
            if state.step >= run.total_steps:  # --max-steps ended the run at an epoch's end
                break
            model.train()
            for inputs, targets in train_loader:
                tick = time.perf_counter()
                step_loss = book_step(model, optimizer, inputs.to(device), targets.to(device))
                state.step += 1
                state.batches_done += 1
                state.tokens_seen += inputs.numel()  # padding included, as the book counts
                elapsed = time.perf_counter() - tick
                state.train_seconds += elapsed
                window_tokens += inputs.numel()
                window_seconds += elapsed
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}")
                check_loss(step_loss, state.step, checkpoint_root)

                global_step = state.step - 1  # the book's counter: 0 after the first step
                if global_step % args.eval_freq == 0:
                    book_evaluate(run, model, (train_loader, val_loader), epoch, global_step, bar,
                                  window_tokens / window_seconds if window_seconds else 0.0)
                    window_tokens, window_seconds = 0, 0.0
                if stop.requested:
                    bar.close()
                    print(f"stopped at step {state.step}: {stop.cause}; a --book-exact run cannot be resumed: start "
                          "it again (--overwrite) to get the book's log", flush=True)
                    return stop.exit_code
                if state.step >= run.total_steps:
                    break
            if state.batches_done < len(train_loader):  # --max-steps stopped it inside the epoch
                break
            model.eval()
            sample = book_sample(model, task.sample_prompt, args.sample_tokens, device)
            model.train()
            bar.write(sample)  # the book prints the sample alone on its line
            run.log({"epoch": epoch + 1, "step": state.step - 1, "sample": sample})
            state.epoch += 1
            state.batches_done = 0
    bar.close()
    return None


def plot_book_curves(rows: list[dict], out) -> None:
    """loss.png/pdf as the book draws them: the evaluated train and validation losses over its steps."""

    plot_curves([r for r in rows if not r.get("initial")], out,
                series={"train_loss": "training loss", "val_loss": "validation loss"})
