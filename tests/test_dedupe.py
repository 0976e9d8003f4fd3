"""Near-duplicate search, hashing and the persisted index."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from freshnet.data import dedupe, hamming_search, hashing
from freshnet.storage_file import FileStorage
from tests import hash_reference


def _planted(n: int, copies: int, max_flips: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    src, dst = rng.choice(n, copies, replace=False), rng.choice(n, copies, replace=False)
    for s, d in zip(src, dst, strict=True):
        v = int(h[s])
        for b in rng.choice(64, int(rng.integers(0, max_flips + 1)), replace=False):
            v ^= 1 << int(b)
        h[d] = v
    h[1] = h[2] = h[3]  # identical hashes share every bucket
    return h


@pytest.mark.parametrize("k", [0, 3, 8, 10])
def test_find_pairs_equals_brute_force(k: int) -> None:
    h = _planted(6000, 150, 12, seed=k)
    got = hamming_search.find_pairs(h, k)
    want = hash_reference.brute_force_pairs(h, k)
    assert len(want[0]) > 0
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_index_query_equals_brute_force() -> None:
    base = _planted(5000, 0, 0, seed=1)
    rng = np.random.default_rng(2)
    q = base[rng.choice(len(base), 200, replace=False)].copy()
    for i in range(len(q)):
        for b in rng.choice(64, int(rng.integers(0, 9)), replace=False):
            q[i] ^= np.uint64(1 << int(b))
    idx = dedupe.HashIndex(base, base, np.ones(len(base), bool), base)
    qi, ti, d = idx.query(q, 8)
    got = set(zip(qi.tolist(), ti.tolist(), strict=True))
    dist = hashing.hamming(q[:, None], base[None, :])
    want = {(int(a), int(b)) for a, b in zip(*np.nonzero(dist <= 8), strict=True)}
    assert got == want and len(want) >= 200
    assert np.array_equal(d, dist[qi, ti])


def test_hashes_match_imagehash(flower_photos) -> None:
    paths = [p for ps in flower_photos.values() for p in ps[:4]]
    for p in paths:
        with Image.open(p) as im:
            assert f"{hashing.phash_image(im):016x}" == str(imagehash.phash(im))
            assert f"{hash_reference.dhash_image(im):016x}" == str(imagehash.dhash(im))
    ph, dh, ok = hash_reference.hash_files(paths, workers=1)
    assert ok.all() and len(ph) == len(paths)
    exact = hashing.hex_to_u64([str(imagehash.phash(Image.open(p))) for p in paths])
    # The fast path decodes JPEGs at reduced DCT scale: a few bits of resampling noise at most.
    assert int(hashing.hamming(ph, exact).max()) <= 6


def test_variants_are_near_and_distinct_photos_are_not(flower_photos) -> None:
    paths = [ps[i] for ps in flower_photos.values() for i in range(6)]

    def sig(im: Image.Image, q: int = 90) -> tuple[int, int]:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=q)
        return hashing.signals_from_bytes(buf.getvalue())

    base = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        p0, d0 = sig(im)
        base.append(p0)
        w, h = im.size
        for v in (
            sig(im.resize((w // 2, h // 2))),
            sig(im, 40),
            sig(ImageEnhance.Brightness(im).enhance(1.1)),
        ):
            assert hashing.hamming(v[0], p0) <= 8 and hashing.hamming(v[1], d0) <= 12
    i, _, _ = hamming_search.find_pairs(np.array(base, np.uint64), 8)
    assert len(i) == 0


def test_index_segments_roundtrip_and_corruption(tmp_path) -> None:
    store = FileStorage(tmp_path)
    h = _planted(100, 0, 0)
    dedupe.write_segment(store, "index/segments/a.npz", h[:60], h[:60], np.ones(60, bool), h[:60])
    dedupe.write_segment(store, "index/segments/b.npz", h[60:], h[60:], np.zeros(40, bool), h[60:])
    idx = dedupe.load_index(store, ["index/segments/a.npz", "index/segments/b.npz"])
    assert np.array_equal(idx.phash, h) and idx.has_dhash.sum() == 60
    store.put("index/segments/b.npz", b"not an npz")
    with pytest.raises(dedupe.IndexError_, match="b.npz is corrupt"):
        dedupe.load_index(store, ["index/segments/a.npz", "index/segments/b.npz"])
    with pytest.raises(dedupe.IndexError_, match="missing"):
        dedupe.load_index(store, ["index/segments/c.npz"])


def test_union_find_groups() -> None:
    uf = dedupe.UnionFind(5)
    uf.union(0, 3)
    uf.union(3, 4)
    assert sorted(sorted(g) for g in uf.groups().values()) == [[0, 3, 4], [1], [2]]
