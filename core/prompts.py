"""Instruction prompts in the book's exact wording, and how a response is cut out of generated text.

``alpaca`` is chapter 7's format; ``phi3`` is the book's exercise 7.1. The prompt given to the model
ends before the response header: the finetuned model writes the header itself, and
``extract_response`` removes it again, exactly as the book's evaluation code does.

Plain text, no torch. Each style is four pieces of text (`PromptStyle`); training, generation, the
judge, the chat template saved with every instruction model and the GGUF/Ollama templates are all built
from them, so what a model is trained on is exactly what it is asked at every other step.

Chat messages map onto one record, the same way in every template built here (`chat_template`, the
GGUF's ``tokenizer.chat_template``, the Ollama Modelfile's TEMPLATE):

- the last user message is the instruction;
- the system messages (joined by a blank line) are the record's input, the book's "### Input:" part:
  the one channel besides the user's text that OpenAI-style servers and Ollama pass on unchanged;
  ``developer`` messages (OpenAI's newer name for the system role) are system messages, and ``tool``
  messages (a tool's result) join the input too, in the order they come: context for the instruction,
  which the model was never trained to see anywhere else; an assistant message with no content (one
  that only calls a tool) is no answer, and a tool result asks for an answer again;
- a message's content is text, or OpenAI's list of parts (``[{"type": "text", "text": ...}]``), whose
  text parts are joined (a text model cannot see the other kinds);
- an assistant message after that last user message is the response: it follows the response header
  and ends with the end-of-text token, the exact text of a training example (transformers'
  ``continue_final_message=True`` and Ollama, whose template has no end-of-text, continue it instead:
  a client's prefilled start of an answer);
- otherwise ``add_generation_prompt`` ends the text with the response header, so the answer is the
  first thing the model writes;
- earlier user and assistant turns are left out: the model was finetuned on single prompts, and its
  1024-token context would soon fill with a conversation it never learned to follow.

So ``[{"role": "user", "content": X}]`` with ``add_generation_prompt=True`` is byte for byte
``generation_prompt({"instruction": X})``, and ``chat_messages(record)`` gives the messages of a record.

The ``chat`` style is for conversations (core/conversations.py reads them): every turn, in plain text that
GPT-2's vocabulary encodes without new tokens, turns separated by a blank line, each assistant turn closed by
``<|endoftext|>`` (the token GPT-2 already ends a document with, so generation stops there)::

    ### System:
    You are terse.

    ### User:
    Hi

    ### Assistant:
    Hello.<|endoftext|>

    ### User:
    ...

A record of this style holds ``messages`` (a book record stands for [system: input, user: instruction,
assistant: output]); its prompt (``format_input``) is every turn before the last assistant turn, the
response header ``"\n\n### Assistant:\n"``. Training supervises each assistant turn's text and its
``<|endoftext|>`` (``conversation_segments`` says which characters), and its chat template keeps the whole
conversation, wrapping those same characters in ``{% generation %}`` so transformers'
``return_assistant_tokens_mask`` marks them.
"""

import json
from dataclasses import dataclass

from gpt2_scratch.core.errors import InputError


@dataclass(frozen=True)
class PromptStyle:
    """The text around a record's fields in one prompt style."""

    head: str
    """Before the instruction."""
    input_separator: str
    """Between the instruction and the input; absent, like the input, when a record has no input."""
    response_header: str
    """Between the prompt and the response in a training example."""
    response_marker: str
    """What the book strips from a generated continuation to get the bare response."""


STYLES = {
    "alpaca": PromptStyle(
        head=("Below is an instruction that describes a task. "
              "Write a response that appropriately completes the request."
              "\n\n### Instruction:\n"),
        input_separator="\n\n### Input:\n",
        response_header="\n\n### Response:\n",
        response_marker="### Response:",
    ),
    "phi3": PromptStyle(head="<|user|>\n", input_separator="\n", response_header="\n<|assistant|>:\n",
                        response_marker="<|assistant|>:"),
}
CHAT_STYLE = "chat"
STYLES[CHAT_STYLE] = PromptStyle(head="### User:\n", input_separator="", response_header="\n\n### Assistant:\n",
                                 response_marker="### Assistant:")
