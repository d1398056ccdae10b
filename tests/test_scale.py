"""Past one process: evaluation split across processes, two "machines" on localhost, FSDP asked for on a CPU,
and ``--gradient-checkpointing`` from the command line.

The multi-process runs are real ``accelerate launch`` commands (slow: each starts interpreters and a gloo
group). The reference for every metric is the one-process run of the same command.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENV, REPO_ROOT, SHARED_DIR, TINY_ARGS
import torch
from safetensors.torch import load_file

REPO = REPO_ROOT
BOOK_DATA = SHARED_DIR / "data" / "instruction-data.json"
# --sample 40 with the book's 85/10/5 split: 34 training, 4 test and 2 validation records, so with 2 processes
# the one validation batch (2 examples; the global batch is 4) leaves the second process nothing to evaluate.
TINY = [*TINY_ARGS, "--data", str(BOOK_DATA), "--sample", "40", "--lr", "1e-3", "--batch-size", "4",
        "--epochs", "1", "--max-steps", "6", "--eval-freq", "3", "--eval-iter", "2", "--save-every", "3",
        "--max-new-tokens", "2", "--response-batch-size", "55", "--sample-tokens", "4"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no", "--dynamo_backend", "no"]


def metrics(out: Path) -> list[dict]:
    """Every logged evaluation, without the fields that depend on the process count (padding, timing)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    noise = ("tokens_seen", "tokens_per_sec")
    return [{k: v for k, v in r.items() if k not in noise} for r in rows if not r.get("timing") and "sample" not in r]


def assert_same_run(reference: Path, other: Path, *, tolerance: float = 2e-5) -> None:
    """The same metrics (to float rounding: another process count sums in another order) and weights."""
    ref, got = metrics(reference), metrics(other)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        for key, value in a.items():
            if isinstance(value, float):
                assert abs(value - b[key]) <= tolerance, (key, a, b)
    weights_ref, weights = load_file(reference / "model.safetensors"), load_file(other / "model.safetensors")
    assert weights_ref.keys() == weights.keys()
    for name in weights_ref:
        assert (weights_ref[name] - weights[name]).abs().max().item() < 1e-5, name
    responses = json.loads((other / "instruction-data-with-response.json").read_text())
    assert [r["instruction"] for r in responses] == \
        [r["instruction"] for r in json.loads((reference / "instruction-data-with-response.json").read_text())]


