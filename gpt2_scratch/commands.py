"""The model's own commands: make a model folder, continue a prompt, label texts with a classifier.

    gpt2-scratch init --preset gpt2-small --out DIR [--n-layers N ...]
    gpt2-scratch generate --model DIR [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-k K]
    gpt2-scratch chat --model DIR [--prompt "..."] [--temperature T] [--top-k K] [--max-new-tokens N]
    gpt2-scratch predict --model DIR --text "..."      (also: python -m gpt2_scratch classify --text ...)

``--model`` is what every command of the project takes: a model folder, a preset (gpt2-small …
gpt2-xl: OpenAI's weights, converted and cached on first use) or a Hub repo id (convert/resolve.py).
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from typing import Literal

from gpt2_scratch.core.args import arg, option_name
from gpt2_scratch.core.errors import InputError, unicode_problem

MODEL_HELP = "model folder, preset (gpt2-small|gpt2-medium|gpt2-large|gpt2-xl: OpenAI's weights) or Hub repo id"
UTF8_HINT = "use a UTF-8 terminal or locale, or convert the text with iconv -t UTF-8"
MIN_TEMPERATURE = 1e-4  # below it sampling is greedy decoding in all but its overflows


def check_text(text: str, option: str) -> str:
    """``text`` given with ``option`` (--prompt, --text ...), refused in one line when it is not UTF-8.

    Under a locale that is not UTF-8 (LANG=C with Python's UTF-8 mode off) Python decodes argv as ASCII, so
    UTF-8 text arrives as undecodable bytes: then the locale, not the text, is named as the cause.
    """
    problem = unicode_problem(text, from_bytes=True)
    if problem:
        locale_problem = _locale_problem(text)
        raise InputError(f"{option} {locale_problem}" if locale_problem else f"{option} is {problem}; {UTF8_HINT}")
    return text


def _locale_problem(text: str) -> str | None:
    """Why the locale, not ``text``, is at fault: its bytes are valid UTF-8 that the locale's encoding cannot read."""
    import os

    encoding = sys.getfilesystemencoding()
    if encoding.lower().replace("-", "") == "utf8":
        return None
    try:
        os.fsencode(text).decode("utf-8")
    except UnicodeDecodeError:
        return None
    setting = next((f"{name}={os.environ[name]}" for name in ("LC_ALL", "LC_CTYPE", "LANG") if os.environ.get(name)),
                   "no LANG")
    return (f"is UTF-8 text, but this process's locale ({setting}: {encoding}) cannot read it; run with a UTF-8 "
            "locale (LANG=C.UTF-8) or PYTHONUTF8=1")


def stdin_line(line: str, number: int) -> str:
    """One line read from standard input, without its line ending (\\n or \\r\\n), checked like an option."""
    return check_text(line.rstrip("\r\n"), f"standard input line {number}")


def check_stdin_open(what: str) -> None:
    """Refuse in one line to read standard input when the process has none (started with ``<&-``, or by
    a service manager): ``sys.stdin`` is then None. ``what`` says what to give instead."""
    if sys.stdin is None:
        raise InputError(f"standard input is closed, so there is nothing to read; {what}")


def read_stdin_line(prompt: str, number: int) -> str:
    """``input(prompt)`` as a checked ``stdin_line``. Invalid bytes arrive as surrogates (Python's
    surrogateescape) or, under a locale that decodes strictly, as a UnicodeDecodeError: both are refused."""
    try:
        return stdin_line(input(prompt), number)
    except UnicodeDecodeError as err:
        raise undecodable_stdin(err) from None


def undecodable_stdin(err: UnicodeDecodeError) -> InputError:
    # Decoded a buffer at a time, not a line: which line holds the byte is not known here.
    return InputError(f"standard input is not valid UTF-8 (byte 0x{err.object[err.start]:02x}); {UTF8_HINT}")


# ---------------------------------------------------------------------------------------------------
# init
# ---------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ShapeOptions:
    """the model's shape: a preset's, with these overrides (init; sft with --random-init)"""

    n_layers: int | None = arg(None, "override the preset's number of blocks", at_least=1)
    emb_dim: int | None = arg(None, "override the preset's embedding width", at_least=1)
    n_heads: int | None = arg(None, "override the preset's attention heads", at_least=1)
    context_length: int | None = arg(None, "override the preset's context length (1024)", at_least=1)


SHAPE_OPTIONS = tuple(ShapeOptions.__dataclass_fields__)


@dataclass(kw_only=True)
class InitArgs(ShapeOptions):
    """Write a randomly initialised model folder (shape overrides make tiny models for tests and demos)."""

    preset: Literal["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"] = arg(help="GPT-2 size to start from")
    out: str = arg(help="model folder to create")
    seed: int = arg(123, "seed of the random init", at_least=0, at_most=2**64 - 1)  # torch.manual_seed's range
    untied: bool = arg(False, "give the LM head its own weights instead of sharing the token embedding's")
    overwrite: bool = arg(False, "replace an existing folder")


def shape_options(args: ShapeOptions) -> dict[str, int]:
    """The shape options given in ``args``, by field name."""
    return {name: getattr(args, name) for name in SHAPE_OPTIONS if getattr(args, name) is not None}


def preset_config(preset: str, shape: dict[str, int], *, command: str, **fields):
    """``preset``'s config with the shape options the user typed (``shape``, by field name, each already at
    least 1: ``check_values``), refused in the options' own names when no model has that shape, and before
    anything is allocated when its weights alone would not fit in memory. ``command`` ("init --preset
    gpt2-small") starts the memory message; ``fields`` are other config fields (tie_word_embeddings)."""
    from . import PRESETS, GPT2ScratchConfig
    from .model_dir import check_fits_in_memory

    # Checked here, not left to the config, whose message names its fields: each value is named as the user
    # sees it, the option they typed or the preset's value they left alone.
    full_shape = {**PRESETS[preset], **shape}
    if full_shape["emb_dim"] % full_shape["n_heads"]:
        def said(name: str) -> str:
            return f"{option_name(name)} {shape[name]}" if name in shape else f"{preset}'s {name} {full_shape[name]}"

        raise InputError(f"{said('emb_dim')} is not divisible by {said('n_heads')}; give --n-heads among the "
                         f"divisors of {full_shape['emb_dim']}, or an --emb-dim that is a multiple of "
                         f"{full_shape['n_heads']}")
    try:
        config = GPT2ScratchConfig.from_preset(preset, **shape, **fields)
    except ValueError as err:
        raise InputError(str(err)) from None
    typed = "".join(f" {option_name(name)} {value}" for name, value in shape.items())
    check_fits_in_memory(config, f"{command}{typed}", "choose a smaller preset, --emb-dim, --n-layers or "
                         "--context-length")
    return config


def run_init(args: InitArgs) -> None:
    import torch

    from gpt2_scratch.core.files import check_output_dir, claimed_output

    from . import GPT2ScratchForCausalLM, save_model_dir

    check_output_dir(args.out)
    config = preset_config(args.preset, shape_options(args), command=f"init --preset {args.preset}",
                           tie_word_embeddings=not args.untied)
    with claimed_output(args.out):  # one run per output at a time (core.files.claimed_output)
        torch.manual_seed(args.seed)
        model = GPT2ScratchForCausalLM(config)
        save_model_dir(model, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {args.preset} ({model.num_parameters():,} parameters, random init, seed {args.seed})")


# ---------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SamplingArgs:
    """The book's generation settings, shared by ``generate`` and ``chat``."""

    max_new_tokens: int | None = arg(None, "tokens to generate at most (default 50, or half the model's context "
                                           "when that is less)", at_least=1)
    temperature: float = arg(0.0, "0 = greedy (the book's default); > 0 samples: top-k first, then temperature",
                             at_least=0)
    top_k: int | None = arg(None, "sample only among the k most likely tokens", at_least=1)
    top_p: float = arg(1.0, "nucleus sampling threshold in (0, 1] (1 = off)", above=0, at_most=1)
    seed: int = arg(123, "seed for sampling", at_least=0, at_most=2**64 - 1)  # torch.manual_seed's range

    def check_temperature(self) -> None:
        """A temperature so close to 0 that logits / T overflow to inf, and sampling fails on NaN: refused."""
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise InputError(f"--temperature {self.temperature:g} is too close to 0 to sample with; use 0 (greedy) or "
                             f"at least {MIN_TEMPERATURE:g}")

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``model.generate``: greedy at temperature 0, else the book's sampling."""
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k or 0, "top_p": self.top_p}


@dataclass(kw_only=True)
class GenerateArgs(SamplingArgs):
    """Continue a prompt with a model (raw completion), streaming tokens; interactive without --prompt."""

    model: str = arg(help=MODEL_HELP)
    prompt: str | None = arg(None, "text to continue; omit it for an interactive loop (an empty line ends)")
    ignore_eos: bool = arg(False, "keep going past <|endoftext|>")


def new_token_budget(typed: int | None, default: int, context: int, spec: str) -> int:
    """How many tokens to generate at most: the --max-new-tokens the user typed (refused when it leaves no
    room for a prompt in the model's ``context``), else ``default``, capped to half the context with a notice
    (a default must fit every model: `make demo`'s has a 128-token context)."""
    if typed is not None:
        if typed >= context:
            raise InputError(f"--max-new-tokens {typed} leaves no room for a prompt in the {context}-token context "
                             f"of {spec}; ask for at most {context - 1}")
        return typed
    if default < context // 2 or context < 2:
        return default
    print(f"[at most {context // 2} new tokens: the default {default} does not fit the {context}-token context of "
          f"{spec}; set --max-new-tokens to choose]", file=sys.stderr)
    return context // 2


def load_for_generation(spec: str, max_new_tokens: int | None, default: int):
    """(model, tokenizer, longest prompt, new tokens at most) for ``spec`` (``new_token_budget``)."""
    from gpt2_scratch.convert.resolve import load_model, load_tokenizer

    model = load_model(spec)
    context = model.config.max_position_embeddings
    budget = new_token_budget(max_new_tokens, default, context, spec)
    return model, load_tokenizer(spec), context - budget, budget


def crop_prompt(ids: list[int], max_prompt: int) -> list[int]:
    """As the book's generate(): keep the last tokens that fit, so the continuation follows the end."""
    if not ids:
        raise InputError("the prompt is empty after tokenization; give some text")
    if len(ids) > max_prompt:
        print(f"[prompt cropped from the left: {len(ids)} → {max_prompt} tokens]", file=sys.stderr)
        ids = ids[-max_prompt:]
    return ids


def run_generate(args: GenerateArgs) -> None:
    import torch
    from transformers import TextStreamer

    from .tokenizer import ENDOFTEXT_ID, encode_user_text

    args.check_temperature()
    if args.prompt is not None:
        check_text(args.prompt, "--prompt")
    else:  # before the model loads: a closed stdin costs no load
        check_stdin_open("give the text with --prompt, or pipe prompts in")
    model, tokenizer, max_prompt, max_new_tokens = load_for_generation(args.model, args.max_new_tokens, 50)

    def complete(prompt: str) -> None:
        ids = crop_prompt(encode_user_text(tokenizer, prompt), max_prompt)  # crop_prompt says what it cut
        torch.manual_seed(args.seed)
        with torch.inference_mode():
            model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=max_new_tokens, eos_token_id=None if args.ignore_eos else ENDOFTEXT_ID,
                           pad_token_id=ENDOFTEXT_ID, streamer=TextStreamer(tokenizer, skip_special_tokens=True),
                           **args.generate_kwargs())

    if args.prompt is not None:
        complete(args.prompt)
        return
    print("Type a prompt and press Enter (an empty line or 'quit' ends).", file=sys.stderr)
    for number in itertools.count(1):
        try:
            line = read_stdin_line("> ", number)
        except EOFError:
            break
        if line.strip() in ("", "quit", "exit"):
            break
        complete(line)


