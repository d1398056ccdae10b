"""One process of tests/test_scale.py::test_a_model_sharded_with_fsdp2_saves_resumes_and_gathers: our training,
checkpoint, resume and final save code on a model sharded with torch's FSDP2 ``fully_shard`` over gloo, on CPUs
(started by ``torch.distributed.run``).

This is a CPU proof of OUR code paths, not of Accelerate's launcher: Accelerate enables FSDP only on
accelerators (shared/docs/FACTS.md), so the model is sharded here as Accelerate's FSDP2 plugin shards it
(``fully_shard`` on every ``Block``, the model's ``_no_split_modules``, then on the root) and handed to
train/loop.py's ``train_step``, train/checkpoints.py's ``save_checkpoint``/``load_checkpoint``, train/lm_outputs.py's
``epoch_sample`` and train/run.py's ``finish`` with the Accelerator ``torch.distributed.run`` gives (MULTI_CPU).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT MODE

MODE ``train``: a plain one-process reference (rank 0, the whole global batch), then the sharded run of
STEPS steps with a checkpoint at RESUME_AT, then a sharded run resumed from it; writes OUT/result-RANK.json
and the final model folder OUT/final (finish). MODE ``resume-elsewhere``: resume OUT's checkpoint (written by 2
processes) with this process count: must be refused in one line.
"""

import json
import os
from contextlib import nullcontext
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.distributed.fsdp import fully_shard

from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
from gpt2_scratch.core.errors import InputError
from gpt2_scratch.modeling_gpt2_scratch import Block
from gpt2_scratch.tokenizer import get_tokenizer
from gpt2_scratch.train.checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from gpt2_scratch.train.lm_outputs import epoch_sample, greedy_sample
from gpt2_scratch.train.loop import train_step
from gpt2_scratch.train.metrics import MetricsLog
from gpt2_scratch.train.run import finish, make_accelerator
from gpt2_scratch.train.sharded import full_state_dict, gathered_model, is_sharded
from gpt2_scratch.train.state import Run, TrainState
from gpt2_scratch.train.task import Task, mean_loss

STEPS, RESUME_AT, BATCH, LENGTH = 4, 2, 4, 16
TINY = dict(n_layers=2, emb_dim=64, n_heads=4, context_length=128)
PROMPT = "Below is an instruction that describes a task."


class NextToken(Task):
    """Next-token loss on token rows (tests/test_loop.py's one-task training)."""

    def units(self, batch):
        return batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)

    def loss(self, model, batch):
        out = model(batch["input_ids"], labels=batch["input_ids"], use_cache=False, return_logits=False,
                    num_items_in_batch=1)
        count = torch.tensor(float(out.label_logprobs.numel()), dtype=torch.float64)
        return out.loss, torch.stack([out.loss.detach().double(), count])

    def evaluate(self, run, running):
        return {"train_loss": mean_loss(running)}


def batches(rank: int, processes: int) -> list[dict]:
    """The run's global batches, this process's slice of each (accelerate's split_batches)."""
    data = torch.randint(0, 50257, (STEPS, BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    share = BATCH // processes
    return [{"input_ids": step[rank * share:(rank + 1) * share]} for step in data]


def model_and_optimizer(shard: bool):
    """The same tiny model every time (seed 0); sharded as Accelerate's FSDP2 plugin does; AdamW + schedule."""
    from transformers import get_constant_schedule_with_warmup

    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY)).train()
    if shard:
        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    return model, optimizer, get_constant_schedule_with_warmup(optimizer, 1)


def make_run(accelerator, out: Path, shard: bool) -> Run:
    model, optimizer, scheduler = model_and_optimizer(shard)
    args = SimpleNamespace(max_grad_norm=1.0, push_to_hub=None)
    return Run(args, accelerator, model, out, MetricsLog(out / "metrics.jsonl", enabled=accelerator.is_main_process),
               STEPS, TrainState(), fit=None, optimizer=optimizer, scheduler=scheduler)


def train(run: Run, steps: range, rank: int, processes: int) -> None:
    for step in steps:
        train_step(run, NextToken(), [batches(rank, processes)[step]])
        run.state.step = step + 1


def plain_reference() -> dict:
    """One process, the whole model, the whole global batch: what the sharded runs must equal."""
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, reduce=lambda t, reduction: t,
                                  autocast=nullcontext, backward=lambda loss: loss.backward(),
                                  clip_grad_norm_=torch.nn.utils.clip_grad_norm_)
    run = Run(SimpleNamespace(max_grad_norm=1.0), accelerator, None, Path("."), None, STEPS, TrainState(), fit=None)
    run.model, run.optimizer, run.scheduler = model_and_optimizer(shard=False)
    initial = {k: v.clone() for k, v in run.model.state_dict().items()}
    train(run, range(STEPS), 0, 1)
    return {"initial": initial, "final": run.model.state_dict(), "model": run.model}