def sft(out: Path, *extra: str, launch: list[str] = ()) -> subprocess.CompletedProcess:
    result = subprocess.run([*launch, *([] if launch else [sys.executable]), "train/sft.py", *TINY, *extra,
                             "--out", str(out)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scale") / "one"
    sft(out)
    return out


def test_gradient_checkpointing_trains_the_same_run(one_process, tmp_path):
    """--gradient-checkpointing recomputes each block in the backward pass: the same losses and weights."""
    out = tmp_path / "checkpointed"
    sft(out, "--gradient-checkpointing")
    assert_same_run(one_process, out, tolerance=0.0)
    assert json.loads((out / "args.json").read_text())["gradient_checkpointing"] is True


@pytest.mark.slow
def test_validation_split_smaller_than_the_processes(one_process, tmp_path):
    """2 processes, one validation batch of 2 examples: every example counted once, the one-process losses."""
    out = tmp_path / "two"
    result = sft(out, launch=[*LAUNCH, "--cpu", "--num_processes", "2", "--main_process_port", "0"])
    assert "on 2 process(es)" in result.stdout
    assert_same_run(one_process, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_machines_on_localhost_equal_two_processes(one_process, tmp_path):
    """`accelerate launch --num_machines 2 --machine_rank 0|1` (one process each, as two hosts would start it):
    one run of 2 processes, the metrics and weights of the one-process run; the main machine alone writes OUT
    (a shared folder here, as on a cluster file system), and the second machine's launcher prints nothing."""
    out, port = tmp_path / "machines", free_port()
    procs = []
    for rank in (1, 0):
        cmd = [*LAUNCH, "--cpu", "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "train/sft.py", *TINY,
               "--out", str(out)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    (out1, err1), (out0, err0) = (p.communicate(timeout=900) for p in procs)
    assert [p.returncode for p in procs] == [0, 0], (err0[-2000:], err1[-2000:])
    assert "on 2 process(es)" in out0 and "done:" in out0
    assert "step" not in out1 and "error" not in err1.lower(), (out1, err1)
    assert_same_run(one_process, out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    assert sorted(p.name for p in (out / "checkpoints" / "step-00000006").glob("random_states_*")) == \
        ["random_states_0.pkl", "random_states_1.pkl"]  # each process's RNG state, for --resume


@pytest.mark.slow
def test_fsdp_on_a_cpu_says_it_trains_with_ddp(one_process, tmp_path):
    """`accelerate launch --use_fsdp` on a machine without a GPU: one line naming FSDP and what runs instead
    (DDP over the same processes), no traceback, and the run is the one-process run."""
    out = tmp_path / "fsdp"
    result = sft(out, launch=[*LAUNCH, "--use_fsdp", "--num_processes", "2", "--main_process_port", "0"])
    notes = [line for line in result.stderr.splitlines() if "FSDP" in line]
    assert notes == ["note: FSDP needs GPUs and this machine has none; training with DDP instead (2 process(es), "
                     "each holding the whole model)"], result.stderr
    assert "Traceback" not in result.stderr
    assert "on 2 process(es)" in result.stdout
    assert_same_run(one_process, out)


def torchrun(*args: str, processes: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", "tests/fsdp_worker.py", *args],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_model_sharded_with_fsdp2_saves_resumes_and_gathers(tmp_path):
    """A CPU proof of our FSDP code paths (tests/fsdp_worker.py; Accelerate itself enables FSDP only on GPUs):
    2 processes over gloo, the tiny model sharded with torch's ``fully_shard`` per Block and at the root as
    Accelerate's FSDP2 plugin does, trained by train/loop.py's ``train_step``. The gathered state dict equals the
    unsharded one-process model's; a sharded checkpoint at step 2, resumed, ends bit for bit where the
    uninterrupted run does; the epoch sample (every process generates) is the plain model's; LoRA trains sharded
    and is gathered into a PeftModel that merges; an evaluation where one process runs out of batches first
    (a forward pass needs every process) counts every batch once; ``finish`` writes a
    folder that ``from_pretrained`` loads with the same logits; a resume with another process count: one line."""
    from gpt2_scratch import GPT2ScratchForCausalLM

    result = torchrun(str(tmp_path), "train", processes=2)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    found = json.loads((tmp_path / "result-0.json").read_text())
    assert found["keys"] == 29 and found["initial_vs_plain"] == 0.0
    assert found["final_vs_plain"] < 1e-5  # another process count sums in another order
    assert found["resumed_vs_uninterrupted"] == 0.0
    assert found["sample"] == found["plain_sample"]
    # An evaluation whose last global batch leaves process 1 nothing: it joins the forward passes, counts nothing.
    assert found["uneven"][1] == found["uneven_plain"][1] == 4 * 2 * 15
    assert abs(found["uneven"][0] - found["uneven_plain"][0]) < 1e-5 * found["uneven_plain"][0]
    lora = found["lora"]  # LoRA on the sharded model: the base frozen, the adapters trained, merged when gathered
    assert lora["base"] == 0.0 and lora["lora"] > 0 and lora["merged_parameters"] == found["parameters"]
    assert found["checkpoint"] == ["fsdp.json", "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin",
                                   "sharded", "train_state.json"]
    assert {p.name for p in (tmp_path / "checkpoints" / "step-00000002" / "sharded").iterdir()} == \
        {".metadata", "__0_0.distcp", "__1_0.distcp"}  # each process wrote its own shards
    model = GPT2ScratchForCausalLM.from_pretrained(tmp_path / "resumed").eval()
    saved = torch.load(tmp_path / "logits.pt", weights_only=True)
    with torch.no_grad():
        assert torch.equal(model(saved["probe"]).logits, saved["logits"])

    other = torchrun(str(tmp_path), "resume-elsewhere", processes=1)
    errors = [line for line in other.stdout.splitlines() if line.startswith("error:")]
    assert other.returncode != 0 and errors == [
        f"error: --resume: {tmp_path}/checkpoints/step-00000002 holds FSDP shards of 2 process(es) and this run "
        "has 1; resume with --num_processes 2"], other.stdout[-2000:]


@pytest.mark.slow
def test_dpo_with_a_model_sharded_with_fsdp2(tmp_path):
    """DPO on a policy sharded as Accelerate's FSDP2 plugin shards it (tests/fsdp_dpo_worker.py, 2 processes over
    gloo), for each reference: a frozen full copy on each process, ``--precompute-ref``'s table, LoRA's disabled
    adapters (the sharded model itself, run by both processes together). 3 steps of ``train_step`` with DPOTask's
    loss give the one-process unsharded run's DPO sums and gathered weights; an evaluation where process 0 has 3
    batches and process 1 one gives the unsharded means; the LoRA run's ``finish`` writes the adapter, the merged
    model and the test responses; under bf16 mixed precision the frozen copy computes what the policy computes."""
    from gpt2_scratch import GPT2ScratchForCausalLM

    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/fsdp_dpo_worker.py", str(tmp_path)], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    found = json.loads((tmp_path / "result-0.json").read_text())
    for kind in ("frozen", "precomputed", "lora"):
        run = found[kind]
        assert run["sums"][0][:3] == [pytest.approx(4 * 0.6931472), 4.0, 0.0]  # step 1: policy = reference
        for got, want in zip(run["sums"], run["plain_sums"]):
            assert got[1] == want[1] and got[4] == want[4], kind  # the pairs, the pairs won
            assert got == pytest.approx(want, abs=1e-5), kind
        assert run["val"] == pytest.approx(run["plain_val"], abs=1e-5), kind
        assert run["final_vs_plain"] < 3e-5 and run["trained"] > 1e-3, kind  # the steps changed it, the same way
    assert found["frozen"]["sums"] == found["precomputed"]["sums"]
    mixed = found["mixed_precision"]
    assert mixed["reference"] == 0.0 and mixed["fp32_copy"] > 1e-5, mixed
    out = tmp_path / "lora"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert len(json.loads((out / "instruction-data-with-response.json").read_text())) == 8
    GPT2ScratchForCausalLM.from_pretrained(out)  # the merged model


def test_a_sharded_checkpoint_is_read_without_running_code(tmp_path):
    """DCP pickles its metadata; ours is read with only DCP's own classes allowed: a tampered file that would
    run a command is refused, and the command does not run."""
    import pickle

    from gpt2_scratch.train import sharded

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload()))
    reader, _ = sharded._safe_io(str(tmp_path))
    with pytest.raises(pickle.UnpicklingError, match="not part of a checkpoint's metadata"):
        reader.read_metadata()
    assert not marker.exists()


def test_a_checkpoint_of_another_layout_is_refused_in_one_line(tmp_path):
    """Shards of 2 processes into 4, shards into a whole model, a whole model into shards: one line each."""
    from gpt2_scratch.core.errors import InputError
    from gpt2_scratch.train.sharded import LAYOUT_FILE, check_layout

    whole = tmp_path / "whole"
    whole.mkdir()
    with pytest.raises(InputError, match="holds the whole model .* this run shards it"):
        check_layout(whole, 2, sharded=True)
    check_layout(whole, 2, sharded=False)
    (tmp_path / LAYOUT_FILE).write_text('{"processes": 2}')
    with pytest.raises(InputError, match=r"shards of 2 process\(es\) and this run has 4; resume with --num_processes 2"):
        check_layout(tmp_path, 4, sharded=True)
    with pytest.raises(InputError, match="this run does not shard its model"):
        check_layout(tmp_path, 2, sharded=False)
    check_layout(tmp_path, 2, sharded=True)