# ---------------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------------

QUIT_WORDS = ("/quit", "/exit", "/bye")


@dataclass(kw_only=True)
class ChatArgs(SamplingArgs):
    """Talk to an instruction-tuned model: each message is wrapped in its prompt style, the answer streams."""

    model: str = arg(help="instruction model folder (e.g. the output of `gpt2-scratch sft`), preset or Hub repo id")
    prompt: str | None = arg(None, "one message: print its answer and exit (without it, an interactive chat)")
    input: str | None = arg(None, "with --prompt: the record's input text (the book's '### Input:' part)")
    prompt_style: Literal["alpaca", "phi3", "chat"] | None = arg(
        None, "how messages are wrapped (default: the style the model was trained with, else alpaca)",
        aliases=("--style",))
    max_new_tokens: int | None = arg(None, "tokens per answer at most (default 256, or half the model's context "
                                           "when that is less)", at_least=1)


def chat_prompt(message: str, style: str, input_text: str | None = None) -> str:
    """What the model sees for one message: the training prompt up to and including the response header,
    so the answer is the first thing it writes (training examples are exactly this text + the answer).
    The model folder's chat template renders the same text for [system: input, user: message]."""
    from gpt2_scratch.core.prompts import generation_prompt

    return generation_prompt({"instruction": message, "input": input_text or ""}, style)


