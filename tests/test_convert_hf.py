"""Hugging Face GPT-2 ↔ our model: parity with transformers' GPT2LMHeadModel both ways.

In: the Hub's file layout (unprefixed keys, attn.bias mask buffers, no lm_head), save_pretrained's
layout (prefixed, possibly sharded), a lone .safetensors file, and a repo fetched through
huggingface_hub from a local stand-in Hub (HF_ENDPOINT) or from its cache (HF_HUB_OFFLINE=1).
Out: export-hf, loaded by transformers in a fresh process where our packages cannot be imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import convert_main
from gpt2_scratch.convert.errors import ConvertError
from gpt2_scratch.convert.hf import load_hf_checkpoint

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from hub_standin import HubStandin  # noqa: E402 - the local stand-in Hub shared by the Hub tests

IDS = torch.tensor([[464, 3290, 373, 1043, 287, 257, 2214, 1474, 13, 50256, 11, 0]])


def tiny_reference(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(**{"n_positions": 64, "n_embd": 16, "n_layer": 2, "n_head": 4, **overrides})
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # GPT-2's init leaves biases and LayerNorms trivial; make every tensor matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def save_hub_layout(ref: GPT2LMHeadModel, folder: Path) -> Path:
    """Write `ref` the way openai-community/gpt2 stores it: no prefix, mask buffers, no lm_head."""
    folder.mkdir(parents=True, exist_ok=True)
    n_ctx = ref.config.n_positions
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    for i in range(ref.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_ctx, n_ctx)).view(1, 1, n_ctx, n_ctx)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    ref.config.save_pretrained(folder)
    return folder


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# --- in --------------------------------------------------------------------------------------
def test_hub_layout_with_mask_buffers(tmp_path):
    ref = tiny_reference()
    folder = save_hub_layout(ref, tmp_path / "hub")
    model = load_hf_checkpoint(folder)
    torch.testing.assert_close(logits(model), logits(ref), atol=1e-5, rtol=0)
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("shard", [None, "1MB"])
def test_save_pretrained_layout(tmp_path, shard):
    ref = tiny_reference(seed=1)
    ref.save_pretrained(tmp_path / "sp", **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "sp" / "model.safetensors.index.json").is_file()
    model = load_hf_checkpoint(tmp_path / "sp")
    torch.testing.assert_close(logits(model), logits(ref), atol=1e-5, rtol=0)


def test_cli_hf_from_dir_and_from_file(tmp_path, capsys):
    ref = tiny_reference(seed=2)
    folder = save_hub_layout(ref, tmp_path / "hub")
    assert convert_main(["hf", "--from-dir", str(folder / "model.safetensors"), "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()  # drop the progress bars
    from gpt2_scratch import GPT2ScratchForCausalLM

    model = GPT2ScratchForCausalLM.from_pretrained(tmp_path / "a")
    torch.testing.assert_close(logits(model), logits(ref), atol=1e-5, rtol=0)

    # The same file without its config.json: a non-standard width cannot reveal its head count.
    (folder / "config.json").unlink()
    code = convert_main(["hf", "--from-dir", str(folder / "model.safetensors"), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert str(folder / "model.safetensors") in line and "config.json" in line


def test_bad_hf_inputs_name_file_and_tensor(tmp_path):
    ref = tiny_reference(seed=3)
    folder = save_hub_layout(ref, tmp_path / "hub")
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")

    def attempt(name: str, new_state: dict, config: dict | None = None) -> str:
        d = tmp_path / name
        d.mkdir()
        save_file(new_state, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(config or ref.config.to_dict()))
        with pytest.raises(ConvertError) as e:
            load_hf_checkpoint(d)
        assert "\n" not in str(e.value)
        return str(e.value)

    msg = attempt("missing", {k: v for k, v in state.items() if k != "h.1.mlp.c_fc.bias"})
    assert "missing/model.safetensors: missing tensor 'h.1.mlp.c_fc.bias' with shape [64]" in msg
    msg = attempt("extra", {**state, "h.0.attn.q_norm.weight": torch.ones(16)})
    assert "unknown tensor 'h.0.attn.q_norm.weight'" in msg
    msg = attempt("shape", {**state, "h.0.attn.c_proj.weight": torch.ones(16, 17)})
    assert "tensor 'h.0.attn.c_proj.weight' has shape [16, 17]" in msg and "config.json" in msg
    msg = attempt("layers", state, {**ref.config.to_dict(), "n_layer": 3})
    assert "missing tensor 'h.2." in msg and "n_layer=3" in msg
    # An untied head is converted (tests/test_untied_head.py); a wrongly shaped one, or none where the
    # config unties, is not.
    msg = attempt("head-shape", {**state, "lm_head.weight": torch.zeros(3, 16)})
    assert "tensor 'lm_head.weight' has shape [3, 16]" in msg
    msg = attempt("head-missing", state, {**ref.config.to_dict(), "tie_word_embeddings": False})
    assert "missing tensor 'lm_head.weight'" in msg and "tie_word_embeddings=false" in msg
    msg = attempt("act", state, {**ref.config.to_dict(), "activation_function": "relu"})
    assert "activation_function 'relu'" in msg


def test_both_prefixed_and_unprefixed_copies_are_refused(tmp_path):
    ref = tiny_reference()
    folder = save_hub_layout(ref, tmp_path / "hub")
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    state["transformer.wte.weight"] = state["wte.weight"].clone()
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ConvertError, match="both with and without the 'transformer.' prefix"):
        load_hf_checkpoint(folder)


# --- out -------------------------------------------------------------------------------------
NO_OUR_CODE = textwrap.dedent("""
    import sys
    for blocked in ("gpt2_scratch", "convert", "train", "eval"):
        sys.modules[blocked] = None  # importing any of them now raises ImportError
    import numpy as np, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, ids_file, out_file = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # no trust_remote_code
    assert type(model).__name__ == "GPT2LMHeadModel", type(model)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok("Hello world")["input_ids"] == [15496, 995], tok("Hello world")
    ids = torch.from_numpy(np.load(ids_file))
    with torch.no_grad():
        np.save(out_file, model(ids).logits.numpy())
    print("loaded", type(model).__name__)
