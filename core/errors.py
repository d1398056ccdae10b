"""The two kinds of error a command can end with, and the one rule that turns them into exit codes.

- ``InputError`` (exit 2): the user gave something that cannot work — an argument, a file, a record,
  a model folder, an output path. Nothing has been written or deleted when it is raised (commands
  check their inputs before they write).
- ``Failure`` (exit 1): the inputs were fine but the work failed — a server or the network is down,
  training diverged, the disk is full, no record could be scored.

Both carry a one-line message saying what, where (file, record, tensor, URL) and what to do. Every
module-specific error (``DataError``, ``ConvertError``, ``HubError``, ...) subclasses one of them,
so ``core.cli`` needs no list of them. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
# SIGTERM (`timeout`, `kill`, `docker stop`, a cluster's preemption): 128 + 15, the shell's convention, as 130 is
# 128 + SIGINT. A training run stopped by it has saved a checkpoint first (train/stopping.py).
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """A second SIGTERM during training: stop at once (exit 143, as the first one would after its checkpoint).
    A KeyboardInterrupt, so everything that cleans up after Ctrl-C (locks, partial files) does so here too."""

    exit_code = EXIT_TERMINATED


class InputError(Exception):
    """Bad input the user can fix; exit status 2."""

    exit_code = EXIT_BAD_INPUT


class Failure(Exception):
    """The work could not be done although the input was fine; exit status 1."""

    exit_code = EXIT_FAILURE


def one_line(text: object, limit: int = 400) -> str:
    """``text`` squeezed onto one line (whitespace runs become one space), at most ``limit`` characters."""
    line = " ".join(str(text).split())
    if not line.isascii():  # a path with bytes that are not UTF-8 holds lone surrogates: shown as "?" on any stream
        line = line.encode("utf-8", "replace").decode("utf-8")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def unicode_problem(text: str, *, from_bytes: bool = False) -> str | None:
    """Why ``text`` cannot be written as UTF-8 (None when it can): a lone surrogate in it.

    A JSON ``"\\ud800"`` escape decodes to a lone surrogate, and Python turns each byte of argv or stdin
    that is not UTF-8 into one of U+DC80..U+DCFF (surrogateescape); the tokenizer, hashing and every
    file write then fail far from where the text came in. With ``from_bytes`` (text from argv or stdin)
    such a character is named as the byte it stands for.
    """
    if text.isascii():  # the common case, checked at C speed
        return None
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as err:
        char = ord(text[err.start])
    if from_bytes and 0xDC80 <= char <= 0xDCFF:
        return f"not valid UTF-8 (byte 0x{char - 0xDC00:02x})"
    return f"not valid Unicode (a lone surrogate \\u{char:04x})"


def describe_os_error(err: OSError) -> str:
    """One line for an ``OSError`` raised while reading or writing: the path and the system's reason.

    A full disk is named plainly, because it is the one users most often meet in the middle of a run.
    """
    where = err.filename if err.filename is not None else "a file"
    if err.errno == errno.ENOSPC:
        return f"no space left on device while writing {where}; free some space and run the command again"
    reason = err.strerror or type(err).__name__
    return f"{where}: {reason}"
