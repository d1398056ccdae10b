"""A training run's life, shared by train/sft.py, train/dpo.py and train/classify.py.

    run_training(args, set_up)   set_up(args) → (Run, Task); loop.fit(run, task); finish(run, task)
    start:      ``start`` (pre-flight: option values, --push-to-hub's repo id and token, the output folder
                writable, not an input, not an unfinished run; the checkpoint to resume and the data it was
                trained on) → the task loads its data and model → ``launch``: the Accelerator, only then
                the output folder is locked and cleared (``--overwrite``), the optimizer and scheduler,
                ``accelerator.prepare``, a restored checkpoint (refused when the run already finished), the
                trackers
    the loop:   train/loop.py; here the pieces it uses: ``TrainState`` (the counters a checkpoint records),
                ``save_checkpoint`` / ``load_checkpoint`` (``--resume``), ``StopRequest`` (Ctrl-C ends the run
                at the next step boundary with a checkpoint), ``check_loss`` (a non-finite loss stops the
                run: nothing broken is saved)
    finish:     ``finish``: the task's final evaluation, the model at the top of OUT (never half-written,
                with LoRA also the adapter), the task's outputs, a push to the Hub

Only the main process writes; every helper that writes checks ``accelerator.is_main_process`` or is
called only there. Every failure is one line: an ``InputError`` (exit 2) for what the user passed,
a ``Failure`` (exit 1) for what went wrong while running (divergence, a full disk).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2_scratch.core.errors import EXIT_INTERRUPTED, Failure, InputError, describe_os_error, one_line
from gpt2_scratch.core.files import check_output_dir, write_json_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
TRAIN_STATE_FILE = "train_state.json"
ARGS_FILE = "args.json"


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def run_training(args: Any, set_up) -> int:
    """``set_up(args)`` → (Run, Task) → the loop → ``finish``; returns the exit code (130 when Ctrl-C stopped
    the loop, with a checkpoint saved). The output folder's lock is released however the run ends."""
    from gpt2_scratch.train.loop import fit

    relaunch_multi_cpu()
    tick = time.perf_counter()
    run, task = set_up(args)
    run.state.phase_seconds["startup"] = run.state.phase_seconds.get("startup", 0.0) + time.perf_counter() - tick
    own_loop = getattr(task, "own_loop", None)  # sft --book-exact: the book's loop, step for step
    try:
        state, interrupted = own_loop(run) if own_loop else fit(run, task)
        if interrupted:
            return EXIT_INTERRUPTED
        finish(run, task)
        return 0
    finally:
        run.release()


# ---------------------------------------------------------------------------------------------------
# Start
# ---------------------------------------------------------------------------------------------------


def check_output(out: str | os.PathLike, *, resume: bool, overwrite: bool,
                 inputs: list[tuple[str, str | os.PathLike | None]]) -> Path:
    """The output folder's pre-flight: decide, without writing anything, whether this run may use it.

    An existing non-empty folder needs ``--resume`` (continue it) or ``--overwrite`` (replace it, which
    happens only after every other check of the run has passed: ``clear_output``). The folder must be
    writable and must hold none of the run's inputs (``--model X --out X --overwrite`` would delete the
    model it is about to train).
    """
    if resume and overwrite:
        raise InputError("--resume and --overwrite contradict each other; pass one of them")
    out = check_output_dir(out, inputs=inputs)
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise InputError(f"output folder {out} already exists; pass --resume to continue that run or --overwrite "
                         "to replace it")
    return out


def clear_output(out: Path, *, overwrite: bool, is_main_process: bool, keep: set[str] = frozenset()) -> None:
    """Empty ``out`` (with ``--overwrite``; but the names in ``keep``: the run's own lock) and create it: the
    first write of a run, after all checks."""
    if not is_main_process:
        return
    if overwrite and out.is_dir():
        for child in out.iterdir():
            if child.name in keep:
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


