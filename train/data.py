"""Instruction data for finetuning: tokenize, batch, order — chapter 7's pipeline as a library.

The records come from ``core.records`` (one schema and one loader for every stage: a .json/.jsonl
file, a URL, a Hub data set), split the book's way (85/10/5 in file order, or after a seeded shuffle).
Here they become training examples: ``format_example`` text tokenized with ``Dataset.map(batched=True)``,
over-long examples truncated or dropped, and batches made by ``InstructionCollator``, which reproduces
the book's ``custom_collate_fn`` exactly: pad every item to the batch's longest + 1 with <|endoftext|>,
shift inputs and targets by one, and ignore (``IGNORE_INDEX``) every padding target after the first, so the model
learns to emit one <|endoftext|> after a response. ``EpochBatchSampler`` decides the batch order from
(seed, epoch) alone, so a resumed run sees exactly the batches the interrupted one would have.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import datasets
import torch
from torch.utils.data import Sampler

from gpt2_scratch.core.prompts import CHAT_STYLE, format_example, format_input
from gpt2_scratch.core.records import BOOK_FRACTIONS, DataError, Splits, book_split, record_input
from gpt2_scratch.modeling_gpt2_scratch import IGNORE_INDEX  # the one ignore index (what cross_entropy skips)
from gpt2_scratch.tokenizer import ENDOFTEXT_ID
from gpt2_scratch.train.conversation_data import tokenize_conversations

logger = logging.getLogger(__name__)

PAD_TOKEN_ID = ENDOFTEXT_ID  # GPT-2 has no pad token: the book pads with <|endoftext|>


# ---------------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------------


def records_dataset(records: Sequence[dict]) -> datasets.Dataset:
    """The records as a ``datasets.Dataset`` with exactly the columns a prompt is made of.

    Built column by column: ``Dataset.from_list`` takes its columns from the first record only, and a
    record without ``input`` (allowed) would otherwise hide every later record's input.
    """
    return datasets.Dataset.from_dict({
        "instruction": [r["instruction"] for r in records],
        "input": [record_input(r) for r in records],
        "output": [r["output"] for r in records],
    })


def _records_from_batch(batch: dict) -> list[dict]:
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def longest_token_bytes(tokenizer) -> int:
    """Bytes of the vocabulary's longest token (byte-level BPE: one vocabulary character per byte)."""
    return max(len(token) for token in tokenizer.get_vocab())


