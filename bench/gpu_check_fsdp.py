"""The FSDP rows of bench/gpu_check.py: one process, Accelerate's FSDP2 on a CUDA GPU, our checkpoint code.

    python bench/gpu_check.py --rows fsdp                 # only these rows (this file is imported, not run)
    python bench/gpu_check.py --rows fsdp --device cpu    # the same code on the CPU, torch's fully_shard

    fsdp: wrap + train steps    Accelerate's FSDP2 plugin (``fsdp_version=2``, ``transformer_based_wrap`` on
                                ``Block``, the model's ``_no_split_modules``) prepares the model; two steps of
                                train/loop.py's ``train_step`` (loss, backward, clipping, AdamW, schedule)
    fsdp: sharded checkpoint    train/checkpoints.py's ``save_checkpoint`` after step 2 (each process's shards),
                                one more step; a freshly prepared model resumed by ``load_checkpoint`` takes
                                the same step: max |difference| of the whole weights (0 expected)
    fsdp: gathered final model  train/sharded.py's ``gathered_model`` → ``save_model_into`` → ``from_pretrained``:
                                max |difference| of its logits and the sharded model's (fp32)

One process is a process group of one (``RANK=0 WORLD_SIZE=1``, set here when no launcher did), so the
shards are the whole parameters, but every path is the sharded one: DTensors, DCP files, the gather. On
the CPU (``--device cpu``) Accelerate refuses FSDP (it enables it only on accelerators), so the model is
sharded with torch's ``fully_shard`` as that plugin would, and the note of each row says so: the checkpoint
and gather code still runs, Accelerate's FSDP set-up does not.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

STEPS, BATCH, LENGTH = 3, 8, 64


@contextlib.contextmanager
def _one_process_group(cuda: bool):
    """What a launcher exports for a single process, unless one did: Accelerate then sets up torch.distributed.
    Afterwards everything is as before (tests/test_bench.py runs this script inside its own process): the
    variables removed, the process group ended, Accelerate's process-wide state reset (its own reset)."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    added = {}
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        added = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port))
        os.environ.update(added)
    started = not dist.is_initialized()
    if started and not cuda:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        if added:
            AcceleratorState._reset_state(True)
            if started and dist.is_initialized():
                dist.destroy_process_group()
            for name in added:
                os.environ.pop(name, None)


def _prepared(check, accelerator=None):
    """(accelerator, model, optimizer, scheduler, how) with the model sharded: Accelerate's FSDP2 plugin on CUDA,
    torch's fully_shard per Block and at the root on the CPU. ``accelerator``: the one made before (its state is
    the process's)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import get_constant_schedule_with_warmup

    model = check.new_model().train()
    if check.cuda:
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["Block"], reshard_after_forward=True)
        accelerator = accelerator or Accelerator(fsdp_plugin=plugin,
                                                 mixed_precision="bf16" if check.dtype == torch.bfloat16 else "no")
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1, fused=True)
        scheduler = get_constant_schedule_with_warmup(optimizer, 1)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        how = f"Accelerate {accelerator.distributed_type.value}, FSDP2 {accelerator.is_fsdp2}"
    else:
        from torch.distributed.fsdp import fully_shard

        from gpt2_scratch.modeling_gpt2_scratch import Block

        accelerator = accelerator or Accelerator(cpu=True)
        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1, fused=True)
        scheduler = get_constant_schedule_with_warmup(optimizer, 1)
        how = "CPU: torch fully_shard, not Accelerate's FSDP (it needs an accelerator)"
    return accelerator, model, optimizer, scheduler, how


class _NextToken:
    """The loss train/loop.py's train_step asks of a task: summed next-token loss and [sum, count]."""

    def units(self, batch):
        return batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)

    def tokens(self, batch):
        return batch["input_ids"].numel()

    def loss(self, model, batch):
        import torch

        out = model(batch["input_ids"], labels=batch["input_ids"], use_cache=False, return_logits=False,
                    num_items_in_batch=1)
        return out.loss, torch.stack([out.loss.detach().double(), out.loss.new_tensor(1.0).double()])


