"""Past one process: evaluation split across processes, two "machines" on localhost, FSDP asked for on a CPU,
and ``--gradient-checkpointing`` from the command line.

The multi-process runs are real ``accelerate launch`` commands (slow: each starts interpreters and a gloo
group). The reference for every metric is the one-process run of the same command.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENV, REPO_ROOT, SHARED_DIR, TINY_ARGS
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