def lora_under_fsdp(accelerator) -> dict | None:
    """peft's LoRA on the sharded model (frozen base and trained adapters in one FSDP unit): one train_step,
    then ``gathered_model`` rebuilds the PeftModel whole on the main process. (frozen base max |change|, adapters'
    max |change|, the merged model's parameter count) on the main process; None elsewhere."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    run = Run(SimpleNamespace(max_grad_norm=1.0), accelerator, model, Path("."), None, 1, TrainState(), fit=None,
              optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    train_step(run, NextToken(), [batches(accelerator.process_index, accelerator.num_processes)[0]])
    whole = gathered_model(model, main=accelerator.is_main_process)
    if whole is None:
        return None
    after = whole.state_dict()
    change = {kind: max((after[k] - before[k]).abs().max().item() for k in before if ("lora_" in k) == (kind == "lora"))
              for kind in ("base", "lora")}
    return {**change, "merged_parameters": sum(p.numel() for p in whole.merge_and_unload().parameters())}


def uneven_evaluation(run: Run, rank: int) -> list:
    """train/loop.py's ``sums_over`` with 3 evaluation batches on process 0 and 1 on process 1 (a split's last,
    short global batch): process 1 must join the others' forward passes, its repeats not counted."""
    from gpt2_scratch.train.loop import sums_over

    rows = torch.randint(0, 50257, (4, 2, LENGTH), generator=torch.Generator().manual_seed(2))
    mine = [{"input_ids": rows[i]} for i in ((0, 1, 2) if rank == 0 else (3,))]
    return sums_over(run, mine, None, NextToken().batch_sums).tolist()


def plain_uneven(run: Run) -> list:
    """The same 4 evaluation batches through the gathered (unsharded) model, in this process only."""
    rows = torch.randint(0, 50257, (4, 2, LENGTH), generator=torch.Generator().manual_seed(2))
    model = gathered_model(run.model, main=run.accelerator.is_main_process)  # every process calls it (a collective)
    if model is None:
        return []
    with torch.no_grad():
        return sum(NextToken().batch_sums(model.eval(), {"input_ids": r}) for r in rows).tolist()


def main(out: Path, mode: str) -> None:
    # What `accelerate launch --cpu` exports: Accelerate then joins torch.distributed.run's processes (MULTI_CPU).
    os.environ["ACCELERATE_USE_CPU"] = "true"
    accelerator = make_accelerator("no", BATCH)
    assert accelerator.num_processes == int(os.environ["WORLD_SIZE"])
    rank, processes, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if mode == "resume-elsewhere":
        run = make_run(accelerator, out, shard=True)
        try:
            load_checkpoint(accelerator, list_checkpoints(out / "checkpoints")[-1], model=run.model,
                            optimizer=run.optimizer, scheduler=run.scheduler)
        except InputError as err:
            print(f"error: {err}", flush=True)
            sys.exit(2)
        sys.exit(0)
    result = {}
    reference = plain_reference() if main else None
    run = make_run(accelerator, out / "run", shard=True)
    assert is_sharded(run.model)
    initial = full_state_dict(run.model)
    train(run, range(RESUME_AT), rank, processes)
    checkpoint = save_checkpoint(accelerator, run.model, out / "checkpoints", run.state, optimizer=run.optimizer,
                                 scheduler=run.scheduler)
    train(run, range(RESUME_AT, STEPS), rank, processes)
    uninterrupted = full_state_dict(run.model)
    sample = epoch_sample(run, 1, get_tokenizer(), PROMPT, 4)  # every process generates: the forward is collective

    if main:
        (out / "resumed").mkdir()
    resumed = make_run(accelerator, out / "resumed", shard=True)
    resumed.state = load_checkpoint(accelerator, checkpoint, model=resumed.model, optimizer=resumed.optimizer,
                                    scheduler=resumed.scheduler)
    train(resumed, range(resumed.state.step, STEPS), rank, processes)
    after_resume = full_state_dict(resumed.model)
    lora = lora_under_fsdp(accelerator)
    uneven, uneven_plain = uneven_evaluation(resumed, rank), plain_uneven(resumed)
    probe = batches(0, 1)[0]["input_ids"][:2]
    with torch.no_grad():
        sharded_logits = resumed.model.eval()(probe).logits
    finish(resumed, Task())  # gathers the model, then Task.finish saves it at the top of OUT/resumed

    if main:
        def max_diff(a: dict, b: dict) -> float:
            assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
            return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

        result = {"keys": len(initial), "initial_vs_plain": max_diff(initial, reference["initial"]),
                  "final_vs_plain": max_diff(uninterrupted, reference["final"]),
                  "resumed_vs_uninterrupted": max_diff(after_resume, uninterrupted),
                  "sample": sample[0]["sample"],
                  "plain_sample": greedy_sample(reference["model"], get_tokenizer(), PROMPT, 4),
                  "checkpoint": sorted(p.name for p in checkpoint.iterdir()), "lora": lora, "uneven": uneven,
                  "uneven_plain": uneven_plain,
                  "parameters": sum(p.numel() for p in reference["model"].parameters())}
        torch.save({"probe": probe, "logits": sharded_logits}, out / "logits.pt")
    else:
        assert sample is None, "only the main process reports the sample"
    (out / f"result-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
