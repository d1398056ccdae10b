"""Downloads against a real HTTP server on 127.0.0.1 started by the test (real sockets, real bytes).

The server can cut a transfer in the middle, ignore Range, answer 404/503, or state a wrong
Content-MD5, so every path of core/download.py runs for real. The end-to-end tests serve
the shared tiny checkpoint as if it were OpenAI's 124M release.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import convert_main
from gpt2_scratch.convert.openai import download_openai, openai_urls
from gpt2_scratch.core.download import download_file
from gpt2_scratch.core.retry import RetryPolicy
from gpt2_scratch.convert.errors import ConvertError
from gpt2_scratch.core.download import DownloadError

HERE = Path(__file__).resolve().parent
SHARED_TINY = HERE.parent.parent / "shared" / "fixtures" / "openai-gpt2-tiny"
FAST = RetryPolicy(attempts=3, backoff=0.0, timeout=10)


class FileServer(ThreadingHTTPServer):
    """Serves `files` ({url path: bytes}); per-path misbehaviour is set in the dicts below."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.cut_after: dict[str, list[int]] = {}  # path -> byte counts: cut the next GETs there
        self.statuses: dict[str, list[int]] = {}  # path -> statuses to answer before serving
        self.ignore_range: set[str] = set()
        self.md5: dict[str, str] = {}  # path -> Content-MD5 to state (base64)
        self.log: list[tuple[str, str, str | None, int]] = []  # (method, path, Range, status)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self, path: str) -> list[tuple[str | None, int]]:
        return [(rng, status) for method, p, rng, status in self.log if p == path and method == "GET"]

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        s, path, rng = self.server, self.path, self.headers.get("Range")
        if s.statuses.get(path):
            status = s.statuses[path].pop(0)
            s.log.append(("GET", path, rng, status))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path not in s.files:
            s.log.append(("GET", path, rng, 404))
            self.send_error(404)
            return
        data = s.files[path]
        start = 0
        if rng and path not in s.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
        status = 206 if start else 200
        s.log.append(("GET", path, rng, status))
        self.send_response(status)
        self.send_header("Content-Length", str(len(data) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if path in s.md5:
            self.send_header("Content-MD5", s.md5[path])
        self.end_headers()
        body = data[start:]
        if s.cut_after.get(path):
            n = s.cut_after[path].pop(0)
            self.wfile.write(body[:n])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the network drops mid-transfer
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    with FileServer() as s:
        yield s


def payload(n: int = 3_000_000) -> bytes:
    return os.urandom(n)


def dead_url() -> str:
    """A URL where nothing listens (port taken then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- one file -------------------------------------------------------------------------------
def test_complete_download_then_skipped(server, tmp_path):
    data = payload()
    server.files["/f.bin"] = data
    dest = download_file([server.url + "/f.bin"], tmp_path / "f.bin", policy=FAST, progress=False)
    assert dest.read_bytes() == data
    assert not (tmp_path / "f.bin.part").exists()
    assert server.gets("/f.bin") == [(None, 200)]
    download_file([server.url + "/f.bin"], tmp_path / "f.bin", policy=FAST, progress=False)
    assert len(server.gets("/f.bin")) == 1  # complete files are not fetched again


def test_cut_mid_transfer_is_resumed_with_range(server, tmp_path):
    data = payload()
    server.files["/f.bin"] = data
    server.cut_after["/f.bin"] = [2_500_000]
    dest = download_file([server.url + "/f.bin"], tmp_path / "f.bin", policy=FAST, progress=False)
    assert dest.read_bytes() == data
    (first_range, first_status), (resume_range, resume_status) = server.gets("/f.bin")
    assert first_range is None and first_status == 200
    start = int(resume_range.removeprefix("bytes=").rstrip("-"))
    assert 1 << 20 <= start <= 2_500_000 and resume_status == 206


def test_cut_download_resumes_in_a_later_run(server, tmp_path):
    data = payload()
    server.files["/f.bin"] = data
    server.cut_after["/f.bin"] = [2_000_000]
    with pytest.raises(DownloadError) as e:
        download_file([server.url + "/f.bin"], tmp_path / "f.bin", policy=RetryPolicy(attempts=1, backoff=0),
                      progress=False)
    assert "\n" not in str(e.value) and "kept for resuming" in str(e.value)
    part = tmp_path / "f.bin.part"
    assert not (tmp_path / "f.bin").exists() and 0 < part.stat().st_size < len(data)
    have = part.stat().st_size
    download_file([server.url + "/f.bin"], tmp_path / "f.bin", policy=FAST, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert server.gets("/f.bin")[-1] == (f"bytes={have}-", 206)


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    data = payload()
    server.files["/f.bin"] = data
    server.ignore_range.add("/f.bin")
    (tmp_path / "f.bin.part").write_bytes(b"\xff" * 700_000)  # a stale partial file
    dest = download_file([server.url + "/f.bin"], tmp_path / "f.bin", policy=FAST, progress=False)
    assert dest.read_bytes() == data  # not appended to the stale bytes
    assert server.gets("/f.bin") == [("bytes=700000-", 200)]


def test_wrong_checksum_leaves_nothing_that_looks_complete(server, tmp_path):
    data = payload(100_000)
    server.files["/f.bin"] = data
    with pytest.raises(DownloadError) as e:
        download_file([server.url + "/f.bin"], tmp_path / "f.bin", sha256="0" * 64, policy=FAST, progress=False)
    assert "\n" not in str(e.value) and "sha256" in str(e.value) and server.url + "/f.bin" in str(e.value)
    assert list(tmp_path.iterdir()) == []

    # The server's own Content-MD5, when it states one, is checked the same way.
    server.md5["/f.bin"] = base64.b64encode(hashlib.md5(b"something else").digest()).decode()
    with pytest.raises(DownloadError, match="md5"):
        download_file([server.url + "/f.bin"], tmp_path / "f.bin", policy=FAST, progress=False)
    assert list(tmp_path.iterdir()) == []
    server.md5["/f.bin"] = base64.b64encode(hashlib.md5(data).digest()).decode()
    assert download_file([server.url + "/f.bin"], tmp_path / "f.bin", policy=FAST, progress=False).read_bytes() == data


def test_known_sha256_of_a_complete_file_is_rechecked(server, tmp_path):
    data = payload(1000)
    server.files["/f.bin"] = data
    (tmp_path / "f.bin").write_bytes(b"corrupt")
    download_file([server.url + "/f.bin"], tmp_path / "f.bin", sha256=hashlib.sha256(data).hexdigest(),
                  policy=FAST, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data


def test_primary_404_falls_back_to_mirror(tmp_path):
    data = payload(200_000)
    with FileServer() as primary, FileServer() as mirror:
        mirror.files["/124M/model.ckpt.index"] = data
        urls = openai_urls("124M", "model.ckpt.index", base_url=primary.url, mirrors=[mirror.url])
        download_file(urls, tmp_path / "model.ckpt.index", policy=FAST, progress=False)
        assert (tmp_path / "model.ckpt.index").read_bytes() == data
        assert primary.gets("/124M/model.ckpt.index") == [(None, 404)]  # a 404 is not retried
        assert mirror.gets("/124M/model.ckpt.index") == [(None, 200)]


def test_server_errors_are_retried(server, tmp_path):
    data = payload(1000)
    server.files["/f.bin"] = data
    server.statuses["/f.bin"] = [503, 500]
    download_file([server.url + "/f.bin"], tmp_path / "f.bin", policy=FAST, progress=False)
    assert [status for _, status in server.gets("/f.bin")] == [503, 500, 200]


def test_nothing_listening_gives_the_one_line_offline_message(tmp_path):
    url = dead_url()
    urls = openai_urls("124M", "hparams.json", base_url=url, mirrors=[dead_url()])
    with pytest.raises(DownloadError) as e:
        download_file(urls, tmp_path / "hparams.json", policy=FAST, progress=False, offline_hint="pass --from-dir DIR")
    msg = str(e.value)
    assert "\n" not in msg and e.value.offline
    assert msg.startswith(f"cannot reach {url}/124M/hparams.json (Connection refused)")
    assert msg.endswith("offline? pass --from-dir DIR")
    assert list(tmp_path.iterdir()) == []


# --- the release, end to end ----------------------------------------------------------------
def serve_release(server: FileServer, size: str = "124M") -> None:
    """The shared tiny checkpoint laid out like OpenAI's release folder for `size`."""
    from gpt2_scratch.tokenizer import vocab_files

    encoder_json, vocab_bpe = vocab_files()
    files = {"checkpoint": (SHARED_TINY / "checkpoint").read_bytes(),
             "encoder.json": encoder_json.read_bytes(), "vocab.bpe": vocab_bpe.read_bytes(),
             "hparams.json": (SHARED_TINY / "hparams.json").read_bytes(),
             "model.ckpt.index": (SHARED_TINY / "model.ckpt.index").read_bytes(),
             "model.ckpt.data-00000-of-00001": (SHARED_TINY / "model.ckpt.data-00000-of-00001").read_bytes(),
             "model.ckpt.meta": b"graph def not needed"}
    for name, data in files.items():
        server.files[f"/gpt-2/models/{size}/{name}"] = data


def test_cli_openai_size_downloads_then_converts(server, tmp_path, monkeypatch, capsys):
    serve_release(server)
    server.cut_after["/gpt-2/models/124M/model.ckpt.data-00000-of-00001"] = [1_200_000]
    monkeypatch.setenv("GPT2_SCRATCH_DOWNLOAD_BACKOFF", "0")
    code = convert_main(["openai", "--size", "124M", "--out", str(tmp_path / "model"),
                         "--models-dir", str(tmp_path / "cache"), "--base-url", server.url + "/gpt-2/models",
                         "--mirror", dead_url()])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "cache" / "124M").iterdir()) == sorted(
        ["checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001", "model.ckpt.index",
         "model.ckpt.meta", "vocab.bpe"])
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert server.gets("/gpt-2/models/124M/model.ckpt.data-00000-of-00001")[-1][1] == 206  # resumed

    # Second run: everything is cached, so it works with nothing listening.
    code = convert_main(["openai", "--size", "124M", "--out", str(tmp_path / "model2"),
                         "--models-dir", str(tmp_path / "cache"), "--base-url", dead_url(), "--mirror", dead_url()])
    assert code == 0, capsys.readouterr().err


