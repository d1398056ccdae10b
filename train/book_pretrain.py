"""``train/pretrain.py --book-exact``: the book's chapter-5 pretraining loop, step for step.

Chapter 5's ``gpt_train.py`` (shared/docs/FACTS.md, "The book's chapter 5 (pretraining), run for real
here") as a mode of train/pretrain.py: on ../shared/data/the-verdict.txt it prints the book's own lines,
``Ep 1 (Step 000000): Train loss 9.812, Val loss 9.846`` ..., with the book's numbers. What makes it exact:

* The model: the book's ``GPTModel`` with its cfg (gpt2-small's shape, context 256, dropout 0.1, no
  qkv bias, its own ``out_head``) is our model with the same shape. Its initial weights are PyTorch's
  default module init drawn in the book's construction order right after ``torch.manual_seed(123)``
  (``book_init_state``: the same modules built in the same order), converted by convert/book.py's
  rule table. Our dropout draws what the book's does, in its order (embeddings; per block the attention
  weights after softmax, whose mask scaled-dot-product attention draws with the same ``dropout`` call
  and shape, then the two residual branches), so the masks are the book's.
* The batches: torch's own ``DataLoader`` over the book's windows (``GPTDatasetV1`` = our
  ``TokenWindows``), train ``shuffle=True, drop_last=True``, validation in order, no generator: each
  new iterator draws from the global RNG (its base seed, and a shuffled one its permutation's seed), so
  every epoch and every evaluation of the training loader moves the RNG exactly as the book's do.
* The arithmetic: torch's default ``AdamW(lr, weight_decay)``, the mean cross-entropy of a batch over
  all its positions, a loader's loss the plain mean of its first ``eval_iter`` batch losses, evaluation
  in eval mode, the epoch-end sample greedy over the whole (cropped) sequence, softmax then argmax.

It saves no checkpoint (so no ``--resume``); metrics.jsonl gets one row per evaluation with the book's
0-based step and one ``sample`` row per epoch, loss.png the evaluated losses. The book's settings are
the defaults it fills in (``BOOK_DEFAULTS``); the shape, batch, learning rate, epochs and evaluation
cadence may be changed (the loop stays the book's), what would change the loop is refused.
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader

from gpt2_scratch.convert.book import BODY_RULES, LM_HEAD_RULES, QKV_BIAS_RULES, book_cfg, fuse_qkv
from gpt2_scratch.convert.mapping import Dims, convert_tensors, plan_conversion
from gpt2_scratch.train.book_exact import (book_batch_loss, book_loader_loss, book_sample, check_book_settings,
                                            plot_book_curves)
from gpt2_scratch.train.state import Run
from gpt2_scratch.train.stopping import StopRequest, check_loss

__all__ = ["BOOK_DEFAULTS", "check_args", "book_init_state", "load_book_init", "fit_book_pretrain",
           "plot_book_curves"]

# gpt_train.py's GPT_CONFIG_124M and OTHER_SETTINGS, in our options' names.
BOOK_DEFAULTS = dict(
    model="gpt2-small", random_init=True, context_length=256, drop_rate=0.1, qkv_bias=False, tie_head=False,
    batch_size=2, lr=5e-4, weight_decay=0.1, epochs=10, eval_freq=5, eval_iter=1, seed=123, val_fraction=0.1,
    sample_tokens=50, sample_prompt="Every effort moves you", mixed_precision="no",
)

# (field, the book's value, what the book does instead): any other value changes what the loop computes.
BOOK_SETTINGS = (
    ("random_init", True, "the book's chapter 5 trains a new model from its own initialisation"),
    ("tie_head", False, "the book's GPTModel has an out_head of its own"),
    ("mixed_precision", "no", "the book trains in fp32"),
    ("grad_accum", 1, "the book steps after every batch"),
    ("max_grad_norm", 0.0, "the book does not clip gradients"),
    ("lr_schedule", "constant", "the book keeps the learning rate constant"),
    ("warmup_steps", 0, "the book has no warmup"),
    ("val_data", None, "the book holds out the last 10% of its one text"),
    ("compile", False, "the book runs eagerly"),
    ("resume", None, "a --book-exact run saves no checkpoint to resume from"),
    ("save_every", 0, "a --book-exact run saves no checkpoint (it cannot be resumed)"),
)


def check_args(args) -> None:
    """One InputError naming the first option chapter 5's --book-exact cannot honour."""
    check_book_settings(args, BOOK_SETTINGS, script="train/pretrain.py")


