"""Docs generated from the code: README.md's config table is what tools/config_table.py renders."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config_table() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "config_table", REPO / "tools" / "config_table.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_config_table_is_the_rendered_one(config_table: ModuleType) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    expected = config_table.with_table(readme, config_table.render())
    assert readme == expected, "README.md's config table is out of date: run `make docs`"


def test_every_config_key_has_a_row_with_a_description(config_table: ModuleType) -> None:
    from freshnet.config import Config

    keys = dict(config_table.fields())
    sections = {n: f.annotation for n, f in Config.model_fields.items() if f.annotation is not None}
    expected = {
        f"{name}.{key}" if hasattr(model, "model_fields") else name
        for name, model in sections.items()
        for key in (getattr(model, "model_fields", None) or [None])
    }
    assert set(keys) == expected
    undescribed = [k for k, field in keys.items() if not (field.description or "").strip()]
    assert not undescribed, f"add a docstring below these config keys: {undescribed}"
    table = config_table.render()
    for key in keys:
        assert f"| `{key}` |" in table


def test_render_shows_defaults_and_allowed_values(config_table: ModuleType) -> None:
    rows = {line.split(" | ")[0].strip("| `"): line for line in config_table.render().splitlines()}
    assert rows["train.loader"].split(" | ")[1:3] == ['`"cache"`', '`"cache"`, `"files"`']
    assert rows["train.epochs"].split(" | ")[1:3] == ["`3`", "integer, ≥ 1, ≤ 1000"]
    assert rows["policy.significance"].split(" | ")[1:3] == ["unset", "number, > 0, < 1, or unset"]
    assert rows["classes"].split(" | ")[1] == "required"


def test_a_stale_table_is_found_and_rewritten(
    config_table: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check fails on an edited table and names `make docs`; a plain run rewrites it."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    stale = readme.replace("| `train.epochs` | `3` |", "| `train.epochs` | `4` |")
    assert stale != readme
    copy = tmp_path / "README.md"
    copy.write_text(stale, encoding="utf-8")
    config_table.README = copy
    try:
        assert config_table.main(["--check"]) == 1
        assert "run `make docs`" in capsys.readouterr().err
        assert copy.read_text(encoding="utf-8") == stale
        assert config_table.main([]) == 0
        assert copy.read_text(encoding="utf-8") == readme
    finally:
        config_table.README = REPO / "README.md"
    with pytest.raises(ValueError, match="markers"):
        config_table.with_table("no markers here", "| table |")


def test_make_docs_target_runs_the_script() -> None:
    r = subprocess.run(
        ["make", "-n", "docs"], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
    )
    assert "tools/config_table.py" in r.stdout
