"""Conversations: the record formats Hugging Face users bring, read into one shape for training.

Formats, recognised by their keys (or named with ``--data-format``); a file holds one of them:

  ``book``               ``{"instruction", "input"?, "output"}``: the book's records (core/records.py), the default
  ``messages``           ``{"messages": [{"role", "content"}, ...]}``: TRL's conversational format; roles
                         ``system`` (``developer`` is read as system), ``user``, ``assistant``
  ``sharegpt``           ``{"conversations": [{"from", "value"}, ...]}``: from ``system``, ``human``, ``gpt``
                         (``user`` and ``assistant`` are accepted too)
  ``prompt-completion``  ``{"prompt", "completion"}``: TRL's, each a string (a user turn, an assistant turn) or a
                         list of messages

``--columns SRC=DST[,SRC=DST...]`` renames a record's fields before anything else looks at them, so a data
set whose fields are ``question``/``answer`` is read with ``--columns question=instruction,answer=output``
and one whose conversation is called ``dialog`` with ``--columns dialog=messages``. DST is one of the field
names above (``FIELD_NAMES``; for DPO's preference records ``PREFERENCE_FIELD_NAMES``, e.g.
``--columns question=instruction,response_chosen=chosen,response_rejected=rejected``).

A conversation is checked: content is text (or OpenAI's list of parts, whose text parts are joined) and not
blank; system turns come first; then user and assistant alternate, starting with a user turn and ending
with an assistant turn (the last thing said is what a training example teaches). Any break is one
``DataError`` naming the source, the record (0-based) and the message.

Every conversation becomes a record ``{"messages": [...], "instruction", "input", "output"}``: the
normalised turns (roles system/user/assistant, content a string), plus the book's three fields read off
them (the last user turn, the system turns joined by a blank line, the last assistant turn), which is what
the judge, the test responses and the book's single-exchange styles use. Book records stay exactly as
core/records.py returns them, so the book's data gives byte for byte what it gave before.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpt2_scratch.core.errors import InputError
from gpt2_scratch.core.prompts import CHAT_STYLE, END_OF_TEXT
from gpt2_scratch.core.records import INSTRUCTION_FIELDS, DataError, load_raw_records, validate_records

DATA_FORMATS = ("auto", "book", "messages", "sharegpt", "prompt-completion")
FIELD_NAMES = ("instruction", "input", "output", "messages", "conversations", "prompt", "completion")
# What --columns may rename to in preference data (DPO): the book's pair fields, or TRL's prompt.
PREFERENCE_FIELD_NAMES = ("instruction", "input", "chosen", "rejected", "prompt")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_EXPECTED = ("'instruction'/'output' (the book's), 'messages' (TRL), 'conversations' (ShareGPT) or "
             "'prompt'/'completion' (TRL)")


def parse_columns(spec: str | None, fields: Sequence[str] = FIELD_NAMES,
                  example: str = "question=instruction,answer=output") -> dict[str, str]:
    """``--columns "question=instruction,answer=output"`` as {source field: our field}; each DST one of ``fields``
    (a command's record fields: ``FIELD_NAMES``, DPO's ``PREFERENCE_FIELD_NAMES``)."""
    if not spec:
        return {}
    mapping = {}
    for pair in spec.split(","):
        src, sep, dst = (part.strip() for part in pair.partition("="))
        if not sep or not src or dst not in fields:
            raise InputError(f"--columns {spec!r}: expected SRC=DST pairs separated by commas, DST one of "
                             f"{', '.join(fields)} (e.g. {example})")
        mapping[src] = dst
    return mapping


def rename_fields(records: list, mapping: dict[str, str], source: str) -> list:
    """``records`` with their fields renamed by ``mapping`` (``parse_columns``); a record without a field the
    mapping names is a DataError naming the source, the record and --columns."""
    if not mapping:
        return records
    return [_renamed(record, mapping, source, index) for index, record in enumerate(records)]


def record_format(record) -> str | None:
    """The format a record's keys say it is in, or None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record and "completion" in record:
        return "prompt-completion"
    if "instruction" in record or "output" in record:
        return "book"
    return None