def book_init_state(cfg: dict) -> dict[str, torch.Tensor]:
    """The initial weights of the book's ``GPTModel(cfg)`` under the current global RNG, by the book's names.

    The book builds its modules in this order and each draws its own init as it is built (``nn.Embedding``:
    normal; ``nn.Linear``: kaiming-uniform weight, then a uniform bias); its LayerNorms start at ones and
    zeros and draw nothing. Building the same torch modules in the same order draws the same numbers.
    """
    vocab, context, emb = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"]
    state = {"tok_emb.weight": torch.nn.Embedding(vocab, emb).weight.data,
             "pos_emb.weight": torch.nn.Embedding(context, emb).weight.data}

    def linear(prefix: str, d_in: int, d_out: int, bias: bool = True) -> None:
        layer = torch.nn.Linear(d_in, d_out, bias=bias)
        state[f"{prefix}.weight"] = layer.weight.data
        if bias:
            state[f"{prefix}.bias"] = layer.bias.data

    for i in range(cfg["n_layers"]):
        block = f"trf_blocks.{i}"
        for name in ("W_query", "W_key", "W_value"):
            linear(f"{block}.att.{name}", emb, emb, bias=cfg["qkv_bias"])
        linear(f"{block}.att.out_proj", emb, emb)
        linear(f"{block}.ff.layers.0", emb, 4 * emb)
        linear(f"{block}.ff.layers.2", 4 * emb, emb)
        for norm in ("norm1", "norm2"):
            state[f"{block}.{norm}.scale"], state[f"{block}.{norm}.shift"] = torch.ones(emb), torch.zeros(emb)
    state["final_norm.scale"], state["final_norm.shift"] = torch.ones(emb), torch.zeros(emb)
    linear("out_head", emb, vocab, bias=False)
    return state


def load_book_init(model) -> None:
    """Draw the book's initial weights (global RNG, book order) and put them into ``model`` (our names)."""
    config = model.config
    cfg = book_cfg(config)
    state = book_init_state(cfg)
    dims = Dims(n_vocab=config.vocab_size, n_ctx=config.context_length, n_embd=config.emb_dim,
                n_head=config.n_heads, n_layer=config.n_layers)
    rules = BODY_RULES + (QKV_BIAS_RULES if cfg["qkv_bias"] else ()) + LM_HEAD_RULES
    plan = plan_conversion({k: tuple(v.shape) for k, v in state.items()}, rules, dims, source="the book's init",
                           dims_source="the model's config")
    ours = fuse_qkv(convert_tensors(plan, state.__getitem__))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(ours[name])


def fit_book_pretrain(run: Run, task) -> int | None:
    """gpt_train.py's ``main`` from the seed on, then ``train_model_simple``, on the task's windows; returns
    None, or the exit code when Ctrl-C or SIGTERM stopped it. The book's AdamW and loaders are made here, in
    its order; the run gives only what changes no number (its state, metrics, the stop request, the NaN guard)."""
    from tqdm.auto import tqdm  # deferred: tqdm.auto probes for notebooks at import

    args, state = run.args, run.state
    model = run.unwrapped()
    device = next(model.parameters()).device

    torch.manual_seed(args.seed)
    load_book_init(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    train_loader = DataLoader(task.train_windows, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              num_workers=0)
    val_loader = DataLoader(task.val_windows, batch_size=args.batch_size, shuffle=False, drop_last=False,
                            num_workers=0)
    bar = tqdm(total=run.total_steps, desc="pretrain --book-exact", unit="step", dynamic_ncols=True)
    with StopRequest() as stop:
        for epoch in range(args.epochs):
            model.train()
            for inputs, targets in train_loader:
                tick = time.perf_counter()
                optimizer.zero_grad()
                loss = book_batch_loss(model, inputs.to(device), targets.to(device))
                loss.backward()
                optimizer.step()
                state.step += 1
                state.tokens_seen += inputs.numel()
                state.train_seconds += time.perf_counter() - tick
                state.phase_seconds["train_steps"] = state.train_seconds
                bar.update(1)
                check_loss(loss.item(), state.step, run.checkpoint_root)
                global_step = state.step - 1  # the book's counter: 0 after the first step
                if global_step % args.eval_freq == 0:
                    evaluate(run, model, train_loader, val_loader, epoch, global_step, bar)
                if stop.requested:
                    bar.close()
                    print(f"stopped at step {state.step}: {stop.cause}; a --book-exact run cannot be resumed: start "
                          "it again (--overwrite) to get the book's log", flush=True)
                    return stop.exit_code
                if state.step >= run.total_steps:
                    break
            if state.step < (epoch + 1) * len(train_loader):  # --max-steps stopped it inside the epoch
                break
            model.eval()
            sample = book_sample(model, args.sample_prompt, args.sample_tokens, device)
            model.train()
            run.log({"epoch": epoch + 1, "step": state.step - 1, "sample": sample})
            bar.write(sample)  # the book prints the sample alone on its line
            state.epoch = epoch + 1
    bar.close()
    return None


def evaluate(run: Run, model, train_loader, val_loader, epoch: int, global_step: int, bar) -> None:
    """The book's ``evaluate_model`` (eval mode, the first ``eval_iter`` batches of each loader: new iterators,
    the RNG draws the book makes) and its line."""
    args, state = run.args, run.state
    device = next(model.parameters()).device
    model.eval()
    row = {"epoch": epoch + 1, "step": global_step,
           "train_loss": book_loader_loss(model, train_loader, args.eval_iter, device),
           "val_loss": book_loader_loss(model, val_loader, args.eval_iter, device), "tokens_seen": state.tokens_seen}
    model.train()
    for key in ("train_loss", "val_loss"):
        check_loss(row[key], state.step, run.checkpoint_root, key.replace("_", " "))
    run.log(row)
    bar.write(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {row['train_loss']:.3f}, "
              f"Val loss {row['val_loss']:.3f}")
