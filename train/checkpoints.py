"""The files of a run that must never be half-written: its checkpoints and its final model.

    save_checkpoint(accelerator, model, root, state)   OUT/checkpoints/step-N/ (accelerate's state + train_state.json)
    load_checkpoint(accelerator, path)                 --resume: restore it, return its TrainState
    list_checkpoints(root), find_checkpoint(spec, root)
    save_model_into(out, model, tokenizer)             the finished model at the top of OUT

Every write goes to a hidden staging folder first and is moved into place whole; a full disk keeps what
was there (the earlier checkpoints, OUT as it was) and says so in one line (``Failure``, exit 1).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from pathlib import Path

from gpt2_scratch.core.errors import Failure, InputError, describe_os_error, one_line
from gpt2_scratch.core.files import replace_files_into, write_json_atomic
from gpt2_scratch.train.sharded import check_finite_sharded, check_layout, is_sharded, load_sharded, save_sharded
from gpt2_scratch.train.state import TRAIN_STATE_FILE, TrainState

CHECKPOINT_PREFIX = "step-"


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
                    keep: int | None = None, optimizer=None, scheduler=None) -> Path:
    """``accelerator.save_state`` (model, optimizer, scheduler, RNG states) plus the ``TrainState`` as JSON; for
    a model sharded with FSDP, each process's shards of the model and ``optimizer`` with ``scheduler`` and the RNG
    states instead (train/sharded.py).

    Every process must call this (each saves its own RNG state). Refused when the weights hold NaN
    (the loop's guard should have stopped first). Written to a hidden temporary folder, then renamed
    to ``root/step-N``; the oldest checkpoints beyond ``keep`` are removed only after that. A full
    disk removes the partial folder and keeps every earlier checkpoint.
    """
    from gpt2_scratch.model_dir import check_finite  # deferred: model_dir imports torch and transformers

    root = Path(root)
    final = root / checkpoint_name(state.step)
    tmp = root / f".{final.name}.partial"
    sharded = is_sharded(model)
    if sharded:
        check_finite_sharded(model, f"checkpoint at step {state.step}")
    else:
        check_finite(accelerator.unwrap_model(model), f"checkpoint at step {state.step}")
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        if sharded:
            save_sharded(accelerator, model, optimizer, scheduler, tmp)
        else:
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


def load_checkpoint(accelerator, path: str | os.PathLike, *, model=None, optimizer=None, scheduler=None) -> TrainState:
    """Restore what ``save_checkpoint`` saved into the prepared objects; return its ``TrainState``. A model
    sharded with FSDP gets its shards back, with ``optimizer`` and ``scheduler`` (train/sharded.py: the same
    number of processes only, else one error line).

    The model is safetensors; accelerate reads the optimizer, scheduler and RNG files with
    ``torch.load(weights_only=True)``, so a tampered checkpoint cannot run code, it fails to load.
    accelerate skips RNG states it cannot read without a word, which would make the resumed run
    quietly differ, so this process's RNG file is read (the same safe way) first. Any failure is one
    error naming the checkpoint.
    """
    from accelerate.utils import load as safe_torch_load  # deferred: heavy
    from safetensors import SafetensorError  # deferred: heavy

    path = Path(path)
    state = TrainState.read(path / TRAIN_STATE_FILE)
    sharded = model is not None and is_sharded(model)
    check_layout(path, accelerator.num_processes, sharded)
    rng_file = path / f"random_states_{accelerator.process_index}.pkl"
    errors = (pickle.UnpicklingError, RuntimeError, OSError, EOFError, KeyError, ValueError, SafetensorError)
    for where, restore in ((rng_file, lambda: rng_file.exists() and safe_torch_load(rng_file)),
                           (path, lambda: load_sharded(accelerator, model, optimizer, scheduler, path) if sharded
                            else accelerator.load_state(str(path)))):
        try:
            restore()
        except errors as err:
            raise InputError(f"--resume: cannot restore {where} ({type(err).__name__}: {one_line(err, 160)}); the "
                             "checkpoint is damaged or not one train/ wrote (only tensors are ever read from it, "
                             "never code); resume from another checkpoint or start again with --overwrite") from None
    return state


def save_model_into(out: Path, model, tokenizer, *, prompt_style: str | None = None) -> None:
    """Write the model at OUT's top level: built completely in a staging folder by ``save_model_dir``,
    then each file is moved into OUT (weights last, so OUT never pairs a new config with missing weights).
    Refused when the weights hold NaN; a full disk leaves OUT as it was."""
    from gpt2_scratch.model_dir import check_finite, save_model_dir  # deferred: imports torch and transformers

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
