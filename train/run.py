"""A training run's life, shared by train/sft.py, train/dpo.py and train/classify.py.

    run_training(args, set_up)   set_up(args) → (Run, Task); run.fit(run, task); finish(run, task)
    start:      ``start`` (pre-flight: option values, --push-to-hub's repo id and token, the output folder
                writable, not an input, not an unfinished run; the checkpoint to resume and the data it was
                trained on) → the task loads its data and model → ``launch``: the Accelerator, only then
                the output folder is locked and cleared (``--overwrite``), the optimizer and scheduler,
                ``accelerator.prepare``, a restored checkpoint (refused when the run already finished), the
                trackers. ``launch_own_loop`` is launch for a loop that builds its own optimizer and loaders
                (``sft --book-exact``): the loop a run uses is chosen at set-up, as the run's ``fit``.
    the loop:   train/loop.py (``fit``, ``train_step``); the task's hooks: train/task.py; the counters a
                checkpoint records: train/state.py; the checkpoint files: train/checkpoints.py; Ctrl-C,
                SIGTERM and the NaN guard: train/stopping.py
    finish:     ``finish``: the task's final evaluation, then ``task.finish`` (the model at the top of OUT,
                never half-written, and the task's outputs: train/lm_outputs.py for language models), a push
                to the Hub

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
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from gpt2_scratch.core.args import check_values, option_name, resume_may_change
from gpt2_scratch.core.errors import InputError, one_line
from gpt2_scratch.core.files import FolderLock, check_output_dir, write_json_atomic
from gpt2_scratch.core.process import (configure_logging, fast_bf16, fsdp_without_accelerator, quiet_libraries,
                                       relaunch_multi_cpu, terminate_as_interrupt)
from gpt2_scratch.hub import check_repo_id, hub_token
from gpt2_scratch.train import loop
from gpt2_scratch.train.checkpoints import find_checkpoint, load_checkpoint
from gpt2_scratch.train.metrics import MetricsLog
from gpt2_scratch.train.publish import push_run
from gpt2_scratch.train.sharded import gathered_model, is_sharded
from gpt2_scratch.train.state import TRAIN_STATE_FILE, Run, TrainState, timed
from gpt2_scratch.train.step_options import maybe_compile, use_fast_dropout_masks
from gpt2_scratch.train.task import Task
from gpt2_scratch.train.trackers import Trackers, check_installed

logger = logging.getLogger(__name__)

ARGS_FILE = "args.json"


def run_training(args: Any, set_up: Callable[[Any], tuple[Run, Task]]) -> int:
    """``set_up(args)`` → (Run, Task) → the run's loop → ``finish``; returns the exit code (130 or 143 when
    Ctrl-C or SIGTERM stopped the loop, with a checkpoint saved). The output folder's lock is released
    however the run ends; a SIGTERM outside the loop interrupts as Ctrl-C does (exit 143)."""
    relaunch_multi_cpu()
    with terminate_as_interrupt():
        tick = time.perf_counter()
        run, task = set_up(args)
        run.state.phase_seconds["startup"] = run.state.phase_seconds.get("startup", 0.0) + time.perf_counter() - tick
        try:
            stopped = run.fit(run, task)
            if stopped is not None:
                return stopped
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


def resolve_precision(args: Any) -> None:
    """Turn ``--mixed-precision auto`` into bf16 where it is fast and fp32 ("no") elsewhere (in ``args``, so
    args.json records what ran); say so when bf16 was asked for where it is slow."""
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if fast_bf16() else "no"
    elif args.mixed_precision == "bf16" and not fast_bf16():
        print("note: this CPU has neither AMX nor AVX512-BF16: bf16 matrix products run far slower than fp32 "
              "here (--mixed-precision auto picks fp32 on such machines)", file=sys.stderr, flush=True)


def make_accelerator(mixed_precision: str, batch_size: int):
    """An Accelerator where ``batch_size`` is the global batch; the run's log lines set up (core/process.py)."""
    from accelerate import Accelerator  # deferred: heavy
    from accelerate.utils import DataLoaderConfiguration

    no_fsdp_here = fsdp_without_accelerator()
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        cpu=no_fsdp_here,
        # Each process gets its slice of every global batch, and the scheduler steps once per optimizer
        # step whatever the number of processes: a run's losses do not depend on how many there are.
        dataloader_config=DataLoaderConfiguration(split_batches=True, even_batches=False),
    )
    configure_logging(accelerator.is_main_process)
    if no_fsdp_here and accelerator.is_main_process:
        print(f"note: FSDP needs GPUs and this machine has none; training with DDP instead "
              f"({accelerator.num_processes} process(es), each holding the whole model)", file=sys.stderr, flush=True)
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
        flag = option_name(name)
        more = f" (and {', '.join(option_name(c) for c in changed[1:])})" if len(changed) > 1 else ""
        raise InputError(f"--resume: {flag} {current[name]!r} differs from the run's {saved[name]!r} in {path}{more}; "
                         f"resume with the run's settings, or start a new run in another --out")


