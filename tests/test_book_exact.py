"""``train/sft.py --book-exact`` against the book's loop (tests/book_reference.py), number by number.

One set of tiny weights, saved as our model folder and exported to the book's state dict
(convert.book), is finetuned 20 steps by the reference re-implementation of chapter 7's script and by
``gpt2-scratch sft --book-exact`` (in-process, as a user types it), on the first 24 records of the
book's data (split by the book's rule: 20 train / 2 test / 2 validation). Every logged loss, the
initial losses, the batch of every step, the printed lines and the epoch-end samples must agree.
Batch 2 and width 32 keep it fast: the 50257-wide vocabulary projection is nearly all the work.
A higher learning rate than the book's makes the losses move far, so a drift would show.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from book_reference import (  # noqa: E402
    BookGPT,
    InstructionDataset,
    book_collate,
    book_split,
    calc_loss_loader,
    finetune,
    perturbed,
)

import gpt2_scratch.train.book_exact as book_exact  # noqa: E402
from gpt2_scratch.convert.book import book_cfg, book_state_dict, export_book  # noqa: E402
from gpt2_scratch.core.cli import main  # noqa: E402
from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM, get_encoding, save_model_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BOOK_DATA = REPO.parent / "shared" / "data" / "instruction-data.json"
SHAPE = dict(n_layers=2, emb_dim=32, n_heads=4, context_length=256)
N_RECORDS, BATCH, EVAL_ITER, SAMPLE_TOKENS, LR = 24, 2, 2, 20, 1e-3
STEPS = 2 * (int(N_RECORDS * 0.85) // BATCH)  # 2 epochs of 10 batches
TOL = 1e-5


def sft_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--book-exact", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size",
            str(BATCH), "--eval-iter", str(EVAL_ITER), "--lr", str(LR), "--sample-tokens", str(SAMPLE_TOKENS),
            "--max-new-tokens", "4", *extra]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """(model folder, the book's cfg, the same weights as the book's state dict, data file, its records)."""
    root = tmp_path_factory.mktemp("book-exact")
    torch.manual_seed(11)
    # Tied, like OpenAI's weights: --book-exact must untie it as the book's loader does.
    model = perturbed(GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **SHAPE)), seed=3)
    assert model.lm_head.weight is model.transformer.wte.weight
    model_dir = save_model_dir(model, root / "model")
    cfg = export_book(model_dir, root / "book.pth")
    state = torch.load(root / "book.pth", weights_only=True)
    records = json.loads(BOOK_DATA.read_text(encoding="utf-8"))[:N_RECORDS]
    data = root / "data.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    return model_dir, cfg, state, data, records


@pytest.fixture(scope="module")
def runs(start, tmp_path_factory):
    """(reference BookRun, its model, our OUT, our stdout, our loss calls [(training?, inputs, loss)])."""
    model_dir, cfg, state, data, records = start
    enc = get_encoding()
    ref_model, ref = finetune(records, cfg=cfg, state_dict=state, encode=enc.encode, decode=enc.decode, num_epochs=2,
                              batch_size=BATCH, lr=LR, eval_iter=EVAL_ITER, sample_tokens=SAMPLE_TOKENS)

    calls = []
    original = book_exact.book_batch_loss

    def recording(model, inputs, targets):
        loss = original(model, inputs, targets)
        calls.append((torch.is_grad_enabled(), inputs.clone(), loss.item()))
        return loss

    out = tmp_path_factory.mktemp("run") / "out"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(io.StringIO()):
        mp.setattr(book_exact, "book_batch_loss", recording)
        code = main(sft_args(model_dir, data, out))
    assert code == 0, stdout.getvalue()[-3000:]
    return ref, ref_model, out, stdout.getvalue(), calls


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_initial_and_evaluated_losses_equal_the_books(runs):
    ref, _, out, _, _ = runs
    rows = metrics(out)
    initial = rows[0]
    assert initial["initial"] is True and initial["step"] == -1 and initial["epoch"] == 0
    assert abs(initial["train_loss"] - ref.initial_train_loss) <= TOL
    assert abs(initial["val_loss"] - ref.initial_val_loss) <= TOL
    evals = [r for r in rows[1:] if "train_loss" in r]
    assert not any(r.get("initial") for r in rows[1:])
    assert [r["step"] for r in evals] == [e["step"] for e in ref.evals] == [0, 5, 10, 15]  # 0-based, as the book
    assert [r["epoch"] for r in evals] == [e["epoch"] for e in ref.evals] == [1, 1, 2, 2]
    assert [r["tokens_seen"] for r in evals] == [e["tokens_seen"] for e in ref.evals]
    for ours, book in zip(evals, ref.evals):
        assert abs(ours["train_loss"] - book["train_loss"]) <= TOL, (ours, book)
        assert abs(ours["val_loss"] - book["val_loss"]) <= TOL, (ours, book)
    print("max |ours - book|: initial train %.2g, initial val %.2g, evaluated train %.2g, evaluated val %.2g" % (
        abs(initial["train_loss"] - ref.initial_train_loss), abs(initial["val_loss"] - ref.initial_val_loss),
        max(abs(o["train_loss"] - b["train_loss"]) for o, b in zip(evals, ref.evals)),
        max(abs(o["val_loss"] - b["val_loss"]) for o, b in zip(evals, ref.evals))))
    assert evals[-1]["train_loss"] < ref.initial_train_loss - 0.5  # it trained: the comparison has teeth


def test_initial_train_loss_depends_on_the_model_init_draws(start, runs):
    """Without the book model's init draws the initial batches differ: the replay is what makes them equal."""
    _, cfg, state, _, records = start
    ref, *_ = runs
    model = BookGPT(cfg)
    model.load_state_dict(state)
    model.eval()
    torch.manual_seed(123)
    loader = torch.utils.data.DataLoader(InstructionDataset(book_split(records)[0], get_encoding().encode),
                                         batch_size=BATCH, shuffle=True, drop_last=True,
                                         collate_fn=partial(book_collate, allowed_max_length=1024))
    with torch.no_grad():
        without_draws = calc_loss_loader(loader, model, num_batches=EVAL_ITER)
    assert abs(without_draws - ref.initial_train_loss) > 1e-3