class _StdoutHandler(logging.StreamHandler):
    """Log lines go to whatever ``sys.stdout`` is when they are written (tqdm and tests swap it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def quiet_libraries() -> None:
    """Turn the libraries' progress bars and INFO lines down: a run's own lines say what happens."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_warning()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def fast_bf16() -> bool:
    """Whether bf16 matrix products are fast here: a CUDA GPU that has them, or a CPU with AMX or AVX512-BF16.

    Elsewhere (an AVX2-only CPU) torch computes them with a fallback kernel that is tens of times slower
    than fp32, so bf16 autocast would slow training down instead of speeding it up.
    """
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(probe is not None and probe() for probe in probes)


def resolve_precision(args: Any) -> None:
    """Turn ``--mixed-precision auto`` into bf16 where it is fast and fp32 ("no") elsewhere (in ``args``, so
    args.json records what ran); say so when bf16 was asked for where it is slow."""
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if fast_bf16() else "no"
    elif args.mixed_precision == "bf16" and not fast_bf16():
        print("note: this CPU has neither AMX nor AVX512-BF16: bf16 matrix products run far slower than fp32 "
              "here (--mixed-precision auto picks fp32 on such machines)", file=sys.stderr, flush=True)


def make_accelerator(mixed_precision: str, batch_size: int):
    """An Accelerator where ``batch_size`` is the global batch, with the libraries' chatter turned down."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        # Each process gets its slice of every global batch, and the scheduler steps once per optimizer
        # step whatever the number of processes: a run's losses do not depend on how many there are.
        dataloader_config=DataLoaderConfiguration(split_batches=True, even_batches=False),
    )
    main = accelerator.is_main_process
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, handlers=[_StdoutHandler()],
                        format="%(message)s", force=True)
    # Our own lines say what happened; the libraries' INFO lines (every file save_state writes) bury them.
    noisy_modules = ("model_dir", "hub", "modeling_gpt2_scratch", "responses", "tokenizer", "core.download")
    for noisy in ("accelerate", "httpx", "httpx2", *(f"gpt2_scratch.{m}" for m in noisy_modules)):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # save_state's note that the tied lm_head is stored once is expected (reload re-ties it).
    logging.getLogger("accelerate.utils.other").addFilter(lambda r: "Removed shared tensor" not in r.getMessage())
    quiet_libraries()
    if batch_size % accelerator.num_processes:
        raise InputError(f"--batch-size {batch_size} is the global batch; it must be divisible by the "
                         f"{accelerator.num_processes} processes")
    return accelerator


def write_args(out: Path, args: Any) -> None:
    write_json_atomic(out / ARGS_FILE, dataclasses.asdict(args))


def check_resume_args(out: Path, args: Any, may_change: set[str]) -> None:
    """A resumed run must be the run it continues: every argument but ``may_change`` equal to args.json's.

    Otherwise the checkpoint's optimizer, data order and schedule would silently belong to other
    settings than the ones args.json then records.
    """
    path = out / ARGS_FILE
    if not path.is_file():
        logger.warning("%s: not found; cannot check that --resume continues the same run", path)
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise InputError(f"--resume: {path} is unreadable ({one_line(err)}); restore it or start again with "
                         "--overwrite") from None
    current = dataclasses.asdict(args)
    changed = [name for name, value in current.items()
               if name not in may_change and name in saved and saved[name] != value]
    if changed:
        name = changed[0]
        flag = "--" + name.replace("_", "-")
        more = f" (and {', '.join('--' + c.replace('_', '-') for c in changed[1:])})" if len(changed) > 1 else ""
        raise InputError(f"--resume: {flag} {current[name]!r} differs from the run's {saved[name]!r} in {path}{more}; "
                         f"resume with the run's settings, or start a new run in another --out")


def check_push_target(repo_id: str) -> None:
    """--push-to-hub's pre-flight: a valid repo id and a token, found before training rather than after it."""
    from gpt2_scratch.hub import check_repo_id, hub_token

    check_repo_id(repo_id, flag="--push-to-hub")
    try:
        hub_token()
    except InputError as err:
        raise InputError(f"--push-to-hub {repo_id}: {err}") from None


