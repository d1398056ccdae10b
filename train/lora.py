"""LoRA with peft for train/sft.py and train/dpo.py: options → ``LoraConfig``, wrapping, counts, merge, save.

A run with LoRA trains small low-rank matrices beside frozen projections (peft's layers; none are
written here) and leaves the same outputs as full finetuning: the merged model at the top of OUT (a
plain model folder, so ``from_pretrained``, generate, the judge, push, export-hf and GGUF need nothing
new) and the adapter in ``OUT/adapter/`` (``PeftModel.from_pretrained(base, OUT/adapter)``); with
``--no-merge`` only the adapter. Checkpoints are the prepared PeftModel's state, so ``--resume``,
gradient accumulation and several processes work as for full finetuning.

Targets are our module names: ``c_attn`` (fused q/k/v), ``c_proj`` (both: ``attn.c_proj``,
``mlp.c_proj``), ``c_fc`` and ``lm_head``; ``all-linear`` is all four. ``c_attn``/``c_fc`` are
transformers' ``Conv1D`` layout ([in, out]) and the rest ``nn.Linear``: peft sets ``fan_in_fan_out``
per layer from the layer's class (it warns each time it corrects the config; we silence that).
Note that peft's own ``target_modules="all-linear"`` leaves the output head out, ours does not.

``--lora book`` is the book's exercise 7.4 (``LinearWithLoRA`` on every ``nn.Linear`` of GPTModel,
rank 16, alpha 16 multiplying ``x @ A @ B`` without dividing by the rank): peft scales by
``lora_alpha / r``, so the book's alpha 16 at rank 16 is ``lora_alpha=256``; targets ``all-linear``;
A drawn as the book draws it (``kaiming_uniform_(a=√5)`` on A [in, r] is U(±1/√r); peft's default is
U(±1/√in)), B zero, no dropout. The book's separate W_query/W_key/W_value get three rank-16
adapters; our fused ``c_attn`` gets one, so the book has 7,898,384 trainable parameters for
gpt2-medium and we have 7,111,952.

The head is tied to the token embedding. peft's LoRA on ``lm_head`` only adds to its output, so the
shared weight stays frozen and untouched; merging it would add the update to the embedding too, so
the merge first gives the head its own copy (the merged model is saved untied).

``--base-dtype bf16`` stores the frozen weight matrices (every projection and the token embedding)
in bf16 and keeps the adapters, LayerNorms, biases and position embedding in fp32; it needs bf16
autocast, where every projection runs in bf16 anyway. The merge adds the adapter to the base
reloaded in fp32, so the merged model equals the adapter applied to the original base.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Literal

from gpt2_scratch.core.args import arg
from gpt2_scratch.core.errors import InputError
from gpt2_scratch.core.files import write_dir_atomically
from gpt2_scratch.train.checkpoints import save_model_into

logger = logging.getLogger(__name__)

BLOCK_TARGETS = ("c_attn", "c_proj", "c_fc")
ALL_LINEAR = (*BLOCK_TARGETS, "lm_head")
KNOWN_TARGETS = ("c_attn", "c_proj", "attn.c_proj", "mlp.c_proj", "c_fc", "lm_head", "all-linear")
ADAPTER_DIR = "adapter"

# What `--lora` alone and `--lora book` stand for; any --lora-* option given explicitly wins.
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(lora_r=8, lora_alpha=16.0, lora_dropout=0.0, lora_targets=list(BLOCK_TARGETS), lora_init="peft"),
    # The book's exercise 7.4: rank 16, x @ A @ B times 16 (= peft's lora_alpha / r with lora_alpha 256).
    "book": dict(lora_r=16, lora_alpha=256.0, lora_dropout=0.0, lora_targets=["all-linear"], lora_init="book"),
}

@dataclass
class LoRAOptions:
    """LoRA (peft): finetune low-rank adapters instead of every weight"""

    lora: Literal["default", "book"] | None = arg(
        None, "finetune LoRA adapters (peft) instead of every weight: --lora alone = rank 8, alpha 16 on c_attn, "
              "c_proj, c_fc; --lora book = the book's exercise 7.4 (rank 16, x@A@B times 16, every linear layer incl. "
              "the head); any --lora-* option also turns LoRA on", nargs="?", const="default")
    lora_r: int | None = arg(None, "LoRA rank (default 8; book 16)", at_least=1)
    lora_alpha: float | None = arg(None, "LoRA alpha; the update is scaled by alpha / rank as in peft (default 16; "
                                         "book 256, i.e. the book's 16 without division by the rank)", above=0)
    lora_dropout: float | None = arg(None, "dropout on the LoRA input (default 0, as the book)", at_least=0, below=1)
    lora_targets: list[str] | None = arg(None, "layers that get adapters: c_attn c_proj c_fc (default: every "
                                               "projection in the blocks), attn.c_proj, mlp.c_proj, lm_head, or "
                                               "all-linear (the blocks and the head)")
    lora_init: Literal["peft", "book"] | None = arg(None, "init of LoRA's A: peft (U(±1/√in), the default) or book "
                                                          "(U(±1/√rank), as the book's kaiming_uniform_ on A[in, "
                                                          "rank]); B starts at zero either way")
    base_dtype: Literal["fp32", "bf16"] = arg("fp32", "dtype of the frozen base weights with --lora: bf16 halves "
                                                      "their memory (needs --mixed-precision bf16)")
    merge: bool = arg(True, "with LoRA: also save the merged model at the top of OUT (--no-merge: only OUT/adapter)",
                      resume_may_change=True)


@dataclass(frozen=True)
class LoRASettings:
    """The resolved LoRA options of a run."""

    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]  # our names, "all-linear" expanded
    init: str  # "peft" or "book"
    base_dtype: str  # "fp32" or "bf16"
    merge: bool

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def head(self) -> bool:
        return "lm_head" in self.targets

    def describe(self) -> str:
        return (f"LoRA rank {self.r}, alpha {self.alpha:g} (scale {self.scaling:g}), dropout {self.dropout:g}, "
                f"targets {' '.join(self.targets)}, init {self.init}, base {self.base_dtype}")


def settings(args: Any) -> LoRASettings | None:
    """The LoRA settings ``args`` asks for (None: full finetuning); one InputError for options that do not go
    together (each option's own bounds are checked with the others', ``core.args.check_values``)."""
    given = {k: getattr(args, k) for k in PRESETS["default"] if getattr(args, k, None) is not None}
    preset = getattr(args, "lora", None)
    if preset is None and not given:
        if getattr(args, "base_dtype", "fp32") != "fp32":
            raise InputError("--base-dtype bf16 stores frozen weights in bf16: it needs --lora (full finetuning "
                             "updates every weight, keep them fp32)")
        if not getattr(args, "merge", True):
            raise InputError("--no-merge keeps only a LoRA adapter: it needs --lora")
        return None
    if preset not in (None, *PRESETS):
        raise InputError(f"--lora {preset}: unknown preset; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset or "default"], **given}
    # Each value's bounds are its field's (LoRAOptions), checked when the command line is parsed.
    r, alpha, dropout = values["lora_r"], float(values["lora_alpha"]), float(values["lora_dropout"])
    targets = list(values["lora_targets"])
    unknown = [t for t in targets if t not in KNOWN_TARGETS]
    if unknown:
        raise InputError(f"--lora-targets {unknown[0]}: unknown layer; choose among {', '.join(KNOWN_TARGETS)}")
    if "all-linear" in targets:
        if len(targets) > 1:
            raise InputError("--lora-targets all-linear already names every linear layer; pass it alone")
        targets = list(ALL_LINEAR)
    if "c_proj" in targets:  # both c_proj layers: the specific names add nothing
        targets = [t for t in targets if t not in ("attn.c_proj", "mlp.c_proj")]
    if values["lora_init"] not in ("peft", "book"):
        raise InputError(f"--lora-init {values['lora_init']}: choose peft or book")
    base_dtype = getattr(args, "base_dtype", "fp32")
    if base_dtype not in ("fp32", "bf16"):
        raise InputError(f"--base-dtype {base_dtype}: choose fp32 or bf16")
    if base_dtype == "bf16" and getattr(args, "mixed_precision", "no") != "bf16":
        raise InputError("--base-dtype bf16 needs --mixed-precision bf16 (the bf16 weights meet fp32 activations "
                         "only under autocast)")
    merge = getattr(args, "merge", True)
    if not merge and getattr(args, "push_to_hub", None):
        raise InputError("--push-to-hub uploads the merged model: drop --no-merge (or push OUT/adapter yourself)")
    return LoRASettings(r=r, alpha=alpha, dropout=dropout, targets=tuple(dict.fromkeys(targets)),
                        init=values["lora_init"], base_dtype=base_dtype, merge=merge)


def peft_config(s: LoRASettings):
    """The peft ``LoraConfig`` of settings ``s`` (peft matches each target as a suffix of a module name)."""
    from peft import LoraConfig  # deferred: peft is heavy and only a run with --lora needs it

    return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.targets),
                      bias="none", task_type="CAUSAL_LM")


@contextmanager
def _quiet_peft():
    """Silence peft's warnings about what we do on purpose: it corrects fan_in_fan_out per layer
    (Conv1D-layout c_attn/c_fc beside nn.Linear c_proj), and a tied head has an adapter (see merged_model)."""
    with warnings.catch_warnings():
        for pattern in ("fan_in_fan_out is set to", ".*tie_word_embeddings.*", ".*is_gradient_checkpointing.*"):
            warnings.filterwarnings("ignore", message=pattern)
        yield


def cast_base_to_bf16(model) -> None:
    """Store the frozen weight matrices in bf16: every Linear/Conv1D weight and the token embedding
    (tied to the head). LayerNorms, biases and the position embedding stay fp32, so the residual stream
    starts and stays fp32 under autocast."""
    import torch  # deferred: this module's options and model-card line are read without torch (publish)
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, Conv1D))]
    weights.append(model.get_input_embeddings().weight)
    for weight in {id(w): w for w in weights}.values():
        weight.data = weight.data.to(torch.bfloat16)


def wrap(model, s: LoRASettings | None, *, base_model: str | None = None):
    """``model`` with LoRA adapters (a peft ``PeftModel``; every base weight frozen), or ``model`` itself
    when ``s`` is None. Draws the adapters' A from the global RNG: seed it first for the same init on
    every process."""
    if s is None:
        return model
    import torch  # deferred: see cast_base_to_bf16
    from peft import get_peft_model

    if s.base_dtype == "bf16":
        cast_base_to_bf16(model)
    with _quiet_peft():
        peft_model = get_peft_model(model, peft_config(s))
    peft_model.peft_config["default"].base_model_name_or_path = base_model
    if s.init == "book":
        bound = 1 / math.sqrt(s.r)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if ".lora_A." in name:
                    param.uniform_(-bound, bound)
    return peft_model


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters, each tensor once (the tied head is the embedding)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe(model, s: LoRASettings) -> str:
    """One line for the run's header: the settings and trainable / total parameters."""
    trainable, total = parameter_counts(model)
    return f"{s.describe()}: {trainable:,} trainable / {total:,} parameters ({100 * trainable / total:.2f}%)"


# ---------------------------------------------------------------------------------------------------
# Finish: merge and save
# ---------------------------------------------------------------------------------------------------


def merged_model(peft_model, s: LoRASettings, load_base: Callable[[], Any] | None = None):
    """The plain model with the adapter added to its weights (peft's ``merge_and_unload``), fp32.

    With a bf16 base, ``load_base()`` must return the original fp32 base (train/sft.py reloads it), and the
    adapter is merged into that; otherwise the merge happens in ``peft_model`` itself (it is consumed).
    A targeted head tied to the embedding first gets its own copy of the weight, so the embedding keeps
    its value and the merged model is saved untied.
    """
    import torch  # deferred: see cast_base_to_bf16
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    if s.base_dtype == "bf16":
        if load_base is None:
            raise ValueError("merging over a bf16 base needs load_base (the original fp32 base)")
        config = copy.deepcopy(peft_model.peft_config["default"])
        with _quiet_peft():
            fresh = get_peft_model(load_base(), config)
        set_peft_model_state_dict(fresh, get_peft_model_state_dict(peft_model, save_embedding_layers=False))
        peft_model = fresh
    base = peft_model.get_base_model()
    if s.head and base.config.tie_word_embeddings:
        head = base.lm_head.base_layer
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        base.config.tie_word_embeddings = False
    merged = peft_model.merge_and_unload()
    for param in merged.parameters():
        param.requires_grad_(True)
    return merged


