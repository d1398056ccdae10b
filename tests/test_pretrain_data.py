"""Pretraining's data layer (train/text_data.py, train/token_cache.py) against straightforward references:
tiktoken's encode of the whole text, the book's window loop, the book's character split."""

import json

import numpy as np
import pytest

from conftest import SHARED_DIR, assert_refused, isolate_user_settings

VERDICT = SHARED_DIR / "data" / "the-verdict.txt"
EOT = 50256


@pytest.fixture
def enc():
    from gpt2_scratch import get_encoding

    encoding = get_encoding()
    return lambda text: encoding.encode(text, allowed_special={"<|endoftext|>"})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    isolate_user_settings(monkeypatch, tmp_path)
    return tmp_path / "cache"


def corpus(spec, **kw):
    from gpt2_scratch.train.token_cache import tokenized_corpus

    return tokenized_corpus(str(spec), progress=False, **kw)


def ids(token_file) -> list[int]:
    return np.fromfile(token_file.path, dtype="<u2").tolist() if token_file is not None else []


def test_windows_and_stride_equal_the_books_loop(cache, enc):
    from gpt2_scratch.train.token_cache import TokenWindows

    text = VERDICT.read_text(encoding="utf-8")[:3000]
    tokens = enc(text)
    path = cache / "t.bin"
    cache.mkdir(parents=True)
    np.asarray(tokens, dtype="<u2").tofile(path)
    for length, stride in ((8, 8), (8, 3), (8, 11), (16, 1), (len(tokens) - 1, 5)):
        windows = TokenWindows(path, len(tokens), length, stride)
        starts = range(0, len(tokens) - length, stride)  # GPTDatasetV1's loop
        assert len(windows) == len(starts)
        for i, s in enumerate(starts):
            x, y = windows[i]
            assert x.tolist() == tokens[s:s + length] and y.tolist() == tokens[s + 1:s + length + 1]
    assert len(TokenWindows(path, len(tokens), len(tokens), 1)) == 0  # no room for the last target


def test_one_text_is_the_books_split_and_tokens_whatever_the_piece_size(cache, enc):
    text = VERDICT.read_text(encoding="utf-8")
    split = int(0.90 * len(text))
    for piece_chars in (64, 300, 1 << 20):  # many safe cuts, a few, none
        got = corpus(VERDICT, piece_chars=piece_chars, cache_dir=str(cache / str(piece_chars)))
        assert ids(got.train) == enc(text[:split]) and ids(got.val) == enc(text[split:])
    assert (got.train.tokens, got.val.tokens) == (4612, 534)  # FACTS.md: the book's counts


def test_documents_are_separated_by_endoftext_and_the_split_cuts_by_characters(cache, enc, tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    texts = ["First document.\nIt has two lines.", "Second one, short.", "Third: the one the split cuts in two."]
    for name, text in zip(("a.txt", "b.md", "sub/c.txt"), texts):
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "notes.json").write_text("{}")  # not a text file: left out of a folder
    whole = corpus(folder, val_fraction=0.0)
    assert whole.val is None and whole.train.documents == 3
    assert ids(whole.train) == enc(texts[0]) + [EOT] + enc(texts[1]) + [EOT] + enc(texts[2])

    split = corpus(folder, val_fraction=0.1)
    at = int(0.9 * sum(map(len, texts))) - len(texts[0]) - len(texts[1])  # inside the third document
    assert 0 < at < len(texts[2])
    assert ids(split.train) == enc(texts[0]) + [EOT] + enc(texts[1]) + [EOT] + enc(texts[2][:at])
    assert ids(split.val) == enc(texts[2][at:])


def test_a_glob_and_a_folder_read_the_same_files_in_the_same_order(cache, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(5):
        (folder / f"part-{i}.txt").write_text(f"Document number {i}. " * 20, encoding="utf-8")
    by_folder, by_glob = corpus(folder, val_fraction=0.0), corpus(folder / "part-*.txt", val_fraction=0.0)
    assert ids(by_folder.train) == ids(by_glob.train) and by_folder.train.documents == 5
    assert by_glob.reused  # the same files, the same key


def test_records_with_a_text_column(cache, enc, tmp_path):
    records = [{"id": 1, "body": "A record's text."}, {"id": 2, "body": ""}, {"id": 3, "body": "Another one."}]
    expected = enc(records[0]["body"]) + [EOT] + enc(records[2]["body"])  # the empty record is no document
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    assert ids(corpus(jsonl, text_column="body", val_fraction=0.0).train) == expected

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [r["body"] for r in records]}), tmp_path / "r.parquet")
    assert ids(corpus(tmp_path / "r.parquet", text_column="body", val_fraction=0.0).train) == expected

    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    assert ids(corpus(tmp_path / "saved", text_column="body", val_fraction=0.0).train) == expected


