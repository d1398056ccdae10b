"""Conversations in (core/conversations.py) and as training examples (train/conversation_data.py, the collate).

Every format of the same conversation gives the same tokens and labels; labels are -100 exactly outside the
assistant turns; bad conversations are one error line before anything is written."""

import json
from pathlib import Path

import datasets
import pytest

from conftest import TINY_ARGS, assert_refused
from gpt2_scratch import get_tokenizer
from gpt2_scratch.core.conversations import load_conversations
from gpt2_scratch.core.prompts import conversation_segments, format_example
from gpt2_scratch.train.conversation_data import tokenize_conversations
from gpt2_scratch.train.data import IGNORE_INDEX, InstructionCollator

FIXTURE = Path(__file__).parent / "fixtures" / "conversations.jsonl"
TURNS = [("system", "Be brief."), ("user", "Name a planet."), ("assistant", " Mars.\n"),
         ("user", "Another?"), ("assistant", "Jupiter, the largest one.")]


def as_messages(turns):
    return [{"role": role, "content": text} for role, text in turns]


SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}
FORMATS = {
    "messages": {"messages": as_messages(TURNS)},
    "sharegpt": {"conversations": [{"from": SHAREGPT_FROM[r], "value": t} for r, t in TURNS]},
    "prompt-completion": {"prompt": as_messages(TURNS[:-1]), "completion": as_messages(TURNS[-1:])},
    "messages with parts and developer": {"messages": [
        {"role": "developer", "content": "Be brief."}, *as_messages(TURNS[1:3]),
        {"role": "user", "content": [{"type": "text", "text": "Anot"}, {"type": "text", "text": "her?"}]},
        *as_messages(TURNS[4:])]},
}


