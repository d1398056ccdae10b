"""The one command line: every command reachable from every documented entry point, one naming convention.

What a user types is checked as typed (the scripts and ``python -m`` forms in real processes); the
naming rules are checked over every command's options, so a new command cannot drift from them.
"""

import dataclasses
import importlib
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from gpt2_scratch.core.args import parse_dataclass_args
from gpt2_scratch.core.cli import COMMANDS, Command, main


def all_commands():
    for name, entry in COMMANDS.items():
        if isinstance(entry, Command):
            yield name, entry
        else:
            for sub, command in entry.items():
                yield f"{name} {sub}", command


def args_class(command: Command):
    return getattr(importlib.import_module(command.module), command.args_class)


@pytest.mark.parametrize("name, command", list(all_commands()), ids=[n for n, _ in all_commands()])
def test_every_command_has_help_and_follows_the_naming_rules(name, command, capsys):
    assert main([*name.split(), "--help"]) == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith(f"usage: gpt2-scratch {name} ")
    fields = {f.name: f for f in dataclasses.fields(args_class(command))}
    # One name per thing: the output is --out (a file or a folder), a prompt style is --prompt-style,
    # --model is always the model the command loads (the judge's model is --judge-model).
    assert not {"output_dir", "style", "file", "output", "prompt_format"} & set(fields), name
    assert all(f.metadata.get("help") for f in fields.values()), f"{name}: an option without help"
    if "model" in fields:
        assert "judge" not in fields["model"].metadata["help"], name


def test_older_spellings_still_parse_to_the_same_options():
    from gpt2_scratch.eval.judge import JudgeArgs
    from gpt2_scratch.train.sft import SFTArgs

    old, _ = parse_dataclass_args(SFTArgs, ["--output-dir", "runs/x", "--style", "phi3"])
    new, _ = parse_dataclass_args(SFTArgs, ["--out", "runs/x", "--prompt-style", "phi3"])
    assert old == new
    old, _ = parse_dataclass_args(JudgeArgs, ["--file", "r.json", "--model", "mistral"])
    new, _ = parse_dataclass_args(JudgeArgs, ["--data", "r.json", "--judge-model", "mistral"])
    assert old == new and new.judge_model == "mistral"


def test_overview_and_unknown_commands(capsys):
    assert main(["--help"]) == 0
    overview = capsys.readouterr().out
    assert all(f"  {name}" in overview for name in COMMANDS)
    assert main([]) == 2 and "usage: gpt2-scratch COMMAND" in capsys.readouterr().err
    assert main(["convert", "gguff"]) == 2
    assert "unknown command 'gguff'; choose one of openai, hf" in capsys.readouterr().err


def test_the_documented_entry_points_run_the_same_command_line():
    """As typed: the scripts, the two `python -m` forms and the console script, each asked for its help."""
    console = shutil.which("gpt2-scratch", path=str(REPO_ROOT / ".venv" / "bin")) or shutil.which("gpt2-scratch")
    forms = {
        "python train/sft.py": [sys.executable, "train/sft.py", "--help"],
        "python train/classify.py": [sys.executable, "train/classify.py", "--help"],
        "python eval/generate.py": [sys.executable, "eval/generate.py", "--help"],
        "python eval/judge.py": [sys.executable, "eval/judge.py", "--help"],
        "python -m convert": [sys.executable, "-m", "convert", "openai", "--help"],
        "python -m gpt2_scratch": [sys.executable, "-m", "gpt2_scratch", "push", "--help"],
    }
    if console:
        forms["gpt2-scratch"] = [console, "judge", "--help"]
    procs = {name: subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in forms.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {err}"
        assert out.startswith(f"usage: {name}"), (name, out[:200])
