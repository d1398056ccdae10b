"""Bad input and faults, every command, one table: exit code, one line naming the place, nothing lost.

Each case builds what a careful user on a bad day (or an attacker) would hand a command, runs the
command line in this process (``core.cli.main``, the code every entry point runs), and checks:
  * the exit code: 2 for bad input, 1 for a failure of the work (the project's one rule);
  * stderr is exactly one line, ``error: ...``, naming the place (file, record, tensor, option, URL);
  * every file that existed before is byte for byte the same afterwards (and, unless the case says
    otherwise, nothing new was written).
The faults that need a real process (a run that diverges, a full disk, Ctrl-C then --resume) follow
the table as subprocess tests.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import (ENV, REPO_ROOT, TINY_ARGS, assert_refused, copy_with_weights, isolate_user_settings,
                      signal_after_first_evaluation, start_cli)
from safetensors.torch import load_file

from gpt2_scratch.core.cli import main

SHARED = REPO_ROOT.parent / "shared"
BOOK_DATA = SHARED / "data" / "instruction-data.json"


# ---------------------------------------------------------------------------------------------------
# The workspace every case starts from
# ---------------------------------------------------------------------------------------------------


class Workspace:
    """Files a user has: a model folder, instruction data, responses, a finished run, a checkpoint."""

    def __init__(self, root: Path, tiny_model_dir: Path, finished_run: Path):
        self.root = root
        self.model = root / "model"
        shutil.copytree(tiny_model_dir, self.model)
        self.data = root / "data.json"
        self.data.write_text(json.dumps(json.loads(BOOK_DATA.read_text())[:40]))
        self.responses = root / "responses.json"
        self.responses.write_text(json.dumps([{**r, "model_response": r["output"]}
                                              for r in json.loads(self.data.read_text())[:4]]))
        self.run = root / "run"  # a finished sft run with its model, metrics and checkpoints
        shutil.copytree(finished_run, self.run)

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def model_variant(self, name: str, change: Callable[[dict], None]) -> Path:
        return copy_with_weights(self.model, self.root / name, change)

    def truncated_model(self) -> Path:
        path = self.root / "truncated"
        shutil.copytree(self.model, path)
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
        return path



@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real (tiny, 4-step) sft run: the folder that --overwrite and --resume cases point at."""
    out = tmp_path_factory.mktemp("finished") / "run"
    code = main(["sft", *TINY_ARGS, "--data", str(BOOK_DATA), "--out", str(out), "--max-steps", "4",
                 "--batch-size", "4", "--eval-freq", "2", "--eval-iter", "1", "--save-every", "2",
                 "--keep-checkpoints", "0", "--max-new-tokens", "2", "--response-batch-size", "110",
                 "--sample-tokens", "2", "--epochs", "1"])
    assert code == 0
    return out


@pytest.fixture()
def ws(tmp_path, tiny_model_dir, finished_run):
    return Workspace(tmp_path, tiny_model_dir, finished_run)


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    argv: Callable[[Workspace], list]  # builds the command line (and any bad file it needs)
    code: int  # 2: bad input, 1: the work failed
    needle: str  # what the one line must say; {root} is the workspace
    new_files: bool = False  # the command may leave new files (never change old ones)
    env: dict | None = None  # environment for this case


def sft(ws: Workspace, *extra) -> list:
    return ["sft", *TINY_ARGS, "--data", str(ws.data), "--out", str(ws.root / "out"), "--max-steps", "2",
            "--batch-size", "4", "--max-new-tokens", "2", *map(str, extra)]


def drop(name: str) -> Callable[[dict], None]:
    return lambda weights: weights.pop(name)


