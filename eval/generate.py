"""Add the model's response to every instruction record (chapter 7's test-set responses, batched).

    python eval/generate.py --model DIR --data FILE --out FILE [--batch-size 8] [--max-new-tokens 256]
        [--split all|train|test|validation] [--response-key model_response] [--prompt-style alpaca|phi3|chat]
    gpt2-scratch respond ...                       (the same command)

Writes the records (of ``--split``: the book's 85/10/5 cut, test = records [935:1045] of the 1100)
with ``model_response`` added, in the book's ``instruction-data-with-response.json`` format. The records may be
in any format core/conversations.py reads; a conversation is answered after its last user turn (the chat style
prompts with the whole conversation before it).
Responses come from ``gpt2_scratch.generate_responses``: the book's prompt and response extraction,
greedy, stopping at <|endoftext|>, but batched with left padding and the KV cache.

Resumable: records are generated ``--save-every`` at a time, and each finished group is appended to
``OUT.partial.jsonl`` (synced). Rerunning the same command after a crash or Ctrl-C skips what that
file holds; entries are keyed by the record, the model and the generation settings, so changing any
of those regenerates. ``OUT`` itself is written atomically at the end, then the partial file is removed.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python eval/generate.py ARGS` is `gpt2-scratch respond ARGS`
    from gpt2_scratch.core.cli import run_script

    run_script("respond")

import hashlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from gpt2_scratch.core.args import arg, check_values
from gpt2_scratch.core.errors import EXIT_INTERRUPTED, InputError
from gpt2_scratch.core.files import (JsonlFile, check_output_file, claimed_output, content_key, source_identity,
                                     write_json_atomic)
from gpt2_scratch.core.conversations import check_style, load_conversations
from gpt2_scratch.core.records import record_input, select_split

log = logging.getLogger(__name__)


@dataclass
class RespondArgs:
    """Add a model's greedy response to every instruction record (resumable, batched, KV cache)."""

    model: str = arg(help="model folder (or preset / Hub repo id) to generate with")
    data: str = arg(help="instruction records: .json/.jsonl file, URL or Hub data set id")
    out: str = arg(help="JSON file to write (the records with the response key added)")
    split: Literal["all", "train", "test", "validation", "val"] = arg(
        "all", "the book's 85/10/5 split of --data (test = [935:1045] of 1100)")
    limit: int | None = arg(None, "only the first N records (after --split)", at_least=0)
    batch_size: int = arg(8, "prompts per forward pass", at_least=1)
    max_new_tokens: int | None = arg(None, "tokens per response at most (default 256, or half the model's context "
                                           "when that is less)", at_least=1)
    prompt_style: Literal["alpaca", "phi3", "chat"] | None = arg(
        None, "prompt format (default: the one the model was trained with, else alpaca)", aliases=("--style",))
    response_key: str = arg("model_response", "key to add to each record")
    save_every: int = arg(64, "records per checkpoint to OUT.partial.jsonl", at_least=1)
    overwrite: bool = arg(False, "replace an existing --out file that is not an earlier output of respond")
    quiet: bool = arg(False, "no progress bar", aliases=("-q",))


def model_fingerprint(model_dir: Path) -> str:
    """Identifies the weights cheaply: config.json's text and each weight file's size and mtime."""
    h = hashlib.sha256()
    if not model_dir.is_dir():  # a preset or Hub id: its name is its identity
        h.update(str(model_dir).encode())
        return h.hexdigest()
    for f in sorted(model_dir.iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def generate_file(model, tokenizer, records: list[dict], out: Path, *, fingerprint: str,
                  response_key: str = "model_response", batch_size: int = 8, max_new_tokens: int = 256,
                  style: str = "alpaca", save_every: int = 64, progress: bool = True) -> list[dict]:
    """Add ``response_key`` to copies of ``records``, resuming from ``out``.partial.jsonl; write ``out``."""
    from gpt2_scratch import generate_responses

    partial = JsonlFile(out.with_name(out.name + ".partial.jsonl"))
    settings = {"model": fingerprint, "max_new_tokens": max_new_tokens, "style": style}
    keys = [content_key({**settings, "instruction": r["instruction"], "input": record_input(r),
                       "output": r.get("output"), **({"messages": r["messages"]} if "messages" in r else {})})
            for r in records]
    done = {e["key"]: e["response"] for e in partial.read() if isinstance(e.get("response"), str) and "key" in e}
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


def run(args: RespondArgs) -> int:
    check_values(args)  # the command line's one check of option values (also for callers from Python)
    # Pre-flight: the output is writable and replaces neither the data nor the model; the data parses.
    out = check_output_file(args.out, inputs=[("--data", args.data), ("--model", args.model)])
    if not args.response_key.strip() or args.response_key in ("instruction", "input", "output"):
        # the record's own fields: a response written there replaces the prompt or the reference answer
        raise InputError(f"--response-key {args.response_key!r}: "
                         + ("an empty key" if not args.response_key.strip() else "a field of the records themselves")
                         + "; choose another key (the default is model_response)")
    records = select_split(load_conversations(args.data, required=("instruction",), answered=False),
                           args.split)[: args.limit]
    fingerprint = model_fingerprint(Path(args.model))
    # What the output is of: a rerun of the same command (another --limit or --split too) rewrites it; another
    # model's responses or responses to other data are never replaced without --overwrite (claimed_output).
    owner = {"by": f"respond --model {args.model} --data {args.data}", "model": fingerprint,
             "data": source_identity(args.data), "response_key": args.response_key}
    with claimed_output(out, owner=owner, overwrite=args.overwrite, what="respond") as claim:
        return _respond(args, claim, records, fingerprint)


def _respond(args: RespondArgs, claim, records: list[dict], fingerprint: str) -> int:
    """Load the model and write the responses (``run``'s work, once the output is claimed)."""
    from gpt2_scratch.commands import new_token_budget
    from gpt2_scratch.convert.resolve import load_model, load_tokenizer

    out = claim.path
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    style = args.prompt_style or getattr(model.config, "prompt_style", None) or "alpaca"
    check_style(records, style, args.data)  # a conversation of several exchanges needs the chat style
    max_new_tokens = new_token_budget(args.max_new_tokens, 256, model.config.max_position_embeddings, args.model)
    print(f"Generating {len(records)} responses ({args.split}) with {args.model}: batch {args.batch_size}, "
          f"up to {max_new_tokens} new tokens, greedy, {style} prompts")
    try:
        generate_file(model, tokenizer, records, out, fingerprint=fingerprint,
                      response_key=args.response_key, batch_size=args.batch_size,
                      max_new_tokens=max_new_tokens, style=style, save_every=args.save_every,
                      progress=not args.quiet)
    except KeyboardInterrupt:
        print("\ninterrupted; finished groups are saved: rerun the same command to resume", file=sys.stderr,
              flush=True)
        return EXIT_INTERRUPTED
    claim.written()
    print(f"Wrote {out} ({len(records)} records with {args.response_key!r})")
    return 0
