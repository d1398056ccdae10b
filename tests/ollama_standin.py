"""A stand-in Ollama server for tests and benchmarks (no Ollama can be installed here).

It speaks the parts of the protocol the judge uses, as Ollama does (docs/api.md, api/types.go):

- ``GET /api/version`` → ``{"version": ...}``; ``GET /api/tags`` → ``{"models": [...]}``;
- ``POST /api/chat``: streamed NDJSON chunks ``{model, created_at, message, done: false}`` ending
  in a ``done: true`` chunk with ``done_reason`` and durations, over chunked transfer encoding;
  or one JSON object with ``"stream": false``; ``format`` = "json" or a JSON schema gets a JSON reply;
- errors as ``{"error": "..."}``: 404 ``model 'X' not found``, 500s, and an error line mid-stream
  after a 200, the way Ollama reports a runner that dies while generating;
- Ollama's OpenAI-compatible ``GET /v1/models`` and ``POST /v1/chat/completions``.

``tests/test_judge_standin.py`` proves the replies faithful by parsing them with the official
``ollama`` client. The judge's answers are deterministic so tests can assert exact averages: the
score of a response is :func:`standin_score` (a CRC of its text, 0..100); pairwise, the response
with the higher stand-in score wins. Markers in the prompt inject faults, counted per prompt:

- ``FAIL500:N``  the first N requests get HTTP 500
- ``SLOW:N``     the first N requests wait ``slow_seconds`` before answering (client timeouts)
- ``MIDERR:N``   the first N requests stream one chunk, then an ``{"error": ...}`` line
- ``GARBLE:N``   the first N replies are prose without a number, then a normal answer
- ``UNPARSABLE`` every reply is prose without a number
- ``PLAIN``      replies in prose ("I would rate it 87 out of 100.") even when a schema was asked

Run it by hand: ``python tests/ollama_standin.py --port 11434 [--delay 0.2]``.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
import zlib
from collections import Counter
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "0.12.0"
_SCORE_RE = re.compile(r"score the model response `(.*)` on a scale from 0 to 100", re.DOTALL)
_PAIR_RE = re.compile(r"compare model response A `(.*)` with model response B `(.*)`\. Which", re.DOTALL)
_MARK_RE = re.compile(r"\b(FAIL500|SLOW|MIDERR|GARBLE):(\d+)")


def standin_score(response: str) -> int:
    """The stand-in judge's score for a response: deterministic, spread over 0..100."""
    return zlib.crc32(response.encode("utf-8")) % 101