def test_the_token_cache_is_reused_and_invalidated(cache, tmp_path):
    text = tmp_path / "story.txt"
    text.write_text(VERDICT.read_text(encoding="utf-8"), encoding="utf-8")
    first = corpus(text)
    again = corpus(text)
    assert not first.reused and again.reused and again.fingerprint == first.fingerprint
    assert first.train.path.parent.parent == cache / "tokens"  # $GPT2_SCRATCH_CACHE/tokens/<key>/
    meta = json.loads((first.train.path.parent / "meta.json").read_text())
    assert meta["parts"]["train"]["tokens"] == 4612 and meta["sources"][0]["where"] == str(text)

    with open(text, "a", encoding="utf-8") as f:
        f.write(" One more sentence.")
    changed = corpus(text)
    assert not changed.reused and changed.fingerprint != first.fingerprint
    assert changed.val.tokens > first.val.tokens
    assert corpus(text, val_fraction=0.2).fingerprint != changed.fingerprint  # the split is part of the key


def test_crlf_text_is_read_and_counted_as_the_book_reads_it(cache, enc, tmp_path):
    path = tmp_path / "dos.txt"
    path.write_bytes(b"Line one.\r\nLine two.\r\n\r\nLine three.\rEnd.")
    text = open(path, encoding="utf-8").read()  # the book's read: universal newlines
    got = corpus(path, val_fraction=0.25)
    split = int(0.75 * len(text))
    assert ids(got.train) == enc(text[:split]) and ids(got.val) == enc(text[split:])


