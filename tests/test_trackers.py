"""--report-to: what a run logs to metrics.jsonl reaches TensorBoard, MLflow, trackio and W&B (offline), read back
with each tracker's own reader; a resumed run continues the same tracker runs with every step once."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from gpt2_scratch.core.errors import InputError
from gpt2_scratch.train import trackers as trackers_module
from gpt2_scratch.train.metrics import MetricsLog
from gpt2_scratch.train.trackers import Trackers, check_installed, split_row, tracker_config

pytest.importorskip("tensorboard", reason="the tracker tests need tensorboard: pip install -e '.[dev]'")
pytest.importorskip("mlflow", reason="the tracker tests need mlflow: pip install -e '.[dev]'")

TRACKER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "WANDB_MODE", "TRACKIO_DIR")


@pytest.fixture(autouse=True)
def local_trackers(monkeypatch):
    """Each tracker in its default, local place: none of their environment variables from outside."""
    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)


def has(module: str) -> bool:
    return trackers_module._installed(module)


# ---------------------------------------------------------------------------------------------------
# What a run logged, as each tracker's own reader sees it: {key: [(step, value), ...]}
# ---------------------------------------------------------------------------------------------------


def expected_series(rows: list[dict]) -> dict[str, list]:
    """metrics.jsonl's numbers per key, in order; a row's split prefixes its keys (``full/val_loss``)."""
    series = {}
    for row in rows:
        prefix = f"{row['split']}/" if "split" in row else ""
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(prefix + key, []).append((row["step"], value))
    return series


def tensorboard_series(log_dir: Path) -> tuple[dict, list]:
    """(scalars per tag, text tags) through TensorBoard's EventAccumulator, which applies purge_step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return scalars, acc.Tags()["tensors"]


def mlflow_series(tracking_uri: str, run_id: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
            for key in client.get_run(run_id).data.metrics}


def trackio_series(project: str, run: str) -> dict:
    from trackio.sqlite_storage import SQLiteStorage

    series = {}
    for log in SQLiteStorage.get_logs(project, run):
        for key, value in log.items():
            if key not in ("step", "timestamp"):
                series.setdefault(key, []).append((log["step"], value))
    return series


def wandb_series(wandb_dir: Path, run_id: str) -> dict:
    """The history records of the offline runs' transaction logs (wandb has no Python reader for them any more):
    W&B's header, then LevelDB-log records (32 KiB blocks; each a 7-byte header: checksum, length, type)
    holding wandb's own protobuf ``Record`` messages. Several offline runs with one id: a resumed run."""
    from wandb.proto import wandb_internal_pb2

    series = {}
    for path in sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", path
        pos, block, pending = 7, 32768, b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a header is padding
                pos += block - pos % block
                continue
            length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # FULL or LAST: a whole record
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item}
                    for key, value in items.items():
                        if not key.startswith("_") and isinstance(value, (int, float)):
                            series.setdefault(key, []).append((items["_step"], value))
    return series


def untimed(rows: list[dict]) -> list[dict]:
    """The rows without their timings (throughput, seconds per phase), which no two runs share."""
    return [{k: v for k, v in row.items() if k != "tokens_per_sec" and not k.startswith("seconds")} for row in rows]


def by_step(series: dict) -> dict:
    """W&B keeps one history row per step (the last value of a key at that step)."""
    return {key: sorted(dict(points).items()) for key, points in series.items()}


def assert_same(got: dict, want: dict, *, rel: float = 1e-12) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key in want:
        assert [s for s, _ in got[key]] == [s for s, _ in want[key]], key  # every step once, in order
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in want[key]], rel=rel), key


# ---------------------------------------------------------------------------------------------------
# The module's pieces
# ---------------------------------------------------------------------------------------------------


def test_a_tracker_that_is_not_installed_is_one_line_naming_its_extra(monkeypatch):
    monkeypatch.setattr(trackers_module, "_installed", lambda module: module != "mlflow")
    with pytest.raises(InputError) as err:
        check_installed(["tensorboard", "mlflow"])
    assert str(err.value) == "--report-to mlflow needs mlflow: pip install 'gpt2-scratch[mlflow]'"
    monkeypatch.setattr(trackers_module, "_installed", lambda module: module not in ("wandb", "alembic"))
    with pytest.raises(InputError, match=r"^--report-to wandb needs wandb: pip install 'gpt2-scratch\[wandb\]'$"):
        check_installed(["wandb"])
    with pytest.raises(InputError, match=r"needs alembic: pip install 'gpt2-scratch\[mlflow\]'"):
        check_installed(["mlflow"])
    with pytest.raises(InputError, match="unknown tracker; choose from none, tensorboard, mlflow, wandb, trackio"):
        check_installed(["comet"])
    assert check_installed(["none"]) == [] and check_installed(["tensorboard", "tensorboard"]) == ["tensorboard"]


