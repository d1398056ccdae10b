"""One process of tests/test_scale.py::test_dpo_with_a_model_sharded_with_fsdp2: DPO (train/dpo.py's ``DPOTask``
and ``Reference``) on a policy sharded with torch's FSDP2 ``fully_shard`` over gloo, on CPUs, against the same
steps unsharded in one process (started by ``torch.distributed.run``; tests/fsdp_worker.py is the sibling for
SFT, checkpoints and resume, and says why this is how FSDP is proven on a CPU).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_dpo_worker.py OUT

For each reference kind (a frozen full copy on each process, ``--precompute-ref``'s table computed before the
policy is sharded, LoRA's disabled adapters: the sharded model itself), as train/dpo.py's ``set_up`` builds
it: STEPS steps of train/loop.py's ``train_step`` with DPOTask's loss on the book's preference pairs, each
process its half of every global batch; then an evaluation where process 0 has 3 validation batches and
process 1 one (train/loop.py's repeat-last-batch rule); the LoRA run ends in train/run.py's ``finish`` (the
gathered adapter, the merged model, the plots, the test responses). Writes OUT/result-RANK.json.
"""

import copy
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
from gpt2_scratch.modeling_gpt2_scratch import Block
from gpt2_scratch.tokenizer import get_tokenizer
from gpt2_scratch.train import lora
from gpt2_scratch.train.dpo import DPOTask, Reference, frozen_reference, pair_logprobs
from gpt2_scratch.train.loop import train_step
from gpt2_scratch.train.metrics import MetricsLog
from gpt2_scratch.train.preference_data import PreferenceCollator, load_preference_records, prepare_preference_data
from gpt2_scratch.train.run import finish, make_accelerator
from gpt2_scratch.train.sharded import full_state_dict, is_sharded
from gpt2_scratch.train.state import Run, TrainState

STEPS, BATCH = 3, 4
TINY = dict(n_layers=2, emb_dim=64, n_heads=4, context_length=128)
PREFERENCES = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction-data-with-preference.json"
LORA = lora.LoRASettings(r=4, alpha=8.0, dropout=0.0, targets=("c_attn", "c_proj", "c_fc"), init="peft",
                         base_dtype="fp32", merge=True)
ARGS = SimpleNamespace(beta=0.1, logprob="mean", eval_iter=None, epochs=1, max_grad_norm=1.0, max_new_tokens=2,
                       response_batch_size=8, sample_tokens=4, push_to_hub=None, seed=123)
KINDS = ("frozen", "precomputed", "lora")
LR = {"frozen": 1e-3, "precomputed": 1e-3, "lora": 1e-2}  # LoRA's adapters start at 0: a larger step

collate = PreferenceCollator(allowed_max_length=128)


def preference_data():
    """The book's first 80 pairs: 68 training, 8 test, 4 validation (its 85/10/5 split)."""
    return prepare_preference_data(load_preference_records(str(PREFERENCES))[:80], get_tokenizer(), max_length=128)


def policy_and_reference(kind: str, data, sharded: bool, accelerator):
    """The policy (seed 0; LoRA's adapters for ``lora``) and its Reference, built as train/dpo.py's set_up does:
    the frozen copy before anything is sharded, the precomputed table before the policy is sharded (set_up's
    ``before_prepare``), the disabled adapters of the (sharded) policy itself."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY)).train()
    frozen = copy.deepcopy(model).eval().requires_grad_(False) if kind == "frozen" else None
    policy = lora.wrap(model, LORA if kind == "lora" else None).train()
    reference = Reference(model=frozen, logprob=ARGS.logprob)
    if kind == "precomputed":
        reference.model = policy.eval()
        for split, ds in (("train", data.train), ("validation", data.validation)):
            loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, collate_fn=collate)
            reference.precompute(split, loader, accelerator, len(ds), split)
        policy.train()
        reference.model = None
    if sharded:
        shard(policy)
    if kind == "lora":
        reference.adapters_of = policy
    elif frozen is not None:
        reference.model = frozen_reference(frozen, policy, accelerator.device)
    return policy, reference


def shard(model, mp_policy=None) -> None:
    """As Accelerate's FSDP2 plugin shards: every Block, then the root."""
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mp_policy=mp_policy or MixedPrecisionPolicy())
    fully_shard(model, mp_policy=mp_policy or MixedPrecisionPolicy())


