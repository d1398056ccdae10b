"""Shared test helpers: where the data lives, tiny models, the transformers reference, isolated processes."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gpt2_scratch.core.args import option_name

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI clones the repository beside shared/ (read-only data and fixtures).
SHARED_DIR = REPO_ROOT.parent / "shared"
TINY = dict(n_layers=2, emb_dim=64, n_heads=4, context_length=128)
# The tiny model on a training command line: a preset, randomly initialised at TINY's shape.
TINY_ARGS = ["--model", "gpt2-small", "--random-init",
             *(item for name, value in TINY.items() for item in (option_name(name), str(value)))]
# The environment of every training subprocess: offline, and one CPU thread (CPU sums split by thread, so a
# resumed run equals an uninterrupted one bit for bit only with the same count; one also keeps 4 engineers'
# tests off each other's cores).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}

# Prepended to code run in a subprocess that must not see this project: the saved model directory
# alone has to be enough (trust_remote_code), exactly as for a user who never installed us.
BLOCK_PROJECT_IMPORTS = textwrap.dedent(
    """
    import importlib.abc, sys
    class _BlockProject(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("gpt2_scratch", "convert", "train", "eval"):
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, _BlockProject())
    try:
        import gpt2_scratch
    except ImportError:
        pass
    else:
        raise SystemExit("gpt2_scratch is importable; the isolation is broken")
    """
)


def run_python(code: str, *, cwd: Path, block_project: bool = False, env: dict | None = None, timeout: int = 300):
    """Run ``code`` in a fresh interpreter; with block_project it cannot import any of our packages."""
    source = (BLOCK_PROJECT_IMPORTS if block_project else "") + textwrap.dedent(code)
    result = subprocess.run(
        [sys.executable, "-c", source],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"subprocess failed:\n{result.stderr[-4000:]}"
    return result


def run_cli(*args, cwd: Path = REPO_ROOT, timeout: int = 600, input: str | None = None, env: dict | None = None):
    """Run a command of ours (``python -m …`` or a script path such as ``train/sft.py``) the way a user types it;
    ``env`` (default: this process's environment), e.g. ``ENV`` for a training run."""
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, input=input,
        env=env
    )


def start_cli(*args, cwd: Path = REPO_ROOT, env: dict | None = None) -> subprocess.Popen:
    """``run_cli`` without waiting: the process, its stdout and stderr piped (to signal or kill it meanwhile)."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=env or ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_at_checkpoint(cmd: list, marker: Path, *, cwd: Path, env: dict, timeout: float = 600) -> None:
    """Start a training command and SIGKILL it as soon as ``marker`` (a checkpoint's last file) exists:
    the crash a resume must survive, at a known step."""
    import signal
    import time

    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert marker.exists(), f"killed before {marker} was written"


def signal_after_first_evaluation(proc: subprocess.Popen, out: Path, signum: int, timeout: float = 300):
    """Send ``signum`` to a training process once OUT/metrics.jsonl has its evaluation after step 1 (mid-run, at a
    known point), then wait for it: (stdout, stderr)."""
    import time

    metrics, deadline = out / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and b'"step": 1,' in metrics.read_bytes()) and proc.poll() is None:
        assert time.monotonic() < deadline, "no evaluation after step 1"
        time.sleep(0.02)
    proc.send_signal(signum)
    return proc.communicate(timeout=timeout)


def transformers_twin(model):
    """transformers' own GPT2LMHeadModel holding the same weights as our ``model`` (the reference)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    reference = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=c.vocab_size,
            n_positions=c.context_length,
            n_embd=c.emb_dim,
            n_layer=c.n_layers,
            n_head=c.n_heads,
            layer_norm_epsilon=c.layer_norm_epsilon,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=c.tie_word_embeddings,  # an untied head stays untied in the twin
        )
    )
    state = {}
    for name, tensor in model.state_dict().items():
        # Our c_proj layers are nn.Linear [out, in]; transformers' Conv1D stores [in, out] (c_attn, c_fc: as ours).
        state[name] = tensor.t() if name.endswith("c_proj.weight") else tensor
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all(name.endswith("attn.bias") for name in missing), (missing, unexpected)
    return reference.eval()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SHARED_DIR.is_dir(), f"{SHARED_DIR} is missing: clone the repository beside shared/"
    return SHARED_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny model directory, made once per session through the public API."""
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM, save_model_dir

    torch.manual_seed(123)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY))
    return save_model_dir(model, tmp_path_factory.mktemp("models") / "tiny")


def convert_main(argv) -> int:
    """``python -m convert ARGV`` in this process: the exit code the command line would give."""
    from gpt2_scratch.core.cli import main

    return main(["convert", *map(str, argv)], prog="python -m convert")


def copy_with_weights(model: Path, path: Path, change) -> Path:
    """A copy of the model folder ``model`` at ``path`` whose weights went through ``change`` (a dict of tensors)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, path)
    weights = load_file(path / "model.safetensors")
    change(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


# ---------------------------------------------------------------------------------------------------
# The bad-input tables (test_bad_input.py, test_bad_input_silent.py): one way to run a row and judge it
# ---------------------------------------------------------------------------------------------------


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path: what a bad input must leave as it was."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def isolate_user_settings(monkeypatch, scratch: Path, env: dict | None = None) -> None:
    """No Hub token or login cache, no Ollama host, offline, no download back-off, a cache of the test's own
    under ``scratch``; then ``env`` on top (a row's own settings)."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OLLAMA_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(scratch / "hf-home-empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GPT2_SCRATCH_DOWNLOAD_BACKOFF", "0")
    monkeypatch.setenv("GPT2_SCRATCH_CACHE", str(scratch / "cache"))
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)


def assert_refused(argv: list[str], root: Path, capsys, *, code: int, needle: str, new_files: bool = False,
                   seconds: float | None = None) -> None:
    """``main(argv)`` exits ``code`` with one ``error:`` line containing ``needle`` and no traceback, within
    ``seconds``; every file under ``root`` that existed is unchanged, and none is new unless ``new_files``."""
    import time

    from gpt2_scratch.core.cli import main

    capsys.readouterr()
    before = file_hashes(root)
    started = time.monotonic()
    try:
        got = main(argv)
    except SystemExit as exit:  # argparse's own errors (one line too, exit 2)
        got = exit.code
    took = time.monotonic() - started
    err = capsys.readouterr().err
    after = file_hashes(root)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert got == code, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and needle in lines[0] and "error: " in lines[0], err
    assert seconds is None or took < seconds, f"took {took:.1f} s"
    assert {k: v for k, v in after.items() if k in before} == before, "a file that existed was changed"
    assert set(before) <= set(after), "a file that existed was deleted"
    if not new_files:
        assert set(after) == set(before), f"new files: {sorted(set(after) - set(before))}"


def wait_for_lines(path: Path, count: int, proc: subprocess.Popen, *, timeout: float = 120) -> None:
    """Wait until ``proc`` has written ``count`` lines to ``path`` (a resumable run's cache), to stop it there."""
    deadline = time.monotonic() + timeout
    while (not path.exists() or path.read_bytes().count(b"\n") < count) and proc.poll() is None:
        assert time.monotonic() < deadline, f"{path} did not reach {count} lines in {timeout:g} s"
        time.sleep(0.02)


def default_sigint() -> None:
    """``preexec_fn`` of a child that a test stops with Ctrl-C: SIGINT back to its default (a shell that starts CI
    in the background hands it down ignored, and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
