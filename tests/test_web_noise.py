"""What web search really returns, on real photos: disguised copies and flipped labels.

Disguised copies of night-1 photos (crop, rescale, watermark, brightness, mirror, JPEG) must join
their originals' groups (never leak into the other split); out-of-sample label checking must hold
back photos of one class filed under another before the snapshot; the embedding cache must
survive corrupt and missing files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from freshnet import cycle
from freshnet.config import parse_config
from freshnet.data import embed, embed_cache
from freshnet.data.catalog import load_catalog
from freshnet.data.curate import curate
from freshnet.data.images import image_key
from freshnet.data.quarantine import list_quarantine
from freshnet.data.snapshot import load_manifest, make_snapshot
from freshnet.storage_file import FileStorage
from tests.test_dataset import _ingest
from tests.web_noise_helpers import disguise


def _cfg(root: Path, classes: list[str], **over) -> object:
    return parse_config(
        {"classes": classes, "storage": f"file://{root}", "dataset": {"holdout_fraction": 0.3}}
        | over
    )


@pytest.mark.slow
def test_disguised_copies_join_their_originals_and_distinct_photos_stay_apart(
    tmp_path, flower_photos
):
    store = FileStorage(tmp_path)
    cfg = _cfg(tmp_path, ["daisy", "roses"])
    photos = [(lab, p) for lab in ("daisy", "roses") for p in flower_photos[lab][:20]]
    night1 = [_ingest(store, lab, p.read_bytes(), f"http://a/{p.name}") for lab, p in photos]
    rep1 = curate(store, night1, "1", cfg)
    assert rep1.near_duplicate_total == 0  # 40 distinct photos: no false pair
    rng = random.Random(7)
    night2 = [_ingest(store, lab, disguise(p, rng), f"http://b/{p.name}") for lab, p in photos]
    rep2 = curate(store, night2, "2", cfg)
    rows = {r["sha256"]: r for r in load_catalog(store).to_dict("records")}
    missed = [
        o["url"]
        for o, orig in zip(night2, night1, strict=True)
        if rows[o["sha256"]]["group"] != rows[orig["sha256"]]["group"]
    ]
    assert not missed, f"copies not grouped with their original: {missed}"
    assert rep2.new_total == 0 and rep2.near_duplicate_total == len(night2)

    # The pHash alone misses some of them: the second signal is what catches them.
    store3 = FileStorage(tmp_path / "phash-only")
    cfg3 = _cfg(tmp_path / "phash-only", ["daisy", "roses"], dedupe={"copies": False})
    for o in night1 + night2:
        store3.put_if_absent(image_key(o["sha256"]), store.get(image_key(o["sha256"])))
    curate(store3, night1, "1", cfg3)
    assert curate(store3, night2, "2", cfg3).new_total > 0


class CountingEmbedder(embed.Embedder):
    def __init__(self) -> None:
        super().__init__()
        self.images = 0

    def embed(self, images):
        self.images += len(images)
        return super().embed(images)


def test_embedding_cache_computes_once_and_recomputes_what_is_corrupt_or_missing(
    tmp_path, flower_photos
):
    store = FileStorage(tmp_path)
    outs = [_ingest(store, "daisy", p.read_bytes(), p.name) for p in flower_photos["daisy"][:6]]
    shas = [o["sha256"] for o in outs]
    e = CountingEmbedder()
    first = embed_cache.ensure_embeddings(store, shas, e)
    assert e.images == 6 and first.ok.all()
    assert np.allclose(np.linalg.norm(first.emb, axis=1), 1, atol=1e-3)
    again = embed_cache.ensure_embeddings(store, shas, e)
    assert e.images == 6  # cached: nothing embedded twice
    assert np.allclose(again.emb, first.emb, atol=2e-3)

    (segment,) = json.loads(store.read_pointer(embed_cache.POINTER)[0])["segments"]
    store.put(segment, b"not an npz")
    healed = embed_cache.ensure_embeddings(store, shas, e)
    assert e.images == 12 and healed.ok.all()
    assert np.allclose(healed.emb, first.emb, atol=2e-3)
    (segment,) = json.loads(store.read_pointer(embed_cache.POINTER)[0])["segments"]
    store.delete(segment)
    embed_cache.ensure_embeddings(store, shas[:3], e)
    assert e.images == 15
    # A garbled pointer and an image missing from storage: recomputed / not ok, never a crash.
    raw, token = store.read_pointer(embed_cache.POINTER)
    assert store.swap_pointer(embed_cache.POINTER, b"{garbage", token)
    out = embed_cache.ensure_embeddings(store, [*shas[:2], "f" * 64], e)
    assert out.ok.tolist() == [True, True, False]


@pytest.mark.slow
def test_label_check_holds_back_flipped_labels_before_the_snapshot(tmp_path, flower_photos):
    classes = ["daisy", "dandelion", "sunflowers"]
    store = FileStorage(tmp_path)
    cfg = _cfg(tmp_path, classes)
    night1 = [
        _ingest(store, lab, p.read_bytes(), f"http://a/{p.name}")
        for lab in classes
        for p in flower_photos[lab][:50]
    ]
    curate(store, night1, "1", cfg)
    first = cycle.label_check_step(cfg, "1")
    assert first["checked"] == len(night1)
    # Night 2: 30 new photos per class, and 6 more daisies filed under "sunflowers" (~17%).
    night2 = [
        _ingest(store, lab, p.read_bytes(), f"http://b/{p.name}")
        for lab in classes
        for p in flower_photos[lab][50:80]
    ]
    flipped = [
        _ingest(store, "sunflowers", p.read_bytes(), f"http://b/flip/{p.name}")
        for p in flower_photos["daisy"][80:86]
    ]
    curate(store, night2 + flipped, "2", cfg)
    check = cycle.label_check_step(cfg, "2")
    flagged = {i["sha256"]: i for i in check["issues"]}
    caught = [o["sha256"] for o in flipped if o["sha256"] in flagged]
    assert len(caught) >= 5, check
    assert all(flagged[s]["suggested"] == "daisy" for s in caught)
    wrong = [s for s in flagged if s not in {o["sha256"] for o in flipped}]
    assert len(wrong) <= len(caught), f"more false flags than true ones: {check}"
    rows = {r["sha256"]: r for r in load_catalog(store).to_dict("records")}
    assert {rows[s]["status"] for s in caught} == {"noisy_label"}
    assert "looks like daisy" in rows[caught[0]]["note"]
    snap = load_manifest(store, make_snapshot(store, cfg).id)
    assert not set(caught) & set(snap["sha256"])  # out of train and holdout alike
    assert set(caught) <= set(list_quarantine(store)["sha256"])


def test_label_check_skips_a_class_too_small_for_its_folds_and_says_why(
    tmp_path, flower_photos, caplog
):
    classes = ["daisy", "roses", "tulips"]
    store = FileStorage(tmp_path)
    cfg = _cfg(tmp_path, classes)
    outs = [
        _ingest(store, lab, p.read_bytes(), p.name)
        for lab, n in (("daisy", 20), ("roses", 20), ("tulips", 3))
        for p in flower_photos[lab][:n]
    ]
    curate(store, outs, "1", cfg)
    with caplog.at_level("WARNING"):
        check = cycle.label_check_step(cfg, "1")
    assert check["checked"] == 40
    assert any("'tulips': 3 image(s)" in n for n in check["notes"])
    assert "'tulips': 3 image(s)" in caplog.text
    # Two images of one class only: nothing can be judged; the night goes on.
    cfg2 = _cfg(tmp_path, ["daisy", "tulips"], label_check={"folds": 5})
    assert cycle.label_check_step(cfg2, "1")["issues"] == []


def test_label_check_can_be_turned_off(tmp_path):
    cfg = _cfg(tmp_path, ["a", "b"], label_check={"enabled": False})
    check = cycle.label_check_step(cfg, "1")
    assert check["checked"] == 0 and "label check off" in check["notes"][0]


def test_copy_scores_in_worker_processes_equal_the_scores_in_one(flower_photos, monkeypatch):
    """The night's copy check fans out to processes when pairs are many: same score per pair."""
    import concurrent.futures as cf

    from PIL import Image

    from freshnet.data import copies, process_pool

    paths = [p for ps in flower_photos.values() for p in ps[:2]]
    photos, crops = [], []
    for p in paths:
        with Image.open(p) as im:
            rgb = im.convert("RGB")
        w, h = rgb.size
        for out, view in (
            (photos, rgb),
            (crops, rgb.crop((w // 20, h // 20, w - w // 20, h - h // 20))),
        ):
            thumb, hw = embed.thumbnail(view)
            out.append((thumb, np.array(hw)))
    # Every photo against its crop (a copy) and against the next photo (not one).
    n = len(photos)
    pairs = [
        x for k in range(n) for x in ((*photos[k], *crops[k]), (*photos[k], *photos[(k + 1) % n]))
    ]
    pools = []

    class Pool(cf.ProcessPoolExecutor):
        def __init__(self, workers, **kw):
            pools.append(workers)
            super().__init__(workers, **kw)

    monkeypatch.setattr(process_pool.cf, "ProcessPoolExecutor", Pool)
    one = copies.score_pairs(pairs, 0.77, workers=1)
    assert pools == []
    many = copies.score_pairs(pairs, 0.77, workers=2, per_worker=len(pairs) // 2)
    assert pools == [2] and many == one
    copy_scores, other_scores = one[0::2], one[1::2]
    assert min(copy_scores) >= 0.77 > max(other_scores)
