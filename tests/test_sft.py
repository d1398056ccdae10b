"""End-to-end instruction finetuning through the real CLI (`python train/sft.py`) on a tiny model.

One uninterrupted reference run on the book's data (module fixture) is checked for what it leaves in
OUT, then compared with a run killed by SIGKILL and resumed, and (slow) with a 2-process
``accelerate launch`` run of the same global batch.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from conftest import ENV, TINY_ARGS, kill_at_checkpoint, run_cli

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BOOK_DATA = SHARED / "data" / "instruction-data.json"


# A tiny GPT-2 (2 layers, width 64, context 128) on the book's data: 4 examples per micro-batch, 2
# micro-batches per step (global batch 8, as the book), a high learning rate so 30 steps show learning.
TINY = [*TINY_ARGS, "--data", str(BOOK_DATA), "--lr", "1e-3", "--batch-size", "4",
        "--grad-accum", "2", "--epochs", "1", "--max-steps", "30", "--eval-freq", "5", "--eval-iter", "2",
        "--save-every", "10", "--keep-checkpoints", "0", "--max-new-tokens", "2", "--response-batch-size", "55",
        "--sample-tokens", "4"]


def sft(*args) -> subprocess.CompletedProcess:
    return run_cli("train/sft.py", *args, env=ENV)


def losses(out: Path) -> list[tuple[int, float, float]]:
    """(step, running train loss, validation loss) of every evaluation after the initial one."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss_running"], r["val_loss"]) for r in rows if "train_loss_running" in r]