def test_cli_offline_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPT2_SCRATCH_DOWNLOAD_BACKOFF", "0")
    url = dead_url()
    monkeypatch.setenv("GPT2_SCRATCH_OPENAI_URL", url)
    monkeypatch.setenv("GPT2_SCRATCH_OPENAI_MIRRORS", "")
    code = convert_main(["openai", "--size", "355M", "--out", str(tmp_path / "m"), "--models-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 1  # the network failed, not the input
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: cannot reach {url}/355M/checkpoint (Connection refused)") and "--from-dir" in line


# --- load_model (what train/ and eval/ call) -------------------------------------------------
def test_load_model_preset_uses_the_cache_offline(tmp_path, monkeypatch):
    from gpt2_scratch.convert import load_model

    cache = tmp_path / "cache" / "124M"
    cache.mkdir(parents=True)
    for name in ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        (cache / name).write_bytes((SHARED_TINY / name).read_bytes())
    monkeypatch.setenv("GPT2_SCRATCH_OPENAI_URL", dead_url())
    model = load_model("gpt2-small", models_dir=tmp_path / "cache")
    assert model.config.n_layers == 2 and not model.training  # the tiny fixture, from the cache


def test_load_model_preset_offline_suggests_random_init(tmp_path, monkeypatch):
    from gpt2_scratch.convert import load_model

    monkeypatch.setenv("GPT2_SCRATCH_DOWNLOAD_BACKOFF", "0")
    monkeypatch.setenv("GPT2_SCRATCH_OPENAI_URL", dead_url())
    monkeypatch.setenv("GPT2_SCRATCH_OPENAI_MIRRORS", dead_url())
    with pytest.raises(DownloadError) as e:
        load_model("gpt2-medium", models_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "gpt2-medium" in msg and "/355M/" in msg
    assert "--random-init" in msg and "--model DIR" in msg


def test_load_model_other_specs(tmp_path, monkeypatch):
    from gpt2_scratch.convert import load_model
    from gpt2_scratch import GPT2ScratchForCausalLM, save_model_dir

    tiny = load_model(str(SHARED_TINY))  # an OpenAI checkpoint folder
    save_model_dir(tiny, tmp_path / "ours")
    again = load_model(str(tmp_path / "ours"))  # our model folder
    assert isinstance(again, GPT2ScratchForCausalLM) and again.config.emb_dim == 8
    fresh = load_model(str(tmp_path / "ours"), random_init=True)
    assert fresh.config.emb_dim == 8
    with pytest.raises(ConvertError, match="no such folder, and not a preset"):
        load_model("no-such-thing")


def test_download_openai_rejects_unknown_size(tmp_path):
    with pytest.raises(ConvertError, match="unknown GPT-2 size '7B'"):
        download_openai("7B", tmp_path)
