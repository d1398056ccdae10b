"""``chat``'s conversation in the chat style: the prompt ids of a history, and the history that fits the context.

The text is the saved chat template's with ``add_generation_prompt`` (core/prompts.py builds both), so
``pipeline("text-generation")`` on the same messages sees the same tokens, except that text a user typed which
looks like ``<|endoftext|>`` stays text here (``encode_user_text``), as llama.cpp treats user input.
"""

from __future__ import annotations

import sys

from gpt2_scratch.core.prompts import END_OF_TEXT, conversation_prompt

from .tokenizer import ENDOFTEXT_ID, encode_user_text


def encode_conversation_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The ids ``chat`` gives the model for a history ending with a user turn (chat style): the chat template's
    text with ``add_generation_prompt``, typed text encoded as text and each turn's end as the id itself."""
    ids, text = [], ""
    for piece in conversation_prompt(messages):
        if piece == END_OF_TEXT:
            ids += [*(encode_user_text(tokenizer, text) if text else []), ENDOFTEXT_ID]
            text = ""
        else:
            text += piece
    return ids + encode_user_text(tokenizer, text)


def fit_history(tokenizer, messages: list[dict], max_prompt: int) -> tuple[list[dict], list[int]]:
    """(the history that fits, its prompt ids): the oldest exchanges (a user turn and its answer) are dropped, with
    a notice, until the prompt fits ``max_prompt`` tokens; system turns stay. The newest message alone too long
    stays too long (the caller crops it from the left, as any prompt)."""
    ids = encode_conversation_prompt(tokenizer, messages)
    dropped = 0
    while len(ids) > max_prompt:
        systems = sum(1 for m in messages if m["role"] == "system")
        if len(messages) - systems < 3:  # only the newest user turn left
            break
        messages = messages[:systems] + messages[systems + 2:]
        dropped += 1
        ids = encode_conversation_prompt(tokenizer, messages)
    if dropped:
        print(f"[dropped the oldest {dropped} exchange(s) of the conversation to fit the {max_prompt}-token prompt "
              "budget]", file=sys.stderr)
    return messages, ids