@dataclass
class Start:
    """What ``start`` decided before any data or model is loaded."""

    args: Any
    out: Path
    resume_from: Path | None  # the checkpoint to continue from
    resume_state: "TrainState | None"  # its counters (read early: the data check needs no model)

    def check_data(self, data_sha256: str, what: str) -> None:
        """Refuse (exit 2) a resume on data whose contents differ from what the checkpoint trained on."""
        saved = self.resume_state.data_sha256 if self.resume_state else ""
        if saved and saved != data_sha256 and not self.args.resume_other_data:
            raise InputError(f"--resume: {what} differs from the data the checkpoint {self.resume_from} was trained on "
                             f"(sha256 {data_sha256[:12]}… vs {saved[:12]}…): its batch order and position in the epoch "
                             "belong to the other data; restore that data, pass --resume-other-data to continue on "
                             "this data anyway, or start a new run in another --out")


def start(args: Any, *, inputs: list[tuple[str, Any]]) -> Start:
    """Every check that needs neither data nor model: option values, precision, the output folder, the
    checkpoint to resume and whether the resumed run is the same run (``check_resume_args``)."""
    from gpt2_scratch.core.args import check_values, resume_may_change

    quiet_libraries()
    check_values(args)
    resolve_precision(args)
    if getattr(args, "report_to", None):
        from gpt2_scratch.train.trackers import check_installed

        check_installed(args.report_to)  # a tracker that is not installed: one line before anything is written
    if getattr(args, "push_to_hub", None):
        check_push_target(args.push_to_hub)
    resuming = args.resume is not None
    out = check_output(args.out, resume=resuming, overwrite=args.overwrite, inputs=inputs)
    resume_from = find_checkpoint(args.resume, out / "checkpoints") if resuming else None
    if resuming:
        # With a constant learning rate the length of the run changes nothing it computes.
        lengths = {"max_steps", "epochs"} if args.lr_schedule == "constant" else set()
        check_resume_args(out, args, resume_may_change(type(args)) | lengths)
    state = TrainState.read(resume_from / TRAIN_STATE_FILE) if resume_from is not None else None
    return Start(args, out, resume_from, state)


@dataclass
class Run:
    """Everything the loop needs besides its task, made by ``launch``."""

    args: Any
    accelerator: Any
    model: Any  # prepared by accelerate (DDP-wrapped with several processes)
    optimizer: Any
    scheduler: Any
    train_sampler: Any  # an EpochBatchSampler: the batch order from (seed, epoch) alone
    train_loader: Any
    out: Path
    metrics: Any  # train.metrics.MetricsLog
    total_steps: int
    state: TrainState
    lock: Any = None  # the output folder's lock (core.files.FolderLock), released by ``release``
    trackers: Any = None  # train.trackers.Trackers, or None

    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def log(self, row: dict) -> None:
        """One metrics row: metrics.jsonl, and every experiment tracker."""
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


def check_training_fits(model, trained_params: list, model_name: str) -> None:
    """Refuse, before the first step, training that cannot fit in this machine's memory: the fp32 weights plus,
    for every trained parameter, its gradient and AdamW's two moments (16 bytes in all; activations come on
    top). Without it, full finetuning of gpt2-xl on a 16 GiB laptop loads for minutes and is then killed by
    the kernel with no message at all."""
    from gpt2_scratch.model_dir import memory_limit_bytes

    limit = memory_limit_bytes()
    if limit is None:
        return
    trained = sum(p.numel() for p in trained_params)
    needed = 4 * sum(p.numel() for p in model.parameters()) + 12 * trained  # a tied head counts once
    if needed > limit:
        def size(n: int) -> str:
            return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"

        raise InputError(f"--model {model_name}: training {trained:,} parameters needs at least {size(needed)} (fp32 "
                         f"weights, gradients and AdamW's two moments), more than the {size(limit)} of memory here; "
                         "train fewer parameters (--lora, where the command has it), choose a smaller --model, or "
                         "use a machine with more memory")


