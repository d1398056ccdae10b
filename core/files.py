"""Files: the one way this project writes them, where it caches them, and how outputs are checked first.

Every file a command leaves is written whole or not at all: into a temporary file beside the target,
flushed and ``fsync``-ed, given ordinary permissions (``0666`` less the umask, as ``open`` would), then
renamed over the target, and the folder's entry is synced too. A crash, a full disk or Ctrl-C at any
moment leaves the old file or the new one, never half of one. Folders (model directories) are built
the same way in a temporary sibling and renamed into place.

``JsonlFile`` is the append-only log the project keeps for results that arrive one at a time
(``metrics.jsonl``, the judge's answer cache, the responses of an interrupted generation): each entry
is one ``write`` of one line on an ``O_APPEND`` descriptor, synced; a torn last line left by a killed
process is cut off on the next read.

``check_output_file`` / ``check_output_dir`` are the pre-flight of every command that writes: the
output must not be one of the command's inputs, must not lie under a file, and its folder must be
writable, all checked before any work is done or anything is deleted. ``claimed_output`` is the one
ownership rule of every command that writes an ``--out``: its lock held for the whole command
(``core.locks``), and an existing file replaced only when it is the command's own earlier output.
Temporaries name their process (``core.locks``): the next atomic write in a folder removes those a
killed run left there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gpt2_scratch.core.errors import InputError, unicode_problem
# FolderLock is re-exported: training runs take their folder's lock from here.
from gpt2_scratch.core.locks import FileLock, FolderLock, remove_stale_temporaries, temporary_prefix  # noqa: F401

log = logging.getLogger(__name__)

CACHE_ENV = "GPT2_SCRATCH_CACHE"


def cache_root() -> Path:
    """The project's cache folder: ``$GPT2_SCRATCH_CACHE``, else ``~/.cache/gpt2-scratch``.

    Downloads live in subfolders: ``openai/`` (OpenAI's checkpoints), ``data/`` (data sets).
    """
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gpt2-scratch").expanduser()
    if os.path.lexists(root) and not root.is_dir():
        where = f"${CACHE_ENV}={os.environ[CACHE_ENV]}" if os.environ.get(CACHE_ENV) else str(root)
        raise InputError(f"the cache folder {where} is {path_kind(root) or 'a file'}, not a folder; set "
                         f"{CACHE_ENV} to a folder (or remove the file)")
    return root


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import (in the main thread): os.umask can only be read by setting it.
_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it becomes ``path``.

    The temporary file keeps ``path``'s suffix (so writers that infer a format from it, such as
    matplotlib, still work). On any exception it is removed and ``path`` is untouched; one a SIGKILL left
    is removed by the next atomic write in that folder (``remove_stale_temporaries``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path.name), suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_path(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
        _fsync_path(path.parent, directory=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 4) -> Path:
    """JSON, UTF-8, a final newline (indent 4 matches the book's instruction-data-with-response.json)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_dir_atomically(out_dir: str | os.PathLike, write: Callable[[Path], None], *,
                         overwrite: bool = False) -> Path:
    """Call ``write(tmp_dir)`` to fill a temporary sibling of ``out_dir``, then rename it into place.

    An existing non-empty ``out_dir`` is refused unless ``overwrite``; then it is replaced only once the
    new folder is complete and synced, so a crash at any point leaves the old folder or the new one.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a folder; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"{out_dir} already exists and is not empty; choose another path or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir.parent)
    tmp_dir = Path(tempfile.mkdtemp(prefix=temporary_prefix(out_dir.name), suffix=".partial", dir=out_dir.parent))
    try:
        write(tmp_dir)
        # mkdtemp and some writers create owner-only files; a model folder is meant to be shared.
        for path in sorted(tmp_dir.rglob("*"), reverse=True):  # files before their folders
            os.chmod(path, _DIR_MODE if path.is_dir() else _FILE_MODE)
            _fsync_path(path, directory=path.is_dir())
        os.chmod(tmp_dir, _DIR_MODE)
        _fsync_path(tmp_dir, directory=True)
        if out_dir.exists():
            # Two renames, so the old folder stays whole until the new one is complete.
            old_dir = out_dir.with_name(temporary_prefix(out_dir.name) + "old")
            out_dir.rename(old_dir)
            tmp_dir.rename(out_dir)
            shutil.rmtree(old_dir)
        else:
            tmp_dir.rename(out_dir)
        _fsync_path(out_dir.parent, directory=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def replace_files_into(staging: Path, out_dir: Path) -> None:
    """Move every file of a complete ``staging`` folder into ``out_dir``, weights last, then remove it.

    For outputs that share a folder with other files (a training run's model at the top of OUT): a
    reader never sees a new config paired with missing weights, and each file is itself complete.
    """
    for f in sorted(staging.iterdir(), key=lambda p: p.suffix in (".safetensors", ".gguf")):
        os.replace(f, out_dir / f.name)
    shutil.rmtree(staging)
    _fsync_path(out_dir, directory=True)


# ---------------------------------------------------------------------------------------------------
# Append-only JSON lines
# ---------------------------------------------------------------------------------------------------


def source_identity(spec: str | os.PathLike | None) -> str | None:
    """What an input option names, as one string: a local file or folder by its resolved path (two spellings of
    one file are one source), anything else (a URL, a Hub id, a preset) as given. An output's owner stamp keys
    on it: the same command run again on the same source may replace its output, edits of the file included."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    return str(_resolved(path)) if os.path.lexists(path) else str(spec)


def content_key(fields: dict) -> str:
    """A stable hex digest of ``fields`` (JSON-serialisable; key order does not matter): the key of a cached
    result, so a changed record, model or setting is computed again and an unchanged one never is."""
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    # surrogatepass: a path with bytes that are not UTF-8 (a lone surrogate in Python) still has its own key
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


class JsonlFile:
    """An append-only file of JSON objects, one per line, safe against crashes and shared by threads."""

    def __init__(self, path: str | os.PathLike, *, sync: bool = True):
        self.path = Path(path)
        self.sync = sync
        self._lock = threading.Lock()

    def append(self, entry: dict) -> None:
        """Durably append one entry as one line."""
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, _FILE_MODE)
            try:
                view = memoryview(line)
                while view:  # os.write may write less than asked: finish the line
                    view = view[os.write(fd, view):]
                if self.sync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def read(self) -> list[dict]:
        """Every complete entry in file order. A torn last line is cut off (so the next append starts a
        clean line); a complete line that is not a JSON object is skipped with a warning naming it."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # bytes after the last newline: a write cut short
        if end < len(data):
            log.warning("%s: ignoring a torn last line (%d bytes) left by an interrupted run", self.path,
                        len(data) - end)
            with self._lock, open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        entries = []
        for lineno, raw in enumerate(data[:end].splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                entries.append(entry)
            else:
                log.warning("%s:%d: skipping a line that is not a JSON object", self.path, lineno)
        return entries

    def rewrite(self, entries: Iterable[dict]) -> None:
        """Replace the whole file (atomically) with ``entries``."""
        text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
        with self._lock:
            write_text_atomic(self.path, text)


# ---------------------------------------------------------------------------------------------------
# Pre-flight checks for outputs
# ---------------------------------------------------------------------------------------------------


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(child: Path, parent: Path) -> bool:
    """Whether ``child`` is ``parent`` or lies below it (both resolved)."""
    child, parent = _resolved(child), _resolved(parent)
    return child == parent or parent in child.parents


def _resolved(path: Path) -> Path:
    """``path.resolve()``, or its absolute form where a symbolic link loop makes resolving impossible."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # RuntimeError: Python < 3.13 on a loop
        return path.absolute()


def path_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is, in words for a one-line error, when it is there but neither a file nor a folder.

    "a symbolic link loop", "a broken symbolic link (its target X does not exist)", "a named pipe", "a character
    device", "a block device", "a socket"; None for a file, a folder, or nothing at all. Without it,
    ``Path.exists()`` calls a link loop absent and ``not is_file()`` calls ``/dev/null`` a folder.
    """
    import stat

    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:  # the path itself, or a folder on the way to it
            return "a symbolic link loop" if os.path.islink(path) else "a path through a symbolic link loop"
        if not os.path.lexists(path):
            return None  # nothing there
        if isinstance(err, FileNotFoundError):
            return f"a broken symbolic link (its target {os.readlink(path)} does not exist)"
        return None  # unreadable: the caller's own open reports it
    for test, words in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return None


def check_writable_folder(folder: Path, *, flag: str) -> None:
    """``folder`` (or the nearest part of it that exists) can hold new files; else an InputError.

    Probed by creating and removing a file, which also catches read-only file systems and works for
    root, to whom permission bits do not apply.
    """
    existing = folder
    while not existing.exists():
        kind = path_kind(existing)
        if kind is not None:  # a link loop or a dangling link: no folder can be made through it
            raise InputError(f"{flag} {folder}: {existing} is {kind}; choose another path")
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{flag} {folder}: {existing} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".gpt2-scratch-write-probe.")
    except OSError as err:
        raise InputError(f"{flag} {folder}: cannot write in {existing} ({err.strerror or err}); "
                         "choose a folder you can write to") from None
    os.close(fd)
    os.unlink(probe)


# What loading a model folder reads: an output file must never replace one of these in an input folder.
MODEL_FOLDER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                      "model.safetensors", "model.safetensors.index.json")


def check_output_file(path: str | os.PathLike, *, flag: str = "--out",
                      inputs: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> Path:
    """Check, before any work, that ``path`` can be written as a file and is none of ``inputs``.

    ``inputs`` are ``(flag, path)`` pairs of what the command reads (None entries are skipped); an
    input folder (a model) may receive new files, but not in place of the files it is loaded from.
    """
    path = Path(path).expanduser()
    if str(path) == "-":  # many tools read "-" as standard output; here it would silently be a file named "-"
        raise InputError(f"{flag} -: writing to standard output is not supported; give the path of a file")
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; give the path of a file to write")
    for input_flag, input_path in inputs:
        if input_path is None:
            continue
        input_path = Path(input_path).expanduser()
        if _same_path(path, input_path) or _resolved(path) == _resolved(input_path):
            raise InputError(f"{flag} {path} is also {input_flag}: writing it would replace the input; "
                             "choose another output file")
        if input_path.is_dir() and _inside(path, input_path) and (
                path.name in MODEL_FOLDER_FILES or path.suffix in (".safetensors", ".py")):
            raise InputError(f"{flag} {path} holds {input_flag} {input_path}: writing it would replace a file the "
                             "input is read from; choose another output file")
    check_writable_folder(path.parent, flag=flag)
    return path


def check_output_dir(path: str | os.PathLike, *, flag: str = "--out",
                     inputs: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> Path:
    """Check, before any work, that folder ``path`` can be written and holds none of ``inputs``.

    Whether an existing non-empty folder may be reused (``--overwrite``, ``--resume``) is the command's
    decision; this only refuses what can never work.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file, not a folder; choose another output folder")
    problem = unicode_problem(str(path), from_bytes=True)
    if problem:  # a model folder's weights are written by safetensors, which takes UTF-8 paths only
        raise InputError(f"{flag} {path}: the path is {problem}, which safetensors cannot write to; choose a UTF-8 name")
    for input_flag, input_path in inputs:
        if input_path is None:
            continue
        input_path = Path(input_path).expanduser()
        if input_path.exists() and _inside(input_path, path):
            raise InputError(f"{flag} {path} holds {input_flag} {input_path}, which this command reads: "
                             "writing the output there could replace it; choose another output folder")
    check_writable_folder(path, flag=flag)
    return path


class OutputClaim:
    """What ``claimed_output`` yields: the output's path, and ``written()`` to call once it is written."""

    def __init__(self, path: Path, stamp: Path, owner: dict | None):
        self.path, self._stamp, self._owner = path, stamp, owner

    def written(self) -> None:
        """Record (beside the output) what it is the output of, and its digest, so a rerun of the same command
        may replace it, and only as it was written (a file edited or replaced since then is the user's)."""
        if self._owner is not None:
            # ensure_ascii: a path with bytes that are not UTF-8 is stored escaped, not refused by the encoder
            write_text_atomic(self._stamp, json.dumps({"key": content_key(self._owner), "sha256": _file_digest(
                self.path), **self._owner}, indent=4) + "\n")


def _file_digest(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


@contextmanager
def claimed_output(path: str | os.PathLike, *, flag: str = "--out", owner: dict | None = None,
                   overwrite: bool = False, what: str = "this command") -> Iterator[OutputClaim]:
    """The one ownership rule of every command that writes an ``--out``: hold the output's lock for the
    whole command, and replace an existing file only when it is this command's own earlier output.

    ``owner`` identifies what the output is *of* (``by``: the command in words; its model, its data as
    content keys); ``OutputClaim.written`` stores it beside the output (``.NAME.owner.json``). An existing
    file whose stamp differs (another model's responses, the scores of other data) or that has none (a file
    this project did not write) is refused unless ``overwrite``, naming what wrote it. Without ``owner``
    only the lock is taken (folder outputs refuse a non-empty folder without --overwrite on their own).
    """
    path = _resolved(Path(path).expanduser())  # written through a link, the link's target is the output
    stamp = path.parent / f".{path.name}.owner.json"
    if os.path.lexists(stamp) and not stamp.is_file():
        kind = path_kind(stamp) or "a folder"
        raise InputError(f"{flag} {path}: {stamp}, where the output's owner is recorded, is {kind}; remove it")
    with FileLock.beside(path, what=flag):
        if owner is not None and not overwrite and path.is_file():
            try:
                found = json.loads(stamp.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                found = None
            stamped = isinstance(found, dict) and found.get("sha256") == _file_digest(path)
            if not stamped or found.get("key") != content_key(owner):
                by = f"the output of `{found['by']}`" if stamped and isinstance(found.get("by"), str) \
                    else "a file this command did not write"
                raise InputError(f"{flag} {path} already exists and holds {by}, not {what}'s output for these "
                                 "inputs; choose another file, or add --overwrite to replace it")
        yield OutputClaim(path, stamp, owner)
