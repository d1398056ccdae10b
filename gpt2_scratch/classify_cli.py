"""``python -m gpt2_scratch classify --model DIR --text "..."``: label and probability for each text.

DIR is a classifier written by train/classify.py (or any ``save_pretrained`` directory that
``AutoModelForSequenceClassification`` loads). Texts are tokenized with the directory's tokenizer
and truncated to the length the classifier was trained with (``classification_max_length`` in its
config; else the context length) — the book's ``classify_review``. Padding is not needed: the
model reads the last real token, so a batch of one gives the same answer as a padded batch.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def classify_texts(model, tokenizer, texts: list[str]) -> list[tuple[str, float]]:
    """(label, probability) of the most likely class for each text, one forward pass per text."""
    import torch

    config = model.config
    max_length = min(getattr(config, "classification_max_length", None) or config.max_position_embeddings,
                     config.max_position_embeddings)
    results = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer.encode(text)[:max_length]
            if not ids:
                raise ValueError("a --text is empty after tokenization; give some text")
            logits = model(input_ids=torch.tensor([ids])).logits  # (1, num_labels); no padding, no mask needed
            probs = logits.float().softmax(-1)[0]  # (num_labels,)
            best = int(probs.argmax())
            results.append((config.id2label.get(best, str(best)), float(probs[best])))
    return results


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "classify",
        help="classify texts with a finetuned classifier (e.g. spam / ham)",
        description="Print the predicted label and its probability for each --text (or each stdin line with -).",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="classifier directory (train/classify.py output)")
    p.add_argument("--text", action="append", required=True, metavar="TEXT",
                   help="text to classify; repeat for several; '-' reads one text per line from stdin")
    p.set_defaults(func=_run_classify)
    return p


def _run_classify(args: argparse.Namespace) -> int:
    from pathlib import Path

    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import gpt2_scratch  # noqa: F401  (registers our classes with the Auto classes)

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"error: {model_dir}: not a model directory (no config.json); "
                         "pass the output directory of train/classify.py")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    archs = model.config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise SystemExit(f"error: {model_dir} holds a {archs[0] if archs else 'model'} with no trained classification "
                         "head; train one with `accelerate launch train/classify.py --model DIR`")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    texts: list[str] = []
    for text in args.text:
        if text == "-":
            texts.extend(line.rstrip("\n") for line in sys.stdin if line.strip())
        else:
            texts.append(text)
    try:
        results = classify_texts(model, tokenizer, texts)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for text, (label, prob) in zip(texts, results):
        print(f"{label}\t{prob:.4f}" + (f"\t{text}" if len(texts) > 1 else ""))
    return 0
