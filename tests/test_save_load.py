"""A saved model directory loads anywhere: with our package, and in a Python that has never heard of it."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import BLOCK_PROJECT_IMPORTS, TINY, run_cli, run_python

from gpt2_scratch.core.errors import InputError

import gpt2_scratch
from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM, save_model_dir

PROMPT_IDS = [464, 3290, 373, 1043, 287, 257, 2214, 1474]  # "The dog was found in a field near"


def test_model_directory_contents(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "configuration_gpt2_scratch.py",
        "modeling_gpt2_scratch.py",
    } <= names
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "gpt2-scratch"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gpt2_scratch.GPT2ScratchForCausalLM"
    assert json.loads((tiny_model_dir / "generation_config.json").read_text())["pad_token_id"] == 50256
    # The tokenizer states the model's context (128 here), so transformers warns at the length that overflows.
    assert json.loads((tiny_model_dir / "tokenizer_config.json").read_text())["model_max_length"] == 128
    # No leftovers of the atomic write next to it.
    assert not [p for p in tiny_model_dir.parent.iterdir() if p.name.startswith(".")]


def test_auto_classes_load_after_import(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    assert isinstance(AutoConfig.from_pretrained(tiny_model_dir), GPT2ScratchConfig)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model) is GPT2ScratchForCausalLM
    assert model.lm_head.weight is model.transformer.wte.weight
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.encode("The dog was found in a field near") == PROMPT_IDS


def test_fresh_process_without_our_package_loads_identically(tiny_model_dir, tmp_path):
    model = GPT2ScratchForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=20, do_sample=False)
    torch.save({"logits": logits, "tokens": tokens}, tmp_path / "expected.pt")
    run_python(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
        tokenizer = AutoTokenizer.from_pretrained({str(tiny_model_dir)!r})
        ids = torch.tensor([tokenizer.encode("The dog was found in a field near")])
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected["logits"], atol=0, rtol=0)
            assert model.generate(ids, max_new_tokens=20, do_sample=False).tolist() == expected["tokens"].tolist()
        """,
        cwd=tmp_path,
        block_project=True,
    )


