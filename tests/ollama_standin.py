"""A stand-in Ollama server for tests and benchmarks (no Ollama can be installed here).

It speaks the parts of the protocol the judge uses, as Ollama does (docs/api.md, api/types.go):

- ``GET /api/version`` → ``{"version": ...}``; ``GET /api/tags`` → ``{"models": [...]}``;
- ``POST /api/chat``: streamed NDJSON chunks ``{model, created_at, message, done: false}`` ending
  in a ``done: true`` chunk with ``done_reason`` and durations, over chunked transfer encoding;
  or one JSON object with ``"stream": false``; ``format`` = "json" or a JSON schema gets a JSON reply;
- errors as ``{"error": "..."}``: 404 ``model 'X' not found``, 500s, and an error line mid-stream
  after a 200, the way Ollama reports a runner that dies while generating;
- Ollama's OpenAI-compatible ``GET /v1/models`` and ``POST /v1/chat/completions``;
- raw completion for Magpie-style generation: ``POST /api/generate`` (``"raw": true``, streamed
  ``{response, done}`` chunks) and ``POST /v1/completions`` (``choices[0].text``). Given the start of a
  user turn, the reply is one of ``MAGPIE_INSTRUCTIONS`` picked by the request's seed, then a second
  line; seeds in ``garbage_seeds`` get a reply of the wrong shape. Asked in a chat for one of those
  instructions, the reply is ``"An answer to: " + instruction``.
- asked to rewrite an output "to be more polite" (the book's preference-data prompt), the reply is
  ``"Please note: " + output``; "more impolite": ``"Obviously, " + output``; ``EMPTYREWRITE`` in the
  output: an empty reply.

``tests/test_judge_standin.py`` proves the replies faithful by parsing them with the official
``ollama`` client. The judge's answers are deterministic so tests can assert exact averages: the
score of a response is :func:`standin_score` (a CRC of its text, 0..100); pairwise, the response
with the higher stand-in score wins (asked which is more polite: the one saying "please"). Markers in the prompt inject faults, counted per prompt:

- ``FAIL500:N``  the first N requests get HTTP 500
- ``SLOW:N``     the first N requests wait ``slow_seconds`` before answering (client timeouts)
- ``MIDERR:N``   the first N requests stream one chunk, then an ``{"error": ...}`` line
- ``GARBLE:N``   the first N replies are prose without a number, then a normal answer
- ``UNPARSABLE`` every reply is prose without a number
- ``PLAIN``      replies in prose ("I would rate it 87 out of 100.") even when a schema was asked
- ``CHATTY``     a long preamble before "Score: N" (cut at the request's num_predict/max_tokens,
                 counted in words, with done_reason/finish_reason "length")
- ``FOREVER``    the reply never ends: NDJSON chunks without ``done`` (OpenAI: a body that trickles
                 whitespace), until the client hangs up
- ``NONOBJECT:list|str|int``  the NDJSON stream's first line is JSON but not an object (``[1]``, ``"x"``, ``7``)
- ``HTTP400``    every request gets HTTP 400 (a request the server will never accept, e.g. too long)
- ``INVALID500`` every request gets HTTP 500 carrying a request-validation error, the way
                 llama-cpp-python reports a request its pydantic model refuses

Structured output: ``reject_formats`` lists what the server refuses, as real servers do:
"schema" / "json" (Ollama's ``format``: 400, as Ollama < 0.5 did for a schema), "json_schema"
(OpenAI ``response_format``: HTTP 500 with the validation error llama-cpp-python sends), and
"json_object" (400, as servers that know only json_schema). Refused payloads are kept in
``rejected``, not in ``chat_requests``.

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
_REWRITE_RE = re.compile(r"and correct output `(.*)`, slightly rewrite the output to be more (polite|impolite)\.",
                         re.DOTALL)
# Distinct instructions; the last is the first with other punctuation and case (a near-duplicate: the same
# text once lower-cased and stripped of punctuation).
MAGPIE_INSTRUCTIONS = ("What is the capital of France?", "Write a haiku about autumn leaves.",
                       "How do I reverse a list in Python?", "Explain photosynthesis to a ten-year-old.",
                       "Give me three tips for a job interview.", "what is the capital of france!!")
_MARK_RE = re.compile(r"\b(FAIL500|SLOW|MIDERR|GARBLE):(\d+)")
_NONOBJECT_RE = re.compile(r"\bNONOBJECT:(list|str|int)\b")
_NONOBJECT = {"list": b"[1]", "str": b'"x"', "int": b"7"}
# What llama-cpp-python 0.3.x answers (HTTP 500) to response_format {"type": "json_schema"}.
LLAMA_CPP_JSON_SCHEMA_ERROR = (  # its error.message, verbatim but for the path
    "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
    "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema', "
    "'ctx': {'expected': \"'text' or 'json_object'\"}}\n\n  File \"llama_cpp/server/app.py\", "
    "line 376, in create_chat_completion\n    POST /v1/chat/completions")


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
                 reject_schema: bool = False, reject_formats=(), port: int = 0):
        self.models = [_norm(m) for m in models]
        # reject_schema: refuse any JSON schema (Ollama's format object, OpenAI's json_schema and
        # json_object): the server only answers in text or Ollama's "json".
        self.reject_formats = set(reject_formats) | (
            {"schema", "json_schema", "json_object"} if reject_schema else set())
        self.rejected: list[dict] = []  # chat payloads refused for their structured-output field
        self.delay = delay  # seconds added to every chat request (benchmarks)
        self.slow_seconds = slow_seconds
        self.chat_requests: list[dict] = []  # every chat payload received, in order
        self.raw_requests: list[dict] = []  # every raw completion payload (/api/generate, /v1/completions)
        self.garbage_seeds: set[int] = set()  # raw requests with these seeds get a reply of the wrong shape
        self._seen: Counter = Counter()  # prompt -> requests so far (for the N in markers)
        self.in_flight = 0
        self.max_in_flight = 0  # most chat requests being answered at the same time
        self._lock = threading.Lock()
        self._stopping = threading.Event()
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
        self._stopping.set()  # ends FOREVER replies
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

    def _refuses(self, payload: dict) -> tuple[int, str] | None:
        """(status, message) if the request's structured-output field is one this server refuses."""
        fmt, rf = payload.get("format"), payload.get("response_format")
        kind = ("schema" if isinstance(fmt, dict) else "json" if fmt == "json" else
                rf.get("type") if isinstance(rf, dict) else None)
        if kind not in self.reject_formats:
            return None
        with self._lock:
            self.rejected.append(payload)
        if kind == "json_schema":
            return 500, LLAMA_CPP_JSON_SCHEMA_ERROR
        if kind == "json_object":
            return 400, "'response_format.type' must be 'json_schema' or 'text'"
        return 400, 'invalid format: expected "json" or a valid schema'

    @staticmethod
    def cap(payload: dict) -> int | None:
        """The reply cap the request asks for (Ollama options.num_predict, OpenAI max_tokens)."""
        n = (payload.get("options") or {}).get("num_predict") or payload.get("max_tokens")
        return n if isinstance(n, int) and n > 0 else None


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
            if "CHATTY" in prompt:
                return "Let me weigh this response carefully against the reference. " * 20 + f"Score: {score}"
            if "PLAIN" in prompt:
                return f"I would rate it {score} out of 100."
            return json.dumps({"score": score}) if wants_json else str(score)
        m = _PAIR_RE.search(prompt)
        if m and "Which response is more polite?" in prompt:  # the politer answer says "please"
            sa, sb = ("please" in m.group(1).lower()), ("please" in m.group(2).lower())
            winner = "A" if sa > sb else "B" if sb > sa else "tie"
            return json.dumps({"winner": winner}) if wants_json else winner
        if m:
            sa, sb = standin_score(m.group(1)), standin_score(m.group(2))
            winner = "A" if sa > sb else "B" if sb > sa else "tie"
            return json.dumps({"winner": winner}) if wants_json else winner
        m = _REWRITE_RE.search(prompt)
        if m:
            output, style = m.groups()
            if "EMPTYREWRITE" in output:
                return ""
            return ("Please note: " if style == "polite" else "Obviously, ") + output
        if prompt in MAGPIE_INSTRUCTIONS:
            return "An answer to: " + prompt
        return "Hello! I am a stand-in for Ollama."

    def _raw(self, payload: dict) -> str | None:
        """The continuation of a raw prompt (None: a reply of the wrong shape); see the module docstring."""
        with self._lock:
            self.raw_requests.append(payload)
        seed = (payload.get("options") or payload).get("seed") or 0
        if seed in self.garbage_seeds:
            return None
        if "user" not in str(payload.get("prompt", ""))[-40:]:
            return "a continuation of some text"
        return MAGPIE_INSTRUCTIONS[seed % len(MAGPIE_INSTRUCTIONS)] + "\nA second line, which is not the instruction."


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
            if self.path in ("/api/generate", "/v1/completions"):
                return self._raw(payload)
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

        def _truncate(self, reply: str, p: dict) -> tuple[str, bool]:
            """The reply cut at the request's cap, counting words as tokens; (text, was it cut)."""
            n, words = OllamaStandin.cap(p), reply.split(" ")
            if n is None or len(words) <= n:
                return reply, False
            return " ".join(words[:n]), True

        def _forever(self, piece: bytes) -> None:
            """Send ``piece`` as a chunk every 50 ms until the client hangs up (or 10 minutes)."""
            end = time.monotonic() + 600
            while not srv._stopping.is_set() and time.monotonic() < end:
                self._chunk(piece)
                time.sleep(0.05)
            self.close_connection = True

        def _start_chunked(self, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

        def _chat(self, p):
            if not isinstance(p, dict) or not p.get("messages"):
                return self._send_json(400, {"error": "invalid request: messages required"})
            model = p.get("model", "")
            if _norm(model) not in srv.models:
                return self._send_json(404, {"error": f"model '{model}' not found"})
            refused = srv._refuses(p)
            if refused:
                return self._send_json(refused[0], {"error": refused[1]})
            reply, fault = srv._plan(p)
            prompt = p["messages"][-1]["content"]
            if srv.delay:
                time.sleep(srv.delay)
            if "HTTP400" in prompt:
                return self._send_json(400, {"error": "the input length exceeds the context length"})
            if "INVALID500" in prompt:
                return self._send_json(500, {"error": "1 validation error: messages.0.content: Input "
                                                      "should be a valid string"})
            if fault == "500":
                return self._send_json(500, {"error": "llama runner process has terminated: exit status 2"})
            if fault == "slow":
                time.sleep(srv.slow_seconds)
            reply, cut = self._truncate(reply, p)
            final = {"model": model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                     "done": True, "done_reason": "length" if cut else "stop", "total_duration": 1_234_567_890,
                     "load_duration": 12_345_678, "prompt_eval_count": 26,
                     "prompt_eval_duration": 130_079_000, "eval_count": 3, "eval_duration": 98_123_000}
            if p.get("stream", True) is False:
                if fault == "miderr":
                    return self._send_json(500, {"error": "an error was encountered while running the model"})
                final["message"]["content"] = reply
                return self._send_json(200, final)
            self._start_chunked("application/x-ndjson")

            def line(content: str) -> bytes:
                return json.dumps({"model": model, "created_at": _now(), "done": False,
                                   "message": {"role": "assistant", "content": content}}).encode() + b"\n"

            bad = _NONOBJECT_RE.search(prompt)
            if bad:
                self._chunk(_NONOBJECT[bad.group(1)] + b"\n")
            elif "FOREVER" in prompt:
                return self._forever(line(" and"))
            pieces = [reply[i:i + 4] for i in range(0, len(reply), 4)] or [""]
            for k, piece in enumerate(pieces):
                self._chunk(line(piece))
                if fault == "miderr" and k == 0:
                    self._chunk(json.dumps({"error": "an error was encountered while running the model"})
                                .encode() + b"\n")
                    break
            else:
                self._chunk(json.dumps(final).encode() + b"\n")
            self._chunk(b"")  # end of chunked body

        def _raw(self, p):
            if not isinstance(p, dict) or not isinstance(p.get("prompt"), str):
                return self._send_json(400, {"error": "invalid request: prompt required"})
            model = p.get("model", "")
            if _norm(model) not in srv.models:
                return self._send_json(404, {"error": f"model '{model}' not found"})
            text = srv._raw(p)
            if self.path == "/v1/completions":
                choice = {"index": 0, "text": text, "finish_reason": "stop"} if text is not None else {"index": 0}
                return self._send_json(200, {"id": "cmpl-%d" % len(srv.raw_requests), "object": "text_completion",
                                             "created": int(time.time()), "model": model, "choices": [choice]})
            if p.get("stream", True) is False:
                body = {"model": model, "created_at": _now(), "done": True, "done_reason": "stop", "eval_count": 9}
                return self._send_json(200, body if text is None else {**body, "response": text})
            self._start_chunked("application/x-ndjson")
            if text is None:
                self._chunk(json.dumps({"model": model, "created_at": _now(), "done": False}).encode() + b"\n")
            else:
                for k in range(0, len(text), 4):
                    self._chunk(json.dumps({"model": model, "created_at": _now(), "response": text[k:k + 4],
                                            "done": False}).encode() + b"\n")
                self._chunk(json.dumps({"model": model, "created_at": _now(), "response": "", "done": True,
                                        "done_reason": "stop", "eval_count": 9}).encode() + b"\n")
            self._chunk(b"")

        def _openai_chat(self, p):
            def err(status, msg, kind="api_error"):
                self._send_json(status, {"error": {"message": msg, "type": kind, "param": None,
                                                   "code": None}})
            if not isinstance(p, dict) or not p.get("messages"):
                return err(400, "invalid request: messages required")
            model = p.get("model", "")
            if _norm(model) not in srv.models:
                return err(404, f'model "{model}" not found, try pulling it first')
            refused = srv._refuses(p)
            if refused:
                return err(refused[0], refused[1], "internal_server_error" if refused[0] >= 500 else
                           "invalid_request_error")
            reply, fault = srv._plan(p)
            prompt = p["messages"][-1]["content"]
            if srv.delay:
                time.sleep(srv.delay)
            if "HTTP400" in prompt:
                return err(400, "This model's maximum context length is 2048 tokens. However, you "
                                "requested 2100 tokens.", "invalid_request_error")
            if "INVALID500" in prompt:
                return err(500, "[{'type': 'string_type', 'loc': ('body', 'messages', 0, 'content'), "
                                "'msg': 'Input should be a valid string'}]", "internal_server_error")
            if fault in ("500", "miderr"):
                return err(500, "llama runner process has terminated: exit status 2")
            if fault == "slow":
                time.sleep(srv.slow_seconds)
            if "FOREVER" in prompt:
                self._start_chunked("application/json")
                return self._forever(b" ")
            reply, cut = self._truncate(reply, p)
            self._send_json(200, {
                "id": "chatcmpl-%d" % len(srv.chat_requests), "object": "chat.completion",
                "created": int(time.time()), "model": model, "system_fingerprint": "fp_ollama",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                             "finish_reason": "length" if cut else "stop"}],
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
