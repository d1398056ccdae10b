"""The judge's resumable cache: one JSON line per answered question, appended as it arrives.

A run killed at any moment loses at most the answers still in flight: the cache is a
``core.files.JsonlFile`` (each answer one synced line on an ``O_APPEND`` descriptor, shared by the
worker threads; a torn last line is cut off on the next read).

Entries are keyed by ``cache_key`` over everything that determines the judge's answer (the record's
fields, the response(s), the judge model, the API, the prompt version and the options), so a changed
record, response, model or prompt is asked again and an unchanged one never is. What a cached value
may be (a 0..100 integer, a verdict) is checked where it is used (``eval.judge``).
"""

from __future__ import annotations

import os
from pathlib import Path

from gpt2_scratch.core.files import JsonlFile
from gpt2_scratch.core.files import content_key as cache_key

__all__ = ["JudgeCache", "cache_key"]


class JudgeCache:
    """Append-only JSONL store of judge answers, each a dict with at least a ``key``."""

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
