"""Models whose LM head is not the token embedding (`tie_word_embeddings=False`), end to end.

A finetuned book model is one (its out_head trains apart from tok_emb). Such a folder saves the
head, loads untied with and without our package, generates as transformers' GPT-2 with the same
untied weights does, exports to an untied GPT2LMHeadModel and converts back unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, run_python, transformers_twin
from safetensors import safe_open

from gpt2_scratch.convert.hf import export_hf, load_hf_checkpoint
from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM, save_model_dir

IDS = torch.tensor([[464, 3290, 373, 1043, 287, 257, 2214, 1474]])


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """(model, its saved folder): an untied tiny model whose head is far from its embedding."""
    torch.manual_seed(7)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY, tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():  # make biases and LayerNorms matter too
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    return model, save_model_dir(model, tmp_path_factory.mktemp("untied") / "model")


def test_an_untied_model_is_its_own_head(untied):
    model, folder = untied
    assert model.lm_head.weight is not model.transformer.wte.weight
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
        assert torch.equal(f.get_tensor("lm_head.weight"), model.lm_head.weight)
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    again = GPT2ScratchForCausalLM.from_pretrained(folder)
    assert again.lm_head.weight is not again.transformer.wte.weight
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_greedy_generation_and_logits_equal_transformers(untied):
    model, _ = untied
    reference = transformers_twin(model)
    assert reference.lm_head.weight is not reference.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, atol=1e-5, rtol=0)
        ours = model.generate(IDS, max_new_tokens=25, do_sample=False, attention_mask=torch.ones_like(IDS))
        theirs = reference.generate(IDS, max_new_tokens=25, do_sample=False, attention_mask=torch.ones_like(IDS),
                                    pad_token_id=50256)
    assert ours.tolist() == theirs.tolist()


def test_loads_untied_without_our_package(untied, tmp_path):
    model, folder = untied
    with torch.no_grad():
        expected = {"logits": model(IDS).logits,
                    "tokens": model.generate(IDS, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(IDS))}
    torch.save(expected, tmp_path / "expected.pt")
    run_python(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert model.config.tie_word_embeddings is False
        assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        ids = torch.tensor([{IDS[0].tolist()}])
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected["logits"])
            tokens = model.generate(ids, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids))
        assert tokens.tolist() == expected["tokens"].tolist(), (tokens, expected["tokens"])
        """,
        cwd=tmp_path,
        block_project=True,
    )


def test_export_hf_writes_an_untied_gpt2_and_converts_back(untied, tmp_path):
    model, folder = untied
    export_hf(folder, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["tie_word_embeddings"] is False
    with torch.no_grad():
        torch.save({"logits": model(IDS).logits}, tmp_path / "ours.pt")
    # transformers alone, no code of ours, no trust_remote_code.
    run_python(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "hf")!r}).eval()
        assert type(model).__name__ == "GPT2LMHeadModel", type(model)
        assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
        with torch.no_grad():
            logits = model(torch.tensor([{IDS[0].tolist()}])).logits
        ours = torch.load({str(tmp_path / "ours.pt")!r}, weights_only=True)["logits"]
        diff = (logits - ours).abs().max().item()
        assert diff <= 1e-5, diff
        """,
        cwd=tmp_path,
        block_project=True,
    )
    back = load_hf_checkpoint(tmp_path / "hf")
    assert back.config.tie_word_embeddings is False
    assert back.lm_head.weight is not back.transformer.wte.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_hf_head_is_tied_exactly_when_equal_to_wte(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    for tie in (True, False):
        torch.manual_seed(0)
        ref = GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=tie)).eval()
        ref.save_pretrained(tmp_path / str(tie))
        ours = load_hf_checkpoint(tmp_path / str(tie))
        assert ours.config.tie_word_embeddings is tie
        assert (ours.lm_head.weight is ours.transformer.wte.weight) is tie
        with torch.no_grad():
            torch.testing.assert_close(ours(IDS % 1000).logits, ref(IDS % 1000).logits, atol=1e-5, rtol=0)
