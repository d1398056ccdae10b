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
delete the folder to reclaim the space.

**One writer.** An entry is tokenized by one process at a time, under a lock beside it
(``tokens/.<key>.lock``, core/locks.py): the processes of an ``accelerate launch`` on one machine, or two
runs started at once on the same corpus, find the entry missing, the first takes the lock and tokenizes,
the others wait for it (saying whose lock they wait on) and then read the finished entry. A lock, not
Accelerate's ``main_process_first``: the wait happens before any process group exists, so a tokenization
longer than the collectives' timeout (30 minutes) cannot fail the others. The entry is filled under a
temporary name and renamed into place whole (core/files.py's ``write_dir_atomically``), so a killed
tokenization leaves nothing that looks finished, and its temporary is removed by the next writer.

**Too short.** A run that needs windows of ``L`` tokens passes ``WindowCheck(L, refuse)``: a part of fewer
than ``L + 1`` tokens is refused before anything is written. A part of at least ``(L + 1) * 128``
characters cannot be that short (no GPT-2 token spans more than 128 bytes), so only a small part is
counted first, in memory (milliseconds; the rest of the corpus is read, not tokenized); a cached entry is
checked from its counts. The cache then holds nothing for a corpus too short for one window:
re-tokenizing it with a shorter ``--context-length`` costs milliseconds too.

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
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from gpt2_scratch.core.files import FileLock, cache_root, content_key, write_dir_atomically
from gpt2_scratch.tokenizer import ENDOFTEXT, ENDOFTEXT_ID, get_encoding
from gpt2_scratch.train.text_data import PIECE_CHARS, Source, pieces, resolve_sources, scan

CACHE_FORMAT = 1  # bump when the files' layout or the tokenization changes
TOKENIZER_ID = "gpt2 BPE (r50k), <|endoftext|> allowed"
TOKEN_DTYPE = np.dtype("<u2")
PARTS = ("train", "val")

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class WindowCheck:
    """What a run needs of each part of a corpus: more than ``window`` tokens (one window and its next-token
    target); ``refuse(part, tokens)`` is the error raised for a part with fewer ("train" or "val")."""

    window: int
    refuse: Callable[[str, int], Exception]


def tokenized_corpus(spec: str, *, text_column: str = "text", val_fraction: float = 0.1, cache_dir: str | None = None,
                     threads: int | None = None, flag: str = "--data", piece_chars: int = PIECE_CHARS,
                     progress: bool = True, check: WindowCheck | None = None,
                     on_wait: Callable[[str], None] | None = None) -> TokenizedCorpus:
    """``spec``'s corpus as cached token files: reused when its key is in the cache, else tokenized now (by
    one process at a time: ``on_wait(line)`` says when this one waits for another). ``check`` refuses a
    part too short for one window before anything is written."""
    sources = resolve_sources(spec, flag=flag)
    scanned = scan(sources, text_column, flag=flag)
    key = corpus_key(sources, scanned.fingerprints, text_column, val_fraction)
    folder = token_cache_root(cache_dir) / key
    split_at = int((1 - val_fraction) * scanned.chars) if val_fraction else None
    reused = _complete(folder)
    if not reused:
        if check is not None:
            _check_parts(check, _count_small_parts(sources, text_column, split_at, scanned.chars, check.window,
                                                   piece_chars, flag))

        def waiting(holder: str) -> None:
            (on_wait or log.info)(f"{flag} {spec}: another process is tokenizing it into {folder} ({holder}); "
                                  "waiting for it")

        with FileLock.beside(folder, what=flag, wait=waiting):
            reused = _complete(folder)  # the process we waited for wrote it
            if not reused:
                meta = {"format": CACHE_FORMAT, "key": key, "tokenizer": TOKENIZER_ID, "data": spec,
                        "sources": [{"kind": s.kind, "where": s.where, "fingerprint": f}
                                    for s, f in zip(sources, scanned.fingerprints)],
                        "text_column": text_column, "val_fraction": val_fraction, "chars": scanned.chars}
                write_dir_atomically(folder, lambda tmp: _tokenize_into(
                    tmp, sources, text_column, split_at, scanned.chars, threads=threads, flag=flag,
                    piece_chars=piece_chars, progress=progress, meta=meta), overwrite=True)  # an incomplete one
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    if check is not None:
        _check_parts(check, {part: counts["tokens"] for part, counts in meta["parts"].items()})
    files = {part: TokenFile(folder / f"{part}.bin", meta["parts"][part]["tokens"], meta["parts"][part]["documents"])
             for part in meta["parts"]}
    return TokenizedCorpus(key, files["train"], files.get("val"), scanned.chars, reused)


def _complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished entry: meta.json is written last, and the folder renamed into place whole."""
    return (folder / "meta.json").is_file()


def _check_parts(check: WindowCheck, tokens: dict[str, int]) -> None:
    for part, n in tokens.items():
        if n <= check.window:
            raise check.refuse(part, n)


@cache
def longest_token_bytes() -> int:
    """The most bytes one token stands for (GPT-2: 128; ``<|endoftext|>``, 13 characters, is one token too)."""
    encoding = get_encoding()
    return max(len(ENDOFTEXT), *(len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)
                                 if i != ENDOFTEXT_ID))


def _count_small_parts(sources, text_column: str, split_at: int | None, chars: int, window: int, piece_chars: int,
                       flag: str) -> dict[str, int]:
    """Tokens of each part that could hold ``window`` tokens or fewer, counted in memory (nothing written). A part
    of at least ``(window + 1) * longest_token_bytes()`` characters has more tokens than that (a character is at
    least one byte) and is not counted: only a small corpus, or a small validation part, is tokenized twice."""
    sizes = [split_at, chars - split_at] if split_at is not None else [chars]
    small = {i for i, size in enumerate(sizes) if size < (window + 1) * longest_token_bytes()}
    if not small:
        return {}
    counters = [_PartWriter(None) for _ in sizes]
    encoding = get_encoding()
    for part, new_document, text in _parted(pieces(sources, text_column, piece_chars, flag), split_at):
        if part in small:
            counters[part].write(new_document, encoding.encode(text, allowed_special={ENDOFTEXT}))
    return {PARTS[i]: counters[i].tokens for i in small}


class _PartWriter:
    """Appends one part's token ids to its file (or only counts them: ``path`` None), with ``<|endoftext|>``
    between documents."""

    def __init__(self, path: Path | None):
        self.file = open(path, "wb") if path is not None else None
        self.tokens = 0
        self.documents = 0

    def write(self, new_document: bool, ids: list[int]) -> None:
        if new_document:
            if self.tokens:
                ids = [ENDOFTEXT_ID, *ids]
            self.documents += 1
        if self.file is not None:
            self.file.write(np.asarray(ids, dtype=TOKEN_DTYPE).tobytes())
        self.tokens += len(ids)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


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
    """Tokenize the corpus into the empty ``folder`` (a temporary that ``write_dir_atomically`` renames into place
    once this returns): the parts' files, then meta.json with their counts."""
    from tqdm.auto import tqdm  # deferred: tqdm.auto probes for notebooks at import

    encoding = get_encoding()
    threads = threads or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    writers = [_PartWriter(folder / f"{part}.bin") for part in (PARTS if split_at is not None else PARTS[:1])]

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
    finally:
        for writer in writers:
            writer.close()
    parts = {part: {"tokens": writer.tokens, "documents": writer.documents} for part, writer in zip(PARTS, writers)}
    (folder / "meta.json").write_text(json.dumps({**meta, "parts": parts}, indent=2), encoding="utf-8")


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

