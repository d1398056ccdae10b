"""Pieces every training script here shares: typed CLI arguments, output directory, checkpoints, metrics, plots.

Kept free of anything instruction-specific so ``train/sft.py`` and ``train/classify.py`` use the same:
  * ``parse_dataclass_args``: a dataclass whose fields carry ``help`` metadata becomes an argparse CLI;
  * ``run_main``: turns user errors into one ``error: ...`` line on stderr and exit status 2;
  * ``prepare_output_dir``: refuses an existing OUT unless resuming or overwriting;
  * ``save_checkpoint`` / ``find_checkpoint`` / ``load_checkpoint``: ``accelerator.save_state`` into a
    temporary directory renamed into place (a killed run never leaves a half-written checkpoint), plus a
    small JSON of loop counters;
  * ``MetricsLog``: ``metrics.jsonl``, one JSON object per line, trimmed back to a checkpoint on resume;
  * ``plot_losses``: the book's loss plot (train/validation loss over steps, tokens seen on a second
    x-axis) as PNG and PDF;
  * ``write_json_atomic``;
  * ``save_final_model`` (the model at OUT's top level, never half-written) and ``push_to_hub``;
  * ``relaunch_multi_cpu``: works around ``accelerate launch --cpu --num_processes N`` starting one process.
Only the main process writes files; every helper that writes checks ``accelerator.is_main_process``
or is only called there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any, Callable, Literal

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
TRAIN_STATE_FILE = "train_state.json"


class UserError(Exception):
    """A mistake the user can fix (bad argument, existing output directory); printed as one line."""


# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------


def arg(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field with its CLI help text (and optional extra argparse settings, e.g. nargs)."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kwargs})


def _argparse_type(annotation: Any) -> tuple[Callable | None, list | None]:
    """(type, choices) for a field annotation such as ``int``, ``str | None`` or ``Literal["a", "b"]``."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), choices
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _argparse_type(inner[0]) if len(inner) == 1 else (str, None)
    return annotation, None


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with one ``--field-name`` option per dataclass field (help from its metadata)."""
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        name = "--" + field.name.replace("_", "-")
        meta = dict(field.metadata)
        help_text = meta.pop("help", "")
        annotation = hints[field.name]
        if annotation is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
            continue
        arg_type, choices = _argparse_type(annotation)
        parser.add_argument(name, type=meta.pop("type", arg_type), choices=meta.pop("choices", choices),
                            default=field.default, help=help_text, **meta)
    return parser


def parse_dataclass_args(cls: type, argv: list[str] | None = None, description: str | None = None):
    """Parse ``argv`` into an instance of dataclass ``cls``; also return the set of options given explicitly
    (so a profile such as ``--offline-demo`` can fill in only what the user left at its default)."""
    parser = build_parser(cls, description)
    args = parser.parse_args(argv)
    # A second parse with every default suppressed tells which options were actually on the command line.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    explicit = set(vars(parser.parse_args(argv)))
    return cls(**vars(args)), explicit


def run_main(main: Callable[[], Any], *error_types: type[BaseException]) -> None:
    """Run ``main``; a ``UserError`` (or one of ``error_types``) becomes one ``error: ...`` line and exit 2."""
    try:
        main()
    except (UserError, *error_types) as err:
        message = " ".join(str(err).split("\n")[0].split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------------
# Multi-process CPU launch
# ---------------------------------------------------------------------------------------------------


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


def relaunch_multi_cpu(script: str | os.PathLike, argv: list[str] | None = None) -> None:
    """Make ``accelerate launch --num_processes N --cpu SCRIPT`` really run N processes (call first in main).

    For CPUs without an MPI host file, accelerate's launcher starts ONE process however many were
    asked for (huggingface/accelerate#2741); it only exports MASTER_PORT. Detect that case and start
    the N processes ourselves with torch's elastic launcher (``--standalone``: a free rendezvous port),
    which sets RANK/WORLD_SIZE so Accelerate sets up DDP over gloo. Exits with the workers' status.
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(Path(script).resolve()), *(sys.argv[1:] if argv is None else argv)]
    sys.exit(subprocess.run(cmd, env=child_env).returncode)


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


def _publish(tmp: str | os.PathLike, path: Path) -> None:
    """Rename a finished temporary file into place with ordinary permissions (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 4) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)
            f.write("\n")
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare_output_dir(out: str | os.PathLike, *, resume: bool, overwrite: bool, is_main_process: bool = True) -> Path:
    """Check (and on the main process, create or clear) the output directory.

    An existing non-empty directory is an error unless ``resume`` (continue it) or ``overwrite`` (its
    contents are deleted first).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory; choose another --output-dir")
    non_empty = out.is_dir() and any(out.iterdir())
    if non_empty and not (resume or overwrite):
        raise UserError(f"output directory {out} already exists; pass --resume to continue that run or "
                        "--overwrite to replace it")
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")
    if is_main_process:
        if non_empty and overwrite:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        out.mkdir(parents=True, exist_ok=True)
    return out


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------


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
    """``spec`` "latest" → the newest complete checkpoint under ``root``; otherwise a checkpoint directory."""
    if spec == "latest":
        found = list_checkpoints(root)
        if not found:
            raise UserError(f"--resume: no checkpoint in {root}; start without --resume (add --overwrite) "
                            "or give a checkpoint directory")
        return found[-1]
    path = Path(spec)
    if not (path / TRAIN_STATE_FILE).is_file():
        raise UserError(f"--resume {spec}: not a complete checkpoint (no {TRAIN_STATE_FILE}); pass a "
                        f"{CHECKPOINT_PREFIX}N directory under checkpoints/ or just --resume for the latest")
    return path