def test_overwrite_is_explicit_and_replaces_atomically(tmp_path):
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY))
    out = save_model_dir(model, tmp_path / "m")
    try:
        save_model_dir(model, out)
    except InputError as error:
        assert "already exists" in str(error)
    else:
        raise AssertionError("an existing model directory was overwritten without overwrite=True")
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    save_model_dir(model, out, overwrite=True)
    reloaded = GPT2ScratchForCausalLM.from_pretrained(out)
    torch.testing.assert_close(reloaded.transformer.wte.weight, model.transformer.wte.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_cli_init_and_generate(tmp_path):
    out = tmp_path / "cli-model"
    result = run_cli("-m", "gpt2_scratch", "init", "--preset", "gpt2-small", "--out", str(out),
                     "--n-layers", "2", "--emb-dim", "64", "--n-heads", "4", "--context-length", "64", "--seed", "5")
    assert result.returncode == 0, result.stderr
    model = GPT2ScratchForCausalLM.from_pretrained(out)
    assert (model.config.n_layers, model.config.emb_dim, model.config.context_length) == (2, 64, 64)

    tokenizer = gpt2_scratch.get_tokenizer()
    expected = model.generate(torch.tensor([tokenizer.encode("Every effort moves you")]), max_new_tokens=8,
                              do_sample=False, eos_token_id=None)
    result = run_cli("-m", "gpt2_scratch", "generate", "--model", str(out), "--prompt", "Every effort moves you",
                     "--max-new-tokens", "8", "--ignore-eos")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == tokenizer.decode(expected[0], skip_special_tokens=True).strip()

    # Interactive: one prompt, then an empty line ends the loop.
    result = run_cli("-m", "gpt2_scratch", "generate", "--model", str(out), "--max-new-tokens", "3",
                     input="Hello there\n\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("> Hello there")

    # A prompt longer than the context is cropped from the left, as the book does.
    result = run_cli("-m", "gpt2_scratch", "generate", "--model", str(out), "--prompt", "word " * 99 + "word",
                     "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "prompt cropped from the left: 100 → 60 tokens" in result.stderr


def test_init_refuses_a_model_larger_than_memory_before_building_it(tmp_path, monkeypatch, capsys):
    """The count comes from the config (on the meta device); here the machine is made to have 256 MiB."""
    from gpt2_scratch import model_dir
    from gpt2_scratch.core.cli import main

    monkeypatch.setattr(model_dir, "memory_limit_bytes", lambda: 256 * 2**20)
    built = []
    monkeypatch.setattr(gpt2_scratch, "GPT2ScratchForCausalLM", lambda config: built.append(config))
    capsys.readouterr()
    assert main(["init", "--preset", "gpt2-small", "--out", str(tmp_path / "big"), "--context-length", "64"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: init --preset gpt2-small --context-length 64: 123,702,528 parameters need 0.5 GiB in float32, more "
        "than the 0.2 GiB of memory here; choose a smaller preset, --emb-dim, --n-layers or --context-length"]
    assert built == [] and not (tmp_path / "big").exists()
    monkeypatch.undo()
    monkeypatch.setattr(model_dir, "memory_limit_bytes", lambda: 256 * 2**20)
    assert main(["init", "--preset", "gpt2-small", "--out", str(tmp_path / "tiny"), "--n-layers", "1",
                 "--emb-dim", "64", "--n-heads", "4", "--context-length", "64"]) == 0  # 3.3 M parameters fit


def test_sft_refuses_a_random_model_larger_than_memory_before_building_it(tmp_path, monkeypatch, capsys):
    """init's pre-check wherever training builds a random model: a preset alone (convert.resolve, which dpo and
    classify share) and a preset with shape options (train/sft.py). Nothing is built, nothing is written."""
    from conftest import assert_refused, isolate_user_settings

    from gpt2_scratch import model_dir

    root = tmp_path / "ws"
    root.mkdir()
    data = root / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(20)]))
    isolate_user_settings(monkeypatch, tmp_path)
    monkeypatch.setattr(model_dir, "memory_limit_bytes", lambda: 256 * 2**20)
    built = []
    monkeypatch.setattr(gpt2_scratch, "GPT2ScratchForCausalLM", lambda config: built.append(config))
    sft = ["sft", "--model", "gpt2-small", "--random-init", "--data", str(data), "--out", str(root / "out")]
    assert_refused(sft, root, capsys, code=2, needle="--model gpt2-small --random-init: 124,439,808 parameters need "
                   "0.5 GiB in float32, more than the 0.2 GiB of memory here; choose a smaller preset")
    assert_refused([*sft, "--context-length", "64"], root, capsys, code=2, needle="--model gpt2-small --random-init "
                   "--context-length 64: 123,702,528 parameters need 0.5 GiB in float32, more than the 0.2 GiB of "
                   "memory here; choose a smaller preset, --emb-dim, --n-layers or --context-length")
    assert built == []


@pytest.mark.slow  # several fresh interpreters (~10 s each here): the slow suite
def test_cli_bad_input_is_one_line(tmp_path):
    cases = [
        (["init", "--preset", "gpt2-small", "--out", str(tmp_path / "x"), "--emb-dim", "100"],
         "error: --emb-dim 100 is not divisible by gpt2-small's n_heads 12; give --n-heads among the divisors of 100"),
        (["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"], "error:"),
    ]
    for args, message in cases:
        result = run_cli("-m", "gpt2_scratch", *args)
        assert result.returncode != 0
        assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    result = run_cli("-m", "gpt2_scratch", "init", "--preset", "gpt2-huge", "--out", str(tmp_path / "y"))
    assert result.returncode == 2 and "invalid choice: 'gpt2-huge'" in result.stderr


@pytest.mark.slow  # several fresh interpreters (~10 s each here): the slow suite
def test_loading_and_training_say_nothing_about_loss_type(tmp_path, tiny_model_dir):
    """config.json carries no `loss_type`, and loading it (with or without our package) and computing a
    loss prints no "`loss_type=None` was set in the config but it is unrecognized" warning."""
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert "loss_type" not in config
    code = """
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
        ids = torch.tensor([[1, 2, 3, 4]])
        model(ids, labels=ids).loss.backward()
        print("ok")
    """
    for block in (False, True):
        result = subprocess.run([sys.executable, "-c", (BLOCK_PROJECT_IMPORTS if block else "import gpt2_scratch\n")
                                 + textwrap.dedent(code), str(tiny_model_dir)], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
        assert "loss_type" not in result.stderr, result.stderr


def test_training_that_cannot_fit_in_memory_is_refused_before_the_folder_is_touched(tmp_path, monkeypatch, capsys):
    """Weights that fit, but weights + gradients + AdamW's moments that do not: one line before the first step,
    and an existing --out (even with --overwrite) is left as it was. LoRA trains few parameters and fits."""
    from conftest import assert_refused, isolate_user_settings

    from gpt2_scratch import model_dir
    from gpt2_scratch.core.cli import main

    root = tmp_path / "ws"
    root.mkdir()
    data = root / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(20)]))
    out = root / "out"
    out.mkdir()
    (out / "kept.txt").write_text("an earlier run's file")
    isolate_user_settings(monkeypatch, tmp_path)
    monkeypatch.setattr(model_dir, "memory_limit_bytes", lambda: 32 * 2**20)
    params = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset(
        "gpt2-small", n_layers=1, emb_dim=64, n_heads=4, context_length=64)).num_parameters()
    assert 4 * params < 32 * 2**20 < 16 * params  # the weights fit; training them in full does not
    sft = ["sft", "--model", "gpt2-small", "--random-init", "--n-layers", "1", "--emb-dim", "64", "--n-heads", "4",
           "--context-length", "64", "--data", str(data), "--epochs", "1", "--batch-size", "2",
           "--max-new-tokens", "1", "--sample-tokens", "1"]
    assert_refused([*sft, "--out", str(out), "--overwrite"], root, capsys, code=2,
                   needle=f"--model gpt2-small: training {params:,} parameters needs at least "
                          f"{16 * params / 2**20:.0f} MiB (fp32 weights, gradients and AdamW's two moments), more "
                          "than the 32 MiB of memory here; train fewer parameters (--lora")
    assert main([*sft, "--out", str(tmp_path / "lora"), "--lora", "book"]) == 0
