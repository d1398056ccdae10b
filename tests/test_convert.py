"""OpenAI checkpoint → our model: parity with transformers' reference, the CLI, and every bad input.

The parity reference is transformers' GPT2LMHeadModel loaded with the same values (the shared
fixture ships its logits; for the 148-tensor fixture we build it here from TensorFlow's arrays).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import convert_main
from gpt2_scratch.convert.errors import ConvertError
from gpt2_scratch.convert.openai import load_openai_checkpoint
from gpt2_scratch.convert.tf_bundle import read_index

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED_TINY = REPO.parent / "shared" / "fixtures" / "openai-gpt2-tiny"
TF = HERE / "fixtures" / "tf"


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.npz", "*.md"))
    return dst


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = convert_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --- parity ---------------------------------------------------------------------------------
def test_shared_fixture_logits_and_greedy_match_transformers():
    ref = np.load(SHARED_TINY / "ref_logits.npz")
    model = load_openai_checkpoint(SHARED_TINY)
    ids = torch.tensor(ref["ids"]).reshape(1, -1)
    with torch.no_grad():
        logits = model(ids).logits[0].numpy()
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-5, rtol=0)
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == ref["greedy"].tolist()
    assert model.lm_head.weight is model.transformer.wte.weight


def reference_from_arrays(arrays: dict[str, np.ndarray], hp: dict):
    """transformers' GPT2LMHeadModel holding OpenAI-named arrays (Conv1D weights = w[0], no transpose)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=hp["n_vocab"], n_positions=hp["n_ctx"], n_embd=hp["n_embd"], n_head=hp["n_head"],
                     n_layer=hp["n_layer"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0)
    ref = GPT2LMHeadModel(cfg).eval()
    sd = {"transformer.wte.weight": arrays["model/wte"], "transformer.wpe.weight": arrays["model/wpe"],
          "transformer.ln_f.weight": arrays["model/ln_f/g"], "transformer.ln_f.bias": arrays["model/ln_f/b"]}
    for i in range(hp["n_layer"]):
        p, q = f"model/h{i}", f"transformer.h.{i}"
        for ln in ("ln_1", "ln_2"):
            sd[f"{q}.{ln}.weight"], sd[f"{q}.{ln}.bias"] = arrays[f"{p}/{ln}/g"], arrays[f"{p}/{ln}/b"]
        for mod in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            sd[f"{q}.{mod.replace('/', '.')}.weight"] = arrays[f"{p}/{mod}/w"][0]
            sd[f"{q}.{mod.replace('/', '.')}.bias"] = arrays[f"{p}/{mod}/b"]
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    return ref


