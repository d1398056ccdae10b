"""The one way a command writes to a terminal or a pipe: what it cannot show is replaced, a closed pipe is quiet.

Two faults used to end a command's work, or lose its results, on the way to the screen:

- a standard output that cannot encode a character (``PYTHONIOENCODING=ascii``, an ASCII locale under cron
  or CI): the judge crashed on its own '…' after the scores were computed, before they were written;
- a reader that stops reading (``generate ... | head -c 20``, ``respond ... | head``): the next write
  raised ``BrokenPipeError`` — an "error: a file: Broken pipe", or a crash at the first log line of a
  command whose real output goes to files.

``install_streams(prints_result)`` wraps ``sys.stdout`` and ``sys.stderr`` once, at a process's start (core/cli.py),
before any logging handler or progress bar takes a reference to them. Characters the stream's encoding
cannot hold become "?" (``errors="replace"``). When the reader of a stream goes away, the stream is pointed
at /dev/null and writing goes on silently: the work whose output goes to files finishes and writes them.
For a command whose result *is* its standard output (``generate``, ``chat``, ``predict``:
``prints_result``), a closed standard output ends the command as other command-line tools end on
SIGPIPE: quietly, exit status 141 (``ResultPipeClosed``, turned into the code by ``core.cli.run_command``).
"""

from __future__ import annotations

import errno
import os
import sys

EXIT_PIPE_CLOSED = 128 + 13  # what a shell reports for a tool ended by SIGPIPE


class ResultPipeClosed(Exception):
    """The reader of a command's result (its standard output) went away: stop, quietly."""


def _is_closed_pipe(err: OSError) -> bool:
    return isinstance(err, BrokenPipeError) or err.errno == errno.EPIPE


class QuietStream:
    """A text stream that replaces what it cannot encode and goes quiet when its reader closes the pipe.

    Everything but ``write`` and ``flush`` is the wrapped stream's (``isatty``, ``encoding``, ``fileno``).
    """

    def __init__(self, stream, *, result: bool):
        self._stream = stream
        self._result = result  # a closed pipe ends the command (its result has nowhere to go)
        self.closed_pipe = False
        try:
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError, OSError):  # not a TextIOWrapper (a test's capture): leave it
            pass

    def _reader_gone(self) -> None:
        """Point the stream's descriptor at /dev/null, so what is still buffered (and later writes,
        and the flush at exit) go nowhere instead of raising again."""
        self.closed_pipe = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, AttributeError, ValueError):
            pass
        if self._result:
            raise ResultPipeClosed from None

    def write(self, text: str) -> int:
        if self.closed_pipe:
            return len(text)
        try:
            return self._stream.write(text)
        except OSError as err:
            if not _is_closed_pipe(err):
                raise self._named(err) from None
            self._reader_gone()
            return len(text)

    def flush(self) -> None:
        if self.closed_pipe:
            return
        try:
            self._stream.flush()
        except OSError as err:
            if not _is_closed_pipe(err):
                raise self._named(err) from None
            self._reader_gone()

    def _named(self, err: OSError) -> OSError:
        """The error with the stream's name for its file (a full /dev/full is "standard output", not "a file")."""
        name = "standard output" if self is sys.stdout else "standard error"
        return OSError(err.errno, err.strerror, name) if err.filename is None else err

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def install_streams(*, prints_result: bool) -> None:
    """Wrap this process's standard output and error (once); ``prints_result``: the command's result is its
    standard output, so a closed one ends the command."""
    if isinstance(sys.stdout, QuietStream):  # installed before the command was known (its --help, the overview)
        sys.stdout._result = prints_result
    elif sys.stdout is not None:
        sys.stdout = QuietStream(sys.stdout, result=prints_result)
    if sys.stderr is not None and not isinstance(sys.stderr, QuietStream):
        sys.stderr = QuietStream(sys.stderr, result=False)
