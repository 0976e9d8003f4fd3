"""Curation on real photos: history-wide dedupe, leakage-proof splits, conflicts, snapshots, gate, review."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from freshnet.config import parse_config
from freshnet.config_sections import DatasetConfig, ImagesConfig
from freshnet.data import batch, catalog, curate, place, quarantine, snapshot
from freshnet.data.images import image_key, normalize
from freshnet.storage_file import FileStorage

IMAGES = ImagesConfig()


def _cfg(tmp_path: Path, **dataset):
    return parse_config(
        {
            "classes": ["daisy", "roses"],
            "storage": f"file://{tmp_path}",
            "dataset": {"holdout_fraction": 0.3, **dataset},
        }
    )


def _jpeg(path: Path, scale: float = 1.0, quality: int = 95) -> bytes:
    im = Image.open(path).convert("RGB")
    if scale != 1.0:
        im = im.resize(
            (round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS
        )
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _ingest(store, label: str, data: bytes, url: str) -> dict:
    """What ingest hands to curate: the normalized image stored, an accepted Outcome."""
    n = normalize(data, IMAGES)
    store.put_if_absent(image_key(n.sha256), n.data)
    return {
        "label": label,
        "url": url,
        "query": f"photo {label}",
        "source": "test",
        "status": "accepted",
        "sha256": n.sha256,
        "orig_sha256": n.orig_sha256,
        "phash": n.phash,
        "width": n.width,
        "height": n.height,
    }


def _night1(tmp_path, flower_photos, per_class: int = 30):
    store = FileStorage(tmp_path / "store")
    cfg = _cfg(tmp_path)
    outs = [
        _ingest(store, label, p.read_bytes(), f"http://x/{label}/{p.name}")
        for label in ("daisy", "roses")
        for p in flower_photos[label][:per_class]
    ]
    rep = curate.curate(store, outs, "1", cfg)
    return store, cfg, outs, rep


def _rows(store) -> dict[str, dict]:
    return {r["sha256"]: r for r in catalog.load_catalog(store).to_dict("records")}


@pytest.mark.slow  # ~10 s: two nights of real photos with disguised copies
def test_night_two_copies_follow_their_group_and_never_leak(tmp_path, flower_photos) -> None:
    store, cfg, outs, rep = _night1(tmp_path, flower_photos)
    assert rep.new_total == 60 and rep.duplicate_total == 0 and rep.quarantined_total == 0
    before = _rows(store)
    holdout = [o for o in outs if before[o["sha256"]]["split"] == "holdout"]
    assert 5 <= len(holdout) <= 35
    snap1 = snapshot.make_snapshot(store, cfg)

    # Night 2: resized / recompressed copies of every night-1 image, exact repeats, and new photos.
    night2, source_of = [], {}
    for o in outs:
        label, name = o["label"], o["url"].rsplit("/", 1)[1]
        path = next(p for p in flower_photos[label] if p.name == name)
        for i, data in enumerate((_jpeg(path, 0.5), _jpeg(path, 1.0, 40))):
            new = _ingest(store, label, data, f"http://mirror{i}/{name}")
            night2.append(new)
            source_of[new["sha256"]] = o["sha256"]
    night2 += outs[:5]  # the same files again
    night2 += [
        _ingest(store, "daisy", p.read_bytes(), f"http://x/new/{p.name}")
        for p in flower_photos["daisy"][30:35]
    ]
    rep2 = curate.curate(store, night2, "2", cfg)

    after = _rows(store)
    assert {s: (r["split"], r["group"]) for s, r in before.items()} == {
        s: (after[s]["split"], after[s]["group"]) for s in before
    }, "splits and groups of existing images must never change"
    assert rep2.duplicate_total >= 5 and rep2.new_total == 5
    assert rep2.near_duplicate_total >= 0.95 * len(source_of)
    snap2 = snapshot.make_snapshot(store, cfg)
    train = set(snapshot.load_manifest(store, snap2.id).query("split == 'train'")["sha256"])
    for copy, src in source_of.items():
        row = after[copy]
        if before[src]["split"] == "holdout":
            assert copy not in train, f"copy {copy[:10]} of holdout image {src[:10]} entered train"
        if row["status"] == "ok" and row["group"] == before[src]["group"]:
            assert row["split"] == before[src]["split"]
    assert all(r["first_seen"] == "1" for s, r in after.items() if s in before)

    diff = snapshot.diff_snapshots(store, snap1.id, snap2.id)
    assert diff["removed"].sum() == 0
    assert diff["added"].sum() == snap2.rows - snap1.rows
    assert set(diff["label"]) == {"daisy", "roses"}
    text = snapshot.format_diff(diff)
    assert "(total)" in text and "holdout" in text


def test_copy_under_another_label_is_quarantined_and_review_persists(
    tmp_path, flower_photos
) -> None:
    store, cfg, outs, _ = _night1(tmp_path, flower_photos)
    original = outs[0]  # a daisy
    path = flower_photos["daisy"][0]
    wrong = _ingest(store, "roses", _jpeg(path, 0.5), "http://elsewhere/rose.jpg")
    exact_wrong = dict(outs[1], label="roses", url="http://elsewhere/same-bytes.jpg")
    rep = curate.curate(store, [wrong, exact_wrong], "2", cfg)
    assert rep.per_class["roses"]["quarantined"] == 2
    rows = _rows(store)
    for sha in (wrong["sha256"], original["sha256"], outs[1]["sha256"]):
        assert rows[sha]["status"] == "label_conflict"
        assert "daisy" in rows[sha]["note"] and "roses" in rows[sha]["note"]
    q = quarantine.list_quarantine(store)
    assert {wrong["sha256"], original["sha256"], outs[1]["sha256"]} <= set(q["sha256"])
    assert wrong["sha256"][:12] in quarantine.format_quarantine(
        q
    ) and "label_conflict" in quarantine.format_quarantine(q)
    snap = snapshot.load_manifest(store, snapshot.make_snapshot(store, cfg).id)
    assert not {wrong["sha256"], original["sha256"]} & set(snap["sha256"])

    # Review: the copy really is a daisy, the original is fine, the other one goes.
    quarantine.relabel(store, wrong["sha256"][:10], "daisy")
    quarantine.release(store, original["sha256"])
    quarantine.drop(store, outs[1]["sha256"])
    decisions = json.loads(store.get(quarantine.DECISIONS_KEY))["decisions"]
    assert [d["action"] for d in decisions] == ["relabel", "release", "drop"]

    # A later night with unrelated photos and a noisy-label flag: the decisions still hold.
    more = [
        _ingest(store, "roses", p.read_bytes(), f"http://x/r/{p.name}")
        for p in flower_photos["roses"][40:45]
    ]
    curate.curate(store, more, "3", cfg)
    assert (
        quarantine.quarantine_images(
            store, [original["sha256"], outs[2]["sha256"]], "noisy_label", "p=0.97"
        )
        == 1
    )
    m = snapshot.load_manifest(store, snapshot.make_snapshot(store, cfg).id).set_index("sha256")
    assert m.loc[wrong["sha256"], "label"] == "daisy"
    assert original["sha256"] in m.index  # reviewer's release outranks the later noise flag
    assert outs[1]["sha256"] not in m.index and outs[2]["sha256"] not in m.index
    with pytest.raises(quarantine.QuarantineError, match="no image"):
        quarantine.release(store, "ffffffffffff")


def _fake(label: str, sha: str, phash: int) -> dict:
    """An accepted outcome whose image is not stored: the pHash alone decides (strict threshold)."""
    return {
        "label": label,
        "url": f"http://x/{sha[:6]}",
        "query": "q",
        "source": "test",
        "status": "accepted",
        "sha256": sha,
        "orig_sha256": "o" + sha[1:],
        "phash": f"{phash:016x}",
        "width": 100,
        "height": 100,
    }


def _sha_with_split(split: str, cfg, start: int) -> str:
    for i in range(start, start + 1000):
        sha = hashlib.sha256(str(i).encode()).hexdigest()
        if (
            place.split_for_group(sha[:16], cfg.dataset.split_salt, cfg.dataset.holdout_fraction)
            == split
        ):
            return sha
    raise AssertionError


def test_image_near_train_and_holdout_groups_is_split_conflict(tmp_path) -> None:
    store = FileStorage(tmp_path / "store")
    cfg = _cfg(tmp_path, holdout_fraction=0.5)
    x = 0x0123456789ABCDEF
    a, b = _sha_with_split("train", cfg, 1), _sha_with_split("holdout", cfg, 5000)
    curate.curate(
        store, [_fake("daisy", a, x), _fake("daisy", b, x ^ 0b11111)], "1", cfg
    )  # 5 bits apart
    rows = _rows(store)
    assert (
        rows[a]["split"] == "train"
        and rows[b]["split"] == "holdout"
        and rows[a]["group"] != rows[b]["group"]
    )
    c = hashlib.sha256(b"c").hexdigest()
    rep = curate.curate(store, [_fake("daisy", c, x ^ 0b11)], "2", cfg)  # 2 bits from a, 3 from b
    assert rep.per_class["daisy"]["quarantined"] == 1
    row = _rows(store)[c]
    assert row["status"] == "split_conflict" and row["split"] == "none"
    assert "train" in row["note"] and "holdout" in row["note"]
    with pytest.raises(quarantine.QuarantineError, match="leak"):
        quarantine.release(store, c)
    assert _rows(store)[a]["split"] == "train" and _rows(store)[b]["split"] == "holdout"


def test_quality_gate_names_the_class(tmp_path, flower_photos) -> None:
    store, cfg, outs, _ = _night1(tmp_path, flower_photos, per_class=12)
    snap = snapshot.make_snapshot(store, cfg)
    problems = snapshot.check_quality(snap, cfg.dataset, cfg.classes)
    assert any("'daisy'" in p and "train" in p for p in problems)
    assert any("'roses'" in p for p in problems)
    ok = snapshot.Snapshot(
        "x", "k", {"a": {"train": 300, "holdout": 50}, "b": {"train": 40, "holdout": 10}}, 400
    )
    problems = snapshot.check_quality(ok, DatasetConfig(), ["a", "b", "c"])
    assert problems == [
        "class 'c': 0 train images, need at least 30",
        "class 'c': 0 holdout images, need at least 10",
    ]
    problems = snapshot.check_quality(ok, DatasetConfig(max_imbalance=5), ["a", "b"])
    assert len(problems) == 1 and "'b'" in problems[0] and "7.5x" in problems[0]


def test_snapshot_id_is_a_content_hash(tmp_path, flower_photos) -> None:
    s1, cfg, outs, _ = _night1(tmp_path / "one", flower_photos, per_class=8)
    a = snapshot.make_snapshot(s1, cfg)
    assert snapshot.make_snapshot(s1, cfg).id == a.id
    s2 = FileStorage(tmp_path / "two")
    for o in outs:
        s2.put(image_key(o["sha256"]), s1.get(image_key(o["sha256"])))
    curate.curate(s2, list(reversed(outs)), "1", cfg)
    b = snapshot.make_snapshot(s2, cfg)
    assert b.id == a.id and b.counts == a.counts and a.rows == 16
    assert snapshot.load_snapshot(s2, b.id).counts == a.counts


def test_corrupt_catalog_is_a_clear_error_and_loses_nothing(tmp_path, flower_photos) -> None:
    store, cfg, outs, _ = _night1(tmp_path, flower_photos, per_class=5)
    snap = snapshot.make_snapshot(store, cfg)
    ptr, token = store.read_pointer(catalog.POINTER)
    key = json.loads(ptr)["catalog_key"]
    good = store.get(key)
    store.put(key, b"PAR1 garbage")
    more = [_ingest(store, "daisy", p.read_bytes(), "u") for p in flower_photos["daisy"][20:22]]
    with pytest.raises(catalog.CatalogError, match=key.replace(".", r"\.")):
        curate.curate(store, more, "2", cfg)
    assert store.read_pointer(catalog.POINTER) == (ptr, token)
    assert len(snapshot.load_manifest(store, snap.id)) == snap.rows  # the snapshot is untouched
    store.put(key, good)  # restoring the bytes restores everything
    assert curate.curate(store, more, "2", cfg).new_total == 2
    _, token = store.read_pointer(catalog.POINTER)
    assert store.swap_pointer(catalog.POINTER, b"{not json", token)
    with pytest.raises(catalog.CatalogError, match="pointer 'catalog'"):
        catalog.load_catalog(store)
    with pytest.raises(catalog.CatalogError, match="not found"):
        snapshot.load_manifest(store, "0000000000000000")


def test_accepts_ingest_outcome_objects(tmp_path, flower_photos) -> None:
    from freshnet.data.ingest import Outcome

    store = FileStorage(tmp_path / "store")
    cfg = _cfg(tmp_path)
    d = _ingest(store, "roses", flower_photos["roses"][0].read_bytes(), "http://x/1.jpg")
    outs = [
        Outcome(**d),
        Outcome(label="roses", url="http://x/bad", query="q", source="s", status="decode_error"),
    ]
    rep = curate.curate(store, outs, "1", cfg)
    assert rep.per_class["roses"]["new"] == 1 and rep.per_class["daisy"] == {
        "new": 0,
        "duplicate": 0,
        "near_duplicate": 0,
        "quarantined": 0,
    }
    assert batch.CurationReport.from_dict(json.loads(json.dumps(rep.to_dict()))) == rep


def test_bridging_image_merges_groups_of_one_split(tmp_path) -> None:
    store = FileStorage(tmp_path / "store")
    cfg = _cfg(tmp_path, holdout_fraction=0.5)
    x = 0x0123456789ABCDEF
    a = _sha_with_split("train", cfg, 1)
    b = _sha_with_split("train", cfg, int(a[:4], 16) % 97 + 3000)
    curate.curate(store, [_fake("daisy", a, x), _fake("daisy", b, x ^ 0b11111)], "1", cfg)
    before = _rows(store)
    assert before[a]["group"] != before[b]["group"]
    c, d = hashlib.sha256(b"c").hexdigest(), hashlib.sha256(b"d").hexdigest()
    # c is near a and b (bridges them); d is near only the one whose group the merge absorbs.
    absorbed_is_b = before[b]["group"] > before[a]["group"]
    dh = (x ^ 0b11111 ^ (3 << 40)) if absorbed_is_b else (x ^ (7 << 40))
    rep = curate.curate(store, [_fake("daisy", c, x ^ 0b11), _fake("daisy", d, dh)], "2", cfg)
    assert rep.per_class["daisy"]["near_duplicate"] == 2
    rows = _rows(store)
    gid = min(before[a]["group"], before[b]["group"])
    assert {rows[s]["group"] for s in (a, b, c, d)} == {gid}
    assert {rows[s]["split"] for s in (a, b, c, d)} == {"train"}


def test_index_compaction_and_pruning_keep_state_whole(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(curate, "MAX_SEGMENTS", 3)
    monkeypatch.setattr(catalog, "KEEP_VERSIONS", 2)
    store = FileStorage(tmp_path / "store")
    cfg = _cfg(tmp_path)
    shas = []
    for night in range(1, 9):
        sha = hashlib.sha256(f"n{night}".encode()).hexdigest()
        shas.append(sha)
        curate.curate(
            store, [_fake("daisy", sha, (night * 0x9E3779B97F4A7C15) % 2**64)], str(night), cfg
        )
        state = catalog.load_state(store)
        assert state.df["sha256"].tolist() == shas and len(state.index) == night
        assert len(state.index.segments) <= 3
    assert len(store.list("catalog/")) == 2
    assert len(store.list("index/segments/")) <= 3 + 3  # live + retired within the keep window


def test_diff_counts_rows_that_moved_label_or_split_as_removed_and_added() -> None:
    import pandas as pd

    def manifest(rows):
        return pd.DataFrame(rows, columns=["sha256", "label", "split"])

    a = manifest(
        [("s1", "daisy", "train"), ("s2", "daisy", "holdout"), ("s3", "roses", "train")]
        + [("s1", "daisy", "train")]  # a repeated row counts once
    )
    b = manifest(
        [("s1", "daisy", "train"), ("s2", "daisy", "train"), ("s3", "tulips", "train")]
        + [("s4", "roses", "holdout")]
    )
    got = {
        (r.label, r.split): (r.in_a, r.in_b, r.added, r.removed)
        for r in snapshot.diff_manifests(a, b).itertuples()
    }
    assert got == {
        ("daisy", "holdout"): (1, 0, 0, 1),  # s2 moved to train
        ("daisy", "train"): (1, 2, 1, 0),
        ("roses", "holdout"): (0, 1, 1, 0),
        ("roses", "train"): (1, 0, 0, 1),  # s3 relabelled
        ("tulips", "train"): (0, 1, 1, 0),
    }
    empty = snapshot.diff_manifests(manifest([]), manifest([]))
    assert empty.empty and list(empty.columns) == [
        "label",
        "split",
        "in_a",
        "in_b",
        "added",
        "removed",
    ]


def test_snapshot_step_counts_new_images_against_the_champions_snapshot(
    tmp_path, flower_photos, caplog
) -> None:
    from freshnet import cycle

    store, _, outs, _ = _night1(tmp_path, flower_photos, per_class=5)
    cfg = _cfg(tmp_path / "store")
    first = cycle.snapshot_step(cfg)
    assert first["new_since"] is None and first["rows"] == 10
    assert cycle.snapshot_step(cfg, first["id"])["new_since"] == 0
    more = [
        _ingest(store, "roses", p.read_bytes(), f"http://x/roses/{p.name}")
        for p in flower_photos["roses"][20:23]
    ]
    curate.curate(store, more, "2", cfg)
    second = cycle.snapshot_step(cfg, first["id"])
    assert second["rows"] == 13 and second["new_since"] == 3
    # The stored rows hash to the snapshot's id (ids of stored snapshots never change).
    assert snapshot.snapshot_id(snapshot.load_manifest(store, second["id"])) == second["id"]
    # The champion's snapshot is gone: every image counts as new, and the log says why.
    store.delete(f"snapshots/{first['id']}.parquet")
    with caplog.at_level("WARNING"):
        gone = cycle.snapshot_step(cfg, first["id"])
    assert gone["new_since"] == 13
    assert first["id"] in caplog.text and "counts as new" in caplog.text
