"""The book's saved models ↔ ours: `python -m convert book` and `python -m convert export-book`.

The book's side is tests/book_reference.py (its GPTModel rewritten from the chapter's description):
converted models give its logits, exported state dicts load into it strictly and exactly, for tied
and untied heads, with and without qkv biases, chapter 5's checkpoint wrapper and chapter 6's
classifier. A .pth that is more than tensors is refused without running anything.
"""

from __future__ import annotations

import ast
import copy
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, run_cli

from gpt2_scratch.convert.book import export_book, infer_dims, load_book_checkpoint
from conftest import convert_main
from gpt2_scratch.convert.errors import ConvertError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from book_reference import BookGPT, generate_greedy, make_classifier, perturbed  # noqa: E402

CFG = dict(vocab_size=50257, context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)
IDS = torch.tensor([[464, 3290, 373, 1043, 287, 257, 2214, 1474, 13, 50256, 11, 0],
                    [15496, 995, 11, 314, 716, 257, 3290, 13, 50256, 50256, 1, 2]])
ATOL = 1e-5


def book_model(seed: int = 0, *, tied: bool = False, **overrides) -> BookGPT:
    """A book model with every tensor non-trivial; `tied` makes out_head a copy of tok_emb, as right
    after the book loads OpenAI's weights."""
    torch.manual_seed(seed)
    model = perturbed(BookGPT({**CFG, **overrides}), seed=seed).eval()
    if tied:
        with torch.no_grad():
            model.out_head.weight.copy_(model.tok_emb.weight)
    return model


def convert(pth: Path, out: Path, *extra: str, capsys=None) -> str:
    assert convert_main(["book", "--pth", str(pth), "--out", str(out), *extra]) == 0
    return capsys.readouterr().out if capsys else ""


