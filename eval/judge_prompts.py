"""What the judge is asked, and how its replies are read.

The pointwise prompt is the book's (chapter 7, "Evaluating the finetuned LLM") word for word, so
scores stay comparable with the book's. On top of it the request asks for structured output (a
JSON schema with one integer ``score`` in 0..100); servers that ignore the schema still answer in
plain text, which :func:`parse_score` reads robustly. A reply that yields no unambiguous integer in
0..100 is *unparsable* (``None``): the caller retries it and finally reports it as a failure.

``PROMPT_VERSION`` is part of every cache key: change it whenever a prompt, schema or parsing rule
changes, so cached scores from the old wording are not reused.
"""

from __future__ import annotations

import json
import re

from gpt2_scratch.core.llm_http import BOOK_OPTIONS
from gpt2_scratch.core.prompts import CHAT_STYLE, format_input

PROMPT_VERSION = "book-ch07-v1"

# The book's request options (seed 123, temperature 0, a 2048-token context), the judge's as the book's.
OLLAMA_OPTIONS = BOOK_OPTIONS

SCORE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["score"],
}

VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]}},
    "required": ["winner"],
}


def judged_input(entry: dict) -> str:
    """What the judge is told the model was given: the book's Alpaca prompt of the record, or, for a conversation
    of several exchanges (core/conversations.py), the conversation before the answer in the chat style."""
    users = sum(1 for m in entry.get("messages", ()) if m.get("role") == "user")
    return format_input(entry, CHAT_STYLE if users > 1 else "alpaca")


def score_prompt(entry: dict, response: str) -> str:
    """The book's scoring prompt for one record and one model response."""
    return (
        f"Given the input `{judged_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{response}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )



def pairwise_prompt(entry: dict, response_a: str, response_b: str, criterion: str = "better") -> str:
    """Ask which of two responses is better (or more polite), in the book's style of prompt.

    The judge is asked twice per record with the responses swapped (see ``eval.judge``), so a
    preference for whichever answer comes first cancels out into a tie. Politeness is judged from
    the instruction and the two responses alone: the correct output says nothing about tone.
    """
    if criterion == "polite":
        return (
            f"Given the input `{judged_input(entry)}`, "
            f"compare model response A `{response_a}` "
            f"with model response B `{response_b}`. "
            f"Which response is more polite? "
            f"Respond with A, B, or tie only."
        )
    return (
        f"Given the input `{judged_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"compare model response A `{response_a}` "
        f"with model response B `{response_b}`. "
        f"Which response is better? "
        f"Respond with A, B, or tie only."
    )


_JSON_OBJECT = re.compile(r"\{[^{}]*\}")
_OUT_OF_100 = re.compile(r"(?<![\d.])(\d{1,3})\s*(?:/|out of)\s*100(?!\d|\.\d)", re.IGNORECASE)
_SCORE_WORD = re.compile(r"\bscore\b[^0-9\n]{0,20}?(?<![\d.-])(\d{1,3})(?!\d|\.\d)", re.IGNORECASE)
# A whole number that is not negative nor part of a decimal ("85.5") or a longer number.
_INTEGER = re.compile(r"(?<![\d.-])\d+(?!\d|\.\d)")


def is_score(value) -> bool:
    """True for an integer 0..100 (not a bool, not a float): the only values a mean may include."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 100


def is_verdict(value) -> bool:
    """True for a pairwise verdict as :func:`parse_verdict` returns it: "A", "B" or "tie"."""
    return isinstance(value, str) and value in ("A", "B", "tie")


def _as_score(value) -> int | None:
    """An integer 0..100 from a JSON value (int, integral float, or numeric string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdecimal():  # not isdigit: int("²") fails
        value = _whole(value.strip())
    if isinstance(value, int) and 0 <= value <= 100:
        return value
    return None


def _whole(digits: str) -> int:
    """``int(digits)``, or -1 (never a score) for digits too many to be one: a reply of 5,000 digits
    must cost its record, not stop the run (int() refuses strings of more than 4,300 digits)."""
    return int(digits) if len(digits) <= 12 else -1


def _json_candidates(text: str):
    """The reply itself, then every flat {...} inside it, parsed as JSON where possible."""
    for chunk in [text, *_JSON_OBJECT.findall(text)]:
        try:
            yield json.loads(chunk)
        except (ValueError, TypeError):
            continue


def parse_score(text: str) -> int | None:
    """Read a 0..100 integer score from a judge reply; ``None`` if there is no unambiguous one.

    Accepted, in order: structured output ``{"score": 87}`` (also inside a code fence or prose),
    a bare ``87``, ``87/100`` or ``87 out of 100``, ``score: 87`` / ``a score of 87``, and finally
    prose holding exactly one distinct integer. Replies such as "between 60 and 70", "85.5" or
    "150" are unparsable rather than guessed at.
    """
    if text is None:
        return None
    s = text.strip().strip("`").strip()
    if not s:
        return None
    for obj in _json_candidates(s):
        if isinstance(obj, dict) and "score" in obj:
            return _as_score(obj["score"])
        if isinstance(obj, int) and not isinstance(obj, bool):
            return _as_score(obj)
    for pattern in (_OUT_OF_100, _SCORE_WORD):
        found = {int(m) for m in pattern.findall(s)}
        if len(found) == 1:
            return _as_score(found.pop())
        if len(found) > 1:
            return None
    found = {_whole(m) for m in _INTEGER.findall(s)}
    if len(found) == 1:
        return _as_score(found.pop())
    return None


_RESPONSE_X = re.compile(r"^\W*(?:model\s+)?response\s+([AB])\b", re.IGNORECASE)
_VERDICT_WORDS = {
    "a": "A", "response a": "A", "model response a": "A",
    "b": "B", "response b": "B", "model response b": "B",
    "tie": "tie", "a tie": "tie", "draw": "tie", "equal": "tie",
}


def parse_verdict(text: str) -> str | None:
    """Read "A", "B" or "tie" from a pairwise reply; ``None`` if it is not one of those."""
    if text is None:
        return None
    s = text.strip().strip("`").strip()
    for obj in _json_candidates(s):
        if isinstance(obj, dict) and "winner" in obj:
            return _VERDICT_WORDS.get(str(obj["winner"]).strip().lower())
    word = _VERDICT_WORDS.get(s.rstrip(".!").strip().strip("\"'*").strip().lower())
    if word is None:  # "Response B is better, because ..." (needs the word "response": "A" alone is ambiguous)
        m = _RESPONSE_X.match(s)
        word = m.group(1).upper() if m else None
    return word
