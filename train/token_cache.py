"""A corpus tokenized once into uint16 files on disk, and the book's windows read from them memory-mapped.

    corpus = tokenized_corpus("corpus/", val_fraction=0.1)   # tokenizes on the first call, then reuses
    train = TokenWindows(corpus.train.path, corpus.train.tokens, context=256, stride=256)
    inputs, targets = train[0]                                # tokens[0:256], tokens[1:257]

**The cache.** ``cache_root()/tokens/<key>/`` (``$GPT2_SCRATCH_CACHE``, else ``~/.cache/gpt2-scratch``;
``--token-cache`` elsewhere) holds ``train.bin`` and ``val.bin`` (the token ids as little-endian
uint16: GPT-2's 50257 ids fit) and ``meta.json`` (the counts and what was read). The key is a sha256 of
the sources' contents (each file's sha256, or a ``datasets`` data set's own fingerprint), their order,
the text column, the validation fraction and the tokenizer: an unchanged corpus is never tokenized
again, and a changed byte anywhere gives a new key, so a stale cache cannot be read. Hashing reads the
corpus once per run (about a second per GB); tokenizing it costs far more. Old keys are not pruned:
delete the folder to reclaim the space. The folder is written under a temporary name and renamed when
complete, so a killed tokenization leaves nothing that looks finished. Under several processes each
tokenizes a missing key and the first rename wins (the files are the same). A corpus too short for a run's
windows is refused after its entry is written: the entry is still right for a run with shorter windows.

**The split** (the book's): the first ``int((1 - val_fraction) * characters)`` characters of the corpus
train, the rest validates; each part is tokenized on its own, as the book tokenizes ``text[:split]``
and ``text[split:]``. Documents are separated by ``<|endoftext|>`` (50256) inside a part, so one text
gives exactly the book's tokens. With ``--val-data`` the whole of ``--data`` trains and the other
corpus (its own cache entry) validates.

**The pass.** Pieces of about 1 MB (cut where the tokens cannot change: train/text_data.py) are
encoded by tiktoken on a pool of threads (tiktoken releases the GIL), a bounded number in flight, and
appended in order: memory stays at a few pieces whatever the corpus's size, with a tqdm bar over its
characters (shown once it takes more than a second). This is the "parallel map" ``datasets.map(num_proc=...)`` would do, without a copy of the
corpus in Arrow files and without forking processes that each hold the tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from gpt2_scratch.core.errors import InputError
from gpt2_scratch.core.files import cache_root, content_key
from gpt2_scratch.tokenizer import ENDOFTEXT, ENDOFTEXT_ID, get_encoding
from gpt2_scratch.train.text_data import PIECE_CHARS, Source, pieces, resolve_sources, scan

CACHE_FORMAT = 1  # bump when the files' layout or the tokenization changes
TOKENIZER_ID = "gpt2 BPE (r50k), <|endoftext|> allowed"
TOKEN_DTYPE = np.dtype("<u2")
PARTS = ("train", "val")


@dataclass(frozen=True)
class TokenFile:
    path: Path
    tokens: int
    documents: int


@dataclass(frozen=True)
class TokenizedCorpus:
    """A corpus's cached token files and the fingerprint that names them (what a checkpoint records)."""

    fingerprint: str
    train: TokenFile
    val: TokenFile | None  # None when val_fraction is 0 (the whole corpus trains)
    chars: int
    reused: bool  # found in the cache (nothing tokenized)


def token_cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else cache_root() / "tokens"


def corpus_key(sources: list[Source], fingerprints: list[str], text_column: str, val_fraction: float) -> str:
    kinds = [s.kind for s in sources]
    return content_key({"format": CACHE_FORMAT, "tokenizer": TOKENIZER_ID, "sources": fingerprints, "kinds": kinds,
                        "text_column": text_column if any(k != "text" for k in kinds) else None,
                        "val_fraction": val_fraction})


def tokenized_corpus(spec: str, *, text_column: str = "text", val_fraction: float = 0.1, cache_dir: str | None = None,
                     threads: int | None = None, flag: str = "--data", piece_chars: int = PIECE_CHARS,
                     progress: bool = True) -> TokenizedCorpus:
    """``spec``'s corpus as cached token files: reused when its key is in the cache, else tokenized now."""
    sources = resolve_sources(spec, flag=flag)
    scanned = scan(sources, text_column, flag=flag)
    key = corpus_key(sources, scanned.fingerprints, text_column, val_fraction)
    folder = token_cache_root(cache_dir) / key
    reused = (folder / "meta.json").is_file()
    if not reused:
        split_at = int((1 - val_fraction) * scanned.chars) if val_fraction else None
        _tokenize_into(folder, sources, text_column, split_at, scanned.chars, threads=threads, flag=flag,
                       piece_chars=piece_chars, progress=progress,
                       meta={"format": CACHE_FORMAT, "key": key, "tokenizer": TOKENIZER_ID, "data": spec,
                             "sources": [{"kind": s.kind, "where": s.where, "fingerprint": f}
                                         for s, f in zip(sources, scanned.fingerprints)],
                             "text_column": text_column, "val_fraction": val_fraction, "chars": scanned.chars})
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    files = {part: TokenFile(folder / f"{part}.bin", meta["parts"][part]["tokens"], meta["parts"][part]["documents"])
             for part in meta["parts"]}
    return TokenizedCorpus(key, files["train"], files.get("val"), scanned.chars, reused)