""")


def export_and_load_elsewhere(model_dir: Path, out: Path, tmp_path: Path, ids=IDS) -> np.ndarray:
    assert convert_main(["export-hf", "--model", str(model_dir), "--out", str(out)]) == 0
    np.save(tmp_path / "ids.npy", ids.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", NO_OUR_CODE, str(out), str(tmp_path / "ids.npy"),
                           str(tmp_path / "hf_logits.npy")], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "loaded GPT2LMHeadModel" in proc.stdout
    return np.load(tmp_path / "hf_logits.npy")


def test_export_hf_loads_in_transformers_without_our_code(tmp_path):
    from gpt2_scratch import save_model_dir

    ref = tiny_reference(seed=4)
    ours = load_hf_checkpoint(save_hub_layout(ref, tmp_path / "hub"))
    save_model_dir(ours, tmp_path / "ours")
    hf_logits = export_and_load_elsewhere(tmp_path / "ours", tmp_path / "exported", tmp_path)
    np.testing.assert_allclose(hf_logits, logits(ours).numpy(), atol=1e-5, rtol=0)
    cfg = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    tokenizer_cfg = json.loads((tmp_path / "exported" / "tokenizer_config.json").read_text())
    assert tokenizer_cfg["model_max_length"] == cfg["n_positions"] == ours.config.context_length
    # Exported folders convert back losslessly.
    back = load_hf_checkpoint(tmp_path / "exported")
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


def test_export_hf_refuses_non_empty_output(tmp_path, capsys):
    from gpt2_scratch import save_model_dir

    save_model_dir(load_hf_checkpoint(save_hub_layout(tiny_reference(), tmp_path / "hub")), tmp_path / "ours")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert convert_main(["export-hf", "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "busy")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


# --- through huggingface_hub ----------------------------------------------------------------
def run_convert(args: list[str], env_extra: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """A fresh process: huggingface_hub reads HF_* variables when it is imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "convert", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


TWO_CONVERSIONS = textwrap.dedent("""
    import sys
    from gpt2_scratch.core.cli import main
    sys.exit(10 * main(["convert", *sys.argv[1:6]]) + main(["convert", *sys.argv[6:]]))
""")


