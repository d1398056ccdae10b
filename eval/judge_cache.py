"""The judge's resumable cache: one JSON line per answered question, appended as it arrives.

A run killed at any moment loses at most the answers still in flight: every answer is written as
one complete line with a single ``write`` on an ``O_APPEND`` descriptor and then ``fsync``-ed,
under a lock shared by the worker threads. On load, a torn last line (no trailing newline, or
not valid JSON) is ignored and cut off so the next append starts on a clean line; every earlier
line is kept.

Entries are keyed by :func:`cache_key` over everything that determines the judge's answer (the
record's fields, the response(s), the judge model, the API, the prompt version and the options),
so a changed record, response, model or prompt is asked again and an unchanged one never is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def cache_key(fields: dict) -> str:
    """A stable hex digest of ``fields`` (a JSON-serialisable dict; key order does not matter)."""
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class JudgeCache:
    """Append-only JSONL store of judge answers, each a dict with at least a ``key``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict]:
        """Read every complete entry (later lines win); repair a torn tail. Missing file → {}."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        entries: dict[str, dict] = {}
        end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        if end < len(data):
            log.warning("%s: ignoring a torn last line (%d bytes) left by an interrupted run",
                        self.path, len(data) - end)
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for lineno, raw in enumerate(data[:end].splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
                entries[entry["key"]] = entry
            except (ValueError, KeyError, TypeError):
                log.warning("%s:%d: skipping an unreadable cache line", self.path, lineno)
        return entries

    def append(self, entry: dict) -> None:
        """Durably append one entry as one line (thread-safe)."""
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(line)
                while view:  # os.write may write less than asked; finish the line
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
