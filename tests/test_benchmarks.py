"""The benchmarks still use names that exist.

Benchmarks run outside the test suite (``make bench``), so a rename or removal in ``freshnet/``
or ``tests/`` that a benchmark depends on is otherwise found only when someone runs it: this
happened with ``dedupe.components``, removed as dead code while ``benchmarks/dedupe.py`` still
called it. Every ``from M import x`` and every ``alias.attr`` on an imported freshnet/tests
module, at any depth in a benchmark, must resolve.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))
OURS = ("freshnet", "tests")


def _module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        return None


def missing_names(source: str) -> list[str]:
    """``module.name`` strings that a benchmark's source uses and that do not exist."""
    tree = ast.parse(source)
    modules: dict[str, ModuleType] = {}  # alias -> one of our modules
    missing: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(OURS):
            base = importlib.import_module(node.module)
            for a in node.names:
                sub = _module(f"{node.module}.{a.name}")
                if sub is not None:
                    modules[a.asname or a.name] = sub
                elif not hasattr(base, a.name):
                    missing.append(f"{node.module}.{a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(OURS) and a.asname:
                    modules[a.asname] = importlib.import_module(a.name)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and isinstance(node.ctx, ast.Load)
        ):
            mod = modules[node.value.id]
            if not hasattr(mod, node.attr):
                missing.append(f"{mod.__name__}.{node.attr}")
    return sorted(set(missing))


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_uses_only_names_that_exist(path: Path) -> None:
    assert missing_names(path.read_text()) == [], f"{path.name} uses names that are gone"


def test_the_check_finds_a_removed_name() -> None:
    source = (
        "from freshnet.data import dedupe\n"
        "from freshnet.data.embed import DIM, no_such_function\n"
        "def f():\n"
        "    from freshnet.model import evaluate as ev\n"
        "    return dedupe.components, dedupe.UnionFind, ev.predict_files, ev.gone, DIM\n"
    )
    assert missing_names(source) == [
        "freshnet.data.dedupe.components",
        "freshnet.data.embed.no_such_function",
        "freshnet.model.evaluate.gone",
    ]
