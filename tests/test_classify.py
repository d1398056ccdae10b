"""Chapter 6 end to end with a tiny random GPT-2 on the real SMS data: what trains, what a run writes,
and that the saved classifier reloads (with and without our package) and predicts the same labels."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO_ROOT, run_python
from hub_standin import HubStandin
from gpt2_scratch.train.classify import build_classifier, set_trainable
from gpt2_scratch.train.spam_data import SpamDataset, prepare_splits


@pytest.fixture(scope="module")
def sms_path(shared_dir):
    return shared_dir / "data" / "SMSSpamCollection.tsv"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, sms_path):
    """A short run exactly as a user starts it: `accelerate launch train/classify.py ... --push-to-hub`,
    pushing to a local stand-in for the Hub. Returns (OUT, stdout, the stand-in's repo folder)."""
    tmp = tmp_path_factory.mktemp("classify")
    out = tmp / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
           str(REPO_ROOT / "train" / "classify.py"), "--model", str(tiny_model_dir), "--data", str(sms_path),
           "--output-dir", str(out), "--max-steps", "6", "--eval-freq", "3", "--eval-iter", "2",
           "--push-to-hub", "bob/gpt2-spam"]
    with HubStandin(tmp / "hub") as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": hub.token,
               "HF_HOME": str(tmp / "hf-home")}
        result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result.stdout, hub.repo_dir("bob/gpt2-spam")


def block_params(E: int) -> int:
    """One transformer block: c_attn (3E·E + 3E), attn c_proj (E·E + E), c_fc (4E·E + 4E),
    mlp c_proj (E·4E + E), ln_1 and ln_2 (2E each) = 12E² + 13E."""
    return 12 * E * E + 13 * E


@pytest.mark.parametrize("spec, n_blocks", [("last-block", 1), ("last-2", 2), ("all", None)])
def test_only_the_intended_parameters_get_gradients(tiny_model_dir, sms_path, spec, n_blocks):
    from gpt2_scratch import get_encoding

    model = build_classifier(str(tiny_model_dir), labels=("ham", "spam"))
    cfg = model.config
    E, L, V, C, n_layers = cfg.emb_dim, 2, cfg.vocab_size, cfg.context_length, cfg.n_layers
    head, ln_f = E * L + L, 2 * E
    n_trainable = set_trainable(model, spec)
    if n_blocks is None:
        expected = V * E + C * E + n_layers * block_params(E) + ln_f + head
        prefixes = ("transformer.", "score.")
    else:
        expected = n_blocks * block_params(E) + ln_f + head
        prefixes = tuple(f"transformer.h.{i}." for i in range(n_layers - n_blocks, n_layers)) + (
            "transformer.ln_f.", "score.")
    assert n_trainable == expected
    if n_blocks is None:
        assert n_trainable == sum(p.numel() for p in model.parameters())

    splits = prepare_splits(sms_path)
    ds = SpamDataset(splits.train.head(8), get_encoding().encode_ordinary, splits.label2id)
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    model(**batch).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    assert sum(p.numel() for n, p in model.named_parameters() if n in with_grad) == expected
    assert all(p.requires_grad == (n in with_grad) for n, p in model.named_parameters())


def test_bad_trainable_spec(tiny_model_dir):
    from gpt2_scratch.core.errors import InputError

    model = build_classifier(str(tiny_model_dir), labels=("ham", "spam"))
    for spec in ("last-3", "first-block", "last-0"):
        with pytest.raises(InputError, match="--trainable"):
            set_trainable(model, spec)


