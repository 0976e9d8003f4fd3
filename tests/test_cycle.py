"""End-to-end nightly cycles through the real CLI, Prefect (temporary API), storage and a git Space."""

from __future__ import annotations

import csv
import functools
import json
import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from freshnet.data.catalog import load_catalog
from freshnet.storage_file import FileStorage

REPO = Path(__file__).resolve().parents[1]


def run_cli(
    args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PREFECT_HOME": str(cwd / ".prefect"),
        "PYTHONUNBUFFERED": "1",
        **(env_extra or {}),
    }
    r = subprocess.run(
        [sys.executable, "-m", "freshnet.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if r.returncode != 0:
        print(r.stdout[-5000:], r.stderr[-8000:])
    return r


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.slow
def test_demo_two_nights(tmp_path):
    """What `make run` does: night 1 bootstraps the champion, night 2 decides; both print a summary."""
    cfg = REPO / "configs" / "demo.toml"
    # The pipeline is under test here, not the recipe (test_train checks accuracy): train small.
    small = {
        "FRESHNET_TRAIN__IMAGE_SIZE": "96",
        "FRESHNET_TRAIN__EPOCHS": "1",
        "FRESHNET_SOURCE__DEMO_PER_QUERY": "30",
    }
    r1 = run_cli(
        ["run", "--config", str(cfg), "--night", "1", "--json", "n1.json"], tmp_path, small
    )
    assert r1.returncode == 0
    s1 = json.loads((tmp_path / "n1.json").read_text())
    assert "found" in r1.stdout and "decision" in r1.stdout
    # Embedded mode trains in-process: no served-mode `gpu` concurrency limit is asked for.
    assert "do not exist" not in r1.stdout + r1.stderr
    assert s1["outcome"] == "promoted", s1["reasons"]
    space = tmp_path / ".freshnet" / "space"
    assert "model.pkl" in git(space, "ls-tree", "--name-only", "HEAD").split()
    first_commit = git(space, "rev-parse", "HEAD")

    r2 = run_cli(
        ["run", "--config", str(cfg), "--night", "2", "--json", "n2.json"], tmp_path, small
    )
    assert r2.returncode == 0
    s2 = json.loads((tmp_path / "n2.json").read_text())
    dup = sum(c["duplicate"] + c["near_duplicate"] for c in s2["per_class"].values())
    rejected = {r: n for c in s2["per_class"].values() for r, n in c["rejected"].items()}
    assert dup > 0, s2["per_class"]
    assert sum(rejected.values()) > 0 and set(rejected) <= {
        "timeout",
        "too_large",
        "not_image",
        "decode_error",
        "too_small",
        "bomb",
        "blocked_address",
        "http_4xx",
        "http_5xx",
        "too_many_redirects",
        "connect_error",
        "unsupported_type",
        "network_error",
    }, rejected
    assert s2["champion"] is not None and s2["challenger"] is not None
    assert s2["reasons"], "the decision must spell out its rules"
    if s2["outcome"] == "promoted":
        assert git(space, "rev-parse", "HEAD") != first_commit
    else:
        assert git(space, "rev-parse", "HEAD") == first_commit

    status = run_cli(["status", "--config", str(cfg)], tmp_path, small)
    assert status.returncode == 0 and s1["challenger"]["version"] in status.stdout


@pytest.mark.slow  # a whole CLI night (~23 s): too long for the 2-minute fast suite
def test_quality_gate_stops_the_cycle_and_names_the_class(tmp_path):
    """Too few images for a class: the night stops before training, says which class, keeps all."""
    cfg = REPO / "configs" / "demo.toml"
    env = {
        "FRESHNET_SOURCE__DEMO_PER_QUERY": "12",
        "FRESHNET_DATASET__MIN_TRAIN_PER_CLASS": "30",
    }
    r = run_cli(
        ["run", "--config", str(cfg), "--night", "1", "--json", "n1.json", "--strict"],
        tmp_path,
        env,
    )
    assert r.returncode == 3, (r.stdout[-2000:], r.stderr[-2000:])  # --strict: stopped
    s = json.loads((tmp_path / "n1.json").read_text())
    assert s["outcome"] == "stopped"
    reason = s["reasons"][0]
    assert "quality gate" in reason and "class 'circle'" in reason and "need at least 30" in reason
    assert "quality gate" in r.stdout
    # Nothing was trained or published, and tonight's images are kept for the next night.
    assert not (tmp_path / ".freshnet" / "models").exists() or not any(
        (tmp_path / ".freshnet" / "models").iterdir()
    )
    space = tmp_path / ".freshnet" / "space"
    assert not (space / "model.pkl").exists()
    assert any((tmp_path / ".freshnet" / "images").rglob("*.jpg"))


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output readable
        pass


@pytest.fixture
def flower_web(shared_data):
    root = shared_data / "photos" / "flowers"
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _write_urls(
    path: Path, root: Path, base: str, fraction: float, flip: tuple[str, str, float] | None = None
) -> tuple[int, list[str]]:
    """A urls file with the first ``fraction`` of each class; returns (rows, flipped URLs).

    ``flip=(A, B, f)``: as many of A's photos beyond the fraction as f of B's listed photos are
    listed under label B, as web search does when it returns another breed for a breed's query.
    """
    rows = []
    files = {
        d.name: sorted(d.glob("*.jpg")) for d in sorted(p for p in root.iterdir() if p.is_dir())
    }
    flipped: list[str] = []
    if flip:
        a, b, f = flip
        n = round(f * int(len(files[b]) * fraction))
        # A's last photos (never listed on an earlier night) go to B instead.
        flipped = [f"{base}/{a}/{p.name}" for p in files[a][len(files[a]) - n :]]
        files[a] = files[a][: len(files[a]) - n]
    for label, fs in files.items():
        rows += [(label, f"{base}/{label}/{f.name}") for f in fs[: int(len(fs) * fraction)]]
    if flip:
        rows += [(flip[1], u) for u in flipped]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "url"])
        w.writerows(rows)
    return len(rows), flipped


