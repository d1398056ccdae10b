"""Preference pairs for DPO (the book's bonus notebook): records with ``chosen`` and ``rejected`` answers,
tokenized and batched the way train/data.py does instruction examples.

The records are ``core.records``' (one schema: ``instruction``, ``input`` optional, ``chosen``,
``rejected``; a bad record is a one-line ``DataError`` naming its index and field), or TRL's
``prompt``/``chosen``/``rejected`` (core/conversations.py; a prompt of several exchanges needs the chat
style, whose prompt is the conversation and the assistant header), their fields renamed first by
``--columns SRC=DST,...`` (core/conversations.py's parser), and split the book's way (85/10/5 in file
order), unless --val-data / --test-data give the validation / test records (train/data.py's
``replace_held_out``, as SFT). Each pair becomes two token sequences, prompt + response header +
answer, and ``prompt_length``: the tokens of the prompt and the header, whose targets are masked, so a
response's log-probability covers exactly its own tokens and its closing <|endoftext|> (the token SFT
taught the model to end with). Batches come from train/data.py's collate (the book's padding and
shift): chosen and rejected are padded to one common width and kept as separate tensors, so
Accelerate can hand each process its slice of the pairs and the loop concatenates them into one
forward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import torch

from gpt2_scratch.core.prompts import format_input, response_header
from gpt2_scratch.core.conversations import PREFERENCE_FIELD_NAMES, parse_columns, preference_record, rename_fields
from gpt2_scratch.core.records import (BOOK_FRACTIONS, PREFERENCE_FIELDS, DataError, book_split, load_raw_records,
                                       validate_records)
from gpt2_scratch.train.data import (IGNORE_INDEX, PAD_TOKEN_ID, check_validation_left, collate_instruction_batch,
                                     replace_held_out)

logger = logging.getLogger(__name__)

RESPONSES = ("chosen", "rejected")


def load_preference_records(source: str, *, columns: str | None = None, flag: str = "--data") -> list[dict]:
    """The records of ``source`` (path, URL, Hub id, Parquet, datasets folder), each with non-empty ``chosen`` and
    ``rejected`` strings: the book's records, or TRL's ``prompt``/``chosen``/``rejected`` (strings or messages;
    ``core.conversations.preference_record``), recognised by record 0's ``prompt`` field. ``columns`` (--columns
    ``SRC=DST,...``) renames the fields first; ``flag`` names the option ``source`` came from."""
    mapping = parse_columns(columns, PREFERENCE_FIELD_NAMES,
                            example="question=instruction,response_chosen=chosen,response_rejected=rejected")
    source_of = {dst: src for src, dst in mapping.items()}  # a Hub data set's columns are checked before renaming
    raw = load_raw_records(source, flag=flag, required=tuple(source_of.get(f, f) for f in RESPONSES))
    raw = rename_fields(raw, mapping, source)
    if raw and isinstance(raw[0], dict) and "prompt" in raw[0]:
        records = [preference_record(record, f"{source}: record {index}") for index, record in enumerate(raw)]
    else:
        records = validate_records(raw, source, required=PREFERENCE_FIELDS)
    for index, record in enumerate(records):
        for field in RESPONSES:
            if not record[field].strip():
                raise DataError(f"{source}: record {index} field '{field}' is empty; a preference pair needs two "
                                "answers to compare (fix or remove the record)")
    return records


def tokenize_pairs(records: Sequence[dict], tokenizer, *, style: str = "alpaca", max_length: int | None = None,
                   split_name: str = "train") -> datasets.Dataset:
    """One row per pair: ``index`` (its row number), ``chosen_ids``, ``rejected_ids``, their
    ``*_prompt_length`` (tokens lying entirely inside prompt + response header) and ``length`` (the longer).

    A pair with a sequence longer than ``max_length`` is dropped (a cut answer would be compared with a
    whole one); how many is logged.
    """
    rows: dict[str, list] = {"index": [], "length": []}
    for field in RESPONSES:
        rows[f"{field}_ids"], rows[f"{field}_prompt_length"] = [], []
    prompts = [format_input(r, style) + response_header(style) for r in records]
    dropped = 0
    encoded = {field: tokenizer([p + r[field] for p, r in zip(prompts, records)], return_offsets_mapping=True,
                                add_special_tokens=False) for field in RESPONSES}
    for i, prompt in enumerate(prompts):
        ids = {f: encoded[f]["input_ids"][i] for f in RESPONSES}
        if max_length is not None and max(len(x) for x in ids.values()) > max_length:
            dropped += 1
            continue
        rows["index"].append(len(rows["index"]))  # the row's number: where the reference table keeps it
        rows["length"].append(max(len(x) for x in ids.values()))
        for field in RESPONSES:
            rows[f"{field}_ids"].append(ids[field])
            # Tokens whose text ends inside the prompt; one straddling the boundary belongs to the answer.
            rows[f"{field}_prompt_length"].append(sum(1 for _, end in encoded[field]["offset_mapping"][i]
                                                      if end <= len(prompt)))
    if dropped:
        logger.warning("%s: dropped %d of %d pairs longer than %d tokens", split_name, dropped, len(records), max_length)
    features = datasets.Features({
        "index": datasets.Value("int64"), "length": datasets.Value("int64"),
        **{f"{f}_ids": datasets.Sequence(datasets.Value("int64")) for f in RESPONSES},
        **{f"{f}_prompt_length": datasets.Value("int64") for f in RESPONSES},
    })
    return datasets.Dataset.from_dict(rows, features=features)


@dataclass
class PreferenceCollator:
    """DataLoader ``collate_fn``: ``{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels": [B, T],
    "index": [B]}``, chosen and rejected padded to one width (the book's collate, prompt targets masked).

    Labels are pre-shifted as in ``InstructionCollator`` (``labels[:, j]`` is the token after
    ``ids[:, j]``); ``IGNORE_INDEX`` marks the prompt, the response header and the padding.
    """

    pad_token_id: int = PAD_TOKEN_ID
    allowed_max_length: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        items = [f[f"{field}_ids"] for field in RESPONSES for f in features]
        prompt_lengths = [f[f"{field}_prompt_length"] for field in RESPONSES for f in features]
        inputs, targets = collate_instruction_batch(items, pad_token_id=self.pad_token_id, ignore_index=IGNORE_INDEX,
                                                    allowed_max_length=self.allowed_max_length,
                                                    prompt_lengths=prompt_lengths)
        n = len(features)
        return {"chosen_ids": inputs[:n], "chosen_labels": targets[:n], "rejected_ids": inputs[n:],
                "rejected_labels": targets[n:], "index": torch.tensor([f["index"] for f in features])}


@dataclass
class PreferenceData:
    """The tokenized pairs of the three splits, and the raw test and validation records."""

    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    test_records: list[dict]
    validation_records: list[dict]


def prepare_preference_data(records: Sequence[dict], tokenizer, *, source: str = "data", style: str = "alpaca",
                            max_length: int | None = None, shuffle_split: bool = False, seed: int = 123,
                            fractions: tuple[float, float] = BOOK_FRACTIONS, sample: int | None = None,
                            validation_records: Sequence[dict] | None = None,
                            test_records: Sequence[dict] | None = None) -> PreferenceData:
    """Split (the book's 85/10/5 unless ``fractions``/``sample`` say otherwise) and tokenize validated
    preference records; a DataError if no training pair is left. ``validation_records`` / ``test_records``
    (--val-data / --test-data) replace that part of the split, whose share of ``records`` then trains too."""
    splits = replace_held_out(book_split(records, shuffle=shuffle_split, seed=seed, fractions=fractions,
                                         sample=sample), validation_records, test_records)
    if not splits.train:
        raise DataError(f"{source}: {sample or len(records)} record(s) leave no training pair after the split; "
                        "give at least 2 records")
    tokenized = {name: tokenize_pairs(splits[name], tokenizer, style=style, max_length=max_length, split_name=name)
                 for name in ("train", "validation", "test")}
    if len(tokenized["train"]) == 0:
        raise DataError(f"{source}: no training pair is left after dropping those longer than {max_length} tokens; "
                        "use a model with a longer context")
    check_validation_left(len(tokenized["validation"]), source, unit="pair", max_length=max_length,
                          remedy="use a model with a longer context")
    logger.info("data %s: %d train / %d validation / %d test pairs", source, len(tokenized["train"]),
                len(tokenized["validation"]), len(tokenized["test"]))
    return PreferenceData(train=tokenized["train"], validation=tokenized["validation"], test=tokenized["test"],
                          test_records=splits.test, validation_records=splits.validation)

