"""The chapter-6 data pipeline on the real SMS Spam Collection, and its errors on bad files."""

import csv
import http.server
import io
import socket
import threading
import zipfile

import pandas as pd
import pytest
import torch

from conftest import REPO_ROOT, run_cli

from gpt2_scratch.core.download import DownloadError
from gpt2_scratch.train.spam_data import (
    PAD_TOKEN_ID,
    SpamDataError,
    SpamDataset,
    balance_by_undersampling,
    fetch_spam_data,
    prepare_splits,
    random_split,
    read_labeled_tsv,
)


@pytest.fixture(scope="module")
def sms_path(shared_dir):
    return shared_dir / "data" / "SMSSpamCollection.tsv"


def test_reads_every_line_like_pandas_with_quoting_off(sms_path):
    df = read_labeled_tsv(sms_path)
    reference = pd.read_csv(sms_path, sep="\t", header=None, names=["Label", "Text"], quoting=csv.QUOTE_NONE)
    pd.testing.assert_frame_equal(df, reference)
    assert len(df) == 5574
    assert df["Label"].value_counts().to_dict() == {"ham": 4827, "spam": 747}


def test_balance_and_split_are_the_books(sms_path):
    df = read_labeled_tsv(sms_path)
    balanced = balance_by_undersampling(df, seed=123, labels=("ham", "spam"))
    assert balanced["Label"].value_counts().to_dict() == {"ham": 747, "spam": 747}

    # The book's create_balanced_dataset / random_split, spelled out with pandas: same rows, same order.
    ham_subset = df[df["Label"] == "ham"].sample(747, random_state=123)
    book = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    pd.testing.assert_frame_equal(balanced, book)
    shuffled = book.sample(frac=1, random_state=123).reset_index(drop=True)

    train, val, test = random_split(balanced, 0.7, 0.1, seed=123)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    pd.testing.assert_frame_equal(pd.concat([train, val, test]), shuffled)

    splits = prepare_splits(sms_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1045, 149, 300)
    pd.testing.assert_frame_equal(splits.train, train)
    assert splits.label2id == {"ham": 0, "spam": 1}


def test_padding_to_the_longest_training_message(sms_path):
    from gpt2_scratch import get_encoding

    encode = get_encoding().encode_ordinary
    splits = prepare_splits(sms_path)
    train = SpamDataset(splits.train, encode, splits.label2id)
    lengths = [len(encode(t)) for t in splits.train["Text"]]
    assert train.max_length == max(lengths) == 120  # the chapter's figure for this split
    assert train.input_ids.shape == (1045, 120)
    assert train.attention_mask.sum(1).tolist() == lengths
    # Padding is <|endoftext|>, on the right, exactly where the mask is 0.
    assert bool((train.input_ids[train.attention_mask == 0] == PAD_TOKEN_ID).all())
    first = train[0]
    assert first["input_ids"][: lengths[0]].tolist() == encode(splits.train["Text"].iloc[0])
    assert first["labels"].item() == splits.label2id[splits.train["Label"].iloc[0]]

    # Validation/test: padded or truncated to the training length.
    test = SpamDataset(splits.test, encode, splits.label2id, max_length=train.max_length)
    assert test.input_ids.shape == (300, 120)
    short = SpamDataset(splits.test, encode, splits.label2id, max_length=16)
    longest = max(range(300), key=lambda i: len(encode(splits.test["Text"].iloc[i])))
    assert short[longest]["input_ids"].tolist() == encode(splits.test["Text"].iloc[longest])[:16]
    assert short[longest]["attention_mask"].tolist() == [1] * 16
    batch = torch.utils.data.default_collate([train[i] for i in range(8)])
    assert batch["input_ids"].shape == (8, 120) and batch["labels"].shape == (8,)


@pytest.mark.parametrize(
    "content, line_no, words",
    [
        ("ham\thello\nspam no tab here\n", 2, "no tab"),
        ("ham\thello\r\nham\tbye\r\nphishing\tclick\r\n", 3, "unknown label 'phishing'"),
        ("", 1, "empty file"),
        ("\n\n", 1, "empty file"),
        ("ham\thi\nspam\t   \n", 2, "empty text"),
        (b"ham\thi\nham\t\xff\xfe\n", 2, "not UTF-8"),
    ],
)
def test_bad_lines_are_one_line_errors_with_the_line_number(tmp_path, content, line_no, words):
    path = tmp_path / "bad.tsv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SpamDataError) as err:
        read_labeled_tsv(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line_no}: ") and words in message


def test_the_training_script_reports_bad_data_in_one_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("ham\tok\nspam\tfine\nthis line has no tab\n")
    out = tmp_path / "out"
    result = run_cli(str(REPO_ROOT / "train" / "classify.py"), "--data", str(bad), "--output-dir", str(out),
                     "--model", "gpt2-small", "--random-init")  # --output-dir: the older spelling of --out
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad}:3: no tab in line 'this line has no tab'; expected 'label<TAB>text'"
    assert not out.exists()  # data is checked before anything is created or loaded


class _ZipHandler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


def test_download_of_the_uci_zip_and_offline_error(tmp_path, sms_path, monkeypatch):
    monkeypatch.setenv("GPT2_SCRATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPT2_SCRATCH_DOWNLOAD_BACKOFF", "0")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # the UCI zip's layout: SMSSpamCollection + readme
        zf.writestr("readme", "SMS Spam Collection v.1")
        zf.write(sms_path, "SMSSpamCollection")
    _ZipHandler.payload = buf.getvalue()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ZipHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/static/public/228/sms+spam+collection.zip"
        got = fetch_spam_data(url)
        assert got.read_bytes() == sms_path.read_bytes()
        assert sorted(p.name for p in (tmp_path / "cache" / "sms_spam").iterdir()) == [
            "SMSSpamCollection.tsv", "sms+spam+collection.zip"]
    finally:
        server.shutdown()
        server.server_close()
    # Cached: no network needed the second time.
    assert fetch_spam_data(url) == got

    monkeypatch.setenv("GPT2_SCRATCH_CACHE", str(tmp_path / "cache2"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/sms.zip"
    with pytest.raises(DownloadError) as err:
        fetch_spam_data(dead)
    assert str(err.value).startswith(f"cannot reach {dead}") and "--data PATH" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache2" / "sms_spam" / "SMSSpamCollection.tsv").exists()

    # Primary down → the mirror; an HTML page instead of data is refused and nothing is kept.
    monkeypatch.setenv("GPT2_SCRATCH_CACHE", str(tmp_path / "cache3"))
    _ZipHandler.payload = b"<html><body>Service unavailable</body></html>"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ZipHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        html = f"http://127.0.0.1:{server.server_address[1]}/maintenance.html"
        with pytest.raises(SpamDataError) as err:
            fetch_spam_data(dead, mirrors=[html])
        assert f"{dead}: not label<TAB>text data" in str(err.value)
        assert list((tmp_path / "cache3" / "sms_spam").iterdir()) == []
        _ZipHandler.payload = buf.getvalue()
        assert fetch_spam_data(dead, mirrors=[html]).read_bytes() == sms_path.read_bytes()
    finally:
        server.shutdown()
        server.server_close()