def check_push_target(repo_id: str) -> None:
    """--push-to-hub's pre-flight: a valid repo id and a token, found before training rather than after it."""
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
    quiet_libraries()
    check_values(args)  # core/cli.py checked them when parsing; a run started from Python is checked here
    resolve_precision(args)
    if args.report_to:
        check_installed(args.report_to)  # a tracker that is not installed: one line before anything is written
    if args.push_to_hub:
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


def check_training_fits(model, trained_params: list, model_name: str) -> None:
    """Refuse, before the first step, training that cannot fit in this machine's memory: the fp32 weights plus,
    for every trained parameter, its gradient and AdamW's two moments (16 bytes in all; activations come on
    top). Without it, full finetuning of gpt2-xl on a 16 GiB laptop loads for minutes and is then killed by
    the kernel with no message at all."""
    from gpt2_scratch.model_dir import memory_limit_bytes  # deferred: model_dir loads transformers

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


# ---------------------------------------------------------------------------------------------------
# Launch: the first write
# ---------------------------------------------------------------------------------------------------


def count_steps(args: Any, batches_per_epoch: int) -> int:
    """The run's optimizer steps: its epochs of ``batches_per_epoch`` micro-batches, at most --max-steps."""
    total = math.ceil(batches_per_epoch / args.grad_accum) * args.epochs
    return min(total, args.max_steps) if args.max_steps is not None else total


@contextmanager
def _locked_output(start: Start, accelerator):
    """The output folder locked (main process), then cleared with ``--overwrite``; the lock is released when
    anything in the block fails (after it, the run's ``release`` does)."""
    args, out = start.args, start.out
    main = accelerator.is_main_process
    lock = FolderLock.acquire(out, what="--out") if main else None
    try:
        clear_output(out, overwrite=args.overwrite and start.resume_from is None, is_main_process=main,
                     keep={lock.path.name} if lock else set())
        accelerator.wait_for_everyone()
        yield lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def launch(start: Start, *, model, train_dataset, train_sampler, collate, eval_loaders: dict[str, Any],
           data_sha256: str, trainable=None, before_prepare=None) -> tuple[Run, dict[str, Any]]:
    """The run's objects for train/loop.py's ``fit``, after every check has passed: the Accelerator; the output
    folder locked, then cleared (``--overwrite``); AdamW (fused: 4x faster than the default on CPU, the same
    updates) over ``trainable`` (default: every parameter, which the book decays); the schedule;
    ``accelerator.prepare``; a restored checkpoint; args.json; the trackers. ``before_prepare(accelerator)``
    runs once the processes exist and before any checkpoint is restored (DPO's reference of the starting
    model). Returns the run and the prepared ``eval_loaders``."""
    args = start.args
    params = [p for p in (trainable if trainable is not None else model.parameters()) if p.requires_grad]
    check_training_fits(model, params, args.model)  # before the folder is touched: a refusal loses nothing
    accelerator = make_accelerator(args.mixed_precision, args.batch_size)
    with _locked_output(start, accelerator) as lock:
        # A generator of its own: each new iterator draws its base seed from it, not from the global RNG that
        # dropout draws from, so a resumed run (whose first iterator starts mid-epoch) sees the same masks.
        train_loader = DataLoader(train_dataset, batch_sampler=train_sampler, collate_fn=collate,
                                  generator=torch.Generator().manual_seed(args.seed))
        total_steps = count_steps(args, len(train_sampler))
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)
        scheduler = make_scheduler(optimizer, args, total_steps)
        names = list(eval_loaders)
        if before_prepare is not None:
            before_prepare(accelerator)
        use_fast_dropout_masks(model)  # not in launch_own_loop: the book-exact loops draw the book's masks
        model = maybe_compile(model, args, accelerator.device.type)
        prepared = accelerator.prepare(model, optimizer, train_loader, scheduler, *eval_loaders.values())
        model, optimizer, train_loader, scheduler = prepared[:4]
        eval_loaders = dict(zip(names, prepared[4:]))
        metrics = MetricsLog(start.out / "metrics.jsonl", enabled=accelerator.is_main_process)
        state, relogged = TrainState(data_sha256=data_sha256), 0
        if start.resume_from is not None:
            state, relogged = resume(start, accelerator, metrics, data_sha256, total_steps, len(train_sampler),
                                     prepared=(model, optimizer, scheduler))
        run = Run(args, accelerator, model, start.out, metrics, total_steps, state, fit=loop.fit, optimizer=optimizer,
                  scheduler=scheduler, train_sampler=train_sampler, train_loader=train_loader, lock=lock)
        open_records(run, resuming=start.resume_from is not None, relogged=relogged)
    return run, eval_loaders


