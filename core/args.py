"""The one argument convention: a typed dataclass, one field per option, becomes an argparse parser.

    @dataclass
    class SFTArgs:
        model: str = arg("gpt2-medium", "model folder, Hub repo id or preset")
        lr: float = arg(5e-5, "peak learning rate (AdamW)")
        out: str = arg("runs/sft", "output folder", aliases=("--output-dir",))

Each field ``some_name`` is the option ``--some-name``; its type gives the conversion (``int``, ``float``,
``str``, ``X | None``, ``Literal[...]`` as choices, ``bool`` as ``--flag`` / ``--no-flag``, ``list[str]`` as one
or more values), its default the default, ``arg``'s help the help text and ``aliases`` older or shorter
spellings that keep working. A field without a default is a required option. Every command of
``gpt2-scratch`` is declared this way (core/cli.py lists them), so the same thing has the same flag
name everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, Callable, Literal


def arg(default: Any = dataclasses.MISSING, help: str = "", *, aliases: Sequence[str] = (),
        **argparse_kwargs: Any) -> Any:
    """A dataclass field carrying its option's help text, aliases and any extra argparse settings.

    Leave ``default`` out for a required option.
    """
    metadata = {"help": help, "aliases": tuple(aliases), **argparse_kwargs}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _type_and_choices(annotation: Any) -> tuple[Callable | None, list | None, bool]:
    """(type, choices, is_list) of a field annotation such as ``int``, ``str | None``, ``Literal["a", "b"]``."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), choices, False
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _type_and_choices(inner[0]) if len(inner) == 1 else (str, None, False)
    if origin is list:
        item_type, choices, _ = _type_and_choices(typing.get_args(annotation)[0])
        return item_type, choices, True
    return annotation, None, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add one option per field of dataclass ``cls`` to ``parser``."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    # Required options first in --help (a subclass's own fields come after its base's in the dataclass).
    fields = sorted(fields, key=lambda f: f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
    for field in fields:
        meta = dict(field.metadata)
        names = [option_name(field.name), *meta.pop("aliases", ())]
        help_text = meta.pop("help", "")
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = None if required else (field.default if field.default is not dataclasses.MISSING
                                          else field.default_factory())
        annotation = hints[field.name]
        if annotation is bool:
            # --flag / --no-flag, unless the field asks for one plain action (``no_cache``: --no-cache only).
            action = meta.pop("action", argparse.BooleanOptionalAction)
            parser.add_argument(*names, action=action, default=default, help=help_text, dest=field.name)
            continue
        arg_type, choices, is_list = _type_and_choices(annotation)
        if is_list:
            meta.setdefault("nargs", "+")
        parser.add_argument(*names, type=meta.pop("type", arg_type), choices=meta.pop("choices", choices),
                            default=default, required=required, help=help_text, dest=field.name, **meta)
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.required:
            return action.help or ""
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors as one line like every other error of the project (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser(cls: type, *, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """A parser for dataclass ``cls`` whose description is the first paragraph of its docstring."""
    parser = ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip().split("\n\n")[0],
                            formatter_class=HelpFormatter)
    return add_dataclass_arguments(parser, cls)


def parse_dataclass_args(cls: type, argv: Sequence[str] | None = None, *, prog: str | None = None):
    """Parse ``argv`` into an instance of ``cls``; also return the names of the options given explicitly
    (so a profile such as ``--offline-demo`` can fill in only what the user left at its default)."""
    parser = build_parser(cls, prog=prog)
    namespace = parser.parse_args(argv)
    # A second parse with every default suppressed tells which options were on the command line.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    explicit = set(vars(parser.parse_args(argv)))
    return cls(**vars(namespace)), explicit
