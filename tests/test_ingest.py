"""ingest(): every corpus case ends with its reason code, good images are stored, nothing is overwritten."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from freshnet.config import parse_config
from freshnet.data.images import image_key
from freshnet.data.ingest import Outcome, _DecodeBudget, count_outcomes, ingest
from freshnet.data.sources import Candidate
from freshnet.storage_file import FileStorage
from tests.badcorpus import HOST, CorpusServer


def _cfg_dict(**source) -> dict:
    return {
        "classes": ["good", "bad"],
        "source": source or {"kind": "demo"},
        "download": {
            "allow_private": [f"{HOST}/32"],
            "max_bytes": 2_000_000,
            "connect_timeout_s": 2,
            # The drip case (16 bytes every 0.2 s, ~23 s in all) must hit the total timeout; every
            # other case must not, even on a loaded machine (a redirect chain took >1.5 s there).
            "read_timeout_s": 2.0,
            "total_timeout_s": 5.0,
            "workers": 2,  # the RSS figure below counts every worker process
        },
    }


def _cfg(**source):
    return parse_config(_cfg_dict(**source))


PEAK_RSS_LIMIT_MB = 500

# Runs one ingest in a fresh process; prints the outcomes and the process's own peak RSS. VmHWM,
# not getrusage: Linux carries ru_maxrss across exec, so a child of a large pytest process would
# report the parent's size.
_INGEST_SCRIPT = """
import json, sys
from freshnet.config import parse_config
from freshnet.data.ingest import ingest
from freshnet.data.sources import Candidate
from freshnet.storage_file import FileStorage
args = json.load(sys.stdin)
out = ingest([Candidate(*c) for c in args["candidates"]], parse_config(args["config"]),
             FileStorage(args["store"]), progress=False)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"outcomes": [o.to_dict() for o in out], "maxrss_kb": int(hwm)}))
"""


def _tree(pid: int) -> list[int]:
    """pid and all its live descendants (normalizer workers are forked by a forkserver)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
    return out


