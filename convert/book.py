"""The book's saved models ("Build a Large Language Model (From Scratch)", chapters 5-7) ↔ our model.

In:  a `.pth` written with `torch.save(model.state_dict(), ...)` from the book's `GPTModel`, or
     chapter 5's `{"model_state_dict": ..., "optimizer_state_dict": ...}`. It is read with
     `torch.load(weights_only=True)` only, so a file holding anything but tensors (and the plain
     containers around them) is refused before any of its code can run. The config is read off the
     tensors: vocabulary and width from `tok_emb`, context from `pos_emb`, layers from the block
     numbers, `qkv_bias` from whether `W_query.bias` exists; the head count, which no tensor shows,
     from GPT-2's released widths or `n_heads`. A chapter 6 classifier (`out_head` with a bias and a
     few rows) becomes our `GPT2ScratchForSequenceClassification`; a language model's `out_head`
     becomes our `lm_head`, tied to the embedding exactly when the two tensors are equal (a
     finetuned model's are not).
Out: `export_book` writes the state dict that the book's `GPTModel(cfg).load_state_dict(...)`
     accepts (strict: the causal-mask buffers included) and returns that `cfg`.

The conversion is a rule table checked by `convert.mapping.plan_conversion`, as for OpenAI's and
Hugging Face's files. The one structural difference: the book projects query, key and value with
three `nn.Linear` [out, in]; ours is one `c_attn` [in, 3·out] whose output splits into q | k | v.
Each of the three is planned as its own part of `c_attn` (so names and shapes are checked like any
tensor), transposed, and the parts are concatenated in q, k, v order; export splits them again.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import torch

from gpt2_scratch.core.files import atomic_path, path_kind
from gpt2_scratch.convert.errors import ConvertError
from gpt2_scratch.convert.hf import N_HEAD_OF_WIDTH, SafetensorsReader, _weight_files
from gpt2_scratch.convert.mapping import Dims, Rule, convert_tensors, plan_conversion

log = logging.getLogger(__name__)

# Chapter 6's classifier is spam detection: label 0 is "not spam" (ham), 1 is spam
# (train/spam_data.DEFAULT_LABELS, which our classifier training uses too).
BOOK_CLASSIFIER_LABELS = ("ham", "spam")
QKV = ("q", "k", "v")  # the order CausalSelfAttention splits c_attn's output in

# ---------------------------------------------------------------------------------------------
# The rule table: the book's GPTModel state-dict names → ours
# ---------------------------------------------------------------------------------------------
# Layouts (convert.mapping.apply_layout): "same" keeps the tensor; "transpose" turns an nn.Linear
# weight [out, in] into our WideningProjection's [in, out] (c_attn parts, c_fc). The book's out_proj
# and ff.layers.2 are nn.Linear like our c_proj layers, so they are used as stored.


def _e(d: Dims) -> tuple[int]:
    return (d.n_embd,)


def _part(name: str, part: str) -> str:
    """The planned name of one of q, k, v inside our fused c_attn tensor."""
    return f"{name}[{part}]"


_ATT = {"q": "W_query", "k": "W_key", "v": "W_value"}

BODY_RULES: tuple[Rule, ...] = (
    Rule("tok_emb.weight", "transformer.wte.weight", lambda d: (d.n_vocab, d.n_embd)),
    Rule("pos_emb.weight", "transformer.wpe.weight", lambda d: (d.n_ctx, d.n_embd)),
    *(Rule(f"trf_blocks.{{i}}.att.{_ATT[p]}.weight", _part("transformer.h.{i}.attn.c_attn.weight", p),
           lambda d: (d.n_embd, d.n_embd), "transpose") for p in QKV),
    Rule("trf_blocks.{i}.att.out_proj.weight", "transformer.h.{i}.attn.c_proj.weight", lambda d: (d.n_embd, d.n_embd)),
    Rule("trf_blocks.{i}.att.out_proj.bias", "transformer.h.{i}.attn.c_proj.bias", _e),
    Rule("trf_blocks.{i}.ff.layers.0.weight", "transformer.h.{i}.mlp.c_fc.weight",
         lambda d: (4 * d.n_embd, d.n_embd), "transpose"),
    Rule("trf_blocks.{i}.ff.layers.0.bias", "transformer.h.{i}.mlp.c_fc.bias", lambda d: (4 * d.n_embd,)),
    Rule("trf_blocks.{i}.ff.layers.2.weight", "transformer.h.{i}.mlp.c_proj.weight", lambda d: (d.n_embd, 4 * d.n_embd)),
    Rule("trf_blocks.{i}.ff.layers.2.bias", "transformer.h.{i}.mlp.c_proj.bias", _e),
    Rule("trf_blocks.{i}.norm1.scale", "transformer.h.{i}.ln_1.weight", _e),
    Rule("trf_blocks.{i}.norm1.shift", "transformer.h.{i}.ln_1.bias", _e),
    Rule("trf_blocks.{i}.norm2.scale", "transformer.h.{i}.ln_2.weight", _e),
    Rule("trf_blocks.{i}.norm2.shift", "transformer.h.{i}.ln_2.bias", _e),
    Rule("final_norm.scale", "transformer.ln_f.weight", _e),
    Rule("final_norm.shift", "transformer.ln_f.bias", _e),
)
# Only when the book's cfg had qkv_bias=True (as for OpenAI's weights; the book's default is False).
QKV_BIAS_RULES: tuple[Rule, ...] = tuple(
    Rule(f"trf_blocks.{{i}}.att.{_ATT[p]}.bias", _part("transformer.h.{i}.attn.c_attn.bias", p), _e) for p in QKV)
LM_HEAD_RULES: tuple[Rule, ...] = (Rule("out_head.weight", "lm_head.weight", lambda d: (d.n_vocab, d.n_embd)),)


def classifier_head_rules(num_labels: int) -> tuple[Rule, ...]:
    return (Rule("out_head.weight", "score.weight", lambda d: (num_labels, d.n_embd)),
            Rule("out_head.bias", "score.bias", lambda d: (num_labels,)))


# The causal-mask buffer of each block: no weights; checked to be the causal triangle, not converted.
MASK = re.compile(r"^trf_blocks\.(\d+)\.att\.mask$")
_BLOCK = re.compile(r"^trf_blocks\.(\d+)\.")


def causal_mask(n_ctx: int) -> torch.Tensor:
    """The book's mask buffer: float [C, C], 1 above the diagonal (a future position)."""
    return torch.triu(torch.ones(n_ctx, n_ctx), diagonal=1)