def test_every_step_trains_on_the_books_batch(start, runs):
    _, _, _, _, records = start
    ref, _, _, _, calls = runs
    enc = get_encoding()
    train = InstructionDataset(book_split(records)[0], enc.encode)
    steps = [(inputs, loss) for training, inputs, loss in calls if training]
    assert len(steps) == len(ref.train_batches) == STEPS
    for (inputs, loss), indices, book_loss in zip(steps, ref.train_batches, ref.step_losses):
        expected, _ = book_collate([train[i] for i in indices], allowed_max_length=1024)
        assert torch.equal(inputs, expected), indices
        assert abs(loss - book_loss) <= TOL
    print("max |ours - book| of the step losses: %.2g" % max(
        abs(loss - book) for (_, loss), book in zip(steps, ref.step_losses)))
    # Each evaluation (the initial one and 4 in the loop) reads EVAL_ITER training batches and 1 validation batch.
    assert len(calls) - STEPS == 5 * (EVAL_ITER + 1)


def test_printed_lines_are_the_books(runs):
    ref, _, out, stdout, _ = runs
    lines = stdout.splitlines()
    start = lines.index("Initial losses")
    assert re.fullmatch(r"   Training loss: \d+\.\d+", lines[start + 1])
    assert re.fullmatch(r"   Validation loss: \d+\.\d+", lines[start + 2])
    assert abs(float(lines[start + 1].split(": ")[1]) - ref.initial_train_loss) <= TOL
    book_lines = [line for line in lines if line.startswith(("Ep ", "Below is an instruction"))]
    assert len(book_lines) == len(ref.lines) == 6  # 2 evaluations and a sample per epoch
    number = r"(\d+\.\d{3})"
    for ours, book in zip(book_lines, ref.lines):
        if book.startswith("Ep "):  # 3 decimals of numbers equal within TOL: allow one unit of rounding
            pattern = rf"(Ep \d \(Step \d{{6}}\)): Train loss {number}, Val loss {number}"
            o_head, *o_nums = re.fullmatch(pattern, ours).groups()
            b_head, *b_nums = re.fullmatch(pattern, book).groups()
            assert o_head == b_head and all(abs(float(a) - float(b)) <= 0.0011 for a, b in zip(o_nums, b_nums))
        else:
            assert ours == book  # the greedy samples, token for token
    samples = [r["sample"] for r in metrics(out) if "sample" in r]
    assert samples == [s.replace("\n", " ") for s in ref.samples]
    assert "initial losses | train" in stdout and "epoch 1/2 | step     1/20 | train" in stdout  # ours too


