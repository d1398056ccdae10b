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

Options shared by several commands are declared once, in a dataclass the commands' Args inherit
(train/options.py: every training run's options; train/lora.py: LoRA's); ``--help`` shows them in a
group titled by that class. A command that needs another default says so with ``redefault``. The
values are checked in one place, ``check_values``, from what each field declares: ``at_least`` /
``above`` / ``at_most`` / ``below`` bounds, and every float finite (``--lr nan`` is not a learning rate).
A flag's name comes from its field's name in one place, ``option_name``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from typing import Any, Callable, Literal


# Field metadata that is ours, not argparse's.
_CHECKS = ("at_least", "above", "at_most", "below", "plain_name")
_OURS = ("help", "aliases", *_CHECKS, "resume_may_change")


def arg(default: Any = dataclasses.MISSING, help: str = "", *, aliases: Sequence[str] = (),
        at_least: float | None = None, above: float | None = None, at_most: float | None = None,
        below: float | None = None, plain_name: bool = False, resume_may_change: bool = False,
        **argparse_kwargs: Any) -> Any:
    """A dataclass field carrying its option's help text, aliases, value bounds and extra argparse settings.

    Leave ``default`` out for a required option. ``at_least`` / ``above`` / ``at_most`` / ``below`` bound the
    value (``check_values``; None passes, it means "not set"). ``plain_name``: a string that becomes a file or
    folder name inside the command's output (a tracker run name), so it may not be a path
    (``check_plain_name``). ``resume_may_change``: a training run's
    ``--resume`` may change this option (how a run is watched or what happens after it), not what it computes.
    """
    metadata = {"help": help, "aliases": tuple(aliases), "at_least": at_least, "above": above, "at_most": at_most,
                "below": below, "plain_name": plain_name, "resume_may_change": resume_may_change, **argparse_kwargs}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def redefault(cls: type, name: str, default: Any, help: str | None = None) -> Any:
    """Field ``name`` of the options class ``cls`` with another default (and help): a command whose recipe
    differs (DPO's lr 5e-6) keeps the option's one declaration."""
    field = cls.__dataclass_fields__[name]
    metadata = dict(field.metadata)
    if help is not None:
        metadata["help"] = help
    ours = {k: metadata.pop(k) for k in _OURS if k in metadata}
    return arg(default, ours.pop("help", ""), **ours, **metadata)


def check_plain_name(value: str, flag: str) -> None:
    """``value`` names one file or folder (no separator, not ``.`` or ``..``, no NUL): a name given to a run must
    not lead its files out of the folder they belong in."""
    from gpt2_scratch.core.errors import InputError

    if not value.strip() or value in (".", "..") or any(c in value for c in "/\\\0"):
        raise InputError(f"{flag} {value!r}: must be a plain name (no '/', '\\', '..' or empty), since it names "
                         "a folder inside the run's output; choose another name")


def check_values(args: Any) -> None:
    """Every option's value against what its field declares; raises one InputError naming the option.

    Called once for every command, when its command line has been parsed (core/cli.py); a command run
    from Python calls it itself. Values are shown as typed (``4294967296``, ``2.0``), never rounded.
    """
    from gpt2_scratch.core.errors import InputError

    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and field.metadata.get("plain_name"):
                check_plain_name(v, option_name(field.name))
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            flag = option_name(field.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise InputError(f"{flag} must be a finite number, got {v}")
            problem = _out_of_bounds(v, field.metadata)
            if problem:
                raise InputError(f"{flag} must be {problem}, got {v}")


def _out_of_bounds(v: float, meta: Any) -> str | None:
    """What ``v`` must be by the bounds in ``meta`` when it is not (None: within them). Two bounds are said
    as one interval: "in (0, 1]"."""
    low, low_open = (meta["above"], True) if meta.get("above") is not None else (meta.get("at_least"), False)
    high, high_open = (meta["below"], True) if meta.get("below") is not None else (meta.get("at_most"), False)
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if not (too_low or too_high):
        return None
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if too_low:
        return f"greater than {low}" if low_open else f"at least {low}"
    return f"less than {high}" if high_open else f"at most {high}"


def resume_may_change(cls: type) -> set[str]:
    """The options of ``cls`` a resumed training run may change."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("resume_may_change")}


def option_name(field_name: str) -> str:
    """The flag of a field: ``max_new_tokens`` → ``--max-new-tokens`` (the only place a flag name is built)."""
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


def _declaring_class(cls: type, name: str) -> type:
    """The class of ``cls``'s MRO that declared field ``name`` first (a ``redefault`` keeps its base's group)."""
    for klass in reversed(cls.__mro__):
        if name in getattr(klass, "__dataclass_fields__", {}):
            return klass
    return cls


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add one option per field of dataclass ``cls`` to ``parser``: the command's own options first, then
    one group per shared options class it inherits (titled by that class's docstring)."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    # Required options first in --help.
    fields = sorted(fields, key=lambda f: f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
    owners = sorted({_declaring_class(cls, f.name) for f in fields} - {cls}, key=cls.__mro__.index)
    groups = {owner: parser.add_argument_group((owner.__doc__ or owner.__name__).strip().split("\n")[0])
              for owner in owners}
    by_owner = sorted(fields, key=lambda f: (0 if _declaring_class(cls, f.name) is cls else
                                             1 + list(groups).index(_declaring_class(cls, f.name))))
    for field in by_owner:
        owner = _declaring_class(cls, field.name)
        target = parser if owner is cls else groups[owner]
        meta = {k: v for k, v in field.metadata.items() if k not in _CHECKS and k != "resume_may_change"}
        names = [option_name(field.name), *meta.pop("aliases", ())]
        help_text = meta.pop("help", "")
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = None if required else (field.default if field.default is not dataclasses.MISSING
                                          else field.default_factory())
        annotation = hints[field.name]
        if annotation is bool or annotation == (bool | None):
            # --flag / --no-flag (``bool | None``: None when neither is given, the command decides), unless the
            # field asks for one plain action (``no_cache``: --no-cache only).
            action = meta.pop("action", argparse.BooleanOptionalAction)
            target.add_argument(*names, action=action, default=default, help=help_text, dest=field.name)
            continue
        arg_type, choices, is_list = _type_and_choices(annotation)
        if is_list:
            meta.setdefault("nargs", "+")
        target.add_argument(*names, type=meta.pop("type", arg_type), choices=meta.pop("choices", choices),
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
