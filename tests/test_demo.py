"""The demo image web: deterministic by (query, night), overlapping nights, copies and bad files."""

from __future__ import annotations

import hashlib
import io
import time

import httpx
import pytest
from PIL import Image

from freshnet.config import parse_config
from freshnet.data import demo
from freshnet.data.images import normalize
from freshnet.data.ingest import count_outcomes, ingest
from freshnet.data.search import search
from freshnet.storage_file import FileStorage

CLASSES = ["circle", "square", "triangle", "star", "ring"]


def _cfg(per_query: int = 12):
    return parse_config(
        {
            "classes": CLASSES,
            "queries": ["photo {label}", "{label} drawing"],
            "source": {"kind": "demo", "demo_per_query": per_query},
            "download": {"allow_private": ["127.0.0.1/32"]},
        }
    )


def _get(url: str) -> bytes:
    with httpx.Client(trust_env=False) as c:
        r = c.get(url)
        r.raise_for_status()
        return r.content


def test_server_is_a_lazy_singleton():
    cfg = _cfg()
    base = demo.ensure_server(cfg)
    assert base.startswith("http://127.0.0.1:")
    assert demo.ensure_server(cfg) == base
    assert _get(f"{base}/search?q=photo+circle&night=1&n=3") != b"[]"
    with httpx.Client(trust_env=False) as c:
        assert c.get(f"{base}/img/0/circle/x/notanumber.jpg").status_code == 404


def test_same_query_and_night_same_urls_and_bytes():
    cfg = _cfg()
    a = search(cfg, "1")
    b = search(cfg, "1")
    assert a.candidates == b.candidates and len(a.candidates) > 0
    url = next(c.url for c in a.candidates if "-" not in c.url.rsplit("/", 1)[1])
    first = _get(url)
    demo.image_bytes.cache_clear()
    demo._base_image.cache_clear()
    assert _get(url) == first  # regenerated from scratch: identical bytes


def test_night_two_overlaps_and_has_copies_and_bad_files():
    cfg = _cfg()
    n1 = {c.url for c in search(cfg, "1").candidates}
    rep2 = search(cfg, "2")
    n2 = {c.url for c in rep2.candidates}
    plain2 = {u for u in n2 if "-" not in u.rsplit("/", 1)[1]}
    assert len(plain2 & n1) >= 0.6 * len(plain2)  # mostly last night's images
    assert plain2 - n1  # and some new ones
    copies = [u for u in n2 if "-copy" in u]
    bad = [u for u in n2 if u.endswith(("-trunc.jpg", "-html.jpg"))]
    assert copies and bad and all(u not in n1 for u in copies)
    # A copy is new bytes of an earlier picture: different sha256, near-identical pHash.
    copy = copies[0]
    orig = copy.rsplit("/", 1)[0] + "/" + copy.rsplit("/", 1)[1].split("-")[0] + ".jpg"
    a, b = normalize(_get(orig), cfg.images), normalize(_get(copy), cfg.images)
    assert a.orig_sha256 != b.orig_sha256
    assert bin(int(a.phash, 16) ^ int(b.phash, 16)).count("1") <= 8
    # Date nights map to consecutive integers: consecutive dates overlap too.
    assert demo.night_index("2026-11-28") == demo.night_index("2026-11-27") + 1
    assert demo.night_index("nightly-x") == demo.night_index("nightly-x") >= 1


def test_images_differ_by_class_and_are_sized():
    sizes = []
    t0 = time.perf_counter()
    for i, shape in enumerate(demo.SHAPES[:5]):
        img = demo.render(shape, 1000 + i)
        sizes.append(img.size)
        assert img.mode == "RGB"
    assert all(300 <= w <= 500 and 300 <= h <= 500 for w, h in sizes)
    assert (time.perf_counter() - t0) / 5 < 0.2  # ~10 ms each on an idle core


def test_demo_nights_through_ingest(tmp_path):
    cfg = _cfg(per_query=8)
    store = FileStorage(tmp_path)
    out1 = ingest(search(cfg, "1").candidates, cfg, store, progress=False)
    out2 = ingest(search(cfg, "2").candidates, cfg, store, progress=False)
    c1, c2 = count_outcomes(out1), count_outcomes(out2)
    assert set(c1) == set(CLASSES)
    for label in CLASSES:
        assert c1[label]["accepted"] >= 16
        assert sum(v for k, v in c2[label].items() if k != "accepted") >= 2  # bad files each night
    # The demo web serves both kinds of bad file (truncated JPEG, HTML page) every night.
    assert {o.status for o in out2} >= {"accepted", "decode_error", "not_image"}
    # Night 2 re-serves night 1's images: already stored, so not written again.
    assert sum(1 for o in out2 if o.status == "accepted" and not o.stored) >= 5 * 2 * 6


@pytest.mark.parametrize("night", ["1", "2026-11-27"])
def test_label_from_query_when_not_given(night):
    base = demo.ensure_server(_cfg())
    urls = (
        httpx.Client(trust_env=False)
        .get(f"{base}/search", params={"q": "star drawing", "night": night, "n": 4})
        .json()
    )
    assert urls and all("/star/" in u for u in urls)
    img = Image.open(io.BytesIO(_get(urls[0])))
    assert img.size[0] >= 64
    assert hashlib.sha256(_get(urls[0])).hexdigest() == hashlib.sha256(_get(urls[0])).hexdigest()
