"""A caching memory allocator for CPU training and generation (mimalloc or tcmalloc, preloaded with LD_PRELOAD).

Why: PyTorch's CPU tensors come straight from the C library's ``malloc``. glibc serves every block
above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and unmaps it on ``free``, so every
training step faults its big tensors in again, 4 KiB at a time, and the kernel zeroes each page:
the embedding gradient and the bf16 weight copies (150+ MB each at gpt2-small), logits, activations.
Measured at gpt2-small, batch 8, bf16: 2.4-2.8 million minor page faults per 10 steps and a quarter
of the process's CPU time in the kernel; with mimalloc the same steps run about 1.5x faster at a
peak RSS no higher (``python bench/bench_train.py --impls ours ours@system`` compares them).
PyTorch's CPU performance guide gives the same advice: preload a caching allocator (tcmalloc,
jemalloc).

Batched generation gains too (eval/generate.py, gpt2-small fp32 batch 16: 176-182 vs 148-151 tok/s):
the KV cache grows by a fresh allocation every step.

How: a preloaded library must be there when the process starts, so a script calls
``use_caching_allocator()`` first thing (core.cli does, for the commands that train or generate), before torch is imported. If no caching allocator is loaded
yet it re-executes the same command (``os.execve``, same interpreter, same arguments) with
``LD_PRELOAD`` naming one; child processes (DDP workers, DataLoader workers) inherit it.

``GPT2_SCRATCH_ALLOCATOR`` chooses: ``auto`` (default: mimalloc from the ``cmeel-mimalloc`` package
this project depends on, else the system's tcmalloc), ``mimalloc``, ``tcmalloc``, or ``system``
(glibc's malloc, no re-exec). An allocator already in ``LD_PRELOAD`` (yours, or PyTorch's
``torch.backends.xeon.run_cpu``) is kept. Linux only; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

from gpt2_scratch.core.errors import InputError

ENV_VAR = "GPT2_SCRATCH_ALLOCATOR"
CHOICES = ("auto", "mimalloc", "tcmalloc", "system")
# Library-name stems of caching allocators; one of them in LD_PRELOAD means "already chosen".
_KNOWN = {"mimalloc": "libmimalloc", "tcmalloc": "libtcmalloc", "jemalloc": "libjemalloc"}

# mimalloc hands freed memory back to the OS after 10 ms by default, and a training step frees and
# re-takes the same few GB every second: at gpt2-small bf16 (batch 8, lengths 40-220) the default
# made 511 tok/s, a 1 s delay 495, never (-1) 615-668, glibc 398. "Never" keeps the peak the run
# has reached, which is the peak it needs again: RSS after 100 such steps was 4.97 GB against
# glibc's 5.37 GB. (bench/bench_train.py measures it in the real loop.)
MIMALLOC_DEFAULTS = {"MIMALLOC_PURGE_DELAY": "-1"}


class AllocatorError(InputError):
    """GPT2_SCRATCH_ALLOCATOR names an allocator that is not installed or not known."""


def _mimalloc_path() -> str | None:
    """libmimalloc.so from the cmeel-mimalloc wheel (a pip dependency on Linux), if installed."""
    from importlib import metadata

    try:
        dist = metadata.distribution("cmeel-mimalloc")
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == "libmimalloc.so":
            path = Path(dist.locate_file(file))
            if path.is_file():
                return str(path)
    return None


def _tcmalloc_path() -> str | None:
    """The system's tcmalloc (Debian/Ubuntu: libtcmalloc-minimal4), as a name the loader resolves."""
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def find_allocator(choice: str) -> tuple[str, str] | None:
    """(name, library) for ``choice`` (auto/mimalloc/tcmalloc), or None when it is not installed."""
    finders = {"mimalloc": _mimalloc_path, "tcmalloc": _tcmalloc_path}
    for name in (("mimalloc", "tcmalloc") if choice == "auto" else (choice,)):
        library = finders[name]()
        if library:
            return name, library
    return None


def loaded_allocator() -> str:
    """The caching allocator mapped into this process (read from /proc/self/maps), or "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return next((name for name, stem in _KNOWN.items() if stem in maps), "system")


def use_caching_allocator() -> None:
    """Re-execute this process with a caching allocator preloaded, unless one is loaded or it is off.

    Call it at the very top of a script's ``__main__`` path: everything before it runs twice.
    Raises ``AllocatorError`` when ``GPT2_SCRATCH_ALLOCATOR`` names one that is missing.
    """
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise AllocatorError(f"{ENV_VAR}={choice!r} is not one of {', '.join(CHOICES)}")
    if choice == "system" or not sys.platform.startswith("linux"):
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if any(stem in preload for stem in _KNOWN.values()):
        return  # already chosen (by us before the exec, or by the user)
    found = find_allocator(choice)
    if found is None:
        if choice == "auto":
            return  # nothing installed: glibc's malloc, slower but correct
        hint = ("pip install cmeel-mimalloc" if choice == "mimalloc"
                else "apt-get install libtcmalloc-minimal4 (Debian/Ubuntu)")
        raise AllocatorError(f"{ENV_VAR}={choice}: the library is not installed; {hint}, or set "
                             f"{ENV_VAR}=auto or system")
    name, library = found
    env = dict(os.environ, LD_PRELOAD=f"{library}:{preload}" if preload else library)
    if name == "mimalloc":
        for key, value in MIMALLOC_DEFAULTS.items():
            env.setdefault(key, value)
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv is the interpreter's own command line (python -m ..., python script.py ...).
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
