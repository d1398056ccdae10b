"""Locks and temporaries that name their process, so a run that was killed never blocks or litters the next.

``FileLock`` is one process's exclusive claim on an output (a training run's folder, a converted model, a
responses file). A SIGKILL (the OOM killer, ``kill -9``, a lost node) runs no cleanup: the lock file and the
temporary of an atomic write (``core.files``) stay beside their target, the temporary as large as the model.
So every temporary is named ".NAME.gpt2tmp-PID-HOST-..." (HOST: a short hash of the host name), and
``remove_stale_temporaries``, which every atomic write runs first in the folder it writes to, removes the
temporaries whose process is gone from this host and the lock files no process holds.

No dependency on the rest of the project but its error class: ``core.files`` builds on this module.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gpt2_scratch.core.errors import Failure, InputError

log = logging.getLogger(__name__)

_TMP_MARK = "gpt2tmp"
_TMP_RE = re.compile(rf"^\..+\.{_TMP_MARK}-(?P<pid>\d+)-(?P<host>[0-9a-f]{{8}})-")
_LOCK_SUFFIX = ".lock"


def _host_id() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def temporary_prefix(name: str) -> str:
    """The start of a temporary's name for target ``name``: hidden, and naming this process and host."""
    return f".{name}.{_TMP_MARK}-{os.getpid()}-{_host_id()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove from ``folder`` what killed runs of this project left there; returns what was removed.

    A temporary goes when it was made on this host by a process that no longer exists (another host's
    temporaries on a shared disk are left alone: their owner cannot be checked from here); an output
    lock file goes when no process holds its lock (``FileLock`` takes a removed lock file in its stride).
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    host = _host_id()
    for entry in entries:
        if not entry.name.startswith("."):
            continue
        match = _TMP_RE.match(entry.name)
        path = Path(entry.path)
        if match:
            if match["host"] != host or int(match["pid"]) == os.getpid() or _process_alive(int(match["pid"])):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        elif entry.name.endswith(_LOCK_SUFFIX) and len(entry.name) > len(_LOCK_SUFFIX) + 1 and \
                entry.is_file(follow_symlinks=False) and entry.name != FileLock.FOLDER_LOCK:
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(fd).st_size == 0 or os.pread(fd, 4, 0) == b"pid ":  # ours: "pid N on HOST ..."
                    path.unlink(missing_ok=True)
                    removed.append(path)
            except OSError:  # held by a live run (BlockingIOError), or gone already
                pass
            finally:
                os.close(fd)
    for path in removed:
        log.info("removed %s, left by a run that was killed", path)
    return removed



class FileLock:
    """One process's exclusive claim on an output: ``flock`` on a lock file, which names the holder.

    ``acquire(folder)`` claims a folder a run works in (a training run's OUT: ``OUT/.lock``);
    ``beside(path)`` claims an output that is replaced whole, a file or a folder renamed into place
    (``.NAME.lock`` beside it, since a lock inside would be renamed away with the old folder). Two runs
    on one output: the second is refused in one line naming the first, before it does any work.

    The kernel drops the lock when its process ends however it ends, so a lock file left behind by a
    killed run never blocks the next one (that run takes the lock over), and the next atomic write in
    that folder removes it (``remove_stale_temporaries``). ``release`` removes the file.
    """

    FOLDER_LOCK = ".lock"
    NAME = FOLDER_LOCK

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, folder: str | os.PathLike, *, what: str = "--out") -> "FileLock":
        """Lock ``folder`` (created if missing), or one InputError naming the process that holds it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return cls._take(folder / cls.FOLDER_LOCK, f"{what} {folder}", what)

    @classmethod
    def beside(cls, target: str | os.PathLike, *, what: str = "--out",
               wait: Callable[[str], None] | None = None) -> "FileLock":
        """Lock the output file or folder ``target`` (its folder is created if missing), or one InputError.
        With ``wait``, a lock another process holds is waited for instead: ``wait(holder)`` is called first
        with the holder's line ("pid N on HOST, started ...: command"), so the waiter can say why it stops."""
        target = Path(target).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        return cls._take(target.parent / f".{target.name}{_LOCK_SUFFIX}", f"{what} {target}", what, wait)

    @classmethod
    def _take(cls, path: Path, named: str, what: str, wait: Callable[[str], None] | None = None) -> "FileLock":
        while True:
            try:  # never through a symbolic link: the lock file is truncated, and a link could aim at any file
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)  # less the umask
            except OSError as err:
                if err.errno != errno.ELOOP:
                    raise
                raise InputError(f"{named}: its lock file {path} is a symbolic link, which a lock never is; remove "
                                 "the link and run again") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = path.read_text(encoding="utf-8", errors="replace").strip() or "a process"
                except OSError:
                    holder = "a process"
                if wait is None:
                    os.close(fd)
                    raise InputError(f"{named} is in use by another run ({holder}); wait for it to finish, or "
                                     f"use another {what}") from None
                wait(holder)
                wait = _no_wait_message  # said once, however often the file is replaced while we wait
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # until the holder releases it or ends (Ctrl-C interrupts)
                except BaseException:
                    os.close(fd)
                    raise
            try:  # the file may have been removed between our open and our lock: lock the new one
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        command = " ".join(sys.argv)[:300]
        os.ftruncate(fd, 0)
        holder = f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}\n"
        os.write(fd, holder.encode("utf-8", "backslashreplace"))  # argv may hold bytes that are not UTF-8
        return cls(path, fd)

    def check_held(self, what: str = "--out") -> None:
        """Raise a one-line ``Failure`` when the locked folder was deleted, moved or replaced since ``acquire``
        (its lock file is gone or is another file): writing on would quietly re-create it, holding only the
        files written from now on, while the run's earlier files (its arguments, first metrics rows,
        checkpoints) are lost."""
        try:
            same = os.fstat(self._fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            same = False
        if not same:
            raise Failure(f"{what} {self.path.parent} was deleted or replaced while this run was using it (its lock "
                          f"file {self.path.name} is gone); the run stops without writing there again: start it again "
                          "(with --overwrite if the folder exists)")

    def release(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _no_wait_message(holder: str) -> None:
    pass


FolderLock = FileLock  # the name training runs use for ``FileLock.acquire``
