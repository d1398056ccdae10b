"""New instruction records from an instruct model given only the start of a user turn (Magpie).

    gpt2-scratch data generate --model llama3 --n 100 [--template llama3|chatml|gemma|phi3] [--out new.json]

The book's ``ch07/05_dataset-generation/llama3-ollama.ipynb``, after "Magpie: Alignment Data Synthesis
from Scratch by Prompting Aligned LLMs with Nothing" (arXiv 2406.08464): an instruct model handed the
start of a user turn in its own chat template (Llama 3's ``<|begin_of_text|><|start_header_id|>user
<|end_header_id|>``) writes a plausible user request. The first non-empty line of that continuation is
the instruction (the notebook's ``extract_instruction``); the model's chat answer to it is the output.
Records are the book's: ``{"instruction", "output"}``.

What is sent: for each slot k, a raw completion (Ollama ``/api/generate`` with ``"raw": true``, or
OpenAI ``/v1/completions``) of the user-turn start, sampled with seed ``--seed + k`` at
``--temperature`` and stopped at the template's end of turn; then the instruction as a chat message
with the book's options (seed 123, temperature 0). Instructions that are near-duplicates of an earlier
one (``datatools.dedup``: the book's TF-IDF cosine above ``--threshold``) are dropped and further slots
asked, up to ``--max-tries``. Every answer goes to the cache as it arrives: a rerun of the same command
asks nothing twice and writes the same records.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gpt2_scratch.core.args import arg, redefault
from gpt2_scratch.core.errors import Failure, InputError
from gpt2_scratch.core.files import check_output_file, claimed_output, write_json_atomic
from gpt2_scratch.core.llm_work import AnswerCache, Question, ServerOptions, ask_all, cache_key, connect
from gpt2_scratch.core.process import terminate_as_interrupt
from gpt2_scratch.datatools.common import check_new_output, interrupted, report_failures
from gpt2_scratch.datatools.dedup import near_duplicates, normalize

# The start of a user turn and the end of a turn, per chat template. Llama 3's start is the notebook's.
TEMPLATES = {
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>user\n", "<|im_end|>"),  # Qwen 2/2.5/3, SmolLM2, many others
    "gemma": ("<start_of_turn>user\n", "<end_of_turn>"),  # Gemma 2/3
    "phi3": ("<|user|>\n", "<|end|>"),  # Phi-3/3.5
}


def extract_instruction(reply: str, end_of_turn: str) -> str | None:
    """The first non-empty line of the user turn the model wrote (the notebook's rule); None if there is none."""
    turn = reply.split(end_of_turn)[0] if end_of_turn else reply
    return next((line.strip() for line in turn.split("\n") if line.strip()), None)


@dataclass(kw_only=True)
class GenerateArgs(ServerOptions):
    """Generate new instruction records Magpie-style: an instruct model is given only the start of a user turn."""

    model: str = arg("llama3", "the instruct model's name on the server (as `ollama list` shows it)")
    n: int = arg(5, "records to write (the notebook's 5; the book suggests 1k-50k for finetuning)", at_least=1)
    template: Literal["llama3", "chatml", "gemma", "phi3"] = arg("llama3", "the model's chat template, whose "
                                                                           "user-turn start is sent")
    user_turn: str | None = arg(None, "send this text as the user-turn start instead of --template's")
    end_of_turn: str | None = arg(None, "the text that ends a turn (the stop string), with --user-turn")
    seed: int = arg(123, "slot k samples its instruction with seed SEED + k")
    temperature: float = arg(1.0, "sampling temperature of the instructions (the notebook's 1.0)", at_least=0)
    threshold: float = arg(0.9, "drop an instruction whose similarity to an earlier one is above this (as `data "
                                "dedup`)", at_least=0, at_most=1)
    max_tries: int | None = arg(None, "instruction slots to try in all before giving up (default: 4 x N)", at_least=1)
    limit: int | None = redefault(ServerOptions, "limit", None, "write at most this many records (a smaller --n)")
    out: str | None = redefault(ServerOptions, "out", None, "the new records (default: magpie-<model>.json in the "
                                                            "current folder)")
    max_reply_tokens: int = redefault(ServerOptions, "max_reply_tokens", 1024, "cap on each reply (Ollama "
                                      "num_predict, OpenAI max_tokens); 0 = no cap")


@dataclass
class _Run:
    """What one generation run has found so far."""

    kept: list[str]  # accepted instructions, in slot order (a failed answer still blocks its near-duplicates)
    records: list[dict]
    failures: list[tuple[int, str]]
    duplicates: int = 0


def run(args: GenerateArgs) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    start, end = TEMPLATES[args.template]
    if args.user_turn is not None:
        start, end = args.user_turn, args.end_of_turn or ""
    elif args.end_of_turn is not None:
        raise InputError("--end-of-turn goes with --user-turn (a --template names both)")
    if not start.strip():
        raise InputError("--user-turn is empty; pass the start of a user turn in the model's chat template")
    target = min(args.n, args.limit) if args.limit is not None else args.n
    if target == 0:
        raise InputError("--limit 0 leaves no records to generate")
    out = check_output_file(args.out or Path.cwd() / f"magpie-{args.model.replace('/', '-').replace(':', '-')}.json")
    with claimed_output(out):  # one run per output at a time (core.files.claimed_output)
        check_new_output(out, flag="--out", overwrite=args.overwrite)
        cache_path = None if args.no_cache else Path(args.cache or out.with_suffix(".cache.jsonl"))
        if cache_path is not None:
            check_output_file(cache_path, flag="--cache")
        client, version = connect(args, args.model, structured=False)
        cache = None if cache_path is None else AnswerCache(cache_path)
        tries = args.max_tries or 4 * target
        print(f"generate: {args.model} via {args.api} at {client.host} (server {version}); {target} records from the "
              f"user-turn start {start!r}; {args.workers} workers" + (f"; cache {cache.path}" if cache else ""))
        ident = {"api": client.api, "model": client.model}
        state = _Run([], [], [])
        try:
            with terminate_as_interrupt():
                slot = 0
                while len(state.records) < target and slot < tries:
                    batch = range(slot, min(tries, slot + target - len(state.records)))
                    slot = batch.stop
                    _round(args, client, cache, ident, start, end, batch, state)
        except KeyboardInterrupt as stopped:
            return interrupted(cache, stopped)
        report_failures(state.failures, slot, "slots", label="slot")
        if not state.records:
            raise Failure(f"no record after {slot} tries ({state.duplicates} near-duplicates); is {start!r} the start "
                          f"of a user turn in {args.model}'s template (--template, --user-turn)?")
        write_json_atomic(out, state.records)
        short = f" (only {len(state.records)} of {target} after {slot} tries: raise --max-tries)" \
            if len(state.records) < target else ""
        print(f"Wrote {len(state.records)} records to {out}{short}; {state.duplicates} near-duplicate instructions "
              f"dropped, {len(state.failures)} failed")
        return 0


def _round(args: GenerateArgs, client, cache, ident: dict, start: str, end: str, batch: range, state: _Run) -> None:
    """Ask for the instructions of the slots in ``batch``, drop near-duplicates, ask for the answers."""
    common = dict(cache=cache, workers=args.workers, parse_retries=args.parse_retries, progress=not args.quiet)
    questions = []
    for k in batch:
        options = {"seed": args.seed + k, "temperature": args.temperature, **({"stop": [end]} if end else {})}
        key = cache_key({"mode": "magpie-instruction", **ident, "user_turn": start, "options": options,
                         "max_reply_tokens": client.max_reply_tokens})
        questions.append(Question(key, start, None, lambda reply: extract_instruction(reply, end), k,
                                  options=options, raw=True))
    answers = ask_all(questions, client, desc="Instructions", identity=ident, **common)
    new = []
    for q in questions:
        answer = answers[q.key]
        if answer["value"] is None:
            state.failures.append((q.index, f"instruction: {answer['reason']}"))
        else:
            new.append((q.index, answer["value"]))
    fresh = _distinct(state, new, args.threshold)
    questions = [Question(cache_key({"mode": "magpie-response", **ident, "options": client.options,
                                     "instruction": text}), text, None, lambda reply: reply.strip() or None, k)
                 for k, text in fresh]
    answers = ask_all(questions, client, desc="Responses", identity=ident, **common)
    for q in questions:
        answer = answers[q.key]
        if answer["value"] is None:
            state.failures.append((q.index, f"response: {answer['reason']}"))
        else:
            state.records.append({"instruction": q.prompt, "output": answer["value"]})


def _distinct(state: _Run, new: list[tuple[int, str]], threshold: float) -> list[tuple[int, str]]:
    """The ``(slot, instruction)`` of ``new`` that are no near-duplicate of a kept or an earlier new one."""
    texts = state.kept + [text for _, text in new]
    earlier: dict[int, set[int]] = {}
    for i, j, _ in near_duplicates(texts, threshold):
        earlier.setdefault(j, set()).add(i)
    accepted = set(range(len(state.kept)))
    seen = {normalize(t) for t in state.kept}
    fresh = []
    for position, (k, text) in enumerate(new, start=len(state.kept)):
        if earlier.get(position, set()) & accepted or normalize(text) in seen:
            state.duplicates += 1
            continue
        accepted.add(position)
        seen.add(normalize(text))
        state.kept.append(text)
        fresh.append((k, text))
    return fresh
