"""Raw text for pretraining: what ``--data`` names, read as a stream of documents.

    sources = resolve_sources("corpus/*.txt")          # the files (or data set) --data names, in a fixed order
    scanned = scan(sources, text_column="text")        # one pass: each source's sha256, characters, documents
    for new_document, piece in pieces(sources, ...):   # the text, in pieces the tokenizer may encode apart

``--data`` is a text file, a folder of text files (``.txt``, ``.text``, ``.md``, searched recursively),
a glob of files, a JSONL / JSON / Parquet file with a text column, or a ``datasets`` data set (a
``save_to_disk`` folder or a Hub id) with a text column. A text file is one document; a record is
one document. Text is read as the book reads it (``open(path, encoding="utf-8")``: universal newlines,
a BOM kept), so one text file gives exactly the book's characters.

Nothing here holds a whole corpus in memory: files are read in blocks, and a long document is cut into
pieces at places where GPT-2's pre-tokenizer could not join text across the cut (``safe_cut``), so
encoding the pieces one by one, in parallel, gives the same tokens as encoding the whole text.
Bad input is one ``InputError`` naming the file (and record): an empty corpus, a binary or non-UTF-8
file, a folder or glob with no text file, a record without the text column.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gpt2_scratch.core.download import hub_offline_when_unreachable, is_hub_id
from gpt2_scratch.core.errors import InputError, one_line
from gpt2_scratch.core.files import path_kind

TEXT_SUFFIXES = (".txt", ".text", ".md")  # what counts as a text file inside a folder
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")  # files of records with a text column
PIECE_CHARS = 1 << 20  # characters per piece handed to one tokenizer call (about 1 MB of text)
_BLOCK_BYTES = 1 << 22  # bytes per read while scanning

# A place where GPT-2's pre-tokenizer (r50k's regex) starts a new pre-token whatever comes before it:
# after a newline that follows non-space and precedes non-space ("word.\nNext": "\n" is a pre-token of
# its own), or before a single space between two non-spaces ("word next": " next" starts one). Runs of
# whitespace are never cut: the regex groups them differently at the end of a string.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")


@dataclass(frozen=True)
class Source:
    """One thing to read: a text file, a file of records, or a ``datasets`` data set (folder or Hub id)."""

    kind: str  # "text", "jsonl", "json", "parquet", "dataset"
    where: str  # a path, or a Hub id

    def __str__(self) -> str:
        return self.where


@dataclass
class Scanned:
    """What one pass over the sources found: a fingerprint per source and the corpus's size."""

    fingerprints: list[str]  # per source: sha256 of the file's bytes, or the data set's own fingerprint
    chars: int  # characters of all documents (separators not counted): what the 90/10 split cuts
    documents: int