@pytest.mark.parametrize("make, argv, needle", [
    (lambda d: (d / "empty.txt").write_text(""), ["--data", "{d}/empty.txt"], "no text (empty)"),
    (lambda d: (d / "blob.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00"), ["--data", "{d}/blob.txt"],
     "a binary file"),
    (lambda d: (d / "latin1.txt").write_bytes("café au lait".encode("latin-1")), ["--data", "{d}/latin1.txt"],
     "not UTF-8 text"),
    (lambda d: (d / "short.txt").write_text("Far too short for one window."), ["--data", "{d}/short.txt"],
     "too short for one window"),
    (lambda d: (d / "nothing").mkdir() or (d / "nothing" / "x.csv").write_text("a,b"), ["--data", "{d}/nothing"],
     "holds no text file"),
    (lambda d: None, ["--data", "{d}/none-*.txt"], "matches no file"),
    (lambda d: (d / "r.jsonl").write_text('{"body": "some text"}\n'), ["--data", "{d}/r.jsonl"],
     "no 'text' column"),
    (lambda d: None, ["--data", "nobody/no-such-corpus"], "cannot load the data set"),
    (lambda d: (d / "ok.txt").write_text(VERDICT.read_text()) and (d / "v.txt").write_text("Too short."),
     ["--data", "{d}/ok.txt", "--val-data", "{d}/v.txt"], "--val-data"),
])
def test_bad_corpora_are_one_error_line_and_nothing_written(make, argv, needle, tmp_path, monkeypatch, capsys):
    isolate_user_settings(monkeypatch, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    make(work)
    argv = [a.format(d=work) for a in argv]
    assert_refused(["pretrain", *argv, "--random-init", "--n-layers", "1", "--emb-dim", "32", "--n-heads", "2",
                    "--context-length", "64", "--out", str(work / "out")], work, capsys, code=2, needle=needle)


def test_val_data_is_a_corpus_of_its_own(tmp_path, monkeypatch, capsys):
    """--val-data: all of --data trains, the other corpus validates (each its own cache entry)."""
    from gpt2_scratch.core.cli import main

    isolate_user_settings(monkeypatch, tmp_path)
    text = VERDICT.read_text(encoding="utf-8")
    train, held_out = tmp_path / "train.txt", tmp_path / "held-out.txt"
    train.write_text(text[:15000], encoding="utf-8")
    held_out.write_text(text[15000:], encoding="utf-8")
    out = tmp_path / "run"
    code = main(["pretrain", "--data", str(train), "--val-data", str(held_out), "--random-init", "--n-layers", "1",
                 "--emb-dim", "32", "--n-heads", "2", "--context-length", "64", "--batch-size", "4", "--max-steps",
                 "2", "--sample-tokens", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "pretraining.json").read_text())
    assert info["train"]["fingerprint"] != info["validation"]["fingerprint"]
    assert info["validation"]["tokens"] == len(enc_of(text[15000:]))
    assert info["train"]["tokens"] == len(enc_of(text[:15000]))


def enc_of(text: str) -> list[int]:
    from gpt2_scratch import get_encoding

    return get_encoding().encode(text, allowed_special={"<|endoftext|>"})


def test_a_corpus_too_short_for_one_window_is_refused_before_it_is_tokenized(tmp_path, monkeypatch, capsys):
    """The refusal comes before the tokenizing pass and the model's first write: the cache holds nothing
    for it (no entry, no temporary, no lock file), and a shorter window then tokenizes it as usual."""
    from gpt2_scratch.train import token_cache

    isolate_user_settings(monkeypatch, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    short = work / "short.txt"
    short.write_text("Far too short for one window.", encoding="utf-8")  # 7 tokens

    def never(*args, **kwargs):
        raise AssertionError("tokenized into the cache")

    monkeypatch.setattr(token_cache, "_tokenize_into", never)
    argv = ["pretrain", "--data", str(short), "--random-init", "--n-layers", "1", "--emb-dim", "32", "--n-heads",
            "2", "--context-length", "64", "--out", str(work / "out")]
    train_part = len(enc_of("Far too short for one window."[:int(0.9 * 29)]))
    assert_refused(argv, work, capsys, code=2, needle=f"--data {short}: the training part is {train_part} tokens, "
                   "too short for one window of 64 tokens plus its next-token target; give more text or a shorter "
                   "--context-length")
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.rglob("*")), sorted(cache.rglob("*"))
    monkeypatch.undo()
    assert corpus(short, val_fraction=0.0, cache_dir=str(cache),
                  check=token_cache.WindowCheck(6, never)).train.tokens == 7  # 7 tokens make one window of 6


def test_a_cached_corpus_is_checked_from_its_counts(cache, tmp_path):
    from gpt2_scratch.core.errors import InputError
    from gpt2_scratch.train.token_cache import WindowCheck

    first = corpus(VERDICT)  # 4612 / 534 tokens
    entry = first.train.path.parent
    before = {p.name: p.read_bytes() for p in entry.iterdir()}
    refused = []

    def refuse(part, tokens):
        refused.append((part, tokens))
        return InputError(f"{part} is short")

    with pytest.raises(InputError, match="val is short"):
        corpus(VERDICT, check=WindowCheck(534, refuse))
    assert refused == [("val", 534)]
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == before  # the entry is left as it was
    assert corpus(VERDICT, check=WindowCheck(533, refuse)).reused and refused == [("val", 534)]


def test_the_early_count_is_the_written_count_and_skips_long_parts(cache, tmp_path):
    """What is counted before writing equals the entry's counts (separators, the split inside a document), and a
    part too long to be short is not counted at all."""
    from gpt2_scratch.train.text_data import resolve_sources
    from gpt2_scratch.train.token_cache import _count_small_parts, longest_token_bytes

    folder = tmp_path / "docs"
    folder.mkdir()
    texts = ["First document.\nIt has two lines.", "Second one, short.", "Third: the one the split cuts. " * 40]
    for i, text in enumerate(texts):
        (folder / f"{i}.txt").write_text(text, encoding="utf-8")
    chars = sum(map(len, texts))
    split_at = int(0.9 * chars)
    written = corpus(folder, val_fraction=0.1)
    sources = resolve_sources(str(folder))
    assert _count_small_parts(sources, "text", split_at, chars, 10_000, 16, "--data") == \
        {"train": written.train.tokens, "val": written.val.tokens}
    assert longest_token_bytes() == 128
    window = split_at // 128 - 1  # the training part has at least (window + 1) * 128 characters: not counted
    assert _count_small_parts(sources, "text", split_at, chars, window, 16, "--data") == {"val": written.val.tokens}


def test_callers_that_meet_a_missing_entry_at_once_tokenize_it_once(cache, tmp_path):
    """The lock beside the entry, in one process (threads open their own lock files, as processes do): while
    another holds it both wait, then one tokenizes and the other reads its entry. The processes' own tests:
    tests/test_pretrain.py (two commands, one `accelerate launch`)."""
    import threading

    from gpt2_scratch.core.locks import FileLock

    key = corpus(VERDICT, cache_dir=str(tmp_path / "elsewhere")).fingerprint
    entry = cache / "tokens" / key
    waiting = [threading.Event(), threading.Event()]
    results = [None, None]

    def run(i):
        results[i] = corpus(VERDICT, on_wait=lambda line: waiting[i].set())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    with FileLock.beside(entry, what="the test"):
        for thread in threads:
            thread.start()
        assert all(event.wait(60) for event in waiting)  # both met the missing entry
    for thread in threads:
        thread.join(60)
    assert sorted(r.reused for r in results) == [False, True]
    assert ids(results[0].train) == ids(results[1].train) and results[0].train.tokens == 4612
    assert sorted(p.name for p in entry.parent.iterdir()) == [key]  # no temporary or lock file left beside it