def test_rows_become_numbers_at_their_step_and_texts():
    assert split_row({"epoch": 1, "step": 3, "train_loss": 0.5, "initial": True, "sample": "hi"}) == (
        3, {"epoch": 1, "train_loss": 0.5}, {"sample": "hi"})
    assert split_row({"step": 6, "split": "full", "val_loss": 0.7, "val_accuracy": 0.5}) == (
        6, {"full/val_loss": 0.7, "full/val_accuracy": 0.5}, {})


def test_a_tracker_that_fails_is_dropped_and_the_others_go_on(caplog):
    class Broken:
        def log(self, values, step=None):
            raise OSError("No space left on device")

        def finish(self):
            raise OSError("still no space")

    class Kept:
        rows, finished = [], False

        def log(self, values, step=None):
            self.rows.append((step, values))

        def finish(self):
            self.finished = True

    kept = Kept()
    trackers = Trackers([trackers_module._Tracker("mlflow", Broken()), trackers_module._Tracker("tensorboard", kept)])
    trackers.log({"step": 1, "train_loss": 0.5, "sample": "text"})
    trackers.log({"step": 2, "train_loss": 0.25})
    trackers.close()
    assert kept.rows == [(1, {"train_loss": 0.5, "sample": "text"}), (2, {"train_loss": 0.25})] and kept.finished
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["--report-to mlflow: logging failed, no more rows go to it (metrics.jsonl has them): "
                        "No space left on device",
                        "--report-to mlflow: could not close its run: still no space"]


@dataclasses.dataclass
class FakeArgs:
    """The fields of a run's arguments the trackers read, and a few others for the config."""

    out: str
    report_to: list = dataclasses.field(default_factory=lambda: ["tensorboard", "mlflow"])
    project: str | None = None
    run_name: str | None = None
    lr: float = 5e-5
    max_steps: int | None = None
    resume: str | None = None
    compile: bool = False


def test_the_config_is_flat_and_plain():
    config = tracker_config(FakeArgs(out="runs/x"))
    assert config == {"out": "runs/x", "report_to": '["tensorboard", "mlflow"]', "project": "null",
                      "run_name": "null", "lr": 5e-5, "max_steps": "null", "resume": "null", "compile": False}


ROWS = ([{"epoch": 0, "step": 0, "train_loss": 2.0, "val_loss": 2.1, "tokens_seen": 0, "initial": True}]
        + [{"epoch": 1, "step": s, "train_loss": 1.0 / s, "val_loss": 1.5 / s, "lr": 5e-5, "tokens_seen": 100 * s}
           for s in (1, 3, 5, 6)]
        + [{"epoch": 1, "step": 6, "sample": "### Response:\nhello"}, {"step": 6, "split": "full", "val_loss": 0.7}])
CHECKPOINT_STEP = 4  # the resumed run starts after it: the rows of steps 5 and 6 come again


def log_rows(trackers: Trackers, metrics: MetricsLog, rows: list[dict]) -> None:
    """What Run.log does: metrics.jsonl, then the trackers."""
    for row in rows:
        metrics.log(row)
        trackers.log(row)


def crash_and_resume(tmp_path, first: list[str], then: list[str], more: list[dict]) -> tuple[Path, dict]:
    """A run with trackers ``first`` logs ROWS and is killed; it resumes from step 4 with ``then`` (train/run.py's
    launch: metrics.jsonl cut after the checkpoint, the dropped rows' count as skip_rows) and logs the rows
    after step 4 again, then ``more``. Returns OUT and run.json."""
    out = tmp_path / "run"
    metrics = MetricsLog(out / "metrics.jsonl")
    trackers = Trackers.start(FakeArgs(out=str(out), report_to=first), out)
    log_rows(trackers, metrics, ROWS)
    trackers.close()
    first_ids = json.loads((out / "trackers" / "run.json").read_text())
    dropped = metrics.truncate_after(CHECKPOINT_STEP)
    assert dropped == 4
    trackers = Trackers.start(FakeArgs(out=str(out), report_to=then, resume="latest", run_name="ignored"), out,
                              resuming=True, skip_rows=dropped)
    log_rows(trackers, metrics, [row for row in ROWS if row["step"] > CHECKPOINT_STEP] + more)
    trackers.close()
    trackers.close()  # safe twice (run.py closes on errors too)
    saved = json.loads((out / "trackers" / "run.json").read_text())
    for name in set(first) & set(then):
        assert saved[name] == first_ids[name], name  # the same tracker run
    assert saved["run_name"] == "run"  # OUT's name, kept on resume
    return out, saved


