"""Code-shape rules of the engine: small signatures in gradients/ and influence/, a short score_layers."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import layerif
from layerif import api

PACKAGE = Path(layerif.__file__).parent


def test_no_function_takes_more_than_six_parameters_in_the_engine():
    too_long = []
    for folder in ("gradients", "influence"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                args = node.args
                names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
                names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
                count = len([name for name in names if name not in ("self", "cls")])
                if count > 6:
                    too_long.append(f"{folder}/{path.name}:{node.name} ({count})")
    assert too_long == []


def test_score_layers_stays_short():
    assert len(inspect.getsource(api.score_layers).splitlines()) < 60


# Stages in pipeline order (DESIGN.md section 6). A module may import from its own stage or an earlier
# one, never a later one; every module of the package must be placed here, so a new one gets a place.
STAGES = (
    ("errors", "io", "sizes", "distributed", "checkpoint", "outdir"),
    ("models",),
    ("data",),
    ("calibration",),
    ("gradients",),
    ("influence",),
    ("scores",),
    ("args",),
    ("api",),
    ("allocate",),
    ("prune", "moe"),
    ("evaluate",),
    ("compare",),
    ("report", "export"),
    ("runs", "stability"),
    ("cli", "options", "__main__", "__init__"),
)
BENCH = PACKAGE.parents[1] / "bench"


def _module_names(root: Path, package: str | None) -> dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__" and package is not None:
            parts = parts[:-1]
        names[".".join(([package] if package else []) + parts)] = path
    return names


def import_graph(root: Path, package: str | None) -> dict[str, set[str]]:
    """Module -> the modules of the same tree it imports anywhere (top level, in functions, under TYPE_CHECKING)."""
    modules = _module_names(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - (0 if is_package else 1) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    targets.add(candidate if candidate in modules else base)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        for target in graph[node]:
            if target not in order:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], order[target])
        if low[node] == order[node]:
            group = []
            while (member := stack.pop()) != node:
                group.append(member)
            if group:
                cycles.append(sorted([*group, node]))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return cycles


def stage_of(module: str) -> int:
    """Index in STAGES of a layerif module (its first name below the package decides)."""
    top = module.split(".")[1] if "." in module else "__init__"
    for index, members in enumerate(STAGES):
        if top in members:
            return index
    raise AssertionError(f"{module} has no stage in tests/test_structure.py STAGES; give it one")


def back_arrows(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a module to one of a later stage, as 'a -> b'."""
    return sorted(f"{source} -> {target}" for source, targets in graph.items() for target in targets
                  if stage_of(target) > stage_of(source))


def test_the_package_has_no_import_circle():
    assert import_cycles(import_graph(PACKAGE, "layerif")) == []


def test_no_stage_imports_from_a_later_stage():
    assert back_arrows(import_graph(PACKAGE, "layerif")) == []


def test_bench_has_no_import_circle_and_no_file_over_300_lines():
    assert import_cycles(import_graph(BENCH, None)) == []
    long_files = {path.name: n for path in BENCH.glob("*.py") if (n := len(path.read_text().splitlines())) > 300}
    assert long_files == {}


def test_the_checks_see_a_circle_and_a_back_arrow(tmp_path):
    package = tmp_path / "layerif"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models" / "__init__.py").write_text("from layerif.models import load\n")
    (package / "models" / "load.py").write_text("def f():\n    from layerif.api import g\n")
    (package / "api.py").write_text("from .models.load import f\n")
    graph = import_graph(package, "layerif")
    assert import_cycles(graph) == [["layerif.api", "layerif.models.load"]]
    assert back_arrows(graph) == ["layerif.models.load -> layerif.api"]