PROMPT_STYLES = tuple(STYLES)
CHAT_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
TURN_SEPARATOR = "\n\n"
END_OF_TEXT = "<|endoftext|>"  # GPT-2's one special token (id 50256): the end of every assistant turn


def prompt_pieces(style: str) -> PromptStyle:
    """The pieces of ``style``; a one-line error naming the known styles for any other name."""
    if style not in STYLES:
        raise InputError(f"unknown prompt style {style!r}; choose one of {', '.join(PROMPT_STYLES)}")
    return STYLES[style]


def format_input(record: dict, style: str = "alpaca") -> str:
    """The prompt for one record: instruction, plus its input when there is one (the key may be absent); in the
    chat style, every turn before the last assistant turn."""
    s = prompt_pieces(style)
    if style == CHAT_STYLE:
        messages = record_messages(record)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return "".join(text for text, _ in conversation_segments(messages))
    extra = record.get("input") or ""
    return s.head + record["instruction"] + (s.input_separator + extra if extra else "")


def response_header(style: str = "alpaca") -> str:
    """The text that joins a prompt and its response in a training example."""
    return prompt_pieces(style).response_header


def generation_prompt(record: dict, style: str = "alpaca") -> str:
    """What the model continues to answer ``record``: its prompt and the response header (``chat``, the chat
    template with ``add_generation_prompt``)."""
    return format_input(record, style) + response_header(style)


def format_example(record: dict, style: str = "alpaca") -> str:
    """Prompt, response header and the reference output: the full text a training example holds."""
    return format_input(record, style) + response_header(style) + record["output"]


def extract_response(generated_text: str, prompt: str, style: str = "alpaca") -> str:
    """The response part of ``generated_text`` (which starts with ``prompt``), as the book extracts it."""
    marker = prompt_pieces(style).response_marker
    return generated_text[len(prompt):].replace(marker, "").strip()


def chat_messages(record: dict, *, with_response: bool = False) -> list[dict]:
    """The chat messages that stand for ``record`` (the convention above): the input, if any, as the system
    message, the instruction as the user message, and with ``with_response`` the output as the assistant's."""
    system = [{"role": "system", "content": record["input"]}] if record.get("input") else []
    response = [{"role": "assistant", "content": record["output"]}] if with_response else []
    return [*system, {"role": "user", "content": record["instruction"]}, *response]


def record_messages(record: dict) -> list[dict]:
    """A record's conversation: its ``messages``, or a book record's (``chat_messages``, with the output when
    it has one)."""
    if "messages" in record:
        return record["messages"]
    return chat_messages(record, with_response="output" in record)


def conversation_segments(messages: list[dict]) -> list[tuple[str, bool]]:
    """The chat style's text of ``messages`` as (text, supervised) pieces, in order: an assistant turn's content
    and its ``<|endoftext|>`` (a piece of its own) are supervised, every header and every other turn is not.
    Roles are those core/conversations.py normalises to: system, user, assistant."""
    pieces = []
    for index, message in enumerate(messages):
        pieces.append(((TURN_SEPARATOR if index else "") + CHAT_HEADERS[message["role"]], False))
        if message["role"] == "assistant":
            pieces += [(message["content"], True), (END_OF_TEXT, True)]
        else:
            pieces.append((message["content"], False))
    return pieces


def conversation_prompt(messages: list[dict]) -> list[str]:
    """What the model continues to answer a history that ends with a user turn (``chat``): the pieces of its
    text with each ``<|endoftext|>`` a piece of its own (to be encoded by id, never by spelling), the
    assistant header last. Joined, it is the chat template's text with ``add_generation_prompt``."""
    pieces = [text for text, _ in conversation_segments(messages)]
    pieces.append((TURN_SEPARATOR if messages else "") + CHAT_HEADERS["assistant"])
    return pieces


