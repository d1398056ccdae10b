"""Ollama's native API and OpenAI-compatible servers (llama.cpp, vLLM, LM Studio), on ``core.llm_http``.

Each speaks two kinds of request: a chat turn (Ollama ``/api/chat``, OpenAI ``/v1/chat/completions``),
which the judge and ``data prefs`` use, and a raw continuation of a prompt with no template applied
(Ollama ``/api/generate`` with ``"raw": true``, OpenAI ``/v1/completions``), which Magpie-style
``data generate`` needs to hand the model the bare start of a user turn.
"""

from __future__ import annotations

import json
import os
import threading

import requests

from gpt2_scratch.core.http_watch import _lines
from gpt2_scratch.core.llm_http import (
    BOOK_OPTIONS,
    BaseClient,
    Reply,
    RequestFailed,
    ServerError,
    _Retryable,
)


class OllamaClient(BaseClient):
    """Ollama's native ``/api/chat`` (and ``/api/generate`` for raw prompts), streamed (NDJSON) like the book's
    ``query_model``."""

    api = "ollama"
    formats = ("schema", "json", "text")
    _chat_path = "/api/chat"

    def __init__(self, host: str, model: str, *, options: dict | None = None, **kw):
        super().__init__(host, model, **kw)
        self.options = dict(BOOK_OPTIONS if options is None else options)
        if self.max_reply_tokens and "num_predict" not in self.options:
            self.options["num_predict"] = self.max_reply_tokens

    def preflight(self) -> str:
        start = "start it with `ollama serve` (or pass --host URL)"
        try:
            r = self._get("/api/version")
        except requests.Timeout:
            raise ServerError(f"the Ollama server at {self.host} did not answer /api/version; "
                             f"is it running? {start}") from None
        except requests.RequestException:
            raise ServerError(f"no Ollama server answers at {self.host}; {start}") from None
        try:
            version = r.json()["version"]
        except (ValueError, KeyError, TypeError):
            raise ServerError(f"{self.host}/api/version answered HTTP {r.status_code} without a "
                             f"version: is this an Ollama server? {start}") from None
        try:
            tags = self._get("/api/tags").json()
            names = [m.get("name") or m.get("model") for m in tags.get("models", [])]
        except (requests.RequestException, ValueError, AttributeError) as e:
            raise ServerError(f"cannot list the models of the Ollama server at {self.host} "
                             f"(/api/tags: {e}); check the server, then rerun") from None
        if not any(_same_ollama_model(self.model, n) for n in names if isinstance(n, str)):
            have = ", ".join(n for n in names if isinstance(n, str)) or "none"
            raise ServerError(f"model '{self.model}' is not pulled on the Ollama server at {self.host} "
                             f"(it has: {have}); pull it with `ollama pull {self.model}`")
        return str(version)

    def _ask(self, prompt: str, schema: dict | None, fmt: str, stop: threading.Event | None, options: dict,
             raw: bool) -> Reply:
        payload = {"model": self.model, "stream": True, "options": {**self.options, **options}}
        if raw:  # the prompt as it is: no template, no system prompt, no context from earlier calls
            path, field = "/api/generate", "response"
            payload.update(prompt=prompt, raw=True)
        else:
            path, field = self._chat_path, "message"
            payload["messages"] = [{"role": "user", "content": prompt}]
        if fmt == "schema":
            payload["format"] = schema
        elif fmt == "json":
            payload["format"] = "json"
        url = self.host + path
        parts = []
        with self._post(path, payload, fmt, stop) as (r, watch):
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
                # Every chunk, the last (done) one too, carries the text field: without one it is another protocol.
                text = _chunk_text(chunk, field)
                if text is None:
                    raise RequestFailed(f"{url} sent a stream line that is not an Ollama {'generate' if raw else 'chat'} "
                                        f"chunk: {line[:80].decode('utf-8', 'replace')!r}; is --api right?")
                parts.append(text)
                if chunk.get("done"):
                    reply = Reply("".join(parts))
                    reply.truncated = chunk.get("done_reason") == "length"
                    return reply
            raise _Retryable(f"reply from {url} ended before done")