def launch(start: Start, *, model, train_dataset, train_sampler, collate, eval_loaders: dict[str, Any],
           data_sha256: str, trainable=None, before_prepare=None) -> tuple[Run, dict[str, Any]]:
    """The run's objects, after every check has passed: the Accelerator; the output folder locked, then
    cleared (``--overwrite``); AdamW (fused: 4x faster than the default on CPU, the same updates) over
    ``trainable`` (default: every parameter, which the book decays); the schedule; ``accelerator.prepare``;
    a restored checkpoint; args.json; the trackers. ``before_prepare(accelerator)`` runs once the processes
    exist and before any checkpoint is restored (DPO's reference of the starting model). Returns the run and
    the prepared ``eval_loaders``."""
    from torch.utils.data import DataLoader

    import torch
    from gpt2_scratch.core.files import FolderLock
    from gpt2_scratch.train.metrics import MetricsLog

    args, out = start.args, start.out
    resuming = start.resume_from is not None
    params = [p for p in (trainable if trainable is not None else model.parameters()) if p.requires_grad]
    check_training_fits(model, params, args.model)  # before the folder is touched: a refusal loses nothing
    accelerator = make_accelerator(args.mixed_precision, args.batch_size)
    main = accelerator.is_main_process
    lock = FolderLock.acquire(out, what="--out") if main else None
    try:
        clear_output(out, overwrite=args.overwrite and not resuming, is_main_process=main, keep={lock.path.name} if lock else set())
        accelerator.wait_for_everyone()
        # A generator of its own: each new iterator draws its base seed from it, not from the global RNG that
        # dropout draws from, so a resumed run (whose first iterator starts mid-epoch) sees the same masks.
        train_loader = DataLoader(train_dataset, batch_sampler=train_sampler, collate_fn=collate,
                                  generator=torch.Generator().manual_seed(args.seed))
        steps_per_epoch = math.ceil(len(train_sampler) / args.grad_accum)
        total_steps = steps_per_epoch * args.epochs
        if args.max_steps is not None:
            total_steps = min(total_steps, args.max_steps)
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)
        scheduler = make_scheduler(optimizer, args, total_steps)
        names = list(eval_loaders)
        if before_prepare is not None:
            before_prepare(accelerator)
        model = maybe_compile(model, args, accelerator.device.type)
        prepared = accelerator.prepare(model, optimizer, train_loader, scheduler, *eval_loaders.values())
        model, optimizer, train_loader, scheduler = prepared[:4]
        eval_loaders = dict(zip(names, prepared[4:]))
        metrics = MetricsLog(out / "metrics.jsonl", enabled=main)
        state = TrainState(data_sha256=data_sha256)
        relogged = 0
        if resuming:
            state = load_checkpoint(accelerator, start.resume_from)
            state.data_sha256 = data_sha256
            check_resumable(start, state, total_steps, len(train_sampler), metrics)  # before anything is written
            relogged = metrics.truncate_after(state.step, rows=state.metrics_rows)
            if main:
                print(f"resumed from {start.resume_from}: step {state.step}, epoch {state.epoch + 1}, "
                      f"{state.batches_done} batches into it", flush=True)
        if accelerator.device.type == "cpu":
            threads = torch.get_num_threads()
            if main and resuming and state.cpu_threads and state.cpu_threads != threads:
                # CPU kernels split their sums by thread: the rest of the run is right, but not bit for bit the same.
                print(f"note: this run has {threads} CPU threads and the checkpoint's had {state.cpu_threads}: "
                      "it will match an uninterrupted run to rounding, not bit for bit "
                      f"(OMP_NUM_THREADS={state.cpu_threads} for that)", flush=True)
            state.cpu_threads = threads
        if main:
            write_args(out, args)
        run = Run(args, accelerator, model, optimizer, scheduler, train_sampler, train_loader, out, metrics,
                  total_steps, state, lock)
        if main and getattr(args, "report_to", None) and args.report_to != ["none"]:
            from gpt2_scratch.train.trackers import Trackers

            run.trackers = Trackers.start(args, out, resuming=resuming, skip_rows=relogged)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return run, eval_loaders


