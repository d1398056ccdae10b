"""The book's chapter 4-7 model and chapter 7 finetuning loop, rewritten from their description.

This is a test reference, not project code. It re-implements, from the description in
shared/docs/FACTS.md ("The book's code"), what rasbt/LLMs-from-scratch does, so tests can check our
converters and (later) `train/sft.py --book-exact` against it without the book's repository:

- `BookGPT`: the book's `GPTModel`. Same state-dict names and shapes (three q/k/v `nn.Linear`s, a
  *persistent* float causal-mask buffer per block, `norm*.scale/.shift`, `ff.layers.0/2`, a separate
  `out_head`), the same math (biased-variance LayerNorm with eps 1e-5, tanh GELU), and the same
  module construction order, so building it draws from the global RNG exactly as the book's does.
- `book_collate`: the book's collate (pad with <|endoftext|>, shift, ignore every padding target
  after the first *by value*, cut to `allowed_max_length`).
- `calc_loss_batch`, `calc_loss_loader` (first `num_batches` batches, plain mean of batch means),
  `generate_greedy` (no KV cache, crops to the context), `finetune` (chapter 7's script, steps 1-5 of
  FACTS.md in order, every global-RNG draw where the book makes it).

- `GPTDatasetV1`, `pretrain`: chapter 5's `gpt_train.py` (FACTS.md, "The book's chapter 5"): the
  90/10 character split, windows of `max_length` every `stride` tokens, `torch.manual_seed` → the
  model → AdamW → the loaders, then `train_model_simple` with its evaluations and epoch-end samples.

`finetune` and `pretrain` return a `BookRun`: the initial losses, each evaluation's (epoch, step, train, val,
tokens seen), the lines the loop prints (`Ep 1 (Step 000000): Train loss …` and the epoch-end
samples, in the book's format), each training step's loss and the dataset indices of every training
batch, so another implementation can be compared number by number. `encode` is the tokenizer the
book uses (tiktoken's GPT-2 `encode`); `decode` its inverse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

PAD_ID = 50256  # <|endoftext|>
IGNORE = -100


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class BookLayerNorm(nn.Module):
    """LayerNorm with the book's parameter names: (x - mean) / sqrt(biased var + eps) * scale + shift."""

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class BookGELU(nn.Module):
    """GPT-2's tanh approximation of GELU, written out."""

    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class BookAttention(nn.Module):
    """Causal multi-head attention with separate query/key/value projections and a stored mask."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # 1 above the diagonal = a future position; persistent, so it is in every saved state dict.
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        B, T, _ = x.shape

        def heads(t):  # (B, T, d_out) → (B, nh, T, hd)
            return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.W_query(x)), heads(self.W_key(x)), heads(self.W_value(x))
        scores = q @ k.transpose(2, 3)  # (B, nh, T, T)
        scores = scores.masked_fill(self.mask.bool()[:T, :T], -torch.inf)
        weights = self.dropout(torch.softmax(scores / self.head_dim**0.5, dim=-1))
        context = (weights @ v).transpose(1, 2).reshape(B, T, self.d_out)  # (B, T, d_out)
        return self.out_proj(context)


class BookFeedForward(nn.Module):
    def __init__(self, emb_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(emb_dim, 4 * emb_dim), BookGELU(), nn.Linear(4 * emb_dim, emb_dim))

    def forward(self, x):
        return self.layers(x)


class BookBlock(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.att = BookAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"],
                                 cfg["n_heads"], cfg["qkv_bias"])
        self.ff = BookFeedForward(cfg["emb_dim"])
        self.norm1 = BookLayerNorm(cfg["emb_dim"])
        self.norm2 = BookLayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class BookGPT(nn.Module):
    """The book's GPTModel(cfg); cfg keys vocab_size, context_length, emb_dim, n_heads, n_layers,
    drop_rate, qkv_bias."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[BookBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = BookLayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device)))
        return self.out_head(self.final_norm(self.trf_blocks(x)))  # (B, T, vocab or num_classes)


