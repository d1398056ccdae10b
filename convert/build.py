"""Turn a checked, converted state dict into a GPT2ScratchForCausalLM without a second copy.

The model is built on the meta device (no memory, no random init) and the converted tensors are
assigned as its parameters (`load_state_dict(assign=True)`). Tensors that needed no layout change
are still views of the memory-mapped checkpoint, so converting gpt2-xl costs about the size of
the transposed weights plus whatever saving needs, not 3-4 copies of the model.
"""

from __future__ import annotations

import logging

import torch

from convert.errors import ConvertError
from convert.mapping import TIED, Dims

log = logging.getLogger(__name__)


def model_from_state(dims: Dims, state: dict[str, torch.Tensor], *, source: str, layer_norm_epsilon: float = 1e-5):
    """Our causal LM holding exactly `state` (our parameter names, lm_head tied to wte)."""
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

    config = GPT2ScratchConfig(**dims.to_config_kwargs(), layer_norm_epsilon=layer_norm_epsilon)
    with torch.device("meta"):
        model = GPT2ScratchForCausalLM(config)
    state = {name: t if t.dtype == torch.float32 else t.float() for name, t in state.items()}
    for head, embedding in TIED.items():
        state[head] = state[embedding]
    expected = set(model.state_dict())
    if set(state) != expected:  # the tables and the model disagree: a bug here, not bad input
        raise ConvertError(f"{source}: converted names do not match the model's parameters "
                           f"(missing {sorted(expected - set(state))[:3]}, extra {sorted(set(state) - expected)[:3]})")
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # one Parameter object for wte and the head, as from_pretrained leaves it
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ConvertError(f"{source}: model tensors left unfilled: {still_meta[:3]}")
    if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
        raise ConvertError(f"{source}: lm_head is not tied to the token embedding after conversion")
    return model.eval()
