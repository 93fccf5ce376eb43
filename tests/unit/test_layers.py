"""Imports point one way: no cycle between layers, no arrow back up (docs/architecture.md, "Layers").

Every ``import`` of every module is read with ``ast`` (also those inside functions: a lazy
import is still a dependency), and each module gets the layer its path says.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("seerlike", "sharding", "launchers")

# The first matching prefix wins: the entry points inside lower packages come first.
LAYERS: list[tuple[str, int]] = [
    # 6: entry points: the API, the commands, the quickstart, the launchers
    ("seerlike.api", 6), ("seerlike.preflight", 6), ("seerlike.cli", 6), ("seerlike.__main__", 6), ("seerlike.commands", 6),
    ("seerlike.quickstart", 6), ("seerlike.recipes.cli", 6), ("seerlike.models.info", 6),
    ("seerlike.testing", 6), ("sharding.cli", 6), ("sharding.stats", 6), ("launchers", 6), ("seerlike.semisup.stages", 6),
    ("seerlike", 6),  # the package itself: its __getattr__ is the API
    # 5: writing exports, drawing
    ("seerlike.exporter", 5), ("seerlike.plots", 5),
    # 4: evaluation; the semi-supervised stages' labelling, data streams and scoring (they run trained models)
    ("seerlike.eval", 4), ("seerlike.semisup", 4),
    # 3: the engine, the recipes it runs, reading trained models back
    ("seerlike.engine", 3), ("seerlike.recipes", 3), ("seerlike.checkpoints", 3),
    # 2: methods
    ("seerlike.methods", 2),
    # 1: models, data, ingest
    ("seerlike.models", 1), ("seerlike.data", 1), ("sharding", 1),
    # 0: foundation
    ("seerlike.config", 0), ("seerlike.storage", 0), ("seerlike.logs", 0), ("seerlike.progress", 0),
    ("seerlike.pseudo_labels", 0), ("seerlike.sharded", 0),
]

#: Arrows back up that are known, each with its reason. Shrink this list; never grow it casually.
ALLOWED_UP: dict[tuple[str, str], str] = {
    ("seerlike.methods.distill", "seerlike.checkpoints"):
        "a distillation teacher is a trained model read back from a checkpoint or an export",
    ("seerlike.methods.classifier", "seerlike.checkpoints"):
        "a classifier's method.init is a pretrained trunk read back from a checkpoint or an export",
}


def _layer(module: str) -> int:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if prefix == "seerlike" and module != "seerlike":
                continue  # only the package's own __init__ is the API facade
            return layer
    raise AssertionError(f"{module} has no layer: add it to LAYERS (and docs/architecture.md)")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


@cache
def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    mods = _modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(filter(None, (known(a.name) for a in node.names)))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    target = sub if sub in mods else known(source)
                    if target:
                        targets.add(target)
        # importing a.b.c runs a/b/__init__.py first (a sub-package's __init__ may import more);
        # the top-level packages' own __init__s import nothing at import time
        for target in list(targets):
            parts = target.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent in mods and not name.startswith(parent + ".") and name != parent:
                    targets.add(parent)
        targets.discard(name)
        graph[name] = targets
    return graph


def _cycles_across_layers(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan) that hold modules of more than one layer."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len({_layer(m) for m in comp}) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(module)


def test_no_import_cycle_spans_two_layers():
    assert _cycles_across_layers(import_graph()) == []


def test_no_import_points_back_up_outside_the_known_list():
    graph = import_graph()
    up = sorted((a, b) for a, targets in graph.items() for b in targets if _layer(b) > _layer(a))
    assert [e for e in up if e not in ALLOWED_UP] == []
    stale = [e for e in ALLOWED_UP if e not in up]
    assert stale == [], f"these allowed arrows are gone: remove them from ALLOWED_UP: {stale}"


def test_the_checker_sees_a_cycle_and_an_arrow_up():
    graph = {"seerlike.eval.knn": {"seerlike.plots"}, "seerlike.plots": {"seerlike.eval.knn"},
             "seerlike.config": set()}
    assert _cycles_across_layers(graph) == [["seerlike.eval.knn", "seerlike.plots"]]
    real = import_graph()
    assert "seerlike.engine.config" in real["seerlike.engine.loop"]  # imports inside the package are seen
    assert "seerlike.checkpoints" in real["seerlike.methods.distill"]  # so are lazy ones, in functions
    assert "seerlike.data" in real["seerlike.eval.extract"]  # and the sub-package __init__ an import runs
