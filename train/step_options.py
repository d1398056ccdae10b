"""How a training step runs, not what it learns: what ``run.launch`` does to the model before
``accelerator.prepare``.

* ``use_fast_dropout_masks``: our model's dropout masks on CPU from 16 random bits per element (modeling's
  ``keep_mask``): the same rate and expectation as torch's dropout, a cheaper step. The book-exact loops
  (``run.launch_own_loop``) keep torch's masks, the book's.
* ``maybe_compile``: ``--gradient-checkpointing`` (transformers' activation checkpointing on every block),
  then ``--compile``.
"""

from __future__ import annotations

from typing import Any

from gpt2_scratch.core.compile import compile_model
from gpt2_scratch.modeling_gpt2_scratch import GPT2ScratchPreTrainedModel


def use_fast_dropout_masks(model) -> None:
    """Turn on modeling's faster CPU dropout masks in ``model``: ours, or peft's wrapper of ours (another
    model keeps its own dropout)."""
    for module in model.modules():
        if isinstance(module, GPT2ScratchPreTrainedModel):
            module.use_fast_dropout_masks()
            return  # the outermost of ours reaches every dropout inside it


def maybe_compile(model, args: Any, device: str):
    """The model options that change how a step runs, not what it computes: ``--gradient-checkpointing``
    (transformers' activation checkpointing on every block: the same gradients, activations recomputed in the
    backward pass instead of kept), then ``--compile`` (torch.compile, or one line saying why this platform
    cannot)."""
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return compile_model(model, device) if args.compile else model


def enable_activation_checkpointing(model) -> None:
    """transformers' activation checkpointing (non-reentrant) on ``model``, a PreTrainedModel or peft's wrapper
    of one (which passes the call on to it). transformers 5.x renamed ``gradient_checkpointing_enable`` to
    ``activation_checkpointing_enable`` and keeps the old name as a deprecated alias."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
