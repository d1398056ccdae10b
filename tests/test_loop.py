"""The one training loop (train/loop.py), as SFT, DPO and the classifier use it.

Every command gets what the loop has: Ctrl-C → a checkpoint → ``--resume`` ends with the weights of an
uninterrupted run; a non-finite loss of any kind stops the run with exit 1 and no model; a resumed run on
other data is refused; a second run cannot write into a folder a run is using, and a lock left by a
killed run does not block the next one. Runs are tiny and in this process (``core.cli.main``), except
where a process must be killed.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import (ENV, REPO_ROOT, SHARED_DIR, TINY_ARGS, kill_at_checkpoint, run_cli,
                      signal_after_first_evaluation, start_cli)
from safetensors.torch import load_file

from gpt2_scratch.core.cli import main

BOOK_DATA = SHARED_DIR / "data" / "instruction-data.json"
PREFERENCE_DATA = SHARED_DIR / "data" / "instruction-data-with-preference.json"
SMS = SHARED_DIR / "data" / "SMSSpamCollection.tsv"

SFT = ["sft", *TINY_ARGS, "--data", str(BOOK_DATA), "--lr", "1e-3", "--batch-size", "4", "--grad-accum", "2",
       "--max-steps", "12", "--eval-freq", "4", "--eval-iter", "1", "--max-new-tokens", "2",
       "--response-batch-size", "55", "--sample-tokens", "2", "--keep-checkpoints", "0"]


def dpo_args(model: Path) -> list[str]:
    return ["dpo", "--model", str(model), "--data", str(PREFERENCE_DATA), "--lr", "5e-4", "--batch-size", "8",
            "--max-steps", "10", "--eval-freq", "4", "--eval-iter", "1", "--max-new-tokens", "2",
            "--response-batch-size", "110", "--sample-tokens", "2", "--keep-checkpoints", "0"]


def classify_args(model: Path) -> list[str]:
    return ["classify", "--model", str(model), "--data", str(SMS), "--batch-size", "8", "--max-steps", "12",
            "--eval-freq", "4", "--eval-iter", "1", "--keep-checkpoints", "0"]


def command(name: str, tiny_model_dir: Path) -> list[str]:
    return {"sft": SFT, "dpo": dpo_args(tiny_model_dir), "classify": classify_args(tiny_model_dir)}[name]


def ctrl_c_after_first_evaluation(out: Path) -> threading.Thread:
    """Press Ctrl-C (SIGINT to this process) once the run has logged its first evaluation after a step."""
    def press() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and any('"step": 1' in line for line in metrics.read_text().splitlines()):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=press, daemon=True)
    thread.start()
    return thread


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# Three short runs each; DPO's and the classifier's go to the slow suite (the default suite stays short).
@pytest.mark.parametrize("name", ["sft", pytest.param("dpo", marks=pytest.mark.slow),
                                  pytest.param("classify", marks=pytest.mark.slow)])
def test_ctrl_c_checkpoint_resume_equals_an_uninterrupted_run(name, tiny_model_dir, tmp_path, capsys):
    argv = command(name, tiny_model_dir)
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0

    out = tmp_path / "stopped"
    ctrl_c_after_first_evaluation(out)
    assert main([*argv, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "stopping after this step" in err
    (checkpoint,) = (out / "checkpoints").iterdir()
    assert not (out / "model.safetensors").exists()
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state["cpu_threads"] == torch.get_num_threads()
    if name == "sft":  # as if the checkpoint came from a run with other threads: said, since bits may differ
        (checkpoint / "train_state.json").write_text(json.dumps({**state, "cpu_threads": state["cpu_threads"] + 1}))
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"resumed from {checkpoint}" in printed
    assert (f"checkpoint's had {state['cpu_threads'] + 1}" in printed) == (name == "sft")

    assert steps(out) == steps(tmp_path / "whole")  # every evaluation logged once
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    assert not (out / ".lock").exists()  # released at the end


def test_sigterm_checkpoints_says_how_to_continue_and_resume_ends_with_the_uninterrupted_weights(tmp_path):
    """What `timeout`, `kill`, `docker stop` and a cluster's preemption send: a real `train/sft.py` gets SIGTERM
    mid-training, finishes the step, saves a checkpoint, prints one line saying how to continue and exits 143;
    `--resume` then ends with the weights of a run never interrupted (the schedule is constant, so the stopped
    run's --max-steps may be longer than the resumed one's)."""
    run = [*SFT[1:], "--eval-freq", "50", "--keep-checkpoints", "0"]
    out = tmp_path / "stopped"
    proc = start_cli("train/sft.py", *run, "--max-steps", "400", "--out", out, env=ENV)
    stdout, stderr = signal_after_first_evaluation(proc, out, signal.SIGTERM)
    assert proc.returncode == 143, stderr
    assert "SIGTERM: stopping after this step" in stderr and "Traceback" not in stderr
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("stopped at step")]
    step = int(line.split()[3].rstrip(":"))
    checkpoint = out / "checkpoints" / f"step-{step:08d}"
    assert f"SIGTERM; checkpoint saved in {out / 'checkpoints'}" in line and "--resume" in line
    assert (checkpoint / "train_state.json").is_file() and not (out / "model.safetensors").exists()
    assert not (out / ".lock").exists()  # released on the way out

    resumed = run_cli("train/sft.py", *run, "--max-steps", step + 2, "--out", out, "--resume", env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {checkpoint}" in resumed.stdout
    whole = run_cli("train/sft.py", *run, "--max-steps", step + 2, "--out", tmp_path / "whole", env=ENV)
    assert whole.returncode == 0, whole.stderr
    expected, got = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_output_folder_deleted_while_training_stops_the_run_without_recreating_it(tmp_path):
    """`rm -rf OUT` under a running `sft`: the next write (a metrics row, a checkpoint, the final model) finds
    its lock file gone, and the run stops with one line (exit 1) instead of re-creating OUT with only the files
    written from then on."""
    import shutil

    out = tmp_path / "doomed"
    proc = start_cli("train/sft.py", *SFT[1:], "--eval-freq", "1", "--max-steps", "400", "--out", out, env=ENV)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and b'"step": 2,' in metrics.read_bytes()) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    shutil.rmtree(out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--out {out} was deleted or replaced while this run was using it" in errors[0], stderr
    assert "Traceback" not in stderr and "done:" not in stdout
    assert not out.exists()


@pytest.mark.slow  # two fresh interpreters (~10 s each here)
def test_classify_resume_after_sigkill_is_bit_identical(tiny_model_dir, tmp_path):
    argv = [*classify_args(tiny_model_dir), "--save-every", "4"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "killed"
    kill_at_checkpoint([sys.executable, "train/classify.py", *argv[1:], "--out", out],
                       out / "checkpoints" / "step-00000004" / "train_state.json", cwd=REPO_ROOT,
                       env={**ENV, "OMP_NUM_THREADS": str(torch.get_num_threads())})  # bits depend on threads
    assert (out / ".lock").exists()  # left behind by the killed run: it must not block the resume
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    assert steps(out) == steps(tmp_path / "whole")


def test_a_nan_validation_loss_stops_dpo_with_exit_1_and_no_model(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The guard is the loop's, on every loss it reports: here DPO's validation loss turns NaN at the second
    evaluation (the loss itself is replaced; the guard and what happens after it are real)."""
    from gpt2_scratch.train import dpo

    measure = dpo.DPOTask.measure
    calls = []

    def nan_on_second_validation(self, run, loader, split, prefix):
        row = measure(self, run, loader, split, prefix)
        if prefix == "val":
            calls.append(run.state.step)
            if len(calls) == 3:  # initial, step 1, step 5
                row["val_loss"] = float("nan")
        return row

    monkeypatch.setattr(dpo.DPOTask, "measure", nan_on_second_validation)
    out = tmp_path / "run"
    assert main([*dpo_args(tiny_model_dir), "--out", str(out), "--save-every", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: training diverged at step 5: the val loss is nan")
    assert "last good checkpoint is" in err and "step-00000004" in err
    assert not (out / "model.safetensors").exists()
    assert all(json.loads(line).get("val_loss") == json.loads(line).get("val_loss")  # no NaN row was logged
               for line in (out / "metrics.jsonl").read_text().splitlines())
    assert not (out / ".lock").exists()


def test_resume_on_changed_data_is_refused_unless_asked(tmp_path, capsys):
    data = tmp_path / "data.json"
    records = json.loads(BOOK_DATA.read_text())
    data.write_text(json.dumps(records))
    argv = [*SFT, "--data", str(data), "--save-every", "4", "--out", str(tmp_path / "run")]
    assert main([*argv, "--max-steps", "4"]) == 0
    capsys.readouterr()
    data.write_text(json.dumps(records[::-1]))  # the same records, another order: another run
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert main([*argv, "--max-steps", "6", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume: --data") and "differs from the data the checkpoint" in err
    assert "--resume-other-data" in err and len(err.splitlines()) == 1
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    assert main([*argv, "--max-steps", "6", "--resume", "--resume-other-data"]) == 0


def test_resume_of_a_finished_run_is_refused_and_every_row_is_logged_once(tmp_path, capsys):
    """A run finished at its last step: --resume says so (exit 2) and touches nothing. A run that stopped while
    finishing (no model saved yet) is finished by --resume without evaluating or logging anything twice, and
    one continued with a higher --max-steps keeps each row once (the old run's final timing row is dropped)."""
    out, data = tmp_path / "run", tmp_path / "data.json"
    data.write_text(json.dumps(json.loads(BOOK_DATA.read_text())[:80]))  # 8 steps an epoch: none ends here
    argv = [*SFT, "--data", str(data), "--max-steps", "4", "--save-every", "4", "--out", str(out)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], bool(r.get("timing"))) for r in rows] == [(0, False), (1, False), (4, False), (4, True)]
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --resume: the run in {out} already finished at step 4; raise --max-steps or --epochs "
                   "to train on, or start again with --overwrite")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # Stopped while saving the model: no timing row, no model. --resume only finishes the run.
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    (out / "model.safetensors").unlink()
    assert main([*argv, "--resume"]) == 0
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert again[:-1] == rows[:-1] and again[-1]["timing"] and again[-1]["step"] == 4
    assert (out / "model.safetensors").is_file()

    assert main([*argv, "--max-steps", "6", "--resume"]) == 0  # a constant schedule may be run longer
    longer = [(r["step"], bool(r.get("timing"))) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert longer == [(0, False), (1, False), (4, False), (5, False), (6, False), (6, True)]


def test_a_second_run_cannot_use_a_folder_in_use(tmp_path, capsys):
    """A run in another process holds OUT; a second one (here: --overwrite, which would delete its files)
    stops with one line naming that process, and touches nothing."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train/sft.py", *SFT[1:], "--max-steps", "100000", "--eval-freq", "1000",
                              "--out", str(out)], cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "args.json").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early"
        args_json = (out / "args.json").read_bytes()
        assert main([*SFT, "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --out {out} is in use by another run (pid {first.pid} ")
        assert len(err.splitlines()) == 1
        assert (out / "args.json").read_bytes() == args_json and (out / "metrics.jsonl").exists()  # nothing cleared
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


def test_part_of_the_data_that_can_teach_nothing_is_a_warning_with_its_count(caplog):
    """What cannot be learned from at all stops the run (tests/test_bad_input_silent.py); a part is counted."""
    from types import SimpleNamespace

    from gpt2_scratch.train import dpo, sft

    examples = SimpleNamespace(train={"length": [40, 30, 50], "prompt_length": [40, 10, 20]})
    sft.check_learnable(examples, SimpleNamespace(mask_prompt=True, data="d.json"))
    pairs = SimpleNamespace(train=_Rows(chosen_ids=[[1, 2], [3], [5]], rejected_ids=[[1, 2], [4], [6]]))
    dpo.check_learnable(pairs, SimpleNamespace(data="p.json"))
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warning:")]
    assert warnings == ["warning: 1 of 3 training examples keep no response token after truncation (with "
                        "--mask-prompt they teach only <|endoftext|>)",
                        "warning: 1 of 3 training pairs have the same chosen and rejected answer (they teach nothing)"]


class _Rows(dict):
    """What check_learnable uses of a datasets.Dataset: its columns by name, and its number of rows."""

    def __len__(self) -> int:
        return len(next(iter(self.values())))


def test_a_new_kind_of_training_is_one_task_with_three_hooks(tiny_model_dir, tmp_path):
    """The contract the next kinds of training build on (train/task.py): options, a set_up and a Task that
    writes only ``units``, ``loss`` and ``evaluate`` (here: next-token loss on raw token sequences, pretraining
    in miniature) run through ``run_training`` with every other hook at its default: the loop logs, checkpoints
    and evaluates, and ``Task.finish`` leaves the model at the top of OUT."""
    from dataclasses import dataclass

    from gpt2_scratch.convert.resolve import load_model
    from gpt2_scratch.train.data import EpochBatchSampler
    from gpt2_scratch.train.options import ModelOptions, RunOptions
    from gpt2_scratch.train.run import launch, run_training, start
    from gpt2_scratch.train.state import fingerprint
    from gpt2_scratch.train.task import Task, mean_loss

    @dataclass
    class RawTextArgs(ModelOptions, RunOptions):
        pass

    class NextToken(Task):
        name, units_seen_key = "raw-text", "targets_seen"

        def units(self, batch):
            return batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)

        def loss(self, model, batch):
            out = model(batch["input_ids"], labels=batch["input_ids"], use_cache=False, return_logits=False,
                        num_items_in_batch=1)
            count = torch.tensor(float(out.label_logprobs.numel()), dtype=torch.float64)
            return out.loss, torch.stack([out.loss.detach().double(), count])

        def evaluate(self, run, running):
            return {"train_loss": mean_loss(running)}

    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, 50257, (12, 16), generator=generator)

    def set_up(args):
        started = start(args, inputs=[("--model", args.model)])
        sampler = EpochBatchSampler([16] * len(sequences), args.batch_size, shuffle=True, drop_last=True, seed=args.seed)
        run, _ = launch(started, model=load_model(args.model).train(), train_dataset=sequences, train_sampler=sampler,
                        collate=lambda rows: {"input_ids": torch.stack(rows)}, eval_loaders={},
                        data_sha256=fingerprint(sequences.tolist()))
        return run, NextToken()

    out = tmp_path / "out"
    args = RawTextArgs(model=str(tiny_model_dir), out=str(out), epochs=2, batch_size=4, eval_freq=2, lr=1e-3)
    assert run_training(args, set_up) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 3, 5, 6]
    assert rows[-2]["targets_seen"] == 6 * 4 * 15 and rows[-1].get("timing")
    assert (out / "model.safetensors").is_file() and len(list((out / "checkpoints").iterdir())) == 2
