"""The training scripts' caching malloc (core/allocator.py): chosen, preloaded by re-exec, kept, or off.

Each case runs a real child interpreter, so what is checked is what the dynamic loader really mapped
into the process (/proc/self/maps), not what the code meant to do.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_scratch.core import allocator

REPO = Path(__file__).resolve().parents[1]
CHILD = ("import os; from gpt2_scratch.core.allocator import use_caching_allocator, loaded_allocator\n"
         "use_caching_allocator()\n"
         "print(loaded_allocator(), os.environ.get('MIMALLOC_PURGE_DELAY'), os.environ.get('LD_PRELOAD'))\n")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")


def run_child(**env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV_VAR, "MIMALLOC_PURGE_DELAY")}
    return subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


def test_auto_preloads_mimalloc_from_the_dependency():
    assert allocator.find_allocator("mimalloc") is not None, "cmeel-mimalloc (a Linux dependency) is not installed"
    result = run_child()
    assert result.returncode == 0, result.stderr
    name, purge_delay, preload = result.stdout.split()
    assert name == "mimalloc" and purge_delay == "-1" and preload.endswith("libmimalloc.so")


def test_system_turns_it_off_and_an_existing_preload_is_kept():
    result = run_child(GPT2_SCRATCH_ALLOCATOR="system")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "system"

    mimalloc = allocator.find_allocator("mimalloc")[1]
    result = run_child(LD_PRELOAD=mimalloc, MIMALLOC_PURGE_DELAY="250")  # the user's own choice and settings
    assert result.stdout.split() == ["mimalloc", "250", mimalloc]


def test_bad_or_missing_allocator_is_a_one_line_error(monkeypatch):
    result = subprocess.run([sys.executable, "train/sft.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "GPT2_SCRATCH_ALLOCATOR": "jemallocc"}, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: GPT2_SCRATCH_ALLOCATOR='jemallocc' is not one of auto, mimalloc, tcmalloc, system"]

    # Asked for by name but not installed: the error says how to install it; "auto" falls back silently.
    monkeypatch.setattr(allocator, "_tcmalloc_path", lambda: None)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv(allocator.ENV_VAR, "tcmalloc")
    with pytest.raises(allocator.AllocatorError, match="libtcmalloc-minimal4"):
        allocator.use_caching_allocator()
    monkeypatch.setattr(allocator, "_mimalloc_path", lambda: None)
    monkeypatch.setenv(allocator.ENV_VAR, "auto")
    allocator.use_caching_allocator()  # returns: nothing to preload, glibc's malloc stays
