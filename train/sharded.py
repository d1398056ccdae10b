"""FSDP2: what a run does differently when its model is sharded across processes.

``accelerate launch --use_fsdp --fsdp_version 2`` hands ``accelerator.prepare`` a plugin that applies torch's
``fully_shard`` to every ``Block`` (the model's ``_no_split_modules``) and then to the root: each process then
holds only its shard of every parameter (a ``DTensor``), and every forward pass gathers them, on ALL
processes together. So everything that reads the whole model, or calls it on one process only, changes:

    is_sharded(model)                                       the switch: any parameter is a DTensor
    check_finite_sharded(model, where)                      the NaN guard of a checkpoint, over the shards
    save_sharded(accelerator, model, optimizer, scheduler, folder)   a checkpoint: each process writes its shards
    load_sharded(accelerator, model, optimizer, scheduler, folder)   --resume: read them back (same process count)
    full_state_dict(model), gathered_model(model, main=...) the full model, built on the main process (final save)
    forward_dtype(model)                                    the dtype its forward computes with (mixed precision)

Every function here is keyed on what the model IS (its DTensor parameters), not on how Accelerate was set
up, so the same code runs under Accelerate's FSDP plugin on GPUs and under torch's ``fully_shard`` on CPUs
over gloo (tests/test_scale.py with tests/fsdp_worker.py, the CPU proof: Accelerate enables FSDP only on GPUs).

Sharded checkpoints are torch.distributed.checkpoint (DCP) folders, the format Accelerate's FSDP plugin writes
with ``SHARDED_STATE_DICT``: the model and AdamW's state via torch's ``get_state_dict``/``set_state_dict``;
the scheduler and every process's RNG state beside them via Accelerate's own ``save_accelerator_state``. DCP
reads its metadata with ``pickle.load`` and its non-tensor entries with ``torch.load(weights_only=False)``;
here both are read the safe way (``_safe_io``): only tensors and plain values, never code.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
from pathlib import Path

import torch

from gpt2_scratch.core.errors import Failure, InputError

SHARDED_DIR = "sharded"  # the DCP folder of the model and optimizer shards inside a checkpoint
LAYOUT_FILE = "fsdp.json"  # how many processes wrote those shards


def is_sharded(model) -> bool:
    """Whether ``model``'s parameters are sharded across processes (FSDP2's DTensors)."""
    if "torch.distributed.tensor" not in sys.modules:  # then no DTensor can exist
        return False
    from torch.distributed.tensor import DTensor  # deferred: already imported (above), never imported for this

    return any(isinstance(p, DTensor) for p in model.parameters())


def forward_dtype(model) -> torch.dtype | None:
    """The dtype a sharded ``model``'s forward gathers its weights in: FSDP2's ``MixedPrecisionPolicy.param_dtype``
    (Accelerate sets bf16 for ``--mixed_precision bf16``), None when the weights are used as stored or ``model``
    is not sharded. A whole model that must compute what the policy computes (DPO's frozen reference) is cast to
    it. Read from the root's FSDP state (torch has no public getter for it)."""
    state = getattr(model, "_get_fsdp_state", None) if is_sharded(model) else None
    policy = getattr(state(), "_mp_policy", None) if state is not None else None
    return getattr(policy, "param_dtype", None)


def check_finite_sharded(model, where: str) -> None:
    """model_dir.check_finite over shards: each process checks its own, all agree on the first bad name. Every
    process must call it (one all-reduce)."""
    import torch.distributed as dist  # deferred: only sharded runs need it

    names = [name for name, _ in model.named_parameters()]
    bad = next((i for i, (_, p) in enumerate(model.named_parameters())
                if not bool(torch.isfinite(p.to_local()).all())), len(names))
    first = torch.tensor([bad])
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    if first.item() < len(names):
        raise Failure(f"{where}: parameter '{names[first.item()]}' holds NaN or infinite values (the training "
                      "diverged); refusing to use it")


def _state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict  # deferred: heavy, only sharded runs need it

    model_sd, optim_sd = get_state_dict(model, getattr(optimizer, "optimizer", optimizer))  # accelerate's wrapper off
    return {"model": model_sd, "optimizer": optim_sd}


def save_sharded(accelerator, model, optimizer, scheduler, folder: Path) -> None:
    """Every process writes its shards of the model and optimizer into ``folder/sharded`` (DCP); the main
    process the scheduler and the process count; each process its RNG state (Accelerate's files)."""
    import torch.distributed.checkpoint as dcp  # deferred: heavy (0.4 s), only sharded runs need it
    from accelerate.checkpointing import save_accelerator_state  # deferred: heavy

    folder.mkdir(parents=True, exist_ok=True)
    dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(folder / SHARDED_DIR))
    save_accelerator_state(str(folder), [], [], [scheduler] if scheduler is not None else [], [],
                           accelerator.process_index, accelerator.step, accelerator.scaler)
    if accelerator.is_main_process:
        (folder / LAYOUT_FILE).write_text(json.dumps({"processes": accelerator.num_processes}) + "\n")