# ---------------------------------------------------------------------------------------------
# Reading a .pth safely
# ---------------------------------------------------------------------------------------------
def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split("\n")[0].split())
    return text[:200] or type(err).__name__


def read_book_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in `path` and a label for errors (the file, plus the wrapper key if any)."""
    path = Path(path)
    if not path.is_file():
        what = f"is {path_kind(path) or 'a folder'}, not a file" if os.path.lexists(path) else "no such file"
        raise ConvertError(f"{path}: {what}; pass the .pth the book's code saved (torch.save(model.state_dict(), ...))")
    try:
        try:
            # mmap: the tensors stay in the page cache instead of being read into a second copy.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # the pre-1.6 format cannot be mapped
    except pickle.UnpicklingError as e:
        # weights_only's unpickler stops at the first thing that is not a tensor or plain container,
        # before constructing (or running) it; it also reports bytes that are no pickle at all.
        what = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(e), re.IGNORECASE)
        if what:
            raise ConvertError(f"{path}: refused to unpickle '{what.group(1)}': the file holds more than tensors and "
                               "loading it could run code; only state dicts are read (save with "
                               "torch.save(model.state_dict(), path))") from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(e), re.DOTALL)
        raise ConvertError(f"{path}: not a readable PyTorch file (UnpicklingError: "
                           f"{' '.join(reason.group(1).split()) if reason else _first_line(e)})") from None
    except EOFError:
        raise ConvertError(f"{path}: empty or truncated; not a complete PyTorch file") from None
    except (RuntimeError, OSError, ValueError, KeyError, AttributeError) as e:
        raise ConvertError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {_first_line(e)})") from None

    label = str(path)
    if isinstance(obj, dict) and "model_state_dict" in obj:  # chapter 5's training checkpoint
        obj, label = obj["model_state_dict"], f"{path} ['model_state_dict']"
    if not isinstance(obj, dict) or not obj:
        raise ConvertError(f"{label}: holds a {type(obj).__name__}, not a state dict of tensors (nor "
                           "{'model_state_dict': ...})")
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ConvertError(f"{label}: entry '{name}' is a {type(value).__name__}, not a tensor; expected the "
                               "book's model.state_dict() or {'model_state_dict': ...}")
    return obj, label


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------
def infer_dims(shapes: dict[str, tuple[int, ...]], source: str, n_heads: int | None = None) -> Dims:
    """Vocabulary, width, context and layers from the tensors; heads from `n_heads` or the width."""
    if "tok_emb.weight" not in shapes or "pos_emb.weight" not in shapes:
        found = ", ".join(sorted(shapes)[:3])
        hint = ("; this looks like a Hugging Face GPT-2 state dict: use `gpt2-scratch convert hf`"
                if any(n.startswith(("transformer.", "wte.", "h.0.")) for n in shapes) else "")
        raise ConvertError(f"{source}: no 'tok_emb.weight'/'pos_emb.weight' tensors (found {found}, ...); not a "
                           f"state dict of the book's GPTModel{hint}")
    for name, expected in (("tok_emb.weight", "[vocab_size, emb_dim]"), ("pos_emb.weight", "[context_length, emb_dim]")):
        if len(shapes[name]) != 2:
            raise ConvertError(f"{source}: tensor '{name}' has shape {list(shapes[name])}, expected {expected}")
    n_vocab, n_embd = shapes["tok_emb.weight"]
    n_ctx = shapes["pos_emb.weight"][0]
    blocks = {int(m.group(1)) for name in shapes if (m := _BLOCK.match(name))}
    if not blocks:
        raise ConvertError(f"{source}: no transformer blocks (trf_blocks.N.*) found; not the book's GPTModel")
    if n_heads is None:
        if n_embd not in N_HEAD_OF_WIDTH:
            raise ConvertError(f"{source}: width emb_dim={n_embd} is not one of GPT-2's released sizes "
                               f"({', '.join(map(str, N_HEAD_OF_WIDTH))}), so the number of heads is unknown; "
                               "pass --n-heads (the n_heads of the book's cfg)")
        n_heads = N_HEAD_OF_WIDTH[n_embd]
    if n_heads < 1 or n_embd % n_heads:
        raise ConvertError(f"{source}: emb_dim {n_embd} is not divisible by n_heads {n_heads}; pass the n_heads "
                           "the model was built with")
    return Dims(n_vocab=n_vocab, n_ctx=n_ctx, n_embd=n_embd, n_head=n_heads, n_layer=max(blocks) + 1)


def _check_masks(state: dict[str, torch.Tensor], dims: Dims, source: str) -> None:
    """Each block's stored mask must be the causal triangle our attention always applies."""
    expected = causal_mask(dims.n_ctx).bool()
    for name, mask in state.items():
        if not MASK.match(name):
            continue
        if tuple(mask.shape) != (dims.n_ctx, dims.n_ctx):
            raise ConvertError(f"{source}: tensor '{name}' has shape {list(mask.shape)} but pos_emb.weight implies "
                               f"context_length {dims.n_ctx}, so [{dims.n_ctx}, {dims.n_ctx}]")
        if not torch.equal(mask.bool(), expected):
            raise ConvertError(f"{source}: tensor '{name}' is not the causal mask (ones above the diagonal); "
                               "our attention is always causal and cannot reproduce another mask")


