"""Worker pools do not re-run the parent's main module (a Prefect flow run's is prefect.engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_probe(how: str, marker: Path) -> dict:
    env = {**os.environ, "MP_MAIN_PROBE": str(marker)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.mp_main_probe", how],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _imports_of_main(marker: Path) -> int:
    return len(marker.read_text().split()) if marker.exists() else 0


@pytest.mark.parametrize("how", ["plain", "freshnet"])
def test_copy_workers_do_not_import_the_parents_main_module(tmp_path: Path, how: str) -> None:
    """``python -m MODULE`` as the parent (as ``python -m prefect.engine`` runs a flow): a plain
    forkserver pool's workers import MODULE again, freshnet's do not, and the scores are the
    same as in one process. The plain case shows that the probe sees such imports."""
    marker = tmp_path / "imports"
    out = _run_probe(how, marker)
    assert out["same"] and out["spec"] == "tests.mp_main_probe"  # main's spec was put back
    if how == "plain":
        assert _imports_of_main(marker) >= 1
    else:
        assert _imports_of_main(marker) == 0


def test_hidden_main_module_is_restored_even_after_an_error() -> None:
    from freshnet.data.process_pool import main_module_hidden

    main = sys.modules["__main__"]
    spec, file = main.__spec__, getattr(main, "__file__", None)
    with pytest.raises(RuntimeError), main_module_hidden():
        assert main.__spec__ is None and not hasattr(main, "__file__")
        raise RuntimeError("boom")
    assert main.__spec__ is spec and getattr(main, "__file__", None) == file