def check_resumable(start: Start, state: TrainState, total_steps: int, epoch_batches: int, metrics) -> None:
    """Refuse (exit 2) to resume from counters this run cannot continue: a position past the epoch's batches,
    a step past the run's total, or a run that already finished (its final rows are logged: resuming would
    only evaluate and write everything again). A checkpoint at the last step of a run that did not finish
    (a full disk while saving the model) is resumed: the run then only finishes."""
    where = start.resume_from / TRAIN_STATE_FILE
    if state.batches_done > epoch_batches:
        raise InputError(f"--resume: {where} is damaged ('batches_done' {state.batches_done} is past the "
                         f"{epoch_batches} batches of an epoch); resume from another checkpoint (--resume DIR) or "
                         "start again with --overwrite")
    if state.step < total_steps:
        return
    args, out = start.args, start.out
    more = ("raise --max-steps or --epochs to train on" if args.lr_schedule == "constant" else
            f"to train on, start a new run from its model (--model {out}) in another --out")
    if state.step > total_steps:
        raise InputError(f"--resume: the checkpoint {start.resume_from} is at step {state.step}, past this run's "
                         f"{total_steps} steps; {more}, or resume from an earlier checkpoint")
    # finish() logs the timing row last, after every checkpoint of the run's last step.
    if any(row.get("timing") and row.get("step") == state.step for row in metrics.read()):
        raise InputError(f"--resume: the run in {out} already finished at step {state.step}; {more}, or start "
                         "again with --overwrite")


