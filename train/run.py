"""A training run's life, shared by train/sft.py, train/classify.py and train/dpo.py.

    start:      pre-flight (``check_output``: writable, not an input, not an unfinished run) → only
                then the output folder is cleared (``--overwrite``) → ``make_accelerator``
    the loop:   ``TrainState`` (the counters a checkpoint records), ``save_checkpoint`` /
                ``load_checkpoint`` (``--resume``), ``check_resume_args`` (a resumed run must be the
                same run), ``StopRequest`` (Ctrl-C ends the run at the next step boundary with a
                checkpoint), ``check_loss`` (a non-finite loss stops the run: nothing broken is saved)
    finish:     ``save_model_into`` (the model at the top of OUT, never half-written)

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
# The options every training script shares
# ---------------------------------------------------------------------------------------------------

# Declared once (default, help, argparse extras): each Args class names the field and its type, and
# passes a default only where its recipe differs from this one.
RUN_OPTIONS: dict[str, tuple[Any, str, dict]] = {
    "out": (None, "output folder (refused if it exists, unless --resume/--overwrite)", {"aliases": ("--output-dir",)}),
    "overwrite": (False, "replace an existing output folder (after every check of the run has passed)", {}),
    "resume": (None, "continue from the latest checkpoint in OUT/checkpoints, or from the given checkpoint folder",
               {"nargs": "?", "const": "latest"}),
    "max_steps": (None, "stop after this many optimizer steps", {}),
    "grad_accum": (1, "micro-batches per optimizer step (gradient accumulation)", {}),
    "max_grad_norm": (0.0, "clip the gradient norm to this value (0: no clipping, as the book)", {}),
    "mixed_precision": ("no", "bf16 autocast: fast on CPUs with AMX or AVX512-BF16 and on GPUs, far slower than "
                              "fp32 elsewhere; auto: bf16 where it is fast, else fp32", {}),
    "eval_freq": (5, "evaluate (and log a line) every this many optimizer steps", {}),
    "eval_iter": (5, "validation batches per evaluation", {}),
    "save_every": (0, "also checkpoint every this many steps (0: only at the end of each epoch)", {}),
    "keep_checkpoints": (2, "how many of the newest checkpoints to keep (0: all)", {}),
    "sample_tokens": (35, "tokens of the greedy sample printed after each epoch", {}),
    "max_new_tokens": (256, "longest response generated for the test split", {}),
    "response_batch_size": (8, "prompts per batch when generating the test responses", {}),
    "push_to_hub": (None, "after training, upload the model with a model card to this Hub repo (USER/NAME)", {}),
}
_SHARED_DEFAULT = object()


def run_arg(name: str, default: Any = _SHARED_DEFAULT, help: str | None = None) -> Any:
    """The ``arg(...)`` of shared option ``name``; ``default``/``help`` where a script's differ."""
    from gpt2_scratch.core.args import arg

    shared_default, shared_help, extra = RUN_OPTIONS[name]
    return arg(shared_default if default is _SHARED_DEFAULT else default, help or shared_help, **extra)


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def run_training(args: Any, set_up, fit, finish) -> int:
    """The shape every training script has: ``set_up(args)`` → ``fit(setup, args)`` → ``finish(setup, state,
    args)``; returns the exit code (130 when Ctrl-C stopped the loop, with a checkpoint where it keeps them)."""
    relaunch_multi_cpu()
    setup = set_up(args)
    state, interrupted = fit(setup, args)
    if interrupted:
        return EXIT_INTERRUPTED
    finish(setup, state, args)
    return 0


# ---------------------------------------------------------------------------------------------------
# Start
# ---------------------------------------------------------------------------------------------------


def check_number(name: str, value: float, *, minimum: float | None = None, above: float | None = None) -> None:
    """A finite number within bounds, or one InputError naming the option (``--lr nan`` is not a learning rate)."""
    flag = "--" + name.replace("_", "-")
    if not math.isfinite(value):
        raise InputError(f"{flag} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise InputError(f"{flag} must be at least {minimum:g}, got {value:g}")
    if above is not None and value <= above:
        raise InputError(f"{flag} must be greater than {above:g}, got {value:g}")


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


def clear_output(out: Path, *, overwrite: bool, is_main_process: bool) -> None:
    """Empty ``out`` (with ``--overwrite``) and create it: the first write of a run, after all checks."""
    if not is_main_process:
        return
    if overwrite and out.is_dir():
        for child in out.iterdir():
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
    target_tokens_seen: int = 0  # positions with a target (what the loss averages over)
    loss_sum: float = 0.0  # summed token loss since the last evaluation
    loss_tokens: int = 0  # its target tokens
    last_eval_step: int = -1
    train_seconds: float = 0.0
    extra: dict = dataclasses.field(default_factory=dict)  # a script's own counters (the book's global_step)

    def running_loss(self) -> float:
        """Mean loss per target token over the steps since the last evaluation."""
        return self.loss_sum / max(self.loss_tokens, 1)

    @classmethod
    def read(cls, path: Path) -> "TrainState":
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            return cls(**values)
        except (ValueError, TypeError, OSError) as err:
            raise InputError(f"--resume: {path} is damaged ({type(err).__name__}: {one_line(err, 120)}); resume from "
                             "another checkpoint (--resume DIR) or start again with --overwrite") from None


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