def test_148_tensor_fixture_matches_transformers_reference():
    folder = TF / "gpt2-12layer"
    hp = json.loads((folder / "hparams.json").read_text())
    expected = np.load(folder / "expected.npz")
    ref = reference_from_arrays({k.replace("__", "/"): expected[k] for k in expected.files}, hp)
    model = load_openai_checkpoint(folder)
    assert model.config.n_layers == 12 and model.config.vocab_size == 64
    ids = torch.tensor([[5, 17, 3, 63, 0, 42, 8, 8, 1, 30, 12, 9, 50, 2, 7, 11]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


# --- the command line -----------------------------------------------------------------------
def test_cli_openai_from_dir_writes_a_loadable_model_dir(tmp_path):
    out = tmp_path / "gpt2-tiny"
    proc = subprocess.run([sys.executable, "-m", "convert", "openai", "--from-dir", str(SHARED_TINY), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["gpt2-tiny"]  # no temp dirs left

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gpt2_scratch  # noqa: F401 - registers the Auto classes

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ref = np.load(SHARED_TINY / "ref_logits.npz")
    assert tok("The dog was found in a field near")["input_ids"] == ref["ids"].reshape(-1).tolist()
    with torch.no_grad():
        logits = model(torch.tensor(ref["ids"]).reshape(1, -1)).logits[0].numpy()
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-5, rtol=0)


def test_cli_refuses_existing_output_before_converting(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run_cli(["openai", "--from-dir", SHARED_TINY, "--out", out], capsys)
    assert_one_line_error(code, err, str(out), "--overwrite")
    code, _, err = run_cli(["openai", "--from-dir", SHARED_TINY, "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


# --- bad input: one line naming the file and the tensor -------------------------------------
@pytest.mark.parametrize("fixture, needles", [
    ("bad-missing", ["bad-missing/model.ckpt.index", "missing tensor 'model/h1/ln_2/b'", "[4]"]),
    ("bad-extra", ["bad-extra/model.ckpt.index", "unknown tensor 'model/h0/mlp/gate/w'", "[1, 4, 16]"]),
    ("bad-shape", ["bad-shape/model.ckpt.index", "tensor 'model/wpe' has shape [9, 4]", "bad-shape/hparams.json",
                   "implies [8, 4]"]),
])
def test_bad_checkpoints(capsys, tmp_path, fixture, needles):
    code, _, err = run_cli(["openai", "--from-dir", TF / fixture, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, needles", [
    ({"n_layer": 11}, ["unknown tensor 'model/h11/", "layer 11, but n_layer is 11"]),
    ({"n_layer": 13}, ["missing tensor 'model/h12/", "layer 12 is absent", "hparams.json says n_layer=13"]),
    ({"n_embd": 16}, ["tensor 'model/", "hparams.json (n_vocab=64, n_ctx=16, n_embd=16"]),
    ({"n_vocab": 50257}, ["tensor 'model/wte' has shape [64, 8]", "implies [50257, 8]"]),
    ({"n_head": 3}, ["hparams.json: n_embd 8 is not divisible by n_head 3"]),
])
def test_hparams_disagreeing_with_tensors(capsys, tmp_path, change, needles):
    folder = copy_checkpoint(TF / "gpt2-12layer", tmp_path / "ck")
    hp = json.loads((folder / "hparams.json").read_text())
    (folder / "hparams.json").write_text(json.dumps({**hp, **change}))
    code, _, err = run_cli(["openai", "--from-dir", folder, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, str(folder), *needles)


def test_missing_hparams_and_broken_files(capsys, tmp_path):
    folder = copy_checkpoint(TF / "gpt2-12layer", tmp_path / "ck")
    (folder / "hparams.json").unlink()
    code, _, err = run_cli(["openai", "--from-dir", folder, "--out", tmp_path / "o1"], capsys)
    assert_one_line_error(code, err, f"{folder}/hparams.json: not found")

    folder = copy_checkpoint(TF / "gpt2-12layer", tmp_path / "ck2")
    index = folder / "model.ckpt.index"
    index.write_bytes(index.read_bytes()[:-7])  # truncated index
    code, _, err = run_cli(["openai", "--from-dir", folder, "--out", tmp_path / "o2"], capsys)
    assert_one_line_error(code, err, str(index), "bad table magic")

    folder = copy_checkpoint(TF / "gpt2-12layer", tmp_path / "ck3")
    entry = read_index(folder / "model.ckpt.index")[1]["model/h7/attn/c_proj/w"]
    shard = folder / "model.ckpt.data-00000-of-00001"
    data = bytearray(shard.read_bytes())
    data[entry.offset + 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = run_cli(["openai", "--from-dir", folder, "--out", tmp_path / "o3"], capsys)
    assert_one_line_error(code, err, str(shard), "tensor 'model/h7/attn/c_proj/w'", "crc32c mismatch")
    assert not any(p.name.startswith(("o1", "o2", "o3", ".o")) for p in tmp_path.iterdir())


def test_only_index_data_and_hparams_are_needed(tmp_path):
    folder = tmp_path / "minimal"
    folder.mkdir()
    for name in ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        shutil.copy(SHARED_TINY / name, folder / name)
    model = load_openai_checkpoint(folder)
    assert model.config.n_layers == 2


def test_not_a_directory():
    with pytest.raises(ConvertError, match="not a directory"):
        load_openai_checkpoint(SHARED_TINY / "hparams.json")
