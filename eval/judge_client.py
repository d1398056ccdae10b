"""HTTP clients for the judge model: Ollama's native API and OpenAI-compatible servers.

Both expose the same two calls:

- ``preflight()`` checks, before any scoring, that the server answers and serves the model, and
  raises :class:`JudgeError` with a one-line fix (``ollama serve``, ``ollama pull llama3``).
- ``complete(prompt, schema)`` returns the judge's reply text, retrying with exponential backoff
  on connection errors, timeouts, HTTP 429/5xx and an ``{"error": ...}`` line mid-stream; after
  the last retry, or on an error retrying cannot fix (other 4xx), it raises :class:`RequestFailed`
  whose message is the reason recorded for that record.

Requests go through ``requests`` with one ``Session`` per worker thread (a Session is not
thread-safe). If the server rejects the structured-output field (old Ollama, some OpenAI-compatible
servers), the client drops it for the rest of the run and the prompt's "integer number only"
instruction plus ``parse_score`` carry on.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass

import requests

from core.errors import Failure
from eval.judge_prompts import OLLAMA_OPTIONS

log = logging.getLogger(__name__)


class JudgeError(Failure):
    """A problem that stops the whole run (server down, model missing); the message is one line (exit 1)."""


class RequestFailed(Exception):
    """One question could not be answered; the message is the reason reported for its record."""


class _Retryable(Exception):
    """A transient failure worth asking again (connection, timeout, 429/5xx, mid-stream error)."""


class _SchemaRejected(Exception):
    """The server refused the structured-output field; ask again without it."""


@dataclass
class RetryPolicy:
    retries: int = 4  # extra attempts after the first one
    backoff: float = 1.0  # seconds before the first retry; doubles each time (with jitter)
    max_backoff: float = 30.0

    def delay(self, attempt: int) -> float:
        base = min(self.max_backoff, self.backoff * (2 ** attempt))
        return base * (0.5 + random.random() / 2)  # jitter so workers don't retry in lockstep


def normalize_host(host: str) -> str:
    """``localhost:11434`` → ``http://localhost:11434`` (Ollama accepts OLLAMA_HOST without a scheme)."""
    host = host.strip().rstrip("/")
    if "://" not in host:
        host = "http://" + host
    return host


def _error_text(r: requests.Response) -> str:
    """The server's error message from an Ollama ``{"error": "..."}`` or OpenAI ``{"error": {...}}`` body."""
    try:
        err = r.json().get("error", r.text)
    except ValueError:
        err = r.text
    if isinstance(err, dict):
        err = err.get("message", json.dumps(err))
    return " ".join(str(err).split())[:300] or r.reason


