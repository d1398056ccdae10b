"""The transport every request to a model server goes through (the judge's, ``gpt2-scratch data``'s).

``BaseClient`` holds what does not depend on the protocol; ``core.llm_client`` adds Ollama's native
API and OpenAI-compatible servers on top. Each client has two calls:

- ``preflight()`` checks, before any request, that the server answers and serves the model, and
  raises :class:`ServerError` with a one-line fix (``ollama serve``, ``ollama pull llama3``).
- ``complete(prompt, schema, stop=event, options=..., raw=...)`` returns the reply text (a
  :class:`Reply`): a chat turn, or with ``raw`` a plain continuation of ``prompt`` (no template).

What real servers need, and how it is handled here:

- Replies are capped (``max_reply_tokens``: Ollama ``num_predict``, OpenAI ``max_tokens``): an
  uncapped chatty model writes up to its whole context.
- Structured output goes down a ladder when a server refuses it: a JSON schema, then plain JSON
  (OpenAI ``json_object`` with the schema, which llama-cpp-python accepts; Ollama ``"json"``), then
  plain text. Until one format has worked, requests go one at a time, so each refusal happens once;
  the format that worked is kept for the rest of the run (``client.format``).
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
import re
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlsplit

import requests
import urllib3

from gpt2_scratch.core.errors import Failure, InputError
from gpt2_scratch.core.http_watch import _tracking, _Watchdog
from gpt2_scratch.core.retry import RetryPolicy

log = logging.getLogger(__name__)

# A score or a verdict is a handful of tokens; 64 leaves room for a short sentence around it.
MAX_REPLY_TOKENS = 64
REQUEST_TIMEOUT = 300.0
# The most bytes one reply may hold. A score is a few tokens; Ollama streams ~150 bytes of NDJSON per
# token, so even an uncapped reply of a few thousand tokens fits with room to spare.
MAX_REPLY_BYTES = 4 * 1024 * 1024


class ServerError(Failure):
    """A problem that stops the whole run (server down, model missing); the message is one line (exit 1)."""


# The book's request options (chapter 7): seed 123 and temperature 0 for repeatable replies, a 2048-token
# context (Ollama's default is smaller and would silently truncate long records).
BOOK_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}


class ServerInputError(InputError):
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
    """The reply text; ``truncated`` is True when the server stopped it at the token cap."""

    truncated: bool = False


class _Answer:
    """A preflight GET's status and body, read whole (see ``BaseClient._get``)."""

    def __init__(self, status_code: int, content: bytes):
        self.status_code, self.content = status_code, content

    def json(self):
        return json.loads(self.content)


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


class BaseClient:
    """One model on one server: the transport, retries and structured-output ladder of every API."""

    api = "base"
    formats: tuple[str, ...] = ("text",)  # the structured-output ladder, best first; "text" = none

    def __init__(self, host: str, model: str, *, timeout: float = 120.0, connect_timeout: float = 5.0,
                 request_timeout: float = REQUEST_TIMEOUT, max_reply_tokens: int | None = MAX_REPLY_TOKENS,
                 retry: RetryPolicy | None = None, structured: bool = True,
                 max_reply_bytes: int = MAX_REPLY_BYTES):
        try:
            self.host = normalize_host(host)
        except ValueError as e:
            raise ServerInputError(f"invalid host URL {host!r}: {e}; pass one like "
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
        ``min(request_timeout, 30 s)`` is a ServerError.
        """
        url = self.host + path
        allowed = min(self.request_timeout, 30.0)
        watch = _Watchdog(time.monotonic() + allowed, None)  # from the first byte sent: headers may trickle
        overdue = ServerError(f"{url} did not finish its answer within {allowed:g} s; is {self.host} the model "
                             "server you meant, and is it working?")
        try:
            try:
                with watch.tracking():
                    r = self.session.get(url, stream=True, timeout=(self.connect_timeout, self.connect_timeout * 2))
            except requests.TooManyRedirects:
                raise ServerError(f"{url} redirects in a loop; pass --host with the server's own address") from None
            except requests.RequestException as e:
                if watch.fired:
                    raise overdue from None
                went = getattr(getattr(e, "request", None), "url", None)
                if went and went != url:  # requests followed a redirect; the failure is at its target
                    what = "nothing answered in time" if isinstance(e, requests.Timeout) else "no server answers"
                    raise ServerError(f"{url} redirects to {went}, where {what}; pass --host with the address of "
                                     "a server that is running") from None
                raise
            with r:
                body = b"".join(self._body(r, url, watch.deadline))
            if watch.fired:  # the socket was shut mid-answer: what arrived may look whole but is not
                raise _Overdue(self._overran(url))
        except _TooBig:
            raise ServerError(f"{url} answered with more than {self.max_reply_bytes / 2**20:g} MiB; is "
                             f"{self.host} a model server?") from None
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
                              "more than a reply needs; not retried (does the server ignore the reply cap, "
                              "--max-reply-tokens?)")
            if time.monotonic() >= deadline:
                raise _Overdue(self._overran(url))
            yield piece

    # --- asking ------------------------------------------------------------------------------

    def complete(self, prompt: str, schema: dict | None = None, *, stop: threading.Event | None = None,
                 options: dict | None = None, raw: bool = False) -> Reply:
        """The reply to ``prompt``; retries transient failures, raises RequestFailed at the end.

        ``options`` override the client's request options for this request (``seed``, ``temperature``,
        ``stop``: the same names in both APIs). ``raw``: continue ``prompt`` as it is, without the chat
        template (Ollama ``/api/generate`` with ``raw``, OpenAI ``/v1/completions``). Raises Cancelled as
        soon as ``stop`` is set (between attempts, or by closing the socket).
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
                    reply = self._ask(prompt, schema, fmt, stop, dict(options or {}), raw)
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

    def _ask(self, prompt: str, schema: dict | None, fmt: str, stop: threading.Event | None, options: dict,
             raw: bool) -> Reply:  # pragma: no cover - abstract
        raise NotImplementedError

    @contextmanager
    def _post(self, path: str, payload: dict, fmt: str, stop: threading.Event | None):
        """POST ``payload`` to ``path``; yields the 2xx response and its watchdog.

        Maps every failure to _Retryable / _FormatRejected / RequestFailed / Cancelled.
        """
        url = self.host + path
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