def _norm(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class OllamaStandin:
    """``with OllamaStandin() as srv: srv.url`` — a threaded server on 127.0.0.1 (port 0 = any free)."""

    def __init__(self, models=("llama3:latest",), *, delay: float = 0.0, slow_seconds: float = 3.0,
                 reject_schema: bool = False, port: int = 0):
        self.models = [_norm(m) for m in models]
        self.reject_schema = reject_schema  # answer 400 to a JSON-schema format, as Ollama < 0.5 did
        self.delay = delay  # seconds added to every chat request (benchmarks)
        self.slow_seconds = slow_seconds
        self.chat_requests: list[dict] = []  # every chat payload received, in order
        self._seen: Counter = Counter()  # prompt -> requests so far (for the N in markers)
        self.in_flight = 0
        self.max_in_flight = 0  # most chat requests being answered at the same time
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "OllamaStandin":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def count(self, needle: str = "") -> int:
        """Chat requests received whose prompt contains ``needle``."""
        with self._lock:
            return sum(needle in p["messages"][-1]["content"] for p in self.chat_requests)

    # --- the judge's behaviour -------------------------------------------------------------

    def _plan(self, payload: dict) -> tuple[str, str | None]:
        """(reply text, fault) for a chat request; fault in {None, "500", "slow", "miderr"}."""
        prompt = payload["messages"][-1]["content"]
        with self._lock:
            self.chat_requests.append(payload)
            self._seen[prompt] += 1
            n = self._seen[prompt]
        for kind, limit in _MARK_RE.findall(prompt):
            if n <= int(limit):
                if kind == "FAIL500":
                    return "", "500"
                if kind == "SLOW":
                    return self._answer(prompt, payload), "slow"
                if kind == "MIDERR":
                    return self._answer(prompt, payload), "miderr"
                if kind == "GARBLE":
                    return "I am not sure how to rate that.", None
        return self._answer(prompt, payload), None

    def _answer(self, prompt: str, payload: dict) -> str:
        wants_json = bool(payload.get("format")) or bool(payload.get("response_format"))
        if "UNPARSABLE" in prompt:
            return "This response is hard to rate; it has good and bad parts."
        m = _SCORE_RE.search(prompt)
        if m:
            score = standin_score(m.group(1))
            if "PLAIN" in prompt:
                return f"I would rate it {score} out of 100."
            return json.dumps({"score": score}) if wants_json else str(score)
        m = _PAIR_RE.search(prompt)
        if m:
            sa, sb = standin_score(m.group(1)), standin_score(m.group(2))
            winner = "A" if sa > sb else "B" if sb > sa else "tie"
            return json.dumps({"winner": winner}) if wants_json else winner
        return "Hello! I am a stand-in for Ollama."


def _make_handler(srv: OllamaStandin):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive and chunked streaming, as Ollama (Go net/http)
        server_version = "ollama-standin"

        def log_message(self, *args):  # quiet
            pass

        # --- plumbing --------------------------------------------------------------------
        def _send_json(self, status: int, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _body(self):
            n = int(self.headers.get("Content-Length") or 0)
            try:
                return json.loads(self.rfile.read(n) or b"{}")
            except ValueError:
                return None

        def handle_one_request(self):
            try:
                super().handle_one_request()
            except (BrokenPipeError, ConnectionResetError):  # client gave up (its timeout)
                self.close_connection = True

        # --- routes ----------------------------------------------------------------------
        def do_GET(self):
            if self.path == "/api/version":
                self._send_json(200, {"version": VERSION})
            elif self.path == "/api/tags":
                self._send_json(200, {"models": [{
                    "name": m, "model": m, "modified_at": "2025-05-01T10:00:00.123456-07:00",
                    "size": 4661224676, "digest": "%064x" % zlib.crc32(m.encode()),
                    "details": {"parent_model": "", "format": "gguf", "family": "llama",
                                "families": ["llama"], "parameter_size": "8.0B",
                                "quantization_level": "Q4_0"}} for m in srv.models]})
            elif self.path == "/v1/models":
                self._send_json(200, {"object": "list", "data": [
                    {"id": m, "object": "model", "created": 1714582800, "owned_by": "library"}
                    for m in srv.models]})
            else:
                self._not_found()

        def _not_found(self):
            body = b"404 page not found"  # Go's default, text/plain
            self.send_response(404)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            payload = self._body()
            if self.path not in ("/api/chat", "/v1/chat/completions"):
                return self._not_found()
            with srv._lock:
                srv.in_flight += 1
                srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            try:
                (self._chat if self.path == "/api/chat" else self._openai_chat)(payload)
            finally:
                with srv._lock:
                    srv.in_flight -= 1

        def _chat(self, p):
            if not isinstance(p, dict) or not p.get("messages"):
                return self._send_json(400, {"error": "invalid request: messages required"})
            model = p.get("model", "")
            if _norm(model) not in srv.models:
                return self._send_json(404, {"error": f"model '{model}' not found"})
            if srv.reject_schema and isinstance(p.get("format"), dict):
                return self._send_json(400, {"error": "invalid format: expected \"json\" or a valid schema"})
            reply, fault = srv._plan(p)
            if srv.delay:
                time.sleep(srv.delay)
            if fault == "500":
                return self._send_json(500, {"error": "llama runner process has terminated: exit status 2"})
            if fault == "slow":
                time.sleep(srv.slow_seconds)
            final = {"model": model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                     "done": True, "done_reason": "stop", "total_duration": 1_234_567_890,
                     "load_duration": 12_345_678, "prompt_eval_count": 26,
                     "prompt_eval_duration": 130_079_000, "eval_count": 3, "eval_duration": 98_123_000}
            if p.get("stream", True) is False:
                if fault == "miderr":
                    return self._send_json(500, {"error": "an error was encountered while running the model"})
                final["message"]["content"] = reply
                return self._send_json(200, final)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            pieces = [reply[i:i + 4] for i in range(0, len(reply), 4)] or [""]
            for k, piece in enumerate(pieces):
                self._chunk(json.dumps({"model": model, "created_at": _now(),
                                        "message": {"role": "assistant", "content": piece},
                                        "done": False}).encode() + b"\n")
                if fault == "miderr" and k == 0:
                    self._chunk(json.dumps({"error": "an error was encountered while running the model"})
                                .encode() + b"\n")
                    break
            else:
                self._chunk(json.dumps(final).encode() + b"\n")
            self._chunk(b"")  # end of chunked body

        def _openai_chat(self, p):
            def err(status, msg):
                self._send_json(status, {"error": {"message": msg, "type": "api_error", "param": None,
                                                   "code": None}})
            if not isinstance(p, dict) or not p.get("messages"):
                return err(400, "invalid request: messages required")
            model = p.get("model", "")
            if _norm(model) not in srv.models:
                return err(404, f'model "{model}" not found, try pulling it first')
            if srv.reject_schema and p.get("response_format"):
                return err(400, "response_format is not supported")
            reply, fault = srv._plan(p)
            if srv.delay:
                time.sleep(srv.delay)
            if fault in ("500", "miderr"):
                return err(500, "llama runner process has terminated: exit status 2")
            if fault == "slow":
                time.sleep(srv.slow_seconds)
            self._send_json(200, {
                "id": "chatcmpl-%d" % len(srv.chat_requests), "object": "chat.completion",
                "created": int(time.time()), "model": model, "system_fingerprint": "fp_ollama",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 26, "completion_tokens": 3, "total_tokens": 29}})

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=11434)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds added to each chat request")
    ap.add_argument("--model", action="append", default=None, help="served model (repeatable)")
    args = ap.parse_args()
    srv = OllamaStandin(args.model or ["llama3:latest"], delay=args.delay, port=args.port).start()
    print(f"stand-in Ollama listening on {srv.url}", flush=True)
    try:
        srv._thread.join()
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    main()
