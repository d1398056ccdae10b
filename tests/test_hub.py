"""`python -m gpt2_scratch push` against a local HTTP server standing in for the Hub.

The server (tests/hub_standin.py) speaks the part of the Hub API huggingface_hub uses to create a
repo, upload (preupload → LFS batch → PUT for the weights, inline base64 for small files, NDJSON
commit) and download. Every push runs in a subprocess: huggingface_hub reads HF_ENDPOINT when
imported, and that is how a user runs it.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO_ROOT, run_python
from hub_standin import HubStandin

REPO_ID = "alice/tiny-gpt2-sft"
IDS = [[464, 3290, 318, 257, 1332, 11, 340, 373]]  # any 8 GPT-2 token ids


@pytest.fixture
def hub(tmp_path):
    with HubStandin(tmp_path / "hub-storage", token="hf_standin_write_token") as server:
        yield server


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir):
    """A finished training run: OUT/model plus args, metrics, loss plot and judge scores beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = tmp_path / "run"
    shutil.copytree(tiny_model_dir, out / "model")
    args = {"model": "gpt2-medium", "data": "/home/alice/data/instruction-data.json", "epochs": 2, "lr": 5e-05,
            "batch_size": 8, "seed": 123, "output_dir": str(out)}
    (out / "args.json").write_text(json.dumps(args, indent=2))
    records = [{"step": 0, "train_loss": 3.5, "val_loss": 3.6}, {"step": 5, "train_loss": 0.8125, "val_loss": 0.9375}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 5], [3.5, 0.8125])
    fig.savefig(out / "loss.png")
    plt.close(fig)
    # eval/judge.py's output format: judge model, summary with the book's average, per-record outcomes.
    scores = {"model": "llama3", "summary": {"average": 60.0, "n_scored": 3},
              "records": [{"score": 50}, {"score": 60}, {"score": 70}]}
    (out / "instruction-data-with-response-scores.json").write_text(json.dumps(scores))
    return out


