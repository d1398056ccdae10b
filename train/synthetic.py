"""The offline demo's instruction data: small tasks with one checkable answer, generated here.

No network, no third-party text: every record is built from the word lists below by a seeded
generator, so ``--data synthetic`` gives the same file on every machine. The tasks are chosen so that a
small randomly initialised GPT-2 trained for a few minutes on a CPU visibly learns them, and each has
exactly one correct output, so held-out exact-match accuracy measures what it learned:

  repeat    copy a list of words                   "green,river"        -> "green,river"
  reverse   reverse the order of words             "cat,moon,tree"      -> "tree,moon,cat"
  upper     write words in capital letters         "blue,stone"         -> "BLUE,STONE"
  first     name the first word of a list          "apple,door,sun"     -> "apple"
  last      name the last word of a list           "apple,door,sun"     -> "sun"
  count     count the words                        "fox,cup"            -> "2"
  add       add two small numbers (no input field) "What is 3 plus 4?"  -> "7"

Records carry an extra ``task`` field for per-task accuracy; training ignores it. No (instruction,
input) pair occurs twice, so the test split holds only unseen questions.
"""

from __future__ import annotations

import random
from collections import defaultdict

from gpt2_scratch.core.errors import InputError

DEFAULT_SIZE = 3000

# Short, common words: most are a single GPT-2 token with a leading space.
WORDS = (
    "apple river stone cloud green blue red black white cat dog fox bird fish tree moon sun star rain snow "
    "door book cup road hill lake leaf rock wind fire milk bread salt gold king ship lamp bell coat box"
).split()

# Words are joined by a bare comma: GPT-2's BPE then spells each word with the same tokens in the
# input and in the output (" black" after a space and "black" after a newline are different tokens,
# which would turn copying into a per-word lookup the model must memorise).
SEP = ","

TASKS = ("repeat", "reverse", "upper", "first", "last", "count", "add")
# What --data synthetic uses. "upper" (a spelling per word) and "add" (100 distinct questions, little
# to generalise from) are not learned in a few CPU minutes; the others share one skill, copying
# words from the input by position, which a small model picks up in a few hundred steps.
DEFAULT_TASKS = ("repeat", "reverse", "first", "last", "count")

_INSTRUCTIONS = {
    "repeat": "Repeat these words.",
    "reverse": "Reverse the order of these words.",
    "upper": "Write these words in capital letters.",
    "first": "Give the first word.",
    "last": "Give the last word.",
    "count": "How many words are there?",
}


def _make_record(task: str, rng: random.Random) -> dict:
    if task == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b), "task": task}
    n_words = {"repeat": (1, 3), "reverse": (2, 3), "upper": (1, 2), "first": (2, 4), "last": (2, 4),
               "count": (1, 5)}[task]
    words = rng.sample(WORDS, rng.randint(*n_words))
    output = {
        "repeat": SEP.join(words),
        "reverse": SEP.join(reversed(words)),
        "upper": SEP.join(words).upper(),
        "first": words[0],
        "last": words[-1],
        "count": str(len(words)),
    }[task]
    return {"instruction": _INSTRUCTIONS[task], "input": SEP.join(words), "output": output, "task": task}


def make_synthetic_records(size: int = DEFAULT_SIZE, seed: int = 123, tasks: tuple[str, ...] = DEFAULT_TASKS) -> list[dict]:
    """``size`` distinct records, tasks drawn uniformly from ``tasks``, in random (seeded) order.

    The ``add`` task has only 100 distinct questions; once they are used up the other tasks fill in.
    """
    if size < 1:
        raise ValueError(f"synthetic data size must be positive, got {size}")
    unknown = set(tasks) - set(TASKS)
    if unknown or not tasks:
        raise ValueError(f"unknown synthetic tasks {sorted(unknown)}; choose from {', '.join(TASKS)}")
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    records: list[dict] = []
    attempts = 0
    while len(records) < size:
        attempts += 1
        if attempts > size * 100:
            raise ValueError(f"cannot make {size} distinct synthetic records; ask for fewer")
        record = _make_record(rng.choice(tasks), rng)
        key = (record["instruction"], record["input"])
        if key not in seen:
            seen.add(key)
            records.append(record)
    return records


def synthetic_records(spec: str, seed: int = 123) -> list[dict] | None:
    """The records ``--data synthetic`` or ``synthetic:N`` names, or None for any other ``--data``."""
    if spec != "synthetic" and not spec.startswith("synthetic:"):
        return None
    size = spec.split(":", 1)[1] if ":" in spec else str(DEFAULT_SIZE)
    if not size.isdigit() or int(size) < 1:
        raise InputError(f"--data {spec}: expected synthetic or synthetic:N with N a positive number of records")
    return make_synthetic_records(int(size), seed)


def exact_match_report(records: list[dict], responses: list[str]) -> dict[str, tuple[int, int]]:
    """{task: (correct, total)} plus "all", comparing each response with the record's output exactly
    (after stripping surrounding whitespace)."""
    scores: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for record, response in zip(records, responses, strict=True):
        task = record.get("task", "other")
        hit = int(response.strip() == record["output"].strip())
        for key in (task, "all"):
            scores[key][0] += hit
            scores[key][1] += 1
    return {k: (v[0], v[1]) for k, v in sorted(scores.items())}