def mixed_precision_reference(data, accelerator, rank: int) -> dict:
    """A policy sharded with Accelerate's bf16 mixed precision (its weights gathered in bf16) beside its frozen
    copy as set_up builds it: max |policy − reference| log-prob before any step (0: the same model), and what the
    fp32 copy would give."""
    torch.manual_seed(0)
    policy = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY)).eval()
    frozen = copy.deepcopy(policy).requires_grad_(False)
    shard(policy, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16))
    batch = collate([data.train[i] for i in range(2 * rank, 2 * rank + 2)])
    with torch.no_grad():
        ours = torch.cat(pair_logprobs(policy, batch, "mean"))
        fp32 = torch.cat(pair_logprobs(frozen, batch, "mean"))
        cast = torch.cat(pair_logprobs(frozen_reference(frozen, policy, accelerator.device), batch, "mean"))
    return {"reference": (ours - cast).abs().max().item(), "fp32_copy": (ours - fp32).abs().max().item()}


def make_run(kind: str, data, accelerator, out: Path, sharded: bool) -> tuple[Run, DPOTask]:
    policy, reference = policy_and_reference(kind, data, sharded, accelerator)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=LR[kind], weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=accelerator.is_main_process) if sharded else None
    run = Run(ARGS, accelerator, policy, out, metrics, STEPS, TrainState(), fit=None, optimizer=optimizer,
              scheduler=scheduler)
    val = data.validation_records[0]
    task = DPOTask(ARGS, get_tokenizer(), data, reference, None, None, val["instruction"], "alpaca",
                   LORA if kind == "lora" else None)
    return run, task


def train(run: Run, task: DPOTask, data, rank: int, processes: int) -> list[list[float]]:
    """STEPS steps; each process its slice of every global batch of BATCH pairs. The steps' summed DPO numbers."""
    share, sums = BATCH // processes, []
    for step in range(STEPS):
        first = step * BATCH + rank * share
        step_sums, _ = train_step(run, task, [collate([data.train[i] for i in range(first, first + share)])])
        sums.append(step_sums.tolist())
        run.state.step = step + 1
    return sums


def uneven_validation(run: Run, task: DPOTask, data, rank: int, processes: int) -> dict:
    """DPOTask.measure over the 4 validation pairs, one a batch: with 2 processes 3 batches on process 0, 1 on
    process 1 (it repeats its batch, uncounted, while process 0 still has one)."""
    pairs = range(len(data.validation))
    mine = pairs if processes == 1 else (pairs[:-1] if rank == 0 else pairs[-1:])
    return task.measure(run, [collate([data.validation[i]]) for i in mine], "validation", "val")


def plain_accelerator():
    return SimpleNamespace(device=torch.device("cpu"), num_processes=1, reduce=lambda t, reduction: t,
                           autocast=nullcontext, backward=lambda loss: loss.backward(), is_main_process=True,
                           clip_grad_norm_=torch.nn.utils.clip_grad_norm_)


def plain(kind: str, data) -> dict:
    """One process, the whole policy, the whole global batch: what the sharded run must equal."""
    run, task = make_run(kind, data, plain_accelerator(), Path("."), sharded=False)
    sums = train(run, task, data, 0, 1)
    return {"sums": sums, "final": run.model.state_dict(), "val": uneven_validation(run, task, data, 0, 1)}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main(out: Path) -> None:
    os.environ["ACCELERATE_USE_CPU"] = "true"  # what `accelerate launch --cpu` exports (MULTI_CPU, gloo)
    accelerator = make_accelerator("no", BATCH)
    rank, processes, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    data, result = preference_data(), {}
    mixed = mixed_precision_reference(data, accelerator, rank)  # before finish, which ends the process group
    for kind in KINDS:  # the LoRA run last: it ends in finish
        reference = plain(kind, data) if main else None
        folder = out / kind
        if main:
            folder.mkdir(parents=True)
        run, task = make_run(kind, data, accelerator, folder, sharded=True)
        assert is_sharded(run.model)
        sums = train(run, task, data, rank, processes)
        final = full_state_dict(run.model)
        val = uneven_validation(run, task, data, rank, processes)
        if kind == KINDS[-1]:
            run.log({"step": STEPS, **val})
            finish(run, task)  # gathers the policy; DPOTask.finish saves the adapter, the merged model, responses
        if main:
            result[kind] = {"sums": sums, "plain_sums": reference["sums"], "val": val, "plain_val": reference["val"],
                            "final_vs_plain": max_diff(final, reference["final"]),
                            "trained": max_diff(final, plain_initial(kind))}
    (out / f"result-{rank}.json").write_text(json.dumps({**result, "mixed_precision": mixed} if main else {}))


def plain_initial(kind: str) -> dict:
    """The policy before training (its state dict), to show that the steps changed it."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY))
    return lora.wrap(model, LORA if kind == "lora" else None).state_dict()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