def hub_env(hub, tmp_path, *, token: bool = True, endpoint: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env.update(
        HF_ENDPOINT=endpoint or hub.endpoint,
        HF_HUB_DISABLE_XET="1",  # the stand-in speaks the legacy LFS transfer, not Xet
        HF_HOME=str(tmp_path / "hf-home"),  # an empty login cache and download cache per test
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    if token:
        env["HF_TOKEN"] = hub.token
    return env


def push(*args, env, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "gpt2_scratch", "push", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def one_line_error(result) -> str:
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n"), readme[:100]
    return yaml.safe_load(readme.split("---\n", 2)[1])


def test_push_uploads_every_file_and_a_model_card(hub, run_dir, tmp_path, tiny_model_dir):
    result = push("--model", str(run_dir / "model"), "--repo-id", REPO_ID, env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"/{REPO_ID}/commit/" in result.stdout

    pushed = hub.repo_dir(REPO_ID)
    local = {p.relative_to(run_dir / "model").as_posix(): p for p in (run_dir / "model").rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "modeling_gpt2_scratch.py", "tokenizer.json"} <= set(local)
    remote = {p.relative_to(pushed).as_posix() for p in pushed.rglob("*") if p.is_file()}
    assert remote == set(local) | {"README.md", "loss.png"}
    for rel, path in local.items():
        assert (pushed / rel).read_bytes() == path.read_bytes(), rel
    assert (pushed / "loss.png").read_bytes() == (run_dir / "loss.png").read_bytes()
    # One commit; the weights went through the LFS transfer, not inline in the commit.
    assert len(hub.commits) == 1 and hub.commits[0]["revision"] == "main"
    assert any(method == "PUT" and path.startswith("/lfs-upload/") for method, path in hub.log)

    readme = (pushed / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["base_model"] == "openai-community/gpt2-medium"
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "mit"
    assert "gpt2-scratch" in meta["tags"]
    assert "](loss.png)" in readme
    assert "0.8125" in readme and "0.9375" in readme  # final train / val loss
    assert "judged by llama3" in readme and "| 60.00 |" in readme  # the judge's average score
    # Local paths shrink to their name; run mechanics (output dir) stay out.
    assert "/home/alice" not in readme and "`.../instruction-data.json`" in readme
    assert str(tmp_path) not in readme and "output_dir" not in readme
    assert "| `lr` | `5e-05` |" in readme
    assert "trust_remote_code=True" in readme and "import gpt2_scratch" in readme

    # A fresh process downloads the pushed repo from the stand-in and gets the same model:
    # with our package (Auto classes registered) and without it (the code shipped in the repo).
    with torch.no_grad():
        from transformers import AutoModelForCausalLM

        expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(torch.tensor(IDS)).logits
    load = f"""
        import json, torch
        {{imports}}
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("{REPO_ID}"{{kwargs}})
        print(type(model).__module__)
        with torch.no_grad():
            print(json.dumps(model(torch.tensor({IDS})).logits.tolist()))
    """
    env = hub_env(hub, tmp_path)
    with_package = run_python(load.format(imports="import gpt2_scratch", kwargs=""), cwd=tmp_path, env=env)
    without = run_python(load.format(imports="", kwargs=", trust_remote_code=True"), cwd=tmp_path, env=env,
                         block_project=True)
    assert with_package.stdout.splitlines()[0].startswith("gpt2_scratch.")
    assert without.stdout.splitlines()[0].startswith("transformers_modules.")
    for result in (with_package, without):
        logits = torch.tensor(json.loads(result.stdout.splitlines()[1]))
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_no_token_is_a_one_line_error_before_any_work(hub, tmp_path):
    # The model directory does not even exist: the token is checked first, nothing is read or sent.
    result = push("--model", str(tmp_path / "missing"), "--repo-id", REPO_ID, env=hub_env(hub, tmp_path, token=False))
    line = one_line_error(result)
    assert "no Hugging Face token" in line and "HF_TOKEN" in line and "hf auth login" in line
    assert hub.log == []


@pytest.mark.slow  # several fresh interpreters (~10 s each here): the slow suite
def test_existing_repo_needs_exist_ok_and_login_cache_token(hub, run_dir, tmp_path):
    # Token from the login cache ($HF_HOME/token), the way `hf auth login` leaves it.
    env = hub_env(hub, tmp_path, token=False)
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text(hub.token)
    model = str(run_dir / "model")
    first = push("--model", model, "--repo-id", REPO_ID, "--private", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert hub.repos[REPO_ID]["private"] is True

    line = one_line_error(push("--model", model, "--repo-id", REPO_ID, env=env))
    assert "already exists" in line and "--exist-ok" in line
    assert len(hub.commits) == 1

    again = push("--model", model, "--repo-id", REPO_ID, "--exist-ok", "--revision", "v2",
                 "--base-model", "openai-community/gpt2", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [c["revision"] for c in hub.commits] == ["main", "v2"]
    readme = (hub.repo_dir(REPO_ID, "v2") / "README.md").read_text()
    assert front_matter(readme)["base_model"] == "openai-community/gpt2"


@pytest.mark.slow  # several fresh interpreters (~10 s each here): the slow suite
def test_rejected_token_and_unreachable_hub_are_one_line_errors(hub, run_dir, tmp_path):
    env = hub_env(hub, tmp_path)
    env["HF_TOKEN"] = "hf_wrong"
    line = one_line_error(push("--model", str(run_dir / "model"), "--repo-id", REPO_ID, env=env))
    assert "rejected the token" in line

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"http://127.0.0.1:{port}"
    line = one_line_error(push("--model", str(run_dir / "model"), "--repo-id", REPO_ID,
                               env=hub_env(hub, tmp_path, endpoint=dead)))
    assert "cannot reach the Hub" in line and dead in line


def test_a_run_directory_is_pushed_without_its_checkpoints(tmp_path, tiny_model_dir):
    # train/sft.py and train/classify.py save the model at the top of OUT, beside checkpoints/.
    from gpt2_scratch.hub import _model_files
    from gpt2_scratch.train.publish import find_run_info, resolve_datasets

    out = tmp_path / "out"
    shutil.copytree(tiny_model_dir, out)
    (out / "checkpoints" / "step-00000010").mkdir(parents=True)
    (out / "checkpoints" / "step-00000010" / "optimizer.bin").write_bytes(b"\0" * 64)
    (out / ".push-tmp").mkdir()
    (out / "args.json").write_text(json.dumps({"model": "gpt2-small", "random_init": True,
                                               "data": "https://example.org/instruction-data.json"}))
    files = _model_files(out)
    assert set(files) == {p.name for p in tiny_model_dir.iterdir()} | {"args.json"}
    run = find_run_info(out)
    assert run.args["model"] == "gpt2-small"
    # Trained from random weights: no base model; a URL is not a Hub data set id.
    from gpt2_scratch.train.publish import resolve_base_model

    assert resolve_base_model(run.args) is None
    assert resolve_datasets(run.args) == [] and resolve_datasets(run.args, "https://x.org/d.json") == []
    assert resolve_datasets({}, "tatsu-lab/alpaca") == ["tatsu-lab/alpaca"]