CASES = [
    # --- data loss: --overwrite and outputs that are inputs -------------------------------------------
    Case("sft --overwrite with a mistyped --data", lambda ws: [*sft(ws), "--data", str(ws.root / "dta.json"),
         "--out", str(ws.run), "--overwrite"], 2, "--data {root}/dta.json: no such file"),
    Case("sft --model X --out X --overwrite", lambda ws: [*sft(ws)[:1], "--model", str(ws.run), "--data",
         str(ws.data), "--out", str(ws.run), "--overwrite"], 2, "--out {root}/run holds --model {root}/run"),
    Case("sft --data inside --out --overwrite", lambda ws: [*sft(ws), "--data", str(ws.run / "args.json"),
         "--out", str(ws.run), "--overwrite"], 2, "--out {root}/run holds --data {root}/run/args.json"),
    Case("classify --overwrite with bad data", lambda ws: ["classify", "--model", "gpt2-small", "--random-init",
         "--data", str(ws.file("bad.tsv", "ham\tok\nno tab here\n")), "--out", str(ws.run), "--overwrite"], 2,
         "{root}/bad.tsv:2: no tab in line"),
    Case("respond --out = --data", lambda ws: ["respond", "--model", str(ws.model), "--data", str(ws.data), "--out",
         str(ws.data)], 2, "--out {root}/data.json is also --data: writing it would replace the input"),
    Case("judge --out = --data", lambda ws: ["judge", "--data", str(ws.responses), "--out", str(ws.responses)], 2,
         "--out {root}/responses.json is also --data"),
    Case("judge --cache = --data", lambda ws: ["judge", "--data", str(ws.responses), "--cache", str(ws.responses),
         "--out", str(ws.root / "s.json")], 2, "--cache {root}/responses.json is also --data"),
    Case("export-hf --out = --model", lambda ws: ["convert", "export-hf", "--model", str(ws.model), "--out",
         str(ws.model), "--overwrite"], 2, "--out {root}/model holds --model {root}/model"),
    Case("export-book --out = a model file", lambda ws: ["convert", "export-book", "--model", str(ws.model), "--out",
         str(ws.model / "model.safetensors"), "--overwrite"], 2, "holds --model"),
    # --- models that would load broken -----------------------------------------------------------------
    Case("generate: a missing tensor", lambda ws: ["generate", "--model", str(ws.model_variant(
         "no-ln-f", drop("transformer.ln_f.weight"))), "--prompt", "hi"], 2,
         "{root}/no-ln-f/model.safetensors: missing tensor 'transformer.ln_f.weight'"),
    Case("sft: an extra layer's tensors", lambda ws: [*sft(ws)[:1], "--model", str(ws.model_variant(
         "extra-layer", lambda w: w.update({"transformer.h.2.ln_1.weight": torch.ones(64)}))), "--data",
         str(ws.data), "--out", str(ws.root / "o")], 2, "unexpected tensor 'transformer.h.2.ln_1.weight'"),
    Case("respond: a tensor of the wrong shape", lambda ws: ["respond", "--model", str(ws.model_variant(
         "bad-shape", lambda w: w.update({"transformer.ln_f.bias": torch.zeros(65)}))), "--data", str(ws.data),
         "--out", str(ws.root / "r.json")], 2, "mismatched tensor 'transformer.ln_f.bias'"),
    Case("generate: a truncated model.safetensors", lambda ws: ["generate", "--model", str(ws.truncated_model()),
         "--prompt", "hi"], 2, "{root}/truncated/model.safetensors: unreadable weights"),
    Case("push: a truncated model.safetensors", lambda ws: ["push", "--model", str(ws.truncated_model()),
         "--repo-id", "alice/x"], 2, "{root}/truncated/model.safetensors: unreadable weights",
         env={"HF_TOKEN": "hf_test", "HF_ENDPOINT": "http://127.0.0.1:9"}),
    Case("push: NaN weights", lambda ws: ["push", "--model", str(ws.model_variant(
         "nan", lambda w: w["transformer.h.0.mlp.c_fc.weight"].view(-1).__setitem__(0, float("nan")))),
         "--repo-id", "alice/x"], 1, "parameter 'transformer.h.0.mlp.c_fc.weight' holds NaN or infinite values",
         env={"HF_TOKEN": "hf_test", "HF_ENDPOINT": "http://127.0.0.1:9"}),
    Case("config that disagrees with the weights", lambda ws: ["generate", "--model", str(_with_config(
         ws, "more-layers", n_layers=3)), "--prompt", "hi"], 2, "missing tensor 'transformer.h.2."),
    Case("generate --model: no such folder", lambda ws: ["generate", "--model", str(ws.root / "nowhere"),
         "--prompt", "hi"], 2, "--model {root}/nowhere: no such folder"),
    Case("generate --model: a Hub-like path that is not there", lambda ws: ["generate", "--model", "runs/nothing",
         "--prompt", "hi"], 1, "--model runs/nothing: no such folder here, and as a Hub repo id"),
    # --- resuming another run ---------------------------------------------------------------------------
    Case("--resume with another --lr", lambda ws: [*_resume(ws), "--resume", "--lr", "1e-4"], 2,
         "--resume: --lr 0.0001 differs from the run's 5e-05"),
    Case("--resume with another --batch-size and --data", lambda ws: [*_resume(ws), "--resume", "--batch-size", "8",
         "--data", str(ws.data)], 2, "--resume: --batch-size 8 differs from the run's 4"),
    Case("--resume DIR: no such folder", lambda ws: [*_resume(ws), "--resume", str(ws.root / "nowhere")], 2,
         "--resume {root}/nowhere: no such folder; pass a step-N folder under the run's checkpoints/"),
    Case("--resume: a garbled train_state.json", lambda ws: [*_damage(ws, "train_state.json", b"{step: 4"),
         "--resume"], 2, "train_state.json is damaged"),
    Case("--resume: a truncated checkpoint model", lambda ws: [*_damage(ws, "model.safetensors", b"\x08\x00"),
         "--resume"], 2, "--resume: cannot restore"),
    # train_state.json that parses but lies: each counter's type and range is checked (the hostile pass)
    Case("--resume: train_state.json with a string step", lambda ws: [*_state(ws, step="4"), "--resume"], 2,
         "train_state.json is damaged ('step' must be an integer >= 0, got \"4\")"),
    Case("--resume: train_state.json with a negative batches_done", lambda ws: [*_state(ws, batches_done=-7),
         "--resume"], 2, "train_state.json is damaged ('batches_done' must be an integer >= 0, got -7)"),
    Case("--resume: train_state.json with running null", lambda ws: [*_state(ws, running=None), "--resume"], 2,
         "train_state.json is damaged ('running' must be an empty list or one of two or more finite numbers"),
    Case("--resume: train_state.json without its step", lambda ws: [*_state(ws, step=_REMOVED), "--resume"], 2,
         "train_state.json is damaged (no 'step')"),
    Case("--resume: train_state.json holding a list", lambda ws: [*_damage(ws, "train_state.json", b"[4]"),
         "--resume"], 2, "train_state.json is damaged (a JSON list, not an object of counters)"),
    Case("--resume: batches_done past the epoch", lambda ws: [*_state(ws, batches_done=10**6), "--resume"], 2,
         "train_state.json is damaged ('batches_done' 1000000 is past the 233 batches of an epoch)"),
    Case("--resume and --overwrite together", lambda ws: [*sft(ws), "--out", str(ws.run), "--resume",
         "--overwrite"], 2, "--resume and --overwrite contradict each other"),
    # --- numbers no run can start with ------------------------------------------------------------------
    Case("--lr nan", lambda ws: sft(ws, "--lr", "nan"), 2, "--lr must be a finite number, got nan"),
    Case("--lr inf", lambda ws: sft(ws, "--lr", "inf"), 2, "--lr must be a finite number, got inf"),
    Case("--lr 0", lambda ws: sft(ws, "--lr", "0"), 2, "--lr must be greater than 0"),
    Case("--weight-decay -5", lambda ws: sft(ws, "--weight-decay", "-5"), 2, "--weight-decay must be at least 0"),
    Case("--max-grad-norm -1", lambda ws: sft(ws, "--max-grad-norm", "-1"), 2, "--max-grad-norm must be at least 0"),
    Case("--eval-freq 0", lambda ws: sft(ws, "--eval-freq", "0"), 2, "--eval-freq must be at least 1"),
    Case("classify --lr nan", lambda ws: ["classify", "--model", "gpt2-small", "--random-init", "--lr", "nan",
         "--out", str(ws.root / "c")], 2, "--lr must be a finite number"),
    Case("generate --temperature -1", lambda ws: ["generate", "--model", str(ws.model), "--temperature", "-1",
         "--prompt", "x"], 2, "--temperature must be at least 0, got -1.0"),
    Case("generate --top-p 2", lambda ws: ["generate", "--model", str(ws.model), "--top-p", "2", "--prompt", "x"], 2,
         "--top-p must be in (0, 1], got 2.0"),
    Case("chat --top-p 0", lambda ws: ["chat", "--model", str(ws.model), "--top-p", "0", "--prompt", "x"], 2,
         "--top-p must be in (0, 1], got 0.0"),
    Case("respond --batch-size 0", lambda ws: ["respond", "--model", str(ws.model), "--data", str(ws.data), "--out",
         str(ws.root / "r.json"), "--batch-size", "0"], 2, "--batch-size must be at least 1"),
    Case("judge --workers 0", lambda ws: ["judge", "--data", str(ws.responses), "--workers", "0"], 2,
         "--workers must be at least 1"),
    Case("init --n-layers 0", lambda ws: ["init", "--preset", "gpt2-small", "--out", str(ws.root / "m"),
         "--n-layers", "0"], 2, "--n-layers must be at least 1, got 0"),
    Case("init --emb-dim the preset's heads do not divide", lambda ws: ["init", "--preset", "gpt2-small", "--out",
         str(ws.root / "m"), "--emb-dim", "100"], 2, "--emb-dim 100 is not divisible by gpt2-small's n_heads 12; "
         "give --n-heads among the divisors of 100, or an --emb-dim that is a multiple of 12"),
    Case("sft --random-init --n-heads that does not divide --emb-dim", lambda ws: [*sft(ws), "--n-heads", "3"], 2,
         "--emb-dim 64 is not divisible by --n-heads 3"),
    # --- data that parses wrongly or is too small -------------------------------------------------------
    Case("2-9 records: no full batch", lambda ws: [*sft(ws), "--batch-size", "8", "--data", str(ws.file(
         "nine.json", json.dumps([{"instruction": f"i{i}", "output": "o"} for i in range(9)])))], 2,
         "{root}/nine.json: 7 training examples make no full batch of 8"),
    Case("one record", lambda ws: [*sft(ws), "--data", str(ws.file("one.json", json.dumps(
         [{"instruction": "i", "output": "o"}])))], 2, "1 record(s) leave no training example"),
    Case("a {\"data\": [...]} file counts its records", lambda ws: [*sft(ws), "--batch-size", "8", "--data", str(ws.file(
         "wrapped.json", json.dumps({"data": [{"instruction": f"i{i}", "output": "o"} for i in range(5)]})))], 2,
         "4 training examples make no full batch of 8"),
    Case("sft --data: malformed JSON", lambda ws: [*sft(ws), "--data", str(ws.file("bad.json",
         '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]'))], 2,
         "{root}/bad.json: malformed JSON at line 2 column 22"),
    Case("sft --data: a record without output", lambda ws: [*sft(ws), "--data", str(ws.file("nout.json",
         '[{"instruction": "a", "output": "b"}, {"instruction": "c"}]'))], 2, "record 1 has no 'output' field"),
    Case("sft --data: a folder", lambda ws: [*sft(ws), "--data", str(ws.root)], 2, "is a folder"),
    Case("sft --data: the book's URL offline", lambda ws: [*sft(ws), "--data",
         "http://127.0.0.1:9/instruction-data.json"], 1, "cannot reach http://127.0.0.1:9/instruction-data.json"),
    Case("respond --split: unknown", lambda ws: ["respond", "--model", str(ws.model), "--data", str(ws.data), "--out",
         str(ws.root / "r.json"), "--split", "dev"], 2, "invalid choice: 'dev'"),
    Case("judge: a record without the response", lambda ws: ["judge", "--data", str(ws.data)], 2,
         "record 0 has no 'model_response' string"),
    # --- outputs that cannot be written -----------------------------------------------------------------
    Case("sft --out under a file", lambda ws: [*sft(ws), "--out", str(ws.data / "out")], 2,
         "{root}/data.json is a file, not a folder"),
    Case("sft --out not writable", lambda ws: [*sft(ws), "--out", "/proc/gpt2-scratch-out"], 2,
         "--out /proc/gpt2-scratch-out: cannot write in /proc"),
    Case("respond --out is a folder", lambda ws: ["respond", "--model", str(ws.model), "--data", str(ws.data),
         "--out", str(ws.root)], 2, "--out {root} is a folder; give the path of a file"),
    Case("init --out: an existing model", lambda ws: ["init", "--preset", "gpt2-small", "--out", str(ws.model),
         "--n-layers", "1"], 2, "{root}/model already exists and is not empty"),
    # --- limits checked before training -----------------------------------------------------------------
    Case("a context that leaves no room for the test responses", lambda ws: [*sft(ws), "--context-length", "64",
         "--max-new-tokens", "64"], 2, "--max-new-tokens 64 leaves no room for a prompt in the 64-token context"),
    Case("generate --max-new-tokens past the context", lambda ws: ["generate", "--model", str(ws.model),
         "--max-new-tokens", "128", "--prompt", "x"], 2, "--max-new-tokens 128 leaves no room"),
    # --- the command line itself ------------------------------------------------------------------------
    Case("an unknown command", lambda ws: ["fintune"], 2, "unknown command 'fintune'"),
    Case("an unknown prompt style", lambda ws: [*sft(ws), "--prompt-style", "chatml"], 2, "invalid choice: 'chatml'"),
    Case("push without a token", lambda ws: ["push", "--model", str(ws.model), "--repo-id", "alice/x"], 2,
         "no Hugging Face token"),
    Case("judge: an invalid --host", lambda ws: ["judge", "--data", str(ws.responses), "--host",
         "http://exa mple:99999", "--out", str(ws.root / "s.json")], 2, "--host"),
    Case("convert book: not a pickle of tensors", lambda ws: ["convert", "book", "--pth", str(ws.file(
         "m.pth", b"not a checkpoint")), "--out", str(ws.root / "b")], 2, "{root}/m.pth"),
    Case("convert openai --from-dir: not a checkpoint", lambda ws: ["convert", "openai", "--from-dir", str(ws.model),
         "--out", str(ws.root / "o")], 2, "hparams.json: not found"),
]


