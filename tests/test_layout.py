"""The layering rules, checked on the source: folders are layers, and imports only go downhill.

- no import cycles anywhere in ``freshnet/`` (module-level and function-level imports alike);
- ``data`` never imports ``model`` or ``space``; ``model`` never imports ``space``; ``space``
  never imports ``model`` (bundle validation runs the model in a clean process anyway);
- a layer imports from the top level only its foundations (config, storage, redact, ...: top-level
  modules that import no layer), never the orchestration (cycle, summary, cli);
- nothing in ``freshnet/`` imports prefect, tasks or flows, except ``cli`` running a cycle;
- ``app/`` imports nothing from freshnet (it is pushed to the Space as-is).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("data", "model", "space")
# (importer layer, imported layer) pairs that must not exist.
FORBIDDEN = {("data", "model"), ("data", "space"), ("model", "space"), ("space", "model")}
MAX_LINES = 400


def module_imports(root: Path) -> dict[str, set[str]]:
    """Each module of the package at ``root`` (dotted, from the package name) and the package's
    own modules it imports, wherever the import statement is."""
    pkg = root.name
    mods = {
        ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in root.rglob("*.py")
    }
    edges: dict[str, set[str]] = {}
    for mod, path in mods.items():
        here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                # `from pkg.data import fetch` imports the module fetch; `from pkg.config
                # import X` imports from the module config.
                subs = [f"{base}.{a.name}" for a in node.names]
                names = [n for n in subs if n in mods] or [base]
                if len(names) < len(subs):
                    names.append(base)
            else:
                continue
            for name in names:
                while (
                    name and name not in mods
                ):  # `from pkg.data import x`: the module x, or pkg.data
                    name = name.rpartition(".")[0]
                if name and name != mod and name.split(".")[0] == pkg:
                    targets.add(name)
        edges[mod] = targets
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by a depth-first walk (each as a closed path)."""
    cycles, seen, stack = [], set(), []

    def visit(u: str) -> None:
        seen.add(u)
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if v in stack:
                cycles.append(stack[stack.index(v) :] + [v])
            elif v not in seen:
                visit(v)
        stack.pop()

    for m in sorted(edges):
        if m not in seen:
            visit(m)
    return cycles


def _layer(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else None


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    """Arrows that break the layer rules, as readable lines."""
    # Foundations: top-level modules (and the package itself) that import no layer.
    top = {m for m in edges if _layer(m) is None and m.split(".")[-1] not in LAYERS}
    foundations = {m for m in top if not any(_layer(t) for t in edges[m])}
    bad = []
    for mod, targets in sorted(edges.items()):
        src = _layer(mod)
        if src is None:
            continue
        for t in sorted(targets):
            dst = _layer(t)
            if (src, dst) in FORBIDDEN:
                bad.append(f"{mod} -> {t}: {src} never imports {dst}")
            elif dst is None and t in top and t not in foundations:
                bad.append(f"{mod} -> {t}: a layer imports only foundations, not orchestration")
    return bad


# ---- the rules on freshnet itself ---------------------------------------------------------------


def test_freshnet_has_no_import_cycles():
    assert find_cycles(module_imports(REPO / "freshnet")) == []


def test_freshnet_imports_follow_the_layers():
    edges = module_imports(REPO / "freshnet")
    assert {_layer(m) for m in edges} >= set(LAYERS), "the layer folders exist and hold modules"
    assert layer_violations(edges) == []


def test_no_module_is_over_400_lines():
    sizes = {
        str(p.relative_to(REPO)): len(p.read_text().splitlines())
        for p in (REPO / "freshnet").rglob("*.py")
    }
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}


def _external(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_never_imports_prefect_tasks_or_flows():
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "freshnet").rglob("*.py")
        if p.name != "cli.py" and _external(p) & {"prefect", "tasks", "flows"}
    ]
    assert offenders == []


def test_importing_every_core_module_loads_no_prefect():
    mods = sorted(m for m in module_imports(REPO / "freshnet") if m != "freshnet")
    code = (
        "import sys, importlib\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'flows', 'tasks')]\n"
        "assert not bad, bad[:5]\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_app_never_imports_freshnet():
    for p in (REPO / "app").rglob("*.py"):
        assert not _external(p) & {"freshnet", "tasks", "flows"}, p


# ---- the checker, on planted packages -------------------------------------------------------------


def _package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for layer in LAYERS:
        (pkg / layer / "__init__.py").parent.mkdir(parents=True, exist_ok=True)
        (pkg / layer / "__init__.py").touch()
    return pkg


def test_checker_finds_a_planted_cycle_through_a_function_level_import(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "data/a.py": "from pkg.data import b\n",
            "data/b.py": "def f():\n    from .c import g\n",
            "data/c.py": "import pkg.data.a\n",
            "data/d.py": "from pkg.data import a\n",  # imports into the cycle, not part of it
        },
    )
    cycles = find_cycles(module_imports(pkg))
    assert cycles == [["pkg.data.a", "pkg.data.b", "pkg.data.c", "pkg.data.a"]]


def test_checker_finds_each_forbidden_arrow(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "config.py": "",
            "cycle.py": "from pkg.data import fetch\nfrom pkg.model import train\n",
            "data/fetch.py": "from pkg import config\nfrom pkg.model.train import fit\n",
            "data/clean.py": "from pkg.cycle import run\n",
            "model/train.py": "from pkg.data import fetch\n\ndef fit():\n    from pkg.space import publish\n",
            "space/publish.py": "from pkg.config import X\n",
            "space/serve.py": "from pkg.space import publish\nfrom pkg.model import train\n",
        },
    )
    assert layer_violations(module_imports(pkg)) == [
        "pkg.data.clean -> pkg.cycle: a layer imports only foundations, not orchestration",
        "pkg.data.fetch -> pkg.model.train: data never imports model",
        "pkg.model.train -> pkg.space.publish: model never imports space",
        "pkg.space.serve -> pkg.model.train: space never imports model",
    ]


def test_checker_passes_a_package_that_keeps_the_rules(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "config.py": "",
            "cycle.py": "from pkg.model import train\nfrom pkg.space import publish\n",
            "data/fetch.py": "from pkg.config import X\n",
            "model/train.py": "from pkg.data.fetch import y\n",
            "space/publish.py": "from pkg import config\n",
        },
    )
    edges = module_imports(pkg)
    assert edges["pkg.model.train"] == {"pkg.data.fetch"}
    assert find_cycles(edges) == [] and layer_violations(edges) == []