class _PartWriter:
    """Appends one part's token ids to its file, with ``<|endoftext|>`` between documents."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.tokens = 0
        self.documents = 0

    def write(self, new_document: bool, ids: list[int]) -> None:
        if new_document:
            if self.tokens:
                ids = [ENDOFTEXT_ID, *ids]
            self.documents += 1
        self.file.write(np.asarray(ids, dtype=TOKEN_DTYPE).tobytes())
        self.tokens += len(ids)


def _parted(stream, split_at: int | None):
    """(part index, new document, text) for each piece: the piece holding character ``split_at`` is cut there,
    its second half continuing its document at the start of the validation part."""
    seen = 0
    for new_document, text in stream:
        if split_at is None or seen + len(text) <= split_at:
            yield 0, new_document, text
        elif seen >= split_at:
            yield 1, new_document, text
        else:
            cut = split_at - seen
            yield 0, new_document, text[:cut]
            yield 1, False, text[cut:]
        seen += len(text)


def _tokenize_into(folder: Path, sources, text_column: str, split_at: int | None, chars: int, *, threads, flag: str,
                   piece_chars: int, progress: bool, meta: dict) -> None:
    """Tokenize the corpus into ``folder`` (written as ``.NAME.partial-PID``, renamed when complete)."""
    from tqdm.auto import tqdm  # deferred: tqdm.auto probes for notebooks at import

    encoding = get_encoding()
    threads = threads or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writers = [_PartWriter(tmp / f"{part}.bin") for part in (PARTS if split_at is not None else PARTS[:1])]

    def encode(item):
        part, new_document, text = item
        return part, new_document, encoding.encode(text, allowed_special={ENDOFTEXT}), len(text)

    try:
        stream = _parted(pieces(sources, text_column, piece_chars, flag), split_at)
        with ThreadPoolExecutor(threads) as pool, tqdm(total=chars, unit="char", unit_scale=True, desc="tokenizing",
                                                       disable=not progress, dynamic_ncols=True,
                                                       delay=1.0) as bar:  # shown only when it takes a while
            while batch := list(islice(stream, 2 * threads)):  # a bounded number of pieces in memory at once
                for part, new_document, ids, n in pool.map(encode, batch):
                    writers[part].write(new_document, ids)
                    bar.update(n)
        parts = {}
        for part, writer in zip(PARTS, writers):
            writer.file.close()
            parts[part] = {"tokens": writer.tokens, "documents": writer.documents}
        (tmp / "meta.json").write_text(json.dumps({**meta, "parts": parts}, indent=2), encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:  # another run finished the same key first: its files are the same
            if not (folder / "meta.json").is_file():
                raise
    finally:
        for writer in writers:
            writer.file.close()
        shutil.rmtree(tmp, ignore_errors=True)


class TokenWindows(torch.utils.data.Dataset):
    """The book's ``GPTDatasetV1`` over a token file: window ``i`` is (tokens[s:s+L], tokens[s+1:s+L+1]) with
    ``s = i * stride``, for every ``s`` in ``range(0, tokens - L, stride)``; read memory-mapped, so a corpus
    bigger than memory costs only the pages a batch touches."""

    def __init__(self, path: str | os.PathLike, tokens: int, context: int, stride: int):
        self.path, self.n_tokens, self.context, self.stride = Path(path), tokens, context, stride
        self._tokens = None  # opened on first use (a DataLoader worker opens its own)

    def __len__(self) -> int:
        return len(range(0, self.n_tokens - self.context, self.stride))

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r", shape=(self.n_tokens,))
        return self._tokens

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.stride
        chunk = torch.from_numpy(self.tokens[start:start + self.context + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


def collate_windows(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Windows → the loop's batch: ``input_ids`` and ``labels`` (already the next tokens: the model's ``shift_labels``)."""
    return {"input_ids": torch.stack([x for x, _ in batch]), "labels": torch.stack([y for _, y in batch])}


def check_windows(windows: TokenWindows, *, what: str, source: str, fix: str) -> None:
    """Refuse a part that makes no window: shorter than ``context + 1`` tokens."""
    if len(windows) == 0:
        raise InputError(f"{source}: the {what} part is {windows.n_tokens:,} tokens, too short for one window of "
                         f"{windows.context} tokens plus its next-token target; {fix}")