def test_a_short_run_writes_model_metrics_and_plots(trained_run):
    out, stdout, _ = trained_run
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modeling_gpt2_scratch.py", "args.json",
                 "metrics.jsonl", "loss.png", "accuracy.png"):
        assert (out / name).is_file(), name
    for plot in ("loss.png", "accuracy.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2ScratchForSequenceClassification"]
    assert config["id2label"] == {"0": "ham", "1": "spam"} and config["label2id"] == {"ham": 0, "spam": 1}
    assert config["classification_max_length"] == 120
    assert "AutoModelForSequenceClassification" in config["auto_map"]
    args = json.loads((out / "args.json").read_text())
    assert args["trainable"] == "last-block" and args["lr"] == 5e-5 and args["weight_decay"] == 0.1

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "val_loss" in r and r.get("split") != "full"]
    assert [r["step"] for r in losses] == [1, 4, 6]  # every --eval-freq 3 steps from the first, and the last
    # --max-steps 6 ends the run inside its first epoch: no per-epoch estimate (as for SFT's epoch sample), but
    # the full-split accuracies at the end.
    assert not [r for r in rows if "test_accuracy" in r and r.get("split") != "full"]
    full, timing = rows[-2], rows[-1]
    assert full["split"] == "full" and 0 <= full["test_accuracy"] <= 1
    assert {"train_accuracy", "val_accuracy", "train_loss"} <= set(full)
    # Where the run's time went, by phase (the loop's; the same row for every training command).
    assert timing["timing"] and timing["seconds_train_steps"] > 0 and timing["seconds_evaluation"] > 0
    assert "where the time went: startup" in stdout
    assert "1045 train" in stdout and "149 val" in stdout and "300 test" in stdout and "padded to 120" in stdout


def _predict(model, ds, batch_size=8):
    preds = []
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            batch = torch.utils.data.default_collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            preds += logits.argmax(-1).tolist()
    return preds