def _vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _ingest_measured(cands: list[Candidate], cfg: dict, store_root: Path) -> tuple[list, dict]:
    """ingest() in a subprocess; returns its outcomes and every process's peak RSS in kB.

    Each process's high-water mark (VmHWM) is sampled until it exits; their sum bounds the
    peak RSS of the whole ingest from above (shared pages are counted once per process).
    """
    args = {
        "candidates": [[c.label, c.url, c.query, c.source] for c in cands],
        "config": cfg,
        "store": str(store_root),
    }
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", _INGEST_SCRIPT],
        cwd=root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    peaks: dict[int, int] = {}

    def sample() -> None:
        while proc.poll() is None:
            for pid in _tree(proc.pid):
                peaks[pid] = max(peaks.get(pid, 0), _vm_hwm_kb(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = proc.communicate(json.dumps(args).encode(), timeout=120)
    sampler.join()
    assert proc.returncode == 0, err.decode()[-3000:]
    result = json.loads(out)
    peaks[proc.pid] = max(peaks.get(proc.pid, 0), result["maxrss_kb"])
    return [Outcome.from_dict(d) for d in result["outcomes"]], peaks


@pytest.fixture(scope="module")
def web():
    with CorpusServer() as srv:
        yield srv.build_all()


def _snapshot(root) -> dict[str, tuple[bytes, int]]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[p] = (open(p, "rb").read(), os.stat(p).st_mtime_ns)
    return out


def test_corpus_through_ingest(web, tmp_path):
    """Every case ends with its reason, and the whole corpus (16-bit, RGB and RGBA pixel bombs
    included) is ingested within PEAK_RSS_LIMIT_MB of peak RSS, all processes together."""
    cfg = _cfg()
    store = FileStorage(tmp_path / "store")
    # Something stored earlier, under an image key and elsewhere: must survive byte-for-byte.
    store.put("nights/0/report.json", b"{}")
    paths = sorted(web.cases)
    cands = [
        Candidate("good" if web.cases[p][0] == "accepted" else "bad", web.url(p), "q", "urls")
        for p in paths
    ]
    # URL de-duplication before any request: same URL in another spelling.
    cands.append(
        Candidate("good", web.url("/good.jpg").replace("http://", "HTTP://") + "#x", "q", "urls")
    )
    cands.append(Candidate("bad", "gopher://example.com/x", "q", "urls"))
    cands.append(
        Candidate("bad", (tmp_path / "x.jpg").as_uri(), "q", "urls")
    )  # file:// only for folder
    before = _snapshot(store.root)

    outcomes, peaks = _ingest_measured(cands, _cfg_dict(), store.root)

    peak_mb = sum(peaks.values()) / 1024
    print(f"ingest peak RSS: {peak_mb:.0f} MB over {len(peaks)} processes")
    assert len(peaks) >= 3, f"did not see the normalizer processes: {peaks}"
    assert peak_mb <= PEAK_RSS_LIMIT_MB, f"peak RSS {peak_mb:.0f} MB over {len(peaks)} processes"
    assert len(outcomes) == len(cands) and all(isinstance(o, Outcome) for o in outcomes)
    got = {p: o.status for p, o in zip(paths, outcomes, strict=False)}
    want = {p: web.cases[p][0] for p in paths}
    assert got == want, {
        p: (o.status, o.detail)
        for p, o in zip(paths, outcomes, strict=False)
        if o.status != want[p]
    }
    assert [o.status for o in outcomes[len(paths) :]] == ["duplicate_url", "bad_url", "bad_url"]
    for o in outcomes:
        assert o.status == "accepted" or o.detail, o
    accepted = [o for o in outcomes if o.status == "accepted"]
    for o in accepted:
        data = store.get(image_key(o.sha256))
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.mode == "RGB" and max(img.size) <= cfg.images.max_side
        assert img.size == (o.width, o.height) and len(o.phash) == 16
    by = dict(zip(paths, outcomes, strict=False))
    rotated = Image.open(io.BytesIO(store.get(image_key(by["/rotated.jpg"].sha256))))
    assert rotated.size == (120, 240) and rotated.getpixel((60, 20))[0] > 200
    for p, (data, mtime) in before.items():
        assert open(p, "rb").read() == data and os.stat(p).st_mtime_ns == mtime

    # A second run of the good ones touches nothing: every image is already there.
    before = _snapshot(store.root)
    again = ingest(
        [c for c, o in zip(cands, outcomes, strict=False) if o.status == "accepted"],
        cfg,
        store,
        progress=False,
    )
    assert all(o.status == "accepted" and not o.stored for o in again)
    assert _snapshot(store.root) == before

    counts = count_outcomes(outcomes)
    assert counts["good"]["accepted"] == len(accepted)
    assert list(counts["good"])[0] == "accepted"
    assert counts["bad"]["timeout"] == 1 and counts["bad"]["blocked_address"] == 2
    # Pixel bombs are counted like any rejection: the 60000² and 12000² (max_pixels) and the
    # RGBA one (bytes per pixel over the decode budget).
    assert counts["bad"]["bomb"] == 3
    assert "decode budget" in by["/rgba-bomb.png"].detail
    assert "truncated" in by["/cut-eoi.jpg"].detail


def test_folder_source_reads_local_files(tmp_path):
    root = tmp_path / "seed"
    (root / "good").mkdir(parents=True)
    Image.new("RGB", (200, 150), (0, 90, 200)).save(root / "good" / "a.jpg")
    (root / "good" / "notes.txt").write_text("not an image")
    big = root / "good" / "huge.jpg"
    big.write_bytes(b"\xff\xd8\xff" + b"\x00" * 3_000_000)
    cfg = _cfg(kind="folder", path=str(root))
    cands = [
        Candidate("good", p.as_uri(), "folder:good", "folder")
        for p in sorted((root / "good").iterdir())
    ]
    cands.append(Candidate("good", (root / "good" / "gone.jpg").as_uri(), "folder:good", "folder"))
    out = ingest(cands, cfg, FileStorage(tmp_path / "s"), progress=False)
    assert [o.status for o in out] == ["accepted", "too_large", "not_image", "missing_file"]


def test_empty_input(tmp_path):
    assert ingest([], _cfg(), FileStorage(tmp_path), progress=False) == []


def test_decode_budget_is_shared_first_come_first_served():
    """Images decoding at once never need more than the budget together, and a large image is
    not starved by small ones arriving after it."""

    async def run() -> tuple[list[str], int]:
        budget = _DecodeBudget(100)
        order: list[str] = []
        peak = 0

        async def job(name: str, cost: int, start: float, hold: float) -> None:
            nonlocal peak
            await asyncio.sleep(start)
            held = await budget.acquire(cost)
            order.append(name)
            peak = max(peak, budget.used)
            await asyncio.sleep(hold)
            budget.release(held)

        async def cancelled_waiter() -> None:
            await asyncio.sleep(0.015)
            waiter = asyncio.ensure_future(budget.acquire(90))
            await asyncio.sleep(0.005)
            waiter.cancel()

        await asyncio.gather(
            job("a", 60, 0, 0.05),
            job("big", 100, 0.01, 0.01),  # waits for a
            job("small", 10, 0.02, 0.01),  # fits beside a, but queues behind big
            job("over", 500, 0.03, 0.0),  # over the budget: rejected from its header, holds nothing
            cancelled_waiter(),
        )
        assert budget.used == 0 and not budget.waiters
        return order, peak

    order, peak = asyncio.run(run())
    assert order.index("big") < order.index("small")
    assert peak <= 100
