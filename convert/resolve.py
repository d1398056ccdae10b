"""`load_model(spec)`: one string that names a model, wherever its weights are.

Used by the training and evaluation scripts for their `--model` argument. A spec is, in order:

1. a model folder of ours (config.json + safetensors) → `from_pretrained`;
2. a folder holding OpenAI's checkpoint (model.ckpt.index) or a GPT2LMHeadModel folder /
   .safetensors file → converted in memory;
3. a preset name (gpt2-small | gpt2-medium | gpt2-large | gpt2-xl, or OpenAI's 124M … 1558M) →
   OpenAI's weights, downloaded once into a cache folder (default ~/.cache/gpt2-scratch/openai)
   and converted; with `random_init=True`, a fresh untrained model of that size instead;
4. a Hugging Face repo id (openai-community/gpt2-medium) → fetched with huggingface_hub, converted.

Every failure is a ConvertError with one line saying what failed and what to pass instead.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from convert.errors import ConvertError, DownloadError

log = logging.getLogger(__name__)

ENV_CACHE = "GPT2_SCRATCH_CACHE"  # overrides ~/.cache/gpt2-scratch
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def default_models_dir() -> Path:
    """Where OpenAI's release files are cached: $GPT2_SCRATCH_CACHE/openai or ~/.cache/gpt2-scratch/openai."""
    root = os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "gpt2-scratch"
    return Path(root).expanduser() / "openai"


def _preset_name(spec: str) -> str | None:
    from gpt2_scratch import OPENAI_SIZE_OF_PRESET

    if spec in OPENAI_SIZE_OF_PRESET:
        return spec
    by_size = {size: name for name, size in OPENAI_SIZE_OF_PRESET.items()}
    return by_size.get(spec)


def load_model(spec: str, *, random_init: bool = False, models_dir: str | os.PathLike | None = None):
    """The GPT2ScratchForCausalLM that `spec` names (see the module docstring), in eval mode."""
    from gpt2_scratch import OPENAI_SIZE_OF_PRESET, GPT2ScratchConfig, GPT2ScratchForCausalLM

    spec = str(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and (path / "config.json").is_file() and _is_ours(path / "config.json"):
            if random_init:
                log.info("%s: random init with this folder's config", path)
                return GPT2ScratchForCausalLM(GPT2ScratchConfig.from_pretrained(path)).eval()
            return GPT2ScratchForCausalLM.from_pretrained(path).eval()
        if path.is_dir() and any(path.glob("*.index")):
            from convert.openai import load_openai_checkpoint

            return load_openai_checkpoint(path)
        from convert.hf import load_hf_checkpoint

        return load_hf_checkpoint(path)

    preset = _preset_name(spec)
    if preset is not None:
        if random_init:
            return GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset(preset)).eval()
        from convert.download import download_openai
        from convert.openai import OPENAI_REQUIRED, load_openai_checkpoint

        size = OPENAI_SIZE_OF_PRESET[preset]
        root = Path(models_dir) if models_dir is not None else default_models_dir()
        try:
            # Only what conversion reads: a cache holding these three works offline.
            folder = download_openai(size, root, files=OPENAI_REQUIRED)
        except DownloadError as e:
            raise ConvertError(f"cannot get OpenAI's {preset} weights into {root / size}: {e.url} failed "
                               f"({e.reason}); pass --random-init for an untrained {preset}, or --model DIR with "
                               "a converted model (`python -m convert openai --from-dir FILES --out DIR`)") from None
        return load_openai_checkpoint(folder)

    if REPO_ID.match(spec):
        from convert.hf import fetch_hf_repo, load_hf_checkpoint

        try:
            return load_hf_checkpoint(fetch_hf_repo(spec))
        except ConvertError as e:
            raise ConvertError(f"{e}; or pass --random-init with a preset, or --model DIR") from None

    raise ConvertError(f"--model {spec!r} is not a folder, a preset (gpt2-small, gpt2-medium, gpt2-large, gpt2-xl), "
                       "nor a Hugging Face repo id (owner/name)")


def _is_ours(config_json: Path) -> bool:
    import json

    try:
        return json.loads(config_json.read_text(encoding="utf-8")).get("model_type") == "gpt2-scratch"
    except (OSError, ValueError, AttributeError):
        return False
