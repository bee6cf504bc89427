"""The package's import graph points down only: no circles, no import from a lower layer to a higher one.

Every module of ``pdelightning/`` and ``pdelightning_reproduce/`` is parsed (not imported) and every import is
collected: at module level, inside functions, under ``if TYPE_CHECKING:``, relative ones resolved, and
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name. The layer table below is the one
place the layering is written down (issue 19); a module is in the layer of its sub-package
(``pdelightning/models/pde.py`` is in ``models``) or, for a top-level module, of its own name.
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = "pdelightning"
REPRODUCTION = "pdelightning_reproduce"

# Lowest first. Groups in one layer may import each other (a circle is still caught) unless named in
# FORBIDDEN_SIDEWAYS; the reproduction sits above the whole library and the library never imports it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("utils", "_checks", "trust", "resources", "compat"),  # L0
    ("analysis",),  # L1: pure math (torch/numpy/scipy only)
    ("models", "plots", "data"),  # L2
    ("adapters",),  # L3
    ("probing",),  # L4
    ("callbacks",),  # L5
    ("report",),  # L6
    ("task", "checkpointing", "resume", "_hparams", "cli_errors"),  # L7
    ("plugin", "cli", "__main__", "__init__"),  # L8 (``__init__``: the package root ``pdelightning`` itself)
    (REPRODUCTION,),  # L9: the paper's reproduction, above the library
)
FORBIDDEN_SIDEWAYS = frozenset({("data", "models"), ("models", "data")})


@dataclass(frozen=True)
class Edge:
    """One import statement: ``source`` (a module, in ``path`` at ``line``) imports ``target``."""

    source: str
    target: str
    path: str
    line: int


def group_of(module: str) -> str | None:
    """The layer group of a dotted module name (``pdelightning.models.pde`` -> ``models``), None outside ours."""
    parts = module.split(".")
    if parts[0] == REPRODUCTION:
        return REPRODUCTION
    if parts[0] != LIBRARY:
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(group: str, layers: tuple[tuple[str, ...], ...] = LAYERS) -> int:
    """The index of ``group`` in ``layers`` (a ``KeyError`` names a module the table forgot)."""
    for index, groups in enumerate(layers):
        if group in groups:
            return index
    raise KeyError(f"{group!r} is in no layer of the table in tests/test_import_graph.py: add it there")


def module_names(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted name -> file for every ``.py`` under ``root/<package>`` (a package is named by its ``__init__``)."""
    names: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names[".".join(parts)] = path
    return names


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _literal_import(node: ast.Call) -> str | None:
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if called not in {"import_module", "__import__"} or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imports_of(module: str, path: Path, known: set[str], root: Path) -> list[Edge]:
    """Every import in one file that names one of ``known`` modules (or a name inside one)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    shown = str(path.relative_to(root))
    edges: list[Edge] = []

    def add(target: str, line: int) -> None:
        # the longest known prefix: ``pdelightning.models.pde.laplacian_1d`` -> ``pdelightning.models.pde``
        parts = target.split(".")
        for stop in range(len(parts), 0, -1):
            candidate = ".".join(parts[:stop])
            if candidate in known:
                edge = Edge(module, candidate, shown, line)
                if candidate != module and edge not in edges:  # ``from a import b, c``: one edge
                    edges.append(edge)
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            for alias in node.names:
                # ``from pkg import sub`` imports the module ``pkg.sub`` when there is one, else a name of ``pkg``
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base, node.lineno)
        elif isinstance(node, ast.Call) and (literal := _literal_import(node)):
            add(literal, node.lineno)
    return edges


def scan(root: Path = ROOT, packages: tuple[str, ...] = (LIBRARY, REPRODUCTION)) -> list[Edge]:
    """All import edges between the modules of ``packages`` under ``root``."""
    names = module_names(root, packages)
    known = set(names)
    return [edge for module, path in names.items() for edge in imports_of(module, path, known, root)]


def find_cycles(edges: list[Edge], package: str = LIBRARY) -> list[str]:
    """One message per circle (strongly connected component) among the modules of ``package``.

    Each message walks one circle through the component and names the import that closes each step.
    """
    graph: dict[str, dict[str, Edge]] = {}
    for edge in edges:
        if edge.source.split(".")[0] == package and edge.target.split(".")[0] == package:
            graph.setdefault(edge.source, {}).setdefault(edge.target, edge)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(start: str) -> None:  # Tarjan's algorithm, iterative (no recursion limit on a deep graph)
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)

    messages = []
    for component in components:
        members = set(component)
        path = _circle_through(component[0], members, graph)
        steps = [f"{graph[a][b].path}:{graph[a][b].line} {a} -> {b}" for a, b in itertools.pairwise(path)]
        messages.append(f"import circle among {', '.join(component)}:\n    " + "\n    ".join(steps))
    return messages


def _circle_through(start: str, members: set[str], graph: dict[str, dict[str, Edge]]) -> list[str]:
    """A shortest circle start -> ... -> start inside one strongly connected component (breadth first)."""
    previous: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, {})):
                if child == start:
                    path = [node]
                    while (step := previous[path[-1]]) is not None:
                        path.append(step)
                    return [*reversed(path), start]
                if child in members and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in a strongly connected component but on no circle")


def layer_violations(edges: list[Edge], layers: tuple[tuple[str, ...], ...] = LAYERS) -> list[str]:
    """One message per import from a lower layer to a higher one (or sideways where forbidden)."""
    messages = []
    for edge in edges:
        source, target = group_of(edge.source), group_of(edge.target)
        if source is None or target is None or source == target:
            continue
        low, high = layer_of(source, layers), layer_of(target, layers)
        if target == REPRODUCTION and source != REPRODUCTION:
            messages.append(
                f"{edge.path}:{edge.line}: {edge.source} imports {edge.target}: the library never imports "
                f"the reproduction (L{low} {source} -> L{high} {target})"
            )
        elif high > low:
            messages.append(
                f"{edge.path}:{edge.line}: {edge.source} (L{low} {source}) imports {edge.target} "
                f"(L{high} {target}): layers point down only"
            )
        elif (source, target) in FORBIDDEN_SIDEWAYS:
            messages.append(
                f"{edge.path}:{edge.line}: {edge.source} (L{low} {source}) imports {edge.target} "
                f"(L{high} {target}): {source} and {target} never import each other"
            )
    return messages


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return scan()


def test_the_scan_sees_the_package(edges: list[Edge]) -> None:
    """A scan that found nothing would pass everything: the known downward imports must be there."""
    found = {(edge.source, edge.target) for edge in edges}
    assert ("pdelightning.cli", "pdelightning.task") in found
    assert any(target.startswith("pdelightning.analysis") for source, target in found if ".callbacks." in source)
    assert any(source.startswith(REPRODUCTION) and target.startswith(LIBRARY) for source, target in found)


def test_every_module_is_in_a_layer(edges: list[Edge]) -> None:
    for module in module_names(ROOT, (LIBRARY, REPRODUCTION)):
        group = group_of(module)
        assert group is not None
        layer_of(group)


def test_no_import_circle(edges: list[Edge]) -> None:
    cycles = find_cycles(edges)
    assert not cycles, "\n".join(cycles)


def test_layers_point_down(edges: list[Edge]) -> None:
    violations = layer_violations(edges)
    assert not violations, f"{len(violations)} import(s) against the layer table:\n" + "\n".join(violations)


# --- the checks themselves can fail: a planted package with a circle, an upward import and a reproduction import


def _plant(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_planted_circle_and_upward_imports_are_reported(tmp_path: Path) -> None:
    _plant(
        tmp_path,
        {
            "pdelightning/__init__.py": "",
            "pdelightning/utils.py": "",
            "pdelightning/analysis/__init__.py": "",
            # upward from inside a function, through a relative import: L1 analysis -> L2 models
            "pdelightning/analysis/fit.py": "import math\n\n\ndef f():\n    from ..models.pde import step\n",
            "pdelightning/models/__init__.py": "from .pde import step\n",
            "pdelightning/models/pde.py": "from pdelightning.analysis import fit\n\nstep = 1\n",
            # a circle probing <-> callbacks, one side only under TYPE_CHECKING
            "pdelightning/probing/__init__.py": "",
            "pdelightning/probing/hub.py": (
                "from typing import TYPE_CHECKING\n\n"
                "if TYPE_CHECKING:\n    from pdelightning.callbacks._probe import P\n"
            ),
            "pdelightning/callbacks/__init__.py": "",
            "pdelightning/callbacks/_probe.py": "from pdelightning.probing import hub\n",
            # sideways between data and models, and a literal import_module of the reproduction
            "pdelightning/data/__init__.py": "",
            "pdelightning/data/base.py": (
                "import importlib\n\nfrom pdelightning.models import step\n"
                "R = importlib.import_module('pdelightning_reproduce.train')\n"
            ),
            "pdelightning_reproduce/__init__.py": "",
            "pdelightning_reproduce/train.py": "from pdelightning.models.pde import step\n",
        },
    )
    planted = scan(tmp_path)

    cycles = find_cycles(planted)
    assert len(cycles) == 2, cycles
    circle = next(message for message in cycles if "probing" in message)
    assert "pdelightning/probing/hub.py:4 pdelightning.probing.hub -> pdelightning.callbacks._probe" in circle
    assert "pdelightning/callbacks/_probe.py:1 pdelightning.callbacks._probe -> pdelightning.probing.hub" in circle
    assert any("pdelightning.analysis.fit -> pdelightning.models.pde" in message for message in cycles)

    violations = layer_violations(planted)
    assert (
        "pdelightning/analysis/fit.py:5: pdelightning.analysis.fit (L1 analysis) imports pdelightning.models.pde "
        "(L2 models): layers point down only" in violations
    )
    assert any(
        v.startswith("pdelightning/probing/hub.py:4:") and "(L4 probing)" in v and "(L5 callbacks)" in v
        for v in violations
    )
    assert any(v.startswith("pdelightning/data/base.py:3:") and "never import each other" in v for v in violations)
    assert any(
        v.startswith("pdelightning/data/base.py:4:") and "never imports the reproduction" in v for v in violations
    )
    # downward imports are not reported: models -> analysis, callbacks -> probing, reproduction -> models
    assert not any(
        v.startswith(("pdelightning/models/", "pdelightning/callbacks/", "pdelightning_reproduce/")) for v in violations
    )
    assert len(violations) == 4, violations


def test_a_clean_planted_package_passes(tmp_path: Path) -> None:
    _plant(
        tmp_path,
        {
            "pdelightning/__init__.py": "",
            "pdelightning/analysis/__init__.py": "from .fit import f\n",
            "pdelightning/analysis/fit.py": "from . import helpers\n\n\ndef f():\n    return helpers\n",
            "pdelightning/analysis/helpers.py": "import torch\n",
            "pdelightning/models/__init__.py": "",
            "pdelightning/models/pde.py": "from ..analysis.fit import f\n",
        },
    )
    planted = scan(tmp_path, (LIBRARY,))
    assert {(e.source, e.target) for e in planted} == {
        ("pdelightning.analysis", "pdelightning.analysis.fit"),
        ("pdelightning.analysis.fit", "pdelightning.analysis.helpers"),
        ("pdelightning.models.pde", "pdelightning.analysis.fit"),
    }
    assert find_cycles(planted) == []
    assert layer_violations(planted) == []


def test_a_module_outside_the_table_is_named() -> None:
    with pytest.raises(KeyError, match="'widgets' is in no layer"):
        layer_of("widgets")
