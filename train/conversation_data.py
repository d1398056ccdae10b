"""Conversations as training examples: the chat style's tokens, which of them are supervised, and long ones cut.

An example is the chat style's text of a conversation (core/prompts.py, ``conversation_segments``) tokenized
in one piece, as transformers' ``apply_chat_template`` tokenizes the saved template's text, so the ids are
the same. ``assistant_mask`` marks every token that overlaps an assistant turn's text or its
``<|endoftext|>`` (a token straddling a header and the answer counts as the answer's, as transformers'
``return_assistant_tokens_mask`` counts it). The closing ``<|endoftext|>`` is left off ``input_ids``: the
collate (train/data.py) appends it to every example and supervises it, as it does for the book's records.

Long conversations (step 6 of issue 29): one whose tokens do not fit ``max_length`` is cut after its last
assistant turn that fits whole, so no truncated answer is ever presented as complete; one whose first
assistant turn does not fit is dropped (or, with ``too_long="truncate"``, still dropped: a cut inside the
only answer would teach an answer that stops mid-sentence). Both are counted and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import datasets

from gpt2_scratch.core.prompts import conversation_segments, record_messages

logger = logging.getLogger(__name__)

FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                              "assistant_mask": datasets.Sequence(datasets.Value("int8")),
                              "prompt_length": datasets.Value("int64"), "length": datasets.Value("int64")})


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int], list[int]]:
    """(ids of the whole text, 1 for each supervised token, the index after each assistant turn's
    ``<|endoftext|>``) for ``messages``."""
    spans, text = [], ""
    for piece, supervised in conversation_segments(messages):
        if supervised:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    mask = [int(any(start < b and a < end for a, b in spans)) for start, end in enc["offset_mapping"]]
    turn_ends = [index + 1 for index, (start, end) in enumerate(enc["offset_mapping"])
                 if text[start:end] == "<|endoftext|>" and mask[index]]
    return enc["input_ids"], mask, turn_ends


def tokenize_conversations(records: Sequence[dict], tokenizer, *, max_length: int | None = None,
                           split_name: str = "train") -> datasets.Dataset:
    """``input_ids`` (without the closing <|endoftext|>), ``assistant_mask``, ``prompt_length`` (tokens before
    the first supervised one) and ``length`` of each record; long ones cut at a turn boundary or dropped."""
    rows = {name: [] for name in FEATURES}
    cut = dropped = 0
    for record in records:
        ids, mask, turn_ends = encode_conversation(tokenizer, record_messages(record))
        end = len(ids)
        if max_length is not None and end - 1 > max_length:  # the collate's <|endoftext|> is the -1
            fitting = [e for e in turn_ends if e - 1 <= max_length]
            if not fitting:
                dropped += 1
                continue
            end, cut = fitting[-1], cut + 1
        ids, mask = ids[:end - 1], mask[:end - 1]  # the closing <|endoftext|>: the collate's
        rows["input_ids"].append(ids)
        rows["assistant_mask"].append(mask)
        rows["prompt_length"].append(mask.index(1) if 1 in mask else len(ids))
        rows["length"].append(len(ids))
    if cut or dropped:
        logger.warning("%s: %d of %d conversations longer than %d tokens: %d cut after their last whole assistant "
                       "turn, %d dropped (their first answer does not fit)", split_name, cut + dropped, len(records),
                       max_length, cut, dropped)
    return datasets.Dataset.from_dict(rows, features=FEATURES)