def fsdp_rows(check, row_cls, limit: float) -> None:
    """Add the three FSDP rows to ``check`` (bench/gpu_check.py's Check), each in its own try."""
    import torch

    from gpt2_scratch.train.checkpoints import load_checkpoint, save_checkpoint, save_model_into
    from gpt2_scratch.train.loop import train_step
    from gpt2_scratch.train.sharded import full_state_dict, gathered_model, is_sharded
    from gpt2_scratch.train.state import Run, TrainState

    ids = torch.randint(0, check.config.vocab_size, (STEPS, BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    shared, folder = {}, Path(tempfile.mkdtemp(prefix="gpu-check-fsdp-"))

    def new_run() -> Run:
        accelerator, model, optimizer, scheduler, how = _prepared(check, shared.get("accelerator"))
        shared["how"], shared["accelerator"] = how, accelerator
        return Run(SimpleNamespace(max_grad_norm=1.0), accelerator, model, folder, None, STEPS, TrainState(),
                   fit=None, optimizer=optimizer, scheduler=scheduler)

    def step(run: Run, i: int) -> None:
        train_step(run, _NextToken(), [{"input_ids": ids[i].to(run.accelerator.device)}])
        run.state.step = i + 1

    def wrap_and_train():
        from torch.distributed.fsdp import FSDPModule

        run = new_run()
        wrapped = sum(1 for m in run.model.modules() if isinstance(m, FSDPModule))
        check.sync()
        tick = time.perf_counter()
        for i in range(2):
            step(run, i)
        check.sync()
        seconds = time.perf_counter() - tick
        shared["run"] = run
        ok = is_sharded(run.model) and wrapped == check.config.n_layers + 1
        return row_cls("", "ok" if ok else "not sharded", tokens_per_s=2 * BATCH * LENGTH / seconds,
                       peak_gib=check.peak_gib(), note=f"{shared['how']}; {wrapped} modules sharded "
                                                       f"({check.config.n_layers} Blocks + the root)")

    def checkpoint_and_resume():
        run = shared["run"]
        path = save_checkpoint(run.accelerator, run.model, folder / "checkpoints", run.state,
                               optimizer=run.optimizer, scheduler=run.scheduler)
        step(run, 2)
        uninterrupted = full_state_dict(run.model)
        resumed = new_run()
        resumed.state = load_checkpoint(resumed.accelerator, path, model=resumed.model, optimizer=resumed.optimizer,
                                        scheduler=resumed.scheduler)
        step(resumed, resumed.state.step)
        after = full_state_dict(resumed.model)
        diff = max((after[k].float() - uninterrupted[k].float()).abs().max().item() for k in uninterrupted)
        files = ", ".join(sorted(p.name for p in path.iterdir()))
        return row_cls("", "ok" if diff == 0 else f"differs by {diff:.3g}", peak_gib=check.peak_gib(),
                       note=f"resumed vs uninterrupted, max |diff| {diff:.3g}; {files}")

    def gathered_final_model():
        from gpt2_scratch import GPT2ScratchForCausalLM

        run = shared["run"]
        model = run.accelerator.unwrap_model(run.model).eval()
        probe = ids[0, :2].to(run.accelerator.device)
        with torch.no_grad(), run.accelerator.autocast():
            sharded_logits = model(probe).logits.float().cpu()
        from torch.distributed.tensor import DTensor

        # Each parameter whole (an all-gather, on every process; copied: with one process it can alias FSDP's
        # buffers, which a reshard frees); after a forward the root's own parameters stay unsharded.
        whole = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
                 for name, p in model.named_parameters()}
        save_model_into(folder / "final", gathered_model(model, main=True).eval(), None)
        loaded = GPT2ScratchForCausalLM.from_pretrained(folder / "final").eval()
        weights = max((p.detach() - whole[name]).abs().max().item() for name, p in loaded.named_parameters())
        with torch.no_grad():
            logits = (loaded(probe.cpu()).logits - sharded_logits).abs().max().item()
        return row_cls("", "ok" if weights == 0 else f"weights differ by {weights:.3g}", peak_gib=check.peak_gib(),
                       note=f"from_pretrained's weights vs the shards: max |diff| {weights:.3g}; its logits (CPU "
                            f"fp32) vs the sharded model's (mixed precision {run.accelerator.mixed_precision}): {logits:.3g}")

    with _one_process_group(check.cuda):
        for label, measure in (("fsdp: wrap + 2 train steps", wrap_and_train),
                               ("fsdp: sharded checkpoint, resume", checkpoint_and_resume),
                               ("fsdp: gathered final model", gathered_final_model)):
            if label != "fsdp: wrap + 2 train steps" and "run" not in shared:
                check.add(row_cls(label, "skipped", note="the wrap row failed"))
                continue
            check.run_row(label, measure, limit)
        shared.clear()  # the models, before the process group ends


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="run them with: python bench/gpu_check.py "
                            "--rows fsdp [--device cpu]").parse_args()
    raise SystemExit("error: this file holds bench/gpu_check.py's FSDP rows; run python bench/gpu_check.py --rows fsdp")