def make_scheduler(optimizer, args: Any, total_steps: int):
    """Linear warmup, then constant (the book) or cosine decay, stepped once per optimizer step."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if args.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, max(total_steps, 1))
    return get_constant_schedule_with_warmup(optimizer, args.warmup_steps)


def maybe_compile(model, args: Any, device: str):
    """``--compile``: torch.compile the model, or one line saying why this platform cannot."""
    if not getattr(args, "compile", False):
        return model
    from gpt2_scratch.core.compile import compile_model

    return compile_model(model, device)


def relaunch_multi_cpu() -> None:
    """Make ``accelerate launch --num_processes N --cpu ...`` really run N processes (call first).

    For CPUs without an MPI host file, accelerate's launcher starts ONE process however many were
    asked for (huggingface/accelerate#2741); it only exports MASTER_PORT. Detect that case and start
    the N processes with torch's elastic launcher (``--standalone``: a free rendezvous port), which
    sets RANK/WORLD_SIZE so Accelerate sets up DDP over gloo. Exits with the workers' status.
    """
    env = os.environ
    launched_on_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and "MASTER_PORT" in env
    if not launched_on_cpu or any(k in env for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE",
                                                     "OMPI_COMM_WORLD_SIZE")):
        return
    n = _launcher_num_processes()
    if not n or n < 2:
        return
    import subprocess

    child_env = {k: v for k, v in env.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    # sys.orig_argv[1:] is how this process was started: a script path, or -m and a module.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           *sys.orig_argv[1:]]
    sys.exit(subprocess.run(cmd, env=child_env).returncode)


def _launcher_num_processes() -> int | None:
    """``--num_processes N`` from the command line of the ``accelerate launch`` that started us."""
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None
    for i, token in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            if token == flag and i + 1 < len(argv):
                return int(argv[i + 1])
            if token.startswith(flag + "="):
                return int(token.split("=", 1)[1])
    return None


# ---------------------------------------------------------------------------------------------------
# The loop's state and its checkpoints
# ---------------------------------------------------------------------------------------------------


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
    import hashlib

    payload = records if isinstance(records, bytes) else json.dumps(records, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root`` (those with their train_state.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / TRAIN_STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def find_checkpoint(spec: str, root: str | os.PathLike) -> Path:
    """``spec`` "latest" → the newest complete checkpoint under ``root``; otherwise a checkpoint folder."""
    if spec == "latest":
        found = list_checkpoints(root)
        if not found:
            raise InputError(f"--resume: no checkpoint in {root}; start without --resume (add --overwrite) "
                             "or give a checkpoint folder")
        return found[-1]
    path = Path(spec)
    if not os.path.lexists(path):  # a mistyped folder: "no train_state.json" would send the user looking inside it
        raise InputError(f"--resume {spec}: no such folder; pass a {CHECKPOINT_PREFIX}N folder under the run's "
                         "checkpoints/ or just --resume for the latest")
    if not (path / TRAIN_STATE_FILE).is_file():
        raise InputError(f"--resume {spec}: not a complete checkpoint (no {TRAIN_STATE_FILE}); pass a "
                         f"{CHECKPOINT_PREFIX}N folder under checkpoints/ or just --resume for the latest")
    return path


def save_checkpoint(accelerator, model, root: str | os.PathLike, state: TrainState, *,
                    keep: int | None = None) -> Path:
    """``accelerator.save_state`` (model, optimizer, scheduler, RNG states) plus the ``TrainState`` as JSON.

    Every process must call this (each saves its own RNG state). Refused when the weights hold NaN
    (the loop's guard should have stopped first). Written to a hidden temporary folder, then renamed
    to ``root/step-N``; the oldest checkpoints beyond ``keep`` are removed only after that. A full
    disk removes the partial folder and keeps every earlier checkpoint.
    """
    from gpt2_scratch.model_dir import check_finite

    root = Path(root)
    final = root / checkpoint_name(state.step)
    tmp = root / f".{final.name}.partial"
    check_finite(accelerator.unwrap_model(model), f"checkpoint at step {state.step}")
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json_atomic(tmp / TRAIN_STATE_FILE, dataclasses.asdict(state))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            if keep:
                for old in list_checkpoints(root)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError) as err:
        reason = write_failure(err, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(root)
        last = f"the last good checkpoint {kept[-1]} is kept: free space and continue with --resume" if kept else \
            "no checkpoint of this run is complete"
        raise Failure(f"{reason}; {last}") from None
    accelerator.wait_for_everyone()
    return final


def write_failure(err: BaseException, where: Path) -> str:
    """One line for an error raised while writing ``where``; re-raises what is not a failed write.

    torch.save reports a full disk as a RuntimeError ("iostream error"), safetensors as its own error:
    the free space of the file system tells what happened.
    """
    if isinstance(err, OSError):
        return describe_os_error(err)
    try:
        free = shutil.disk_usage(where if where.exists() else where.parent).free
    except OSError:
        free = None
    if free is not None and free < 1 << 20:
        return f"no space left on device while writing {where}"
    raise err


def load_checkpoint(accelerator, path: str | os.PathLike) -> TrainState:
    """Restore what ``save_checkpoint`` saved into the prepared objects; return its ``TrainState``.

    The model is safetensors; accelerate reads the optimizer, scheduler and RNG files with
    ``torch.load(weights_only=True)``, so a tampered checkpoint cannot run code, it fails to load.
    accelerate skips RNG states it cannot read without a word, which would make the resumed run
    quietly differ, so this process's RNG file is read (the same safe way) first. Any failure is one
    error naming the checkpoint.
    """
    import pickle

    from accelerate.utils import load as safe_torch_load
    from safetensors import SafetensorError

    path = Path(path)
    state = TrainState.read(path / TRAIN_STATE_FILE)
    rng_file = path / f"random_states_{accelerator.process_index}.pkl"
    errors = (pickle.UnpicklingError, RuntimeError, OSError, EOFError, KeyError, ValueError, SafetensorError)
    for where, restore in ((rng_file, lambda: rng_file.exists() and safe_torch_load(rng_file)),
                           (path, lambda: accelerator.load_state(str(path)))):
        try:
            restore()
        except errors as err:
            raise InputError(f"--resume: cannot restore {where} ({type(err).__name__}: {one_line(err, 160)}); the "
                             "checkpoint is damaged or not one train/ wrote (only tensors are ever read from it, "
                             "never code); resume from another checkpoint or start again with --overwrite") from None
    return state


# ---------------------------------------------------------------------------------------------------
# Stopping: Ctrl-C and divergence
# ---------------------------------------------------------------------------------------------------


class StopRequest:
    """The first Ctrl-C asks the loop to stop at the next step boundary (with a checkpoint); a second one
    interrupts at once. Use as a context manager around the loop."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def agreed(self, accelerator) -> bool:
        """Whether any process was asked to stop (all processes must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.requested
        import torch

        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


class Diverged(Failure):
    """The loss became NaN or infinite; nothing from that point on is saved."""


def check_loss(loss: float, step: int, checkpoint_root: Path, what: str = "loss") -> None:
    """Stop the run with one line when a loss is not finite (the weights are broken from here on).

    Called with each step's training loss and with every evaluation's loss: an update can leave finite
    but exploded weights whose next loss overflows, and no checkpoint may be saved from them.
    """
    if math.isfinite(loss):
        return
    kept = list_checkpoints(checkpoint_root)
    last = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was saved before it"
    raise Diverged(f"training diverged at step {step}: the {what} is {loss}; no model was saved from this run and "
                   f"{last}; lower --lr or clip gradients with --max-grad-norm 1.0, then start again (--overwrite)")


# ---------------------------------------------------------------------------------------------------
# Finish
# ---------------------------------------------------------------------------------------------------


def save_model_into(out: Path, model, tokenizer, *, prompt_style: str | None = None) -> None:
    """Write the model at OUT's top level: built completely in a staging folder by ``save_model_dir``,
    then each file is moved into OUT (weights last, so OUT never pairs a new config with missing weights).
    Refused when the weights hold NaN; a full disk leaves OUT as it was."""
    from gpt2_scratch.core.files import replace_files_into
    from gpt2_scratch import save_model_dir
    from gpt2_scratch.model_dir import check_finite

    check_finite(model, f"the final model of {out}")
    staging = out / ".final-model"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        save_model_dir(model, staging, tokenizer=tokenizer, overwrite=True, prompt_style=prompt_style)
    except (OSError, RuntimeError) as err:
        reason = write_failure(err, staging)
        shutil.rmtree(staging, ignore_errors=True)
        raise Failure(f"{reason}; the checkpoints in {out / 'checkpoints'} are kept: free space and run the same "
                      "command with --resume to save the model") from None
    replace_files_into(staging, out)


PHASES = ("startup", "train_steps", "evaluation", "epoch_end", "checkpoints", "save_model", "responses")


def finish(run: Run, task) -> None:
    """The task's final evaluation (every process), then on the main process the model at the top of OUT
    and the task's other outputs (``task.finish``), where the run's time went (a metrics row and a line), a
    push to the Hub; then the processes end together."""
    from gpt2_scratch.train.loop import timed

    accelerator, state = run.accelerator, run.state
    final = getattr(task, "final_evaluation", None)
    if final is not None:
        with timed(state, "evaluation"):
            run.log({"step": state.step, **final(run)})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        task.finish(run)
        seconds = {phase: state.phase_seconds.get(phase, 0.0) for phase in PHASES}
        run.log({"step": state.step, "timing": True, **{f"seconds_{k}": round(v, 3) for k, v in seconds.items()}})
        total = sum(seconds.values()) or 1.0
        print("where the time went: " + " | ".join(f"{k.replace('_', ' ')} {v:,.1f} s ({100 * v / total:.0f}%)"
                                                   for k, v in seconds.items()), flush=True)
        if run.args.push_to_hub:
            from gpt2_scratch.train.publish import push_run

            push_run(run.out, run.args.push_to_hub)  # the model files + a card built from OUT's args/metrics/plots
    accelerator.wait_for_everyone()
    accelerator.end_training()


# ---------------------------------------------------------------------------------------------------
# What the language-model tasks (SFT, DPO) share at the end of an epoch and of the run
# ---------------------------------------------------------------------------------------------------


def greedy_sample(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The book's per-epoch check: greedily continue a fixed validation prompt (newlines shown as spaces)."""
    import torch

    from gpt2_scratch import ENDOFTEXT_ID

    was_training = model.training
    model.eval()
    context = model.config.max_position_embeddings
    ids = tokenizer.encode(prompt)[-(context - max_new_tokens):]
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                             device=device), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=ENDOFTEXT_ID,
                             eos_token_id=None)
    model.train(was_training)
    return tokenizer.decode(out[0]).replace("\n", " ")


