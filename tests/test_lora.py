"""LoRA with peft (train/lora.py): the adapter's algebra on a tiny model in this process, and what a
``train/sft.py --lora`` run leaves (merged model, adapter, resume after SIGKILL) through the real CLI."""

import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ENV, TINY, TINY_ARGS, kill_at_checkpoint, run_cli, run_python
from safetensors.torch import load_file

from gpt2_scratch.core.errors import InputError
from gpt2_scratch.train import lora

REPO = Path(__file__).resolve().parents[1]
BOOK_DATA = REPO.parent / "shared" / "data" / "instruction-data.json"
E, V = TINY["emb_dim"], 50257


def options(**given):
    """The LoRA fields of SFTArgs / DPOArgs at their defaults, with ``given`` on top."""
    base = dict(lora=None, lora_r=None, lora_alpha=None, lora_dropout=None, lora_targets=None, lora_init=None,
                base_dtype="fp32", merge=True, mixed_precision="no", push_to_hub=None)
    return SimpleNamespace(**{**base, **given})


def tiny_model(seed: int = 0):
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

    torch.manual_seed(seed)
    return GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY)).eval()


def train_a_little(model, steps: int = 3, autocast: bool = False, lr: float = 1e-2) -> None:
    """A few AdamW steps on random tokens over the trainable parameters (lr high enough to move B)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


IDS = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(7))

# Trainable parameters of rank r adapters: r (in + out) per targeted layer (A is [r, in], B [out, r]).
PER_LAYER = {"c_attn": E + 3 * E, "attn.c_proj": E + E, "mlp.c_proj": 4 * E + E, "c_fc": E + 4 * E}


@pytest.mark.parametrize("targets", [None, ["all-linear"], ["c_attn"], ["c_fc", "mlp.c_proj"], ["attn.c_proj"],
                                     ["c_proj", "lm_head"]])
def test_trainable_parameters_match_the_formula(targets):
    r = 4
    s = lora.settings(options(lora_r=r, lora_targets=targets))
    model = lora.wrap(tiny_model(), s)
    names = {"c_proj": ["attn.c_proj", "mlp.c_proj"], "all-linear": [*PER_LAYER, "lm_head"]}
    layers = [n for t in (targets or ["c_attn", "c_proj", "c_fc"]) for n in names.get(t, [t])]
    expected = sum(r * PER_LAYER[n] * TINY["n_layers"] for n in layers if n != "lm_head")
    expected += r * (E + V) if "lm_head" in layers else 0
    trainable, total = lora.parameter_counts(model)
    assert trainable == expected
    assert total == expected + sum(p.numel() for p in tiny_model().parameters())  # the tied head counted once


def test_the_book_preset_is_the_books_exercise():
    s = lora.settings(options(lora="book"))
    assert (s.r, s.alpha, s.scaling, s.dropout, s.init) == (16, 256.0, 16.0, 0.0, "book")
    assert s.targets == ("c_attn", "c_proj", "c_fc", "lm_head")
    config = lora.peft_config(s)
    assert (config.r, config.lora_alpha, config.bias, config.use_rslora) == (16, 256.0, "none", False)
    # Explicit options win over the preset; --lora-* alone turns LoRA on; no option, no LoRA.
    assert lora.settings(options(lora="book", lora_r=8)).r == 8
    assert lora.settings(options(lora_r=4)).targets == ("c_attn", "c_proj", "c_fc")
    assert lora.settings(options()) is None
    # The book draws A [in, r] with kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(r), 1/sqrt(r)); B starts at zero.
    model = lora.wrap(tiny_model(), s)
    a = model.base_model.model.transformer.h[0].mlp.c_fc.lora_A["default"].weight.detach()
    b = model.base_model.model.transformer.h[0].mlp.c_fc.lora_B["default"].weight.detach()
    assert a.abs().max() <= 0.25 and a.abs().max() > 0.2 and a.std() == pytest.approx(0.25 / 3**0.5, rel=0.1)
    assert torch.count_nonzero(b) == 0


@pytest.mark.parametrize("flags, message", [
    (["--lora-r", "0"], "--lora-r must be at least 1, got 0"),
    (["--lora-alpha", "0"], "--lora-alpha must be greater than 0, got 0.0"),
    (["--lora-alpha", "inf"], "--lora-alpha must be a finite number, got inf"),
    (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1), got 1.0"),
    (["--lora-dropout", "-0.1"], "--lora-dropout must be in [0, 1), got -0.1"),
])
def test_lora_bounds_are_checked_with_every_option_when_parsed(flags, message):
    """Each LoRA value's bounds are declared on its field (LoRAOptions) and checked by core.args.check_values,
    as every other option's, once the command line is parsed."""
    from gpt2_scratch.core.args import check_values, parse_dataclass_args
    from gpt2_scratch.train.sft import SFTArgs

    args, _ = parse_dataclass_args(SFTArgs, flags)
    with pytest.raises(InputError) as err:
        check_values(args)
    assert str(err.value) == message