def test_hf_repo_through_local_endpoint_then_offline_cache(tmp_path):
    from gpt2_scratch import GPT2ScratchForCausalLM

    ref = tiny_reference(seed=5)
    repo_id = "openai-community/gpt2-tiny-test"
    hf_home = tmp_path / "hf-home"
    with HubStandin(tmp_path / "hub-root") as hub:
        hub.repos[repo_id] = {"private": False, "branches": {"main": "a" * 40}}
        save_hub_layout(ref, hub.repo_dir(repo_id))
        (hub.repo_dir(repo_id) / "README.md").write_text("not downloaded")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update({"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_XET": "1"})
        # One process (huggingface_hub reads HF_* at import), two commands: a real repo, a missing one.
        proc = subprocess.run([sys.executable, "-c", TWO_CONVERSIONS,
                               "hf", "--repo", repo_id, "--out", str(tmp_path / "online"),
                               "hf", "--repo", "nobody/nothing", "--out", str(tmp_path / "x")],
                              capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert proc.returncode == 2, proc.stderr  # 10 × first (0: converted) + second (2: error)
        fetched = {path for method, path in hub.log if method == "GET" and "/resolve/" in path}
        assert fetched == {f"/{repo_id}/resolve/main/config.json", f"/{repo_id}/resolve/main/model.safetensors"}
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "nobody/nothing" in line and "not found" in line

    model = GPT2ScratchForCausalLM.from_pretrained(tmp_path / "online")
    torch.testing.assert_close(logits(model), logits(ref), atol=1e-5, rtol=0)

    # The server is gone; HF_HUB_OFFLINE=1 serves the same repo from the cache just filled, to the
    # CLI and to load_model (what the training scripts call with --model REPO_ID).
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)})
    script = textwrap.dedent("""
        import sys
        from gpt2_scratch.convert import load_model
        from gpt2_scratch.core.cli import main
        assert main(["convert", "hf", "--repo", sys.argv[1], "--out", sys.argv[2]]) == 0
        print("load_model layers:", load_model(sys.argv[1]).config.n_layers)
    """)
    proc = subprocess.run([sys.executable, "-c", script, repo_id, str(tmp_path / "offline")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "load_model layers: 2" in proc.stdout
    # The same weights, bit for bit (logits of two loads may differ in the last bit: BLAS picks its
    # kernels by the tensors' memory alignment).
    again = GPT2ScratchForCausalLM.from_pretrained(tmp_path / "offline")
    for name, tensor in model.state_dict().items():  # the online conversion's
        assert torch.equal(again.state_dict()[name], tensor), name
    torch.testing.assert_close(logits(again), logits(ref), atol=1e-6, rtol=0)

    # Offline with an empty cache: one line naming the repo and the way out.
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-home")}
    proc = run_convert(["hf", "--repo", repo_id, "--out", str(tmp_path / "nothing")], env, tmp_path)
    assert proc.returncode == 1  # the network failed, not the input
    (line,) = proc.stderr.strip().splitlines()
    assert repo_id in line and "HF_HUB_OFFLINE" in line and "--from-dir" in line


# --- full GPT-2 small shapes ----------------------------------------------------------------
@pytest.mark.slow
def test_gpt2_small_shape_round_trip(tmp_path):
    from gpt2_scratch import save_model_dir

    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config()).eval()  # 124M, the released gpt2 shapes
    folder = save_hub_layout(ref, tmp_path / "hub")
    ids = torch.randint(0, 50257, (1, 32))
    ours = load_hf_checkpoint(folder / "model.safetensors")  # lone file: dims from shapes, 12 heads for 768
    assert ours.config.n_heads == 12 and ours.config.n_layers == 12
    ours_logits = logits(ours, ids)
    torch.testing.assert_close(ours_logits, logits(ref, ids), atol=1e-4, rtol=0)
    save_model_dir(ours, tmp_path / "ours")
    hf_logits = export_and_load_elsewhere(tmp_path / "ours", tmp_path / "exported", tmp_path, ids)
    np.testing.assert_allclose(hf_logits, ours_logits.numpy(), atol=1e-4, rtol=0)


def test_unreadable_or_pickle_only_folders(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ConvertError) as e:
        load_hf_checkpoint(broken)
    assert str(broken / "model.safetensors") in str(e.value) and "not a readable safetensors file" in str(e.value)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ConvertError, match="only pytorch_model.bin"):
        load_hf_checkpoint(pickled)