def _with_config(ws: Workspace, name: str, **changes) -> Path:
    path = ws.root / name
    shutil.copytree(ws.model, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))
    return path


def _damage(ws: Workspace, name: str, content: bytes) -> list:
    """The finished run with its newest checkpoint's ``name`` replaced by ``content``."""
    newest = sorted((ws.run / "checkpoints").iterdir())[-1]
    (newest / name).write_bytes(content)
    return _resume(ws)


_REMOVED = object()


def _state(ws: Workspace, **changes) -> list:
    """The finished run with its newest checkpoint's train_state.json changed (``_REMOVED`` drops a field)."""
    path = sorted((ws.run / "checkpoints").iterdir())[-1] / "train_state.json"
    state = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in state.items() if v is not _REMOVED}))
    return _resume(ws)


def _resume(ws: Workspace) -> list:
    """The finished run's own command line (add --resume and what should differ)."""
    return ["sft", *TINY_ARGS, "--data", str(BOOK_DATA), "--out", str(ws.run), "--max-steps", "4",
            "--batch-size", "4", "--eval-freq", "2", "--eval-iter", "1", "--save-every", "2", "--keep-checkpoints",
            "0", "--max-new-tokens", "2", "--response-batch-size", "110", "--sample-tokens", "2", "--epochs", "1"]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ws: Workspace, capsys, monkeypatch):
    isolate_user_settings(monkeypatch, ws.root.parent, case.env)
    assert_refused([str(a) for a in case.argv(ws)], ws.root, capsys, code=case.code,
                   needle=case.needle.format(root=ws.root), new_files=case.new_files)