@pytest.mark.parametrize("given, message", [
    (dict(lora_targets=["wte"]), "--lora-targets wte: unknown layer"),
    (dict(lora_targets=["all-linear", "c_fc"]), "pass it alone"),
    (dict(base_dtype="bf16"), "--base-dtype bf16 stores frozen weights in bf16: it needs --lora"),
    (dict(lora="book", base_dtype="bf16"), "needs --mixed-precision bf16"),
    (dict(merge=False), "--no-merge keeps only a LoRA adapter: it needs --lora"),
    (dict(lora="book", merge=False, push_to_hub="a/b"), "drop --no-merge"),
])
def test_bad_lora_options_are_one_line_errors(given, message):
    with pytest.raises(InputError) as err:
        lora.settings(options(**given))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("preset", ["default", "book"])
def test_adapter_starts_as_a_no_op_and_training_moves_only_adapters(preset):
    base = tiny_model()
    before = copy.deepcopy(base.state_dict())
    with torch.no_grad():
        expected = base(IDS).logits
    model = lora.wrap(base, lora.settings(options(lora=preset)))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)  # B = 0: exactly the base
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    train_a_little(model)
    for name, param in model.named_parameters():
        if name in adapters:
            assert not torch.equal(param, adapters[name]), f"{name} did not train"
    base_after = model.get_base_model().state_dict()
    for name, tensor in before.items():
        key = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        key = key if key in base_after else name
        assert torch.equal(base_after[key], tensor), f"frozen {name} changed"


@pytest.mark.parametrize("preset", ["default", "book"])
def test_merged_model_equals_the_adapter_model(preset, tmp_path):
    from peft import PeftModel

    from gpt2_scratch import save_model_dir
    from gpt2_scratch.model_dir import load_model_dir

    s = lora.settings(options(lora=preset))
    save_model_dir(tiny_model(), tmp_path / "base")
    model = lora.wrap(load_model_dir(tmp_path / "base"), s, base_model=str(tmp_path / "base"))
    train_a_little(model)
    with torch.no_grad():
        adapted = model(IDS).logits
    lora.save_adapter(model, tmp_path)
    adapter_names = sorted(n.replace(".default", "") for n, p in model.named_parameters() if ".lora_" in n)
    wte = model.get_base_model().transformer.wte.weight.detach().clone()
    merged = lora.merged_model(model, s)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, adapted, atol=1e-5, rtol=0)
    # The head's update stays in the head: the embedding keeps its value, the merged model is untied.
    assert torch.equal(merged.transformer.wte.weight, wte)
    assert merged.config.tie_word_embeddings == (preset == "default")
    save_model_dir(merged, tmp_path / "merged")
    reloaded = load_model_dir(tmp_path / "merged")
    # The adapter, reloaded the standard way onto a fresh base, is the same model.
    adapter_model = PeftModel.from_pretrained(load_model_dir(tmp_path / "base"), tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tmp_path / "base")
    # Only the adapters: the tied head's frozen weight is the base model's, not saved again.
    assert sorted(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == adapter_names
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, adapted, atol=1e-5, rtol=0)
        torch.testing.assert_close(adapter_model(IDS).logits, adapted, atol=1e-5, rtol=0)


