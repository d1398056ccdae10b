"""The training commands' dropout on CPU (modeling's ``keep_mask``, ``Dropout``, ``attend_with_fast_dropout``).

Masks drawn from 16 random bits per element instead of torch's Bernoulli samples: the same rate (to 1/65536)
and an exact expectation, reproducible from the seed, with attention's softmax and gradients those of SDPA
wherever nothing is dropped. A model starts with torch's masks; the training loop's launch turns these on.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, isolate_user_settings
from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
from gpt2_scratch.modeling_gpt2_scratch import (
    Dropout,
    GPT2ScratchPreTrainedModel,
    attend_with_fast_dropout,
    build_attention_mask,
    causal_keep_mask,
    keep_mask,
)

VERDICT = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "the-verdict.txt"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p_from_every_word_and_scales_exactly(p):
    torch.manual_seed(0)
    n = 4_000_002  # not a multiple of four: the last draw is used in part
    keep, scale = keep_mask(torch.Size([n]), p)
    assert keep.shape == (n,) and keep.dtype == torch.bool
    kept = round((1 - p) * 65536)
    assert scale * kept == 65536  # E[keep * scale] is exactly 1
    tolerance = 6 * math.sqrt(p * (1 - p) / (n // 4))
    # Each of a draw's four 16-bit words must be uniform: a draw over [0, 2**63) leaves one word's top bit
    # always zero, which would keep everything at p = 0.5, so a draw short of 64 bits shows here.
    for word in range(4):
        assert abs(keep[word::4].double().mean().item() - (1 - p)) < tolerance, word


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_mask_in_a_float_dtype_is_the_boolean_mask_as_ones_and_zeros(dtype):
    torch.manual_seed(3)
    boolean, scale = keep_mask(torch.Size([3, 5, 17]), 0.2)
    torch.manual_seed(3)
    ones, same_scale = keep_mask(torch.Size([3, 5, 17]), 0.2, dtype)
    assert ones.dtype == dtype and same_scale == scale
    assert torch.equal(ones, boolean.to(dtype))


def test_keep_mask_follows_the_seed_and_changes_between_draws():
    torch.manual_seed(5)
    first, _ = keep_mask(torch.Size([4, 7, 9]), 0.3)
    second, _ = keep_mask(torch.Size([4, 7, 9]), 0.3)
    torch.manual_seed(5)
    again, _ = keep_mask(torch.Size([4, 7, 9]), 0.3)
    assert torch.equal(first, again) and not torch.equal(first, second)


def test_dropout_module_is_torchs_until_told_and_then_keeps_the_expectation():
    x = torch.randn(64, 257)
    layer = Dropout(0.25).train()
    torch.manual_seed(1)
    ours = layer(x)
    torch.manual_seed(1)
    assert torch.equal(ours, F.dropout(x, 0.25, training=True))  # torch's masks by default

    layer.fast_masks = True
    torch.manual_seed(1)
    fast = layer(x)
    dropped = fast == 0
    assert abs(dropped.double().mean().item() - 0.25) < 0.02
    torch.testing.assert_close(fast[~dropped], x[~dropped] * (65536 / round(0.75 * 65536)))
    assert torch.equal(layer.eval()(x), x)  # evaluation drops nothing
    mean = torch.stack([layer.train()(torch.ones(10_000)) for _ in range(200)]).mean()
    assert abs(mean.item() - 1.0) < 0.005


def test_causal_keep_mask_gives_every_weight_below_the_diagonal_its_own_uniform_word():
    """Rows i and T-1-i share a row of T+1 words: each position on or below the diagonal keeps 1 - p of the
    time, independently of every other (two positions reading one word would agree every time at p = 0.5)."""
    T, samples = 8, 20_000
    torch.manual_seed(4)
    keep, scale = causal_keep_mask(torch.Size([samples, 1, T, T]), 0.5, torch.float32)
    assert keep.shape == (samples, 1, T, T) and scale == 2.0
    lower = keep[:, 0][:, torch.ones(T, T, dtype=torch.bool).tril()]  # (samples, 36)
    assert (lower.mean(0) - 0.5).abs().max() < 0.02
    agreement = ((lower[:, :, None] == lower[:, None, :]).double().mean(0) - 0.5).abs()
    assert agreement.fill_diagonal_(0).max() < 0.03  # no two positions share a word
    torch.manual_seed(4)
    odd, _ = causal_keep_mask(torch.Size([2, 3, 7, 7]), 0.5, torch.float32)
    torch.manual_seed(4)
    assert torch.equal(odd, keep_mask(torch.Size([2, 3, 7, 7]), 0.5, torch.float32)[0])  # odd T: keep_mask


def attention_inputs(dtype=torch.float32, padded: bool = False, length: int = 33):
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 4, length, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = None
    if padded:  # the first sequence padded on the left by 5 positions, as a batch of SFT examples
        attention_mask = torch.ones(2, 33, dtype=torch.long)
        attention_mask[0, :5] = 0
        mask = build_attention_mask(attention_mask, 33, 0)
    return q, k, v, mask


@pytest.mark.parametrize("padded", [False, True])
def test_attention_without_drops_is_sdpas(padded):
    q, k, v, mask = attention_inputs(padded=padded)
    ours = attend_with_fast_dropout(q, k, v, mask, 0.0)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    torch.testing.assert_close(ours, sdpa, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    expected = torch.autograd.grad(sdpa.square().sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("length", [33, 32])  # odd: keep_mask's whole matrix; even: causal_keep_mask's triangle
def test_attention_drops_the_softmax_weights_with_the_mask_it_draws(length):
    q, k, v, _ = attention_inputs(length=length)
    torch.manual_seed(11)
    ours = attend_with_fast_dropout(q, k, v, None, 0.3)
    torch.manual_seed(11)
    keep, scale = causal_keep_mask(torch.Size([2, 4, length, length]), 0.3, torch.float32)  # the same draw again
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    weights = torch.softmax((q @ k.transpose(-2, -1) / 4.0).masked_fill(~causal, float("-inf")), dim=-1)
    reference = (weights * keep * scale) @ v
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(ours.sum(), (q, k, v)), torch.autograd.grad(reference.sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_attention_under_bf16_autocast_runs_in_bf16():
    q, k, v, _ = attention_inputs(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend_with_fast_dropout(q, k, v, None, 0.1)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_the_model_switch_reaches_every_dropout_and_attention_and_changes_only_training():
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**TINY, drop_rate=0.1))
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    plain = model.eval()(ids).logits
    model.use_fast_dropout_masks()
    switched = [m for m in model.modules() if hasattr(m, "fast_masks")]
    assert len(switched) == 1 + 3 * TINY["n_layers"] and all(m.fast_masks for m in switched)  # drop + 3 per block
    assert torch.equal(model(ids).logits, plain)  # evaluation is untouched
    model.train()
    losses = []
    for _ in range(2):
        torch.manual_seed(9)
        losses.append(model(ids, labels=ids, use_cache=False).loss.item())
    assert losses[0] == losses[1]  # reproducible from the seed
    model.use_fast_dropout_masks(False)
    assert not any(m.fast_masks for m in switched)


def test_training_commands_turn_the_fast_masks_on(tmp_path, monkeypatch, capsys):
    from gpt2_scratch.core.cli import main

    isolate_user_settings(monkeypatch, tmp_path)
    calls = []
    original = GPT2ScratchPreTrainedModel.use_fast_dropout_masks

    def spy(self, enabled=True):
        calls.append(enabled)
        original(self, enabled)

    monkeypatch.setattr(GPT2ScratchPreTrainedModel, "use_fast_dropout_masks", spy)
    text = tmp_path / "story.txt"
    text.write_text(VERDICT.read_text(encoding="utf-8")[:8000], encoding="utf-8")
    code = main(["pretrain", "--data", str(text), "--random-init", "--n-layers", "1", "--emb-dim", "32",
                 "--n-heads", "2", "--context-length", "64", "--drop-rate", "0.1", "--batch-size", "2",
                 "--max-steps", "1", "--sample-tokens", "2", "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    assert calls == [True]
