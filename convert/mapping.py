"""Name tables from OpenAI's and Hugging Face's GPT-2 checkpoints to our parameter names.

A converter here is data: a table of rules `source pattern → (our name, expected source shape,
layout change)`, expanded once per layer. `convert_tensors` then applies it with the checks that
make a conversion trustworthy:

- every source tensor is consumed (an unknown tensor is an error, not silently dropped),
- every one of our parameters is filled (a missing tensor is an error, not left at random init),
- every source shape is checked against the shape the hyperparameters predict,

and every error is one line naming the file, the tensor and what was expected.

Our names are transformers' GPT-2 names. OpenAI stores every projection weight [1, in, out],
transformers [in, out]. Ours store the widening projections (c_attn, c_fc) [in, out] too and the
narrowing ones (c_proj) [out, in] (modeling_gpt2_scratch.WideningProjection says why), so the
c_proj weights are transposed and the rest is used as stored. Arrays stay numpy (often
memory-mapped) until `to_torch`, which makes the only copy a conversion needs: the transposes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from gpt2_scratch.convert.errors import ConvertError

# ---------------------------------------------------------------------------------------------
# The model's dimensions, as both sources and our config name them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    """GPT-2's shape-deciding hyperparameters (OpenAI's hparams.json names)."""

    n_vocab: int
    n_ctx: int
    n_embd: int
    n_head: int
    n_layer: int

    @classmethod
    def from_hparams(cls, hp: Mapping, source: str) -> "Dims":
        """From OpenAI's hparams.json ({"n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"})."""
        missing = [k for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer") if k not in hp]
        if missing:
            raise ConvertError(f"{source}: missing {', '.join(missing)}; expected OpenAI's hparams.json "
                               "with n_vocab, n_ctx, n_embd, n_head, n_layer")
        values = {k: hp[k] for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}
        for k, v in values.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConvertError(f"{source}: {k} must be a positive integer, got {v!r}")
        if values["n_embd"] % values["n_head"]:
            raise ConvertError(f"{source}: n_embd {values['n_embd']} is not divisible by n_head {values['n_head']}")
        return cls(**values)

    def to_config_kwargs(self) -> dict:
        """Keyword arguments for GPT2ScratchConfig (the book's field names)."""
        return {"vocab_size": self.n_vocab, "context_length": self.n_ctx, "emb_dim": self.n_embd,
                "n_heads": self.n_head, "n_layers": self.n_layer, "qkv_bias": True}

    def describe(self) -> str:
        return (f"n_vocab={self.n_vocab}, n_ctx={self.n_ctx}, n_embd={self.n_embd}, "
                f"n_head={self.n_head}, n_layer={self.n_layer}")


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------
ShapeFn = Callable[[Dims], tuple[int, ...]]


@dataclass(frozen=True)
class Rule:
    """One source tensor (per layer if the pattern has `{i}`) and where it goes."""

    source: str  # e.g. "model/h{i}/attn/c_attn/w"
    target: str  # e.g. "transformer.h.{i}.attn.c_attn.weight"
    shape: ShapeFn  # expected source shape from the dims
    # "same" | "squeeze" (OpenAI [1, in, out] → [in, out]) | "conv1d" (OpenAI [1, in, out] → [out, in])
    # | "transpose" ([in, out] → [out, in])
    layout: str = "same"


def embd_shape(d: Dims) -> tuple[int]:
    """The shape of LayerNorm parameters and of the n_embd-wide biases."""
    return (d.n_embd,)

OPENAI_RULES: tuple[Rule, ...] = (
    Rule("model/wte", "transformer.wte.weight", lambda d: (d.n_vocab, d.n_embd)),
    Rule("model/wpe", "transformer.wpe.weight", lambda d: (d.n_ctx, d.n_embd)),
    Rule("model/h{i}/ln_1/g", "transformer.h.{i}.ln_1.weight", embd_shape),
    Rule("model/h{i}/ln_1/b", "transformer.h.{i}.ln_1.bias", embd_shape),
    Rule("model/h{i}/attn/c_attn/w", "transformer.h.{i}.attn.c_attn.weight", lambda d: (1, d.n_embd, 3 * d.n_embd), "squeeze"),
    Rule("model/h{i}/attn/c_attn/b", "transformer.h.{i}.attn.c_attn.bias", lambda d: (3 * d.n_embd,)),
    Rule("model/h{i}/attn/c_proj/w", "transformer.h.{i}.attn.c_proj.weight", lambda d: (1, d.n_embd, d.n_embd), "conv1d"),
    Rule("model/h{i}/attn/c_proj/b", "transformer.h.{i}.attn.c_proj.bias", embd_shape),
    Rule("model/h{i}/ln_2/g", "transformer.h.{i}.ln_2.weight", embd_shape),
    Rule("model/h{i}/ln_2/b", "transformer.h.{i}.ln_2.bias", embd_shape),
    Rule("model/h{i}/mlp/c_fc/w", "transformer.h.{i}.mlp.c_fc.weight", lambda d: (1, d.n_embd, 4 * d.n_embd), "squeeze"),
    Rule("model/h{i}/mlp/c_fc/b", "transformer.h.{i}.mlp.c_fc.bias", lambda d: (4 * d.n_embd,)),
    Rule("model/h{i}/mlp/c_proj/w", "transformer.h.{i}.mlp.c_proj.weight", lambda d: (1, 4 * d.n_embd, d.n_embd), "conv1d"),
    Rule("model/h{i}/mlp/c_proj/b", "transformer.h.{i}.mlp.c_proj.bias", embd_shape),
    Rule("model/ln_f/g", "transformer.ln_f.weight", embd_shape),
    Rule("model/ln_f/b", "transformer.ln_f.bias", embd_shape),
)

# transformers' GPT2LMHeadModel, keys as in the Hub's openai-community/gpt2* files (no
# "transformer." prefix; save_pretrained adds it, `strip_hf_prefix` removes it first).
HF_RULES: tuple[Rule, ...] = (
    Rule("wte.weight", "transformer.wte.weight", lambda d: (d.n_vocab, d.n_embd)),
    Rule("wpe.weight", "transformer.wpe.weight", lambda d: (d.n_ctx, d.n_embd)),
    Rule("h.{i}.ln_1.weight", "transformer.h.{i}.ln_1.weight", embd_shape),
    Rule("h.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias", embd_shape),
    Rule("h.{i}.attn.c_attn.weight", "transformer.h.{i}.attn.c_attn.weight", lambda d: (d.n_embd, 3 * d.n_embd)),
    Rule("h.{i}.attn.c_attn.bias", "transformer.h.{i}.attn.c_attn.bias", lambda d: (3 * d.n_embd,)),
    Rule("h.{i}.attn.c_proj.weight", "transformer.h.{i}.attn.c_proj.weight", lambda d: (d.n_embd, d.n_embd), "transpose"),
    Rule("h.{i}.attn.c_proj.bias", "transformer.h.{i}.attn.c_proj.bias", embd_shape),
    Rule("h.{i}.ln_2.weight", "transformer.h.{i}.ln_2.weight", embd_shape),
    Rule("h.{i}.ln_2.bias", "transformer.h.{i}.ln_2.bias", embd_shape),
    Rule("h.{i}.mlp.c_fc.weight", "transformer.h.{i}.mlp.c_fc.weight", lambda d: (d.n_embd, 4 * d.n_embd)),
    Rule("h.{i}.mlp.c_fc.bias", "transformer.h.{i}.mlp.c_fc.bias", lambda d: (4 * d.n_embd,)),
    Rule("h.{i}.mlp.c_proj.weight", "transformer.h.{i}.mlp.c_proj.weight", lambda d: (4 * d.n_embd, d.n_embd), "transpose"),
    Rule("h.{i}.mlp.c_proj.bias", "transformer.h.{i}.mlp.c_proj.bias", embd_shape),
    Rule("ln_f.weight", "transformer.ln_f.weight", embd_shape),
    Rule("ln_f.bias", "transformer.ln_f.bias", embd_shape),
)
# Causal-mask buffers older transformers saved with the weights: not parameters, dropped.
HF_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
# The head is tied to wte in GPT-2: a saved copy equal to wte is dropped (tied); a different one is
# kept as an untied head (convert.build.model_from_state decides).
HF_TIED_HEAD = "lm_head.weight"

# Which of our parameters share storage with another (GPT-2's tied head).
TIED = {"lm_head.weight": "transformer.wte.weight"}


def expand(rules: Iterable[Rule], dims: Dims) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """{source name: (our name, expected source shape, layout)} for every layer."""
    out = {}
    for rule in rules:
        layers = range(dims.n_layer) if "{i}" in rule.source else [None]
        for i in layers:
            src = rule.source.format(i=i) if i is not None else rule.source
            dst = rule.target.format(i=i) if i is not None else rule.target
            out[src] = (dst, tuple(rule.shape(dims)), rule.layout)
    return out


def strip_hf_prefix(names: Iterable[str], source: str) -> dict[str, str]:
    """{unprefixed name: name in file}: accept both the Hub layout (`h.0…`) and save_pretrained's
    (`transformer.h.0…`). An unprefixed and a prefixed copy of the same tensor is an error."""
    out: dict[str, str] = {}
    for name in names:
        short = name[len("transformer."):] if name.startswith("transformer.") else name
        if short in out:
            raise ConvertError(f"{source}: tensor '{short}' appears both with and without the 'transformer.' "
                               "prefix; which one is meant is ambiguous")
        out[short] = name
    return out


_LAYER = re.compile(r"^(?:model/h|h\.)(\d+)[/.]")  # the layer number in an OpenAI or HF name


def _unknown_hint(name: str, dims: Dims) -> str:
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= dims.n_layer:
        return f" (layer {m.group(1)}, but n_layer is {dims.n_layer}: the hyperparameters disagree with the tensors)"
    return ""


def plan_conversion(
    source_shapes: Mapping[str, tuple[int, ...]],
    rules: tuple[Rule, ...],
    dims: Dims,
    *,
    source: str,
    dims_source: str,
    ignore: Callable[[str], bool] = lambda name: False,
) -> dict[str, tuple[str, str]]:
    """Check names and shapes; return {our name: (source name, layout)}.

    `source` names the weights file in errors, `dims_source` the file the dims came from
    (hparams.json / config.json), so a shape error says which two files disagree.
    """
    table = expand(rules, dims)
    plan: dict[str, tuple[str, str]] = {}
    for name, shape in source_shapes.items():
        if ignore(name):
            continue
        if name not in table:
            raise ConvertError(f"{source}: unknown tensor '{name}' with shape {list(shape)} is not part of "
                               f"GPT-2{_unknown_hint(name, dims)}; refusing to drop it silently")
        target, expected, layout = table[name]
        if tuple(shape) != expected:
            raise ConvertError(f"{source}: tensor '{name}' has shape {list(shape)} but {dims_source} "
                               f"({dims.describe()}) implies {list(expected)}")
        plan[target] = (name, layout)
    missing = [src for src, (target, _, _) in table.items() if target not in plan]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        hint = ""
        per_layer = len([r for r in rules if "{i}" in r.source])
        layers = [int(m.group(1)) for name in missing if (m := _LAYER.match(name))]
        if len(layers) == len(missing) and len(missing) == per_layer * len(set(layers)):
            # Whole layers absent: the checkpoint is shallower than the hyperparameters say.
            span = f"layer {min(layers)} is" if min(layers) == max(layers) else f"layers {min(layers)}-{max(layers)} are"
            hint = (f"; {span} absent although {dims_source} says "
                    f"n_layer={dims.n_layer}: the hyperparameters do not match the checkpoint")
        raise ConvertError(f"{source}: missing tensor '{missing[0]}' with shape "
                           f"{list(table[missing[0]][1])}{more}{hint}")
    return plan


def apply_layout(array, layout: str):
    """Source layout → ours, for a numpy array or a torch tensor.

    "same" and "squeeze" return the input itself or a view of it (no copy: a memory-mapped array stays
    mapped); "conv1d" and "transpose" return a new contiguous [out, in] copy, the one copy a
    conversion needs.
    """
    if layout == "same":
        return array
    if layout == "squeeze":
        return array[0]  # [1, in, out] → [in, out], a view
    if layout == "conv1d":
        array = array[0]  # [1, in, out] → [in, out]
    elif layout != "transpose":
        raise ValueError(f"unknown layout {layout!r}")
    if isinstance(array, np.ndarray):
        return np.ascontiguousarray(array.T)  # [in, out] → [out, in]
    return array.T.contiguous()  # torch.Tensor: [in, out] → [out, in]


def convert_tensors(plan: Mapping[str, tuple[str, str]], read: Callable[[str], object]) -> dict:
    """Read each planned source tensor and lay it out as ours, one at a time (peak = one extra tensor)."""
    return {target: apply_layout(read(name), layout) for target, (name, layout) in plan.items()}
