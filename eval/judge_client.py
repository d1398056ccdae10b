"""HTTP clients for the judge model: Ollama's native API and OpenAI-compatible servers.

Both expose the same two calls:

- ``preflight()`` checks, before any scoring, that the server answers and serves the model, and
  raises :class:`JudgeError` with a one-line fix (``ollama serve``, ``ollama pull llama3``).
- ``complete(prompt, schema, stop=event)`` returns the judge's reply text (a :class:`Reply`).

What real servers need, and how it is handled here:

- Replies are capped (``max_reply_tokens``: Ollama ``num_predict``, OpenAI ``max_tokens``): a
  score is a few tokens, and an uncapped chatty model writes up to its whole context.
- Structured output goes down a ladder when a server refuses it: a JSON schema, then plain JSON
  (OpenAI ``json_object`` with the schema, which llama-cpp-python accepts; Ollama ``"json"``), then
  plain text. Until one format has worked, requests go one at a time, so each refusal happens once;
  the format that worked is kept for the rest of the run (``judge.format``).
- Transient failures (connection errors, a silent server, 408/429/5xx, an ``{"error": ...}`` line
  mid-stream) are retried with backoff. Errors the same request would get again (other 4xx, a
  5xx that is a request-validation error, a reply of the wrong shape, a reply that overran the
  time limit) are not: they raise :class:`RequestFailed` at once.
- Every request has a total deadline (``request_timeout``) besides the wait for each piece of the
  reply (``timeout``): a watchdog shuts the socket when it passes, or when ``stop`` is set, so
  no read blocks past either (a server that streams forever without ``done`` cannot hang a run).
- Every reply is bounded in size too (``max_reply_bytes``, 4 MiB): the body is read in pieces and
  split into lines in linear time, and a reply that outgrows the cap fails its record at once
  (not retried), so one enormous reply costs one record, not the run's time or memory.
- A request that is redirected and then fails names the address it was sent to, not the one given.

Requests go through ``requests`` with one ``Session`` per worker thread (a Session is not
thread-safe).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlsplit

import requests
import urllib3

from gpt2_scratch.core.errors import Failure, InputError
from gpt2_scratch.core.retry import RetryPolicy
from gpt2_scratch.eval.judge_prompts import OLLAMA_OPTIONS

log = logging.getLogger(__name__)

# A score or a verdict is a handful of tokens; 64 leaves room for a short sentence around it.
MAX_REPLY_TOKENS = 64
REQUEST_TIMEOUT = 300.0
# The most bytes one reply may hold. A score is a few tokens; Ollama streams ~150 bytes of NDJSON per
# token, so even an uncapped reply of a few thousand tokens fits with room to spare.
MAX_REPLY_BYTES = 4 * 1024 * 1024


class JudgeError(Failure):
    """A problem that stops the whole run (server down, model missing); the message is one line (exit 1)."""


class JudgeInputError(InputError):
    """A bad argument (an invalid host URL): exit status 2, before any request."""


class RequestFailed(Exception):
    """One question could not be answered; the message is the reason reported for its record."""


class _TooBig(RequestFailed):
    """A reply over ``max_reply_bytes``: not retried (the same question gets the same reply)."""


class _Overdue(RequestFailed):
    """A reply still unfinished at the request's deadline: not retried."""


class Cancelled(Exception):
    """The run is stopping (``stop`` was set): the request was abandoned."""


class _Retryable(Exception):
    """A transient failure worth asking again (connection, timeout, 429/5xx, mid-stream error)."""


class _FormatRejected(Exception):
    """The server refused the structured-output field; ask again one step down the ladder."""


class Reply(str):
    """The judge's reply text; ``truncated`` is True when the server stopped it at the token cap."""

    truncated: bool = False


class _Answer:
    """A preflight GET's status and body, read whole (see ``_BaseJudge._get``)."""

    def __init__(self, status_code: int, content: bytes):
        self.status_code, self.content = status_code, content

    def json(self):
        return json.loads(self.content)


