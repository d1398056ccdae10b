"""Loading instruction data: the book's file, JSONL, a URL on a local server, synthetic data, bad input."""

import functools
import http.server
import json
import threading
from pathlib import Path

import pytest

from gpt2_scratch import format_example, get_tokenizer
from train.data import DataError, load_records, prepare_instruction_data
from train.synthetic import DEFAULT_TASKS, TASKS, exact_match_report, make_synthetic_records

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BOOK_DATA = SHARED / "data" / "instruction-data.json"


def test_book_data_split_and_tokens_match_tiktoken():
    tokenizer = get_tokenizer()
    data = prepare_instruction_data(str(BOOK_DATA), tokenizer)
    assert (len(data.train), len(data.test), len(data.validation)) == (935, 110, 55)
    records = json.loads(BOOK_DATA.read_text())
    assert data.test_records == records[935:1045] and data.validation_records == records[1045:]
    # The book tokenizes format_input + "\n\n### Response:\n" + output with tiktoken's GPT-2 encoding.
    import gpt2_scratch

    enc = gpt2_scratch.get_encoding()
    for i in (0, 1, 500, 934):
        assert data.train[i]["input_ids"] == enc.encode(format_example(records[i]))


def test_jsonl_and_absent_input(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "Say hi.", "output": "Hi."}\n\n{"instruction": "Echo.", "input": "x", "output": "x"}\n')
    ds = load_records(str(path))
    assert len(ds) == 2 and ds[0]["input"] is None and ds[1]["input"] == "x"


@pytest.mark.parametrize(
    "content, expected",
    [
        ('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]', "line 2 column 22"),
        ('[{"instruction": "a", "output": "b"}, {"input": "", "output": "d"}]', "record 1 has no 'instruction'"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": 7}]', "record 1 field 'output' must be a string, got int"),
        ('[{"instruction": "a", "input": ["x"], "output": "b"}]', "record 0 field 'input' must be a string or absent"),
        ('[]', "holds no records"),
        ('{"a": 1}', "expected a list of records"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_records(str(path))
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_missing_file_and_bad_jsonl(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.json"):
        load_records(str(tmp_path / "nope.json"))
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match="malformed JSON on line 2 column 17"):
        load_records(str(path))


@pytest.fixture()
def http_server(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()
    server.server_close()


def test_url_download_from_local_server(http_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    base, root = http_server
    (root / "instruction-data.json").write_bytes(BOOK_DATA.read_bytes())
    ds = load_records(f"{base}/instruction-data.json")
    assert len(ds) == 1100 and ds[2]["output"] == "45 kilometers is 45000 meters."
    with pytest.raises(DataError, match=r"cannot download http://127\.0\.0\.1:\d+/missing\.json .*--data"):
        load_records(f"{base}/missing.json")


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


def test_synthetic_source_goes_through_the_same_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_SCRATCH_CACHE", str(tmp_path))
    data = prepare_instruction_data("synthetic:200", get_tokenizer(), seed=7)
    assert (len(data.train), len(data.test), len(data.validation)) == (170, 20, 10)
    assert all("task" in r for r in data.test_records)


def test_drop_everything_is_an_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "x " * 50, "output": "y"}] * 20))
    with pytest.raises(DataError, match="no training examples left"):
        prepare_instruction_data(str(path), get_tokenizer(), max_length=16, too_long="drop")