def test_a_resumed_run_continues_the_same_tracker_runs_with_each_step_once(tmp_path):
    more = [{"epoch": 2, "step": 7, "train_loss": 0.1, "val_loss": 0.2, "lr": 5e-5, "tokens_seen": 700}]
    out, saved = crash_and_resume(tmp_path, ["tensorboard", "mlflow"], ["tensorboard", "mlflow"], more)
    rows = MetricsLog(out / "metrics.jsonl").read()
    assert [row["step"] for row in rows] == [0, 1, 3, 5, 6, 6, 6, 7]
    want = expected_series(rows)
    assert want["full/val_loss"] == [(6, 0.7)] and "initial" not in want

    log_dir = out / "trackers" / "tensorboard" / "run"
    assert saved["tensorboard"]["where"] == str(log_dir)
    scalars, texts = tensorboard_series(log_dir)
    assert_same(scalars, want, rel=1e-6)  # float32 event values
    assert "sample/text_summary" in texts  # the epoch sample, as text
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2  # two sessions, one run

    assert saved["mlflow"]["tracking_uri"] == f"sqlite:///{out.resolve() / 'trackers' / 'mlflow.db'}"
    assert_same(mlflow_series(saved["mlflow"]["tracking_uri"], saved["mlflow"]["run_id"]), want)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(saved["mlflow"]["tracking_uri"])
    run = client.get_run(saved["mlflow"]["run_id"])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "5e-05" and run.data.params["report_to"] == '["tensorboard", "mlflow"]'
    experiment = client.get_experiment_by_name("gpt2-scratch")
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_a_tracker_added_on_resume_gets_the_rows_so_far(tmp_path):
    out, saved = crash_and_resume(tmp_path, ["tensorboard"], ["tensorboard", "mlflow"], [])
    want = expected_series(MetricsLog(out / "metrics.jsonl").read())
    assert_same(mlflow_series(saved["mlflow"]["tracking_uri"], saved["mlflow"]["run_id"]), want)
    assert_same(tensorboard_series(out / "trackers" / "tensorboard" / "run")[0], want, rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# A real run: classify on the SMS data with a tiny model, then resumed from its step-4 checkpoint
# ---------------------------------------------------------------------------------------------------

REAL_TRACKERS = ["tensorboard", "mlflow"] + [name for name in ("trackio", "wandb") if has(name)]


def read_trackers(out: Path, saved: dict) -> dict:
    """Every tracker's series, by its own reader."""
    got = {"tensorboard": tensorboard_series(Path(saved["tensorboard"]["where"]))[0],
           "mlflow": mlflow_series(saved["mlflow"]["tracking_uri"], saved["mlflow"]["run_id"])}
    if "trackio" in saved:
        got["trackio"] = trackio_series(saved["project"], saved["run_name"])
    if "wandb" in saved:
        got["wandb"] = wandb_series(out / "trackers" / "wandb", saved["wandb"]["id"])
    return got


def classify_argv(out: Path, tiny_model_dir: Path, shared_dir: Path) -> list[str]:
    return ["classify", "--model", str(tiny_model_dir), "--data", str(shared_dir / "data" / "SMSSpamCollection.tsv"),
            "--out", str(out), "--max-steps", "6", "--eval-freq", "2", "--eval-iter", "1", "--save-every", "2",
            "--keep-checkpoints", "0", "--report-to", *REAL_TRACKERS]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, tiny_model_dir, shared_dir):
    """Steps 1..6 to the end, checkpoints at 2, 4, 6; what metrics.jsonl and the trackers hold then."""
    from gpt2_scratch.core.cli import main

    out = tmp_path_factory.mktemp("trackers") / "spam"
    with pytest.MonkeyPatch.context() as env:
        for name in TRACKER_ENV:
            env.delenv(name, raising=False)
        assert main(classify_argv(out, tiny_model_dir, shared_dir)) == 0
    saved = json.loads((out / "trackers" / "run.json").read_text())
    return dict(out=out, rows=MetricsLog(out / "metrics.jsonl").read(), saved=saved, got=read_trackers(out, saved))


@pytest.fixture(scope="module")
def resumed_real_run(real_run, tiny_model_dir, shared_dir):
    """The same run as if it had died after step 6, resumed from step 4: the rows of steps 5 and 6 and the final
    evaluation come again (train/run.py passes how many as skip_rows)."""
    from gpt2_scratch.core.cli import main
    from gpt2_scratch.train.checkpoints import checkpoint_name

    out = real_run["out"]
    checkpoint = out / "checkpoints" / checkpoint_name(4)
    assert checkpoint.is_dir()
    shutil.rmtree(out / "checkpoints" / checkpoint_name(6))
    with pytest.MonkeyPatch.context() as env:
        for name in TRACKER_ENV:
            env.delenv(name, raising=False)
        assert main([*classify_argv(out, tiny_model_dir, shared_dir), "--resume", str(checkpoint)]) == 0
    saved = json.loads((out / "trackers" / "run.json").read_text())
    return dict(rows=MetricsLog(out / "metrics.jsonl").read(), saved=saved, got=read_trackers(out, saved))


