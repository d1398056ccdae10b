"""`train/pretrain.py` as users run it: a tiny random GPT-2 on the book's short story.

What the one loop gives pretraining (a resume after SIGKILL ends bit for bit where an uninterrupted run
ends), what the run leaves (metrics with validation loss and perplexity, the loss plot, the samples,
pretraining.json), and that the folder is a model the rest of the pipeline takes: transformers without
our package, `generate`, `sft --model`, `convert gguf`, and a model card that says what it read.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED_DIR, kill_at_checkpoint, run_python, signal_after_first_evaluation, start_cli

REPO = Path(__file__).resolve().parents[1]
VERDICT = SHARED_DIR / "data" / "the-verdict.txt"

# 2 layers, width 64, windows of 32: 144 training windows, 18 steps of 8 per epoch, 36 in all.
TINY = ["--model", "gpt2-small", "--random-init", "--n-layers", "2", "--emb-dim", "64", "--n-heads", "4",
        "--context-length", "32", "--drop-rate", "0.1", "--data", str(VERDICT), "--epochs", "2", "--batch-size", "8",
        "--lr", "1e-3", "--eval-freq", "5", "--eval-iter", "2", "--save-every", "10", "--keep-checkpoints", "0",
        "--sample-tokens", "6"]


def env_for(tmp: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "GPT2_SCRATCH_CACHE": str(tmp / "cache")}


def run(tmp: Path, script: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=env_for(tmp), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    out = tmp / "ref"
    result = run(tmp, "train/pretrain.py", *TINY, "--out", out)
    return tmp, out, result


def test_a_run_leaves_a_model_metrics_and_what_it_read(reference_run):
    tmp, out, result = reference_run
    assert "4,612 training / 534 validation tokens (tokenized now" in result.stdout
    rows = metrics(out)
    evals = [r for r in rows if "val_perplexity" in r and not r.get("initial")]
    assert [r["step"] for r in evals] == [1, 6, 11, 16, 21, 26, 31, 36]
    assert all(r["val_perplexity"] == pytest.approx(2.718281828 ** r["val_loss"]) for r in evals)
    assert evals[-1]["val_loss"] < rows[0]["val_loss"] - 1.0  # it learned something
    samples = [r["sample"] for r in rows if "sample" in r]
    assert len(samples) == 2 and all(s.startswith("Every effort moves you") for s in samples)
    assert (out / "loss.png").is_file() and (out / "model.safetensors").is_file()
    info = json.loads((out / "pretraining.json").read_text())
    assert info["train"]["tokens"] == 4612 and info["validation"]["tokens"] == 534 and info["tokens_seen"] == 36 * 8 * 32
    config = json.loads((out / "config.json").read_text())
    assert "prompt_style" not in config and config["drop_rate"] == 0.1
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


@pytest.mark.slow  # two training processes, one killed (as sft's and dpo's SIGKILL tests)
def test_resume_after_sigkill_is_bit_identical(reference_run):
    tmp, ref, _ = reference_run
    out = tmp / "killed"
    kill_at_checkpoint([sys.executable, "train/pretrain.py", *TINY, "--out", out],
                       out / "checkpoints" / "step-00000010" / "train_state.json", cwd=REPO, env=env_for(tmp))
    assert not (out / "model.safetensors").exists()
    resumed = run(tmp, "train/pretrain.py", *TINY, "--out", out, "--resume")
    assert "resumed from" in resumed.stdout and "(cached" in resumed.stdout  # the corpus was not tokenized again

    def comparable(rows):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_sec",) and not k.startswith("seconds_")}
                for r in rows if not r.get("timing")]

    assert comparable(metrics(out)) == comparable(metrics(ref))
    got, want = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(reference_run, tmp_path):
    import signal

    tmp, ref, _ = reference_run
    out = tmp_path / "stopped"
    proc = start_cli("train/pretrain.py", *TINY, "--out", out, env=env_for(tmp))
    stdout, stderr = signal_after_first_evaluation(proc, out, signal.SIGINT)
    assert proc.returncode == 130, stderr[-2000:]
    assert "continue with the same command and --resume" in stdout and not (out / "model.safetensors").exists()
    run(tmp, "train/pretrain.py", *TINY, "--out", out, "--resume")
    got, want = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_changed_corpus_is_refused_on_resume(tmp_path):
    corpus = tmp_path / "verdict.txt"
    corpus.write_text(VERDICT.read_text(encoding="utf-8"), encoding="utf-8")
    args = [*[a if a != str(VERDICT) else str(corpus) for a in TINY], "--max-steps", "10", "--out", tmp_path / "run"]
    run(tmp_path, "train/pretrain.py", *args)
    with open(corpus, "a", encoding="utf-8") as f:
        f.write(" More.")
    result = subprocess.run([sys.executable, "train/pretrain.py", *map(str, args), "--resume"], cwd=REPO,
                            env=env_for(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "differs from the data the checkpoint" in result.stderr, result.stderr


@pytest.mark.slow  # several fresh interpreters (~10 s each here): the slow suite
def test_the_folder_loads_without_our_package_and_the_pipeline_takes_it(reference_run, tmp_path):
    tmp, out, _ = reference_run
    loaded = run_python(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        ids = tok("Every effort moves you", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
        print("generated", out.shape[1] - ids.shape[1])
    """, cwd=tmp_path, block_project=True)
    assert "generated 3" in loaded.stdout

    generated = run(tmp, "-m", "gpt2_scratch", "generate", "--model", out, "--prompt", "Every effort moves you",
                    "--max-new-tokens", "4")
    assert "Every effort moves you" in generated.stdout
    gguf = tmp_path / "m.gguf"
    run(tmp, "-m", "gpt2_scratch", "convert", "gguf", "--model", out, "--out", gguf)
    assert gguf.read_bytes()[:4] == b"GGUF"
    sft = run(tmp, "train/sft.py", "--model", out, "--data", SHARED_DIR / "data" / "instruction-data.json",
              "--sample", "40", "--max-steps", "2", "--batch-size", "4", "--eval-iter", "1", "--max-new-tokens", "2",
              "--sample-tokens", "2", "--out", tmp_path / "sft")
    assert (tmp_path / "sft" / "model.safetensors").is_file(), sft.stdout[-2000:]


