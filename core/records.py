"""Instruction records: one schema, one loader and the book's split, for every stage that reads them.

A record is a JSON object with
  * ``instruction`` (string, required),
  * ``input`` (string, optional: absent, null and "" all mean "no input", as in Magpie-style data),
  * ``output`` (string, required wherever a reference answer is needed: training, the judge),
and whatever else a stage adds: ``model_response`` (eval/generate.py), ``chosen``/``rejected``
(preference data for DPO). Training, test-set generation, the judge and DPO all load records here, so
a file one of them accepts is accepted by the others.

Sources: a local ``.json`` file (a list of records, or an object holding exactly one such list, as
``{"data": [...]}`` exports do), a ``.jsonl`` file (one record a line), an ``http(s)://`` URL of either
(downloaded once into the cache by ``core.download``), or a Hugging Face Hub data set id
(``tatsu-lab/alpaca``, loaded with ``datasets``). Every record is checked, and the first bad one is a
one-line ``DataError`` naming the source, the record's index and the field.

The split is the book's: the first 85% for training, the next 10% for testing, the last 5% for
validation, in file order (or after a seeded shuffle). The three parts are called ``train``, ``test``
and ``validation`` everywhere; ``val`` is accepted for the last.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt2_scratch.core.download import fetch_to_cache, hub_offline_when_unreachable, is_hub_id, is_url
from gpt2_scratch.core.errors import InputError, unicode_problem
from gpt2_scratch.core.files import path_kind

log = logging.getLogger(__name__)

# The book's data sets (rasbt/LLMs-from-scratch, chapter 7), used when --data is not given.
_BOOK_RAW = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07"
BOOK_DATA_URL = f"{_BOOK_RAW}/01_main-chapter-code/instruction-data.json"
BOOK_PREFERENCE_DATA_URL = f"{_BOOK_RAW}/04_preference-tuning-with-dpo/instruction-data-with-preference.json"
# Their sha256 (shared/data/SOURCES.md), so a cached or downloaded copy is checked byte for byte.
KNOWN_SHA256 = {
    BOOK_DATA_URL: "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
    BOOK_PREFERENCE_DATA_URL: "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
}

INSTRUCTION_FIELDS = ("instruction", "output")
PREFERENCE_FIELDS = ("instruction", "chosen", "rejected")
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"val": "validation"}


class DataError(InputError):
    """Records that cannot be used; the message is one line naming the source, record and field."""


def record_input(record: dict) -> str:
    """The record's input text: "" when the field is absent, null or empty."""
    return record.get("input") or ""


def validate_records(records: Sequence, source: str, *, required: Sequence[str] = INSTRUCTION_FIELDS) -> list[dict]:
    """Check every record against the schema (``required`` string fields, ``input`` optional); return them.

    Raises ``DataError`` naming the first record (by 0-based index) and field that break it.
    """
    if len(records) == 0:
        raise DataError(f"{source}: holds no records; give a file with at least one instruction record")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{source}: record {index} is a {type(record).__name__}, not an object with "
                            f"{_names(required)}")
        for field in required:
            if field not in record:
                raise DataError(f"{source}: record {index} has no '{field}' field; every record needs "
                                f"{_names(required)} strings")
            if not isinstance(record[field], str):
                raise DataError(f"{source}: record {index} field '{field}' must be a string, got "
                                f"{type(record[field]).__name__}")
        if record.get("input") is not None and not isinstance(record["input"], str):
            raise DataError(f"{source}: record {index} field 'input' must be a string or absent, got "
                            f"{type(record['input']).__name__}")
        for field, value in record.items():
            # Every field, not only the required ones: stages hash and write whole records (fingerprints,
            # response files), and a lone surrogate fails there, far from the record that holds it.
            problem = unicode_problem(field) or _text_problem(value)
            if problem:
                raise DataError(f"{source}: record {index} field {ascii(field)} holds text that is {problem}; "
                                "fix the record")
    return list(records)


def _text_problem(value) -> str | None:
    """``unicode_problem`` of the first bad string in a JSON value (strings in lists and objects too)."""
    if isinstance(value, str):
        return unicode_problem(value)
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list):
        return next((p for p in map(_text_problem, value) if p), None)
    return None


