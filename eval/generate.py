"""Add the model's response to every instruction record (chapter 7's test-set responses, batched).

    python eval/generate.py --model DIR --data FILE --out FILE [--batch-size 8] [--max-new-tokens 256]
        [--split all|train|test|val] [--response-key model_response] [--style alpaca|phi3]

Writes the records (of ``--split``: the book's 85/10/5 cut, test = records [935:1045] of the 1100)
with ``model_response`` added, in the book's ``instruction-data-with-response.json`` format.
Responses come from ``gpt2_scratch.generate_responses``: the book's prompt and response extraction,
greedy, stopping at <|endoftext|>, but batched with left padding and the KV cache.

Resumable: records are generated ``--save-every`` at a time, and each finished group is appended to
``OUT.partial.jsonl`` (flushed and fsync-ed). Rerunning the same command after a crash or Ctrl-C
skips what that file holds; entries are keyed by the record, the model and the generation settings,
so changing any of those regenerates. ``OUT`` itself is written atomically at the end, then the
partial file is removed.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as `python eval/generate.py`: import our package from the repo root
    import sys
    from pathlib import Path as _Path

    _here = _Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if _Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

if __name__ == "__main__":
    # Before torch is imported: re-run with the training scripts' caching malloc (train/allocator.py);
    # batched generation at gpt2-small, batch 16, fp32 made 176-182 tok/s with it, 148-151 without.
    from train.allocator import use_caching_allocator_or_exit

    use_caching_allocator_or_exit()

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

from tqdm.auto import tqdm

from eval.atomic import write_json_atomic
from eval.judge_cache import JudgeCache, cache_key

log = logging.getLogger(__name__)

RECORD_KEYS = ("instruction", "input", "output")


class GenerateError(Exception):
    """A one-line, actionable reason the run cannot go on."""


def book_split(records: list, split: str) -> list:
    """The book's split (ch. 7): first 85% train, next 10% test, last 5% validation, no shuffling."""
    n_train, n_test = int(len(records) * 0.85), int(len(records) * 0.1)
    return {
        "all": records,
        "train": records[:n_train],
        "test": records[n_train:n_train + n_test],
        "val": records[n_train + n_test:],
    }[split]


def load_records(path: str | Path) -> list[dict]:
    """Instruction records from a JSON list; one-line errors name the file and record index."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise GenerateError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise GenerateError(f"{path} is not UTF-8 text; pass a JSON list of records") from None
    except json.JSONDecodeError as e:
        raise GenerateError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, list):
        raise GenerateError(f"{path} must hold a JSON list of records, found a {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise GenerateError(f"{path}: record {i} is a {type(rec).__name__}, not an object")
        for k in RECORD_KEYS:
            if k not in rec:
                raise GenerateError(f"{path}: record {i} has no {k!r} key; every record needs "
                                    f"instruction, input and output (input may be \"\")")
            if not isinstance(rec[k], str):
                raise GenerateError(f"{path}: record {i}: {k!r} is {type(rec[k]).__name__}, expected a string")
    return data


def model_fingerprint(model_dir: Path) -> str:
    """Identifies the weights cheaply: config.json's text and each weight file's size and mtime."""
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def load_model(model_dir: Path):
    """Our model (or any causal LM transformers loads) and its tokenizer, in eval mode."""
    import gpt2_scratch  # noqa: F401  registers the gpt2-scratch Auto classes
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise GenerateError(f"{model_dir} is not a model directory (no config.json); make one with "
                            f"`python -m gpt2_scratch init --preset gpt2-small --out DIR` or finetune one")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    except (OSError, ValueError) as e:
        raise GenerateError(f"cannot load the model in {model_dir}: {str(e).splitlines()[0]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        log.info("%s has no tokenizer files; using the GPT-2 tokenizer", model_dir)
        tokenizer = gpt2_scratch.get_tokenizer()
    return model, tokenizer


def generate_file(model, tokenizer, records: list[dict], out: Path, *, fingerprint: str,
                  response_key: str = "model_response", batch_size: int = 8, max_new_tokens: int = 256,
                  style: str = "alpaca", save_every: int = 64, progress: bool = True) -> list[dict]:
    """Add ``response_key`` to copies of ``records``, resuming from ``out``.partial.jsonl; write ``out``."""
    from gpt2_scratch import generate_responses

    partial = JudgeCache(out.with_name(out.name + ".partial.jsonl"))
    settings = {"model": fingerprint, "max_new_tokens": max_new_tokens, "style": style}
    keys = [cache_key({**settings, **{k: r[k] for k in RECORD_KEYS}}) for r in records]
    done = {k: e["response"] for k, e in partial.load().items()}
    todo = [i for i, k in enumerate(keys) if k not in done]
    if done and len(todo) < len(records):
        print(f"Resuming: {len(records) - len(todo)} of {len(records)} responses found in {partial.path}")
    bar = tqdm(total=len(records), initial=len(records) - len(todo), desc="responses", unit="record",
               disable=not progress)
    for start in range(0, len(todo), save_every):
        group = todo[start:start + save_every]
        responses = generate_responses(model, tokenizer, [records[i] for i in group], batch_size=batch_size,
                                       max_new_tokens=max_new_tokens, style=style, progress=False)
        for i, text in zip(group, responses):
            partial.append({"key": keys[i], "index": i, "response": text})
            done[keys[i]] = text
        bar.update(len(group))
    bar.close()
    result = [{**rec, response_key: done[k]} for rec, k in zip(records, keys)]
    write_json_atomic(out, result)
    partial.path.unlink(missing_ok=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python eval/generate.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory (ours, or any causal LM transformers loads)")
    p.add_argument("--data", required=True, help="JSON list of records with instruction, input, output")
    p.add_argument("--out", required=True, help="JSON file to write (records + response key)")
    p.add_argument("--split", choices=["all", "train", "test", "val"], default="all",
                   help="the book's 85/10/5 split of --data (test = [935:1045] of 1100); default all")
    p.add_argument("--limit", type=int, default=None, help="only the first N records (after --split)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per response at most (default: 256)")
    p.add_argument("--style", choices=["alpaca", "phi3"], default="alpaca", help="prompt format (default: alpaca)")
    p.add_argument("--response-key", default="model_response", help="key to add (default: model_response)")
    p.add_argument("--save-every", type=int, default=64, help="records per checkpoint to OUT.partial.jsonl")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.batch_size < 1 or args.max_new_tokens < 1 or args.save_every < 1:
            raise GenerateError("--batch-size, --max-new-tokens and --save-every must be positive")
        records = book_split(load_records(args.data), args.split)[: args.limit]
        model_dir = Path(args.model)
        if not model_dir.is_dir():
            raise GenerateError(f"model directory {model_dir} does not exist; make one with "
                                f"`python -m gpt2_scratch init --preset gpt2-small --out {model_dir}`")
        model, tokenizer = load_model(model_dir)
        context = model.config.max_position_embeddings
        if args.max_new_tokens >= context:
            raise GenerateError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the "
                                f"{context}-token context of {model_dir}")
        out = Path(args.out)
        print(f"Generating {len(records)} responses ({args.split}) with {model_dir}: batch {args.batch_size}, "
              f"up to {args.max_new_tokens} new tokens, greedy")
        generate_file(model, tokenizer, records, out, fingerprint=model_fingerprint(model_dir),
                      response_key=args.response_key, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, style=args.style, save_every=args.save_every,
                      progress=not args.quiet)
    except GenerateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; finished groups are saved: rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"Wrote {out} ({len(records)} records with {args.response_key!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