def export(model_dir: Path, pth: Path, capsys) -> dict:
    """`export-book`; returns the cfg it printed (the line `cfg = {...}`)."""
    assert convert_main(["export-book", "--model", str(model_dir), "--out", str(pth)]) == 0
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("cfg = ")]
    return ast.literal_eval(line[len("cfg = "):])


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def assert_same_logits(ours, ref, pick=lambda logits: logits) -> None:
    """Equal in float32 within 1e-5 (plus float32's own rounding, 1e-6 relative: a tied head's logits
    reach ~55 here, where 4 ulp are 1.5e-5), and in float64 within 1e-12: the same function."""
    torch.testing.assert_close(logits(ours), pick(logits(ref)), atol=ATOL, rtol=1e-6)
    ours64, ref64 = copy.deepcopy(ours).double(), copy.deepcopy(ref).double()
    torch.testing.assert_close(logits(ours64), pick(logits(ref64)), atol=1e-12, rtol=0)


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)  # the book's names, in its order
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["qkv-bias", "no-qkv-bias"])
def test_book_to_ours_to_book_is_exact(tmp_path, capsys, tied, qkv_bias):
    from gpt2_scratch import GPT2ScratchForCausalLM

    ref = book_model(tied=tied, qkv_bias=qkv_bias)
    torch.save(ref.state_dict(), tmp_path / "model.pth")
    convert(tmp_path / "model.pth", tmp_path / "ours", "--n-heads", "4")
    ours = GPT2ScratchForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert ours.config.tie_word_embeddings is tied and ours.config.qkv_bias is qkv_bias
    assert (ours.lm_head.weight.data_ptr() == ours.transformer.wte.weight.data_ptr()) is tied
    assert_same_logits(ours, ref)

    cfg = export(tmp_path / "ours", tmp_path / "back.pth", capsys)
    assert cfg == {**CFG, "qkv_bias": qkv_bias}
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert_same_state(back, ref.state_dict())  # masks included, out_head its own copy when tied
    again = BookGPT(cfg)
    again.load_state_dict(back, strict=True)
    assert torch.equal(logits(again.eval()), logits(ref))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_chapter5_wrapper_with_optimizer_state(tmp_path):
    ref = book_model(seed=1)
    optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    ref.train()
    torch.nn.functional.cross_entropy(ref(IDS).flatten(0, 1), IDS.roll(-1, 1).flatten()).backward()
    optimizer.step()
    ref.eval()
    torch.save({"model_state_dict": ref.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
               tmp_path / "model_and_optimizer.pth")
    ours = load_book_checkpoint(tmp_path / "model_and_optimizer.pth", n_heads=4)
    assert_same_logits(ours, ref)


def test_chapter6_classifier(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(2)
    ref = perturbed(make_classifier(BookGPT(CFG), num_classes=2), seed=2).eval()
    torch.save(ref.state_dict(), tmp_path / "review_classifier.pth")
    out = convert(tmp_path / "review_classifier.pth", tmp_path / "ours", "--n-heads", "4", capsys=capsys)
    assert "sequence classifier (ham, spam)" in out
    ours = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert type(ours).__name__ == "GPT2ScratchForSequenceClassification"
    assert ours.config.id2label == {0: "ham", 1: "spam"}
    # The book reads the classifier's logits at the last position.
    assert_same_logits(ours, ref, pick=lambda logits: logits[:, -1, :])

    export(tmp_path / "ours", tmp_path / "back.pth", capsys)
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert_same_state(back, ref.state_dict())
    again = make_classifier(BookGPT(CFG), num_classes=2)
    again.load_state_dict(back, strict=True)


class RunsCode:
    """Pickles as a call of os.system: what a booby-trapped .pth would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pth_holding_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    state = book_model().state_dict()
    torch.save({**state, "trf_blocks.0.att.extra": RunsCode(marker)}, tmp_path / "trapped.pth")
    result = run_cli("-m", "convert", "book", "--pth", str(tmp_path / "trapped.pth"), "--out", str(tmp_path / "out"),
                     cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "trapped.pth") in lines[0], result.stderr
    assert "refused to unpickle 'posix.system'" in lines[0] or "refused to unpickle 'os.system'" in lines[0], lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_whole_pickled_module_is_refused(tmp_path):
    torch.save(book_model(), tmp_path / "whole-model.pth")  # torch.save(model): a pickled class, not a state dict
    with pytest.raises(ConvertError, match=r"whole-model\.pth: refused to unpickle 'book_reference\.BookGPT'"):
        load_book_checkpoint(tmp_path / "whole-model.pth", n_heads=4)


def _attempt(tmp_path: Path, name: str, state, **kw) -> str:
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    with pytest.raises(ConvertError) as e:
        load_book_checkpoint(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_bad_book_files_name_file_and_tensor(tmp_path):
    state = book_model().state_dict()
    msg = _attempt(tmp_path, "missing", {k: v for k, v in state.items() if k != "trf_blocks.1.ff.layers.2.bias"},
                   n_heads=4)
    assert "missing tensor 'trf_blocks.1.ff.layers.2.bias' with shape [64]" in msg
    msg = _attempt(tmp_path, "unexpected", {**state, "trf_blocks.0.att.q_norm.weight": torch.ones(64)}, n_heads=4)
    assert "unknown tensor 'trf_blocks.0.att.q_norm.weight'" in msg
    msg = _attempt(tmp_path, "shape", {**state, "trf_blocks.0.att.W_key.weight": torch.ones(64, 65)}, n_heads=4)
    assert "tensor 'trf_blocks.0.att.W_key.weight' has shape [64, 65]" in msg and "implies [64, 64]" in msg
    msg = _attempt(tmp_path, "heads", state)
    assert "emb_dim=64 is not one of GPT-2's released sizes" in msg and "--n-heads" in msg
    msg = _attempt(tmp_path, "indivisible", state, n_heads=5)
    assert "not divisible by n_heads 5" in msg
    msg = _attempt(tmp_path, "mask", {**state, "trf_blocks.1.att.mask": torch.zeros(64, 64)}, n_heads=4)
    assert "tensor 'trf_blocks.1.att.mask' is not the causal mask" in msg
    msg = _attempt(tmp_path, "mask-shape", {**state, "trf_blocks.1.att.mask": torch.ones(8, 8).triu(1)}, n_heads=4)
    assert "tensor 'trf_blocks.1.att.mask' has shape [8, 8]" in msg
    msg = _attempt(tmp_path, "hf", {"transformer.wte.weight": torch.zeros(4, 4)})
    assert "not a state dict of the book's GPTModel" in msg and "convert hf" in msg
    msg = _attempt(tmp_path, "not-tensors", {"model_state_dict": {**state, "epoch": 3}})
    assert "['model_state_dict']: entry 'epoch' is a int, not a tensor" in msg
    msg = _attempt(tmp_path, "list", [1, 2, 3])
    assert "holds a list, not a state dict" in msg
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file at all")
    with pytest.raises(ConvertError, match=r"garbage\.pth: not a readable PyTorch file \(UnpicklingError: Unsupported operand"):
        load_book_checkpoint(tmp_path / "garbage.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ConvertError, match=r"empty\.pth: empty or truncated"):
        load_book_checkpoint(tmp_path / "empty.pth")


def test_the_head_count_follows_gpt2s_released_widths():
    def shapes(width):
        return {"tok_emb.weight": (50257, width), "pos_emb.weight": (1024, width), "trf_blocks.0.norm1.scale": (width,),
                "trf_blocks.23.norm1.scale": (width,)}

    assert [infer_dims(shapes(w), "x.pth").n_head for w in (768, 1024, 1280, 1600)] == [12, 16, 20, 25]
    dims = infer_dims(shapes(1024), "x.pth")
    assert (dims.n_vocab, dims.n_ctx, dims.n_embd, dims.n_layer) == (50257, 1024, 1024, 24)
    assert infer_dims(shapes(1024), "x.pth", n_heads=8).n_head == 8


def test_converted_untied_model_generates_what_the_book_generates(tmp_path):
    """Greedy decoding: ours (KV cache, transformers' generate) vs the book's plain loop."""
    ref = book_model(seed=5)
    torch.save(ref.state_dict(), tmp_path / "m.pth")
    ours = load_book_checkpoint(tmp_path / "m.pth", n_heads=4)
    assert ours.config.tie_word_embeddings is False
    prompt = IDS[:1, :8]
    expected = generate_greedy(ref, prompt, 30, context_size=CFG["context_length"])
    with torch.no_grad():
        got = ours.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None,
                            attention_mask=torch.ones_like(prompt))
    assert got.tolist() == expected.tolist()


def test_cli_prints_what_happened_and_refuses_to_overwrite(tmp_path, capsys):
    torch.save(book_model().state_dict(), tmp_path / "m.pth")
    assert "kept untied" in convert(tmp_path / "m.pth", tmp_path / "ours", "--n-heads", "4", capsys=capsys)
    assert convert_main(["export-book", "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "b.pth")]) == 0
    out = capsys.readouterr().out
    assert "cfg = {'vocab_size': 50257" in out and "model.load_state_dict(torch.load(" in out
    before = (tmp_path / "b.pth").read_bytes()
    assert convert_main(["export-book", "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "b.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "b.pth: already exists" in err and "--overwrite" in err
    assert (tmp_path / "b.pth").read_bytes() == before
    assert convert_main(["book", "--pth", str(tmp_path / "m.pth"), "--out", str(tmp_path / "ours")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_export_book_refuses_a_folder_that_is_not_ours(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_positions=16, n_embd=8, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "hf")
    with pytest.raises(ConvertError, match=r"hf/config.json: model_type 'gpt2' is not gpt2-scratch"):
        export_book(tmp_path / "hf", tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()
