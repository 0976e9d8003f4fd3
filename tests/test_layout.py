"""The layering rules: the core never needs Prefect, the Space app never needs freshnet."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_never_imports_prefect():
    offenders = [p.name for p in (REPO / "freshnet").glob("*.py") if "prefect" in _imports(p)]
    assert offenders == []


def test_importing_every_core_module_loads_no_prefect():
    mods = [p.stem for p in (REPO / "freshnet").glob("*.py") if p.stem != "__init__"]
    code = (
        "import sys, importlib\n"
        f"for m in {mods!r}: importlib.import_module('freshnet.' + m)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'flows', 'tasks')]\n"
        "assert not bad, bad[:5]\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_app_never_imports_freshnet():
    for p in (REPO / "app").rglob("*.py"):
        assert not _imports(p) & {"freshnet", "tasks", "flows"}, p
