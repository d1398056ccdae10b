"""Model folders: written so every Hugging Face tool can load them, read back only when they are whole.

A model folder holds model.safetensors, config.json (with ``auto_map``), generation_config.json, the
tokenizer files and a copy of our configuration/modeling code, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works where this package is not
installed. ``save_model_dir`` builds it in a temporary sibling and renames it into place
(``core.files.write_dir_atomically``): a killed process never leaves a half-written model.

``load_model_dir`` is the strict way back in, used by every command that takes a model folder. It
refuses, with one line naming the folder and the tensor, what ``from_pretrained`` would otherwise
accept with a warning and random weights: a missing tensor, an extra one, a shape that disagrees with
config.json, a truncated or unreadable weights file, a config that is not ours.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from gpt2_scratch.core.errors import InputError
from gpt2_scratch.core.files import write_dir_atomically

from .tokenizer import ENDOFTEXT_ID, get_tokenizer

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


class ModelDirError(InputError):
    """A model folder that cannot be loaded as it is; the message names the folder and what is wrong."""


def save_model_dir(model, out_dir: str | os.PathLike, *, tokenizer=None, overwrite: bool = False,
                   prompt_style: str | None = None) -> Path:
    """Save ``model`` (and the GPT-2 tokenizer unless another is given) to ``out_dir``; return its path.

    ``prompt_style`` ("alpaca", "phi3") is recorded in config.json for an instruction-tuned model, so the
    chat command and the GGUF export wrap a message the way the model was trained. An existing non-empty
    ``out_dir`` is refused unless ``overwrite``; then it is replaced only once the new folder is complete.
    """
    from . import register

    register()  # the folder gets auto_map and the modeling code (loads with trust_remote_code elsewhere)
    auto_map = getattr(model.config, "auto_map", None)
    if auto_map:
        # A config loaded from another head's folder (a classifier made from a causal LM) carries that
        # head's entry; keep only the config and this model's own Auto class.
        model.config.auto_map = {k: v for k, v in auto_map.items() if k in ("AutoConfig", type(model)._auto_class)}
    if prompt_style is not None:
        model.config.prompt_style = prompt_style
    if getattr(model, "generation_config", None) is not None:
        # GPT-2 has no pad token; batched generation pads with <|endoftext|>, as the book does.
        model.generation_config.pad_token_id = ENDOFTEXT_ID
        model.generation_config.eos_token_id = ENDOFTEXT_ID
        model.generation_config.bos_token_id = ENDOFTEXT_ID

    def write(tmp_dir: Path) -> None:
        model.save_pretrained(tmp_dir)
        (tokenizer or get_tokenizer()).save_pretrained(tmp_dir)

    write_dir_atomically(out_dir, write, overwrite=overwrite)
    logger.info("saved model to %s", out_dir)
    return Path(out_dir)


def read_config(path: str | os.PathLike, *, flag: str = "--model") -> dict:
    """config.json of a model folder as a dict; a one-line error for a missing folder or a bad file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelDirError(f"{flag} {path}: no such folder")
    if not path.is_dir():
        raise ModelDirError(f"{flag} {path} is a file; pass the model folder that holds it")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelDirError(f"{flag} {path}: no config.json, so it is not a model folder; pass a folder written "
                            "by save_pretrained, a training run or `gpt2-scratch convert`")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelDirError(f"{config_file}: not valid JSON ({err}); the model folder is damaged") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{config_file}: not a JSON object; the model folder is damaged")
    return config


def is_our_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder whose config.json says model_type gpt2-scratch."""
    try:
        return read_config(path).get("model_type") == "gpt2-scratch"
    except InputError:
        return False


def is_classifier_config(config: dict) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def _check_weight_files(path: Path) -> None:
    """Every weights file is present and its safetensors header covers the file (not truncated)."""
    from safetensors import SafetensorError, safe_open

    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        try:
            index = json.loads((path / "model.safetensors.index.json").read_text(encoding="utf-8"))
            files = [path / name for name in sorted(set(index["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelDirError(f"{path}/model.safetensors.index.json: not a safetensors index ({err})") from None
    else:
        raise ModelDirError(f"{path}: no model.safetensors; the model folder is incomplete (a run that stopped "
                            "before saving?)")
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ModelDirError(f"{file}: unreadable weights ({' '.join(str(err).split())}); the file is damaged "
                                "or truncated: save or download the model again") from None


def load_model_dir(path: str | os.PathLike, *, head: str = "auto", flag: str = "--model", **kwargs):
    """Load our model folder strictly: every tensor present, none extra, every shape as config.json says.

    ``head`` is "causal-lm", "classifier", or "auto" (whichever the folder's config names). Extra keyword
    arguments go to ``from_pretrained`` (e.g. ``dtype``). Returns the model in eval mode.
    """
    import transformers
    from safetensors import SafetensorError

    from . import register
    from .modeling_gpt2_scratch import GPT2ScratchForCausalLM, GPT2ScratchForSequenceClassification

    register()
    path = Path(path).expanduser()
    config = read_config(path, flag=flag)
    if config.get("model_type") != "gpt2-scratch":
        raise ModelDirError(f"{flag} {path} holds a {config.get('model_type')!r} model, not a gpt2-scratch one; "
                            "convert it first (`gpt2-scratch convert hf --from-dir DIR --out OUT`)")
    is_classifier = is_classifier_config(config)
    if head == "auto":
        head = "classifier" if is_classifier else "causal-lm"
    if head == "classifier" and not is_classifier:
        raise ModelDirError(f"{flag} {path} holds a language model with no trained classification head; train "
                            "one with `gpt2-scratch classify --model DIR`")
    if head == "causal-lm" and is_classifier:
        raise ModelDirError(f"{flag} {path} holds a text classifier, not a language model; use `gpt2-scratch "
                            "predict` with it, or pass a language model folder")
    _check_weight_files(path)
    cls = GPT2ScratchForSequenceClassification if head == "classifier" else GPT2ScratchForCausalLM
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # we report what the load report would say, as one line
    transformers.utils.logging.disable_progress_bar()  # loading takes a blink
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ModelDirError(f"{flag} {path}: cannot load it ({' '.join(str(err).split())[:300]})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    weights = path / WEIGHT_FILES[0]
    for kind, keys, why in (("missing", info["missing_keys"], "the weights file lacks it"),
                            ("unexpected", info["unexpected_keys"], "config.json has no place for it"),
                            ("mismatched", info["mismatched_keys"], "its shape disagrees with config.json")):
        if keys:
            name = sorted(keys)[0]
            name = name[0] if isinstance(name, tuple) else name
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ModelDirError(f"{weights}: {kind} tensor '{name}'{more}: {why}; the folder's weights and config "
                                "do not belong together (save or convert the model again)")
    return model.eval()


def check_finite(model, where: str) -> None:
    """Raise a Failure naming the first parameter that holds NaN or infinity (a diverged run)."""
    import torch

    from gpt2_scratch.core.errors import Failure

    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise Failure(f"{where}: parameter '{name}' holds NaN or infinite values (the training diverged); "
                          "refusing to use it")
