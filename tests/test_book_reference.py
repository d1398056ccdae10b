"""Self-test of tests/book_reference.py, the reference for `train/sft.py --book-exact`.

It trains (losses go down), its batch order is the one worked out by hand from torch's documented
global-RNG draws (FACTS.md: one draw per new DataLoader iterator, one more for a shuffled loader's
permutation), its initial losses are the plain mean over the first batches, its printed lines
have the book's format, and its collate equals our train.data collate.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from book_reference import (  # noqa: E402
    BookGPT,
    book_collate,
    book_split,
    calc_loss_batch,
    finetune,
    format_input,
)

from gpt2_scratch import format_example, get_encoding  # noqa: E402
from gpt2_scratch import format_input as our_format_input  # noqa: E402
from gpt2_scratch.train.data import collate_instruction_batch  # noqa: E402

# Small enough to run in seconds: the vocabulary projection (50257 wide) is nearly all the work.
CFG = dict(vocab_size=50257, context_length=128, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)
N_RECORDS, BATCH, EVAL_FREQ, EVAL_ITER, SAMPLE_TOKENS = 24, 4, 3, 2, 20
N_TRAIN = int(N_RECORDS * 0.85)  # 20: 5 batches an epoch
STEPS = 2 * (N_TRAIN // BATCH)


def records(n: int = N_RECORDS) -> list[dict]:
    out = []
    for i in range(n):
        a, b = 3 * i + 1, 7 * i % 11
        if i % 3:
            out.append({"instruction": f"Add {a} and {b}.", "input": "", "output": f"The sum is {a + b}."})
        else:
            out.append({"instruction": "Repeat the word.", "input": f"word{i}", "output": f"word{i} word{i}"})
    return out


@pytest.fixture(scope="module")
def enc():
    return get_encoding()


@pytest.fixture(scope="module")
def run(enc):
    model, result = finetune(records(), cfg=CFG, state_dict=None, encode=enc.encode,
                             decode=enc.decode, num_epochs=2, batch_size=BATCH, lr=1e-2,
                             eval_freq=EVAL_FREQ, eval_iter=EVAL_ITER, sample_tokens=SAMPLE_TOKENS)
    return model, result


def test_losses_go_down(run):
    _, result = run
    assert len(result.step_losses) == STEPS == 10  # 24 records: 20 train, 2 test, 2 validation
    assert result.step_losses[-1] < result.step_losses[0] - 1.0, result.step_losses
    evals = [e["train_loss"] for e in result.evals]
    assert evals[-1] < evals[0] < result.initial_train_loss, (result.initial_train_loss, evals)
    assert result.evals[-1]["val_loss"] < result.initial_val_loss


def _draw() -> int:
    """What a DataLoader iterator (its base seed) or a RandomSampler without a generator draws."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


def _perm(seed: int, n: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def test_batch_order_and_initial_losses_match_a_hand_computed_dataloader(run, enc):
    _, result = run
    n_train = len(book_split(records())[0])
    train = [enc.encode(format_input(r) + f"\n\n### Response:\n{r['output']}") for r in book_split(records())[0]]

    torch.manual_seed(123)
    model = BookGPT(CFG).eval()  # the model's random init draws, before the first loader is iterated
    _draw()  # initial train loss: a new iterator ...
    initial_perm = _perm(_draw(), n_train)  # ... and its sampler's permutation at the first batch
    _draw()  # initial validation loss: a new (unshuffled) iterator
    torch.manual_seed(123)
    expected, step = [], -1
    for _epoch in range(2):
        _draw()
        order = _perm(_draw(), n_train)
        for b in range(n_train // BATCH):
            expected.append(order[b * BATCH:(b + 1) * BATCH])
            step += 1
            if step % EVAL_FREQ == 0:
                _draw(), _draw()  # evaluation: the train loader (iterator + permutation)
                _draw()  # and the validation loader (iterator)
    assert result.train_batches == expected
    assert sorted(expected[:STEPS // 2]) != sorted(expected[STEPS // 2:])  # the epochs differ: the check has teeth

    with torch.no_grad():
        first = [book_collate([train[i] for i in initial_perm[b * BATCH:(b + 1) * BATCH]]) for b in range(EVAL_ITER)]
        losses = [calc_loss_batch(x, y, model).item() for x, y in first]
    assert result.initial_train_loss == pytest.approx(sum(losses) / EVAL_ITER, abs=1e-6)


def test_printed_lines_follow_the_books_schedule_and_format(run):
    _, result = run
    assert [e["step"] for e in result.evals] == list(range(0, STEPS, EVAL_FREQ))  # 0-based, step % eval_freq == 0
    assert [e["epoch"] for e in result.evals] == [1, 1, 2, 2]  # 5 steps per epoch: 0 3 | 6 9
    expected = []
    for epoch in (1, 2):
        for e in (e for e in result.evals if e["epoch"] == epoch):
            expected.append(f"Ep {epoch} (Step {e['step']:06d}): Train loss {e['train_loss']:.3f}, "
                            f"Val loss {e['val_loss']:.3f}")
        expected.append(result.samples[epoch - 1].replace("\n", " "))  # the epoch-end sample, one line
    assert result.lines == expected
    assert re.fullmatch(r"Ep 1 \(Step 000000\): Train loss \d+\.\d{3}, Val loss \d+\.\d{3}", result.lines[0])
    start = format_input(book_split(records())[2][0])  # the first validation record's prompt
    for sample in result.samples:
        assert sample.startswith(start) and len(sample) > len(start)
    tokens = [e["tokens_seen"] for e in result.evals]
    assert tokens == sorted(tokens) and tokens[0] > 0


def test_reference_prompt_and_collate_equal_ours(enc):
    recs = records(12)
    for r in recs:
        assert format_input(r) == our_format_input(r)
        assert format_input(r) + f"\n\n### Response:\n{r['output']}" == format_example(r)
    items = [enc.encode(format_example(r)) for r in recs[:5]]
    for limit in (None, 20):
        ours = collate_instruction_batch(items, allowed_max_length=limit)
        ref = book_collate(items, allowed_max_length=limit)
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