def fuse_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each planned "<c_attn name>[q|k|v]" part by the fused tensor: weights side by side
    ([in, out] each → [in, 3·out]), biases end to end ([3·out])."""
    parts = sorted({name[: -len("[q]")] for name in state if name.endswith(tuple(f"[{p}]" for p in QKV))})
    for name in parts:
        pieces = [state.pop(_part(name, p)) for p in QKV]
        state[name] = torch.cat(pieces, dim=-1)  # (in, 3·out) or (3·out,)
    return state


def load_book_checkpoint(path: str | os.PathLike, *, n_heads: int | None = None,
                         labels: tuple[str, ...] | None = None):
    """Read, check and convert the book's `.pth`; returns our causal LM or sequence classifier (eval mode).

    `n_heads` is needed only when the width is not one of GPT-2's released ones. `labels` names a
    classifier's classes (default: chapter 6's ham/spam for two classes, LABEL_i otherwise).
    """
    from gpt2_scratch.convert.build import classifier_from_state, model_from_state

    state, source = read_book_state(path)
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    dims = infer_dims(shapes, source, n_heads)
    qkv_bias = "trf_blocks.0.att.W_query.bias" in shapes
    classifier = "out_head.bias" in shapes and "out_head.weight" in shapes
    num_labels = shapes["out_head.weight"][0] if classifier else 0
    if classifier and num_labels == dims.n_vocab:
        raise ConvertError(f"{source}: tensor 'out_head.bias' is unexpected: the book's LM head has no bias, and a "
                           f"chapter 6 classifier head has a few rows, not the vocabulary's {dims.n_vocab}")
    if labels is not None and not classifier:
        log.warning("%s: a language model, not a classifier; the labels are ignored", source)
    head = classifier_head_rules(num_labels) if classifier else LM_HEAD_RULES
    rules = BODY_RULES + (QKV_BIAS_RULES if qkv_bias else ()) + head
    dims_source = "the sizes read from tok_emb.weight, pos_emb.weight and the block numbers"
    plan = plan_conversion(shapes, rules, dims, source=source, dims_source=dims_source,
                           ignore=lambda name: bool(MASK.match(name)))
    _check_masks(state, dims, source)
    converted = fuse_qkv(convert_tensors(plan, state.__getitem__))
    log.info("converted %d tensors from %s (%s, qkv_bias=%s, %s)", len(plan), source, dims.describe(), qkv_bias,
             f"classifier with {num_labels} classes" if classifier else "language model")
    if not classifier:
        return model_from_state(dims, converted, source=source, qkv_bias=qkv_bias)
    if labels is None:
        labels = BOOK_CLASSIFIER_LABELS if num_labels == 2 else tuple(f"LABEL_{i}" for i in range(num_labels))
    if len(labels) != num_labels:
        raise ConvertError(f"{source}: tensor 'out_head.weight' has {num_labels} rows (classes) but {len(labels)} "
                           f"labels were given ({', '.join(labels)})")
    return classifier_from_state(dims, converted, source=source, labels=list(labels), qkv_bias=qkv_bias)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def book_cfg(config) -> dict:
    """The cfg dict the book's GPTModel is constructed with, from our config."""
    return {"vocab_size": config.vocab_size, "context_length": config.context_length, "emb_dim": config.emb_dim,
            "n_heads": config.n_heads, "n_layers": config.n_layers, "drop_rate": config.drop_rate,
            "qkv_bias": bool(config.qkv_bias)}


