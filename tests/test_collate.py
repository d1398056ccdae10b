"""The instruction collate against the book's documented tensors, prompt masking and batch order."""

import torch

from gpt2_scratch import format_input, get_tokenizer
from gpt2_scratch.train.data import (
    EpochBatchSampler,
    InstructionCollator,
    collate_instruction_batch,
    evaluation_sampler,
    records_dataset,
    tokenize_dataset,
)


def test_book_toy_example_exactly():
    # Chapter 7, section 7.3: the three toy items and the tensors the book prints.
    inputs, targets = collate_instruction_batch([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    assert inputs.dtype == targets.dtype == torch.long


def test_allowed_max_length_truncates_both():
    inputs, targets = collate_instruction_batch([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, 50256]]
    assert targets.tolist() == [[1, 2, 3], [6, 50256, -100]]


def test_collator_dict_interface_matches_function():
    features = [{"input_ids": [0, 1, 2, 3, 4], "prompt_length": 2}, {"input_ids": [5, 6], "prompt_length": 1}]
    batch = InstructionCollator()(features)
    inputs, targets = collate_instruction_batch([[0, 1, 2, 3, 4], [5, 6]])
    assert torch.equal(batch["input_ids"], inputs) and torch.equal(batch["labels"], targets)


def _tokenized(records, **kw):
    tokenizer = get_tokenizer()
    return tokenizer, tokenize_dataset(records_dataset(records), tokenizer, **kw)


RECORDS = [
    {"instruction": "Rewrite the sentence in passive voice.", "input": "The cat chased the mouse.",
     "output": "The mouse was chased by the cat."},
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
]


def test_prompt_masking_masks_exactly_the_prompt_tokens():
    tokenizer, ds = _tokenized(RECORDS)
    features = [ds[i] for i in range(len(ds))]
    plain = InstructionCollator()(features)
    masked = InstructionCollator(mask_prompt=True)(features)
    for row, (record, feature) in enumerate(zip(RECORDS, features)):
        prompt_ids = tokenizer.encode(format_input(record))
        n_prompt = len(prompt_ids)
        # The prompt tokens are a prefix of the example's tokens and prompt_length counts them.
        assert feature["input_ids"][:n_prompt] == prompt_ids
        assert feature["prompt_length"] == n_prompt
        # Target j is token j+1: the prompt's tokens 1..n-1 are targets 0..n-2, all masked; nothing else is.
        assert (masked["labels"][row, : n_prompt - 1] == -100).all()
        keep = slice(n_prompt - 1, None)
        assert torch.equal(masked["labels"][row, keep], plain["labels"][row, keep])
        assert masked["labels"][row, n_prompt - 1] == feature["input_ids"][n_prompt]  # first response token
        assert torch.equal(masked["input_ids"], plain["input_ids"])


def test_tokenize_truncate_and_drop_count(caplog):
    long = dict(RECORDS[0], output="word " * 200)
    records = [long, RECORDS[1]]
    with caplog.at_level("WARNING"):
        _, truncated = _tokenized(records, max_length=64, too_long="truncate")
    assert truncated[0]["length"] == 64 and len(truncated[0]["input_ids"]) == 64
    assert "truncated 1 of 2" in caplog.text
    with caplog.at_level("WARNING"):
        _, dropped = _tokenized(records, max_length=64, too_long="drop")
    assert len(dropped) == 1 and "dropped 1 of 2" in caplog.text


def test_batch_sampler_epochs_differ_and_are_reproducible():
    lengths = [(i * 37) % 101 for i in range(200)]
    sampler = EpochBatchSampler(lengths, 8, shuffle=True, seed=5)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch0 != epoch1
    assert len(epoch0) == len(sampler) == 25 and all(len(b) == 8 for b in epoch0)
    again = EpochBatchSampler(lengths, 8, shuffle=True, seed=5)
    again.set_epoch(1)
    assert list(again) == epoch1


def test_group_by_length_reduces_padding_and_keeps_randomness():
    lengths = [(i * 37) % 101 + 1 for i in range(400)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain = EpochBatchSampler(lengths, 8, shuffle=True, seed=5)
    grouped = EpochBatchSampler(lengths, 8, shuffle=True, seed=5, group_by_length=True, group_size=10)
    assert padding(list(grouped)) < padding(list(plain)) / 3
    e0 = list(grouped)
    grouped.set_epoch(1)
    e1 = list(grouped)
    assert e0 != e1
    assert sorted(i for b in e1 for i in b) == list(range(400))  # drop_last: 400 = 50 full batches


def test_eval_sampler_keeps_file_order_and_last_partial_batch():
    sampler = EpochBatchSampler([1] * 10, 4, shuffle=False, drop_last=False)
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and len(sampler) == 3


def test_grouped_eval_batches_hold_the_same_examples_with_less_padding():
    """train/sft.py's evaluation sampler with --group-by-length: the first eval_iter batches regroup
    exactly the examples the plain sampler puts there, so the evaluated set does not change."""
    lengths = [(i * 37) % 101 + 1 for i in range(55)]
    plain = list(evaluation_sampler(lengths, 8, eval_iter=5))
    grouped = list(evaluation_sampler(lengths, 8, eval_iter=5, group_by_length=True))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert sorted(i for b in grouped[:5] for i in b) == list(range(40))
    assert padding(grouped[:5]) < padding(plain[:5]) / 2
    assert grouped[5:] != plain[5:] and sorted(i for b in grouped[5:] for i in b) == list(range(40, 55))