def epoch_sample(run: Run, epoch: int, tokenizer, prompt: str, max_new_tokens: int):
    """The end of an epoch of SFT or DPO: the greedy sample (main process only) as (row, log line)."""
    if not run.accelerator.is_main_process:
        return None
    from gpt2_scratch.core.compile import eager

    with eager():  # --compile trains compiled; generation decodes a new shape every token
        sample = greedy_sample(run.unwrapped(), tokenizer, prompt, max_new_tokens)
    return {"sample": sample}, f"epoch {epoch} sample: {sample}"


def save_language_model(run: Run, model, tokenizer, *, prompt_style: str, lora_settings, load_base):
    """The finished language model at the top of OUT (with LoRA: OUT/adapter, and the merged model unless
    --no-merge); returns the model to generate the test responses with."""
    from gpt2_scratch.train import lora
    from gpt2_scratch.train.loop import timed

    model.eval()
    with timed(run.state, "save_model"):
        if lora_settings is None:
            save_model_into(run.out, model, tokenizer, prompt_style=prompt_style)
            return model
        return lora.save_outputs(run.out, model, tokenizer, lora_settings, prompt_style=prompt_style,
                                 load_base=load_base)


def write_test_responses(run: Run, model, tokenizer, records: list[dict], style: str) -> list[str]:
    """The test split with a greedy ``model_response`` per record (instruction-data-with-response.json)."""
    from gpt2_scratch import generate_responses
    from gpt2_scratch.core.compile import eager
    from gpt2_scratch.core.files import write_json_atomic
    from gpt2_scratch.train.loop import timed

    args = run.args
    print(f"generating {len(records)} test responses (greedy, up to {args.max_new_tokens} new tokens)", flush=True)
    with timed(run.state, "responses"), eager():  # --compile: generation decodes a new shape every token
        responses = generate_responses(model, tokenizer, records, batch_size=args.response_batch_size,
                                       max_new_tokens=args.max_new_tokens, style=style)
    write_json_atomic(run.out / "instruction-data-with-response.json",
                      [dict(r, model_response=resp) for r, resp in zip(records, responses)])
    return responses


def check_generation_limits(args: Any, context: int, model_name: str) -> None:
    """--max-new-tokens and --sample-tokens must leave room for a prompt: found before training, not after."""
    for name in ("max_new_tokens", "sample_tokens"):
        if getattr(args, name) >= context:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)} leaves no room for a prompt in the "
                             f"{context}-token context of {model_name}; pass at most {context - 1}")