def run_chat(args: ChatArgs) -> None:
    import torch
    from transformers import TextStreamer

    from gpt2_scratch.core.prompts import CHAT_STYLE

    from .chat_history import fit_history
    from .tokenizer import ENDOFTEXT_ID, encode_user_text

    args.check_temperature()
    for option, text in (("--prompt", args.prompt), ("--input", args.input)):
        if text is not None:
            check_text(text, option)
    if args.prompt is None:  # before the model loads: a closed stdin costs no load
        check_stdin_open("give the message with --prompt, or pipe messages in")
    model, tokenizer, max_prompt, max_new_tokens = load_for_generation(args.model, args.max_new_tokens, 256)
    style = args.prompt_style or getattr(model.config, "prompt_style", None) or "alpaca"
    # The chat style keeps the conversation (system: --input); the book's styles answer each message on its own.
    history: list[dict] = [{"role": "system", "content": args.input}] if style == CHAT_STYLE and args.input else []

    def answer(message: str, input_text: str | None = None) -> None:
        nonlocal history
        if style == CHAT_STYLE:
            history, ids = fit_history(tokenizer, [*history, {"role": "user", "content": message}], max_prompt)
            ids = crop_prompt(ids, max_prompt)  # the newest message alone too long: cropped as any prompt
        else:
            ids = crop_prompt(encode_user_text(tokenizer, chat_prompt(message, style, input_text)), max_prompt)
        torch.manual_seed(args.seed)
        # skip_prompt: only the answer streams, token by token, as it is generated.
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, eos_token_id=ENDOFTEXT_ID, pad_token_id=ENDOFTEXT_ID,
                                 streamer=streamer, **args.generate_kwargs())
        if style == CHAT_STYLE:  # the answer joins the history as text, as a client sends it back
            history.append({"role": "assistant", "content": tokenizer.decode(out[0, len(ids):],
                                                                             skip_special_tokens=True)})

    if args.prompt is not None:
        answer(args.prompt, args.input)
        return
    if args.input is not None and style != CHAT_STYLE:
        raise InputError("--input goes with --prompt; in the chat, type the instruction and its input together")
    interactive = sys.stdin.isatty()
    if interactive:
        kept = "the conversation is kept while it fits the context" if style == CHAT_STYLE else \
            "each message is answered on its own"
        print(f"Chatting with {args.model} ({style} prompts; {kept}). Type /quit or press Ctrl-D to leave.",
              file=sys.stderr)
    for number in itertools.count(1):
        try:
            message = read_stdin_line("you> " if interactive else "", number)
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print(file=sys.stderr)
            break
        if message.strip().lower() in QUIT_WORDS:
            break
        if not message.strip():
            continue
        if interactive:
            print("model> ", end="", flush=True)
        try:
            answer(message)
        except KeyboardInterrupt:  # stop this answer, keep the chat
            print("\n[answer stopped]", file=sys.stderr)
            if history and history[-1]["role"] == "user":
                history.pop()  # the unanswered message leaves the history