def _lines(pieces):
    """The lines (without their newline) of a body arriving in ``pieces``, in time linear in its size.

    (requests' ``iter_lines`` joins the pending line with every new piece: quadratic on one long line.)
    """
    buf = bytearray()
    for piece in pieces:
        start, searched = 0, len(buf)  # what is already in ``buf`` holds no newline
        buf += piece
        while (end := buf.find(b"\n", searched)) >= 0:
            yield bytes(buf[start:end])
            start = searched = end + 1
        del buf[:start]
    if buf:
        yield bytes(buf)


def normalize_host(host: str) -> str:
    """``localhost:11434`` → ``http://localhost:11434`` (Ollama accepts OLLAMA_HOST without a scheme).

    Raises ValueError saying what is wrong with a URL no request could use.
    """
    host = str(host).strip().rstrip("/")
    if "://" not in host:
        # "htp:/x", "http:/x", "http//x": a mistyped scheme, which would otherwise be taken for a host name
        typo = re.match(r"[A-Za-z][A-Za-z0-9+.-]*:/+|[A-Za-z][A-Za-z0-9+.-]*//", host)
        if typo:
            raise ValueError(f"{typo.group(0)!r} is not a scheme followed by '://'")
        host = "http://" + host
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"the scheme must be http or https, not {parts.scheme!r}")
    if any(c.isspace() for c in host):
        raise ValueError("it contains a space")
    try:
        port = parts.port  # raises for a port outside 0..65535 or not a number
    except ValueError:
        raise ValueError(f"the port is not a number in 1..65535 ({parts.netloc!r})") from None
    if not parts.hostname:
        raise ValueError("it names no host")
    if parts.netloc.endswith(":"):
        raise ValueError(f"no port follows the ':' in {parts.netloc!r}")
    if port == 0:
        raise ValueError("port 0 is not a server's port")
    if parts.query or parts.fragment:
        raise ValueError("it has a query or fragment; pass the server's base URL")
    return host


def _error_text(content: bytes, reason: str) -> str:
    """The server's error message from an Ollama ``{"error": "..."}`` or OpenAI ``{"error": {...}}`` body."""
    text = content.decode("utf-8", "replace")
    try:
        body = json.loads(text)
        err = body.get("error", body.get("detail", text)) if isinstance(body, dict) else text
    except ValueError:
        err = text
    if isinstance(err, dict):
        err = err.get("message", json.dumps(err))
    elif isinstance(err, list):  # FastAPI's 422: {"detail": [{"msg": ...}, ...]}
        err = "; ".join(str(e.get("msg", e)) if isinstance(e, dict) else str(e) for e in err)
    return " ".join(str(err).split())[:300] or reason


# A 5xx whose text says the request itself is invalid (llama-cpp-python answers a request its
# pydantic model refuses with HTTP 500): asking again cannot help.
_VALIDATION = re.compile(r"validation error|input should be|invalid request|unprocessable|literal_error",
                         re.IGNORECASE)
_MENTIONS_FORMAT = re.compile(r"format|schema|grammar", re.IGNORECASE)


class _Connection:
    """The connection a request is using (urllib3's HTTPConnection), noted as it is taken from the pool."""

    conn = None


_in_flight = threading.local()  # .request: the _Connection of the request this thread is making


def _tracking(pool_class):
    """``pool_class`` noting each connection it hands out in this thread's ``_in_flight.request``: the
    watchdog can then shut a request's socket before its response exists (headers that trickle)."""
    class Tracking(pool_class):
        def _get_conn(self, timeout=None):
            conn = super()._get_conn(timeout)
            request = getattr(_in_flight, "request", None)
            if request is not None:
                request.conn = conn
            return conn

    return Tracking


