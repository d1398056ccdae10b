"""The layout of train/: layers point down (no import circles), no module too long to read, no function
too long to follow, and a function-local import only where it defers a heavy one (and says so).

Read from the source with ``ast``, every import counted, function-local ones included: a circle hidden
behind an import inside a function is still a circle (shared/docs/STYLE.md, habit 12).
"""

import ast
from pathlib import Path

import pytest
from conftest import REPO_ROOT

TRAIN = REPO_ROOT / "train"
PACKAGE = "gpt2_scratch.train"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    return {path.stem: path for path in sorted(TRAIN.glob("*.py")) if path.stem != "__init__"}


def imported_train_modules(path: Path) -> set[str]:
    """The modules of train/ that ``path`` imports, anywhere in it: ``gpt2_scratch.train.X``, ``from
    gpt2_scratch.train import X`` (X a module) and relative imports."""
    names = set(modules())
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name.split(".")[2])
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                module = f"{PACKAGE}.{module}" if module else PACKAGE
            if module == PACKAGE:
                found.update(alias.name for alias in node.names if alias.name in names)
            elif module.startswith(PACKAGE + "."):
                found.add(module.split(".")[2])
    return found & names


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_circles_direct_and_through_others():
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"run": {"lora"}, "lora": {"publish"}, "publish": {"run"}}) == ["lora", "publish", "run", "lora"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_reader_sees_function_local_and_package_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from gpt2_scratch.train.loop import fit\n"
                      "def f():\n    from gpt2_scratch.train import lora\n    import gpt2_scratch.train.state as s\n"
                      "    from . import run\n    from .task import Task\n")
    assert imported_train_modules(source) == {"loop", "lora", "state", "run", "task"}


def test_no_module_of_train_imports_one_that_imports_it_back():
    graph = {name: imported_train_modules(path) - {name} for name, path in modules().items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import circle in train/: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_and_functions_stay_short(name):
    path = modules()[name]
    source = path.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"train/{name}.py: over {MAX_MODULE_LINES} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"train/{name}.py:{node.lineno} {node.name}: {length} lines"


def is_import_line(line: str) -> bool:
    return line.lstrip().startswith(("import ", "from "))


@pytest.mark.parametrize("name", sorted(modules()))
def test_a_function_local_import_says_what_it_defers(name):
    """Inside a function an import is there to defer a heavy module (torch, transformers, accelerate, peft,
    huggingface_hub ...) and its comment says so: ``# deferred: ...`` on it or on an import of the group of
    imports just above it. A module of train/ is never imported inside a function (that is how circles hide)."""
    path = modules()[name]
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            where = f"train/{name}.py:{node.lineno}"
            assert not imports_train_module(node), f"{where}: a module of train/ imported inside a function"
            i = node.lineno - 1
            group = [lines[i]]
            while i > 0 and (is_import_line(lines[i - 1]) or not lines[i - 1].strip()):
                i -= 1
                group.append(lines[i])
            assert any("# deferred" in line for line in group), f"{where}: a function-local import without " \
                                                                 "'# deferred: why'"


def imports_train_module(node) -> bool:
    if isinstance(node, ast.Import):
        return any(alias.name.startswith(PACKAGE) for alias in node.names)
    return (node.module or "").startswith(PACKAGE) or bool(node.level)
