"""Instruction prompts in the book's exact wording, and how a response is cut out of generated text.

``alpaca`` is chapter 7's format; ``phi3`` is the book's exercise 7.1. The prompt given to the model
ends before the response header: the finetuned model writes the header itself, and
``extract_response`` removes it again, exactly as the book's evaluation code does.

Plain text, no torch: training, generation, the judge and the GGUF export's chat template all use
these functions, so what a model is trained on is exactly what it is asked at every other step.
"""

from gpt2_scratch.core.errors import InputError

PROMPT_STYLES = ("alpaca", "phi3")

# Text placed between the prompt and the output in a training example, per style.
_RESPONSE_HEADER = {"alpaca": "\n\n### Response:\n", "phi3": "\n<|assistant|>:\n"}
# What the book strips from the generated continuation to get the bare response.
_RESPONSE_MARKER = {"alpaca": "### Response:", "phi3": "<|assistant|>:"}


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise InputError(f"unknown prompt style {style!r}; choose one of {', '.join(PROMPT_STYLES)}")


def format_input(record: dict, style: str = "alpaca") -> str:
    """The prompt for one record: instruction, plus its input when there is one (the key may be absent)."""
    _check_style(style)
    extra = record.get("input") or ""
    if style == "alpaca":
        text = (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request."
            f"\n\n### Instruction:\n{record['instruction']}"
        )
        return text + (f"\n\n### Input:\n{extra}" if extra else "")
    return f"<|user|>\n{record['instruction']}" + (f"\n{extra}" if extra else "")


def response_header(style: str = "alpaca") -> str:
    """The text that joins a prompt and its response in a training example."""
    _check_style(style)
    return _RESPONSE_HEADER[style]


def format_example(record: dict, style: str = "alpaca") -> str:
    """Prompt, response header and the reference output: the full text a training example holds."""
    return format_input(record, style) + response_header(style) + record["output"]


def extract_response(generated_text: str, prompt: str, style: str = "alpaca") -> str:
    """The response part of ``generated_text`` (which starts with ``prompt``), as the book extracts it."""
    _check_style(style)
    return generated_text[len(prompt):].replace(_RESPONSE_MARKER[style], "").strip()