def write(path: Path, records: list) -> Path:
    """``records`` in the file kind ``path``'s suffix names (.jsonl, .json, .parquet, or a save_to_disk folder)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


def tokens_and_labels(records: list[dict]):
    tokenizer = get_tokenizer()
    ds = tokenize_conversations(records, tokenizer, max_length=128)
    batch = InstructionCollator(mask_prompt=True)([ds[i] for i in range(len(ds))])
    return batch["input_ids"].tolist(), batch["labels"].tolist()


# Arrow (Parquet, datasets folders) cannot hold a column whose content is a string in one row, a list in another.
@pytest.mark.parametrize("name, kind", [(name, kind) for name in FORMATS for kind in (".jsonl", ".json", ".parquet",
                                        "-saved") if "parts" not in name or kind.startswith(".json")])
def test_every_format_gives_the_same_tokens_and_labels(tmp_path, name, kind):
    reference = tokens_and_labels([{"messages": as_messages(TURNS)}])
    records = load_conversations(str(write(tmp_path / f"data{kind}", [FORMATS[name]] * 2)))
    assert records[0]["messages"] == as_messages(TURNS)
    assert tokens_and_labels(records[:1]) == reference


def test_one_exchange_reads_the_same_from_a_book_record_strings_and_mapped_columns(tmp_path):
    """A book record, TRL prompt/completion strings and --columns-mapped question/answer fields: one example."""
    book = {"instruction": "Name a planet.", "input": "", "output": "Mars."}
    pc = write(tmp_path / "pc.jsonl", [{"prompt": "Name a planet.", "completion": "Mars."}])
    qa = write(tmp_path / "qa.json", [{"question": "Name a planet.", "answer": "Mars.", "id": 7}])
    expected = tokens_and_labels([book])
    assert tokens_and_labels(load_conversations(str(pc))) == expected
    mapped = load_conversations(str(qa), columns="question=instruction,answer=output")
    assert mapped == [{"instruction": "Name a planet.", "output": "Mars.", "id": 7}]
    assert tokens_and_labels(mapped) == expected
    # In the book's styles a one-exchange conversation is the book record's text.
    assert format_example(load_conversations(str(pc))[0], "alpaca") == format_example(book, "alpaca")


def test_labels_are_ignored_exactly_outside_the_assistant_turns():
    """The supervised targets spell every assistant turn and its <|endoftext|>, in order, and nothing else."""
    tokenizer = get_tokenizer()
    records = load_conversations(str(FIXTURE))
    ids, labels = tokens_and_labels(records)
    for record, row_ids, row_labels in zip(records, ids, labels):
        supervised = [label for label in row_labels if label != IGNORE_INDEX]
        answers = [m["content"] + "<|endoftext|>" for m in record["messages"] if m["role"] == "assistant"]
        assert tokenizer.decode(supervised) == "".join(answers)
        # Each kept label is the next input token (the shift), the last one the collate's <|endoftext|>.
        for j, label in enumerate(row_labels[:-1]):
            assert label in (IGNORE_INDEX, row_ids[j + 1])


def test_a_long_conversation_is_cut_after_its_last_whole_answer_or_dropped(caplog):
    tokenizer = get_tokenizer()
    long_turns = [("user", "Hi " * 20), ("assistant", "Hello " * 20), ("user", "More " * 30),
                  ("assistant", "Sure " * 30)]
    record = {"messages": as_messages(long_turns)}
    first = tokenize_conversations([{"messages": as_messages(long_turns[:2])}], tokenizer)
    cut = tokenize_conversations([record], tokenizer, max_length=first[0]["length"] + 5)
    assert cut["input_ids"] == first["input_ids"] and cut["assistant_mask"] == first["assistant_mask"]
    assert "1 cut after their last whole assistant turn, 0 dropped" in caplog.text
    assert len(tokenize_conversations([record], tokenizer, max_length=10)) == 0
    assert "0 cut after their last whole assistant turn, 1 dropped" in caplog.text


BAD = {
    "no assistant turn": ([{"messages": [{"role": "user", "content": "Hi"}]}], "record 0: has no assistant turn"),
    "roles out of order": ([{"messages": as_messages([("user", "a"), ("user", "b"), ("assistant", "c")])}],
                           "record 0 message 1: a user turn where a assistant turn belongs"),
    "unknown role": ([{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}],
                     "record 0 message 1: unknown from 'bot'"),
    "empty content": ([{"messages": as_messages([("user", "a"), ("assistant", "  ")])}],
                      "record 0 message 1: content is empty"),
    "ends with a user turn": ([{"messages": as_messages([("user", "a"), ("assistant", "b"), ("user", "c")])}],
                              "record 0: ends with a user turn"),
    "mixed file": ([{"messages": as_messages(TURNS)}, {"instruction": "a", "output": "b"}],
                   "record 1 is a book record (fields instruction, output) but record 0 is a messages record"),
    "unrecognised": ([{"question": "a", "answer": "b"}], "record 0 has fields question, answer: none of"),
    "multi-turn in alpaca": ([{"messages": as_messages(TURNS)}], "record 0 is a conversation of several exchanges"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_conversations_are_one_error_line_and_nothing_written(tmp_path, capsys, case):
    records, needle = BAD[case]
    data = write(tmp_path / "data.jsonl", records)
    style = "alpaca" if case == "multi-turn in alpaca" else "chat"
    assert_refused(["sft", *TINY_ARGS, "--data", str(data), "--prompt-style", style, "--out", str(tmp_path / "run")],
                   tmp_path, capsys, code=2, needle=needle)
    assert not (tmp_path / "run").exists()


def test_bad_columns_and_format_options_are_one_line(tmp_path, capsys):
    data = write(tmp_path / "data.jsonl", [{"messages": as_messages(TURNS)}])
    base = ["sft", *TINY_ARGS, "--data", str(data), "--prompt-style", "chat", "--out", str(tmp_path / "run")]
    assert_refused([*base, "--columns", "question"], tmp_path, capsys, code=2, needle="--columns 'question'")
    assert_refused([*base, "--columns", "question=instruction"], tmp_path, capsys, code=2,
                   needle="record 0 has no 'question' field to map with --columns")
    assert_refused([*base, "--data-format", "sharegpt"], tmp_path, capsys, code=2,
                   needle="is a messages record (fields messages), but --data-format sharegpt was given")


def test_the_gguf_and_ollama_templates_render_the_chat_text():
    """The GGUF's Jinja template (the saved one) and the Modelfile's Go TEMPLATE, executed as Ollama does, give
    chat's prompt for a history ending with a user turn, and a prefill Ollama continues for one ending with an
    answer."""
    import jinja2
    from go_template import ollama_execute
    from transformers.utils.chat_template_utils import render_jinja_template

    from gpt2_scratch.convert.gguf import chat_template, ollama_template
    from gpt2_scratch.core.prompts import conversation_prompt

    # The GGUF's template (no {% generation %}), as plain Jinja2 renders it (llama-cpp-python's formatter).
    gguf = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(chat_template("chat",
                                                                                              generation_marks=False))
    messages = as_messages(TURNS)
    for history in (messages[:2], messages[:4], messages[1:4]):
        expected = "".join(conversation_prompt(history))
        assert ollama_execute(ollama_template("chat"), history) == expected
        rendered, _ = render_jinja_template(conversations=[history], chat_template=chat_template("chat"),
                                            add_generation_prompt=True, eos_token="<|endoftext|>")
        assert rendered[0] == expected
        assert gguf.render(messages=history, add_generation_prompt=True, eos_token="<|endoftext|>") == expected
    training_text = "".join(piece for piece, _ in conversation_segments(messages))
    assert ollama_execute(ollama_template("chat"), messages) == training_text.removesuffix("<|endoftext|>")


def test_dpo_reads_trl_preference_records_as_the_book_records(tmp_path):
    """TRL's prompt/chosen/rejected, strings or messages, give the book record's pair; a conversation prompt in the
    chat style is the conversation and the assistant header."""
    from gpt2_scratch.core.prompts import conversation_prompt
    from gpt2_scratch.train.preference_data import load_preference_records, tokenize_pairs

    tokenizer = get_tokenizer()
    book = write(tmp_path / "book.json", [{"instruction": "Name a planet.", "input": "Be brief.", "chosen": "Mars.",
                                           "rejected": "No."}])
    strings = write(tmp_path / "trl.jsonl", [{"prompt": [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "Name a planet."}],
                                              "chosen": [{"role": "assistant", "content": "Mars."}],
                                              "rejected": "No."}])
    for style in ("alpaca", "chat"):
        expected = tokenize_pairs(load_preference_records(str(book)), tokenizer, style=style)
        assert tokenize_pairs(load_preference_records(str(strings)), tokenizer, style=style)[:] == expected[:]
    history = as_messages(TURNS[:4])
    multi = write(tmp_path / "multi.parquet", [{"prompt": history, "chosen": "Jupiter.", "rejected": "Pluto."}])
    [pair] = tokenize_pairs(load_preference_records(str(multi)), tokenizer, style="chat")
    assert tokenizer.decode(pair["chosen_ids"]) == "".join(conversation_prompt(history)) + "Jupiter."
    assert tokenizer.decode(pair["chosen_ids"][pair["chosen_prompt_length"]:]) == "Jupiter."


def test_dpo_refuses_bad_preference_records_in_one_line(tmp_path, capsys):
    data = write(tmp_path / "trl.jsonl", [{"prompt": as_messages(TURNS[:3]), "chosen": "a", "rejected": "b"}])
    base = ["dpo", "--model", "gpt2-small", "--random-init", "--data", str(data), "--out", str(tmp_path / "run")]
    assert_refused(base, tmp_path, capsys, code=2, needle="record 0 'prompt': ends with an assistant turn")
    data = write(tmp_path / "trl.jsonl", [{"prompt": as_messages(TURNS[1:2]), "chosen": "a", "rejected": "b"},
                                          {"instruction": "x", "chosen": "a", "rejected": "b"}])
    assert_refused(base, tmp_path, capsys, code=2, needle="record 1 has fields instruction, chosen, rejected")


def test_a_bad_validation_file_is_named_and_nothing_written(tmp_path, capsys):
    data = write(tmp_path / "data.jsonl", [{"messages": as_messages(TURNS)}] * 4)
    val = write(tmp_path / "val.jsonl", [{"messages": as_messages(TURNS[1:2])}])
    base = ["sft", *TINY_ARGS, "--data", str(data), "--prompt-style", "chat", "--out", str(tmp_path / "run")]
    assert_refused([*base, "--val-data", str(val)], tmp_path, capsys, code=2,
                   needle=f"{val}: record 0: has no assistant turn")
    assert_refused([*base, "--test-data", str(tmp_path / "gone.jsonl")], tmp_path, capsys, code=2,
                   needle="--test-data " + str(tmp_path / "gone.jsonl") + ": no such file")
