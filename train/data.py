"""Instruction data for finetuning: load, validate, split, tokenize, batch — chapter 7's pipeline as a library.

Where the records come from (``load_records``):
  * a local ``.json`` file (a list of records) or ``.jsonl`` file (one record a line),
  * an ``http(s)://`` URL of such a file (downloaded once into the ``datasets`` cache),
  * a Hugging Face Hub data set id such as ``tatsu-lab/alpaca`` or ``yahma/alpaca-cleaned``,
  * ``synthetic`` (or ``synthetic:N``): the offline demo's generated tasks (train/synthetic.py).
Every record is checked (``instruction`` str, ``input`` str or absent, ``output`` str) and a bad one
is reported by index and field, before anything is trained.

Then, as the book does: an 85/10/5 train/test/validation split in file order (or after a seeded
shuffle), ``format_example`` text tokenized with ``Dataset.map(batched=True)`` (cached on disk under a
fingerprint of the data and the options), over-long examples truncated or dropped, and batches made by
``InstructionCollator``, which reproduces the book's ``custom_collate_fn`` exactly: pad every item to
the batch's longest + 1 with <|endoftext|>, shift inputs and targets by one, and ignore (-100) every
padding target after the first, so the model learns to emit one <|endoftext|> after a response.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import datasets
import torch
from torch.utils.data import Sampler

from gpt2_scratch import format_example, format_input

logger = logging.getLogger(__name__)

PAD_TOKEN_ID = 50256  # <|endoftext|>: GPT-2 has no pad token, the book pads with eos
IGNORE_INDEX = -100  # what torch's cross_entropy skips

# The book's data set, used when --data is not given.
BOOK_DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Bump when the tokenized columns change, so stale ``.map`` caches are not reused.
_TOKENIZE_VERSION = "1"


class DataError(ValueError):
    """A problem with the instruction data that the user must fix; the message is one actionable line."""


# ---------------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------------


def validate_records(records: Sequence, source: str) -> None:
    """Raise ``DataError`` naming the first record (by index) and field that breaks the schema."""
    if len(records) == 0:
        raise DataError(f"{source}: holds no records; give a file with at least one instruction record")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{source}: record {index} is a {type(record).__name__}, not an object with "
                            "'instruction', 'input' and 'output'")
        for field in ("instruction", "output"):
            if field not in record:
                raise DataError(f"{source}: record {index} has no '{field}' field; every record needs "
                                "'instruction' and 'output' strings")
            if not isinstance(record[field], str):
                raise DataError(f"{source}: record {index} field '{field}' must be a string, got "
                                f"{type(record[field]).__name__}")
        # "input" may be absent (Magpie-style data) or null (what a column store makes of absent).
        if record.get("input") is not None and not isinstance(record["input"], str):
            raise DataError(f"{source}: record {index} field 'input' must be a string or absent, got "
                            f"{type(record['input']).__name__}")


def _parse_json_file(path: Path, source: str) -> list:
    """Parse a .json list or .jsonl file with the standard library, so a syntax error has a position."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{source}: not UTF-8 text (byte {err.start}); save the file as UTF-8 JSON") from None
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{source}: malformed JSON on line {lineno} column {err.colno}: {err.msg}; "
                                "each line of a .jsonl file must be one JSON object") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{source}: malformed JSON at line {err.lineno} column {err.colno} (char {err.pos}): "
                        f"{err.msg}; fix the file or re-download it") from None
    if isinstance(data, dict):
        # Some exports wrap the list: {"data": [...]} / {"train": [...]}.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{source}: top-level JSON is an object, expected a list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{source}: top-level JSON is a {type(data).__name__}, expected a list of records")
    return data