def save_checkpoint(accelerator, root: str | os.PathLike, step: int, train_state: dict, *, keep: int | None = None) -> Path:
    """``accelerator.save_state`` (model, optimizer, scheduler, RNG states) plus ``train_state`` as JSON.

    Every process must call this (each saves its own RNG state). Written to a hidden temporary
    directory, then renamed to ``root/step-N``; the oldest checkpoints beyond ``keep`` are removed.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.partial"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / TRAIN_STATE_FILE, train_state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep is not None and keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | os.PathLike) -> dict:
    """Restore what ``save_checkpoint`` saved into the prepared objects; return its ``train_state``.

    The model is safetensors; accelerate reads the optimizer, scheduler and RNG files with
    ``torch.load(weights_only=True)``, so a tampered checkpoint cannot run code, it fails to load.
    accelerate skips RNG states it cannot read without a word, which would make the resumed run
    quietly differ, so this process's RNG file is read (the same safe way) first. Either failure is
    one error naming the checkpoint.
    """
    import pickle

    from accelerate.utils import load as safe_torch_load

    path = Path(path)
    rng_file = path / f"random_states_{accelerator.process_index}.pkl"
    errors = (pickle.UnpicklingError, RuntimeError, OSError, EOFError, KeyError, ValueError)
    for where, restore in ((rng_file, lambda: rng_file.exists() and safe_torch_load(rng_file)),
                           (path, lambda: accelerator.load_state(str(path)))):
        try:
            restore()
        except errors as err:
            reason = " ".join(str(err).split("\n")[0].split())[:160]
            raise UserError(f"--resume: cannot restore {where} ({type(err).__name__}: {reason}); the checkpoint "
                            "is damaged or not one train/ wrote (only tensors are ever read from it, never "
                            "code); resume from another checkpoint or start again with --overwrite") from None
    return json.loads((path / TRAIN_STATE_FILE).read_text())


# ---------------------------------------------------------------------------------------------------
# Metrics and plots
# ---------------------------------------------------------------------------------------------------


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint's step (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".metrics.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in kept))
        _publish(tmp, self.path)

    def log(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_losses(records: list[dict], out_dir: str | os.PathLike, *, stem: str = "loss",
                series: tuple[str, ...] = ("train_loss", "val_loss"), ylabel: str = "Loss") -> list[Path]:
    """The book's plot: ``series`` over ``step`` with ``tokens_seen`` on a second x-axis; PNG and PDF.

    ``records`` are metrics rows holding ``step``, ``tokens_seen`` and the series keys (rows without
    them are skipped).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = [r for r in records if all(k in r for k in ("step", "tokens_seen", *series))]
    fig, ax = plt.subplots(figsize=(5, 3))
    if rows:
        steps = [r["step"] for r in rows]
        for key, style in zip(series, ("-", "-.", ":", "--")):
            ax.plot(steps, [r[key] for r in rows], style, label=key.replace("_", " ").replace("val", "validation"))
        ax.legend(loc="upper right")
    ax.set_xlabel("Steps")
    ax.set_ylabel(ylabel)
    # Second x-axis: tokens seen, placed by the same steps (an invisible plot aligns the ticks).
    ax2 = ax.twiny()
    if rows:
        ax2.plot([r["tokens_seen"] for r in rows], [r[series[0]] for r in rows], alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    paths = []
    for suffix in (".png", ".pdf"):
        path = Path(out_dir) / f"{stem}{suffix}"
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
        fig.savefig(tmp)
        _publish(tmp, path)
        paths.append(path)
    plt.close(fig)
    return paths


def save_final_model(model, tokenizer, out: Path) -> None:
    """Write the model at OUT's top level: ``save_model_dir`` builds it completely in a staging folder,
    then each file is renamed into OUT (weights last, so OUT never pairs a new config with old weights
    missing)."""
    from gpt2_scratch import save_model_dir

    staging = out / ".final-model"
    if staging.exists():
        shutil.rmtree(staging)
    save_model_dir(model, staging, tokenizer=tokenizer, overwrite=True)
    files = sorted(staging.iterdir(), key=lambda p: p.suffix == ".safetensors")
    for f in files:
        os.replace(f, out / f.name)
    shutil.rmtree(staging)


def push_to_hub(out: Path, repo_id: str) -> None:
    """Upload OUT (the model and the run's files; gpt2_scratch.hub leaves checkpoints/ out) with a model card."""
    try:
        from gpt2_scratch.hub import push_model_dir
    except ImportError:
        raise UserError("--push-to-hub needs gpt2_scratch.hub, which is not installed; push later with "
                        "`python -m gpt2_scratch push --model OUT --repo-id USER/NAME`") from None
    info = push_model_dir(out, repo_id, run_dir=out)
    print(f"pushed {out} to {repo_id}: {getattr(info, 'commit_url', info)}", flush=True)
