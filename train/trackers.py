"""Experiment trackers (``--report-to``): every ``metrics.jsonl`` row also goes to TensorBoard, MLflow, W&B or
trackio, through Accelerate's own tracker classes (``accelerate.tracking``).

    trackers = Trackers.start(args, out, resuming=..., skip_rows=...)   # train/run.py, main process only
    trackers.log(row)                                                   # every metrics.jsonl row
    trackers.close()                                                    # however the run ends

Everything stays local unless the tracker's own environment says otherwise, so a run needs no network:

    tensorboard   event files in OUT/trackers/tensorboard/RUN_NAME     tensorboard --logdir OUT/trackers/tensorboard
    mlflow        a SQLite store, OUT/trackers/mlflow.db (artifacts:   mlflow ui --backend-store-uri
                  OUT/trackers/mlruns); MLFLOW_TRACKING_URI overrides    sqlite:///OUT/trackers/mlflow.db
    wandb         an offline run in OUT/trackers/wandb (WANDB_MODE      wandb sync OUT/trackers/wandb/offline-run-*
                  overrides)
    trackio       its SQLite store in OUT/trackers/trackio (TRACKIO_DIR  TRACKIO_DIR=OUT/trackers/trackio
                  overrides)                                             trackio show --project PROJECT

A row's numbers are logged at the row's ``step``; booleans (``initial``) are not numbers here. A row's ``split``
(classify's final ``"full"`` evaluation) prefixes its keys (``full/val_loss``), so they do not land on the
running estimates of the same step. Other strings (the epoch sample) go as text to TensorBoard and W&B. W&B
drops rows at a step below 0 (``--book-exact``'s initial losses, at the book's step -1).

``--resume`` continues the same tracker runs: OUT/trackers/run.json keeps the project, the run name and each
tracker's run (MLflow run id, W&B id, the stores' places) from the run's first start. The rows logged after
the checkpoint are logged again by the resumed run (``skip_rows`` of them, already dropped from
metrics.jsonl), and every step must appear once: MLflow, W&B and trackio skip the first ``skip_rows`` rows;
TensorBoard takes them again and hides the old ones with ``purge_step`` (exact even if a crash came between
the two writes). A tracker that joins the run on a resume gets the rows of metrics.jsonl first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2_scratch.core.errors import Failure, InputError, one_line
from gpt2_scratch.core.args import check_plain_name
from gpt2_scratch.core.files import check_writable_folder, write_json_atomic
from gpt2_scratch.train.metrics import MetricsLog

logger = logging.getLogger(__name__)

DEFAULT_PROJECT = "gpt2-scratch"
RUN_FILE = "run.json"  # under OUT/trackers
# The modules each tracker needs, and the pip extra that installs them.
NEEDS = {
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),  # mlflow's SQLite store needs SQLAlchemy and alembic
    "wandb": ("wandb",),
    "trackio": ("trackio",),
}
TEXT_TRACKERS = ("tensorboard", "wandb")  # those whose Accelerate tracker logs strings (as text)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec
        return False


def check_installed(report_to: list[str]) -> list[str]:
    """The trackers ``--report-to`` names (``none`` left out, each once), or an ``InputError`` naming the pip
    extra of the first one not installed. Writes nothing: a pre-flight check."""
    names = list(dict.fromkeys(name for name in report_to if name != "none"))
    for name in names:
        if name not in NEEDS:
            raise InputError(f"--report-to {name}: unknown tracker; choose from none, {', '.join(NEEDS)}")
        missing = [module for module in NEEDS[name] if not _installed(module)]
        if missing:
            raise InputError(f"--report-to {name} needs {' and '.join(missing)}: "
                             f"pip install 'gpt2-scratch[{name}]'")
    return names


def tracker_config(args: Any) -> dict:
    """The run's arguments as a flat dict of str, int, float and bool (what every tracker takes as its
    config): lists, dicts and None as JSON text."""
    fields = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
    return {key: value if isinstance(value, (str, int, float, bool)) else json.dumps(value, default=str)
            for key, value in fields.items()}


def split_row(row: dict) -> tuple[int | None, dict, dict]:
    """A metrics row as (step, numbers, texts): ``split`` prefixes the keys, ``step`` and booleans are left out."""
    prefix = f"{row['split']}/" if isinstance(row.get("split"), str) else ""
    step = row.get("step")
    numbers, texts = {}, {}
    for key, value in row.items():
        if key in ("step", "split") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            numbers[prefix + key] = value
        elif isinstance(value, str):
            texts[prefix + key] = value
    return (step if isinstance(step, int) and not isinstance(step, bool) else None), numbers, texts


@dataclass
class _Tracker:
    name: str
    tracker: Any  # an accelerate.tracking.GeneralTracker, started
    skip: int = 0  # rows still to skip: the tracker already has them (a resume)

    def send(self, row: dict) -> None:
        step, numbers, texts = split_row(row)
        values = {**numbers, **texts} if self.name in TEXT_TRACKERS else numbers
        if values:
            self.tracker.log(values, step=step)

    def finish(self) -> None:
        with _quiet(self.name):
            if self.name == "trackio":
                import trackio  # deferred: an optional dependency

                # Accelerate's finish would leave the run current, and trackio's exit hook would finish it again.
                trackio.finish()
            else:
                self.tracker.finish()


def _quiet(name: str):
    """trackio prints its own hints on stdout (one of them, ``trackio show``, without our TRACKIO_DIR)."""
    return contextlib.redirect_stdout(io.StringIO()) if name == "trackio" else contextlib.nullcontext()


class Trackers:
    """The run's started trackers; ``log`` sends a metrics row to each, ``close`` ends them."""

    def __init__(self, trackers: list[_Tracker], where: dict[str, str] | None = None):
        self.trackers = trackers
        self.where = where or {}  # tracker name → where its data is (for the log line and tests)

    @classmethod
    def start(cls, args: Any, out: str | os.PathLike, *, resuming: bool = False, skip_rows: int = 0) -> Trackers:
        """Start every tracker of ``args.report_to`` (the tracker runs of OUT/trackers/run.json when
        ``resuming``), store the run's arguments as their config, and record the runs in run.json."""
        names = check_installed(list(args.report_to))
        from accelerate import PartialState  # deferred: accelerate is heavy, and --report-to none needs none of it

        PartialState()  # Accelerate's trackers log through its process-aware logger
        out = Path(out)
        root = out / "trackers"
        saved = _read_run_file(root / RUN_FILE) if resuming else {}
        project = saved.get("project") or getattr(args, "project", None) or DEFAULT_PROJECT
        run_name = saved.get("run_name") or getattr(args, "run_name", None) or out.resolve().name
        for option, value, kept in (("--project", getattr(args, "project", None), project),
                                    ("--run-name", getattr(args, "run_name", None), run_name)):
            if resuming and value and value != kept:
                logger.warning("%s %s: the resumed tracker runs keep their first name, %s", option, value, kept)
        check_plain_name(run_name, "--run-name")  # also a name from run.json or a caller: never a path out of root
        root.mkdir(parents=True, exist_ok=True)
        _check_writable(root)
        config = tracker_config(args)
        history = _read_history(out) if resuming else []
        record = {"project": project, "run_name": run_name, **{k: v for k, v in saved.items() if k in NEEDS}}
        trackers = cls([])
        try:
            for name in names:
                prior = saved.get(name)  # None: the run's first start with this tracker
                tracker, info = STARTERS[name](root, project, run_name, prior, config=config, history=history)
                entry = _Tracker(name, tracker)
                trackers.trackers.append(entry)
                if prior is None:
                    if name != "trackio":  # trackio took it in init (see _start_trackio)
                        tracker.store_init_configuration(config)
                    for row in history:  # joined on a resume: the rows so far
                        entry.send(row)
                elif name != "tensorboard":  # TensorBoard hides its copies itself (purge_step)
                    entry.skip = skip_rows
                record[name] = info
                trackers.where[name] = info.get("where", "")
        except BaseException as err:
            trackers.close()
            if isinstance(err, Exception) and not isinstance(err, (InputError, Failure)):
                raise Failure(f"--report-to {name}: the tracker could not start: {one_line(err)}") from err
            raise
        write_json_atomic(root / RUN_FILE, record)
        logger.info("trackers%s: %s", " (resumed)" if resuming else "",
                    "; ".join(f"{name} {where}" for name, where in trackers.where.items()))
        return trackers

    def log(self, row: dict) -> None:
        """One metrics row to every tracker (after the rows a resumed tracker already has). A tracker that
        fails is dropped with a warning: metrics.jsonl, the run's record, goes on."""
        for entry in list(self.trackers):
            if entry.skip > 0:
                entry.skip -= 1
                continue
            try:
                entry.send(row)
            except Exception as err:
                logger.warning("--report-to %s: logging failed, no more rows go to it (metrics.jsonl has them): %s",
                               entry.name, one_line(err))
                self.trackers.remove(entry)
                self._finish(entry)

    def close(self) -> None:
        """End every tracker run (flushes their files); safe to call twice."""
        while self.trackers:
            self._finish(self.trackers.pop(0))

    @staticmethod
    def _finish(entry: _Tracker) -> None:
        try:
            entry.finish()
        except Exception as err:
            logger.warning("--report-to %s: could not close its run: %s", entry.name, one_line(err))


