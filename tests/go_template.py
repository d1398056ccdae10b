"""A tiny renderer for the subset of Go's text/template that our Ollama TEMPLATEs use, and Ollama's
way of calling a template, so tests can render a Modelfile's TEMPLATE without Go or Ollama.

Subset: text; ``{{ .Field }}`` and ``{{ $var }}``; ``{{ $var := "literal" }}`` and ``{{ $var = .Field }}``;
``{{ if PIPE }} … {{ else }} … {{ end }}`` with PIPE one of ``.Field``, ``$var`` or ``eq ARG "literal"``;
``{{ range .Field }} … {{ end }}``; ``{{-`` / ``-}}`` whitespace trimming. Anything else raises, so a
template that leaves the subset fails the test instead of being rendered wrongly.

Semantics follow Go: a variable's scope runs to the ``end`` of the block it is declared in, ``=``
assigns to the innermost visible declaration (so assigning inside a ``range`` changes the outer
variable), the empty string is false.

`ollama_execute` mirrors ollama/template.Execute for templates that mention ``.Messages``: consecutive
messages of one role are merged with a blank line, all system messages are joined into ``.System``, and
the template runs once with ``Messages``, ``System`` and an empty ``Response``.
"""

from __future__ import annotations

import functools
import re

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_STRING = re.compile(r'^"((?:[^"\\]|\\.)*)"$')


def _tokens(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)], with the trim markers applied to the neighbouring text."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2)))
        pos, trim_next = m.end(), bool(m.group(3))
    text = template[pos:]
    out.append(("text", text.lstrip() if trim_next else text))
    return out


def _parse(tokens, i=0, stop=("end",)):
    """Nodes until one of `stop` actions; returns (nodes, index of the stop action, its word)."""
    nodes = []
    while i < len(tokens):
        kind, body = tokens[i]
        if kind == "text":
            nodes.append(("text", body))
            i += 1
            continue
        word = body.split(None, 1)[0] if body else ""
        if word in stop:
            return nodes, i, word
        if word in ("if", "range"):
            then, i, found = _parse(tokens, i + 1, ("end", "else") if word == "if" else ("end",))
            otherwise = []
            if found == "else":
                otherwise, i, found = _parse(tokens, i + 1, ("end",))
            if found != "end":
                raise ValueError(f"unterminated {{{{ {body} }}}}")
            nodes.append((word, body.split(None, 1)[1], then, otherwise))
            i += 1
            continue
        if word in ("else", "end"):
            raise ValueError(f"unexpected {{{{ {body} }}}}")
        nodes.append(("action", body))
        i += 1
    return nodes, i, None


class _Scope:
    def __init__(self):
        self.frames: list[dict] = [{}]

    def declare(self, name, value):
        self.frames[-1][name] = value

    def assign(self, name, value):
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise ValueError(f"assignment to undeclared variable {name}")

    def get(self, name):
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise ValueError(f"undefined variable {name}")


def _value(arg: str, dot, scope: _Scope):
    if m := _STRING.match(arg):
        return bytes(m.group(1), "utf-8").decode("unicode_escape")
    if arg.startswith("$"):
        return scope.get(arg)
    if arg.startswith("."):
        value = dot
        for part in arg[1:].split("."):
            value = value.get(part, "") if isinstance(value, dict) else getattr(value, part)
        return value
    raise ValueError(f"unsupported argument {arg!r}")


def _pipe(expr: str, dot, scope: _Scope):
    parts = expr.split()
    if parts[0] == "eq" and len(parts) == 3:
        return _value(parts[1], dot, scope) == _value(parts[2], dot, scope)
    if len(parts) == 1:
        return _value(parts[0], dot, scope)
    raise ValueError(f"unsupported pipeline {expr!r}")


def _run(nodes, dot, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "action":
            body = node[1]
            if m := re.fullmatch(r"(\$\w+)\s*(:?=)\s*(.+)", body):
                value = _pipe(m.group(3), dot, scope)
                (scope.declare if m.group(2) == ":=" else scope.assign)(m.group(1), value)
            else:
                value = _pipe(body, dot, scope)
                if not isinstance(value, str):
                    raise ValueError(f"{{{{ {body} }}}} is not a string")
                out.append(value)
        elif kind == "if":
            _, expr, then, otherwise = node
            scope.frames.append({})
            _run(then if _pipe(expr, dot, scope) else otherwise, dot, scope, out)
            scope.frames.pop()
        elif kind == "range":
            _, expr, body, _ = node
            for item in _pipe(expr, dot, scope):
                scope.frames.append({})
                _run(body, item, scope, out)
                scope.frames.pop()


@functools.cache
def _compile(template: str) -> list:
    nodes, _, found = _parse(_tokens(template))
    if found is not None:
        raise ValueError(f"unexpected {{{{ {found} }}}}")
    return nodes


def render(template: str, data: dict) -> str:
    nodes = _compile(template)
    out: list[str] = []
    _run(nodes, data, _Scope(), out)
    return "".join(out)


def ollama_execute(template: str, messages: list[dict]) -> str:
    """What Ollama sends to the model for a chat (or a generate with system + prompt).

    Templates without ``.Messages`` (Ollama's legacy path) are modelled for one system and one user
    message only: a single execution with ``.System``, ``.Prompt`` and an empty ``.Response``.
    """
    if ".Messages" not in template:
        roles = [m["role"] for m in messages]
        if roles not in (["user"], ["system", "user"]):
            raise ValueError("legacy (.Prompt) templates are modelled for a single turn only")
        system = messages[0]["content"] if roles[0] == "system" else ""
        return render(template, {"System": system, "Prompt": messages[-1]["content"], "Response": ""})
    collated: list[dict] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return render(template, {"Messages": collated, "System": system, "Response": ""})


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """[(command, argument)] as Ollama's Modelfile parser reads `text` (its rune-by-rune rules).

    A line starts a command word (or a ``#`` comment); the argument runs to the end of the line, except
    that a quoted argument (``"…"`` or ``\"\"\"…\"\"\"``) continues over newlines until its closing quotes
    end a line. Surrounding whitespace is trimmed, quotes removed, characters that are not printable
    (other than the newlines inside quotes) dropped. PARAMETER's argument is "NAME VALUE".
    """

    def unquote(s: str) -> tuple[str, bool]:
        if s.startswith('"""'):
            return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
        if s.startswith('"'):
            return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
        return s, True

    commands: list[tuple[str, str]] = []
    for_line = iter(text.splitlines(keepends=True))
    for line in for_line:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        word, _, rest = stripped.partition(" ")
        if word.lower() == "parameter":
            name, _, rest = rest.partition(" ")
            word = name
        buffer = rest
        value, ok = unquote(buffer.strip())
        while not ok:  # a quoted value spanning lines: keep the newline, read on
            line = next(for_line, None)
            if line is None:
                raise ValueError(f"unterminated quoted value for {word}")
            buffer += "\n" + line.rstrip("\r\n")
            value, ok = unquote(buffer.strip())
        commands.append((word.lower(), "".join(c for c in value if c.isprintable() or c in "\n\t")))
    return commands
