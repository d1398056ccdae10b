"""core/records.py: one schema and one loader for training, generation, the judge and DPO; the book's split."""

import functools
import http.server
import json
import threading
from pathlib import Path

import pytest

from gpt2_scratch.core.download import DownloadError
from gpt2_scratch.core.errors import InputError
from gpt2_scratch.core.records import (
    PREFERENCE_FIELDS,
    DataError,
    book_split,
    load_records,
    record_input,
    select_split,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BOOK_DATA = SHARED / "data" / "instruction-data.json"


def test_book_split_is_935_110_55_in_file_order():
    records = load_records(str(BOOK_DATA))
    splits = book_split(records)
    assert (len(splits.train), len(splits.test), len(splits.validation)) == (935, 110, 55)
    assert splits.test == records[935:1045] and splits["val"] == splits["validation"] == records[1045:]
    assert select_split(records, "test") == records[935:1045] and select_split(records, "all") == records


def test_shuffled_split_is_seeded_and_is_the_datasets_shuffle():
    import datasets

    records = [{"instruction": str(i), "output": str(i)} for i in range(1100)]
    shuffled = book_split(records, shuffle=True, seed=1)
    assert sorted(int(r["output"]) for part in (shuffled.train, shuffled.test, shuffled.validation)
                  for r in part) == list(range(1100))
    assert shuffled.train != records[:935] and book_split(records, shuffle=True, seed=1) == shuffled
    # The same order as datasets.Dataset.shuffle(seed), which earlier versions used.
    order = datasets.Dataset.from_list(records).shuffle(seed=1).flatten_indices()["output"]
    assert [r["output"] for r in shuffled.train] == order[:935]


def test_jsonl_wrapped_json_and_absent_input(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "Say hi.", "output": "Hi."}\n\n{"instruction": "Echo.", "input": "x", "output": "x"}\n')
    records = load_records(str(path))
    assert len(records) == 2 and "input" not in records[0] and record_input(records[0]) == "" and records[1]["input"] == "x"
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"instruction": f"i{i}", "output": "o"} for i in range(12)]}))
    assert len(load_records(str(wrapped))) == 12  # the count after unwrapping, everywhere
    lines = tmp_path / "lines.json"  # JSON lines under a .json name
    lines.write_text(path.read_text())
    assert load_records(str(lines)) == records


def test_a_byte_order_mark_is_read_past(tmp_path):
    """Windows Notepad saves UTF-8 with a BOM: the same records, in .json and .jsonl alike."""
    records = [{"instruction": "Say hi in French.", "output": "Salut, ça va ?"}, {"instruction": "Echo.", "output": "x"}]
    for name, text in (("d.json", json.dumps(records, ensure_ascii=False)),
                       ("d.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))):
        plain, bom = tmp_path / name, tmp_path / f"bom-{name}"
        plain.write_text(text, encoding="utf-8")
        bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
        assert load_records(str(bom)) == load_records(str(plain)) == records
    late = tmp_path / "late.json"  # a byte the error names still counts the BOM's three
    late.write_bytes(b"\xef\xbb\xbf[\xff]")
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 4\)"):
        load_records(str(late))
    utf16 = tmp_path / "utf16.json"  # Notepad's "Unicode": named as what it is
    utf16.write_text(json.dumps(records), encoding="utf-16")
    with pytest.raises(DataError, match=r"utf16.json: UTF-16 text, not UTF-8; save the file as UTF-8 JSON"):
        load_records(str(utf16))


def test_preference_records_need_chosen_and_rejected(tmp_path):
    shared = load_records(str(SHARED / "data" / "instruction-data-with-preference.json"), required=PREFERENCE_FIELDS)
    assert len(shared) == 1100 and all(r["chosen"] and r["rejected"] for r in shared)
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"instruction": "a", "chosen": "b", "rejected": "c"}, {"instruction": "a", "chosen": "b"}]))
    with pytest.raises(DataError, match=r"record 1 has no 'rejected' field"):
        load_records(str(path), required=PREFERENCE_FIELDS)


@pytest.mark.parametrize(
    "content, expected",
    [
        ('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]', "line 2 column 22"),
        ('[{"instruction": "a", "output": "b"}, {"input": "", "output": "d"}]', "record 1 has no 'instruction'"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": 7}]', "record 1 field 'output' must be a string, got int"),
        ('[{"instruction": "a", "input": ["x"], "output": "b"}]', "record 0 field 'input' must be a string or absent"),
        ('[]', "holds no records"),
        ('{"a": 1}', "expected a list of records"),
        ('[1, 2]', "record 0 is a int, not an object"),
        ("\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_bytes(content.encode("latin-1") if content.startswith("\xff") else content.encode())
    with pytest.raises(DataError) as info:
        load_records(str(path))
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_missing_file_folder_and_bad_jsonl(tmp_path):
    with pytest.raises(DataError, match="--data .*nope.json: no such file"):
        load_records(str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="is a folder"):
        load_records(str(tmp_path))
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match="malformed JSON on line 2 column 17"):
        load_records(str(path))


@pytest.fixture()
def http_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_url_downloads_once_into_the_cache(http_server, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_SCRATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPT2_SCRATCH_DOWNLOAD_BACKOFF", "0")
    base, root = http_server
    (root / "instruction-data.json").write_bytes(BOOK_DATA.read_bytes())
    records = load_records(f"{base}/instruction-data.json")
    assert len(records) == 1100 and records[2]["output"] == "45 kilometers is 45000 meters."
    assert (tmp_path / "cache" / "data" / "instruction-data.json").read_bytes() == BOOK_DATA.read_bytes()
    (root / "instruction-data.json").unlink()  # the server loses it: the cached copy is used
    assert load_records(f"{base}/instruction-data.json") == records
    with pytest.raises(DownloadError, match=r"missing\.json.*HTTP 404.*pass --data with a local copy"):
        load_records(f"{base}/missing.json")


def test_the_blog_recipe_sample_and_split_on_a_stand_in_for_alpaca():
    """`--sample 1000 --split 0.8,0.1,0.1` (seed 123) is the blog's Alpaca-1000 recipe: Python's
    random.seed(123); random.sample(data, 1000), cut 800/100/100 in the order train, test, validation.
    The 52,002-record Alpaca file is not reachable here; a stand-in of the same length is."""
    import random

    from gpt2_scratch.core.records import book_split, parse_split

    data = [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(52_002)]
    random.seed(123)
    blog = random.sample(data, 1000)
    random.seed(0)  # whatever the global generator's state, the recipe seeds it first
    splits = book_split(data, sample=1000, fractions=parse_split("0.8,0.1,0.1"), seed=123)
    assert (len(splits.train), len(splits.test), len(splits.validation)) == (800, 100, 100)
    assert splits.train == blog[:800] and splits.test == blog[800:900] and splits.validation == blog[900:]
    assert splits.train[0] == blog[0]
    # The book's default is unchanged: 85/10/5 in file order.
    book = book_split(data[:1100])
    assert (len(book.train), len(book.test), len(book.validation)) == (935, 110, 55) and book.train[0] == data[0]


@pytest.mark.parametrize("spec", ["0.8", "0.8,0.1,0.2", "a,b", "0,0.1", "0.9,0.2", "-0.1,0.5"])
def test_bad_splits_are_one_line_errors(spec):
    from gpt2_scratch.core.records import parse_split

    with pytest.raises(InputError, match="--split"):
        parse_split(spec)
