"""Writing a model directory that every Hugging Face tool can load, atomically.

A model directory holds model.safetensors, config.json (with ``auto_map``), generation_config.json,
the tokenizer files and a copy of our configuration/modeling code, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works where this package is not
installed. It is written into a temporary sibling directory and renamed into place, so a killed
process never leaves a half-written model behind.
"""

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .tokenizer import ENDOFTEXT_ID, get_tokenizer

logger = logging.getLogger(__name__)


def write_dir_atomically(out_dir: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call ``write(tmp_dir)`` to fill a temporary sibling of ``out_dir``, then rename it into place.

    An existing non-empty ``out_dir`` is refused unless ``overwrite``; then it is replaced only once the
    new directory is complete, so a crash at any point leaves either the old directory or the new one.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose another path or pass overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        write(tmp_dir)
        # mkdtemp (and the weight writer) create owner-only files; a model directory is meant to be shared.
        os.chmod(tmp_dir, 0o755)
        for path in tmp_dir.iterdir():
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        if out_dir.exists():
            # Swap in two renames so the old directory stays intact until the new one is complete.
            old_dir = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old_dir)
            tmp_dir.rename(out_dir)
            shutil.rmtree(old_dir)
        else:
            tmp_dir.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def save_model_dir(
    model: PreTrainedModel,
    out_dir: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` (and the GPT-2 tokenizer unless another is given) to ``out_dir``; return its path.

    An existing non-empty ``out_dir`` is refused unless ``overwrite``; then it is replaced only once the
    new directory is complete.
    """
    auto_map = getattr(model.config, "auto_map", None)
    if auto_map:
        # A config loaded from another head's directory (a classifier made from a causal LM) carries
        # that head's entry; keep only the config and this model's own Auto class.
        model.config.auto_map = {k: v for k, v in auto_map.items() if k in ("AutoConfig", type(model)._auto_class)}
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
