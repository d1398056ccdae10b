"""OpenAI's released GPT-2 checkpoint: where to download it, and its folder → our model.

A release folder holds checkpoint, encoder.json, hparams.json, model.ckpt.data-00000-of-00001,
model.ckpt.index, model.ckpt.meta and vocab.bpe. Only hparams.json (which decides the config),
the index and the data shard are needed; the .meta graph is never read. Downloads go through
`core.download` (resume, retries, mirrors, checksums) into `cache_root()/openai/{size}`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from gpt2_scratch.core.download import download_file
from gpt2_scratch.core.files import cache_root, path_kind
from gpt2_scratch.core.retry import RetryPolicy
from gpt2_scratch.tokenizer import ENCODER_JSON_SHA256, VOCAB_BPE_SHA256
from gpt2_scratch.convert.build import model_from_state
from gpt2_scratch.convert.errors import ConvertError
from gpt2_scratch.convert.mapping import OPENAI_RULES, Dims, convert_tensors, plan_conversion
from gpt2_scratch.convert.tf_bundle import TensorBundle, checkpoint_prefix

log = logging.getLogger(__name__)

# What `gpt2-scratch convert openai --size` downloads (the release's seven files) and the subset
# a conversion needs.
OPENAI_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
                "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
OPENAI_REQUIRED = ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001")
OPENAI_SIZES = ("124M", "355M", "774M", "1558M")

OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
# The backup the book's gpt_download.py falls back to; same {size}/{file} layout.
OPENAI_MIRROR_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"
# Overrides, e.g. for an internal mirror or a test server: a base URL, and a comma-separated list.
ENV_BASE_URL = "GPT2_SCRATCH_OPENAI_URL"
ENV_MIRRORS = "GPT2_SCRATCH_OPENAI_MIRRORS"
# Checksums we know independently of any server: the GPT-2 BPE files, identical in every size.
KNOWN_SHA256 = {"encoder.json": ENCODER_JSON_SHA256, "vocab.bpe": VOCAB_BPE_SHA256}
OFFLINE_HINT = ("download the release files elsewhere, copy them into a folder and pass `--from-dir DIR`")


def default_models_dir() -> Path:
    """Where OpenAI's release files are cached: ``cache_root()/openai`` ($GPT2_SCRATCH_CACHE moves it)."""
    return cache_root() / "openai"


def openai_urls(size: str, filename: str, base_url: str | None = None, mirrors: Sequence[str] | None = None) -> list[str]:
    """Primary URL then mirrors for one release file; env vars override the defaults."""
    base = base_url or os.environ.get(ENV_BASE_URL) or OPENAI_BASE_URL
    if mirrors is None:
        env = os.environ.get(ENV_MIRRORS)
        mirrors = [m for m in env.split(",") if m.strip()] if env is not None else [OPENAI_MIRROR_URL]
    return [f"{b.strip().rstrip('/')}/{size}/{filename}" for b in [base, *mirrors]]


def download_openai(size: str, models_dir: str | Path | None = None, *, files: Sequence[str] | None = None,
                    base_url: str | None = None, mirrors: Sequence[str] | None = None,
                    policy: RetryPolicy | None = None, progress: bool = True) -> Path:
    """Download OpenAI's release files for `size` ("124M"…"1558M") into models_dir/size; returns that folder."""
    import requests

    if size not in OPENAI_SIZES:
        raise ConvertError(f"unknown GPT-2 size {size!r}; choose one of {', '.join(OPENAI_SIZES)}")
    folder = Path(models_dir if models_dir is not None else default_models_dir()) / size
    with requests.Session() as session:
        for name in files or OPENAI_FILES:
            download_file(openai_urls(size, name, base_url, mirrors), folder / name, sha256=KNOWN_SHA256.get(name),
                          policy=policy, progress=progress, session=session, offline_hint=OFFLINE_HINT)
    return folder


def read_hparams(folder: str | Path) -> tuple[Dims, Path]:
    path = Path(folder) / "hparams.json"
    if not path.is_file():
        raise ConvertError(f"{path}: not found; OpenAI's checkpoint folder must contain hparams.json "
                           "(it decides the model's size)")
    try:
        hp = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hp, dict):
        raise ConvertError(f"{path}: expected a JSON object with n_vocab, n_ctx, n_embd, n_head, n_layer")
    return Dims.from_hparams(hp, str(path)), path


def load_openai_checkpoint(folder: str | Path, *, verify: bool = True):
    """Read, check and convert OpenAI's checkpoint in `folder`; returns our GPT2ScratchForCausalLM."""
    folder = Path(folder)
    if not folder.is_dir():
        what = (f"is {path_kind(folder)}" if path_kind(folder) else "not a directory" if folder.exists()
                else "no such folder")
        raise ConvertError(f"{folder}: {what}; pass the folder holding OpenAI's model.ckpt.* and hparams.json")
    dims, hparams_path = read_hparams(folder)
    bundle = TensorBundle(checkpoint_prefix(folder))
    shapes = {name: bundle.shape(name) for name in bundle.names()}
    plan = plan_conversion(shapes, OPENAI_RULES, dims, source=str(bundle.index_path), dims_source=str(hparams_path))
    log.info("converting %d tensors from %s (%s)", len(plan), bundle.data_path, dims.describe())
    # Tensors used as stored stay memory-mapped (torch.from_numpy keeps the copy-on-write map, so
    # they cost no copy); tensors to be transposed are read into a buffer that is freed right after
    # the transpose, so the peak is the model once plus one tensor, not the model plus the file.
    layout_of = {source: layout for source, layout in plan.values()}
    state = convert_tensors(plan, lambda name: torch.from_numpy(
        bundle.read(name, verify=verify, mmap=layout_of[name] in ("same", "squeeze"))))
    return model_from_state(dims, state, source=str(bundle.index_path))


def openai_tokenizer(folder: str | Path):
    """The tokenizer to save with a converted model: ours (exact GPT-2 BPE), unless the folder's
    encoder.json/vocab.bpe differ from GPT-2's, in which case a tokenizer built from them."""
    from gpt2_scratch import get_tokenizer

    folder = Path(folder)
    enc, bpe = folder / "encoder.json", folder / "vocab.bpe"
    if not (enc.is_file() and bpe.is_file()):
        return get_tokenizer()
    if (hashlib.sha256(enc.read_bytes()).hexdigest() == ENCODER_JSON_SHA256
            and hashlib.sha256(bpe.read_bytes()).hexdigest() == VOCAB_BPE_SHA256):
        return get_tokenizer()
    from transformers import GPT2TokenizerFast

    log.warning("%s: encoder.json/vocab.bpe differ from GPT-2's; saving a tokenizer built from them", folder)
    eot = "<|endoftext|>"
    tok = GPT2TokenizerFast(vocab=str(enc), merges=str(bpe), unk_token=eot, bos_token=eot, eos_token=eot)
    tok.pad_token = eot
    return tok