def _message_text_jinja() -> str:
    """Jinja setting ``ns.text`` to a message's content: a string, or the text parts of OpenAI's list of parts."""
    return ('{%- if message["content"] is string -%}{%- set ns.text = message["content"] -%}'
            '{%- else -%}{%- set ns.text = "" -%}'
            '{%- for part in message["content"] or [] -%}'
            '{%- if part["type"] == "text" -%}{%- set ns.text = ns.text + part["text"] -%}{%- endif -%}'
            "{%- endfor -%}{%- endif -%}")


def conversation_chat_template(generation_marks: bool = True) -> str:
    """The chat style's Jinja template: every turn, as ``conversation_segments`` writes it, each assistant turn's
    supervised text inside ``{% generation %}`` (transformers' tag; ``generation_marks=False`` leaves it out for
    renderers without it, such as plain Jinja2 in llama-cpp-python: the text is the same). ``developer``
    messages are system turns and a ``tool`` result a turn of its own (``### Tool:``); an assistant message
    with no content (a tool call) is left out."""
    start, end = ("{%- generation -%}", "{%- endgeneration -%}") if generation_marks else ("", "")
    sep, system, user, assistant = (json.dumps(t) for t in (TURN_SEPARATOR, CHAT_HEADERS["system"],
                                                            CHAT_HEADERS["user"], CHAT_HEADERS["assistant"]))
    return (
        '{%- set ns = namespace(started=false, text="") -%}'
        "{%- for message in messages -%}"
        '{%- if not (message["role"] == "assistant" and message["content"] is none) -%}'
        + _message_text_jinja() +
        f"{{%- if ns.started -%}}{{{{- {sep} -}}}}{{%- endif -%}}{{%- set ns.started = true -%}}"
        '{%- if message["role"] == "assistant" -%}'
        f"{{{{- {assistant} -}}}}{start}{{{{- ns.text + eos_token -}}}}{end}"
        '{%- elif message["role"] == "user" -%}'
        f"{{{{- {user} + ns.text -}}}}"
        '{%- elif message["role"] == "tool" -%}'
        '{{- "### Tool:\n" + ns.text -}}'
        "{%- else -%}"
        f"{{{{- {system} + ns.text -}}}}"
        "{%- endif -%}{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{%- if ns.started -%}}{{{{- {sep} -}}}}{{%- endif -%}}"
        f"{{{{- {assistant} -}}}}{{%- endif -%}}"
    )


def chat_template(style: str, *, generation_marks: bool = True) -> str:
    """The Jinja chat template of ``style`` (saved with the tokenizer, and the GGUF's, there without
    ``generation_marks``), for the convention above.

    Text is emitted only through string literals, so the result does not depend on the renderer's
    trim_blocks/lstrip_blocks settings (transformers and llama-cpp-python turn both on).
    """
    s = prompt_pieces(style)
    if style == CHAT_STYLE:
        return conversation_chat_template(generation_marks)
    head, separator, header = (json.dumps(text) for text in (s.head, s.input_separator, s.response_header))
    return (
        '{%- set ns = namespace(instruction="", input="", response="", answered=false, text="") -%}'
        "{%- for message in messages -%}"
        + _message_text_jinja() +
        '{%- if message["role"] == "user" -%}'
        '{%- set ns.instruction = ns.text -%}{%- set ns.answered = false -%}'
        '{%- elif message["role"] == "assistant" and message["content"] is not none -%}'
        '{%- set ns.response = ns.text -%}{%- set ns.answered = true -%}'
        '{%- elif message["role"] in ["system", "developer", "tool"] -%}'
        '{%- set ns.input = ns.input + ("\\n\\n" if ns.input else "") + ns.text -%}'
        '{%- if message["role"] == "tool" -%}{%- set ns.answered = false -%}{%- endif -%}'
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{{{- {head} + ns.instruction -}}}}"
        f"{{%- if ns.input -%}}{{{{- {separator} + ns.input -}}}}{{%- endif -%}}"
        f"{{%- if ns.answered -%}}{{{{- {header} + ns.response -}}}}{{{{- eos_token -}}}}"
        f"{{%- elif add_generation_prompt -%}}{{{{- {header} -}}}}{{%- endif -%}}"
    )