def _names(fields: Sequence[str]) -> str:
    quoted = [f"'{f}'" for f in fields]
    return ", ".join(quoted[:-1]) + f" and {quoted[-1]}" if len(quoted) > 1 else quoted[0]


def read_records_file(path: Path, source: str | None = None) -> list:
    """The records of a local .json / .jsonl file, unvalidated; a syntax error names its line."""
    source = source or str(path)
    try:
        # A byte order mark (Windows Notepad writes one) is dropped after decoding, not by utf-8-sig, so a
        # byte the error names is still counted from the start of the file.
        text = path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        # Notepad's "Unicode" and PowerShell's default redirection write UTF-16, which starts with its BOM.
        utf16 = err.object[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise DataError(f"{source}: " + ("UTF-16 text, not UTF-8" if utf16 else f"not UTF-8 text (byte {err.start})")
                        + "; save the file as UTF-8 JSON") from None
    except OSError as err:
        raise DataError(f"{source}: cannot read it ({err.strerror or err})") from None
    if path.suffix == ".jsonl":
        return _parse_jsonl(text, source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON lines in a .json file
            return _parse_jsonl(text, source)
        raise DataError(f"{source}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}; "
                        "fix the file or download it again") from None
    if isinstance(data, dict):
        # Some exports wrap the list: {"data": [...]} or {"train": [...]}.
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(f"{source}: the top-level JSON is an object without exactly one list in it; "
                            "expected a list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{source}: the top-level JSON is a {type(data).__name__}, expected a list of records")
    return data


def _parse_jsonl(text: str, source: str) -> list:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{source}: malformed JSON on line {lineno} column {err.colno}: {err.msg}; each "
                            "line of a .jsonl file must be one JSON object") from None
    return records


def load_records(source: str, *, required: Sequence[str] = INSTRUCTION_FIELDS, flag: str = "--data") -> list[dict]:
    """Load and validate the records ``source`` names (a path, a URL or a Hub data set id), in file order."""
    records = load_raw_records(source, flag=flag, required=required)
    return validate_records(records, str(source), required=required)


def load_raw_records(source: str, *, flag: str = "--data", required: Sequence[str] = ()) -> list:
    """The records ``source`` names, unvalidated: a .json/.jsonl file or URL, a .parquet file, a folder written by
    ``datasets``' ``save_to_disk`` (its ``train`` split when it holds several), or a Hub data set id (its
    ``train`` split; ``required`` columns it lacks are one line)."""
    source = str(source)
    if is_url(source):
        path = fetch_to_cache(source, subdir="data", sha256=KNOWN_SHA256.get(source),
                              offline_hint=f"pass {flag} with a local copy of the file")
        return read_records_file(path, source)
    path = Path(source).expanduser()
    if path.is_file():
        return _read_parquet(path) if path.suffix == ".parquet" else read_records_file(path)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return _read_saved_dataset(path)
        raise DataError(f"{flag} {path} is a folder but no datasets save_to_disk folder; pass a .json, .jsonl or "
                        ".parquet file of records")
    kind = path_kind(path)  # /dev/null, a named pipe, a link loop: not a folder, and not "no such file"
    if kind is not None:
        raise DataError(f"{flag} {path} is {kind}, not a file of records; pass a .json or .jsonl file")
    if is_hub_id(source) and path.suffix not in (".json", ".jsonl", ".parquet"):
        return _load_hub_dataset(source, required, flag)
    raise DataError(f"{flag} {path}: no such file; pass an existing .json/.jsonl/.parquet file, a URL or a Hub data "
                    "set id")


def _read_parquet(path: Path) -> list:
    import pyarrow.parquet as pq  # deferred: only Parquet files need it (a dependency of datasets)

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises its own error types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None


def _read_saved_dataset(path: Path) -> list:
    import datasets  # deferred: heavy, and only these folders need it

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises many types; all mean "could not load it"
        raise DataError(f"{path}: cannot load this datasets folder ({type(err).__name__}); save it again with "
                        "save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (it has: {', '.join(ds)}); save one split")
        ds = ds["train"]
    return ds.to_list()


def _load_hub_dataset(repo_id: str, required: Sequence[str], flag: str) -> list[dict]:
    import datasets

    with hub_offline_when_unreachable() as unreachable:
        try:
            ds = datasets.load_dataset(repo_id, split="train")
        except Exception as err:  # datasets raises many types; all mean "could not load it"
            reason = "the Hub's host does not resolve and it is not cached" if unreachable else \
                f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            raise DataError(f"{flag} {repo_id}: cannot load the Hub data set ({reason}); check the id and the network, "
                            "or pass a local file") from None
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise DataError(f"{flag} {repo_id}: the Hub data set has no '{missing[0]}' column (it has: {', '.join(ds.column_names)}); "
                        f"it is not a data set of {_names(required)} records")
    return ds.to_list()


# ---------------------------------------------------------------------------------------------------
# The book's split
# ---------------------------------------------------------------------------------------------------


@dataclass
class Splits:
    """The book's three parts of a data set, as lists of records."""

    train: list[dict]
    validation: list[dict]
    test: list[dict]

    def __getitem__(self, name: str) -> list[dict]:
        return getattr(self, split_name(name))


def split_name(name: str) -> str:
    """The canonical name of a split (``val`` → ``validation``); an InputError for an unknown one."""
    name = SPLIT_ALIASES.get(name, name)
    if name not in SPLITS:
        raise InputError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)} (or all)")
    return name