class _Watchdog:
    """Shuts a request's socket when its deadline passes or ``stop`` is set.

    A blocked read then returns at once (EOF or an error); ``fired`` says why ("deadline"/"stop").
    Without it a server that trickles bytes (its headers or its body), or streams forever, could hold a
    worker past any limit. Use it as ``with watch.tracking(): session.post(...)``.
    """

    def __init__(self, deadline: float, stop: threading.Event | None):
        self.connection, self.deadline, self.stop = _Connection(), deadline, stop
        self.fired: str | None = None
        self._done = threading.Event()
        threading.Thread(target=self._run, name="judge-watchdog", daemon=True).start()

    def _run(self) -> None:
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.fired = "deadline"
                break
            if self.stop is not None and self.stop.is_set():
                self.fired = "stop"
                break
            if self._done.wait(min(0.1, left)):
                return
        sock = getattr(self.connection.conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._done.set()

    @contextmanager
    def tracking(self):
        """Note the connections the requests made inside take from the pool (see ``_tracking``)."""
        _in_flight.request = self.connection
        try:
            yield
        finally:
            _in_flight.request = None


class _BaseJudge:
    api = "base"
    formats: tuple[str, ...] = ("text",)  # the structured-output ladder, best first; "text" = none
    _chat_path = ""

    def __init__(self, host: str, model: str, *, timeout: float = 120.0, connect_timeout: float = 5.0,
                 request_timeout: float = REQUEST_TIMEOUT, max_reply_tokens: int | None = MAX_REPLY_TOKENS,
                 retry: RetryPolicy | None = None, structured: bool = True,
                 max_reply_bytes: int = MAX_REPLY_BYTES):
        try:
            self.host = normalize_host(host)
        except ValueError as e:
            raise JudgeInputError(f"invalid host URL {host!r}: {e}; pass one like "
                                  f"http://localhost:11434") from None
        self.model = model
        self.timeout = timeout  # longest wait for the reply to start, and between two pieces of it
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout  # longest time one request may take in all
        self.max_reply_tokens = max_reply_tokens or None  # 0/None: no cap
        self.max_reply_bytes = max_reply_bytes  # the most bytes one reply (or preflight answer) may hold
        self.retry = retry or RetryPolicy(attempts=5)
        self.structured = structured  # what was asked for; ``format`` is what the server accepted
        self._ladder = self.formats if structured else ("text",)
        self._level = 0
        self._confirmed = False  # a request has succeeded with the current format
        self._ladder_lock = threading.Lock()
        self._probe_lock = threading.Lock()  # one request at a time until a format is confirmed
        self._local = threading.local()

    @property
    def format(self) -> str:
        """The structured-output format in use: the first of ``formats`` the server accepted."""
        return self._ladder[self._level]

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
            self._local.session.headers.update(self._headers())
            adapter = requests.adapters.HTTPAdapter()
            adapter.poolmanager.pool_classes_by_scheme = {
                "http": _tracking(urllib3.HTTPConnectionPool), "https": _tracking(urllib3.HTTPSConnectionPool)}
            for prefix in ("http://", "https://"):
                self._local.session.mount(prefix, adapter)
        return self._local.session

    def _headers(self) -> dict:
        return {}

    def _get(self, path: str) -> "_Answer":
        """A preflight GET of ``path``: its status and whole body, bounded in time and size like a reply.

        Raises requests' errors as they are, except that a redirect which then fails, a redirect loop, a
        body over ``max_reply_bytes`` or an answer (headers included) unfinished after
        ``min(request_timeout, 30 s)`` is a JudgeError.
        """
        url = self.host + path
        allowed = min(self.request_timeout, 30.0)
        watch = _Watchdog(time.monotonic() + allowed, None)  # from the first byte sent: headers may trickle
        overdue = JudgeError(f"{url} did not finish its answer within {allowed:g} s; is {self.host} the judge's "
                             "server, and is it working?")
        try:
            try:
                with watch.tracking():
                    r = self.session.get(url, stream=True, timeout=(self.connect_timeout, self.connect_timeout * 2))
            except requests.TooManyRedirects:
                raise JudgeError(f"{url} redirects in a loop; pass --host with the server's own address") from None
            except requests.RequestException as e:
                if watch.fired:
                    raise overdue from None
                went = getattr(getattr(e, "request", None), "url", None)
                if went and went != url:  # requests followed a redirect; the failure is at its target
                    what = "nothing answered in time" if isinstance(e, requests.Timeout) else "no server answers"
                    raise JudgeError(f"{url} redirects to {went}, where {what}; pass --host with the address of "
                                     "a server that is running") from None
                raise
            with r:
                body = b"".join(self._body(r, url, watch.deadline))
            if watch.fired:  # the socket was shut mid-answer: what arrived may look whole but is not
                raise _Overdue(self._overran(url))
        except _TooBig:
            raise JudgeError(f"{url} answered with more than {self.max_reply_bytes / 2**20:g} MiB; is "
                             f"{self.host} the judge's server?") from None
        except (_Overdue, OSError, ValueError):  # OSError/ValueError: the watchdog shut the socket
            if not (watch.fired or time.monotonic() >= watch.deadline):
                raise
            raise overdue from None
        finally:
            watch.close()
        return _Answer(r.status_code, body)

    def _body(self, r: requests.Response, url: str, deadline: float):
        """The body of ``r`` in pieces as they arrive: at most ``max_reply_bytes`` of it, before ``deadline``.

        The deadline is checked between pieces as well as by the watchdog (which unblocks a read), so
        the time spent on what has already arrived counts too.
        """
        size = 0
        for piece in r.iter_content(chunk_size=64 * 1024):
            size += len(piece)
            if size > self.max_reply_bytes:
                raise _TooBig(f"the reply from {url} is larger than {self.max_reply_bytes / 2**20:g} MiB, far "
                              "more than a judgement needs; not retried (does the server ignore the reply cap, "
                              "--max-reply-tokens?)")
            if time.monotonic() >= deadline:
                raise _Overdue(self._overran(url))
            yield piece

    # --- asking ------------------------------------------------------------------------------

    def complete(self, prompt: str, schema: dict | None = None, *,
                 stop: threading.Event | None = None) -> Reply:
        """The reply to ``prompt``; retries transient failures, raises RequestFailed at the end.

        Raises Cancelled as soon as ``stop`` is set (between attempts, or by closing the socket).
        """
        last = None
        attempts = self.retry.attempts
        attempt = 0
        while True:
            if stop is not None and stop.is_set():
                raise Cancelled()
            fmt = "text"
            try:
                with self._probing(stop, schema is not None):
                    if schema is not None:  # read after waiting: the probe before may have stepped down
                        fmt = self.format
                    reply = self._ask(prompt, schema, fmt, stop)
                self._confirmed = self._confirmed or schema is not None
                return reply
            except _FormatRejected as e:
                self._step_down(fmt, e)  # not an attempt: the same question, asked differently
                continue
            except _Retryable as e:
                last = e
                attempt += 1
                if attempt >= attempts:
                    break
                log.info("attempt %d/%d failed: %s", attempt, attempts, e)
                delay = self.retry.delay(attempt)
                if stop is not None and stop.wait(delay):
                    raise Cancelled() from None
                if stop is None:
                    time.sleep(delay)
        raise RequestFailed(f"{last} (gave up after {attempts} attempts)")

    @contextmanager
    def _probing(self, stop: threading.Event | None, structured: bool):
        """Until a format has worked, let one request through at a time (the rest wait here)."""
        if self._confirmed or not structured or self._level == len(self._ladder) - 1:
            yield  # nothing left to find out (the ladder only goes down, so reading it unlocked is safe)
            return
        while not self._probe_lock.acquire(timeout=0.1):
            if stop is not None and stop.is_set():
                raise Cancelled()
        try:
            yield
        finally:
            self._probe_lock.release()

    def _step_down(self, fmt: str, why: _FormatRejected) -> None:
        with self._ladder_lock:
            if self.format != fmt:  # another worker already stepped down from it
                return
            self._level += 1
            log.warning("%s refused structured output %r (%s); using %r for the rest of the run",
                        self.host, fmt, why, self.format)

    def _ask(self, prompt: str, schema: dict | None, fmt: str,
             stop: threading.Event | None) -> Reply:  # pragma: no cover - abstract
        raise NotImplementedError

    @contextmanager
    def _post(self, payload: dict, fmt: str, stop: threading.Event | None):
        """POST ``payload`` to the chat endpoint; yields the 2xx response and its watchdog.

        Maps every failure to _Retryable / _FormatRejected / RequestFailed / Cancelled.
        """
        url = self.host + self._chat_path
        wait = max(0.001, min(self.timeout, self.request_timeout))
        # From the first byte sent: a server that trickles its headers cannot hold the request either.
        watch = _Watchdog(time.monotonic() + self.request_timeout, stop)
        try:
            try:
                with watch.tracking():
                    r = self.session.post(url, json=payload, stream=True, timeout=(self.connect_timeout, wait))
            except requests.RequestException as e:
                if watch.fired == "stop":
                    raise Cancelled() from None
                if watch.fired == "deadline" or time.monotonic() >= watch.deadline:
                    raise RequestFailed(self._overran(url)) from None
                if isinstance(e, requests.TooManyRedirects):
                    raise RequestFailed(f"{url} redirects in a loop; pass --host with the server's own "
                                        "address") from None
                if isinstance(e, requests.ConnectionError):  # before Timeout: ConnectTimeout is both
                    went = getattr(getattr(e, "request", None), "url", None)
                    where = f"{went} (where {url} redirects)" if went and went != url else url
                    raise _Retryable(f"cannot connect to {where}: {type(e).__name__}") from None
                if isinstance(e, requests.Timeout):
                    raise _Retryable(f"no reply from {url} within {self.timeout:g} s") from None
                raise RequestFailed(f"request to {url} failed: {type(e).__name__}: {e}") from None
            with r:
                try:
                    if watch.fired:  # shut while the headers came: what arrived may look whole but is not
                        raise _Retryable("cut off")
                    if not 200 <= r.status_code < 300:
                        self._raise_for_status(r, url, fmt)
                    yield r, watch
                except (OSError, ValueError, _Retryable) as e:  # requests' errors are OSErrors
                    if watch.fired == "stop":
                        raise Cancelled() from None
                    if watch.fired == "deadline":
                        raise RequestFailed(self._overran(url)) from None
                    if isinstance(e, OSError):  # e.g. a read timeout mid-reply
                        raise _Retryable(f"reply from {url} broke off: {type(e).__name__}") from None
                    raise
        finally:
            watch.close()

    def _overran(self, url: str) -> str:
        return (f"no complete reply from {url} within {self.request_timeout:g} s, the total time "
                f"allowed per request (--request-timeout); not retried")

    def _raise_for_status(self, r: requests.Response, url: str, fmt: str):
        content = bytearray()  # the error message: its first 64 KiB are plenty
        for piece in r.iter_content(chunk_size=64 * 1024):
            content += piece
            if len(content) >= 64 * 1024:
                break
        code, text = r.status_code, _error_text(bytes(content[: 64 * 1024]), r.reason)
        where = f"{r.url} (where {url} redirects)" if r.url and r.url != url else url
        what = f"HTTP {code} from {where}: {text}"
        deterministic = (400 <= code < 500 and code not in (408, 425, 429)) or (
            code >= 500 and _VALIDATION.search(text) is not None)
        if deterministic and fmt != "text" and not self._confirmed and _MENTIONS_FORMAT.search(text):
            raise _FormatRejected(what)
        if not deterministic:
            raise _Retryable(what)
        hint = ("; if the server has no structured output, pass --no-structured"
                if fmt != "text" and _MENTIONS_FORMAT.search(text) else "")
        raise RequestFailed(f"{what} (not retried: the same request would fail again{hint})")

    def preflight(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class OllamaJudge(_BaseJudge):
    """Ollama's native ``/api/chat``, streamed (NDJSON) like the book's ``query_model``."""

    api = "ollama"
    formats = ("schema", "json", "text")
    _chat_path = "/api/chat"

    def __init__(self, host: str, model: str, *, options: dict | None = None, **kw):
        super().__init__(host, model, **kw)
        self.options = dict(OLLAMA_OPTIONS if options is None else options)
        if self.max_reply_tokens and "num_predict" not in self.options:
            self.options["num_predict"] = self.max_reply_tokens

    def preflight(self) -> str:
        start = "start it with `ollama serve` (or pass --host URL)"
        try:
            r = self._get("/api/version")
        except requests.Timeout:
            raise JudgeError(f"the Ollama server at {self.host} did not answer /api/version; "
                             f"is it running? {start}") from None
        except requests.RequestException:
            raise JudgeError(f"no Ollama server answers at {self.host}; {start}") from None
        try:
            version = r.json()["version"]
        except (ValueError, KeyError, TypeError):
            raise JudgeError(f"{self.host}/api/version answered HTTP {r.status_code} without a "
                             f"version: is this an Ollama server? {start}") from None
        try:
            tags = self._get("/api/tags").json()
            names = [m.get("name") or m.get("model") for m in tags.get("models", [])]
        except (requests.RequestException, ValueError, AttributeError) as e:
            raise JudgeError(f"cannot list the models of the Ollama server at {self.host} "
                             f"(/api/tags: {e}); check the server, then rerun") from None
        if not any(_same_ollama_model(self.model, n) for n in names if isinstance(n, str)):
            have = ", ".join(n for n in names if isinstance(n, str)) or "none"
            raise JudgeError(f"model '{self.model}' is not pulled on the Ollama server at {self.host} "
                             f"(it has: {have}); pull it with `ollama pull {self.model}`")
        return str(version)

    def _ask(self, prompt: str, schema: dict | None, fmt: str, stop: threading.Event | None) -> Reply:
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
            "options": self.options,
        }
        if fmt == "schema":
            payload["format"] = schema
        elif fmt == "json":
            payload["format"] = "json"
        url = self.host + self._chat_path
        parts = []
        with self._post(payload, fmt, stop) as (r, watch):
            for line in _lines(self._body(r, url, watch.deadline)):
                if watch.fired:  # the socket is being shut; report why (below, in _post)
                    break
                if not line.strip():
                    continue
                try:
                    chunk = json.loads(line)
                except ValueError:
                    raise _Retryable(f"{url} sent a line that is not JSON") from None
                if isinstance(chunk, dict) and "error" in chunk:  # Ollama reports failures after the 200 as a last line
                    raise _Retryable(f"error from {url} mid-stream: {chunk['error']}")
                # Every chunk, the last (done) one too, carries a message: without one it is another protocol.
                message = chunk.get("message") if isinstance(chunk, dict) else None
                if not isinstance(message, dict) or not isinstance(message.get("content", ""), str):
                    raise RequestFailed(f"{url} sent a stream line that is not an Ollama chat chunk: "
                                        f"{line[:80].decode('utf-8', 'replace')!r}; is --api right?")
                parts.append(message.get("content", ""))
                if chunk.get("done"):
                    reply = Reply("".join(parts))
                    reply.truncated = chunk.get("done_reason") == "length"
                    return reply
            raise _Retryable(f"reply from {url} ended before done")


def _same_ollama_model(wanted: str, have: str) -> bool:
    """Ollama names default to the ``latest`` tag: ``llama3`` is ``llama3:latest``."""
    def norm(name: str) -> str:
        return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"
    return norm(wanted) == norm(have)


class OpenAIJudge(_BaseJudge):
    """``/v1/chat/completions`` of an OpenAI-compatible server (llama.cpp, vLLM, LM Studio, Ollama)."""

    api = "openai"
    formats = ("json_schema", "json_object", "text")
    _chat_path = "/v1/chat/completions"

    def __init__(self, host: str, model: str, *, seed: int = OLLAMA_OPTIONS["seed"],
                 temperature: float = OLLAMA_OPTIONS["temperature"], **kw):
        super().__init__(host, model, **kw)
        if self.host.endswith("/v1"):  # accept the base URL the OpenAI SDK would take
            self.host = self.host[: -len("/v1")]
        self.options = {"seed": seed, "temperature": temperature}
        if self.max_reply_tokens:
            self.options["max_tokens"] = self.max_reply_tokens

    @property
    def seed(self):
        return self.options["seed"]

    @property
    def temperature(self):
        return self.options["temperature"]

    def _headers(self) -> dict:
        key = os.environ.get("OPENAI_API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def preflight(self) -> str:
        start = ("start it (e.g. `llama-server -m MODEL.gguf`, `vllm serve MODEL`, or `ollama serve`) "
                 "or pass --host URL")
        try:
            r = self._get("/v1/models")
        except requests.RequestException:
            raise JudgeError(f"no OpenAI-compatible server answers at {self.host}; {start}") from None
        if r.status_code == 401:
            raise JudgeError(f"{self.host}/v1/models needs an API key: set OPENAI_API_KEY")
        try:
            ids = [m["id"] for m in r.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise JudgeError(f"{self.host}/v1/models answered HTTP {r.status_code} without a model "
                             f"list: is this an OpenAI-compatible server? {start}") from None
        if self.model not in ids and not any(_same_ollama_model(self.model, str(i)) for i in ids):
            raise JudgeError(f"model '{self.model}' is not served by {self.host} (it serves: "
                             f"{', '.join(map(str, ids)) or 'none'}); load it on the server or pass --model NAME")
        return "openai-compatible"

    def _ask(self, prompt: str, schema: dict | None, fmt: str, stop: threading.Event | None) -> Reply:
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            **self.options,
            "stream": False,
        }
        if fmt == "json_schema":
            strict = dict(schema, additionalProperties=False)
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "judgement", "schema": strict, "strict": True},
            }
        elif fmt == "json_object":  # llama-cpp-python turns the schema into a grammar
            payload["response_format"] = {"type": "json_object", "schema": schema}
        url = self.host + self._chat_path
        with self._post(payload, fmt, stop) as (r, watch):
            # read under the watchdog and the size cap: a body that trickles or never ends cannot hold us
            body = b"".join(self._body(r, url, watch.deadline))
            try:
                data = json.loads(body)
            except ValueError:  # cut off (retried), unless the watchdog cut it
                raise _Retryable(f"{url} sent a reply that is not JSON") from None
        try:
            choice = data["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RequestFailed(f"{url} sent a reply without choices[0].message.content: "
                                f"{body[:80].decode('utf-8', 'replace')!r}; is --api right?") from None
        if content is not None and not isinstance(content, str):
            raise RequestFailed(f"{url} sent a reply whose content is a {type(content).__name__}, "
                                f"not text")
        reply = Reply(content or "")
        reply.truncated = choice.get("finish_reason") == "length"
        return reply


def make_judge(api: str, host: str, model: str, **kw) -> _BaseJudge:
    if api == "ollama":
        return OllamaJudge(host, model, **kw)
    if api == "openai":
        return OpenAIJudge(host, model, **kw)
    raise ValueError(f"unknown --api {api!r}; use ollama or openai")