# ---------------------------------------------------------------------------------------------------
# Faults that need a real process
# ---------------------------------------------------------------------------------------------------


def sft_process(*args, env=None) -> subprocess.Popen:
    return start_cli("train/sft.py", *args, env=env)


RUN = [*TINY_ARGS, "--data", str(BOOK_DATA), "--batch-size", "4", "--eval-iter", "1", "--max-new-tokens", "2",
       "--response-batch-size", "110", "--sample-tokens", "2", "--epochs", "1"]


def test_a_diverging_run_stops_with_one_line_and_saves_no_model(tmp_path):
    out = tmp_path / "nan"
    proc = sft_process(*RUN, "--lr", "5e5", "--max-steps", "20", "--save-every", "1", "--eval-freq", "100",
                       "--out", out)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]  # beside tqdm's bar
    assert line.startswith("error: training diverged at step ") and ("is nan" in line or "is inf" in line), line
    step = int(line.split("at step ")[1].split(":")[0])
    assert not (out / "model.safetensors").exists()  # nothing broken is saved as a model
    kept = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []
    assert all(int(name.split("-")[1]) < step for name in kept), kept
    assert (f"the last good checkpoint is {out / 'checkpoints' / kept[-1]}" if kept else
            "no checkpoint was saved before it") in line
    for name in kept:  # every checkpoint left holds finite weights
        weights = load_file(out / "checkpoints" / name / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values()), name