class _BaseJudge:
    api = "base"

    def __init__(self, host: str, model: str, *, timeout: float = 120.0, connect_timeout: float = 5.0,
                 retry: RetryPolicy | None = None, structured: bool = True):
        self.host = normalize_host(host)
        self.model = model
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retry = retry or RetryPolicy()
        self.structured = structured
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
            self._local.session.headers.update(self._headers())
        return self._local.session

    def _headers(self) -> dict:
        return {}

    def _get(self, path: str) -> requests.Response:
        return self.session.get(self.host + path, timeout=(self.connect_timeout, self.connect_timeout * 2))

    def complete(self, prompt: str, schema: dict | None = None) -> str:
        """The reply to ``prompt``; retries transient failures, raises RequestFailed at the end."""
        last = None
        for attempt in range(self.retry.retries + 1):
            if attempt:
                time.sleep(self.retry.delay(attempt - 1))
            try:
                return self._ask(prompt, schema if self.structured else None)
            except _SchemaRejected as e:
                log.warning("%s rejected the structured-output request (%s); continuing without it",
                            self.host, e)
                self.structured = False
                try:
                    return self._ask(prompt, None)
                except _Retryable as e2:
                    last = e2
            except _Retryable as e:
                last = e
                log.info("attempt %d/%d failed: %s", attempt + 1, self.retry.retries + 1, e)
        raise RequestFailed(f"{last} (gave up after {self.retry.retries + 1} attempts)")

    def _post(self, path: str, payload: dict, *, stream: bool) -> requests.Response:
        try:
            r = self.session.post(self.host + path, json=payload, stream=stream,
                                  timeout=(self.connect_timeout, self.timeout))
        except requests.Timeout:
            raise _Retryable(f"no reply from {self.host}{path} within {self.timeout:g} s") from None
        except requests.ConnectionError as e:
            raise _Retryable(f"cannot connect to {self.host}{path}: {type(e).__name__}") from None
        if r.status_code == 429 or r.status_code >= 500:
            raise _Retryable(f"HTTP {r.status_code} from {self.host}{path}: {_error_text(r)}")
        if r.status_code == 400 and payload.get(self._schema_field) is not None:
            raise _SchemaRejected(_error_text(r))
        if r.status_code != 200:
            raise RequestFailed(f"HTTP {r.status_code} from {self.host}{path}: {_error_text(r)}")
        return r

    _schema_field = ""

    def _ask(self, prompt: str, schema: dict | None) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def preflight(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class OllamaJudge(_BaseJudge):
    """Ollama's native ``/api/chat``, streamed (NDJSON) like the book's ``query_model``."""

    api = "ollama"
    _schema_field = "format"

    def __init__(self, host: str, model: str, *, options: dict | None = None, **kw):
        super().__init__(host, model, **kw)
        self.options = dict(OLLAMA_OPTIONS if options is None else options)

    def preflight(self) -> str:
        start = "start it with `ollama serve` (or pass --host URL)"
        try:
            r = self._get("/api/version")
        except requests.Timeout:
            raise JudgeError(f"the Ollama server at {self.host} did not answer /api/version; "
                             f"is it running? {start}") from None
        except requests.ConnectionError:
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
        if not any(_same_ollama_model(self.model, n) for n in names if n):
            have = ", ".join(n for n in names if n) or "none"
            raise JudgeError(f"model '{self.model}' is not pulled on the Ollama server at {self.host} "
                             f"(it has: {have}); pull it with `ollama pull {self.model}`")
        return str(version)

    def _ask(self, prompt: str, schema: dict | None) -> str:
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
            "options": self.options,
        }
        if schema is not None:
            payload["format"] = schema
        r = self._post("/api/chat", payload, stream=True)
        parts = []
        try:
            with r:
                for line in r.iter_lines():
                    if not line.strip():
                        continue
                    chunk = json.loads(line)
                    if "error" in chunk:  # Ollama reports failures after the 200 as a last line
                        raise _Retryable(f"error from {self.host}/api/chat mid-stream: {chunk['error']}")
                    parts.append(chunk.get("message", {}).get("content", ""))
                    if chunk.get("done"):
                        return "".join(parts)
        except requests.RequestException as e:  # a read timeout mid-stream surfaces here
            raise _Retryable(f"reply from {self.host}/api/chat broke off: {type(e).__name__}") from None
        except ValueError:
            raise _Retryable(f"{self.host}/api/chat sent a line that is not JSON") from None
        raise _Retryable(f"reply from {self.host}/api/chat ended before done")


def _same_ollama_model(wanted: str, have: str) -> bool:
    """Ollama names default to the ``latest`` tag: ``llama3`` is ``llama3:latest``."""
    def norm(name: str) -> str:
        return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"
    return norm(wanted) == norm(have)


class OpenAIJudge(_BaseJudge):
    """``/v1/chat/completions`` of an OpenAI-compatible server (llama.cpp, vLLM, LM Studio, Ollama)."""

    api = "openai"
    _schema_field = "response_format"

    def __init__(self, host: str, model: str, *, seed: int = OLLAMA_OPTIONS["seed"],
                 temperature: float = OLLAMA_OPTIONS["temperature"], **kw):
        super().__init__(host, model, **kw)
        if self.host.endswith("/v1"):  # accept the base URL the OpenAI SDK would take
            self.host = self.host[: -len("/v1")]
        self.seed = seed
        self.temperature = temperature

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
        if self.model not in ids and not any(_same_ollama_model(self.model, i) for i in ids):
            raise JudgeError(f"model '{self.model}' is not served by {self.host} (it serves: "
                             f"{', '.join(ids) or 'none'}); load it on the server or pass --model NAME")
        return "openai-compatible"

    def _ask(self, prompt: str, schema: dict | None) -> str:
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "seed": self.seed,
            "stream": False,
        }
        if schema is not None:
            strict = dict(schema, additionalProperties=False)
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "judgement", "schema": strict, "strict": True},
            }
        r = self._post("/v1/chat/completions", payload, stream=False)
        try:
            return r.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable(f"{self.host}/v1/chat/completions sent a reply without choices") from None


def make_judge(api: str, host: str, model: str, **kw) -> _BaseJudge:
    if api == "ollama":
        return OllamaJudge(host, model, **kw)
    if api == "openai":
        return OpenAIJudge(host, model, **kw)
    raise ValueError(f"unknown --api {api!r}; use ollama or openai")