@pytest.mark.slow
def test_flowers_two_nights_reach_085(tmp_path, flower_web):
    """Real photos served from 127.0.0.1 through a `urls` file: the champion reaches ≥ 0.85."""
    root, base = flower_web
    urls = tmp_path / "urls.csv"
    cfg = tmp_path / "flowers.toml"
    cfg.write_text(f"""
name = "flowers"
classes = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
storage = "file://.freshnet"
[source]
kind = "urls"
path = "{urls}"
[download]
allow_private = ["127.0.0.1/32"]
[space]
target = ".freshnet/space"
title = "flowers"
""")
    _write_urls(urls, root, base, 0.6)
    r1 = run_cli(["run", "--config", str(cfg), "--night", "1", "--json", "n1.json"], tmp_path)
    assert r1.returncode == 0
    # Night 2: every photo, plus roses filed under "tulips" (15% of the tulips), as the web does.
    n_all, flipped = _write_urls(urls, root, base, 1.0, flip=("roses", "tulips", 0.15))
    r2 = run_cli(["run", "--config", str(cfg), "--night", "2", "--json", "n2.json"], tmp_path)
    assert r2.returncode == 0
    s1 = json.loads((tmp_path / "n1.json").read_text())
    s2 = json.loads((tmp_path / "n2.json").read_text())
    assert s1["outcome"] == "promoted"
    # Night 2 sees every URL again: night 1's images come back as duplicates.
    assert sum(c["found"] for c in s2["per_class"].values()) == n_all
    assert sum(c["duplicate"] for c in s2["per_class"].values()) >= int(0.55 * n_all)
    # No stall: the flips are held back before the snapshot, so the challenger never trains on
    # them and is not refused for the roses or tulips recall they would have cost.
    catalog = load_catalog(FileStorage(tmp_path / ".freshnet")).set_index("url")
    held = catalog.loc[flipped, "status"].eq("noisy_label")
    assert held.mean() >= 0.7, (held.sum(), len(flipped), s2["label_issues"])
    assert len(s2["label_issues"]) <= 2 * len(flipped), s2["label_issues"]
    assert "labels " in r2.stdout and "looks like roses" in r2.stdout
    recall_fails = [r for r in s2["reasons"] if "FAIL" in r and ("roses" in r or "tulips" in r)]
    assert not recall_fails, s2["reasons"]
    champion_acc = (
        s2["challenger"]["accuracy"] if s2["outcome"] == "promoted" else s2["champion"]["accuracy"]
    )
    assert champion_acc >= 0.85, (s2["outcome"], s2["reasons"], s1.get("challenger"))