def _check_writable(root: Path) -> None:
    """OUT/trackers and every folder in it can take new files: checked before any tracker starts, because a
    tracker that cannot write fails in its own writer thread (a traceback on stderr) before any error of ours."""
    for folder in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        check_writable_folder(folder, flag="--report-to")


def _read_run_file(path: Path) -> dict:
    """run.json of an earlier start, or {} (the run had no tracker yet)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable ({one_line(err)}); remove it to start new tracker runs") from None
    if not isinstance(saved, dict):
        raise InputError(f"{path}: not a JSON object; remove it to start new tracker runs")
    return saved


def _read_history(out: Path) -> list[dict]:
    """metrics.jsonl as it stands when a resumed run starts (the rows after the checkpoint already dropped)."""
    return MetricsLog(out / "metrics.jsonl").read()


# ---------------------------------------------------------------------------------------------------
# One starter per tracker: (root, project, run name, its run.json entry or None, config, history) →
# (the started Accelerate tracker, its run.json entry, whose "where" says where the data is).
# ---------------------------------------------------------------------------------------------------


def _start_tensorboard(root: Path, project: str, run_name: str, prior: dict | None, *, config, history):
    from accelerate.tracking import TensorBoardTracker  # deferred: heavy, and only the trackers asked for load

    kwargs = {}
    if prior is not None:
        # The resumed run logs the rows after the last one kept in metrics.jsonl again: TensorBoard's readers
        # drop what the old event files hold from that step on.
        steps = [row["step"] for row in history if isinstance(row.get("step"), int)]
        kwargs["purge_step"] = max(steps) + 1 if steps else 0
    tracker = TensorBoardTracker(run_name, root / "tensorboard", **kwargs)
    tracker.start()
    return tracker, {"where": str(Path(tracker.logging_dir))}


def _start_mlflow(root: Path, project: str, run_name: str, prior: dict | None, *, config, history):
    import mlflow  # deferred: an optional dependency, loaded only when asked for
    from accelerate.tracking import MLflowTracker  # deferred: heavy, and only the trackers asked for load

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines on creating the database
    if prior is not None:
        uri, artifacts = prior["tracking_uri"], None  # the run lives where it started
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        uri, artifacts = os.environ["MLFLOW_TRACKING_URI"], None
    else:
        # SQLite, not the ./mlruns file store: MLflow 3 refuses the file store by default.
        uri, artifacts = f"sqlite:///{(root / 'mlflow.db').resolve()}", str((root / "mlruns").resolve())
    mlflow.set_tracking_uri(uri)
    tracker = MLflowTracker(experiment_name=project, logging_dir=artifacts, run_name=run_name,
                            run_id=prior["run_id"] if prior else None)
    tracker.start()
    run_id = tracker.active_run.info.run_id
    return tracker, {"tracking_uri": uri, "run_id": run_id, "where": f"{uri} (run {run_id})"}


def _start_wandb(root: Path, project: str, run_name: str, prior: dict | None, *, config, history):
    from accelerate.tracking import WandBTracker  # deferred: heavy, and only the trackers asked for load

    run_id = prior["id"] if prior else uuid.uuid4().hex[:16]
    mode = os.environ.get("WANDB_MODE") or "offline"
    # Accelerate's WandBTracker passes its first argument to wandb.init as the project.
    tracker = WandBTracker(project, name=run_name, id=run_id, dir=str(root), resume="allow", mode=mode)
    tracker.start()
    return tracker, {"id": run_id, "where": f"{root / 'wandb'} ({mode}, run {run_id})"}


def _start_trackio(root: Path, project: str, run_name: str, prior: dict | None, *, config, history):
    from accelerate.tracking import TrackioTracker  # deferred: heavy, and only the trackers asked for load

    wanted = Path(prior["dir"] if prior else os.environ.get("TRACKIO_DIR") or root / "trackio").resolve()
    if "trackio" not in sys.modules:
        # trackio reads TRACKIO_DIR once, when it is imported.
        before = os.environ.get("TRACKIO_DIR")
        os.environ["TRACKIO_DIR"] = str(wanted)
        try:
            import trackio  # noqa: F401  # deferred: an optional dependency, and it reads TRACKIO_DIR at import
        finally:
            if before is None:
                del os.environ["TRACKIO_DIR"]
            else:
                os.environ["TRACKIO_DIR"] = before
    from trackio import utils as trackio_utils  # deferred: an optional dependency

    where = Path(trackio_utils.TRACKIO_DIR).resolve()
    if where != wanted:
        logger.warning("--report-to trackio: trackio was imported earlier in this process with its store in %s, "
                       "so this run's metrics go there, not to %s (start a new process to change it)", where, wanted)
    # The config goes in init: Accelerate's store_init_configuration would add wandb's allow_val_change=True to
    # it as a key (trackio's config is a plain dict).
    tracker = TrackioTracker(project, name=run_name, resume="allow" if prior else "never",
                             config=None if prior else config, embed=False, auto_log_cpu=False,
                             auto_log_gpu=False)
    with _quiet("trackio"):
        tracker.start()
    return tracker, {"dir": str(where), "where": f"{where} (project {project}, run {run_name})"}


STARTERS = {"tensorboard": _start_tensorboard, "mlflow": _start_mlflow, "wandb": _start_wandb,
            "trackio": _start_trackio}
