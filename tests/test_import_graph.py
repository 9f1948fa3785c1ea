"""The import graph goes one way: cli -> config -> plan -> executors -> engine -> manifest/report, assets below plan.

Read from the source (every import statement, lazy ones inside functions included), so a new module that reaches
back up the chain fails here rather than in a circular import at a user's start-up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "batchgen"
# Leaf modules every layer may use: records, errors and tables with no behaviour of their own.
SHARED = {
    *("errors", "spec", "settings", "schedulers", "axes", "prompt_syntax", "metrics", "library_log"),
    "semantic",
    "engine_options",
    *("cells", "columns"),
}
# Layer -> the layers it must never import.
FORBIDDEN = {
    "cli": set(),
    "runner": {"cli"},
    "config": {"cli", "runner", "plan", "executors", "engine", "manifest", "report", "assets", "tiny"},
    "plan": {"cli", "runner", "executors", "engine", "manifest", "report", "tiny"},
    "assets": {"cli", "runner", "config", "plan", "executors", "engine", "manifest", "report", "tiny"},
    "executors": {"cli", "runner", "config", "plan"},
    "engine": {"cli", "runner", "config", "plan", "executors", "report"},
    "manifest": {"cli", "runner", "config", "plan", "executors", "engine", "report", "assets", "tiny"},
    "report": {"cli", "runner", "config", "plan", "executors", "engine", "tiny"},
    "tiny": {"cli", "runner", "config", "plan", "executors", "engine", "manifest", "report"},
}
# The runner's own helpers.
LAYER_OF = {"progress": "runner", "runlock": "runner", "cpuload": "runner", "watch": "runner"}


def _layer(module: str) -> str:
    """`batchgen.plan.jobs` -> `plan`; shared leaf modules -> `shared`."""
    top = module.split(".")[1] if module.count(".") else ""
    if top in SHARED:
        return "shared"
    return LAYER_OF.get(top, top)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from batchgen import tiny` names a module in the alias, not in node.module
            if node.module == "batchgen":
                found += [(node.lineno, f"batchgen.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("batchgen.")]


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    layers = {_layer(_module_name(p)) for p in SOURCES if p.name != "__init__.py" or p.parent != PACKAGE}
    assert layers <= {*FORBIDDEN, "shared"}, f"modules outside every layer: {layers - {*FORBIDDEN, 'shared'}}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_one_way(path: Path) -> None:
    own = _layer(_module_name(path))
    bad = []
    for line, name in _imports(path):
        target = _layer(name)
        if own == "shared" and target != "shared":
            bad.append(f"line {line}: {name} (shared modules import only shared modules)")
        elif target in FORBIDDEN.get(own, set()):
            bad.append(f"line {line}: {name} ({own} must not import {target})")
    assert not bad, f"{path.relative_to(PACKAGE)}: " + "; ".join(bad)


def test_the_checker_sees_a_backward_import(tmp_path: Path) -> None:
    # The rule itself: an engine module importing the planner is reported.
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from batchgen.plan import build_plan\n")
    assert [(2, "batchgen.plan")] == _imports(source)
    assert "plan" in FORBIDDEN[_layer("batchgen.engine.worker")]