def make_classifier(model: BookGPT, num_classes: int = 2) -> BookGPT:
    """Chapter 6: the LM head gives way to a Linear(emb_dim, num_classes) with a bias."""
    model.out_head = nn.Linear(model.out_head.in_features, num_classes)
    return model


def perturbed(model: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """Add noise to every parameter: init leaves LayerNorms and biases trivial, and tests need every
    tensor to matter (a transposed or swapped tensor must change the logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@torch.no_grad()
def generate_greedy(model: BookGPT, idx: torch.Tensor, max_new_tokens: int, context_size: int) -> torch.Tensor:
    """The book's plain generation: the whole (cropped) sequence every step, argmax of the softmax of the
    last logits (softmax first, as the book: logits that round to equal probabilities pick the first),
    never stopping early."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1, :]  # (B, vocab)
        idx = torch.cat([idx, torch.softmax(logits, dim=-1).argmax(dim=-1, keepdim=True)], dim=1)
    return idx


# ---------------------------------------------------------------------------------------------
# Chapter 7: data, losses, the finetuning loop
# ---------------------------------------------------------------------------------------------
def format_input(entry: dict) -> str:
    """The Alpaca prompt of chapter 7."""
    text = ("Below is an instruction that describes a task. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{entry['instruction']}")
    return text + (f"\n\n### Input:\n{entry['input']}" if entry.get("input") else "")


class InstructionDataset(Dataset):
    """Each entry tokenized once: prompt + "\\n\\n### Response:\\n" + output."""

    def __init__(self, data: Sequence[dict], encode: Callable[[str], list[int]]):
        self.data = list(data)
        self.encoded = [encode(format_input(e) + f"\n\n### Response:\n{e['output']}") for e in self.data]

    def __getitem__(self, index):
        return self.encoded[index]

    def __len__(self):
        return len(self.data)


def book_collate(batch: Sequence[list[int]], pad_token_id: int = PAD_ID, ignore_index: int = IGNORE,
                 allowed_max_length: int | None = None, device: str = "cpu"):
    """(inputs, targets): pad to the longest + 1 with <|endoftext|>, shift by one; every target equal to
    the pad id after the first is ignored (found by value, as the book does); cut to allowed_max_length."""
    width = max(len(item) + 1 for item in batch)
    inputs, targets = [], []
    for item in batch:
        padded = list(item) + [pad_token_id] * (width - len(item))
        x = torch.tensor(padded[:-1])
        y = torch.tensor(padded[1:])
        pads = torch.nonzero(y == pad_token_id).squeeze()
        if pads.numel() > 1:
            y[pads[1:]] = ignore_index
        if allowed_max_length is not None:
            x, y = x[:allowed_max_length], y[:allowed_max_length]
        inputs.append(x)
        targets.append(y)
    return torch.stack(inputs).to(device), torch.stack(targets).to(device)


def calc_loss_batch(x, y, model) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())  # mean over non-ignored targets


def calc_loss_loader(loader, model, num_batches: int | None = None) -> float:
    """Plain mean of the first `num_batches` batch losses (a new iterator: draws from the global RNG)."""
    if len(loader) == 0:
        return float("nan")
    num_batches = len(loader) if num_batches is None else min(num_batches, len(loader))
    total = 0.0
    for i, (x, y) in enumerate(loader):
        if i >= num_batches:
            break
        total += calc_loss_batch(x, y, model).item()
    return total / num_batches


@dataclass
class BookRun:
    """What `finetune` observed; `lines` is exactly what the book prints (one string per line)."""

    initial_train_loss: float = math.nan
    initial_val_loss: float = math.nan
    evals: list[dict] = field(default_factory=list)  # {"epoch", "step", "train_loss", "val_loss", "tokens_seen"}
    lines: list[str] = field(default_factory=list)  # the loop's printed lines: evaluations and samples
    samples: list[str] = field(default_factory=list)  # decoded epoch-end samples, newlines kept
    train_batches: list[list[int]] = field(default_factory=list)  # dataset indices of each training step
    step_losses: list[float] = field(default_factory=list)  # each training step's loss, before its update