def test_bf16_base_halves_the_frozen_weights_and_merges_into_the_fp32_base():
    s = lora.settings(options(lora="book", base_dtype="bf16", mixed_precision="bf16"))
    model = lora.wrap(tiny_model(), s)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["base_model.model.transformer.h.0.mlp.c_fc.base_layer.weight"] == torch.bfloat16
    assert dtypes["base_model.model.transformer.wte.weight"] == torch.bfloat16
    assert dtypes["base_model.model.transformer.wpe.weight"] == torch.float32  # the residual stream stays fp32
    assert dtypes["base_model.model.transformer.h.0.ln_1.weight"] == torch.float32
    assert all(dtypes[n] == torch.float32 for n in dtypes if ".lora_" in n)
    train_a_little(model, autocast=True, lr=1e-3)
    merged = lora.merged_model(model, s, load_base=tiny_model)  # the original fp32 base, plus the adapter
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    reference = lora.wrap(tiny_model(), lora.settings(options(lora="book")))
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    set_peft_model_state_dict(reference, get_peft_model_state_dict(model, save_embedding_layers=False))
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, reference(IDS).logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Through the CLI: what a run leaves, and resume after SIGKILL
# ---------------------------------------------------------------------------------------------------

RUN = [*TINY_ARGS, "--data", str(BOOK_DATA), "--lr", "1e-3", "--batch-size", "4", "--grad-accum", "2",
       "--epochs", "1", "--max-steps", "20", "--eval-freq", "5", "--eval-iter", "2", "--save-every", "10",
       "--keep-checkpoints", "0", "--max-new-tokens", "2", "--response-batch-size", "55", "--sample-tokens", "4",
       "--mask-prompt", "--lora", "book"]


def sft(*args) -> subprocess.CompletedProcess:
    return run_cli("train/sft.py", *args, env=ENV)


def adapter_weights(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    result = sft(*RUN, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow  # training runs through the CLI
def test_lora_run_leaves_merged_model_and_adapter(lora_run):
    out, result = lora_run
    assert "LoRA rank 16, alpha 256 (scale 16)" in result.stdout and "trainable / " in result.stdout
    for name in ("model.safetensors", "config.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "instruction-data-with-response.json", "loss.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in rows if "val_loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses  # it learns
    # The merged folder loads where this project is not importable, untied head included.
    code = f"""
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        assert not m.config.tie_word_embeddings
        assert not torch.equal(m.lm_head.weight, m.transformer.wte.weight)
        print(m(torch.tensor([[1, 2, 3]])).logits.shape)
    """
    assert "50257" in run_python(code, cwd=Path("/"), block_project=True, env={"PYTHONPATH": ""}).stdout
    from gpt2_scratch.train.publish import build_model_card, find_run_info

    card = str(build_model_card(out, "alice/tiny-lora", find_run_info(out)))
    assert "This is a LoRA finetune (peft; rank 16, alpha 256, i.e. scale 16" in card


@pytest.mark.slow  # training runs through the CLI
def test_no_merge_keeps_only_the_adapter(tmp_path):
    out = tmp_path / "nomerge"
    result = sft(*RUN, "--max-steps", "2", "--save-every", "0", "--no-merge", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert len(json.loads((out / "instruction-data-with-response.json").read_text())) == 110


@pytest.mark.slow  # training runs through the CLI
def test_lora_resume_after_sigkill_ends_with_the_same_adapter(lora_run, tmp_path):
    ref_out, _ = lora_run
    out = tmp_path / "killed"
    kill_at_checkpoint([sys.executable, "train/sft.py", *RUN, "--out", out],
                       out / "checkpoints" / "step-00000010" / "train_state.json", cwd=REPO, env=ENV)
    assert not (out / "adapter").exists()
    resumed = sft(*RUN, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    ref, got = adapter_weights(ref_out), adapter_weights(out)
    assert ref.keys() == got.keys() and len(ref) == 2 * (4 * 2 + 1)  # A and B of 9 layers
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-7, msg=name)