# ---------------------------------------------------------------------------------------------------
# predict (classify texts)
# ---------------------------------------------------------------------------------------------------


@dataclass
class PredictArgs:
    """Print the predicted label and its probability for each --text (or each stdin line with -)."""

    model: str = arg(help="classifier folder (the output of `gpt2-scratch classify`)")
    text: list[str] = arg(help="texts to classify, or '-' to read one text per line from stdin",
                          action="extend")


def classify_texts(model, tokenizer, texts: list[str]) -> list[tuple[str, float]]:
    """(label, probability) of the most likely class for each text, one forward pass per text.

    Texts are truncated to the length the classifier was trained with (``classification_max_length`` in
    its config, else the context), as the book's ``classify_review`` does; a note says so.
    """
    import torch

    from .tokenizer import encode_user_text  # deferred with torch: --help stays quick

    config = model.config
    max_length = min(getattr(config, "classification_max_length", None) or config.max_position_embeddings,
                     config.max_position_embeddings)
    results = []
    with torch.inference_mode():
        for index, text in enumerate(texts):
            ids = encode_user_text(tokenizer, text)  # too long: cropped below, with a note of our own
            if not ids:
                raise InputError(f"--text {index + 1} is empty after tokenization; give some text")
            if len(ids) > max_length:
                print(f"[text {index + 1} cropped to its first {max_length} of {len(ids)} tokens, the length the "
                      "classifier was trained with]", file=sys.stderr)
                ids = ids[:max_length]
            logits = model(input_ids=torch.tensor([ids])).logits  # (1, num_labels); no padding, no mask
            probs = logits.float().softmax(-1)[0]
            best = int(probs.argmax())
            results.append((config.id2label.get(best, str(best)), float(probs[best])))
    return results


def run_predict(args: PredictArgs) -> None:
    from .model_dir import load_model_dir
    from .tokenizer import get_tokenizer

    for number, text in enumerate(args.text, start=1):  # checked before the model loads: a bad one costs no load
        check_text(text, f"--text {number}" if len(args.text) > 1 else "--text")
    if "-" in args.text:
        check_stdin_open("give the texts with --text instead of '-'")
    model = load_model_dir(args.model, head="classifier")
    texts: list[str] = []
    for text in args.text:
        texts.extend(_stdin_texts() if text == "-" else [text])
    for text, (label, prob) in zip(texts, classify_texts(model, get_tokenizer(), texts)):
        print(f"{label}\t{prob:.4f}" + (f"\t{text}" if len(texts) > 1 else ""))


def _stdin_texts() -> list[str]:
    """The non-blank lines of standard input, each checked and without its line ending (CRLF files too)."""
    try:
        return [stdin_line(line, number) for number, line in enumerate(sys.stdin, start=1) if line.strip()]
    except UnicodeDecodeError as err:
        raise undecodable_stdin(err) from None
