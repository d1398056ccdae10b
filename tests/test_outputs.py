"""Outputs are owned: one run per --out at a time, never another command's file replaced, nothing left by a kill.

Real processes, as users run them: a conversion killed with SIGKILL at the worst moment (its temporary
complete, the rename not done), two conversions on one output at once, respond run again on its own output.
The refusals themselves (one line, every file byte-identical) are rows of tests/test_bad_input_silent.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, file_hashes

BOOK_DATA = REPO_ROOT.parent / "shared" / "data" / "instruction-data.json"

# Runs a command line with one os-level call replaced by a SIGKILL of the process itself: the kill lands exactly
# when the temporary is complete and the rename that would publish it has not happened (no cleanup code runs).
KILL_AT = """
import os, signal, sys
from pathlib import Path
from gpt2_scratch.core.cli import main
what = sys.argv[1]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if what == "os.replace":
    os.replace = die
else:
    Path.rename = die
main(sys.argv[2:])
"""

# Runs a command line whose publishing rename waits SECONDS first: a run that is still writing its output.
SLOW_AT_REPLACE = """
import os, sys, time
from gpt2_scratch.core.cli import main
real = os.replace
def slow(*args, **kwargs):
    time.sleep(float(sys.argv[1]))
    return real(*args, **kwargs)
os.replace = slow
sys.exit(main(sys.argv[2:]))
"""


def _python(code: str, *args, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2_scratch", *map(str, args)], cwd=REPO_ROOT, text=True,
                          capture_output=True, timeout=300, **kwargs)


def test_a_sigkilled_conversion_leaves_nothing_once_the_next_conversion_has_finished(tiny_model_dir, tmp_path):
    out = tmp_path / "exports"
    out.mkdir()
    for what, argv, name in (
            ("os.replace", ["convert", "gguf", "--model", tiny_model_dir, "--out", out / "m.gguf"], "m.gguf"),
            ("Path.rename", ["convert", "export-hf", "--model", tiny_model_dir, "--out", out / "hf"], "hf")):
        proc = _python(KILL_AT, what, *argv)
        proc.communicate(timeout=300)
        assert proc.returncode == -9, proc.stderr
        # The killed run left its temporary (as big as the model) and its lock; the killed run before it
        # (started later, cleaned up first) left nothing of its own.
        left = sorted(p.name for p in out.iterdir())
        assert [n for n in left if n != f".{name}.lock"] and all(n.startswith(f".{name}.") for n in left), left
        assert f".{name}.lock" in left and any(f".{name}.gpt2tmp-" in n for n in left), left

    # The next conversion of any kind into that folder finishes and leaves only its own output.
    done = _cli("convert", "export-book", "--model", tiny_model_dir, "--out", out / "m.pth")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["m.pth"]


@pytest.mark.slow  # a conversion kept running while another starts, ~15 s
def test_a_live_runs_temporaries_are_left_alone(tiny_model_dir, tmp_path):
    """The cleanup removes only what dead processes left: a running conversion's files survive another's."""
    slow = _python(SLOW_AT_REPLACE, "4", "convert", "gguf", "--model", tiny_model_dir, "--out", tmp_path / "a.gguf")
    deadline = time.monotonic() + 120
    while not any(".a.gguf.gpt2tmp-" in p.name for p in tmp_path.iterdir()):
        assert slow.poll() is None and time.monotonic() < deadline, slow.communicate()
        time.sleep(0.05)
    other = _cli("convert", "export-book", "--model", tiny_model_dir, "--out", tmp_path / "b.pth")
    assert other.returncode == 0, other.stderr
    assert slow.wait(timeout=120) == 0, slow.communicate()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.Modelfile", "a.gguf", "b.pth"]


def test_two_gguf_runs_on_one_out_the_second_is_refused_and_the_first_file_stands(tiny_model_dir, tmp_path):
    """Both used to report success, one file silently replacing the other (the message gave the other's size)."""
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    out = tmp_path / "m.gguf"
    first = _python(SLOW_AT_REPLACE, "3", "convert", "gguf", "--model", tiny_model_dir, "--out", out, "--dtype", "f32")
    deadline = time.monotonic() + 120
    while not (tmp_path / ".m.gguf.lock").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = _cli("convert", "gguf", "--model", other, "--out", out, "--dtype", "f16", "--overwrite")
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().startswith(f"error: --out {out} is in use by another run (pid {first.pid} ")
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert "--dtype f32" in stdout and f"{out.stat().st_size / 1e6:.1f} MB" in stdout


def _respond(model: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return _cli("respond", "--model", model, "--data", BOOK_DATA, "--limit", "2", "--max-new-tokens", "2", "--quiet",
                "--out", out, *extra)


def test_respond_rewrites_its_own_output_and_no_other_models(tiny_model_dir, tmp_path):
    out = tmp_path / "responses.json"
    assert _respond(tiny_model_dir, out).returncode == 0
    assert _respond(tiny_model_dir, out).returncode == 0  # the same command again: its own output, rewritten
    mine = out.read_bytes()

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "drop_rate": 0.2}))  # another model
    refused = _respond(other, out)
    assert refused.returncode == 2 and f"holds the output of `respond --model {tiny_model_dir}" in refused.stderr
    assert out.read_bytes() == mine
    assert _respond(other, out, "--overwrite").returncode == 0  # and the way out the message names
    assert _respond(other, out).returncode == 0  # now it is other's own


def test_a_refused_command_leaves_the_folder_as_it_was(tiny_model_dir, tmp_path):
    """Byte for byte, and no lock or stamp left behind by the run that was refused."""
    out = tmp_path / "responses.json"
    out.write_text("[1, 2, 3]\n")
    before = file_hashes(tmp_path)
    refused = _respond(tiny_model_dir, out)
    assert refused.returncode == 2 and "holds a file this command did not write" in refused.stderr
    assert file_hashes(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["responses.json"]
