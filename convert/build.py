"""Turn a checked, converted state dict into one of our models without a second copy.

The model is built on the meta device (no memory, no random init) and the converted tensors are
assigned as its parameters (`load_state_dict(assign=True)`). Tensors that needed no layout change
are still views of the memory-mapped checkpoint, so converting gpt2-xl costs about the size of
the transposed weights plus whatever saving needs, not 3-4 copies of the model.

The LM head is tied to the token embedding exactly when the source's head equals it (or the source
has none, as OpenAI's and the Hub's GPT-2 files). A finetuned book model, whose `out_head` is its
own parameter, keeps its head: `tie_word_embeddings=False` and an `lm_head.weight` of its own.
"""

from __future__ import annotations

import logging

import torch

from gpt2_scratch.convert.errors import ConvertError
from gpt2_scratch.convert.mapping import TIED, Dims

log = logging.getLogger(__name__)

HEAD, EMBEDDING = next(iter(TIED.items()))  # "lm_head.weight", "transformer.wte.weight"


def _as_float32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t if t.dtype == torch.float32 else t.float() for name, t in state.items()}


def _assign(model, state: dict[str, torch.Tensor], source: str):
    """Put `state` into `model` (built on meta) as its parameters; every one must be filled."""
    expected = set(model.state_dict())
    if set(state) != expected:  # the tables and the model disagree: a bug here, not bad input
        raise ConvertError(f"{source}: converted names do not match the model's parameters "
                           f"(missing {sorted(expected - set(state))[:3]}, extra {sorted(set(state) - expected)[:3]})")
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # tied: one Parameter object for wte and the head, as from_pretrained leaves it
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ConvertError(f"{source}: model tensors left unfilled: {still_meta[:3]}")
    return model.eval()


def model_from_state(dims: Dims, state: dict[str, torch.Tensor], *, source: str, layer_norm_epsilon: float = 1e-5,
                     qkv_bias: bool = True):
    """Our causal LM holding exactly `state` (our parameter names).

    Without `lm_head.weight`, or with one equal to the token embedding, the head is tied; with a
    different one, the model is untied (`tie_word_embeddings=False`) and keeps it.
    """
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

    state = _as_float32(state)
    head = state.pop(HEAD, None)
    tied = head is None or torch.equal(head, state[EMBEDDING])
    if not tied:
        log.info("%s: the LM head differs from the token embedding; the model keeps it untied", source)
    config = GPT2ScratchConfig(**{**dims.to_config_kwargs(), "qkv_bias": qkv_bias},
                               layer_norm_epsilon=layer_norm_epsilon, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = GPT2ScratchForCausalLM(config)
    state[HEAD] = state[EMBEDDING] if tied else head
    model = _assign(model, state, source)
    shares = model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    if shares != tied:
        raise ConvertError(f"{source}: lm_head is {'not ' if tied else ''}tied to the token embedding after "
                           f"conversion, but the source's head {'equals' if tied else 'differs from'} it")
    return model


def classifier_from_state(dims: Dims, state: dict[str, torch.Tensor], *, source: str, labels: list[str],
                          layer_norm_epsilon: float = 1e-5, qkv_bias: bool = True):
    """Our sequence classifier holding exactly `state` (the body's names plus `score.weight/.bias`)."""
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForSequenceClassification

    config = GPT2ScratchConfig(**{**dims.to_config_kwargs(), "qkv_bias": qkv_bias},
                               layer_norm_epsilon=layer_norm_epsilon, num_labels=len(labels))
    # num_labels resets id2label to LABEL_0..; set the real names after it.
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    with torch.device("meta"):
        model = GPT2ScratchForSequenceClassification(config)
    return _assign(model, _as_float32(state), source)
