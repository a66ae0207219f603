"""Tests of the library's layout: packages by stage, no import cycle, each layer's dependencies.

Every ``import`` in ``sfp_onnx/`` and ``cli/`` is read from the source (module level and
inside functions alike, so a cycle hidden behind a function-level import still counts) and
checked against the layering: ``graph`` (ONNX only) below ``data`` and ``runtime``
(onnxruntime), ``training`` (torch) above them, the public API on top, the CLI outside.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sfp_onnx"
CLI = REPO / "cli"

# Which first-party packages each stage may import (besides the shared base modules).
_BASE = {"sfp_onnx.errors", "sfp_onnx._io", "sfp_onnx._version"}
_ALLOWED = {
    "graph": {"graph"},
    "data": {"data"},
    "runtime": {"runtime", "graph", "data"},
    "training": {"training", "graph", "data", "runtime"},
}
# Third-party packages a stage must never import, not even lazily.
_FORBIDDEN = {
    "graph": {"torch", "torchvision", "onnxruntime", "onnx2torch", "click", "rich"},
    "data": {"onnxruntime", "onnx2torch", "click", "rich"},
    "runtime": {"onnx2torch", "click", "rich"},
    "training": {"click", "rich"},
    "top": {"click", "rich"},
}


def _module_name(path: Path) -> str:
    if path.is_relative_to(CLI):
        parts = ["sfp_onnx", "cli", *path.relative_to(CLI).with_suffix("").parts]
    else:
        parts = ["sfp_onnx", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = [*PACKAGE.rglob("*.py"), *CLI.rglob("*.py")]
    return {_module_name(path): path for path in files}


def _imports(path: Path, modules: set[str]) -> tuple[set[str], set[str]]:
    """(first-party modules, third-party top-level packages) that ``path`` imports anywhere."""
    first, third = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from a.b import c" imports a.b.c when that is a module, else a.b
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                for a in node.names
            ]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "sfp_onnx":
                first.add(name)
            else:
                third.add(name.split(".")[0])
    return first, third


def _graph() -> dict[str, tuple[set[str], set[str]]]:
    sources = _sources()
    return {name: _imports(path, set(sources)) for name, path in sources.items()}


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in _ALLOWED else "top"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_stage_packages_exist() -> None:
    """The library is split by stage, and every stage package has a docstring of its own."""
    for stage in _ALLOWED:
        init = PACKAGE / stage / "__init__.py"
        assert init.is_file(), init
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == [
        "__init__.py", "_io.py", "_version.py", "api.py", "errors.py", "pipeline.py", "planning.py",
        "plots.py",
        "report.py", "run_record.py", "speed_targets.py",
    ]  # fmt: skip


def test_no_import_cycle() -> None:
    """No module reaches itself through imports, counting imports inside functions."""
    graph = _graph()
    edges = {name: {m for m in first if m in graph} for name, (first, _) in graph.items()}
    assert _cycles(edges) == []


def test_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: a two-module loop and a self-import are both reported."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"a"}}) == [["a"]]


@pytest.mark.parametrize("stage", sorted(_ALLOWED))
def test_stage_imports_only_its_layers(stage: str) -> None:
    """graph < data, runtime < training < the API: no stage imports one above it."""
    allowed = _ALLOWED[stage]
    for module, (first, third) in _graph().items():
        if _stage(module) != stage:
            continue
        for target in first - _BASE:
            assert _stage(target) in allowed, f"{module} imports {target}"
        assert not third & _FORBIDDEN[stage], f"{module} imports {third & _FORBIDDEN[stage]}"


def test_library_never_imports_the_cli() -> None:
    """The CLI is a shell over the library: no library module imports click, rich or the CLI."""
    for module, (first, third) in _graph().items():
        if module.startswith("sfp_onnx.cli"):
            continue
        assert not {m for m in first if m.startswith("sfp_onnx.cli")}, module
        assert not third & _FORBIDDEN["top"], f"{module} imports {third & _FORBIDDEN['top']}"


def test_public_api_imports() -> None:
    """``import sfp_onnx, sfp_onnx.cli`` works in a fresh process and every public name resolves;
    ``import sfp_onnx`` alone imports neither torch nor onnxruntime (names load on first use).
    """
    code = (
        "import sys, sfp_onnx; "
        "heavy = sorted({'torch', 'onnxruntime'} & set(sys.modules)); "
        "import sfp_onnx.cli; "
        "missing = [n for n in sfp_onnx.__all__ if getattr(sfp_onnx, n, None) is None]; "
        "print(heavy, missing)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.strip() == "[] []"