def _download(url: str) -> Path:
    """Download ``url`` into the datasets cache (once); a one-line error when it cannot be reached."""
    try:
        return Path(datasets.DownloadManager().download(url))
    except Exception as err:  # requests/fsspec raise many types; all mean "could not fetch"
        raise DataError(f"cannot download {url} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                        "check the network or pass a local file with --data") from None


def _records_dataset(path: Path) -> datasets.Dataset:
    """Arrow-backed Dataset of a validated local JSON/JSONL file (cached by the file's hash)."""
    return datasets.load_dataset("json", data_files=str(path), split="train")


def load_records(source: str, *, seed: int = 123) -> datasets.Dataset:
    """Load and validate instruction records from a path, URL, Hub id or ``synthetic[:N]``.

    Returns a ``datasets.Dataset`` with at least ``instruction``, ``input`` (None when absent) and
    ``output`` columns, in file order.
    """
    if source == "synthetic" or source.startswith("synthetic:"):
        from train.synthetic import write_synthetic_file

        size = int(source.split(":", 1)[1]) if ":" in source else None
        path = write_synthetic_file(size=size, seed=seed)
        return _records_dataset(path)

    if source.startswith(("http://", "https://")):
        path = _download(source)
        validate_records(_parse_json_file(path, source), source)
        return _records_dataset(path)

    path = Path(source).expanduser()
    if path.is_file():
        validate_records(_parse_json_file(path, str(path)), str(path))
        return _records_dataset(path)
    if path.exists():
        raise DataError(f"{path} is a directory; pass a .json or .jsonl file of instruction records")
    if _HUB_ID.match(source) and path.suffix not in (".json", ".jsonl"):
        return _load_hub_dataset(source)
    raise DataError(f"data file not found: {path}; pass an existing .json/.jsonl file, a URL, a Hub id "
                    "or 'synthetic'")


def _load_hub_dataset(repo_id: str) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(repo_id, split="train")
    except Exception as err:
        raise DataError(f"cannot load Hub data set {repo_id} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200] if str(err) else ''}); check the id and the network, "
                        "or pass a local file with --data") from None
    missing = [c for c in ("instruction", "output") if c not in ds.column_names]
    if missing:
        raise DataError(f"Hub data set {repo_id} has no '{missing[0]}' column (columns: "
                        f"{', '.join(ds.column_names)}); it is not Alpaca-style instruction data")
    columns = {c: ds[c] for c in ("instruction", "input", "output") if c in ds.column_names}
    records = [dict(zip(columns, values)) for values in zip(*columns.values())]
    validate_records(records, repo_id)
    return ds


# ---------------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------------


def split_dataset(ds: datasets.Dataset, *, shuffle: bool = False, seed: int = 123) -> datasets.DatasetDict:
    """The book's split: first 85% train, next 10% test, last 5% validation (in file order).

    With ``shuffle`` the records are first shuffled with ``seed`` (reproducible).
    For 1100 records: train [0:935], test [935:1045], validation [1045:1100].
    """
    if shuffle:
        ds = ds.shuffle(seed=seed).flatten_indices()
    n = len(ds)
    n_train = int(n * 0.85)
    n_test = int(n * 0.1)
    return datasets.DatasetDict(
        train=ds.select(range(0, n_train)),
        test=ds.select(range(n_train, n_train + n_test)),
        validation=ds.select(range(n_train + n_test, n)),
    )


# ---------------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------------


def _records_from_batch(batch: dict) -> list[dict]:
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def tokenize_dataset(
    ds: datasets.Dataset,
    tokenizer,
    *,
    style: str = "alpaca",
    max_length: int | None = None,
    too_long: str = "truncate",
    split_name: str = "train",
) -> datasets.Dataset:
    """Add ``input_ids`` (prompt + response header + output) and ``prompt_length`` (tokens of the prompt).

    ``prompt_length`` counts the leading tokens that lie entirely inside ``format_input(record)``, so
    ``--mask-prompt`` masks exactly the prompt. An example whose training sequence (its tokens + the
    closing <|endoftext|>) exceeds ``max_length`` is cut to fit (``too_long="truncate"``) or removed
    (``"drop"``); how many is logged. The result is cached by ``datasets`` under a fingerprint built
    from the data's fingerprint and these options.
    """
    if too_long not in ("truncate", "drop"):
        raise ValueError(f"too_long must be 'truncate' or 'drop', got {too_long!r}")

    def tokenize(batch: dict) -> dict:
        records = _records_from_batch(batch)
        prompts = [format_input(r, style) for r in records]
        texts = [format_example(r, style) for r in records]
        enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=False)
        prompt_lengths = []
        for prompt, offsets in zip(prompts, enc["offset_mapping"]):
            # Tokens whose text ends inside the prompt; a token straddling the boundary belongs to the response.
            prompt_lengths.append(sum(1 for _, end in offsets if end <= len(prompt)))
        return {
            "input_ids": enc["input_ids"],
            "prompt_length": prompt_lengths,
            "length": [len(ids) for ids in enc["input_ids"]],
        }

    fingerprint = hashlib.sha256(
        f"{ds._fingerprint}|{style}|{tokenizer.name_or_path}|{len(tokenizer)}|{_TOKENIZE_VERSION}".encode()
    ).hexdigest()[:16]
    tokenized = ds.map(
        tokenize,
        batched=True,
        new_fingerprint=fingerprint,
        desc=f"tokenizing {split_name}",
    )
    if max_length is None:
        return tokenized

    # The collate appends one <|endoftext|> and then drops the last position, so an example of
    # L tokens makes L input positions; L must fit into the context.
    lengths = tokenized["length"]
    n_long = sum(1 for n in lengths if n > max_length)
    if n_long == 0:
        return tokenized
    if too_long == "drop":
        logger.warning("%s: dropped %d of %d examples longer than %d tokens", split_name, n_long, len(lengths),
                       max_length)
        kept = [i for i, n in enumerate(lengths) if n <= max_length]
        return tokenized.select(kept)
    logger.warning("%s: truncated %d of %d examples longer than %d tokens", split_name, n_long, len(lengths),
                   max_length)

    def truncate(example: dict) -> dict:
        ids = example["input_ids"][:max_length]
        return {"input_ids": ids, "length": len(ids),
                "prompt_length": min(example["prompt_length"], max_length)}

    return tokenized.map(truncate, new_fingerprint=f"{fingerprint}-trunc{max_length}",
                         desc=f"truncating {split_name}")