def tokenize_dataset(
    ds: datasets.Dataset,
    tokenizer,
    *,
    style: str = "alpaca",
    max_length: int | None = None,
    too_long: str = "truncate",
    split_name: str = "train",
) -> datasets.Dataset:
    """Add ``input_ids`` (prompt + response header + output), ``prompt_length`` (tokens of the prompt) and
    ``length`` (tokens in all).

    ``prompt_length`` counts the leading tokens that lie entirely inside ``format_input(record)``, so
    ``--mask-prompt`` masks exactly the prompt. An example whose training sequence (its tokens + the
    closing <|endoftext|>) exceeds ``max_length`` is cut to fit (``too_long="truncate"``) or removed
    (``"drop"``); how many is logged. An empty split stays empty, with the same columns.
    """
    if too_long not in ("truncate", "drop"):
        raise ValueError(f"too_long must be 'truncate' or 'drop', got {too_long!r}")

    # A text longer than this has more than max_length tokens whatever it holds (no token spans more bytes than
    # the longest in the vocabulary, and a character is at least one byte): it is cut here, before tokenizing, so
    # a 10 MB record costs what a 100 kB one does (the tokenizer takes ~200 bytes of memory per byte of text).
    # Its first max_length tokens are unchanged unless the cut falls inside one word that starts before them.
    cut = None if max_length is None else (max_length + 1) * longest_token_bytes(tokenizer)

    def tokenize(batch: dict) -> dict:
        records = _records_from_batch(batch)
        prompts = [format_input(r, style) for r in records]
        texts = [format_example(r, style) for r in records]
        if cut is not None:
            texts = [text[:cut] for text in texts]
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

    if len(ds) == 0:  # map() would not add the columns to an empty split
        return datasets.Dataset.from_dict({"input_ids": [], "prompt_length": [], "length": []},
                                          features=datasets.Features({
                                              "input_ids": datasets.Sequence(datasets.Value("int64")),
                                              "prompt_length": datasets.Value("int64"),
                                              "length": datasets.Value("int64")}))
    tokenized = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"tokenizing {split_name}")
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
        return tokenized.select([i for i, n in enumerate(lengths) if n <= max_length])
    logger.warning("%s: truncated %d of %d examples longer than %d tokens", split_name, n_long, len(lengths),
                   max_length)

    def truncate(example: dict) -> dict:
        ids = example["input_ids"][:max_length]
        return {"input_ids": ids, "length": len(ids), "prompt_length": min(example["prompt_length"], max_length)}

    return tokenized.map(truncate, desc=f"truncating {split_name}")


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
    assistant_masks: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's ``custom_collate_fn``: (inputs, targets), both [batch, longest + 1 - 1] long tensors.

    Each item gets one <|endoftext|> and is padded with it to the batch's longest + 1; inputs drop the
    last position and targets the first (next-token shift); every padding target after the item's own
    <|endoftext|> becomes ``ignore_index``; both are cut to ``allowed_max_length``. With
    ``prompt_lengths`` (the book's exercise 7.2), targets that are prompt tokens are ignored too:
    target j is token j+1, so the first ``prompt_length - 1`` targets are masked. With ``assistant_masks``
    (conversations, train/conversation_data.py) target j is kept exactly where token j+1 is an assistant's, and
    the appended <|endoftext|> (the last assistant turn's end) is kept.

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
        if assistant_masks is not None:
            targets_mask[row, : n - 1] = torch.as_tensor(assistant_masks[row][1:n], dtype=torch.bool).logical_not()
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
    targets), so the training loop passes them to the model as ``shift_labels``, never as ``labels``
    (transformers' causal-LM convention, which would shift them a second time).
    """

    pad_token_id: int = PAD_TOKEN_ID
    ignore_index: int = IGNORE_INDEX
    allowed_max_length: int | None = None
    mask_prompt: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        conversations = "assistant_mask" in features[0]  # conversations: every assistant turn, nothing else
        inputs, targets = collate_instruction_batch(
            [f["input_ids"] for f in features],
            pad_token_id=self.pad_token_id,
            ignore_index=self.ignore_index,
            allowed_max_length=self.allowed_max_length,
            prompt_lengths=[f["prompt_length"] for f in features] if self.mask_prompt and not conversations else None,
            assistant_masks=[f["assistant_mask"] for f in features] if self.mask_prompt and conversations else None,
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


def check_validation_left(kept: int, source: str, *, unit: str, max_length: int | None, remedy: str) -> None:
    """Every evaluation reports the validation loss: refuse, before anything is written, a validation part that
    lost all its examples to the length limit (``kept`` are left). ``parse_split`` already refused fractions
    that leave it no record; an empty test part is fine (it only means no test responses)."""
    if kept == 0:
        raise DataError(f"{source}: no validation {unit} is left after dropping those longer than {max_length} "
                        f"tokens; {remedy}")


def replace_held_out(splits: Splits, validation_records: Sequence[dict] | None,
                     test_records: Sequence[dict] | None) -> Splits:
    """``splits`` with the held-out records of --val-data / --test-data as its validation / test part; the part of
    the split they replace then trains too (appended to train, in file order)."""
    if validation_records is not None:
        splits.train, splits.validation = splits.train + splits.validation, list(validation_records)
    if test_records is not None:
        splits.train, splits.test = splits.train + splits.test, list(test_records)
    return splits


@dataclass
class InstructionData:
    """The three tokenized splits plus the raw records of each."""

    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    test_records: list[dict]
    validation_records: list[dict]
    train_records: list[dict]


def prepare_instruction_data(
    records: Sequence[dict],
    tokenizer,
    *,
    source: str = "data",
    style: str = "alpaca",
    max_length: int | None = None,
    too_long: str = "truncate",
    shuffle_split: bool = False,
    seed: int = 123,
    fractions: tuple[float, float] = BOOK_FRACTIONS,
    sample: int | None = None,
    validation_records: Sequence[dict] | None = None,
    test_records: Sequence[dict] | None = None,
) -> InstructionData:
    """Split (the book's 85/10/5 unless ``fractions``/``sample`` say otherwise: ``core.records.book_split``) and
    tokenize validated ``records``; raise ``DataError`` if no training example is left.

    ``validation_records`` / ``test_records`` (--val-data / --test-data) replace that part of the split, whose
    share of ``records`` then trains too. The chat style tokenizes conversations (train/conversation_data.py).
    """
    splits = replace_held_out(book_split(records, shuffle=shuffle_split, seed=seed, fractions=fractions,
                                         sample=sample), validation_records, test_records)
    if not splits.train:
        raise DataError(f"{source}: {sample or len(records)} record(s) leave no training example after the split; "
                        "give at least 2 records")
    if style == CHAT_STYLE:
        tokenized = {name: tokenize_conversations(splits[name], tokenizer, max_length=max_length, split_name=name)
                     for name in ("train", "validation", "test")}
    else:
        tokenized = {name: tokenize_dataset(records_dataset(splits[name]), tokenizer, style=style,
                                            max_length=max_length, too_long=too_long, split_name=name)
                     for name in ("train", "validation", "test")}
    if len(tokenized["train"]) == 0:
        raise DataError(f"{source}: no training example is left after dropping those longer than {max_length} "
                        "tokens; use --too-long truncate or a model with a longer context")
    check_validation_left(len(tokenized["validation"]), source, unit="example", max_length=max_length,
                          remedy="use --too-long truncate or a model with a longer context")
    logger.info("data %s: %d train / %d validation / %d test examples", source, len(tokenized["train"]),
                len(tokenized["validation"]), len(tokenized["test"]))
    return InstructionData(train=tokenized["train"], validation=tokenized["validation"], test=tokenized["test"],
                           test_records=splits.test, validation_records=splits.validation, train_records=splits.train)
