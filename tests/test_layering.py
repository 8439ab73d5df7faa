"""The import layering of course_lib: no cycles, and the mechanism never imports the lesson harness.

Every ``import`` of every module is read with ``ast`` (including imports inside functions, which
hide cycles rather than remove them; ``if TYPE_CHECKING:`` blocks are skipped: they never run).
Two graphs are checked for cycles:

* modules (``course_lib.distributed.pipeline``); importing a submodule also runs its parent
  packages' ``__init__``, so that is an edge too, except into the importer's own package;
* units: the top-level modules and subpackages of ``course_lib`` (``training``,
  ``distributed``, ``data``, ``lessons`` ...), so that ``distributed -> training ->
  distributed`` counts as a cycle even when it passes through different submodules.

``course_lib.lessons`` (workers for spawned processes, the tutorial's pitfalls, sweeps) may
import the mechanism; no module outside it may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "course_lib"
HARNESS = "course_lib.lessons"

# Dependencies the layering forbids (unit -> unit), each with why: a low layer must not need a
# higher one, even without a cycle today.
FORBIDDEN = {
    ("course_lib.checkpoint", "course_lib.model"): "saving and loading state knows no model class",
    ("course_lib.checkpoint", "course_lib.data"): "saving and loading state knows no tokenizer",
    ("course_lib.data", "course_lib.model"): "the data pipeline needs only constants (course_lib.constants)",
    ("course_lib.scaling", "course_lib.training"): "scaling laws are pure maths",
    ("course_lib.distributed", "course_lib.training"): "the training loop uses the parallelisms, not the reverse",
}


def module_files(package: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of ``package`` (``__init__`` names the package)."""
    root = package.parent
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name an import statement in ``tree`` may load (``from a import b``: ``a`` and ``a.b``)."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules it imports}`` within the package, parent packages included (see the module docstring)."""
    files = module_files(package)
    top = package.name
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for name in imported_names(ast.parse(path.read_text(), str(path)), module, is_package):
            if name != top and not name.startswith(top + "."):
                continue
            while name not in files:  # ``from pkg.mod import function``: the module is pkg.mod
                name = name.rpartition(".")[0]
            parts = name.split(".")
            for i in range(2, len(parts) + 1):  # the module and the parent packages it initialises
                target = ".".join(parts[:i])
                own_package = module == target or module.startswith(target + ".")
                if target in files and not own_package:
                    deps.add(target)
        graph[module] = deps
    return graph


def unit_of(module: str) -> str:
    """``course_lib.distributed.pipeline`` -> ``course_lib.distributed``; ``course_lib.model`` stays."""
    return ".".join(module.split(".")[:2])


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for module, deps in graph.items():
        units.setdefault(unit_of(module), set()).update(unit_of(d) for d in deps)
    for unit, deps in units.items():
        deps.discard(unit)
    return units


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _describe(graph: dict[str, set[str]], component: list[str]) -> str:
    members = set(component)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in component)


def layering_problems(package: Path = PACKAGE) -> list[str]:
    """Every violation of the layering, one readable line each (empty when the layering holds)."""
    graph = import_graph(package)
    units = unit_graph(graph)
    problems = [f"import cycle between modules: {_describe(graph, c)}" for c in cycles(graph)]
    problems += [f"import cycle between parts of course_lib: {_describe(units, c)}" for c in cycles(units)]
    harness = unit_of(HARNESS)
    problems += [f"{m} (mechanism) imports the lesson harness {HARNESS}: move what it needs into the mechanism"
                 for m, deps in sorted(graph.items())
                 if unit_of(m) != harness and any(unit_of(d) == harness for d in deps)]
    problems += [f"{a} imports {b}: {why}" for (a, b), why in FORBIDDEN.items() if b in units.get(a, set())]
    return problems


def test_the_package_has_the_modules_this_test_expects():
    modules = module_files(PACKAGE)
    assert {"course_lib.training", "course_lib.distributed.data_parallel", "course_lib.lessons",
            "course_lib.constants"} <= set(modules)
    assert len(import_graph()["course_lib.training"]) >= 3  # the parser sees real imports


def test_no_import_cycles_and_the_mechanism_never_imports_the_harness():
    problems = layering_problems()
    assert not problems, "\n".join(problems)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "course_lib" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "course_lib"


@pytest.mark.parametrize("files, expected", [
    # a cycle hidden in a function body
    ({"__init__.py": "", "a.py": "import course_lib.b\n", "b.py": "def f():\n    from course_lib import a\n"},
     "cycle between modules"),
    # distributed -> training -> distributed through different submodules (today's shape before the fix)
    ({"__init__.py": "", "training.py": "from course_lib.distributed.faults import x\n",
      "distributed/__init__.py": "", "distributed/faults.py": "x = 1\n",
      "distributed/data_parallel.py": "from course_lib.training import train\n"},
     "cycle between parts"),
    # the mechanism importing the harness, relatively
    ({"__init__.py": "", "model.py": "from .lessons.pitfalls import bad\n",
      "lessons/__init__.py": "", "lessons/pitfalls.py": "bad = 1\n"},
     "imports the lesson harness"),
    # a forbidden dependency without a cycle
    ({"__init__.py": "", "model.py": "", "checkpoint.py": "def load():\n    from course_lib.model import GPT\n"},
     "saving and loading state knows no model class"),
])
def test_the_checker_finds_each_kind_of_problem(tmp_path, files, expected):
    problems = layering_problems(_write(tmp_path, files))
    assert any(expected in p for p in problems), problems


def test_the_checker_accepts_a_package_importing_its_own_submodules(tmp_path):
    package = _write(tmp_path, {
        "__init__.py": "", "data/__init__.py": "from course_lib.data.corpus import load\n",
        "data/corpus.py": "from course_lib.data.tokenization import T\n\ndef load():\n    pass\n",
        "data/tokenization.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from course_lib.data import corpus\nT = 1\n",
    })
    assert layering_problems(package) == []
