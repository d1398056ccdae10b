"""Asking a model server many questions: resumably, in parallel, and with the options every command shares.

The judge (``eval.judge``) and the data tools (``datatools``) are the same kind of work: a list of
questions, each answered once by a server through ``core.llm_client``. What they share lives here:

- ``ServerOptions``: the command-line options for the server and the run (``--host``, ``--api``,
  ``--workers``, ``--timeout``, ``--request-timeout``, ``--retries``, ``--limit``, ``--out``, ...),
  declared once; ``connect`` turns them into a client that has passed its preflight.
- ``AnswerCache``: every answer appended to a JSONL file as it arrives (``core.files.JsonlFile``: one
  synced line on an ``O_APPEND`` descriptor, a torn last line cut off on the next read), keyed by
  ``cache_key`` over everything that decides the answer, so a killed run, rerun with the same
  command, asks only what is still missing.
- ``ask_all``: the worker threads, the progress bar, retries of unparsable replies, and the first
  Ctrl-C (or SIGTERM, with ``core.process.terminate_as_interrupt``) stopping everything at once.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from tqdm.auto import tqdm

from gpt2_scratch.core.args import arg
from gpt2_scratch.core.errors import InputError
from gpt2_scratch.core.files import JsonlFile
from gpt2_scratch.core.files import content_key as cache_key
from gpt2_scratch.core.llm_client import make_client
from gpt2_scratch.core.llm_http import MAX_REPLY_TOKENS, REQUEST_TIMEOUT, BaseClient, Cancelled, RequestFailed, ServerInputError
from gpt2_scratch.core.retry import RetryPolicy

__all__ = ["AnswerCache", "Question", "ServerOptions", "ask_all", "cache_key", "connect"]

log = logging.getLogger(__name__)


@dataclass
class ServerOptions:
    """the model server and the run"""

    host: str | None = arg(None, "server URL (default: $OLLAMA_HOST or http://localhost:11434); with --api openai "
                                 "any OpenAI-compatible base URL, e.g. http://localhost:8080 for llama-server")
    api: Literal["ollama", "openai"] = arg("ollama", "ollama: Ollama's native API; openai: an OpenAI-compatible "
                                                     "server (llama.cpp, vLLM, LM Studio)")
    workers: int = arg(4, "concurrent requests", at_least=1)
    timeout: float = arg(120.0, "seconds to wait for a reply to start, and between two pieces of it", above=0)
    request_timeout: float = arg(REQUEST_TIMEOUT, "seconds one request may take in all; a reply still unfinished "
                                                  "then fails", above=0)
    max_reply_tokens: int = arg(MAX_REPLY_TOKENS, "cap on each reply (Ollama num_predict, OpenAI max_tokens); "
                                                  "0 = no cap", at_least=0)
    retries: int = arg(4, "retries on connection errors, timeouts and 5xx", at_least=0)
    retry_backoff: float = arg(1.0, "seconds before the first retry; doubles each retry", at_least=0)
    parse_retries: int = arg(2, "times to ask again after a reply that cannot be used (unparsable, empty) before its "
                                "record fails", at_least=0)
    limit: int | None = arg(None, "only the first N records", at_least=0)
    out: str | None = arg(None, "output file")
    cache: str | None = arg(None, "JSONL answer cache that makes a rerun resume (default: OUT with .cache.jsonl)")
    no_cache: bool = arg(False, "neither read nor write the cache", action="store_true")
    overwrite: bool = arg(False, "replace an existing --out file that is not an earlier output of this command")
    quiet: bool = arg(False, "no progress bar", aliases=("-q",))
    verbose: bool = arg(False, "log each retry", aliases=("-v",))


def connect(opts: ServerOptions, model: str, *, structured: bool = True, **kw) -> tuple[BaseClient, str]:
    """A client for ``model`` on the server ``opts`` names, after its preflight; returns (client, server version).

    A bad host is an InputError naming where it came from (exit 2); a server that is down or lacks the
    model is a ServerError with the fix (exit 1). Either happens before any output is written.
    """
    host = opts.host or os.environ.get("OLLAMA_HOST") or "http://localhost:11434"
    try:
        client = make_client(opts.api, host, model, timeout=opts.timeout, request_timeout=opts.request_timeout,
                             max_reply_tokens=opts.max_reply_tokens, structured=structured,
                             retry=RetryPolicy(attempts=opts.retries + 1, backoff=opts.retry_backoff), **kw)
    except ServerInputError as e:
        source = "--host" if opts.host else "$OLLAMA_HOST" if os.environ.get("OLLAMA_HOST") else "host"
        raise InputError(f"{source}: {e}") from None
    return client, client.preflight()


class AnswerCache:
    """Append-only JSONL store of answers, each a dict with at least a ``key``."""

    def __init__(self, path: str | os.PathLike):
        self.file = JsonlFile(path)

    @property
    def path(self) -> Path:
        return self.file.path

    def load(self) -> dict[str, dict]:
        """Every complete entry by key (later lines win); a missing file is an empty cache."""
        return {entry["key"]: entry for entry in self.file.read() if isinstance(entry.get("key"), str)}

    def append(self, entry: dict) -> None:
        """Durably append one entry as one line (thread-safe)."""
        self.file.append(entry)


# --------------------------------------------------------------------------- asking


@dataclass
class Question:
    """One request to ask the server, and how to read and keep its answer."""

    key: str  # cache key: everything that determines the answer
    prompt: str
    schema: dict | None  # structured output to ask for (None: plain text)
    parse: Callable[[str], object]  # reply text -> value, or None if unparsable
    index: int  # first record asking it (for the cache's readability only)
    valid: Callable[[object], bool] = lambda value: value is not None  # can a cached value be used?
    options: dict | None = None  # per-request options (seed, temperature, stop), see BaseClient.complete
    raw: bool = False  # a raw continuation of the prompt, not a chat turn


def _cached_answers(questions: list[Question], cache: AnswerCache | None) -> dict[str, dict]:
    """Answers the cache holds for ``questions``; entries with an impossible value are skipped."""
    known = cache.load() if cache is not None else {}
    answers, bad, seen = {}, [], set()
    for q in questions:
        hit = known.get(q.key)
        if hit is None or q.key in seen or hit.get("value") is None:
            continue
        seen.add(q.key)
        if q.valid(hit["value"]):
            answers[q.key] = {"value": hit["value"], "reply": hit.get("reply"), "reason": None, "cached": True}
        else:
            bad.append(f"record {q.index}: {hit['value']!r}")
    if bad:
        log.warning("%s: ignoring %d cache entr%s with an impossible value (%s); asking again",
                    cache.path, len(bad), "y" if len(bad) == 1 else "ies",
                    ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else ""))
    return answers


def ask_all(questions: list[Question], client, *, cache: AnswerCache | None = None, workers: int = 4,
            parse_retries: int = 2, progress: bool = True, desc: str = "Scoring entries",
            identity: dict | None = None) -> dict[str, dict]:
    """Answer each distinct question once, from the cache or the server; returns {key: answer}.

    ``identity`` (what besides the prompt decides the answer: model, API, options) is written into
    each cache entry, for a reader of the cache.

    An answer is ``{"value", "reply", "reason", "cached"}``; ``value`` is None when the question
    failed, and ``reason`` says why (transport error after retries, or an unparsable reply).

    The workers are daemon threads fed from a queue. On any exception in the caller's thread
    (Ctrl-C) a stop event is set: workers take no new question, abandon the request in flight
    (the client shuts its socket) and write nothing more; none of them is joined, so a worker
    stuck in a read cannot keep the process alive. Answers already written stay in the cache.
    """
    answers = _cached_answers(questions, cache)
    todo: dict[str, Question] = {}  # identical records share one question
    for q in questions:
        if q.key not in answers:
            todo.setdefault(q.key, q)
    if not todo:
        return answers
    stop = threading.Event()

    def work(q: Question) -> dict:
        reply, seen = None, []
        for attempt in range(parse_retries + 1):
            try:
                reply = client.complete(q.prompt, q.schema, stop=stop, options=q.options, raw=q.raw)
            except RequestFailed as e:
                return {"value": None, "reply": None, "reason": str(e), "cached": False}
            value = q.parse(reply)
            if value is not None:
                if cache is not None and not stop.is_set():
                    cache.append({"key": q.key, "value": value, "reply": reply, "index": q.index,
                                  **(identity or {}), "format": client.format,
                                  "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
                return {"value": value, "reply": reply, "reason": None, "cached": False}
            seen.append(reply)
            if reply in seen[:-1]:  # seed 123, temperature 0: the server repeats itself; stop asking
                break
            log.info("record %d: unparsable reply %r; asking again", q.index, reply[:100])
        why = f"unparsable reply after {len(seen)} attempts"
        if len(seen) < parse_retries + 1:
            why += " (the same reply each time)"
        if getattr(reply, "truncated", False):
            why += (f"; the reply was cut at {client.max_reply_tokens} tokens: raise --max-reply-tokens "
                    f"if replies need more")
        return {"value": None, "reply": reply, "cached": False, "reason": why}

    answers.update(_in_parallel(list(todo.values()), work, stop, workers=workers, progress=progress, desc=desc))
    return answers


def _in_parallel(questions: list[Question], work: Callable[[Question], dict], stop: threading.Event, *,
                 workers: int, progress: bool, desc: str) -> dict[str, dict]:
    """``work(q)`` for every question on up to ``workers`` daemon threads, with a progress bar; {key: answer}.

    Sets ``stop`` when it returns or raises (Ctrl-C), which stops the workers (see ``ask_all``).
    """
    answers: dict[str, dict] = {}
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    results: queue.SimpleQueue = queue.SimpleQueue()
    for q in questions:
        jobs.put(q)

    def worker() -> None:
        while not stop.is_set():
            try:
                q = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((q, work(q)))
            except Cancelled:
                return
            except BaseException as e:  # a bug: hand it to the caller's thread
                results.put((q, e))
                return

    for n in range(min(max(1, workers), len(questions))):
        threading.Thread(target=worker, name=f"llm-worker-{n}", daemon=True).start()
    try:
        with tqdm(total=len(questions), desc=desc, disable=not progress) as bar:
            for _ in range(len(questions)):
                while True:
                    try:
                        q, result = results.get(timeout=0.5)  # a timeout keeps Ctrl-C responsive
                        break
                    except queue.Empty:
                        continue
                if isinstance(result, BaseException):
                    raise result
                answers[q.key] = result
                bar.update()
    finally:
        stop.set()  # normally every worker has already returned; after Ctrl-C this stops them
    return answers