def launch_own_loop(start: Start, *, model, batches_per_epoch: int, data_sha256: str, fit: Callable) -> Run:
    """``launch`` for a loop that builds its own optimizer and loaders and saves no checkpoint (``sft
    --book-exact``): the Accelerator, the output folder, the model prepared, metrics, args.json, the
    trackers; nothing that loop would not use. ``fit(run, task)`` is that loop."""
    args = start.args
    check_training_fits(model, [p for p in model.parameters() if p.requires_grad], args.model)
    accelerator = make_accelerator(args.mixed_precision, args.batch_size)
    with _locked_output(start, accelerator) as lock:
        model = accelerator.prepare(maybe_compile(model, args, accelerator.device.type))
        metrics = MetricsLog(start.out / "metrics.jsonl", enabled=accelerator.is_main_process)
        run = Run(args, accelerator, model, start.out, metrics, count_steps(args, batches_per_epoch),
                  TrainState(data_sha256=data_sha256), fit=fit, lock=lock)
        open_records(run, resuming=False, relogged=0)
    return run


def resume(start: Start, accelerator, metrics, data_sha256: str, total_steps: int, epoch_batches: int,
           prepared: tuple) -> tuple[TrainState, int]:
    """--resume: the checkpoint restored into the ``prepared`` (model, optimizer, scheduler); (its counters, the
    metrics rows dropped after it, which the run logs again)."""
    model, optimizer, scheduler = prepared
    state = load_checkpoint(accelerator, start.resume_from, model=model, optimizer=optimizer, scheduler=scheduler)
    state.data_sha256 = data_sha256
    check_resumable(start, state, total_steps, epoch_batches, metrics)  # before anything is written
    relogged = metrics.truncate_after(state.step, rows=state.metrics_rows)
    if accelerator.is_main_process:
        print(f"resumed from {start.resume_from}: step {state.step}, epoch {state.epoch + 1}, "
              f"{state.batches_done} batches into it", flush=True)
    return state, relogged


def open_records(run: Run, *, resuming: bool, relogged: int) -> None:
    """What a launched run records before its first step: the CPU threads (the order of CPU sums), args.json,
    the experiment trackers."""
    args, state, main = run.args, run.state, run.accelerator.is_main_process
    if run.accelerator.device.type == "cpu":
        threads = torch.get_num_threads()
        if main and resuming and state.cpu_threads and state.cpu_threads != threads:
            # CPU kernels split their sums by thread: the rest of the run is right, but not bit for bit the same.
            print(f"note: this run has {threads} CPU threads and the checkpoint's had {state.cpu_threads}: "
                  "it will match an uninterrupted run to rounding, not bit for bit "
                  f"(OMP_NUM_THREADS={state.cpu_threads} for that)", flush=True)
        state.cpu_threads = threads
    if main:
        write_args(run.out, args)
        if args.report_to and args.report_to != ["none"]:
            run.trackers = Trackers.start(args, run.out, resuming=resuming, skip_rows=relogged)


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
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup  # deferred: heavy

    if args.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, max(total_steps, 1))
    return get_constant_schedule_with_warmup(optimizer, args.warmup_steps)


# ---------------------------------------------------------------------------------------------------
# Finish
# ---------------------------------------------------------------------------------------------------


PHASES = ("startup", "train_steps", "evaluation", "epoch_end", "checkpoints", "save_model", "responses")


def finish(run: Run, task: Task) -> None:
    """The task's final evaluation (every process), then on the main process the model at the top of OUT
    and the task's other outputs (``task.finish``), where the run's time went (a metrics row and a line), a
    push to the Hub; then the processes end together."""
    accelerator, state = run.accelerator, run.state
    with timed(state, "evaluation"):
        final = task.final_evaluation(run)
    if final is not None:
        run.log({"step": state.step, **final})
    if is_sharded(run.model):  # FSDP: every process sends its shards; the main process gets the whole model
        with timed(state, "save_model"):
            run.gathered = gathered_model(run.unwrapped(), main=accelerator.is_main_process, device=accelerator.device)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run.check_out()
        task.finish(run)
        seconds = {phase: state.phase_seconds.get(phase, 0.0) for phase in PHASES}
        run.log({"step": state.step, "timing": True, **{f"seconds_{k}": round(v, 3) for k, v in seconds.items()}})
        total = sum(seconds.values()) or 1.0
        print("where the time went: " + " | ".join(f"{k.replace('_', ' ')} {v:,.1f} s ({100 * v / total:.0f}%)"
                                                   for k, v in seconds.items()), flush=True)
        if run.args.push_to_hub:
            push_run(run.out, run.args.push_to_hub)  # the model files + a card built from OUT's args/metrics/plots
    accelerator.wait_for_everyone()
    accelerator.end_training()
