"""What a run is made of while it trains: its objects (``Run``) and its counters (``TrainState``).

``Run`` is what ``train/run.py``'s ``launch`` builds and every loop (train/loop.py's ``fit``, the
book-exact loop) and task receives; ``TrainState`` is what a checkpoint records beside the model,
optimizer and RNG states (train/checkpoints.py writes and reads it, every field checked on reading).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gpt2_scratch.core.allocator import loaded_allocator
from gpt2_scratch.core.errors import InputError, one_line

TRAIN_STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    """The loop's counters: what a checkpoint records beside the model, optimizer and RNG states."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs finished
    batches_done: int = 0  # micro-batches done in the current epoch (to skip them on resume)
    tokens_seen: int = 0  # input positions processed, padding included (the book's "tokens seen")
    units_seen: int = 0  # what the losses averaged over: target tokens (SFT), pairs (DPO), examples (classifier)
    running: list = dataclasses.field(default_factory=list)  # the task's sums since the last evaluation
    last_eval_step: int = -1
    evaluations: int = 0  # evaluations done (the classifier's training estimate draws its batches from it)
    train_seconds: float = 0.0
    phase_seconds: dict = dataclasses.field(default_factory=dict)  # wall time per phase (start-up, steps, ...)
    data_sha256: str = ""  # what the run trains on (``fingerprint``): a resume on other data is refused
    cpu_threads: int = 0  # torch's intra-op threads: the order of CPU sums, so bit-identity across a resume
    # Rows in metrics.jsonl when the checkpoint was saved: a resume drops the later ones, which it logs again
    # (None: a checkpoint from before this field; the rows after its step are dropped instead).
    metrics_rows: int | None = None

    @classmethod
    def read(cls, path: Path) -> "TrainState":
        """The counters of a checkpoint, every field checked: a wrong type or an impossible value is a one-line
        InputError (a resume must not train on from counters it cannot trust)."""
        def damaged(reason: str) -> InputError:
            return InputError(f"--resume: {path} is damaged ({reason}); resume from another checkpoint "
                              "(--resume DIR) or start again with --overwrite")

        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:
            raise damaged(f"{type(err).__name__}: {one_line(err, 120)}") from None
        if not isinstance(values, dict):
            raise damaged(f"a JSON {type(values).__name__}, not an object of counters")
        for name in _REQUIRED_STATE:
            if name not in values:
                raise damaged(f"no '{name}'")
        known = {f.name for f in dataclasses.fields(cls)}
        for name, value in values.items():
            if name in known and (problem := _state_field_problem(name, value)):
                raise damaged(f"'{name}' {problem}, got {json.dumps(value)[:40]}")
        state = cls(**{k: v for k, v in values.items() if k in known})
        if state.last_eval_step > state.step:
            raise damaged(f"'last_eval_step' {state.last_eval_step} is after 'step' {state.step}")
        return state


# What a checkpoint's counters must be. The first three say where the run is: a file without them is no
# checkpoint of ours; the others may be absent (a checkpoint from before they were recorded).
_REQUIRED_STATE = ("step", "epoch", "batches_done")
_COUNTS_FROM = {"step": 0, "epoch": 0, "batches_done": 0, "tokens_seen": 0, "units_seen": 0, "last_eval_step": -1,
                "evaluations": 0, "cpu_threads": 0, "metrics_rows": 0}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _state_field_problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the TrainState field ``name`` (None: nothing)."""
    if name in _COUNTS_FROM:
        if name == "metrics_rows" and value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < _COUNTS_FROM[name]:
            return f"must be an integer >= {_COUNTS_FROM[name]}"
    elif name == "running":  # empty, or the task's sums: the loss summed, its units, and any more
        if not isinstance(value, list) or len(value) == 1 or not all(_is_number(v) for v in value):
            return "must be an empty list or one of two or more finite numbers"
    elif name == "train_seconds":
        if not _is_number(value) or value < 0:
            return "must be a number >= 0"
    elif name == "phase_seconds":
        if not isinstance(value, dict) or not all(_is_number(v) and v >= 0 for v in value.values()):
            return "must be an object of seconds >= 0"
    elif name == "data_sha256":
        if not isinstance(value, str):
            return "must be a string"
    return None


def fingerprint(records: Any) -> str:
    """sha256 of what a run trains on (records as JSON with sorted keys, or a file's bytes)."""
    payload = records if isinstance(records, bytes) else json.dumps(records, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()


@contextmanager
def timed(state: TrainState, phase: str):
    """Add the wall time of the block to ``state.phase_seconds[phase]`` (where a run's time goes, checkpointed)."""
    tick = time.perf_counter()
    try:
        yield
    finally:
        state.phase_seconds[phase] = state.phase_seconds.get(phase, 0.0) + time.perf_counter() - tick


@dataclass
class Run:
    """Everything a loop needs besides its task, made by train/run.py's ``launch``.

    ``fit`` is the loop this run was set up with: train/loop.py's ``fit`` (every command), or one that
    builds its own optimizer and loaders (``sft --book-exact``), for which ``optimizer``, ``scheduler``,
    ``train_sampler`` and ``train_loader`` are None: launch builds only what the chosen loop uses.
    """

    args: Any
    accelerator: Any
    model: Any  # prepared by accelerate (DDP-wrapped with several processes)
    out: Path
    metrics: Any  # train.metrics.MetricsLog
    total_steps: int
    state: TrainState
    fit: Callable  # fit(run, task) -> None when it ran to its end, else the exit code of a stop (130, 143)
    optimizer: Any = None
    scheduler: Any = None
    train_sampler: Any = None  # an EpochBatchSampler: the batch order from (seed, epoch) alone
    train_loader: Any = None
    lock: Any = None  # the output folder's lock (core.files.FolderLock), released by ``release``
    trackers: Any = None  # train.trackers.Trackers, or None
    # With FSDP, the model gathered whole on the main process at the end (train/run.py's finish), which the
    # task's finish then saves and generates with; None otherwise.
    gathered: Any = None

    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def steps_line(self, unit: str) -> str:
        """What every training command's first line says of how the run trains: its steps and their batches of
        ``unit`` (examples, windows, pairs), the processes, the precision, the malloc, --compile."""
        args, accelerator = self.args, self.accelerator
        precision = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
        return (f"{self.total_steps} steps of {args.batch_size}x{args.grad_accum} {unit} on "
                f"{accelerator.num_processes} process(es), {precision} precision, {loaded_allocator()} malloc"
                f"{', compiled' if args.compile else ''}")

    def unwrapped(self):
        """The model without Accelerate's wrapper (DDP's, compile's); with FSDP, after ``finish`` gathered it,
        the whole model (before that: the sharded model itself, whose forward every process must call)."""
        if self.gathered is not None:
            return self.gathered
        return self.accelerator.unwrap_model(self.model)

    def check_out(self) -> None:
        """Before the main process writes into OUT: OUT is still the folder this run locked (deleted under a
        running run, it must not be quietly re-created with half the run's files)."""
        if self.lock is not None:
            self.lock.check_held()

    def log(self, row: dict) -> None:
        """One metrics row: metrics.jsonl, and every experiment tracker."""
        self.check_out()
        self.metrics.log(row)
        if self.trackers is not None:
            self.trackers.log(row)

    def release(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