def load_conversations(source: str, *, data_format: str = "auto", columns: str | None = None,
                       flag: str = "--data", required: Sequence[str] = INSTRUCTION_FIELDS,
                       answered: bool = True) -> list[dict]:
    """The records ``source`` names (a .json/.jsonl/.parquet file, a ``datasets`` folder, a URL or a Hub id), in
    file order: book records as core/records.py validates them (``required`` fields), conversations normalised
    (module docstring). ``answered=False`` (``respond``): a conversation may end with the user turn to answer."""
    if data_format not in DATA_FORMATS:
        raise InputError(f"--data-format {data_format!r}: choose one of {', '.join(DATA_FORMATS)}")
    mapping = parse_columns(columns)
    records = load_raw_records(source, flag=flag)
    records = rename_fields(records, mapping, source)
    if not records:
        raise DataError(f"{source}: holds no records; give a file with at least one record")
    fmt = data_format if data_format != "auto" else record_format(records[0])
    for index, record in enumerate(records):
        found = record_format(record)
        if found is None or found != fmt:
            raise DataError(_format_problem(source, index, record, found, fmt, data_format))
    if fmt == "book":
        return validate_records(records, source, required=required)
    read = {"messages": _from_messages, "sharegpt": _from_sharegpt, "prompt-completion": _from_prompt_completion}[fmt]
    normalised = []
    for index, record in enumerate(records):
        where = f"{source}: record {index}"
        normalised.append(conversation_record(read(record, where), where, answered=answered))
    return normalised


def _renamed(record, mapping: dict[str, str], source: str, index: int):
    if not isinstance(record, dict):
        return record
    missing = [src for src in mapping if src not in record]
    if missing:
        raise DataError(f"{source}: record {index} has no '{missing[0]}' field to map with --columns (it has: "
                        f"{', '.join(map(str, record)) or 'none'})")
    return {mapping.get(key, key): value for key, value in record.items()}


def _format_problem(source: str, index: int, record, found: str | None, fmt: str | None, named: str) -> str:
    where = f"{source}: record {index}"
    if not isinstance(record, dict):
        return f"{where} is a {type(record).__name__}, not an object with {_EXPECTED}"
    keys = ", ".join(map(str, record)) or "none"
    if found is None:
        return (f"{where} has fields {keys}: none of {_EXPECTED}; map other names with --columns "
                "(e.g. --columns question=instruction,answer=output)")
    if named != "auto":
        return f"{where} is a {found} record (fields {keys}), but --data-format {named} was given"
    return f"{where} is a {found} record (fields {keys}) but record 0 is a {fmt} record; a file holds one format"


# ---------------------------------------------------------------------------------------------------
# Each format's turns
# ---------------------------------------------------------------------------------------------------


