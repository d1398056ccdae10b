"""`load_model(spec)`: one string that names a model, wherever its weights are.

Every command's `--model` goes through here. A spec is, in order:

1. a model folder of ours (config.json with model_type gpt2-scratch) → `load_model_dir`, which
   refuses missing, extra or misshapen tensors and damaged files;
2. a folder holding OpenAI's checkpoint (model.ckpt.index) or a GPT2LMHeadModel folder /
   .safetensors file → converted in memory;
3. a preset name (gpt2-small | gpt2-medium | gpt2-large | gpt2-xl, or OpenAI's 124M … 1558M) →
   OpenAI's weights, downloaded once into the cache (`cache_root()/openai`) and converted; with
   `random_init=True`, a fresh untrained model of that size instead;
4. a Hugging Face repo id (openai-community/gpt2-medium) → fetched with huggingface_hub, converted.

Every failure is one line saying what failed and what to pass instead: a `ConvertError` or
`ModelDirError` (bad input, exit 2) or a `DownloadError` (the network failed, exit 1).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from gpt2_scratch.core.download import DownloadError, is_hub_id
from gpt2_scratch.core.files import path_kind
from gpt2_scratch.convert.errors import ConvertError

log = logging.getLogger(__name__)


def preset_name(spec: str) -> str | None:
    """The preset ``spec`` names (gpt2-small … or OpenAI's 124M …), or None."""
    from gpt2_scratch import OPENAI_SIZE_OF_PRESET

    if spec in OPENAI_SIZE_OF_PRESET:
        return spec
    return {size: name for name, size in OPENAI_SIZE_OF_PRESET.items()}.get(spec)


def load_model(spec: str, *, random_init: bool = False, models_dir: str | os.PathLike | None = None,
               flag: str = "--model"):
    """The GPT2ScratchForCausalLM that `spec` names (see the module docstring), in eval mode."""
    from gpt2_scratch import OPENAI_SIZE_OF_PRESET, GPT2ScratchConfig, GPT2ScratchForCausalLM
    from gpt2_scratch.model_dir import check_config, check_fits_in_memory, is_our_model_dir, load_model_dir, read_config

    spec = str(spec)
    path = Path(spec).expanduser()
    kind = path_kind(path)  # a link loop is not "no such folder", nor a Hub id to download
    if kind is not None:
        raise ConvertError(f"{flag} {spec} is {kind}, not a model folder; pass a model folder, a preset "
                           "(gpt2-small ...) or a Hugging Face repo id")
    if path.exists():
        if path.is_dir() and (path / "config.json").is_file() and is_our_model_dir(path):
            if random_init:
                log.info("%s: random init with this folder's config", path)
                config = check_config(path, read_config(path, flag=flag))
                check_fits_in_memory(config, f"{flag} {spec} --random-init", "choose a smaller model")
                return GPT2ScratchForCausalLM(config).eval()
            return load_model_dir(path, head="causal-lm", flag=flag)
        if path.is_dir() and any(path.glob("*.index")):
            from gpt2_scratch.convert.openai import load_openai_checkpoint

            return load_openai_checkpoint(path)
        from gpt2_scratch.convert.hf import load_hf_checkpoint

        return load_hf_checkpoint(path)

    preset = preset_name(spec)
    if preset is not None:
        if random_init:
            config = GPT2ScratchConfig.from_preset(preset)
            check_fits_in_memory(config, f"{flag} {spec} --random-init", "choose a smaller preset")
            return GPT2ScratchForCausalLM(config).eval()
        from gpt2_scratch.convert.openai import OPENAI_REQUIRED, default_models_dir, download_openai, load_openai_checkpoint

        size = OPENAI_SIZE_OF_PRESET[preset]
        root = Path(models_dir) if models_dir is not None else default_models_dir()
        try:
            # Only what conversion reads: a cache holding these three works offline.
            folder = download_openai(size, root, files=OPENAI_REQUIRED)
        except DownloadError as e:
            raise DownloadError(f"cannot get OpenAI's {preset} weights into {root / size}: {e.url} failed "
                                f"({e.reason}); pass --random-init for an untrained {preset}, or {flag} DIR with "
                                "a converted model (`gpt2-scratch convert openai --from-dir FILES --out DIR`)",
                                url=e.url, reason=e.reason, offline=e.offline) from None
        return load_openai_checkpoint(folder)

    if is_hub_id(spec) and not spec.startswith((".", "/", "~")):
        from gpt2_scratch.convert.hf import fetch_hf_repo, load_hf_checkpoint

        try:
            return load_hf_checkpoint(fetch_hf_repo(spec))
        except (ConvertError, DownloadError) as err:
            # "runs/sft" may be a folder the user mistyped as much as a Hub repo: say both.
            raise type(err)(f"{flag} {spec}: no such folder here, and as a Hub repo id: {err}") from None

    raise ConvertError(f"{flag} {spec}: no such folder, and not a preset (gpt2-small, gpt2-medium, gpt2-large, "
                       "gpt2-xl) nor a Hugging Face repo id (owner/name)")


# The tokenizer's JSON files in a model folder, in the order transformers reads them.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json")


def load_tokenizer(spec: str):
    """The tokenizer saved in model folder ``spec``, else the GPT-2 tokenizer (every preset and Hub GPT-2 uses it)."""
    import json

    from gpt2_scratch import get_tokenizer

    path = Path(str(spec)).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        from gpt2_scratch.tokenizer import check_tokenizer_files

        check_tokenizer_files(path)
        # transformers' own message never says which file is broken: read each first, to name the one.
        for name in TOKENIZER_FILES:
            file = path / name
            if not file.is_file():
                continue
            try:
                content = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise ConvertError(f"{file}: cannot load the tokenizer: not valid JSON ({' '.join(str(err).split())}); "
                                   "the folder is damaged (save the model again)") from None
            if not isinstance(content, dict):
                raise ConvertError(f"{file}: cannot load the tokenizer: a JSON {type(content).__name__}, not an "
                                   "object; the folder is damaged (save the model again)")
        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as err:
            reason = " ".join(str(err).split())[:300]
            raise ConvertError(f"{path}: cannot load the tokenizer from its files ({reason}); the folder is damaged "
                               "(save the model again)") from None
    return get_tokenizer()