def book_state_dict(ours: dict[str, torch.Tensor], config, *, source: str) -> dict[str, torch.Tensor]:
    """Our tensors (a causal LM's or a classifier's) → the book's state dict, masks included.

    Every one of our tensors must be used and every book tensor filled; the order is the book's
    (each block's mask first: a module's own buffers precede its children's in state_dict()).
    """
    ours = {name: t.float() for name, t in ours.items()}
    classifier = "score.weight" in ours
    dims = Dims(n_vocab=config.vocab_size, n_ctx=config.context_length, n_embd=config.emb_dim,
                n_head=config.n_heads, n_layer=config.n_layers)
    if classifier:
        head_rules = classifier_head_rules(ours["score.weight"].shape[0])
    else:
        head_rules = LM_HEAD_RULES
        # Tied heads are not saved by save_pretrained; the book's out_head is its own copy of wte.
        if "lm_head.weight" not in ours:
            if config.tie_word_embeddings is False:
                raise ConvertError(f"{source}: missing tensor 'lm_head.weight' although config.json says "
                                   "tie_word_embeddings=false")
            ours["lm_head.weight"] = ours["transformer.wte.weight"].clone()
    rules = BODY_RULES + (QKV_BIAS_RULES if config.qkv_bias else ()) + head_rules
    # Our fused c_attn tensors split back into the q, k, v parts the rules speak of.
    for name in [n for n in ours if n.endswith(("attn.c_attn.weight", "attn.c_attn.bias"))]:
        fused = ours.pop(name)
        expected = (dims.n_embd, 3 * dims.n_embd) if name.endswith("weight") else (3 * dims.n_embd,)
        if tuple(fused.shape) != expected:
            raise ConvertError(f"{source}: tensor '{name}' has shape {list(fused.shape)} but config.json "
                               f"({dims.describe()}) implies {list(expected)}")
        for part, piece in zip(QKV, fused.chunk(3, dim=-1)):
            ours[_part(name, part)] = piece
    table = {}
    for rule in rules:
        for i in range(dims.n_layer) if "{i}" in rule.source else [None]:
            fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
            table[fmt(rule.target)] = (fmt(rule.source), tuple(rule.shape(dims)), rule.layout)
    unknown = sorted(set(ours) - set(table))
    if unknown:
        raise ConvertError(f"{source}: tensor '{unknown[0]}' has no counterpart in the book's GPTModel")
    out: dict[str, torch.Tensor] = {}
    for target, (book_name, shape, layout) in table.items():
        if target not in ours:
            raise ConvertError(f"{source}: missing tensor '{target.split('[')[0]}' in the model's safetensors")
        t = ours[target]
        ours_shape = shape[::-1] if layout == "transpose" else shape
        if tuple(t.shape) != ours_shape:
            raise ConvertError(f"{source}: tensor '{target}' has shape {list(t.shape)} but config.json "
                               f"({dims.describe()}) implies {list(ours_shape)}")
        # A copy either way: a q/k/v piece is a view of the fused tensor, and torch.save would store all of it.
        out[book_name] = t.T.contiguous() if layout == "transpose" else t.clone()
    # One tensor for every block's mask: torch.save stores shared storage once (gpt2-medium: 4 MB instead
    # of 100 MB), and load_state_dict copies it into each block's own buffer all the same.
    mask = causal_mask(dims.n_ctx)
    for i in range(dims.n_layer):
        out[f"trf_blocks.{i}.att.mask"] = mask
    return dict(sorted(out.items(), key=lambda item: _book_position(item[0])))