def _chunk_text(chunk, field: str) -> str | None:
    """The text of one Ollama stream chunk: ``message.content`` (chat) or ``response`` (generate); None if the
    chunk has no such field."""
    if not isinstance(chunk, dict):
        return None
    if field == "message":
        message = chunk.get("message")
        text = message.get("content", "") if isinstance(message, dict) else None
    else:
        text = chunk.get(field)
    return text if isinstance(text, str) else None


def _same_ollama_model(wanted: str, have: str) -> bool:
    """Ollama names default to the ``latest`` tag: ``llama3`` is ``llama3:latest``."""
    def norm(name: str) -> str:
        return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"
    return norm(wanted) == norm(have)


class OpenAIClient(BaseClient):
    """``/v1/chat/completions`` (and ``/v1/completions`` for raw prompts) of an OpenAI-compatible server
    (llama.cpp, vLLM, LM Studio, Ollama)."""

    api = "openai"
    formats = ("json_schema", "json_object", "text")
    _chat_path = "/v1/chat/completions"

    def __init__(self, host: str, model: str, *, seed: int = BOOK_OPTIONS["seed"],
                 temperature: float = BOOK_OPTIONS["temperature"], **kw):
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
            raise ServerError(f"no OpenAI-compatible server answers at {self.host}; {start}") from None
        if r.status_code == 401:
            raise ServerError(f"{self.host}/v1/models needs an API key: set OPENAI_API_KEY")
        try:
            ids = [m["id"] for m in r.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise ServerError(f"{self.host}/v1/models answered HTTP {r.status_code} without a model "
                             f"list: is this an OpenAI-compatible server? {start}") from None
        if self.model not in ids and not any(_same_ollama_model(self.model, str(i)) for i in ids):
            raise ServerError(f"model '{self.model}' is not served by {self.host} (it serves: "
                             f"{', '.join(map(str, ids)) or 'none'}); load it on the server or pass --model NAME")
        return "openai-compatible"

    def _ask(self, prompt: str, schema: dict | None, fmt: str, stop: threading.Event | None, options: dict,
             raw: bool) -> Reply:
        payload = {"model": self.model, **self.options, **options, "stream": False}
        if raw:  # a plain completion of the prompt, no chat template
            path, what = "/v1/completions", "choices[0].text"
            payload["prompt"] = prompt
        else:
            path, what = self._chat_path, "choices[0].message.content"
            payload["messages"] = [{"role": "user", "content": prompt}]
        if fmt == "json_schema":
            strict = dict(schema, additionalProperties=False)
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "judgement", "schema": strict, "strict": True},
            }
        elif fmt == "json_object":  # llama-cpp-python turns the schema into a grammar
            payload["response_format"] = {"type": "json_object", "schema": schema}
        url = self.host + path
        with self._post(path, payload, fmt, stop) as (r, watch):
            # read under the watchdog and the size cap: a body that trickles or never ends cannot hold us
            body = b"".join(self._body(r, url, watch.deadline))
            try:
                data = json.loads(body)
            except ValueError:  # cut off (retried), unless the watchdog cut it
                raise _Retryable(f"{url} sent a reply that is not JSON") from None
        try:
            choice = data["choices"][0]
            content = choice["text"] if raw else choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RequestFailed(f"{url} sent a reply without {what}: "
                                f"{body[:80].decode('utf-8', 'replace')!r}; is --api right?") from None
        if content is not None and not isinstance(content, str):
            raise RequestFailed(f"{url} sent a reply whose content is a {type(content).__name__}, "
                                f"not text")
        reply = Reply(content or "")
        reply.truncated = choice.get("finish_reason") == "length"
        return reply


def make_client(api: str, host: str, model: str, **kw) -> BaseClient:
    if api == "ollama":
        return OllamaClient(host, model, **kw)
    if api == "openai":
        return OpenAIClient(host, model, **kw)
    raise ValueError(f"unknown --api {api!r}; use ollama or openai")