def resolve_sources(spec: str, *, flag: str = "--data") -> list[Source]:
    """The sources ``spec`` names, in a fixed order (sorted paths), or one ``InputError`` saying what is wrong."""
    if not spec:
        raise InputError(f"{flag} is required: a text file, a folder or glob of text files, a JSONL/Parquet file "
                         "with a text column, or a datasets folder / Hub id")
    path = Path(spec).expanduser()
    if glob.has_magic(spec) and not path.exists():
        files = sorted(p for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise InputError(f"{flag} {spec}: the pattern matches no file; check the pattern (quote it so the shell "
                             "leaves it to us)")
        return [_file_source(Path(p)) for p in files]
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return [Source("dataset", str(path))]
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise InputError(f"{flag} {path}: the folder holds no text file ({', '.join(TEXT_SUFFIXES)}, searched "
                             "recursively); pass a folder of text files, a file, or a glob")
        return [Source("text", str(p)) for p in files]
    if path.is_file():
        return [_file_source(path)]
    kind = path_kind(path)
    if kind is not None:
        raise InputError(f"{flag} {path} is {kind}, not a text file; pass a file, a folder or a glob")
    if is_hub_id(spec) and path.suffix.lower() not in (*TEXT_SUFFIXES, *RECORD_SUFFIXES):
        return [Source("dataset", spec)]
    raise InputError(f"{flag} {path}: no such file or folder; pass a text file, a folder or glob of them, a "
                     "JSONL/Parquet file, or a datasets folder / Hub id")


def _file_source(path: Path) -> Source:
    suffix = path.suffix.lower()
    return Source(suffix[1:], str(path)) if suffix in RECORD_SUFFIXES else Source("text", str(path))


# ---------------------------------------------------------------------------------------------------
# The scan: fingerprints, sizes, and every check that needs no tokenizer
# ---------------------------------------------------------------------------------------------------


def scan(sources: list[Source], text_column: str, *, flag: str = "--data") -> Scanned:
    """One pass over every source: its fingerprint, its characters (as the book's ``read()`` counts them),
    its documents; an empty corpus, a binary or non-UTF-8 file, a record without ``text_column`` are refused."""
    fingerprints, chars, documents = [], 0, 0
    for source in sources:
        if source.kind == "text":
            digest, n = _scan_text_file(Path(source.where), flag)
            fingerprints.append(digest)
            chars += n
            documents += 1 if n else 0
        else:
            fingerprints.append(_records_fingerprint(source, text_column, flag))
            for text in _record_texts(source, text_column, flag):
                chars += len(text)
                documents += 1 if text else 0
    if chars == 0:
        what = sources[0].where if len(sources) == 1 else f"all {len(sources)} files of it"
        raise InputError(f"{flag} {what}: no text (empty); pass a corpus with text in it")
    return Scanned(fingerprints, chars, documents)


def _scan_text_file(path: Path, flag: str) -> tuple[str, int]:
    """(sha256 of the bytes, characters after universal-newline reading); refuses binary and non-UTF-8 files."""
    digest, decoder = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")("strict")
    chars, offset, crlf, pending_cr = 0, 0, 0, False
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(_BLOCK_BYTES)
                digest.update(block)
                try:
                    text = decoder.decode(block, final=not block)
                except UnicodeDecodeError as err:
                    raise InputError(f"{flag} {path}: not UTF-8 text ({err.reason} at byte {offset + err.start}); "
                                     "a binary file, or text in another encoding: convert it to UTF-8") from None
                nul = text.find("\x00")
                if nul >= 0:
                    raise InputError(f"{flag} {path}: a binary file (a NUL character at character {chars + nul}), "
                                     "not text; pass text files only")
                # universal newlines read "\r\n" as one "\n": count such pairs, also across blocks
                crlf += text.count("\r\n") + (1 if pending_cr and text.startswith("\n") else 0)
                pending_cr = text.endswith("\r") if text else pending_cr
                chars += len(text)
                offset += len(block)
                if not block:
                    break
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot read it ({one_line(err)})") from None
    return digest.hexdigest(), chars - crlf


def _records_fingerprint(source: Source, text_column: str, flag: str) -> str:
    if source.kind == "dataset":
        dataset = _load_dataset(source, text_column, flag)
        return hashlib.sha256(f"{dataset._fingerprint}:{len(dataset)}".encode()).hexdigest()
    digest = hashlib.sha256()
    with open(source.where, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Records: JSONL, JSON, Parquet, datasets
# ---------------------------------------------------------------------------------------------------


def _column_missing(where: str, text_column: str, columns, flag: str) -> InputError:
    shown = ", ".join(map(str, list(columns)[:10])) or "none"
    return InputError(f"{flag} {where}: no '{text_column}' column (it has: {shown}); name the text column with "
                      "--text-column")


def _record_text(record, where: str, index: int, text_column: str, flag: str) -> str:
    if not isinstance(record, dict):
        raise InputError(f"{flag} {where}: record {index} is a JSON {type(record).__name__}, not an object with a "
                         f"'{text_column}' field")
    if text_column not in record:
        raise _column_missing(f"{where} record {index}", text_column, record.keys(), flag)
    text = record[text_column]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise InputError(f"{flag} {where}: record {index}'s '{text_column}' is a {type(text).__name__}, not text")
    return text


def _record_texts(source: Source, text_column: str, flag: str) -> Iterator[str]:
    """The text of every record of ``source``, in order (None as empty)."""
    where = source.where
    if source.kind == "jsonl":
        with open(where, encoding="utf-8-sig") as f:
            for index, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise InputError(f"{flag} {where}: line {index + 1} is not JSON ({one_line(err, 120)})") from None
                yield _record_text(record, where, index, text_column, flag)
    elif source.kind == "json":
        try:
            records = json.loads(Path(where).read_text(encoding="utf-8-sig"))
        except ValueError as err:
            raise InputError(f"{flag} {where}: not JSON ({one_line(err, 120)})") from None
        if not isinstance(records, list):
            raise InputError(f"{flag} {where}: a JSON {type(records).__name__}, not a list of records")
        for index, record in enumerate(records):
            yield _record_text(record, where, index, text_column, flag)
    elif source.kind == "parquet":
        import pyarrow.parquet as pq  # deferred: only Parquet corpora need pyarrow

        try:
            table = pq.ParquetFile(where)
        except Exception as err:  # pyarrow raises several types for a file that is not Parquet
            raise InputError(f"{flag} {where}: not a Parquet file ({one_line(err, 160)})") from None
        if text_column not in table.schema_arrow.names:
            raise _column_missing(where, text_column, table.schema_arrow.names, flag)
        for batch in table.iter_batches(columns=[text_column], batch_size=4096):
            yield from (text or "" for text in batch.column(0).to_pylist())
    else:
        dataset = _load_dataset(source, text_column, flag)
        for start in range(0, len(dataset), 4096):
            yield from (text or "" for text in dataset[start:start + 4096][text_column])


def _load_dataset(source: Source, text_column: str, flag: str):
    """The ``train`` split of a ``datasets`` folder or Hub id, with ``text_column`` checked."""
    import datasets  # deferred: heavy, and only data sets need it

    unreachable = False
    try:
        if Path(source.where).is_dir():
            loaded = datasets.load_from_disk(source.where)
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded:
                    raise InputError(f"{flag} {source.where}: a DatasetDict without a 'train' split (it has "
                                     f"{', '.join(loaded)}); save the split to train on")
                loaded = loaded["train"]
        else:
            with hub_offline_when_unreachable() as unreachable:
                loaded = datasets.load_dataset(source.where, split="train")
    except InputError:
        raise
    except Exception as err:  # datasets raises many types; all mean "could not load it"
        reason = ("the Hub's host does not resolve and it is not cached" if unreachable else
                  f"{type(err).__name__}: {one_line(err, 160)}")
        raise InputError(f"{flag} {source.where}: cannot load the data set ({reason}); check the folder or Hub id and "
                         "the network, or pass local files") from None
    if text_column not in loaded.column_names:
        raise _column_missing(source.where, text_column, loaded.column_names, flag)
    return loaded


# ---------------------------------------------------------------------------------------------------
# The text, in pieces
# ---------------------------------------------------------------------------------------------------


def safe_cut(text: str, limit: int) -> int:
    """The last place at most ``limit`` characters into ``text`` where it may be cut without changing its
    tokens (``_SAFE_CUT``), searched backwards in growing windows up to the last quarter of the limit; 0 when
    there is none."""
    reach = max(limit // 4, 1)
    window = min(4096, reach)
    while True:
        start = max(limit - window, 1)
        cut = 0
        for match in _SAFE_CUT.finditer(text, start, limit):
            cut = match.start()
        if cut or window >= reach:
            return cut
        window = min(window * 16, reach)


def _split_text(text: str, piece_chars: int) -> Iterator[str]:
    """``text`` in pieces of about ``piece_chars`` characters, each cut where the tokens do not change."""
    while len(text) > piece_chars:
        cut = safe_cut(text, piece_chars)
        if not cut:  # no safe place in reach (a run without spaces or newlines): look further on
            match = _SAFE_CUT.search(text, piece_chars)
            if match is None or match.start() == 0:
                break
            cut = match.start()
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def _text_file_pieces(path: str, piece_chars: int) -> Iterator[str]:
    """A text file read as the book reads it, in pieces cut where the tokens do not change."""
    carry = ""
    with open(path, encoding="utf-8") as f:
        while True:
            block = f.read(piece_chars)
            text = carry + block
            if not block:
                if text:
                    yield text
                return
            cut = safe_cut(text, len(text)) if len(text) >= piece_chars else 0
            if cut:
                yield text[:cut]
                text = text[cut:]
            carry = text


def pieces(sources: list[Source], text_column: str, piece_chars: int = PIECE_CHARS,
           flag: str = "--data") -> Iterator[tuple[bool, str]]:
    """(whether a new document starts here, a piece of text) for the whole corpus, in order; empty documents
    are left out."""
    for source in sources:
        if source.kind == "text":
            for i, piece in enumerate(_text_file_pieces(source.where, piece_chars)):
                yield i == 0, piece
        else:
            for text in _record_texts(source, text_column, flag):
                for i, piece in enumerate(_split_text(text, piece_chars)):
                    yield i == 0, piece