def initial_losses(out: Path) -> dict:
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"initial"' in line]
    return row


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "ref"
    result = sft(*TINY, "--output-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_training_run_leaves_a_complete_output_dir(reference_run):
    out, result = reference_run
    rows = losses(out)
    assert [r[0] for r in rows] == [1, 6, 11, 16, 21, 26, 30]
    first, last = rows[0], rows[-1]
    assert last[1] < first[1] - 2.0 and last[2] < first[2] - 2.0, rows  # train and val loss drop clearly
    assert "| step     6/30 | train (running)" in result.stdout  # one dense line per evaluation
    initial = initial_losses(out)  # before any step: the first eval_iter batches of train and validation
    assert initial["step"] == 0 and abs(initial["train_loss"] - 10.82) < 0.1 and abs(initial["val_loss"] - 10.82) < 0.1
    assert f"initial losses | train {initial['train_loss']:.3f} | val {initial['val_loss']:.3f}" in result.stdout
    assert json.loads((out / "config.json").read_text())["prompt_style"] == "alpaca"  # for chat and GGUF

    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "args.json",
                 "loss.png", "loss.pdf"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG" and (out / "loss.pdf").read_bytes()[:4] == b"%PDF"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000010", "step-00000020",
                                                                      "step-00000030"]
    responses = json.loads((out / "instruction-data-with-response.json").read_text())
    book = json.loads(BOOK_DATA.read_text())
    assert len(responses) == 110
    assert [{k: v for k, v in r.items() if k != "model_response"} for r in responses] == book[935:1045]
    assert all(isinstance(r["model_response"], str) for r in responses)
    assert not list(out.glob(".*"))  # no staging or temporary files left behind

    # A fresh process without this package loads it through auto_map + trust_remote_code.
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "assert 'gpt2_scratch' not in sys.modules\n"
        "ids = torch.tensor([t.encode('Below is an instruction')])\n"
        "print(m.config.n_layers, m.config.emb_dim, m(ids).logits.shape[-1], m.generation_config.pad_token_id)\n"
    )
    fresh = subprocess.run([sys.executable, "-c", code, str(out)], cwd="/", env={**ENV, "PYTHONPATH": ""},
                           capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert fresh.stdout.strip().splitlines()[-1].split() == ["2", "64", "50257", "50256"]
    weights = load_file(out / "model.safetensors")
    final_ckpt = load_file(out / "checkpoints" / "step-00000030" / "model.safetensors")
    assert torch.equal(weights["transformer.h.1.mlp.c_fc.weight"], final_ckpt["transformer.h.1.mlp.c_fc.weight"])


@pytest.mark.slow  # several fresh interpreters (~10 s each here): the slow suite
def test_resume_after_sigkill_matches_uninterrupted_run(reference_run, tmp_path):
    ref_out, _ = reference_run
    out = tmp_path / "killed"
    kill_at_checkpoint([sys.executable, "train/sft.py", *TINY, "--output-dir", out],
                       out / "checkpoints" / "step-00000010" / "train_state.json", cwd=REPO, env=ENV)
    assert not (out / "model.safetensors").exists()  # no final model from a killed run

    resumed = sft(*TINY, "--output-dir", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout

    got, ref = losses(out), losses(ref_out)
    assert [r[0] for r in got] == [r[0] for r in ref]
    assert [v for r in got for v in r[1:]] == pytest.approx([v for r in ref for v in r[1:]], rel=1e-6, abs=0)
    ref_weights, weights = load_file(ref_out / "model.safetensors"), load_file(out / "model.safetensors")
    assert ref_weights.keys() == weights.keys()
    for name in ref_weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow  # several fresh interpreters (~10 s each here): the slow suite
def test_the_caching_malloc_changes_speed_not_results(reference_run, tmp_path):
    """train/sft.py re-executes itself with mimalloc preloaded (train/allocator.py); the same run on
    glibc's malloc logs the same losses and checkpoints the same weights at step 10."""
    ref_out, ref_result = reference_run
    assert ", mimalloc malloc" in ref_result.stdout
    out = tmp_path / "system-malloc"
    result = subprocess.run([sys.executable, "train/sft.py", *TINY, "--max-steps", "10", "--output-dir", str(out)],
                            cwd=REPO, env={**ENV, "GPT2_SCRATCH_ALLOCATOR": "system"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ", system malloc" in result.stdout
    got, ref = losses(out)[:2], losses(ref_out)[:2]  # steps 1 and 6
    assert [r[0] for r in got] == [r[0] for r in ref] == [1, 6]
    assert [v for r in got for v in r[1:]] == pytest.approx([v for r in ref for v in r[1:]], rel=1e-6, abs=0)
    step10 = "checkpoints/step-00000010/model.safetensors"
    ref_weights, weights = load_file(ref_out / step10), load_file(out / step10)
    for name in ref_weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-6, atol=1e-7, msg=name)


class RunsCode:
    """Pickles as a call of os.system: what a booby-trapped checkpoint file would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_refuses_a_tampered_checkpoint_without_running_it(reference_run, tmp_path):
    """Checkpoint files are read with torch.load(weights_only=True): a pickle that would run code is
    refused with one line naming the checkpoint, also for the RNG file (which accelerate would skip)."""
    ref_out, _ = reference_run
    marker = tmp_path / "code-ran"
    procs = []
    for name in ("optimizer.bin", "random_states_0.pkl"):
        out = tmp_path / name
        checkpoint = out / "checkpoints" / "step-00000010"
        shutil.copytree(ref_out / "checkpoints" / "step-00000010", checkpoint)
        shutil.copy(ref_out / "args.json", out / "args.json")
        torch.save({"state": RunsCode(marker)}, checkpoint / name)
        cmd = [sys.executable, "train/sft.py", *TINY, "--output-dir", str(out), "--resume"]
        procs.append((name, subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True)))
    for name, proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --resume: cannot restore"), stderr
        assert "UnpicklingError" in lines[0] and "step-00000010" in lines[0], lines[0]
    assert not marker.exists()


@pytest.mark.slow
def test_two_processes_match_one_process(reference_run, tmp_path):
    """`accelerate launch --num_processes 2 --cpu`: each process takes half of every global batch.
    Tolerance: losses within 1e-4 absolute (observed ~1e-6: only summation order and padding width differ)."""
    ref_out, _ = reference_run
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    result = subprocess.run([*launch, "train/sft.py", *TINY, "--output-dir", str(out)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    ref, got = losses(ref_out), losses(out)
    assert [r[0] for r in got] == [r[0] for r in ref]
    for (_, rt, rv), (_, gt, gv) in zip(ref, got):
        assert abs(rt - gt) < 1e-4 and abs(rv - gv) < 1e-4, (ref, got)
    assert len(json.loads((out / "instruction-data-with-response.json").read_text())) == 110
    assert "on 2 process(es)" in result.stdout
    assert result.stdout.count("| step     6/30 |") == 1  # only the main process prints and writes


def test_fused_adamw_takes_the_default_step():
    """train/sft.py uses AdamW's fused kernel for speed; one step equals the default implementation's
    to rounding (later steps drift apart only as rounding differences are amplified by Adam)."""
    import copy

    from conftest import TINY as TINY_SHAPE

    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY_SHAPE))
    ids = torch.randint(0, 50257, (4, 24), generator=torch.Generator().manual_seed(1))
    stepped = []
    for fused in (False, True):
        m = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1, fused=fused)
        m(ids, labels=ids).loss.backward()
        optimizer.step()
        stepped.append(m)
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), stepped[0].parameters()))
    assert moved > 5e-4  # the step really moved the weights (lr 1e-3)
    for default, fused in zip(stepped[0].parameters(), stepped[1].parameters()):
        torch.testing.assert_close(fused, default, atol=1e-7, rtol=0)


def test_grouped_evaluation_batches_give_the_same_validation_loss():
    """--group-by-length also regroups the evaluated validation examples by length; the loss per
    target token must not change, only the padding the model runs through."""
    from accelerate import Accelerator
    from conftest import TINY as TINY_SHAPE
    from torch.utils.data import DataLoader

    from gpt2_scratch.core.records import load_records
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM, get_tokenizer
    from gpt2_scratch.train.data import InstructionCollator, evaluation_sampler, prepare_instruction_data
    from gpt2_scratch.train.loop import mean_loss, sums_over
    from gpt2_scratch.train.sft import SFTArgs, SFTTask

    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY_SHAPE))
    data = prepare_instruction_data(load_records(str(BOOK_DATA)), get_tokenizer(), max_length=128)
    val = data.validation.select_columns(["input_ids", "prompt_length"])
    collate = InstructionCollator(allowed_max_length=128)
    losses, pads = [], []
    for group in (False, True):
        sampler = evaluation_sampler(list(data.validation["length"]), 8, eval_iter=5, group_by_length=group)
        loader = DataLoader(val, batch_sampler=sampler, collate_fn=collate)
        run = SimpleNamespace(model=model, accelerator=Accelerator(cpu=True))
        task = SFTTask(SFTArgs(), None, data, loader, loader, "", None)
        losses.append(mean_loss(sums_over(run, loader, 5, task.batch_sums)))
        pads.append(sum(int((b["labels"] == -100).sum()) for b in list(loader)[:5]))
    assert pads[1] < pads[0] / 2
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_training_records_without_an_answer_are_a_warning_with_their_count(caplog):
    """Some records with a blank output teach an empty answer: counted in the training split, not the whole file
    (all of them stop the run: tests/test_bad_input_silent.py)."""
    from gpt2_scratch import get_tokenizer
    from gpt2_scratch.train.data import prepare_instruction_data
    from gpt2_scratch.train.sft import check_answers

    records = [{"instruction": f"Say {i}.", "output": " \n" if i % 4 == 0 else f"{i}."} for i in range(40)]
    data = prepare_instruction_data(records, get_tokenizer())  # train: the first 34, 9 of them blank (10 in all)
    check_answers(data.train_records, "d.json")
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warning:")]
    assert warnings == ["warning: 9 of 34 training records have an empty or whitespace-only 'output' (they teach the "
                        "model to answer with nothing)"]


def test_cli_arguments_and_offline_demo_profile():
    from gpt2_scratch.core.args import parse_dataclass_args
    from gpt2_scratch.train.sft import OFFLINE_DEMO, SFTArgs

    args, explicit = parse_dataclass_args(SFTArgs, [])
    assert (args.model, args.epochs, args.batch_size, args.lr, args.weight_decay, args.eval_freq, args.eval_iter) == (
        "gpt2-medium", 2, 8, 5e-5, 0.1, 5, 5)  # the book's defaults
    assert args.data.endswith("ch07/01_main-chapter-code/instruction-data.json") and explicit == set()
    assert parse_dataclass_args(SFTArgs, ["--resume"])[0].resume == "latest"
    assert parse_dataclass_args(SFTArgs, ["--resume", "OUT/checkpoints/step-00000010"])[0].resume.endswith("10")
    args, explicit = parse_dataclass_args(SFTArgs, ["--offline-demo", "--epochs", "1", "--mixed-precision", "no"])
    demo = args.with_explicit(explicit)
    assert (demo.epochs, demo.mixed_precision) == (1, "no")  # explicit options win over the profile
    assert (demo.model, demo.random_init, demo.data, demo.emb_dim) == ("gpt2-small", True, "synthetic",
                                                                      OFFLINE_DEMO["emb_dim"])
    with pytest.raises(SystemExit):
        parse_dataclass_args(SFTArgs, ["--prompt-style", "chatml"])


@pytest.mark.parametrize("fast", [True, False])
def test_auto_precision_picks_bf16_only_where_it_is_fast(monkeypatch, capsys, fast):
    """--mixed-precision auto (the offline demo's): bf16 on AMX/AVX512-BF16/GPU, fp32 on an AVX2-only CPU,
    where torch's bf16 fallback is tens of times slower; asking for bf16 there works but prints a note."""
    import gpt2_scratch.train.run as train_run
    from gpt2_scratch.train.sft import SFTArgs

    monkeypatch.setattr(train_run, "fast_bf16", lambda: fast)
    args = SFTArgs(mixed_precision="auto")
    train_run.resolve_precision(args)
    assert args.mixed_precision == ("bf16" if fast else "no") and capsys.readouterr().err == ""
    args = SFTArgs(mixed_precision="bf16")
    train_run.resolve_precision(args)
    assert args.mixed_precision == "bf16"
    assert ("neither AMX nor AVX512-BF16" in capsys.readouterr().err) is not fast


@pytest.mark.slow
def test_offline_demo_learns_the_synthetic_tasks(tmp_path):
    """The README's command, with the network unreachable: held-out exact match well above 0."""
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "train/sft.py", "--offline-demo", "--output-dir", str(out)], cwd=REPO,
                            env={**ENV, "GPT2_SCRATCH_CACHE": str(tmp_path / "cache"), "HTTPS_PROXY": "http://127.0.0.1:9",
                                 "HTTP_PROXY": "http://127.0.0.1:9"},
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((out / "exact_match.json").read_text())
    assert scores["all"]["total"] == 300 and scores["all"]["accuracy"] > 0.3, scores
    assert "held-out exact match:" in result.stdout


def test_push_to_hub_hook_uploads_the_run(reference_run, tmp_path):
    from hub_standin import HubStandin

    out, _ = reference_run
    code = ("import sys; from pathlib import Path; from gpt2_scratch.train.publish import push_run\n"
            "push_run(Path(sys.argv[1]), 'alice/tiny-sft')\n")
    with HubStandin(tmp_path / "hub", token="hf_test") as hub:
        env = {**ENV, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1",
               "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0"}
        result = subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        files = {f for commit in hub.commits for f in commit["files"]}
    assert {"model.safetensors", "config.json", "README.md"} <= files
    assert not any(f.startswith("checkpoints/") for f in files)