def test_the_saved_classifier_reloads_and_predicts_the_same(trained_run, sms_path, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from gpt2_scratch import get_encoding

    out, _, _ = trained_run
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(model).__name__ == "GPT2ScratchForSequenceClassification"
    splits = prepare_splits(sms_path)
    test = SpamDataset(splits.test, get_encoding().encode_ordinary, splits.label2id, max_length=120)
    preds = _predict(model, test)
    # The run's own full-split test accuracy was computed from the model before saving.
    (final,) = [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if row.get("split") == "full"]
    assert sum(p == y for p, y in zip(preds, test.labels.tolist())) / len(test) == final["test_accuracy"]

    # Without our package (the code shipped in the directory), label by label on the first 40 messages.
    texts = list(splits.test["Text"][:40])
    code = f"""
        import json, torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        model = AutoModelForSequenceClassification.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
        labels = []
        with torch.no_grad():
            for text in json.loads({json.dumps(json.dumps(texts))}):
                ids = torch.tensor([tok.encode(text)[:120]])
                labels.append(model.config.id2label[int(model(input_ids=ids).logits.argmax(-1))])
        print(json.dumps(labels))
    """
    remote = json.loads(run_python(code, cwd=tmp_path, block_project=True).stdout.splitlines()[-1])
    assert remote == [model.config.id2label[p] for p in preds[:40]]

    # The CLI (its parser and output, in this process): label and probability per text, the same labels.
    from gpt2_scratch.core.cli import main

    # `classify --text` predicts, as `python -m gpt2_scratch classify --text ...` always has (= `predict`).
    capsys.readouterr()
    assert main(["classify", "--model", str(out), *sum((["--text", t] for t in texts[:3]), [])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == remote[:3]
    assert all(0.5 <= float(line.split("\t")[1]) <= 1.0 for line in lines)


def test_push_to_hub_uploads_the_classifier_and_its_card(trained_run):
    out, _, pushed = trained_run
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modeling_gpt2_scratch.py"):
        assert (pushed / name).read_bytes() == (out / name).read_bytes(), name
    assert (pushed / "accuracy.png").read_bytes() == (out / "accuracy.png").read_bytes()
    card = (pushed / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n", 2)[1])
    assert meta["pipeline_tag"] == "text-classification"
    assert meta["datasets"] == ["ucirvine/sms_spam"]
    assert "base_model" not in meta  # --model was a local folder: no Hub id to name
    assert "test accuracy" in card and "](accuracy.png)" in card and "](loss.png)" in card
    assert "AutoModelForSequenceClassification" in card and "trust_remote_code=True" in card


def test_the_run_makes_a_classifier_model_card(trained_run):
    from gpt2_scratch.train.publish import build_model_card, find_run_info

    out, _, _ = trained_run
    card = str(build_model_card(out, "bob/gpt2-spam", find_run_info(out), base_model="gpt2-small"))
    meta = yaml.safe_load(card.split("---\n", 2)[1])
    assert meta["pipeline_tag"] == "text-classification"
    assert meta["base_model"] == "openai-community/gpt2"
    assert meta["datasets"] == ["ucirvine/sms_spam"]
    assert "test accuracy" in card and "](accuracy.png)" in card and "](loss.png)" in card
    assert "AutoModelForSequenceClassification" in card and "trust_remote_code=True" in card


@pytest.mark.slow
def test_pad_to_context_and_all_trainable_with_data_from_a_url(tmp_path, tiny_model_dir, sms_path):
    """Exercise 6.1 (pad to the model's context) with every parameter trained (exercise 6.2), bf16, and
    the data fetched from a URL serving the UCI zip (a local server)."""
    import http.server
    import threading
    import zipfile

    (tmp_path / "www").mkdir()
    with zipfile.ZipFile(tmp_path / "www" / "sms+spam+collection.zip", "w") as zf:
        zf.write(sms_path, "SMSSpamCollection")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www"))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/sms+spam+collection.zip"
    out = tmp_path / "run"
    try:
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / "train" / "classify.py"), "--model", str(tiny_model_dir), "--data",
             url, "--out", str(out), "--max-steps", "3",
             "--eval-freq", "2", "--eval-iter", "1", "--pad-to-context", "--trainable", "all",
             "--mixed-precision", "bf16"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
            env={**os.environ, "GPT2_SCRATCH_CACHE": str(tmp_path / "cache")})
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "cache" / "sms_spam" / "SMSSpamCollection.tsv").read_bytes() == sms_path.read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["classification_max_length"] == config["context_length"] == 128
    assert "3,324,866 trainable (all)" in result.stdout and "padded to 128 tokens" in result.stdout


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """An untrained two-class classifier folder with a 128-token context (quick: no training run)."""
    from conftest import TINY

    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForSequenceClassification, save_model_dir

    torch.manual_seed(0)
    model = GPT2ScratchForSequenceClassification(GPT2ScratchConfig.from_preset("gpt2-small", **TINY, num_labels=2))
    return save_model_dir(model, tmp_path_factory.mktemp("clf") / "clf")


def test_predict_reads_crlf_lines_as_the_texts_themselves(tiny_classifier, monkeypatch, capsys):
    """A file saved on Windows: each line's \r is no part of its text, so the labels are those of --text."""
    import io

    from gpt2_scratch.core.cli import main

    capsys.readouterr()
    assert main(["predict", "--model", str(tiny_classifier), "--text", "win a free prize", "--text", "hello"]) == 0
    from_argv = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("win a free prize\r\nhello\r\n"))
    assert main(["predict", "--model", str(tiny_classifier), "--text", "-"]) == 0
    assert capsys.readouterr().out == from_argv and "\r" not in from_argv


def test_predict_crops_a_long_text_with_one_note_and_no_transformers_warning(tiny_classifier, monkeypatch, capsys):
    """transformers warns of "indexing errors" past the tokenizer's model_max_length; predict crops the text to
    the classifier's context itself and says so once, and the folder's tokenizer states that context."""
    import io
    import logging

    from gpt2_scratch.core.cli import main

    config = json.loads((tiny_classifier / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 128  # the classifier's context, not GPT-2's 1024
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)  # transformers' loggers do not propagate to caplog
    try:
        capsys.readouterr()
        monkeypatch.setattr(sys, "stdin", io.StringIO("word " * 5000 + "\n"))
        assert main(["predict", "--model", str(tiny_classifier), "--text", "-"]) == 0
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert [w for w in warnings if "sequence length" in w] == []
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["[text 1 cropped to its first 128 of 5001 tokens, the length the classifier was trained with]"]
