"""``--compile``: torch.compile (inductor) gives the same losses and gradients as eager (fp32, tiny shape),
and a training run with --compile ends like the eager one. The speed ratio is bench/bench_compile.py's."""

import pytest
import torch
from conftest import TINY

from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (4, 48), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, :10] = -100  # a masked prompt
    labels[2, 30:] = -100  # padding
    return ids, labels


@pytest.mark.slow  # inductor builds C++ kernels on first use (about a minute here)
def test_compiled_loss_and_gradients_equal_eager():
    torch.manual_seed(0)
    eager = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY))
    compiled = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY))
    compiled.load_state_dict(eager.state_dict())
    from gpt2_scratch.core.compile import compile_model

    compile_model(compiled)
    ids, labels = _batch()
    for model in (eager, compiled):
        model.train()
        out = model(ids, shift_labels=labels, use_cache=False, return_logits=False, num_items_in_batch=1)
        out.loss.backward()
    eager_loss = eager(ids, shift_labels=labels, use_cache=False, return_logits=False).loss
    compiled_loss = compiled(ids, shift_labels=labels, use_cache=False, return_logits=False).loss
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints and saving are unchanged
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_no_compiler_is_one_line(monkeypatch):
    from gpt2_scratch.core import compile as compile_module
    from gpt2_scratch.core.errors import Failure

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: None)
    with pytest.raises(Failure, match="--compile needs a C\\+\\+ compiler"):
        compile_module.check_compiler("cpu")


def test_the_body_traces_as_one_graph_for_any_length():
    """Batches of new lengths make the length dynamic; the transformer body (as training runs it: no cache)
    must stay one graph then (a
    shape-dependent ``is_causal`` once made SDPA refuse a SymBool, and the whole forward fell back to eager
    from the second length on). Dynamo's tracing alone shows it: backend="eager" builds no kernels."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY)).train()
    traced = torch.compile(model.transformer, backend="eager", fullgraph=True, dynamic=True)
    for length in (16, 24):
        ids = torch.randint(0, 50257, (2, length))
        torch.manual_seed(1)  # the same dropout draws in both
        expected = model.transformer(ids, use_cache=False)[0]
        torch.manual_seed(1)
        torch.testing.assert_close(traced(ids, use_cache=False)[0], expected)


def test_the_training_commands_fast_dropout_masks_leave_the_body_one_graph():
    """The training commands turn on modeling's faster CPU dropout masks; their ``random_`` would break dynamo's
    graph, so under torch.compile the model takes torch's dropout, whose masks inductor draws itself."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY, drop_rate=0.1)).train()
    model.use_fast_dropout_masks()
    traced = torch.compile(model.transformer, backend="eager", fullgraph=True, dynamic=True)
    hidden = traced(torch.randint(0, 50257, (2, 16)), use_cache=False)[0]  # fullgraph: a graph break raises
    assert hidden.shape == (2, 16, model.config.emb_dim) and torch.isfinite(hidden).all()


def test_generation_from_a_compiled_model_runs_eager():
    """--compile compiles the model in place, but the epoch-end sample and the test responses decode a new shape
    every token: inside ``core.compile.eager`` dynamo traces nothing (outside it, it would trace every step,
    recompile to its limit and warn)."""
    from torch._dynamo.utils import counters

    from gpt2_scratch.core.compile import eager
    from gpt2_scratch.responses import greedy_batch

    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY)).eval()
    ids = torch.randint(0, 50257, (2, 6))
    mask = torch.ones_like(ids)
    expected = greedy_batch(model, ids, mask, 4)
    model.compile(backend="eager")  # dynamo's tracing without inductor's kernels: what the stance must skip
    torch._dynamo.reset()
    counters.clear()
    with eager():
        assert greedy_batch(model, ids, mask, 4) == expected
    assert counters["frames"]["ok"] == 0
    greedy_batch(model, ids, mask, 4)  # the same call outside the block is traced: the check above can fail
    assert counters["frames"]["ok"] > 0
