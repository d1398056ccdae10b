"""Our GPT-2 is numerically transformers' GPT-2: logits, loss, greedy generation, padding, KV cache."""

import pytest
import torch
from conftest import TINY, transformers_twin

from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM, PRESETS

ATOL = 1e-5


def make_pair(seed=0, **overrides):
    torch.manual_seed(seed)
    ours = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **overrides)).eval()
    return ours, transformers_twin(ours)


@pytest.fixture(scope="module")
def tiny_pair():
    return make_pair(**TINY)


def left_padded_batch(seed=1, lengths=(12, 7, 3), vocab=50257):
    """Three prompts of different lengths, left-padded with <|endoftext|>, and their mask and positions."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), 50256)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(0, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@torch.no_grad()
def test_logits_equal_transformers_tiny(tiny_pair):
    ours, reference = tiny_pair
    ids = torch.randint(0, 50257, (4, 33), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_logits_equal_transformers_gpt2_small_shape():
    ours, reference = make_pair()
    assert sum(p.numel() for p in ours.parameters()) == 124_439_808
    ids = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=ATOL, rtol=0)
    ids, mask, positions = left_padded_batch()
    ours_logits = ours(ids, attention_mask=mask).logits
    reference_logits = reference(ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(ours_logits[mask.bool()], reference_logits[mask.bool()], atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padding_matches_reference_and_unpadded(tiny_pair):
    ours, reference = tiny_pair
    ids, mask, positions = left_padded_batch()
    ours_logits = ours(ids, attention_mask=mask).logits
    reference_logits = reference(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert torch.isfinite(ours_logits).all()
    torch.testing.assert_close(ours_logits[real], reference_logits[real], atol=ATOL, rtol=0)
    # Padding must not change a sequence's logits: compare with each prompt run alone.
    for row in range(ids.shape[0]):
        alone = ours(ids[row : row + 1, real[row]]).logits[0]
        torch.testing.assert_close(ours_logits[row][real[row]], alone, atol=ATOL, rtol=0)


def test_loss_equals_transformers_loss(tiny_pair):
    ours, reference = tiny_pair
    ids = torch.randint(0, 50257, (3, 20), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :6] = -100
    labels[2, 15:] = -100
    torch.testing.assert_close(ours(ids, labels=labels).loss, reference(ids, labels=labels).loss, atol=ATOL, rtol=0)
    # The book's convention: targets already shifted by one (its collate) give the same loss.
    shifted = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    torch.testing.assert_close(ours(ids, shift_labels=shifted).loss, ours(ids, labels=labels).loss)
    # Projecting only the supervised positions gives the same loss, also summed over a token count.
    torch.testing.assert_close(ours(ids, labels=labels, return_logits=False).loss, ours(ids, labels=labels).loss)
    n = torch.tensor(37)
    torch.testing.assert_close(
        ours(ids, shift_labels=shifted, return_logits=False, num_items_in_batch=n).loss,
        reference(ids, labels=labels, num_items_in_batch=n).loss,
        atol=ATOL,
        rtol=0,
    )


def test_projection_layouts_and_optional_qkv_bias(tiny_pair):
    """c_attn and c_fc store [in, out] (transformers' Conv1D type, so tools that know GPT-2 recognise
    them); the c_proj layers are nn.Linear [out, in]. Without the qkv bias the model is GPT-2 with a
    zero bias."""
    from transformers.pytorch_utils import Conv1D

    ours, _ = tiny_pair
    E = ours.config.emb_dim
    block = ours.transformer.h[0]
    assert isinstance(block.attn.c_attn, Conv1D) and block.attn.c_attn.weight.shape == (E, 3 * E)
    assert isinstance(block.mlp.c_fc, Conv1D) and block.mlp.c_fc.weight.shape == (E, 4 * E)
    assert isinstance(block.attn.c_proj, torch.nn.Linear) and block.mlp.c_proj.weight.shape == (E, 4 * E)

    no_bias, _ = make_pair(seed=4, qkv_bias=False, **TINY)
    assert no_bias.transformer.h[0].attn.c_attn.bias is None
    assert "transformer.h.0.attn.c_attn.bias" not in no_bias.state_dict()
    zero_bias, _ = make_pair(seed=4, **TINY)
    zero_bias.load_state_dict(no_bias.state_dict(), strict=False)
    for blk in zero_bias.transformer.h:
        torch.nn.init.zeros_(blk.attn.c_attn.bias)
    ids = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(no_bias(ids).logits, zero_bias(ids).logits, atol=ATOL, rtol=0)


def test_bf16_autocast_training_loss_and_gradients_match_transformers(tiny_pair):
    """Under bf16 autocast short sequences take SDPA's plain path (short_bf16_on_cpu); loss and
    gradients stay what transformers' GPT-2 gives under the same autocast, to bf16 precision."""
    from gpt2_scratch.modeling_gpt2_scratch import short_bf16_on_cpu

    ours, reference = tiny_pair
    ids = torch.randint(0, 50257, (4, 40), generator=torch.Generator().manual_seed(6))
    q = torch.zeros(1, 1, 40, 8, dtype=torch.bfloat16)
    assert short_bf16_on_cpu(q, q) and not short_bf16_on_cpu(q.float(), q.float())
    losses, grads = [], []
    for model in (ours, reference):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.transformer.h[0].attn.c_proj.bias.grad.clone())
        model.zero_grad()
    torch.testing.assert_close(losses[0], losses[1], atol=2e-2, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=2e-3, rtol=5e-2)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lm_head_weight_gradient_in_vocabulary_slices_equals_nn_linears(tied, precision):
    """modeling's VocabProjection computes the head's weight gradient in slices of the vocabulary on CPU (a
    faster product there): the loss and every gradient equal the whole product's, tied to the embedding
    (both gradients add up) or not, in fp32 and under bf16 autocast (the gradient cast back to fp32)."""
    torch.manual_seed(2)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY, tie_word_embeddings=tied))
    ids = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(8))  # 80 rows: sliced
    results = []
    for chunk in (5000, 10**9):  # 11 slices (the last one short); one slice is nn.Linear itself
        model.lm_head.chunk = chunk
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(ids, labels=ids, return_logits=False)
        out.loss.backward()
        results.append((out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    (sliced_loss, sliced), (whole_loss, whole) = results
    torch.testing.assert_close(sliced_loss, whole_loss, atol=0, rtol=0)
    assert model.lm_head.weight.grad.dtype == torch.float32  # (tied, named_parameters lists it as wte)
    for name in whole:
        torch.testing.assert_close(sliced[name], whole[name], atol=1e-7, rtol=1e-6, msg=name)
    head_input = torch.randn(80, 64, requires_grad=True)
    model.lm_head.chunk = 5000
    assert type(model.lm_head(head_input).grad_fn).__name__ == "_VocabProductBackward"  # the sliced path ran
    with torch.no_grad():
        assert model.lm_head(head_input).grad_fn is None  # no gradient wanted: nn.Linear's product


def test_loss_gradients_flow_to_every_parameter(tiny_pair):
    ours, _ = tiny_pair
    ids = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(3))
    ours.zero_grad()
    ours(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.parameters())
    ours.zero_grad()


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_transformers(tiny_pair, use_cache):
    ours, reference = tiny_pair
    prompt = torch.randint(0, 50257, (1, 7), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=40, do_sample=False, pad_token_id=50256, eos_token_id=None)
    ours_tokens = ours.generate(prompt, use_cache=use_cache, **kwargs)
    reference_tokens = reference.generate(prompt, use_cache=True, **kwargs)
    assert ours_tokens.shape[1] == 7 + 40
    assert ours_tokens.tolist() == reference_tokens.tolist()


@torch.no_grad()
@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_kv_cache_under_either_name_continues_the_sequence(tiny_pair, name):
    """transformers renamed the cache argument during 5.x; older callers still pass past_key_values.
    Either way, decoding one token against the cache gives the logits of the whole sequence."""
    from transformers.cache_utils import DynamicCache

    ours, _ = tiny_pair
    ids = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(6))
    full = ours(ids, use_cache=False).logits[:, -1]
    cache = DynamicCache(config=ours.config)
    prefill = ours(ids[:, :-1], use_cache=True, **{name: cache})
    assert prefill.cache is cache and cache.get_seq_length() == 8
    step = ours(ids[:, -1:], use_cache=True, **{name: cache}).logits[:, -1]
    torch.testing.assert_close(step, full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_batched_left_padded_generation_equals_one_at_a_time(tiny_pair):
    ours, reference = tiny_pair
    ids, mask, _ = left_padded_batch(lengths=(9, 4, 6))
    kwargs = dict(max_new_tokens=30, do_sample=False, pad_token_id=50256, eos_token_id=None)
    batched = ours.generate(ids, attention_mask=mask, **kwargs)
    assert batched.tolist() == reference.generate(ids, attention_mask=mask, **kwargs).tolist()
    for row in range(ids.shape[0]):
        alone = ours.generate(ids[row : row + 1, mask[row].bool()], **kwargs)
        assert batched[row, ids.shape[1] :].tolist() == alone[0, int(mask[row].sum()) :].tolist()


@torch.no_grad()
def test_sampling_is_seeded_and_respects_top_k(tiny_pair):
    ours, _ = tiny_pair
    prompt = torch.randint(0, 50257, (1, 5), generator=torch.Generator().manual_seed(5))

    def sample():
        torch.manual_seed(7)
        return ours.generate(prompt, do_sample=True, top_k=1, temperature=1.5, max_new_tokens=10, pad_token_id=50256)

    greedy = ours.generate(prompt, do_sample=False, max_new_tokens=10, pad_token_id=50256)
    assert sample().tolist() == greedy.tolist()  # top_k=1 leaves only the argmax
    torch.manual_seed(7)
    a = ours.generate(prompt, do_sample=True, top_k=50, temperature=2.0, max_new_tokens=10, pad_token_id=50256)
    torch.manual_seed(7)
    b = ours.generate(prompt, do_sample=True, top_k=50, temperature=2.0, max_new_tokens=10, pad_token_id=50256)
    assert a.tolist() == b.tolist()


def test_generation_stops_at_eos(tiny_pair):
    ours, _ = tiny_pair
    prompt = torch.randint(0, 50257, (1, 5), generator=torch.Generator().manual_seed(6))
    first = ours.generate(prompt, do_sample=False, max_new_tokens=1, pad_token_id=50256)[0, -1].item()
    # Declare the model's first greedy token to be the end of text: generation must stop right there.
    stopped = ours.generate(prompt, do_sample=False, max_new_tokens=20, eos_token_id=first, pad_token_id=50256)
    assert stopped.shape[1] == 6


def test_every_preset_builds_with_its_parameter_count():
    expected = {"gpt2-small": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    for name in PRESETS:
        with torch.device("meta"):  # shapes only: no memory, no init time
            model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset(name))
        assert model.lm_head.weight is model.transformer.wte.weight
        assert sum(p.numel() for p in model.parameters()) == expected[name], name


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(emb_dim=100, n_heads=12), "emb_dim 100 is not divisible by n_heads 12"),
        (dict(n_layers=0), "n_layers must be a positive integer"),
        (dict(drop_rate=1.5), "drop_rate must be in [0, 1)"),
    ],
)
def test_inconsistent_config_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        GPT2ScratchConfig.from_preset("gpt2-small", **overrides)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'gpt2-huge'; choose one of gpt2-small"):
        GPT2ScratchConfig.from_preset("gpt2-huge")


def test_token_ids_outside_vocab_and_overlong_input_are_refused(tiny_pair):
    ours, _ = tiny_pair
    with pytest.raises(ValueError, match=r"token id 50257 is outside the vocabulary \[0, 50257\)"):
        ours(torch.tensor([[1, 2, 50257]]))
    with pytest.raises(ValueError, match="sequence of 129 tokens is longer than the context length 128"):
        ours(torch.zeros((1, 129), dtype=torch.long))