def test_saves_the_untied_model_the_book_trains(start, runs):
    model_dir, _, _, _, records = start
    ref, ref_model, out, _, _ = runs
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    model = GPT2ScratchForCausalLM.from_pretrained(out)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)  # trained apart from the embedding
    ours = book_state_dict(model.state_dict(), model.config, source=str(out))
    theirs = ref_model.state_dict()
    # The key bias adds q·b to every score of a query, which softmax ignores: its true gradient is 0, so
    # each implementation trains it on its own rounding noise (Adam scales that to lr-sized steps).
    # It changes no output; every other tensor must agree.
    compared = [k for k in theirs if not k.endswith((".mask", "W_key.bias"))]
    diff = max((ours[k] - theirs[k]).abs().max().item() for k in compared)
    assert diff <= 5e-6, diff
    print(f"max |ours - book| of the final weights (key biases aside): {diff:.2g}")
    assert json.loads((out / "args.json").read_text())["book_exact"] is True
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    responses = json.loads((out / "instruction-data-with-response.json").read_text())
    assert [r["instruction"] for r in responses] == [r["instruction"] for r in book_split(records)[1]]
    assert all(isinstance(r["model_response"], str) for r in responses)
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("cfg", [
    dict(vocab_size=50257, context_length=64, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True),
    dict(vocab_size=1001, context_length=37, emb_dim=12, n_heads=3, n_layers=3, drop_rate=0.0, qkv_bias=False),
])
def test_rng_replay_leaves_the_state_the_books_model_leaves(cfg):
    torch.manual_seed(123)
    book_exact.replay_book_init(cfg)
    replayed = torch.get_rng_state()
    torch.manual_seed(123)
    BookGPT(cfg)
    built = torch.get_rng_state()
    torch.manual_seed(123)
    assert torch.equal(replayed, built)
    assert not torch.equal(replayed, torch.get_rng_state())


def test_replay_takes_our_config_through_book_cfg():
    config = GPT2ScratchConfig.from_preset("gpt2-small", n_layers=1, emb_dim=16, n_heads=2, context_length=32)
    torch.manual_seed(7)
    book_exact.replay_book_init(book_cfg(config))
    replayed = torch.get_rng_state()
    torch.manual_seed(7)
    BookGPT(book_cfg(config))
    assert torch.equal(replayed, torch.get_rng_state())


def test_the_sample_is_50_tokens_unless_given():
    from gpt2_scratch.core.args import parse_dataclass_args
    from gpt2_scratch.train.sft import SFTArgs

    def parsed(*argv: str) -> SFTArgs:
        args, explicit = parse_dataclass_args(SFTArgs, list(argv))
        return args.with_explicit(explicit)

    assert parsed("--book-exact").sample_tokens == 50
    assert parsed("--book-exact", "--sample-tokens", "7").sample_tokens == 7
    assert parsed().sample_tokens == SFTArgs().sample_tokens == 35


@pytest.mark.parametrize("extra, named", [
    (["--mixed-precision", "bf16"], "--mixed-precision bf16"),
    (["--group-by-length"], "--group-by-length"),
    (["--mask-prompt"], "--mask-prompt"),
    (["--grad-accum", "2"], "--grad-accum 2"),
    (["--max-grad-norm", "1.0"], "--max-grad-norm 1.0"),
    (["--lr-schedule", "cosine"], "--lr-schedule cosine"),
    (["--warmup-steps", "10"], "--warmup-steps 10"),
    (["--shuffle-split"], "--shuffle-split"),
    (["--max-length", "512"], "--max-length 512"),
    (["--too-long", "drop"], "--too-long drop"),
    (["--prompt-style", "phi3"], "--prompt-style phi3"),
    (["--resume"], "--resume"),
    (["--save-every", "5"], "--save-every 5"),
    (["--offline-demo"], "--offline-demo"),
])
def test_incompatible_options_are_refused_in_one_line(start, tmp_path, capsys, extra, named):
    model_dir, _, _, data, _ = start
    out = tmp_path / "out"
    assert main(sft_args(model_dir, data, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: --book-exact cannot run with {named}"), err
    assert not out.exists()


def test_more_than_one_process_is_refused(start, tmp_path, capsys, monkeypatch):
    model_dir, _, _, data, _ = start
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(sft_args(model_dir, data, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--book-exact" in err and "2 processes" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, named", [
    (dict(drop_rate=0.1), "drop_rate 0.1"),
    (dict(context_length=64), "train example"),  # the book's data has examples of 64+ tokens: they were cut
])
def test_models_the_books_loop_cannot_match_are_refused(start, tmp_path, capsys, change, named):
    _, _, _, data, _ = start
    config = GPT2ScratchConfig.from_preset("gpt2-small", **{**SHAPE, **change})
    model_dir = save_model_dir(GPT2ScratchForCausalLM(config), tmp_path / "model")
    out = tmp_path / "out"
    assert main(sft_args(model_dir, data, out)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: --book-exact") and named in err, err
    assert not out.exists()


def test_the_script_refuses_through_its_entry_point(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "train/sft.py", "--book-exact", "--mixed-precision", "bf16", "--out",
                             str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("error: --book-exact cannot run with --mixed-precision bf16")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
