"""Atomic file writes: write a temp file in the target's directory, fsync, then ``os.replace``.

A reader (or a rerun after a crash) sees either the old file or the complete new one, never half.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj, *, indent: int | None = 4) -> Path:
    # indent=4 matches the book's instruction-data-with-response.json
    return write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