@pytest.mark.slow  # several fresh interpreters (~10 s each here): the slow suite
def test_ctrl_c_stops_with_a_checkpoint_and_resume_finishes_the_run(tmp_path):
    out = tmp_path / "interrupted"
    proc = sft_process(*RUN, "--max-steps", "400", "--eval-freq", "50", "--out", out)
    stdout, stderr = signal_after_first_evaluation(proc, out, signal.SIGINT)
    assert proc.returncode == 130, stderr
    assert "stopping after this step" in stderr
    (stopped,) = [line for line in stdout.splitlines() if line.startswith("stopped at step")]
    step = int(stopped.split()[3].rstrip(":"))
    assert "--resume" in stopped and (out / "checkpoints" / f"step-{step:08d}" / "train_state.json").is_file()
    assert not (out / "model.safetensors").exists()

    resumed = sft_process(*RUN, "--max-steps", str(step + 3), "--eval-freq", "50", "--out", out, "--resume")
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert f"resumed from {out / 'checkpoints' / f'step-{step:08d}'}: step {step}" in stdout
    assert (out / "model.safetensors").is_file() and f"done: {step + 3} steps" in stdout


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare for a private tmpfs")
def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path):
    """OUT on a 60 MB tmpfs (in a private mount namespace): the first checkpoint (~40 MB) fits, the second
    does not. The run stops with "no space left on device", naming the checkpoint that is kept."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    run = " ".join(map(str, [sys.executable, "train/sft.py", *RUN, "--max-steps", "6", "--save-every", "2",
                             "--keep-checkpoints", "0", "--eval-freq", "100", "--out", mount / "run"]))
    script = (f"mount -t tmpfs -o size=60m tmpfs {mount} && cd {REPO_ROOT} && {{ {run}; echo \"exit=$?\"; }} "
              f"&& find {mount}/run -name train_state.json | sort && ls {mount}/run")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ENV, capture_output=True, text=True,
                            timeout=600)
    if "mount:" in result.stderr and "exit=" not in result.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert "exit=1" in result.stdout, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and "no space left on device" in errors[0], result.stderr
    assert f"the last good checkpoint {mount}/run/checkpoints/step-00000002 is kept" in errors[0], errors[0]
    states = [line for line in result.stdout.splitlines() if line.endswith("train_state.json")]
    assert states == [f"{mount}/run/checkpoints/step-00000002/train_state.json"], result.stdout
    assert "model.safetensors" not in result.stdout.split("train_state.json")[-1]  # no final model
