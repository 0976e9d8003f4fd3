"""ingest(): every corpus case ends with its reason code, good images are stored, nothing is overwritten."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from freshnet.config import parse_config
from freshnet.images import image_key
from freshnet.ingest import Outcome, count_outcomes, ingest
from freshnet.sources import Candidate
from freshnet.storage import FileStorage
from tests.badcorpus import HOST, CorpusServer


def _cfg(**source):
    return parse_config(
        {
            "classes": ["good", "bad"],
            "source": source or {"kind": "demo"},
            "download": {
                "allow_private": [f"{HOST}/32"],
                "max_bytes": 2_000_000,
                "connect_timeout_s": 2,
                "read_timeout_s": 1.0,
                "total_timeout_s": 1.5,
            },
        }
    )


@pytest.fixture(scope="module")
def web():
    with CorpusServer() as srv:
        yield srv


def _snapshot(root) -> dict[str, tuple[bytes, int]]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[p] = (open(p, "rb").read(), os.stat(p).st_mtime_ns)
    return out


def test_corpus_through_ingest(web, tmp_path):
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

    outcomes = ingest(cands, cfg, store, progress=False)

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
