"""The layers of the code, as docs/architecture.md draws them.

* no import cycle among the installed modules (``lse_dispatch``, its
  ``backends`` and ``conformance``), counting imports inside functions too;
* the core (``lse_dispatch/``) imports no backend module at import time and
  never branches on the array library: backend knowledge lives with the
  backend, behind the declared ``Numerics`` hook;
* no function over 60 lines (docstring aside) without a stated reason.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lse_dispatch": ROOT / "lse_dispatch", "lse_dispatch.backends": ROOT / "backends",
            "lse_dispatch.conformance": ROOT / "conformance"}
LONGEST = 60


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ours that ``name`` imports anywhere in its file."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
    return edges


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    modules = _modules()
    known = set(modules)
    # A package's __init__ is imported before its modules; an edge from a
    # module to its own package's __init__ is that, not a dependency.
    graph = {name: {t for t in _imports(name, path, known) if not name.startswith(t + ".")}
             for name, path in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_core_names_no_array_library_in_its_math():
    core = ["_state", "_generic", "_autodiff", "_call", "_api", "_dispatch", "_kernel", "_ops", "_numerics", "streaming",
            "semiring"]
    for stem in core:
        text = (ROOT / "lse_dispatch" / f"{stem}.py").read_text()
        for marker in ("is_jax", "is_dask", "is_torch", "is_cupy", "import jax", "import torch", "import dask"):
            assert marker not in text, f"lse_dispatch/{stem}.py mentions {marker!r}"


def test_importing_the_core_loads_no_backend_module():
    code = "import sys, lse_dispatch; print(sorted(m for m in sys.modules if m.startswith('lse_dispatch.backends')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_no_function_over_sixty_lines_without_a_reason():
    """A function longer than 60 lines (its docstring not counted) says why in it ("Long because ...")."""
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if doc:
                    first = node.body[0]
                    length -= first.end_lineno - first.lineno + 1
                if length > LONGEST and "Long because" not in doc:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, "\n".join(long)
