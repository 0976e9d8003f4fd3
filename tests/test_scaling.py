"""A night's storage reads stay flat as the number of stored images grows (issue 15, item 3)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from freshnet import history
from freshnet.config import parse_config
from freshnet.data import catalog, dedupe, embed, embed_cache, snapshot
from freshnet.space.ledger import Ledger, format_status
from freshnet.storage_file import FileStorage

CLASSES = ["daisy", "roses"]


class Counting:
    """A Storage that records every call (method, key or prefix) before delegating."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, str(args[0]) if args else ""))
            return attr(*args, **kwargs)

        return call


def _sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def _stored(root: Path, images: int) -> FileStorage:
    """A storage with ``images`` stored images and the same small catalog, ledger and history."""
    store = FileStorage(root)
    for i in range(images):
        store.put(f"images/{_sha(i)[:2]}/{_sha(i)}.jpg", b"jpeg")
    rows = 40  # the catalog is the same size in both: only the stored images differ
    shas = [_sha(i) for i in range(rows)]
    df = pd.DataFrame({c: [""] * rows for c in catalog.ALL_COLUMNS})
    df["sha256"], df["label"] = shas, [CLASSES[i % 2] for i in range(rows)]
    df["group"] = [s[:16] for s in shas]
    df["split"] = ["holdout" if i % 5 == 0 else "train" for i in range(rows)]
    df["status"], df["phash"], df["first_seen"] = "ok", "0" * 16, "1"
    df["width"], df["height"] = 400, 300
    zeros = np.zeros(rows, np.uint64)
    dedupe.write_segment(
        store, "index/segments/1.npz", zeros, zeros, np.ones(rows, bool), dedupe.tags_of(shas)
    )
    empty = catalog.CatalogState(catalog.empty_catalog(), dedupe.HashIndex(), 0, None, {})
    catalog.commit(store, empty, df, ["index/segments/1.npz"], "setup")
    ledger = Ledger(store)
    for k in range(5):
        ledger.record(version=f"v{k}", commit=f"{k:040d}", target="/tmp/space")
    for k in range(5):
        history.record(store, {"night": str(k), "outcome": "kept"})
    return store


def _night_reads(store: Any, root: Path) -> list[tuple[str, str]]:
    """The ledger and catalog reads and writes of one night, as the cycle makes them."""
    counting = Counting(store)
    cfg = parse_config({"classes": CLASSES, "storage": f"file://{root}"})
    state = catalog.load_state(counting)
    catalog.commit(counting, state, state.df, list(state.index.segments), "night")
    snapshot.make_snapshot(counting, cfg)
    ledger = Ledger(counting)
    ledger.champion()
    ledger.find_commit("no-such-commit")  # the publish path's scan when the Space moved
    ledger.record(version="tonight", commit="f" * 40, target="/tmp/space")
    history.record(counting, {"night": "9", "outcome": "promoted"})
    history.recent(counting)
    format_status(counting)
    # Keys named by random tokens (new catalog versions) differ per run: compare their folders.
    return [(m, k.rsplit("/", 1)[0] if k.startswith("catalog/") else k) for m, k in counting.calls]


def test_night_ledger_and_catalog_reads_do_not_grow_with_stored_images(tmp_path: Path) -> None:
    few = _night_reads(_stored(tmp_path / "few", 10), tmp_path / "few")
    many = _night_reads(_stored(tmp_path / "many", 600), tmp_path / "many")
    assert Counter(m for m, _ in many) == Counter(m for m, _ in few), (few, many)
    assert sorted(many) == sorted(few)
    # Nothing a night reads for its ledger and catalog lists or opens the stored images.
    lists = [k for m, k in many if m == "list"]
    assert lists and not any("images/".startswith(p) or p.startswith("images") for p in lists)
    assert not any(k.startswith("images/") for _, k in many)