class _Indexed(list):
    """A token list that remembers its dataset index, so batches can be traced without touching RNG."""

    index: int


class _Recorded(Dataset):
    """The dataset, handing out `_Indexed` items."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, i):
        item = _Indexed(self.dataset[i])
        item.index = i
        return item

    def __len__(self):
        return len(self.dataset)


class _RecordingCollate:
    """The collate, remembering the dataset indices of the batch it made last. With num_workers=0 it
    runs when the loop fetches a batch, so right after a fetch `last` is that batch's indices."""

    def __init__(self, allowed_max_length: int):
        self.allowed_max_length = allowed_max_length
        self.last: list[int] = []

    def __call__(self, batch):
        self.last = [getattr(item, "index", -1) for item in batch]
        return book_collate(batch, allowed_max_length=self.allowed_max_length)


def book_split(data: Sequence[dict]) -> tuple[list, list, list]:
    """85% train, 10% test, the rest validation, in file order (1100 records → 935 / 110 / 55)."""
    n_train, n_test = int(len(data) * 0.85), int(len(data) * 0.1)
    return list(data[:n_train]), list(data[n_train:n_train + n_test]), list(data[n_train + n_test:])


def train_model_simple(model, train_loader, val_loader, optimizer, *, num_epochs: int, eval_freq: int,
                       eval_iter: int, start_context: str, encode, decode, sample_tokens: int, run: "BookRun",
                       say: Callable[[str], None], on_batch: Callable[[], None] | None = None) -> None:
    """The book's training loop (chapter 5's ``train_model_simple``, which chapter 7 imports and runs as it is):
    per batch zero_grad, loss, backward, step, count the tokens and the step; every ``eval_freq`` steps
    (0-based, from step 0) the mean loss of the first ``eval_iter`` batches of each loader, in eval mode; after
    each epoch a greedy ``sample_tokens``-token sample of ``start_context`` without a KV cache. ``on_batch``
    records what each batch was (chapter 7's tests compare the batches)."""
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for x, y in train_loader:
            if on_batch is not None:
                on_batch()
            optimizer.zero_grad()
            loss = calc_loss_batch(x, y, model)
            loss.backward()
            optimizer.step()
            run.step_losses.append(loss.item())
            tokens_seen += x.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                model.eval()
                with torch.no_grad():
                    train_loss = calc_loss_loader(train_loader, model, num_batches=eval_iter)
                    val_loss = calc_loss_loader(val_loader, model, num_batches=eval_iter)
                model.train()
                run.evals.append({"epoch": epoch + 1, "step": global_step, "train_loss": train_loss,
                                  "val_loss": val_loss, "tokens_seen": tokens_seen})
                say(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        # Epoch-end sample: greedy, no KV cache.
        model.eval()
        ids = generate_greedy(model, torch.tensor([encode(start_context)]), sample_tokens,
                              context_size=model.pos_emb.weight.shape[0])
        text = decode(ids[0].tolist())
        run.samples.append(text)
        say(text.replace("\n", " "))
        model.train()


def finetune(
    data: Sequence[dict],
    *,
    cfg: dict,
    state_dict: dict | None,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    num_epochs: int = 2,
    batch_size: int = 8,
    lr: float = 5e-5,
    weight_decay: float = 0.1,
    eval_freq: int = 5,
    eval_iter: int = 5,
    allowed_max_length: int = 1024,
    sample_tokens: int = 50,
    seed: int = 123,
    printer: Callable[[str], None] | None = None,
) -> tuple[BookGPT, BookRun]:
    """Chapter 7's script on `data` (all records; split here as the book does), starting from
    `state_dict` (the book's names; None keeps the random init). Returns the model and the run."""
    run = BookRun()

    def say(line: str) -> None:
        run.lines.append(line)
        if printer is not None:
            printer(line)

    # 1. Data.
    train_data, _test_data, val_data = book_split(data)

    collate = _RecordingCollate(allowed_max_length)

    # 2. Seed, then the loaders (creating them draws nothing; iterating them does).
    torch.manual_seed(seed)
    train_loader = DataLoader(_Recorded(InstructionDataset(train_data, encode)), batch_size=batch_size,
                              collate_fn=collate, shuffle=True, drop_last=True, num_workers=0)
    val_loader = DataLoader(InstructionDataset(val_data, encode), batch_size=batch_size, collate_fn=collate,
                            shuffle=False, drop_last=False, num_workers=0)
    # (The book also builds a test loader here; unused by the loop, and building it draws nothing.)

    # 3. The model: its random init draws from the global RNG, then the weights replace it.
    model = BookGPT(cfg)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.eval()

    # 4. Initial losses (first eval_iter batches of each loader).
    with torch.no_grad():
        run.initial_train_loss = calc_loss_loader(train_loader, model, num_batches=eval_iter)
        run.initial_val_loss = calc_loss_loader(val_loader, model, num_batches=eval_iter)

    # 5. Optimizer, seed again, the loop.
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    torch.manual_seed(seed)
    train_model_simple(model, train_loader, val_loader, optimizer, num_epochs=num_epochs, eval_freq=eval_freq,
                       eval_iter=eval_iter, start_context=format_input(val_data[0]), encode=encode, decode=decode,
                       sample_tokens=sample_tokens, run=run, say=say,
                       on_batch=lambda: run.train_batches.append(collate.last))
    return model, run




# ---------------------------------------------------------------------------------------------
# Chapter 5: pretraining on one text
# ---------------------------------------------------------------------------------------------
class GPTDatasetV1(Dataset):
    """The text tokenized whole; window i is (ids[s:s+L], ids[s+1:s+L+1]) for s in range(0, len - L, stride)."""

    def __init__(self, text: str, encode: Callable[[str], list[int]], max_length: int, stride: int):
        ids = encode(text)
        self.inputs = [torch.tensor(ids[s:s + max_length]) for s in range(0, len(ids) - max_length, stride)]
        self.targets = [torch.tensor(ids[s + 1:s + max_length + 1]) for s in range(0, len(ids) - max_length, stride)]

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        return self.inputs[index], self.targets[index]


def pretrain(
    text: str,
    *,
    cfg: dict,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    num_epochs: int = 10,
    batch_size: int = 2,
    lr: float = 5e-4,
    weight_decay: float = 0.1,
    eval_freq: int = 5,
    eval_iter: int = 1,
    start_context: str = "Every effort moves you",
    sample_tokens: int = 50,
    seed: int = 123,
    printer: Callable[[str], None] | None = None,
) -> tuple[BookGPT, BookRun]:
    """Chapter 5's `gpt_train.py` `main` on `text` with `cfg` (a new model from its own init). Returns the
    model and the run (its evaluations, printed lines, samples and step losses)."""
    run = BookRun()

    def say(line: str) -> None:
        run.lines.append(line)
        if printer is not None:
            printer(line)

    torch.manual_seed(seed)
    model = BookGPT(cfg)  # PyTorch's default init, module by module: draws from the global RNG
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    split = int(0.90 * len(text))
    length = cfg["context_length"]
    train_loader = DataLoader(GPTDatasetV1(text[:split], encode, length, length), batch_size=batch_size,
                              shuffle=True, drop_last=True, num_workers=0)
    val_loader = DataLoader(GPTDatasetV1(text[split:], encode, length, length), batch_size=batch_size,
                            shuffle=False, drop_last=False, num_workers=0)

    train_model_simple(model, train_loader, val_loader, optimizer, num_epochs=num_epochs, eval_freq=eval_freq,
                       eval_iter=eval_iter, start_context=start_context, encode=encode, decode=decode,
                       sample_tokens=sample_tokens, run=run, say=say)
    return model, run