BOOK_FRACTIONS = (0.85, 0.1)  # train, test; validation is the rest (the book's 85/10/5)


def parse_split(spec: str) -> tuple[float, float]:
    """``--split`` "0.85,0.1" (train, test; validation the rest) or "0.8,0.1,0.1" (validation named too)."""
    try:
        parts = [float(p) for p in spec.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (2, 3) or not all(0 <= p <= 1 for p in parts):
        raise InputError(f"--split {spec!r}: expected two or three fractions in [0, 1] for train, test and "
                         "validation, e.g. 0.85,0.1 (the book) or 0.8,0.1,0.1 (the blog)")
    if len(parts) == 3 and abs(sum(parts) - 1) > 1e-6:
        raise InputError(f"--split {spec!r}: three fractions must add up to 1 (the validation split is the rest)")
    if parts[0] + parts[1] > 1 + 1e-9 or parts[0] == 0:
        raise InputError(f"--split {spec!r}: the train fraction must be above 0 and train + test at most 1")
    if parts[0] + parts[1] > 1 - 1e-9:  # training evaluates on the validation part: it must hold something
        raise InputError(f"--split {spec!r}: leaves nothing for validation (train + test = 1), whose loss the run "
                         "reports; leave some, e.g. 0.85,0.1 (the book) or 0.8,0.1,0.1 (the blog)")
    return parts[0], parts[1]


def book_split(records: Sequence[dict], *, shuffle: bool = False, seed: int = 123,
               fractions: tuple[float, float] = BOOK_FRACTIONS, sample: int | None = None) -> Splits:
    """First 85% train, next 10% test, last 5% validation (1100 records: [0:935], [935:1045], [1045:1100]).

    ``fractions`` changes the train and test shares (cut with ``int(n * f)`` in the order train, test,
    validation, as both the book and the blog cut). ``sample`` first draws that many records the way the
    blog's Alpaca-1000 recipe does, ``random.seed(seed); random.sample(records, sample)`` (Python's own
    generator, so the same records as the blog). With ``shuffle`` the records are then put in the order
    ``datasets.Dataset.shuffle(seed=seed)`` gives (numpy's ``default_rng(seed).permutation``).
    """
    records = list(records)
    if sample is not None:
        if sample > len(records):
            raise InputError(f"--sample {sample}: the data has only {len(records)} records")
        import random

        random.seed(seed)  # the blog's global seeding, then its draw
        records = random.sample(records, sample)
    if shuffle:
        import numpy as np

        records = [records[i] for i in np.random.default_rng(seed).permutation(len(records))]
    n_train, n_test = int(len(records) * fractions[0]), int(len(records) * fractions[1])
    return Splits(train=records[:n_train], test=records[n_train:n_train + n_test],
                  validation=records[n_train + n_test:])


def select_split(records: Sequence[dict], name: str) -> list[dict]:
    """``all`` records, or one part of the book's split."""
    return list(records) if name == "all" else book_split(records)[name]