def _text(content, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts whose text parts are joined."""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    if not isinstance(content, str):
        raise DataError(f"{where}: content must be a string, got {type(content).__name__}")
    if not content.strip():
        raise DataError(f"{where}: content is empty; every turn needs text (remove the turn or the record)")
    if END_OF_TEXT in content:
        raise DataError(f"{where}: content holds the text {END_OF_TEXT}, the end marker of every assistant turn; "
                        "remove it")
    return content


def _turns(messages, where: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of {{'{role_key}', '{text_key}'}} messages")
    turns = []
    for number, message in enumerate(messages):
        at = f"{where} message {number}"
        if not isinstance(message, dict) or role_key not in message or text_key not in message:
            raise DataError(f"{at}: expected an object with '{role_key}' and '{text_key}'")
        role = message[role_key]
        if role not in roles:
            raise DataError(f"{at}: unknown {role_key} {role!r}; expected one of {', '.join(roles)}")
        turns.append({"role": roles[role], "content": _text(message[text_key], at)})
    return turns


def _from_messages(record: dict, where: str) -> list[dict]:
    return _turns(record["messages"], where, "role", "content", ROLES)


def _from_sharegpt(record: dict, where: str) -> list[dict]:
    return _turns(record["conversations"], where, "from", "value", SHAREGPT_ROLES)


def _from_prompt_completion(record: dict, where: str) -> list[dict]:
    turns = []
    for field, role in (("prompt", "user"), ("completion", "assistant")):
        value = record[field]
        if isinstance(value, str):
            turns.append({"role": role, "content": _text(value, f"{where} '{field}'")})
        else:
            turns += _turns(value, f"{where} '{field}'", "role", "content", ROLES)
    return turns


def conversation_record(turns: list[dict], where: str, *, answered: bool = True) -> dict:
    """The normalised record of checked ``turns``: system turns first, then user and assistant alternating,
    starting with a user turn and ending with an assistant turn (or, unless ``answered``, a user turn: the
    record then has no ``output``)."""
    systems = 0
    while systems < len(turns) and turns[systems]["role"] == "system":
        systems += 1
    rest = turns[systems:]
    if answered and not any(t["role"] == "assistant" for t in rest):
        raise DataError(f"{where}: has no assistant turn, so nothing to learn; every conversation needs one")
    for number, turn in enumerate(rest, start=systems):
        expected = "user" if (number - systems) % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise DataError(f"{where} message {number}: a {turn['role']} turn where a {expected} turn belongs "
                            "(system turns first, then user and assistant alternating, from a user turn)")
    if not rest:
        raise DataError(f"{where}: has no user turn; every conversation needs one")
    if rest[-1]["role"] != "assistant" and answered:
        raise DataError(f"{where}: ends with a user turn that has no answer; end every conversation with the "
                        "assistant's turn (or remove the last user turn)")
    last_user = rest[-2] if rest[-1]["role"] == "assistant" else rest[-1]
    record = {"messages": turns, "instruction": last_user["content"],
              "input": "\n\n".join(t["content"] for t in turns[:systems])}
    return record | ({"output": rest[-1]["content"]} if rest[-1]["role"] == "assistant" else {})


def check_style(records: Sequence[dict], style: str, source: str) -> None:
    """The book's styles hold one exchange (the system text as the input): a longer conversation needs the
    chat style."""
    if style == CHAT_STYLE:
        return
    for index, record in enumerate(records):
        if sum(1 for t in record.get("messages", ()) if t["role"] == "user") > 1:
            raise DataError(f"{source}: record {index} is a conversation of several exchanges, which the {style} "
                            f"style cannot hold; train it with --prompt-style {CHAT_STYLE}")


# ---------------------------------------------------------------------------------------------------
# Preference pairs (DPO): TRL's prompt/chosen/rejected
# ---------------------------------------------------------------------------------------------------


def preference_record(record, where: str) -> dict:
    """A TRL preference record, ``{"prompt", "chosen", "rejected"}`` (the prompt a string or messages ending with
    a user turn; each answer a string or one assistant message), as ``{"messages": the prompt's turns,
    "instruction", "input", "chosen", "rejected"}``: DPO's record, in every prompt style."""
    if not isinstance(record, dict) or not all(k in record for k in ("prompt", "chosen", "rejected")):
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where} has fields {keys}; a TRL preference record needs 'prompt', 'chosen' and 'rejected' "
                        "(or give the book's 'instruction', 'chosen' and 'rejected' in every record)")
    prompt = record["prompt"]
    turns = ([{"role": "user", "content": _text(prompt, f"{where} 'prompt'")}] if isinstance(prompt, str)
             else _turns(prompt, f"{where} 'prompt'", "role", "content", ROLES))
    converted = conversation_record(turns, f"{where} 'prompt'", answered=False)
    if "output" in converted:
        raise DataError(f"{where} 'prompt': ends with an assistant turn; the prompt ends with the user turn that "
                        "'chosen' and 'rejected' answer")
    for field in ("chosen", "rejected"):
        value = record[field]
        if isinstance(value, list):
            answer = _turns(value, f"{where} '{field}'", "role", "content", ROLES)
            if len(answer) != 1 or answer[0]["role"] != "assistant":
                raise DataError(f"{where} '{field}': expected one assistant message (or a string)")
            value = answer[0]["content"]
        converted[field] = _text(value, f"{where} '{field}'")
    return converted
