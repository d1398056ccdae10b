"""Instruction data for training: the book's split and tokens, synthetic data, what cannot be trained on.

(Loading and validating records is core/records.py's: tests/test_records.py.)"""

import json
from pathlib import Path

import pytest

from gpt2_scratch.core.records import DataError, load_records
from gpt2_scratch import format_example, get_tokenizer
from gpt2_scratch.train.data import prepare_instruction_data
from gpt2_scratch.train.synthetic import DEFAULT_TASKS, TASKS, exact_match_report, make_synthetic_records, synthetic_records

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BOOK_DATA = SHARED / "data" / "instruction-data.json"


def test_book_data_split_and_tokens_match_tiktoken():
    tokenizer = get_tokenizer()
    data = prepare_instruction_data(load_records(str(BOOK_DATA)), tokenizer)
    assert (len(data.train), len(data.test), len(data.validation)) == (935, 110, 55)
    records = json.loads(BOOK_DATA.read_text())
    assert data.test_records == records[935:1045] and data.validation_records == records[1045:]
    # The book tokenizes format_input + "\n\n### Response:\n" + output with tiktoken's GPT-2 encoding.
    import gpt2_scratch

    enc = gpt2_scratch.get_encoding()
    for i in (0, 1, 500, 934):
        assert data.train[i]["input_ids"] == enc.encode(format_example(records[i]))


def test_synthetic_records_are_distinct_checkable_and_seeded():
    records = make_synthetic_records(500, seed=1)
    assert records == make_synthetic_records(500, seed=1) != make_synthetic_records(500, seed=2)
    assert len({(r["instruction"], r["input"]) for r in records}) == 500
    assert {r["task"] for r in records} == set(DEFAULT_TASKS)
    by_task = {r["task"]: r for r in records + make_synthetic_records(100, seed=1, tasks=TASKS)}
    assert by_task["reverse"]["output"].split(",") == by_task["reverse"]["input"].split(",")[::-1]
    assert by_task["upper"]["output"] == by_task["upper"]["input"].upper()
    a, b = map(int, by_task["add"]["instruction"].removeprefix("What is ").removesuffix("?").split(" plus "))
    assert by_task["add"]["output"] == str(a + b)
    report = exact_match_report(records[:3], [records[0]["output"], "wrong", f" {records[2]['output']} "])
    assert report["all"] == (2, 3)


def test_synthetic_source_goes_through_the_same_pipeline():
    data = prepare_instruction_data(synthetic_records("synthetic:200", seed=7), get_tokenizer(), seed=7)
    assert (len(data.train), len(data.test), len(data.validation)) == (170, 20, 10)
    assert all("task" in r for r in data.test_records)


def test_drop_everything_is_an_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "x " * 50, "output": "y"}] * 20))
    with pytest.raises(DataError, match="no training example is left"):
        prepare_instruction_data(load_records(str(path)), get_tokenizer(), max_length=16, too_long="drop")


@pytest.mark.parametrize("n", [2, 3, 5, 9])
def test_a_handful_of_records_still_splits_and_tokenizes(n):
    """2-9 records leave an empty test split (int(n * 0.1) = 0): tokenizing it must not fail."""
    records = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(n)]
    data = prepare_instruction_data(records, get_tokenizer())
    assert len(data.train) == int(n * 0.85) and len(data.test) == 0 and len(data.validation) >= 1
    assert data.test["length"] == [] and data.validation["length"][0] > 0


def test_records_without_input_keep_every_later_input():
    """datasets' from_list takes its columns from the first record: one without 'input' must not drop the
    inputs of the others."""
    records = [{"instruction": "Say hi.", "output": "Hi."}] + [
        {"instruction": "Echo.", "input": f"word{i}", "output": f"word{i}"} for i in range(19)]
    data = prepare_instruction_data(records, get_tokenizer())
    tokenizer = get_tokenizer()
    assert data.train[1]["input_ids"] == tokenizer.encode(format_example(records[1]))
    assert "### Input:\nword0" in tokenizer.decode(data.train[1]["input_ids"])


def test_a_huge_record_is_cut_before_tokenizing_with_the_same_first_tokens():
    """One 10.8 MB instruction among 40 used to take 3.0 GB and 27 s to be truncated to 256 tokens: the
    tokenizer now sees at most what can become max_length tokens, and the tokens kept are the same."""
    from gpt2_scratch.train.data import longest_token_bytes, records_dataset, tokenize_dataset

    tokenizer = get_tokenizer()
    seen = []

    class Spy:
        def get_vocab(self):
            return tokenizer.get_vocab()

        def __call__(self, texts, **kwargs):
            seen.extend(len(t) for t in texts)
            return tokenizer(texts, **kwargs)

    huge = {"instruction": "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 200_000,
            "input": "", "output": "A fox."}
    records = [{"instruction": "Say hi.", "input": "", "output": "Hi."}, huge]
    ds = tokenize_dataset(records_dataset(records), Spy(), max_length=64)
    assert max(seen) <= 65 * longest_token_bytes(tokenizer) < len(huge["instruction"]) // 100
    assert ds[1]["input_ids"] == tokenizer(format_example(huge))["input_ids"][:64]
    assert ds[0]["input_ids"] == tokenizer(format_example(records[0]))["input_ids"]
