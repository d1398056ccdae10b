"""Score model responses with an LLM judge (chapter 7's Ollama evaluation, made dependable).

    python eval/judge.py --data responses.json [--judge-model llama3] [--host http://localhost:11434]
        [--response-key model_response] [--workers 4] [--out SCORES] [--api ollama|openai]
    gpt2-scratch judge ...                 (the same command; --file and --model are the older spellings)

Each record (``instruction``, ``input`` (optional), ``output`` and the response key) is scored 0-100 with the
book's prompt, options seed 123 / temperature 0 / num_ctx 2048, and a JSON-schema request for an
integer ``score``. What the book's script leaves to chance is handled here:

- preflight: the server answers and the model is pulled, else a one-line fix and exit 1;
- the reply is capped (``--max-reply-tokens``); structured output steps down (JSON schema, plain
  JSON, text) when a server refuses it, once per run;
- unparsable replies are retried, then reported as failures with their text (never dropped);
- connection errors, timeouts and 5xx are retried with backoff, errors that would repeat (4xx,
  validation errors) are not; ``--request-timeout`` bounds each request; ``--workers`` ask in parallel;
- the first Ctrl-C stops the run at once (exit 130); no record scored is a failure (exit 1);
- every answer is appended to a JSONL cache (``SCORES`` with ``.cache.jsonl``) as it arrives, so a
  killed run, rerun with the same command, asks only what is still missing;
- empty responses score 0 without a call, as in the book.

The summary (the book's ``Number of scores`` / ``Average score`` lines, then median, std, 95% CI,
histogram, lowest records, failures) is printed and written next to ``SCORES`` (.summary.txt,
.hist.png); ``SCORES`` itself is JSON with the summary and one entry per record.

Pairwise mode (``--compare-key KEY`` and/or ``--compare-file FILE``) asks the same judge which of
two responses is better, in both orders, and reports win/tie/loss of ``--response-key`` against
the other one.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python eval/judge.py ARGS` is `gpt2-scratch judge ARGS`
    from gpt2_scratch.core.cli import run_script

    run_script("judge")

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gpt2_scratch.core.args import arg, check_values, redefault
from gpt2_scratch.core.errors import EXIT_INTERRUPTED, Failure, InputError, Terminated
from gpt2_scratch.core.files import (check_output_file, claimed_output, source_identity, write_json_atomic,
                                     write_text_atomic)
from gpt2_scratch.core.llm_http import MAX_REPLY_TOKENS
from gpt2_scratch.core.llm_work import (
    AnswerCache,
    Question,
    ServerOptions,
    ask_all,
    cache_key,
    connect,
)
from gpt2_scratch.core.process import terminate_as_interrupt
from gpt2_scratch.core.records import load_records, record_input
from gpt2_scratch.eval.judge_prompts import (
    PROMPT_VERSION,
    SCORE_SCHEMA,
    VERDICT_SCHEMA,
    is_score,
    is_verdict,
    pairwise_prompt,
    parse_score,
    parse_verdict,
    score_prompt,
)
from gpt2_scratch.eval.judge_summary import (
    format_pairwise_summary,
    format_score_summary,
    pairwise_summary,
    save_histogram_png,
    score_summary,
)

log = logging.getLogger(__name__)



def record_fields(record: dict) -> dict:
    """What the judge sees of a record besides the response(s): part of every cache key."""
    return {"instruction": record["instruction"], "input": record_input(record), "output": record["output"]}


def load_judged_records(path: str, response_keys: tuple[str, ...]) -> list[dict]:
    """Records with instruction, output and every response key (``input`` optional), via core.records."""
    records = load_records(path, flag="--data")
    for index, record in enumerate(records):
        for key in ("output", *response_keys):
            if not isinstance(record.get(key), str):
                hint = ("add responses with `gpt2-scratch respond` (eval/generate.py) or pass --response-key"
                        if key in response_keys else "the judge compares each response with the record's output")
                what = "has no" if key not in record else f"has a {type(record[key]).__name__} as its"
                raise InputError(f"{path}: record {index} {what} '{key}' string; {hint}")
    return records


# --------------------------------------------------------------------------- asking


def _judge_identity(judge) -> dict:
    """What, besides the prompt, decides the judge's answer (part of every cache key).

    The request options include the reply cap (Ollama ``num_predict``, OpenAI ``max_tokens``): a
    capped reply can differ from an uncapped one. ``structured`` is what was asked for, not the
    format a server fell back to, so a rerun against the same server finds its answers.
    """
    options = getattr(judge, "options", None) or {"seed": judge.seed, "temperature": judge.temperature}
    return {"api": judge.api, "model": judge.model, "options": options,
            "structured": bool(judge.structured), "prompt_version": PROMPT_VERSION}


def score_records(records: list[dict], judge, *, response_key: str = "model_response",
                  cache: AnswerCache | None = None, workers: int = 4, parse_retries: int = 2,
                  progress: bool = True) -> list[dict]:
    """Score every record's ``response_key`` 0..100; one outcome dict per record, in order.

    Outcome: ``index``, ``status`` ("ok", "empty" = scored 0 without a call, "failed"), ``score``
    (None when failed), ``reply`` (the judge's text), ``reason`` (why it failed), ``cached``.
    """
    ident = _judge_identity(judge)
    questions: dict[int, Question] = {}
    for i, rec in enumerate(records):
        response = rec[response_key]
        if response.strip():
            key = cache_key({"mode": "score", **ident, **record_fields(rec),
                             "response": response})
            questions[i] = Question(key, score_prompt(rec, response), SCORE_SCHEMA, parse_score, i, is_score)
    answers = ask_all(list(questions.values()), judge, cache=cache, workers=workers,
                      parse_retries=parse_retries, progress=progress, identity=ident)
    outcomes = []
    for i in range(len(records)):
        if i not in questions:  # the book scores an empty response 0 without asking
            outcomes.append({"index": i, "status": "empty", "score": 0, "reply": None, "reason": None,
                             "cached": False})
            continue
        a = answers[questions[i].key]
        outcomes.append({"index": i, "status": "ok" if a["value"] is not None else "failed",
                         "score": a["value"], "reply": a["reply"], "reason": a["reason"],
                         "cached": a["cached"]})
    return outcomes


_SWAP = {"A": "B", "B": "A", "tie": "tie"}


def compare_records(records_a: list[dict], key_a: str, records_b: list[dict], key_b: str, judge, *,
                    criterion: str = "better", cache: AnswerCache | None = None, workers: int = 4,
                    parse_retries: int = 2, progress: bool = True) -> list[dict]:
    """Pairwise verdict per record: is response A (``records_a[i][key_a]``) better (or more polite) than B?

    The judge sees each pair twice, A first and B first. A record is a win (or loss) only if both
    orders agree; disagreement is a tie, which cancels the judge's bias towards a position.
    Outcome: ``index``, ``result`` ("win"/"tie"/"loss", None when failed), ``verdicts``,
    ``consistent`` (the two orders agreed; None if no call was needed), ``reason``, ``reply``, ``cached``.
    """
    ident = _judge_identity(judge)
    plan: dict[int, tuple[Question, Question]] = {}
    outcomes: dict[int, dict] = {}
    for i, (ra, rb) in enumerate(zip(records_a, records_b)):
        a, b = ra[key_a], rb[key_b]
        if not a.strip() or not b.strip() or a == b:  # nothing to ask: empty loses, equal ties
            result = "tie" if a == b or (not a.strip() and not b.strip()) else ("loss" if not a.strip() else "win")
            outcomes[i] = {"index": i, "result": result, "verdicts": None, "consistent": None,
                           "reason": None, "reply": None, "cached": False}
            continue
        base = {"mode": "pairwise", **ident, **record_fields(ra)}
        if criterion != "better":  # the default's keys stay those of earlier caches
            base["criterion"] = criterion
        plan[i] = (
            Question(cache_key({**base, "first": a, "second": b}), pairwise_prompt(ra, a, b, criterion),
                     VERDICT_SCHEMA, parse_verdict, i, is_verdict),
            Question(cache_key({**base, "first": b, "second": a}), pairwise_prompt(ra, b, a, criterion),
                     VERDICT_SCHEMA, parse_verdict, i, is_verdict),
        )
    answers = ask_all([q for pair in plan.values() for q in pair], judge, cache=cache, workers=workers,
                      parse_retries=parse_retries, progress=progress, desc="Comparing entries", identity=ident)
    for i, (q1, q2) in plan.items():
        x, y = answers[q1.key], answers[q2.key]
        bad = next((ans for ans in (x, y) if ans["value"] is None), None)
        if bad is not None:
            outcomes[i] = {"index": i, "result": None, "verdicts": [x["value"], y["value"]],
                           "consistent": None, "reason": bad["reason"], "reply": bad["reply"],
                           "cached": x["cached"] and y["cached"]}
            continue
        v1, v2 = x["value"], _SWAP[y["value"]]  # v2 re-labelled: "A" means key_a's response
        result = {"A": "win", "B": "loss", "tie": "tie"}[v1] if v1 == v2 else "tie"
        outcomes[i] = {"index": i, "result": result, "verdicts": [x["value"], y["value"]],
                       "consistent": v1 == v2, "reason": None, "reply": None,
                       "cached": x["cached"] and y["cached"]}
    return [outcomes[i] for i in range(len(records_a))]


# --------------------------------------------------------------------------- CLI


@dataclass(kw_only=True)  # kw_only: the required --data may follow ServerOptions' defaults
class JudgeArgs(ServerOptions):
    """Score model responses 0-100 with an LLM judge (Ollama or an OpenAI-compatible server), resumably."""

    data: str = arg(help="records with instruction, input (optional), output and the response key, e.g. the "
                         "output of `gpt2-scratch respond` (.json/.jsonl)", aliases=("--file",))
    judge_model: str = arg("llama3", "judge model name on the server", aliases=("--model",))
    response_key: str = arg("model_response", "record key holding the response")
    compare_key: str | None = arg(None, "pairwise mode: compare --response-key against this key (in "
                                        "--compare-file if given, else in --data)")
    compare_file: str | None = arg(None, "pairwise mode: take the other responses from this file (same records "
                                         "in the same order)")
    criterion: Literal["better", "polite"] = arg("better", "pairwise mode: which response is better (given the "
                                                           "correct output), or which is more polite (DPO's aim)")
    out: str | None = redefault(ServerOptions, "out", None, "scores JSON (default: <data stem>-scores.json, or "
                                "-pairwise.json, in the current folder); .summary.txt/.hist.png go beside it")
    max_reply_tokens: int = redefault(ServerOptions, "max_reply_tokens", MAX_REPLY_TOKENS,
                                      "cap on the judge's reply (Ollama num_predict, OpenAI max_tokens); a score "
                                      "needs a few tokens; 0 = no cap")
    no_structured: bool = arg(False, "don't request structured output (by default a JSON schema, then plain "
                                     "JSON, then text if the server refuses them)", action="store_true")
    lowest: int = arg(5, "lowest-scoring records to list")


def _default_out(args: JudgeArgs) -> Path:
    suffix = "pairwise" if args.compare_key or args.compare_file else "scores"
    return Path.cwd() / f"{Path(args.data).stem}-{suffix}.json"


def run(args: JudgeArgs) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    pairwise = bool(args.compare_key or args.compare_file)
    check_values(args)  # the command line's one check of option values (also for callers from Python)
    other_key = args.compare_key or args.response_key
    if pairwise and not args.compare_file and other_key == args.response_key:
        raise InputError(f"pairwise mode compares two responses: pass --compare-key other than "
                         f"{args.response_key!r}, or --compare-file")
    if args.criterion != "better" and not pairwise:
        raise InputError(f"--criterion {args.criterion} asks which of two responses is more {args.criterion}: "
                         "add --compare-file or --compare-key")
    # Pre-flight: the outputs replace none of the inputs (checked before any question is asked).
    out = check_output_file(args.out or _default_out(args),
                            inputs=[("--data", args.data), ("--compare-file", args.compare_file)])
    cache_path = None if args.no_cache else Path(args.cache or out.with_suffix(".cache.jsonl"))
    if cache_path is not None:
        check_output_file(cache_path, flag="--cache", inputs=[("--data", args.data),
                                                              ("--compare-file", args.compare_file)])
    records = load_judged_records(args.data, (args.response_key,))
    records_b = records
    if pairwise:
        if args.compare_file:
            records_b = load_judged_records(args.compare_file, (other_key,))
        else:
            records = load_judged_records(args.data, (args.response_key, other_key))
            records_b = records
        if len(records_b) != len(records):
            raise InputError(f"{args.compare_file} has {len(records_b)} records but {args.data} has "
                             f"{len(records)}; pairwise mode needs the same records in the same order")
        for i, (ra, rb) in enumerate(zip(records, records_b)):
            if record_fields(ra) != record_fields(rb):
                raise InputError(f"record {i} differs between {args.data} and {args.compare_file} "
                                 f"(instruction/input/output); pairwise mode needs the same records in order")
    if args.limit is not None:
        records, records_b = records[: args.limit], records_b[: args.limit]
    if not records:
        raise InputError(f"{args.data} holds no records to judge"
                              + (f" (--limit {args.limit})" if args.limit is not None else ""))

    # What the scores are of: a rerun of the same command rewrites them; the scores of other data (or other
    # responses) are never replaced without --overwrite (core.files.claimed_output).
    owner = {"by": f"judge --data {args.data}" + (f" --compare-file {args.compare_file}" if args.compare_file else ""),
             "data": source_identity(args.data), "compare_file": source_identity(args.compare_file),
             "response_key": args.response_key, "compare_key": other_key if pairwise else None}
    with claimed_output(out, owner=owner, overwrite=args.overwrite, what="judge") as claim:
        return _judge(args, claim, records, records_b, other_key, cache_path)


def _judge(args: JudgeArgs, claim, records: list[dict], records_b: list[dict], other_key: str, cache_path) -> int:
    """Ask the judge and write the scores (``run``'s work, once the output is claimed)."""
    out, pairwise = claim.path, bool(args.compare_key or args.compare_file)
    judge, version = connect(args, args.judge_model, structured=not args.no_structured)
    cache = None if cache_path is None else AnswerCache(cache_path)
    print(f"Judge: {args.judge_model} via {args.api} at {judge.host} (server {version}); "
          f"{len(records)} records from {args.data}; {args.workers} workers"
          + (f"; cache {cache.path}" if cache else ""))

    meta = {"file": str(args.data), "model": args.judge_model, "api": args.api, "host": judge.host,
            "prompt_version": PROMPT_VERSION, "structured": judge.structured,
            "max_reply_tokens": judge.max_reply_tokens}
    kw = dict(cache=cache, workers=args.workers, parse_retries=args.parse_retries, progress=not args.quiet)
    try:
        with terminate_as_interrupt():
            outcomes, summary, text = _ask(args, judge, records, records_b, other_key, out, meta, kw)
    except KeyboardInterrupt as stopped:  # Ctrl-C (130), or SIGTERM (Terminated, 143)
        print("\ninterrupted; answers so far are in the cache: rerun the same command to resume", file=sys.stderr,
              flush=True)
        return stopped.exit_code if isinstance(stopped, Terminated) else EXIT_INTERRUPTED
    print(text)
    write_json_atomic(out, _json_safe({**meta, "summary": summary, "records": outcomes}), indent=2)
    write_text_atomic(out.with_suffix(".summary.txt"), text + "\n")
    claim.written()
    print(f"\nWrote {out} and {out.with_suffix('.summary.txt').name}"
          + ("" if pairwise else f", {out.with_suffix('.hist.png').name}"))
    got = summary["num_compared" if pairwise else "num_scores"]
    if records and not got:
        first = summary["failures"][0] if summary["failures"] else None
        raise Failure(f"no record got a {'verdict' if pairwise else 'score'} ({len(records)} failed"
                      + (f"; record {first['index']}: {first['reason']}" if first else "")
                      + f"); see the failures in {out}")
    return 0


def _ask(args: JudgeArgs, judge, records, records_b, other_key, out: Path, meta: dict, kw: dict):
    """Score (or compare) every record; returns (outcomes, summary, printed text)."""
    pairwise = bool(args.compare_key or args.compare_file)
    if pairwise:
        name_a = f"{args.data}:{args.response_key}" if args.compare_file else args.response_key
        name_b = f"{args.compare_file}:{other_key}" if args.compare_file else other_key
        outcomes = compare_records(records, args.response_key, records_b, other_key, judge,
                                   criterion=args.criterion, **kw)
        summary = pairwise_summary(outcomes, records, name_a=name_a, name_b=name_b)
        text = format_pairwise_summary(summary, criterion=args.criterion)
        meta.update(compare_file=args.compare_file, response_key=args.response_key, compare_key=other_key,
                    criterion=args.criterion)
    else:
        outcomes = score_records(records, judge, response_key=args.response_key, **kw)
        summary = score_summary(outcomes, records, response_key=args.response_key, lowest=args.lowest)
        text = format_score_summary(summary)
        meta["response_key"] = args.response_key
        png = save_histogram_png([o["score"] for o in outcomes if o["score"] is not None],
                                 out.with_suffix(".hist.png"),
                                 f"{Path(args.data).name}: {args.response_key} judged by {args.judge_model}")
        summary["histogram_png"] = str(png)
    meta["format"] = judge.format  # the structured-output format the server accepted
    return outcomes, summary, text


def _json_safe(obj):
    """NaN (no scores to average) → null, so the file stays strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj
