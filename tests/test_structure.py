"""The shape of the code: imports flow one way, and the public API is typed."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import bnfold

PACKAGE = Path(bnfold.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The bnfold modules a module imports, at any place in it (type-checking imports included).
    ``from pkg import mod`` is an edge to ``pkg.mod``; ``from pkg import name`` one to ``pkg``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("bnfold"):
                for a in node.names:
                    out.add(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("bnfold"))
    return out


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path, set(modules)) if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return []


def test_no_import_cycles():
    graph = import_graph()
    assert "bnfold.proto" in graph and graph["bnfold.proto"] == set(), "proto.py is a leaf"
    assert not any(m.startswith("bnfold.io") for m in graph["bnfold.graph"]), "the index knows no file format"
    assert find_cycle(graph) == []


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_public_api_is_annotated():
    for name in bnfold.__all__:
        obj = getattr(bnfold, name)
        if inspect.isfunction(obj):
            sig = inspect.signature(obj)
            assert sig.return_annotation is not inspect.Signature.empty, name
            for p in sig.parameters.values():
                assert p.annotation is not inspect.Parameter.empty, f"{name}({p.name})"
    assert (PACKAGE / "py.typed").exists()


def test_every_public_name_resolves():
    assert set(bnfold.__all__) == {"__version__", *bnfold._WHERE}
    importlib.import_module("bnfold.fold.plan")  # the subpackage must not shadow the function

    assert callable(bnfold.fold) and callable(bnfold.verify)


def test_import_loads_no_onnxruntime():
    code = "import sys, bnfold; print('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_version_has_one_home():
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and "\nversion =" not in text.split("[tool.setuptools.dynamic]")[0]


MAX_FUNCTION_LINES = 60  # a screen: from the def line to the last line of the body


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_is_longer_than_a_screen():
    assert long_functions() == []


def test_the_length_check_finds_a_long_function():
    assert long_functions(limit=20)  # the same walk, a limit every module's longest function passes


def test_every_public_type_and_function_has_its_own_docstring():
    """Docstrings written for it: a dataclass without one gets 'Name(field: type, ...)' from Python."""
    import dataclasses

    from bnfold import report

    names = [getattr(bnfold, n) for n in bnfold.__all__ if n != "__version__"]
    names += [obj for n, obj in vars(report).items() if inspect.isclass(obj) and obj.__module__ == report.__name__]
    missing = []
    for obj in names:
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        doc = obj.__doc__ or ""
        if not doc or (dataclasses.is_dataclass(obj) and doc.startswith(obj.__name__ + "(")):
            missing.append(obj.__name__)
        for name, member in vars(obj).items() if inspect.isclass(obj) else ():
            if not name.startswith("_") and inspect.isfunction(member) and not member.__doc__:
                missing.append(f"{obj.__name__}.{name}")
    assert missing == []
