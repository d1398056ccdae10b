"""Activation checkpointing (``--gradient-checkpointing``): the same gradients as a plain step, less memory.

transformers' mechanism (``supports_gradient_checkpointing``, ``activation_checkpointing_enable``) on our
Block: each block's activations are recomputed in the backward pass instead of kept. With dropout the
recompute must draw the same masks, or the gradients would belong to another forward pass.
"""

import pytest
import torch

from conftest import TINY
from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM


def gradients(model, input_ids, labels, seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for both runs
    loss = model(input_ids, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def enable(model) -> None:
    # transformers 5.x renamed gradient_checkpointing_enable (a deprecated alias now) to activation_checkpointing_enable.
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


@pytest.mark.parametrize("drop_rate,fast_masks", [(0.0, False), (0.1, False), (0.1, True)])
def test_checkpointed_gradients_equal_plain_ones(drop_rate, fast_masks):
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**TINY, drop_rate=drop_rate)).train()
    model.use_fast_dropout_masks(fast_masks)  # the training commands' masks (tests/test_dropout.py) replay too
    input_ids = torch.randint(0, model.config.vocab_size, (3, 40))
    plain_loss, plain = gradients(model, input_ids, input_ids, seed=7)
    enable(model)
    assert all(block.gradient_checkpointing for block in model.transformer.h)
    checkpointed_loss, checkpointed = gradients(model, input_ids, input_ids, seed=7)
    assert checkpointed_loss == plain_loss
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)


def test_checkpointing_keeps_only_block_inputs():
    """What checkpointing is for: the activations saved for backward shrink to each block's input (a small
    vocabulary, so the blocks' activations, not the head's logits, are what is measured; weights are not counted)."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**TINY, vocab_size=64)).train()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 64))
    weights = {p.data_ptr() for p in model.parameters()}

    def saved_bytes() -> int:
        total = 0

        def pack(t):
            nonlocal total
            if t.data_ptr() not in weights:
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids, labels=input_ids, use_cache=False).loss
        return total

    plain = saved_bytes()
    enable(model)
    checkpointed = saved_bytes()
    print(f"saved for backward: {plain:,} bytes plain, {checkpointed:,} checkpointed")
    assert checkpointed < plain / 4


def test_generation_still_uses_the_cache_with_checkpointing_on():
    """A model left with checkpointing on still generates with its KV cache (no gradients, no checkpoint)."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig(**TINY)).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False)
    enable(model)
    model.train()  # even in training mode: without gradients nothing is recomputed
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), expected)