def save_adapter(peft_model, out: Path) -> Path:
    """``OUT/adapter``: adapter_config.json + adapter_model.safetensors, written whole or not at all."""
    # The head's weight is the (frozen, unchanged) embedding: peft would save it along when the head has an
    # adapter; the base model has it already.
    return write_dir_atomically(out / ADAPTER_DIR, lambda tmp: peft_model.save_pretrained(tmp, save_embedding_layers=False),
                                overwrite=True)


def save_outputs(out: Path, model, tokenizer, s: LoRASettings, *, prompt_style: str | None,
                 load_base: Callable[[], Any] | None = None):
    """Write what a LoRA run leaves: ``OUT/adapter`` and (unless ``--no-merge``) the merged model at the top
    of OUT. Returns the model to generate the test responses with (merged, or the adapter model)."""
    save_adapter(model, out)
    if not s.merge:
        logger.info("saved the adapter to %s (no merged model: --no-merge)", out / ADAPTER_DIR)
        return model
    merged = merged_model(model, s, load_base).eval()
    save_model_into(out, merged, tokenizer, prompt_style=prompt_style)
    return merged


def base_model_name(model_arg: str) -> str:
    """What the adapter records as its base: the absolute folder, or the preset / Hub id as given."""
    path = Path(model_arg).expanduser()
    return str(path.resolve()) if path.is_dir() else model_arg


def card_line(args: dict, base: str | None) -> str | None:
    """The model card's sentence about LoRA for a run's args.json (None for full finetuning)."""
    try:
        s = settings(SimpleNamespace(**args))
    except InputError:
        return None
    if s is None:
        return None
    of = base or Path(str(args.get("model", "?")).rstrip("/")).name
    kept = "merged into the base weights" if s.merge else "not merged"
    return (f"This is a LoRA finetune (peft; rank {s.r}, alpha {s.alpha:g}, i.e. scale {s.scaling:g}, adapters on "
            f"{', '.join(f'`{t}`' for t in s.targets)}) of `{of}`, {kept}; the adapter alone is in the run's "
            f"`{ADAPTER_DIR}/` folder.")


def base_reloader(load: Callable[[Any], Any], args: Any) -> Callable[[], Any]:
    """A function loading the run's base model again as set-up did (same seed: the same random init)."""

    def reload():
        from accelerate.utils import set_seed  # deferred: heavy

        set_seed(args.seed)
        return load(args)

    return reload
