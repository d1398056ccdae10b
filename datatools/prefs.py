"""Preference pairs for DPO by asking a local model to rewrite each answer (the book's notebook).

    gpt2-scratch data prefs --data instruction-data.json --model llama3 [--out prefs.json] [--seed 123]

As the book's ``ch07/04_preference-tuning-with-dpo/create-preference-data-ollama.ipynb``: for each
record, "polite" or "impolite" is picked at random (here seeded, ``--seed``: the same records get the
same picks on every run and with any number of workers), the server is asked once, in the notebook's
words, to rewrite the record's ``output`` slightly to be more so, and the record gets ``chosen`` and
``rejected``: the polite rewrite is chosen over the original; the original is chosen over an impolite
rewrite. The output is the input records with those two keys added, which ``gpt2-scratch dpo`` trains on.

The requests use the book's options (seed 123, temperature 0, a 2048-token context) through the one
client of model servers (``core.llm_client``): retries, bounded replies, workers, and every answer
appended to a cache as it arrives, so a run stopped by Ctrl-C, SIGTERM or a crash is resumed by the
same command without asking again for what is done. A record whose request fails, or whose reply is
empty, is left out of the output and reported; it never fails the file.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from gpt2_scratch.core.args import arg, redefault
from gpt2_scratch.core.errors import InputError
from gpt2_scratch.core.files import check_output_file, claimed_output, write_json_atomic
from gpt2_scratch.core.llm_work import AnswerCache, Question, ServerOptions, ask_all, cache_key, connect
from gpt2_scratch.core.process import terminate_as_interrupt
from gpt2_scratch.core.prompts import format_input
from gpt2_scratch.core.records import load_records
from gpt2_scratch.datatools.common import check_new_output, interrupted, report_failures

PROMPT_VERSION = "book-ch07-dpo-v1"  # part of every cache key: change it when the prompt changes
STYLES = ("polite", "impolite")


def rewrite_prompt(record: dict, politeness: str) -> str:
    """The notebook's prompt, word for word (its missing spaces after the periods and its "return return"
    included: the model's rewrites, and so the cache, depend on the exact text)."""
    return (f"Given the input `{format_input(record)}` "
            f"and correct output `{record['output']}`, "
            f"slightly rewrite the output to be more {politeness}."
            "Keep the modification minimal."
            "Only return return the generated response and nothing else.")


def pick_styles(n: int, seed: int) -> list[str]:
    """The notebook's ``random.choice(["polite", "impolite"])`` per record, from a generator seeded once."""
    rng = random.Random(seed)
    return [rng.choice(STYLES) for _ in range(n)]


def parse_rewrite(reply: str) -> str | None:
    """The rewrite, or None for an empty reply (asked again, then the record fails)."""
    return reply.strip() or None


def preference_record(record: dict, politeness: str, rewrite: str) -> dict:
    """The record with the notebook's ``chosen``/``rejected``: polite rewrite > original > impolite rewrite."""
    if politeness == "polite":
        return {**record, "chosen": rewrite, "rejected": record["output"]}
    return {**record, "chosen": record["output"], "rejected": rewrite}


@dataclass(kw_only=True)
class PrefsArgs(ServerOptions):
    """Make polite/impolite preference pairs for dpo by asking a local LLM to rewrite each record's output."""

    data: str = arg(help="instruction records with output (.json/.jsonl file, URL or Hub data set id)")
    model: str = arg("llama3", "the model's name on the server (as `ollama list` shows it)")
    seed: int = arg(123, "seed of the polite/impolite pick per record")
    out: str | None = redefault(ServerOptions, "out", None, "preference records for `gpt2-scratch dpo` (default: "
                                "<data stem>-preference.json in the current folder)")
    max_reply_tokens: int = redefault(ServerOptions, "max_reply_tokens", 1024, "cap on each rewrite (Ollama "
                                      "num_predict, OpenAI max_tokens); a rewrite is about as long as the output; "
                                      "0 = no cap")


def run(args: PrefsArgs) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    out = check_output_file(args.out or Path.cwd() / f"{Path(args.data).stem}-preference.json",
                            inputs=[("--data", args.data)])
    with claimed_output(out):  # one run per output at a time (core.files.claimed_output)
        check_new_output(out, flag="--out", overwrite=args.overwrite)
        cache_path = None if args.no_cache else Path(args.cache or out.with_suffix(".cache.jsonl"))
        if cache_path is not None:
            check_output_file(cache_path, flag="--cache", inputs=[("--data", args.data)])
        records = load_records(args.data, flag="--data")[: args.limit]
        if not records:
            raise InputError(f"--limit {args.limit} leaves no records of {args.data}")
        client, version = connect(args, args.model, structured=False)
        cache = None if cache_path is None else AnswerCache(cache_path)
        styles = pick_styles(len(records), args.seed)
        print(f"prefs: {args.model} via {args.api} at {client.host} (server {version}); {len(records)} records from "
              f"{args.data} ({styles.count('polite')} polite, {styles.count('impolite')} impolite); {args.workers} "
              f"workers" + (f"; cache {cache.path}" if cache else ""))
        identity = {"api": client.api, "model": client.model, "options": client.options, "prompt_version": PROMPT_VERSION}
        questions = [Question(cache_key({"mode": "prefs", **identity, **_fields(r), "politeness": style}),
                              rewrite_prompt(r, style), None, parse_rewrite, i)
                     for i, (r, style) in enumerate(zip(records, styles))]
        try:
            with terminate_as_interrupt():
                answers = ask_all(questions, client, cache=cache, workers=args.workers, parse_retries=args.parse_retries,
                                  progress=not args.quiet, desc="Writing entries", identity=identity)
        except KeyboardInterrupt as stopped:
            return interrupted(cache, stopped)
        written, failures = [], []
        for q, record, style in zip(questions, records, styles):
            answer = answers[q.key]
            if answer["value"] is None:
                failures.append((q.index, answer["reason"]))
            else:
                written.append(preference_record(record, style, answer["value"]))
        report_failures(failures, len(records), "records")
        write_json_atomic(out, written)
        cached = sum(answers[q.key]["cached"] for q in questions if answers[q.key]["value"] is not None)
        print(f"Wrote {len(written)} preference records to {out} ({len(failures)} failed, {cached} from the cache); "
              f"train with: gpt2-scratch dpo --data {out}")
        return 0


def _fields(record: dict) -> dict:
    """What of a record the rewrite depends on (its cache key)."""
    return {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}