def test_the_model_card_says_what_it_was_trained_on(reference_run):
    from gpt2_scratch.train.publish import build_model_card, find_run_info

    _, out, _ = reference_run
    card = str(build_model_card(out, "alice/verdict-tiny", find_run_info(out)))
    fingerprint = json.loads((out / "pretraining.json").read_text())["train"]["fingerprint"]
    assert "Pretrained on raw text: 4,612 training tokens" in card and fingerprint[:16] in card
    assert "no instruction template" in card and "### Instruction" not in card


@pytest.mark.slow  # two processes started by accelerate's launcher: the slow suite
def test_accelerate_launch_two_processes_trains_the_same_losses(tmp_path):
    """Without dropout the losses of a 2-process run equal a 1-process run's (the batch is global, each
    process takes its half): the windows are split, not duplicated."""
    args = [a if a != "0.1" else "0.0" for a in TINY] + ["--max-steps", "6", "--epochs", "1"]
    one = tmp_path / "one"
    run(tmp_path, "train/pretrain.py", *args, "--out", one)
    two = tmp_path / "two"
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                             "train/pretrain.py", *args, "--out", str(two)], cwd=REPO, env=env_for(tmp_path),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout

    def losses(out):
        return [(r["step"], r["val_loss"]) for r in metrics(out) if "val_loss" in r]

    assert [s for s, _ in losses(two)] == [s for s, _ in losses(one)]
    assert [v for _, v in losses(two)] == pytest.approx([v for _, v in losses(one)], rel=1e-4)


def tokenize_once_while_locked(tmp: Path, commands: list[list], waiters: list[int]) -> list[str]:
    """Start ``commands`` on the book's story, not yet cached, while this test holds its cache entry's lock; wait
    until command ``i`` has said ``waiters[i]`` times that a process waits for the entry (so every process met
    the missing entry at once), then let go. Returns each command's stdout once all have finished (each must
    succeed); the cache then holds the entry and nothing beside it."""
    from gpt2_scratch.core.locks import FileLock
    from gpt2_scratch.train.token_cache import tokenized_corpus

    key = tokenized_corpus(str(VERDICT), cache_dir=str(tmp / "elsewhere"), progress=False).fingerprint
    entry = tmp / "cache" / "tokens" / key
    procs, outputs = [], []
    with FileLock.beside(entry, what="the test"):
        for i, command in enumerate(commands):
            procs.append(subprocess.Popen(list(map(str, command)), cwd=REPO, env=env_for(tmp), text=True,
                                          stdout=subprocess.PIPE, stderr=open(tmp / f"stderr-{i}", "w")))
        for proc, expected in zip(procs, waiters):  # a waiter blocks after its line: none is missed, none hangs
            lines = []
            while sum("another process is tokenizing it" in line for line in lines) < expected:
                line = proc.stdout.readline()
                assert line, "".join(lines)  # it ended without waiting: it did not see the lock
                lines.append(line)
            outputs.append("".join(lines))
    results = []
    for i, (proc, head) in enumerate(zip(procs, outputs)):
        rest, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, (tmp / f"stderr-{i}").read_text()[-3000:]
        results.append(head + rest)
    assert sorted(p.name for p in entry.parent.iterdir()) == [key]  # no temporary or lock file left beside it
    assert json.loads((entry / "meta.json").read_text())["parts"]["train"]["tokens"] == 4612
    return results


SHORT_RUN = [*TINY, "--max-steps", "2", "--epochs", "1", "--eval-freq", "2", "--save-every", "0"]


@pytest.mark.slow  # two training processes (~10 s alone, ~20 s on a busy machine); test_pretrain_data has the fast twin
def test_two_runs_started_at_once_tokenize_the_corpus_once(tmp_path):
    """Two commands (not one launch) on the same uncached corpus: one tokenizes, the other waits for its entry."""
    outs = [tmp_path / "a", tmp_path / "b"]
    stdouts = tokenize_once_while_locked(tmp_path, [[sys.executable, "train/pretrain.py", *SHORT_RUN, "--out", out]
                                                    for out in outs], waiters=[1, 1])
    assert sum(s.count("tokenized --data") for s in stdouts) == 1, stdouts
    assert sorted("(tokenized now" in s for s in stdouts) == [False, True]  # the other read the cached entry
    assert all((out / "model.safetensors").is_file() for out in outs)


@pytest.mark.slow  # two processes started by accelerate's launcher: the slow suite
def test_accelerate_launch_tokenizes_the_corpus_once(tmp_path):
    """Both processes of one launch meet the uncached corpus: one tokenizes, the other waits and reads it."""
    out = tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
              "--main_process_port", "0", "train/pretrain.py", *SHORT_RUN, "--out", out]
    stdout, = tokenize_once_while_locked(tmp_path, [launch], waiters=[2])
    assert stdout.count("tokenized --data") == 1 and "on 2 process(es)" in stdout, stdout
    assert (out / "model.safetensors").is_file()