def check_layout(folder: Path, processes: int, sharded: bool) -> None:
    """Refuse (exit 2) a checkpoint this run cannot restore: shards written by another number of processes
    (the RNG states and the data each process saw belong to that count), or sharded vs whole weights."""
    layout = folder / LAYOUT_FILE
    if not sharded:
        if layout.exists():
            raise InputError(f"--resume: {folder} holds FSDP shards and this run does not shard its model; resume "
                             "under the same `accelerate launch --use_fsdp ...` that wrote it")
        return
    if not layout.is_file():
        raise InputError(f"--resume: {folder} holds the whole model (no FSDP shards) and this run shards it; "
                         "resume without --use_fsdp, as the run that wrote it")
    try:
        saved = json.loads(layout.read_text(encoding="utf-8"))["processes"]
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise InputError(f"--resume: {layout} is damaged ({type(err).__name__}); resume from another checkpoint "
                         "or start again with --overwrite") from None
    if saved != processes:
        raise InputError(f"--resume: {folder} holds FSDP shards of {saved} process(es) and this run has "
                         f"{processes}; resume with --num_processes {saved}")


def load_sharded(accelerator, model, optimizer, scheduler, folder: Path) -> None:
    """Restore what ``save_sharded`` wrote into the sharded model, its optimizer and scheduler, and this process's
    RNG state. Every process must call it."""
    import torch.distributed.checkpoint as dcp  # deferred: heavy (0.4 s), only sharded runs need it
    from accelerate.checkpointing import load_accelerator_state  # deferred: heavy
    from torch.distributed.checkpoint.state_dict import set_state_dict

    check_layout(folder, accelerator.num_processes, sharded=True)
    states = _state_dicts(model, optimizer)
    from torch.distributed.checkpoint.api import CheckpointException  # deferred: heavy, only sharded runs need it

    reader, planner = _safe_io(str(folder / SHARDED_DIR))
    try:
        dcp.load(states, storage_reader=reader, planner=planner)
    except CheckpointException as err:  # a BaseException: made the error load_checkpoint reports in one line
        raise RuntimeError(f"{folder / SHARDED_DIR}: {err}") from None
    set_state_dict(model, getattr(optimizer, "optimizer", optimizer), model_state_dict=states["model"],
                   optim_state_dict=states["optimizer"])
    load_accelerator_state(str(folder), [], [], [scheduler] if scheduler is not None else [], [],
                           accelerator.process_index, accelerator.scaler)


def full_state_dict(model) -> dict:
    """The whole model's state dict gathered on the main process (CPU tensors; {} on the others): torch's
    ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, what Accelerate's
    ``get_state_dict`` does under FSDP2. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # deferred

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_model(model, *, main: bool, device=None):
    """A plain (unsharded) copy of a sharded ``model`` on the main process (on ``device``, default the CPU), None
    elsewhere: the final model folder, merging LoRA and the test responses then run as they do without FSDP.
    The copy is the model's class built from its config (peft's wrapper rebuilt around it), loaded strictly
    with the gathered weights. Every process must call it; only the main process holds a full copy
    afterwards (so the whole model must fit there, as it must for the test responses anyway)."""
    state = full_state_dict(model)
    if not main:
        return None
    from torch.distributed.fsdp import FSDPModule  # deferred: heavy (0.4 s), only sharded runs need it

    base = model.get_base_model() if hasattr(model, "peft_config") else model
    # fully_shard turns a module's class into a subclass of FSDPModule and that class: take the latter.
    plain = next(c for c in type(base).__mro__ if issubclass(c, torch.nn.Module) and not issubclass(c, FSDPModule))
    copy = plain(base.config)
    if hasattr(model, "peft_config"):
        from peft import get_peft_model  # deferred: heavy, and only LoRA runs need it

        copy = get_peft_model(copy, model.peft_config[model.active_adapter])
    copy.load_state_dict(state, strict=True)
    return copy.to(device or "cpu").train(model.training)


class _SafeUnpickler(pickle.Unpickler):
    """DCP's metadata: its own dataclasses, torch sizes, dtypes and layouts; any other global is refused."""

    ALLOWED = {("torch", "Size"), ("pathlib", "PosixPath"), ("torch.serialization", "_get_layout"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED or module == "torch.distributed.checkpoint.metadata" or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def _safe_io(path: str):
    """(a DCP reader of ``path``, a load planner) that read only tensors and plain values: the metadata through
    ``_SafeUnpickler``, the non-tensor entries (the optimizer's lr, betas, step counts) with weights_only."""
    from torch.distributed.checkpoint import FileSystemReader  # deferred: heavy (0.4 s), only sharded runs need it
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            where = getattr(self, "_get_metadata_path", None)  # torch < 2.12: the one .metadata file
            path = where(kwargs.get("rank")) if where else self.fs.concat_path(self.path, ".metadata")
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _SafeUnpickler(stream).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:  # DefaultLoadPlanner's, with weights_only
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafeReader(path), SafePlanner()
