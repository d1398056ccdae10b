"""`train/pretrain.py --book-exact` against a faithful re-implementation of the book's chapter 5 (tests/book_reference.py).

The run is the one users start (`python train/pretrain.py --book-exact --data the-verdict.txt`), with a
small shape so it takes seconds; dropout stays at the book's 0.1, so the masks (and the batch order,
which shares the global RNG) must be the book's for the lines to agree. The full-size run, whose first
lines shared/docs/FACTS.md records from the book's own script on this kind of machine, is in the slow suite.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from book_reference import pretrain as book_pretrain

REPO = Path(__file__).resolve().parents[1]
VERDICT = REPO.parent / "shared" / "data" / "the-verdict.txt"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_book_exact(tmp_path: Path, *args: str) -> list[str]:
    """Our --book-exact run's printed lines (evaluations and samples)."""
    env = {**ENV, "GPT2_SCRATCH_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "train/pretrain.py", "--book-exact", "--data", str(VERDICT),
                             "--out", str(tmp_path / "run"), *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    return [line for line in lines if line.startswith(("Ep ", "Every effort moves you"))]


def reference_lines(cfg: dict, **settings) -> list[str]:
    from gpt2_scratch import ENDOFTEXT, get_encoding

    enc = get_encoding()
    torch.set_num_threads(1)
    _, run = book_pretrain(VERDICT.read_text(encoding="utf-8"), cfg=cfg,
                           encode=lambda t: enc.encode(t, allowed_special={ENDOFTEXT}), decode=enc.decode, **settings)
    return run.lines


@pytest.mark.slow  # 2 epochs of both loops, ~20 s
def test_book_exact_lines_equal_the_books_procedure_small_shape(tmp_path):
    """2 layers, width 64, context 32 (144 windows, 72 steps of batch 2 per epoch), dropout 0.1, 2 epochs:
    every evaluation line and both samples equal the reference's, to the book's 3 decimals."""
    ours = run_book_exact(tmp_path, "--n-layers", "2", "--emb-dim", "64", "--n-heads", "4", "--context-length",
                          "32", "--epochs", "2", "--sample-tokens", "10")
    cfg = {"vocab_size": 50257, "context_length": 32, "emb_dim": 64, "n_heads": 4, "n_layers": 2, "drop_rate": 0.1,
           "qkv_bias": False}
    reference = reference_lines(cfg, num_epochs=2, sample_tokens=10)
    assert len(reference) == len(range(0, 2 * 72, 5)) + 2  # evaluations at steps 0, 5, ..., 140 and 2 samples
    assert ours == reference


@pytest.mark.slow  # gpt2-small at the book's shape: about 3 minutes on 2 cores
def test_book_exact_full_size_first_epoch_prints_the_books_numbers(tmp_path):
    """The book's settings for 1 epoch (9 steps): the lines the book's own gpt_train.py printed here
    (FACTS.md) and the reference's, and the epoch-end sample."""
    ours = run_book_exact(tmp_path, "--epochs", "1")
    assert ours[:2] == ["Ep 1 (Step 000000): Train loss 9.812, Val loss 9.846",
                        "Ep 1 (Step 000005): Train loss 7.588, Val loss 8.044"]
    assert ours[2].startswith("Every effort moves you,,,,,,,,,,,,.")