# ---------------------------------------------------------------------------------------------------
# Collate
# ---------------------------------------------------------------------------------------------------


def collate_instruction_batch(
    items: Sequence[Sequence[int]],
    *,
    pad_token_id: int = PAD_TOKEN_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    prompt_lengths: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's ``custom_collate_fn``: (inputs, targets), both [batch, longest + 1 - 1] long tensors.

    Each item gets one <|endoftext|> and is padded with it to the batch's longest + 1; inputs drop the
    last position and targets the first (next-token shift); every padding target after the item's own
    <|endoftext|> becomes ``ignore_index``; both are cut to ``allowed_max_length``. With
    ``prompt_lengths`` (the book's exercise 7.2), targets that are prompt tokens are ignored too:
    target j is token j+1, so the first ``prompt_length - 1`` targets are masked.

    The book finds the padding by value (every target equal to the pad id after the first); here by
    position (after the item's own length), which is the same unless an item itself contains id 50256.
    """
    width = max(len(item) for item in items) + 1  # longest + its <|endoftext|>
    padded = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    targets_mask = torch.zeros((len(items), width - 1), dtype=torch.bool)  # True = ignore
    for row, item in enumerate(items):
        n = len(item)
        padded[row, :n] = torch.as_tensor(item, dtype=torch.long)
        # targets = padded[1:]: position n-1 predicts the closing <|endoftext|>; positions ≥ n are padding.
        targets_mask[row, n:] = True
        if prompt_lengths is not None:
            targets_mask[row, : max(prompt_lengths[row] - 1, 0)] = True
    inputs = padded[:, :-1]  # [B, width-1]
    targets = padded[:, 1:].masked_fill(targets_mask, ignore_index)  # [B, width-1]
    if allowed_max_length is not None:
        inputs = inputs[:, :allowed_max_length]
        targets = targets[:, :allowed_max_length]
    return inputs.contiguous(), targets.contiguous()


@dataclass
class InstructionCollator:
    """DataLoader ``collate_fn`` over tokenized examples: ``{"input_ids": [B, T], "labels": [B, T]}``.

    ``labels`` are already shifted (``labels[:, j]`` is the token after ``input_ids[:, j]``, the book's
    targets), so the training loop computes the loss from logits directly instead of passing labels
    to the model (transformers' causal-LM loss would shift them a second time).
    """

    pad_token_id: int = PAD_TOKEN_ID
    ignore_index: int = IGNORE_INDEX
    allowed_max_length: int | None = None
    mask_prompt: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        inputs, targets = collate_instruction_batch(
            [f["input_ids"] for f in features],
            pad_token_id=self.pad_token_id,
            ignore_index=self.ignore_index,
            allowed_max_length=self.allowed_max_length,
            prompt_lengths=[f["prompt_length"] for f in features] if self.mask_prompt else None,
        )
        return {"input_ids": inputs, "labels": targets}


# ---------------------------------------------------------------------------------------------------
# Batch order
# ---------------------------------------------------------------------------------------------------


class EpochBatchSampler(Sampler[list[int]]):
    """Global batches of example indices, reproducible from (seed, epoch) alone.

    ``shuffle=False`` keeps file order (evaluation); ``shuffle=True`` draws a fresh permutation per
    epoch, like the book's ``DataLoader(shuffle=True)``. ``group_by_length`` sorts each window of
    ``group_size`` batches of that permutation by length before cutting batches, then shuffles the
    batch order: batches hold similar lengths (less padding) and every epoch is still different.

    The order depends only on ``seed`` and the epoch set with ``set_epoch``, never on global RNG
    state, so a resumed run sees exactly the batches the interrupted one would have, and every
    process of a multi-process run sees the same global batches (Accelerate then hands each process
    its slice).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool = True, drop_last: bool = True,
                 group_by_length: bool = False, group_size: int = 50, seed: int = 123):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size  # Accelerate reads these two attributes when it shards batches
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        n = len(self.lengths)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
        if self.group_by_length:
            window = self.batch_size * self.group_size
            order = [i for start in range(0, n, window)
                     for i in sorted(order[start:start + window], key=lambda i: -self.lengths[i])]
        batches = [order[s:s + self.batch_size] for s in range(0, n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.group_by_length and self.shuffle:
            perm = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in perm]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def evaluation_sampler(lengths: Sequence[int], batch_size: int, *, eval_iter: int,
                       group_by_length: bool = False) -> EpochBatchSampler:
    """The validation batches train/sft.py evaluates on: file order, the last partial batch kept.

    Evaluation reads the first ``eval_iter`` batches. With ``group_by_length`` those same examples
    are regrouped by length among themselves: less padding to run through the model, and the same
    loss per target token (causal attention never lets a real token see padding).
    """
    return EpochBatchSampler(lengths, batch_size, shuffle=False, drop_last=False,
                             group_by_length=group_by_length, group_size=eval_iter)


# ---------------------------------------------------------------------------------------------------
# Everything together
# ---------------------------------------------------------------------------------------------------


@dataclass
class InstructionData:
    """The three tokenized splits plus the raw records of the test and validation splits."""

    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    test_records: list[dict]
    validation_records: list[dict]


def _raw_records(ds: datasets.Dataset) -> list[dict]:
    return [{k: v for k, v in r.items() if not (k == "input" and v is None)} for r in ds]


def prepare_instruction_data(
    source: str | datasets.Dataset,
    tokenizer,
    *,
    style: str = "alpaca",
    max_length: int | None = None,
    too_long: str = "truncate",
    shuffle_split: bool = False,
    seed: int = 123,
    name: str | None = None,
) -> InstructionData:
    """Load (unless ``source`` is already a loaded Dataset), validate, split and tokenize; raise
    ``DataError`` if no training example is left."""
    if isinstance(source, datasets.Dataset):
        records, source = source, name or "data"
    else:
        records = load_records(source, seed=seed)
    splits = split_dataset(records, shuffle=shuffle_split, seed=seed)
    if len(splits["train"]) == 0:
        raise DataError(f"{source}: {len(records)} records leave no training examples after the 85/10/5 split; "
                        "give at least 2 records")
    tokenized = {
        name: tokenize_dataset(split, tokenizer, style=style, max_length=max_length, too_long=too_long,
                               split_name=name)
        for name, split in splits.items()
    }
    if len(tokenized["train"]) == 0:
        raise DataError(f"{source}: no training examples left after dropping those longer than {max_length} "
                        "tokens; use --too-long truncate or a model with a longer context")
    logger.info("data %s: %d train / %d validation / %d test examples", source, len(tokenized["train"]),
                len(tokenized["validation"]), len(tokenized["test"]))
    return InstructionData(
        train=tokenized["train"],
        validation=tokenized["validation"],
        test=tokenized["test"],
        test_records=_raw_records(splits["test"]),
        validation_records=_raw_records(splits["validation"]),
    )


def data_cache_dir() -> Path:
    """Where the project caches generated data (beside the ``datasets`` cache)."""
    return Path(os.environ.get("GPT2_SCRATCH_CACHE", Path(datasets.config.HF_DATASETS_CACHE) / "gpt2_scratch"))