def test_a_real_run_reaches_every_tracker(real_run):
    out, rows, got = real_run["out"], real_run["rows"], real_run["got"]
    assert [row["step"] for row in rows if "val_loss" in row and "split" not in row] == [1, 3, 5, 6]
    assert [row["step"] for row in rows if row.get("split") == "full"] == [6]  # the final evaluation
    want = expected_series(rows)
    assert "full/test_accuracy" in want and len(want["val_loss"]) == 4
    assert set(got) == set(REAL_TRACKERS)
    for name, series in got.items():
        assert_same(by_step(series) if name == "wandb" else series, want, rel=1e-6 if name == "tensorboard" else 1e-12)
    saved = real_run["saved"]
    assert saved["project"] == "gpt2-scratch" and saved["run_name"] == "spam"
    assert Path(saved["tensorboard"]["where"]) == out / "trackers" / "tensorboard" / "spam"
    assert saved["mlflow"]["tracking_uri"] == f"sqlite:///{out.resolve() / 'trackers' / 'mlflow.db'}"
    if "trackio" in saved:
        assert Path(saved["trackio"]["dir"]) == (out / "trackers" / "trackio").resolve()
        assert (out / "trackers" / "trackio" / "gpt2-scratch.db").is_file()


@pytest.mark.slow  # a second run (about a minute on 2 cores): CI's slow tests
def test_a_resumed_real_run_has_each_step_once_in_the_same_tracker_runs(real_run, resumed_real_run):
    first, then = real_run, resumed_real_run
    rows, saved, got = then["rows"], then["saved"], then["got"]
    # The rows of steps 5 and 6 (the final evaluation too) were logged again. TensorBoard holds the resumed run's
    # copies (the old ones purged); the others kept the first run's (the copies skipped). They differ only in
    # their timings.
    assert [row["step"] for row in rows] == [row["step"] for row in first["rows"]]
    for name in REAL_TRACKERS:
        assert saved[name] == first["saved"][name], name  # the same tracker run
        want = expected_series(rows if name == "tensorboard" else first["rows"])
        assert_same(by_step(got[name]) if name == "wandb" else got[name], want,
                    rel=1e-6 if name == "tensorboard" else 1e-12)
    assert untimed(rows) == untimed(first["rows"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(saved["mlflow"]["tracking_uri"])
    assert len(client.search_runs([client.get_experiment_by_name("gpt2-scratch").experiment_id])) == 1
    if "trackio" in saved:
        import trackio

        assert [run.name for run in trackio.Api().runs("gpt2-scratch")] == ["spam"]
    if "wandb" in saved:  # W&B writes one offline folder per session of the run, all with its id
        assert len(list((first["out"] / "trackers" / "wandb").glob(f"offline-run-*-{saved['wandb']['id']}"))) == 2


RESUME_TRACKERS = """
import sys, types
from gpt2_scratch.core.cli import run_command
from gpt2_scratch.train.trackers import Trackers
args = types.SimpleNamespace(report_to=["tensorboard"], project=None, run_name=None, lr=5e-5)
sys.exit(run_command(lambda: Trackers.start(args, sys.argv[1], resuming=True).close()))
"""


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_a_read_only_trackers_folder_on_resume_is_one_line_and_no_thread_traceback(tmp_path):
    """A 15-line traceback from TensorBoard's writer thread used to come before the one-line error."""
    import subprocess
    import sys
    import tempfile

    # pytest's own folder is private to its user: the run goes where another user can read it.
    tmp_path = Path(tempfile.mkdtemp(prefix="read-only-trackers-"))
    out = tmp_path / "run"
    Trackers.start(FakeArgs(out=str(out), report_to=["tensorboard"]), out).close()  # the first start
    command = [sys.executable, "-c", RESUME_TRACKERS, str(out)]
    if os.geteuid() == 0:  # root writes anywhere: resume as an ordinary user, as the files' readers would
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: no way to make a folder read-only")
        os.chmod(tmp_path, 0o755)
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    for folder in [out / "trackers", *(p for p in (out / "trackers").rglob("*") if p.is_dir())]:
        os.chmod(folder, 0o555)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HOME": str(tmp_path)})
    finally:
        for folder in [out / "trackers", *(p for p in (out / "trackers").rglob("*") if p.is_dir())]:
            os.chmod(folder, 0o755)
        shutil.rmtree(tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: --report-to {out / 'trackers'}: cannot write in "
                                                f"{out / 'trackers'} (Permission denied); choose a folder you can "
                                                "write to"]
