"""``gpt2-scratch``: one command line for the whole pipeline.

    gpt2-scratch init | generate | chat | predict                 the model (gpt2_scratch/)
    gpt2-scratch convert openai | hf | book | export-hf | export-book | gguf    weights in and out (convert/)
    gpt2-scratch pretrain | sft | classify | dpo | push                     training and publishing (train/)
    gpt2-scratch respond | judge                                  evaluation (eval/)
    gpt2-scratch data dedup | prefs | generate                    the book's data tools (datatools/)

Every command declares its options as a typed dataclass (``core.args``), lives in the module of its
stage, and is imported only when it runs, so ``gpt2-scratch --help`` and the judge start at once.
The documented entry points are this same command line: ``python -m gpt2_scratch``, ``python -m
convert`` (the ``convert`` group), and the scripts ``train/pretrain.py``, ``train/sft.py``, ``train/classify.py``,
``train/dpo.py``, ``eval/generate.py`` (``respond``) and ``eval/judge.py`` (see ``run_script``).

One exit-code rule (``run_command``): 0 done; 2 bad input (``InputError`` and argparse's own errors);
1 the work failed (``Failure``, an OS error such as a full disk); 130 interrupted (Ctrl-C); 143 a training run
stopped by SIGTERM (train/stopping.py: after a checkpoint); 141 the reader of a command's printed result
closed the pipe (quietly, as tools ended by SIGPIPE). Errors are one line on stderr starting with
``error:``; a traceback means a bug. What a process prints goes through ``core.streams`` (characters the
terminal cannot show are replaced; a closed pipe never stops work whose output goes to files).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gpt2_scratch.core.errors import (EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, Failure, InputError, Terminated,
                                      describe_os_error, one_line)
from gpt2_scratch.core.streams import EXIT_PIPE_CLOSED, ResultPipeClosed, install_streams


@dataclass(frozen=True)
class Command:
    """A subcommand: where its argument dataclass and its ``run(args)`` function live."""

    module: str
    args_class: str
    run: str
    help: str
    # Commands that train or generate run with a caching malloc (core/allocator.py says why).
    caching_allocator: bool = False
    # The command's result is what it prints (not files): a closed standard output ends it (core/streams.py).
    prints_result: bool = False


COMMANDS: dict[str, Command | dict[str, Command]] = {
    "init": Command("gpt2_scratch.commands", "InitArgs", "run_init", "write a randomly initialised model folder"),
    "generate": Command("gpt2_scratch.commands", "GenerateArgs", "run_generate",
                        "continue a prompt with a model (raw completion; interactive without --prompt)",
                        prints_result=True),
    "chat": Command("gpt2_scratch.commands", "ChatArgs", "run_chat",
                    "talk to an instruction model in its prompt style, answers streamed (or one --prompt)",
                    prints_result=True),
    "predict": Command("gpt2_scratch.commands", "PredictArgs", "run_predict",
                       "label texts with a finetuned classifier (e.g. spam / ham)",
                       prints_result=True),
    "convert": {
        "openai": Command("gpt2_scratch.convert.cli", "OpenAIArgs", "run_openai", "OpenAI's released TF checkpoint → our model folder"),
        "hf": Command("gpt2_scratch.convert.cli", "HFArgs", "run_hf", "Hugging Face GPT2LMHeadModel (Hub repo or local) → our model folder"),
        "export-hf": Command("gpt2_scratch.convert.cli", "ExportHFArgs", "run_export_hf",
                             "our model folder → a standard transformers GPT2LMHeadModel folder"),
        "book": Command("gpt2_scratch.convert.cli", "BookArgs", "run_book",
                        "the book's GPTModel .pth (chapters 5-7) → our model folder"),
        "export-book": Command("gpt2_scratch.convert.cli", "ExportBookArgs", "run_export_book",
                               "our model folder → a .pth the book's GPTModel loads (prints its cfg)"),
        "gguf": Command("gpt2_scratch.convert.cli", "GGUFArgs", "run_gguf",
                        "our model folder → a GGUF file for llama.cpp and Ollama, with a Modelfile"),
    },
    "pretrain": Command("gpt2_scratch.train.pretrain", "PretrainArgs", "run", "pretrain a GPT-2 on raw text, from a short "
                        "story to a corpus bigger than memory (the book's chapter 5)", caching_allocator=True),
    "sft": Command("gpt2_scratch.train.sft", "SFTArgs", "run", "instruction-finetune a GPT-2 (the book's chapter 7)",
                   caching_allocator=True),
    "dpo": Command("gpt2_scratch.train.dpo", "DPOArgs", "run", "preference-tune an instruction model with DPO (the book's bonus: "
                   "polite over impolite answers)", caching_allocator=True),
    "classify": Command("gpt2_scratch.train.classify", "ClassifyArgs", "run", "finetune a GPT-2 text classifier (chapter 6: spam)",
                        caching_allocator=True),
    "push": Command("gpt2_scratch.train.publish", "PushArgs", "run_push",
                    "upload a model folder with a generated model card to the Hugging Face Hub"),
    "respond": Command("gpt2_scratch.eval.generate", "RespondArgs", "run", "add a model's responses to instruction records",
                       caching_allocator=True),
    "judge": Command("gpt2_scratch.eval.judge", "JudgeArgs", "run", "score responses 0-100 with an LLM judge (Ollama or "
                     "an OpenAI-compatible server)"),
    "data": {
        "dedup": Command("gpt2_scratch.datatools.dedup", "DedupArgs", "run",
                         "near-duplicate records (TF-IDF of character 1-3-grams, cosine; the book's method)"),
        "prefs": Command("gpt2_scratch.datatools.prefs", "PrefsArgs", "run",
                         "polite/impolite preference pairs for dpo, rewritten by a local LLM (the book's notebook)"),
        "generate": Command("gpt2_scratch.datatools.magpie", "GenerateArgs", "run",
                            "new instruction records from an instruct model given only the start of a user turn "
                            "(Magpie)"),
    },
}
# What a group of commands is for, in the overview.
GROUP_HELP = {"convert": "weights in and out", "data": "the book's data tools"}
# `python -m gpt2_scratch classify --model DIR --text ...` predicted labels before `predict` existed.
_PREDICT_FLAGS = ("--text",)


def _overview(prog: str, commands: dict, group: str | None = None) -> str:
    title = f"usage: {prog} {group + ' ' if group else ''}COMMAND [options]   ({prog} {group + ' ' if group else ''}COMMAND --help for its options)"
    lines = [title, "", "commands:"]
    width = max(len(name) for name in commands)
    for name, entry in commands.items():
        text = entry.help if isinstance(entry, Command) else f"{GROUP_HELP[name]}: " + ", ".join(entry)
        lines.append(f"  {name:<{width}}  {text}")
    return "\n".join(lines)


def resolve(argv: Sequence[str], prog: str, commands: dict) -> tuple[Command | None, str, list[str], int]:
    """(the command, its name, its arguments, 0) or, for help and unknown names, (None, "", [], exit code)."""
    path: list[str] = []
    rest = list(argv)
    while True:
        if not rest or rest[0] in ("-h", "--help"):
            print(_overview(prog, commands, " ".join(path) or None), file=sys.stdout if rest else sys.stderr)
            return None, "", [], 0 if rest else EXIT_BAD_INPUT
        name, rest = rest[0], rest[1:]
        if name == "classify" and commands is COMMANDS and any(a.split("=")[0] in _PREDICT_FLAGS for a in rest):
            name = "predict"
        entry = commands.get(name)
        if entry is None:
            print(f"{prog}: error: unknown command {name!r}; choose one of {', '.join(commands)}", file=sys.stderr)
            return None, "", [], EXIT_BAD_INPUT
        path.append(name)
        if isinstance(entry, Command):
            return entry, " ".join(path), rest, 0
        commands = entry


def run_command(work: Callable[[], int | None]) -> int:
    """Run ``work`` and turn how it ends into the exit code (the one rule, see the module docstring)."""
    try:
        return work() or 0
    except (InputError, Failure) as err:
        print(f"error: {one_line(err) or type(err).__name__}", file=sys.stderr, flush=True)
        return err.exit_code
    except OSError as err:
        print(f"error: {describe_os_error(err)}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    except KeyboardInterrupt as err:
        print("\ninterrupted", file=sys.stderr, flush=True)
        return err.exit_code if isinstance(err, Terminated) else EXIT_INTERRUPTED
    except ResultPipeClosed:  # `generate ... | head`: the reader has what it wanted
        return EXIT_PIPE_CLOSED


def execute(command: Command, argv: Sequence[str], *, prog: str, entry_point: bool) -> int:
    """Parse ``argv`` into the command's dataclass and run it; returns the exit code.

    As a process's entry point, a training or generating command first re-executes the process with
    a caching malloc preloaded (before torch is imported); called from Python it never re-executes.
    """
    if entry_point:
        install_streams(prints_result=command.prints_result)
    if entry_point and command.caching_allocator:
        from gpt2_scratch.core.allocator import use_caching_allocator

        code = run_command(use_caching_allocator)  # re-executes the process, or returns
        if code:
            return code
    from gpt2_scratch.core.args import check_values, parse_dataclass_args

    module = importlib.import_module(command.module)
    try:
        args, explicit = parse_dataclass_args(getattr(module, command.args_class), argv, prog=prog)
    except SystemExit as exit:  # --help (0) or argparse's one-line error (2)
        return int(exit.code or 0)
    if hasattr(args, "with_explicit"):  # profiles (sft --offline-demo) fill in only what was not given
        args = args.with_explicit(explicit)

    def work() -> int | None:
        check_values(args)  # every command checks its option values the same way (core/args.py)
        return getattr(module, command.run)(args)

    return run_command(work)


def main(argv: Sequence[str] | None = None, *, prog: str = "gpt2-scratch", group: str | None = None) -> int:
    """Run one command line (``argv`` without the program name); returns its exit code.

    ``group`` starts inside a group of commands (``python -m convert`` is the ``convert`` group).
    With ``argv=None`` this is a process's entry point (see ``execute``).
    """
    entry_point = argv is None
    if entry_point:  # the overview and --help are printed results too (`gpt2-scratch --help | head -1`)
        install_streams(prints_result=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        command, name, rest, code = resolve(argv, prog, COMMANDS[group] if group else COMMANDS)
        if command is None:
            return code
        return execute(command, rest, prog=f"{prog} {name}", entry_point=entry_point)
    except ResultPipeClosed:  # while printing the overview or a command's --help
        return EXIT_PIPE_CLOSED


def run_script(name: str) -> None:
    """Run the command ``name`` as its documented script (``python train/sft.py ARGS`` is ``gpt2-scratch sft ARGS``).

    The script's own folder (train/, eval/), which Python puts first on ``sys.path``, is removed first:
    its module names (data, generate, ...) must not shadow other packages. This is the only place the
    project touches ``sys.path``.
    """
    script = os.path.abspath(sys.argv[0])
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(script)]
    command = COMMANDS[name]
    assert isinstance(command, Command)
    try:
        sys.exit(execute(command, sys.argv[1:], prog=f"python {os.path.relpath(script)}", entry_point=True))
    except ResultPipeClosed:  # while printing --help
        sys.exit(EXIT_PIPE_CLOSED)
