"""What the data commands share beyond the server client (``core.llm_work``): output checks and endings."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from gpt2_scratch.core.errors import EXIT_INTERRUPTED, Failure, InputError, Terminated


def check_new_output(path: Path, *, flag: str, overwrite: bool) -> None:
    """An existing file is replaced only with ``--overwrite`` (a data file is too easily someone's input)."""
    if path.exists() and not overwrite:
        raise InputError(f"{flag} {path} already exists; choose another file, or add --overwrite to replace it")


def jsonl_text(entries: Iterable[dict]) -> str:
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)


def interrupted(cache, stopped: KeyboardInterrupt) -> int:
    """The one line a stopped run prints; the exit code: 130 after Ctrl-C, 143 after SIGTERM (``Terminated``)."""
    where = f"answers so far are in {cache.path}: rerun the same command to resume" if cache else \
        "nothing was written (--no-cache: a rerun starts over)"
    print(f"\ninterrupted; {where}", file=sys.stderr, flush=True)
    return stopped.exit_code if isinstance(stopped, Terminated) else EXIT_INTERRUPTED


def report_failures(failures: list[tuple[int, str]], total: int, what: str, *, label: str = "record",
                    shown: int = 5) -> None:
    """Print how many of ``total`` ``what`` failed and why (the first ``shown``, each named ``label`` N); raise
    Failure if all of them did."""
    if not failures:
        return
    print(f"{len(failures)} of {total} {what} failed (each costs its record; rerun to ask again):")
    for index, reason in failures[:shown]:
        print(f"  {label} {index}: {reason}")
    if len(failures) > shown:
        print(f"  ... and {len(failures) - shown} more")
    if len(failures) == total:
        index, reason = failures[0]
        raise Failure(f"every {what[:-1] if what.endswith('s') else what} failed ({label} {index}: {reason}); "
                      "nothing was written")