def _cache(store: FileStorage, emb: np.ndarray, shas: list[str], segments: int) -> None:
    thumb = np.zeros((embed.THUMB, embed.THUMB), np.uint8)
    keys = []
    for k, part in enumerate(np.array_split(np.arange(len(shas)), segments)):
        rows = [(emb[i], thumb + i % 200, np.array([embed.THUMB, embed.THUMB])) for i in part]
        key = f"{embed_cache.PREFIX}{k:04d}-test.npz"
        store.put(key, embed_cache._encode([shas[i] for i in part], rows))
        keys.append(key)
    store.swap_pointer(embed_cache.POINTER, json.dumps({"segments": keys}).encode(), None)


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    e = rng.standard_normal((n, embed.DIM)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_copy_search_holds_each_new_images_nearest_history_rows_only(tmp_path: Path) -> None:
    """nearest_cached streams the cache and keeps exactly the rows a full k-NN search needs."""
    rng = np.random.default_rng(0)
    store = FileStorage(tmp_path)
    n, k = 600, 3
    shas = [_sha(i) for i in range(n)]
    emb = _unit(rng, n)
    _cache(store, emb, shas, segments=3)
    among = shas[:500]  # the catalog's rows; the rest are cached but not asked for
    queries = np.concatenate([_unit(rng, 8), emb[[3, 250, 499, 550]] + 0.01])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    query = embed.Embeddings(
        [_sha(10_000 + i) for i in range(len(queries))],
        queries,
        np.ones(len(queries), bool),
        np.zeros((len(queries), embed.THUMB, embed.THUMB), np.uint8),
        np.full((len(queries), 2), embed.THUMB),
    )
    got = embed_cache.nearest_cached(store, query, among, k)
    # Brute force over every row of ``among``: each query's k nearest.
    sims = queries @ emb[:500].T
    expected = {shas[j] for row in np.argsort(-sims, axis=1)[:, :k] for j in row}
    assert set(got.shas) == expected
    assert len(got) <= k * len(queries) < len(among)
    assert got.ok.all()
    for i, s in enumerate(got.shas):
        j = shas.index(s)
        np.testing.assert_allclose(got.emb[i], emb[j], atol=2e-3)  # stored as float16
        assert got.thumb[i, 0, 0] == j % 200
    # Query 9 is a near-copy of row 250: its nearest history row is that one.
    assert shas[250] in got.shas and shas[550] not in got.shas


def test_ensure_embeddings_keep_returns_only_the_rows_asked_for(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    store = FileStorage(tmp_path)
    shas = [_sha(i) for i in range(50)]
    _cache(store, _unit(rng, 50), shas, segments=2)
    full = embed_cache.ensure_embeddings(store, shas)
    kept = embed_cache.ensure_embeddings(store, shas, keep=shas[40:])
    assert kept.shas == shas[40:] and kept.ok.all()
    np.testing.assert_array_equal(kept.emb, full.emb[40:])
    np.testing.assert_array_equal(kept.thumb, full.thumb[40:])


def test_embedder_folds_batchnorm_without_changing_the_embeddings(flower_photos):
    """The night's largest N-independent cost is embedding tonight's images: the embedder folds
    BatchNorm into the convolutions and activates in place, and its embeddings equal the plain
    backbone's."""
    import torch
    from PIL import Image
    from torch import nn

    photos = [p for paths in flower_photos.values() for p in paths[:1]]
    images = [Image.open(p).convert("RGB") for p in photos]
    embedder = embed.Embedder()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in embedder.model.modules())
    relus = [m for m in embedder.model.modules() if isinstance(m, nn.ReLU6)]
    assert relus and all(m.inplace for m in relus)
    plain = nn.Sequential(embed.lite0_body(pretrained=True), nn.AdaptiveAvgPool2d(1)).eval()
    with torch.inference_mode():
        ref = plain(embedder._tensor(images).contiguous()).flatten(1).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    got = embedder.embed(images)
    assert np.abs(got - ref).max() < 1e-5
