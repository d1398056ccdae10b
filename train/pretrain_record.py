"""``pretraining.json``: what a pretrained model read, written by train/pretrain.py at the top of OUT and read
back for its model card (train/publish.py), so the card says the tokens and the corpus's fingerprint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gpt2_scratch.core.files import write_json_atomic

logger = logging.getLogger(__name__)

PRETRAINING_FILE = "pretraining.json"


def write_record(out: Path, record: dict) -> None:
    """``record`` (data, tokenizer, windows, each part's fingerprint and tokens, tokens seen) as OUT/pretraining.json."""
    write_json_atomic(out / PRETRAINING_FILE, record)


def card_lines(model_dir: Path) -> list[str]:
    """The model card's lines on what a pretrained model read (none for a folder without pretraining.json):
    tokens, the corpus's fingerprint, and that it continues text rather than following instructions."""
    path = model_dir / PRETRAINING_FILE
    if not path.is_file():
        return []
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        train, val = info["train"], info["validation"]
        data = Path(info["data"]).name if Path(info["data"]).is_absolute() else info["data"]  # no local paths
        return ["", f"Pretrained on raw text: {train['tokens']:,} training tokens of `{data}` (corpus fingerprint "
                f"`{train['fingerprint'][:16]}`, {info['tokenizer']}), in windows of {info['context_length']} tokens "
                f"every {info['stride']}; {info['tokens_seen']:,} tokens seen in {info['steps']:,} steps; validated "
                f"on {val['tokens']:,} held-out tokens (fingerprint `{val['fingerprint'][:16]}`). It continues "
                "text: it has no instruction template."]
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring unreadable %s: %s", path, err)
        return []