# The order of the book's state_dict(): a module's own parameters and buffers, then its children in
# the order they were assigned (so a block's mask precedes its attention's projections).
_IN_BLOCK = ("att.mask", "att.W_query.weight", "att.W_query.bias", "att.W_key.weight", "att.W_key.bias",
             "att.W_value.weight", "att.W_value.bias", "att.out_proj.weight", "att.out_proj.bias",
             "ff.layers.0.weight", "ff.layers.0.bias", "ff.layers.2.weight", "ff.layers.2.bias",
             "norm1.scale", "norm1.shift", "norm2.scale", "norm2.shift")
_OUTSIDE = ("tok_emb.weight", "pos_emb.weight", None, "final_norm.scale", "final_norm.shift",
            "out_head.weight", "out_head.bias")


def _book_position(name: str) -> tuple[int, int, int]:
    if (m := _BLOCK.match(name)):
        return _OUTSIDE.index(None), int(m.group(1)), _IN_BLOCK.index(name[m.end():])
    return _OUTSIDE.index(name), 0, 0


def _save_atomically(obj, path: Path) -> None:
    """torch.save into ``path`` whole or not at all (core.files.atomic_path)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def export_book(model_dir: str | os.PathLike, out_pth: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Write our model folder as the book's state dict at `out_pth`; return the book's cfg for it.

    A causal LM loads with `GPTModel(cfg).load_state_dict(torch.load(out_pth))`; a classifier after
    `model.out_head = torch.nn.Linear(cfg["emb_dim"], num_classes)`, as chapter 6 builds it.
    """
    from gpt2_scratch import GPT2ScratchConfig
    from gpt2_scratch.model_dir import read_config_file

    model_dir, out_pth = Path(model_dir), Path(out_pth)
    if not (model_dir / "config.json").is_file():
        what = f"is {path_kind(model_dir)}, not a folder" if path_kind(model_dir) else "no config.json"
        raise ConvertError(f"{model_dir}: {what}; pass a model folder written by gpt2-scratch")
    read_config_file(model_dir / "config.json", ConvertError)  # a list there: one line naming the file
    try:
        model_type = GPT2ScratchConfig.get_config_dict(model_dir)[0].get("model_type")
        config = GPT2ScratchConfig.from_pretrained(model_dir) if model_type == GPT2ScratchConfig.model_type else None
    except (OSError, ValueError, TypeError) as e:
        raise ConvertError(f"{model_dir}/config.json: not a gpt2-scratch config ({_first_line(e)})") from None
    if config is None:
        raise ConvertError(f"{model_dir}/config.json: model_type {model_type!r} is not gpt2-scratch; convert the folder "
                           "to ours first (gpt2-scratch convert hf --from-dir ...)")
    if out_pth.exists() and not overwrite:
        raise ConvertError(f"{out_pth}: already exists; choose another --out or pass --overwrite")
    if out_pth.is_dir():
        raise ConvertError(f"{out_pth}: is a folder; --out names the .pth file to write")
    reader = SafetensorsReader(_weight_files(model_dir), str(model_dir))
    state = book_state_dict({name: reader.read(name) for name in reader.shapes()}, config, source=str(model_dir))
    out_pth.parent.mkdir(parents=True, exist_ok=True)
    _save_atomically(state, out_pth)
    return book_cfg(config)
