"""Catalog of every image ever accepted, curation (exact + near dedupe, leakage-proof splits),
snapshots, the quality gate and the quarantine review.

Storage layout (all through the Storage contract, so file:// and s3:// behave alike):

- pointer ``catalog`` -> JSON ``{"version", "catalog_key", "index", "rows", "updated"}``
- ``catalog/v<version>-<token>.parquet``: all rows, in the order they were added
- ``index/segments/<version>-<token>.npz``: the near-duplicate index, one append-only segment per
  curation (row i of the concatenated segments is row i of the catalog)
- ``snapshots/<id>.parquet``: immutable manifests named by the content hash of their rows
- ``quarantine/decisions.json``: the reviewer's decisions (release / relabel / drop), an audit log

Every write goes to a new key; only the compare-and-swap of the pointer makes it visible, so a
crash or a concurrent writer never loses what is stored.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import secrets
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import numpy as np
import pandas as pd

from freshnet.config import Config, DatasetConfig
from freshnet.data import dedupe
from freshnet.storage import NotFound, Storage

log = logging.getLogger(__name__)

T = TypeVar("T")

CATALOG_COLUMNS = [
    "sha256",
    "orig_sha256",
    "label",
    "url",
    "query",
    "source",
    "phash",
    "group",
    "split",
    "first_seen",
    "status",
    "note",
]
# Added beyond the contract: the second near-duplicate signal and the image size.
EXTRA_COLUMNS = ["dhash", "width", "height"]
ALL_COLUMNS = CATALOG_COLUMNS + EXTRA_COLUMNS
# A snapshot row is a catalog row without the fields only curation needs.
SNAPSHOT_COLUMNS = [c for c in CATALOG_COLUMNS if c not in ("orig_sha256", "note")]
# "feedback": a correction from the app, out of every snapshot until reviewed (freshnet/data/feedback.py).
STATUSES = ("ok", "label_conflict", "split_conflict", "noisy_label", "dropped", "feedback")
QUARANTINE_STATUSES = ("label_conflict", "split_conflict", "noisy_label")
POINTER = "catalog"
DECISIONS_KEY = "quarantine/decisions.json"
MAX_SEGMENTS = 64  # index segments before a compaction
KEEP_VERSIONS = 5  # catalog versions kept for readers that loaded an older pointer
NO_SPLIT = "none"  # split of a split_conflict image: it belongs to neither side


class CatalogError(RuntimeError):
    """The stored catalog or its index is unreadable or inconsistent; nothing was changed."""


class CatalogConflict(RuntimeError):
    """Another writer changed the catalog while this one worked; rerun to apply on top of it."""


class QuarantineError(ValueError):
    """A quarantine command names an unknown image or asks for something unsafe."""


class QualityGateFailed(Exception):
    """The snapshot fails the quality gate; ``problems`` names each class and what is missing."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("quality gate failed:\n" + "\n".join(f"  - {p}" for p in self.problems))


# ---------------------------------------------------------------------------------------------
# Splits


def split_for_group(group: str, salt: str, holdout_fraction: float) -> str:
    """Holdout membership as a pure function of the group id (salted sha256 vs the fraction)."""
    h = hashlib.sha256(f"{salt}\x00{group}".encode()).digest()
    return "holdout" if int.from_bytes(h[:8], "big") / 2.0**64 < holdout_fraction else "train"


# ---------------------------------------------------------------------------------------------
# Catalog state


@dataclass
class CatalogState:
    df: pd.DataFrame
    index: dedupe.HashIndex
    version: int
    token: str | None  # the pointer's version token for the compare-and-swap
    pointer: dict[str, Any]


def _empty_catalog() -> pd.DataFrame:
    df = pd.DataFrame({c: pd.Series(dtype="object") for c in ALL_COLUMNS})
    df["width"] = df["width"].astype("int64")
    df["height"] = df["height"].astype("int64")
    return df


def load_state(store: Storage) -> CatalogState:
    """The current catalog and near-duplicate index; raises CatalogError naming what is wrong."""
    raw, token = store.read_pointer(POINTER)
    if raw is None:
        return CatalogState(_empty_catalog(), dedupe.HashIndex(), 0, None, {})
    try:
        ptr = json.loads(raw)
        version = int(ptr["version"])
        key = str(ptr["catalog_key"])
        segments = [str(s) for s in ptr["index"]]
    except Exception as exc:  # noqa: BLE001 - any malformed pointer is the same error
        raise CatalogError(
            f"pointer {POINTER!r} in {store.uri} is not a valid catalog pointer ({exc}); "
            "nothing was changed"
        ) from None
    try:
        data = store.get(key)
    except NotFound:
        raise CatalogError(
            f"catalog {store.url(key)} named by pointer {POINTER!r} is missing"
        ) from None
    try:
        df = pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001
        raise CatalogError(
            f"catalog {store.url(key)} is not readable Parquet: {exc}; nothing was changed"
        ) from None
    missing = [c for c in ALL_COLUMNS if c not in df.columns]
    if missing:
        raise CatalogError(f"catalog {store.url(key)} lacks columns {missing}")
    try:
        index = dedupe.load_index(store, segments)
    except dedupe.IndexError_ as exc:
        raise CatalogError(f"{exc}; nothing was changed") from None
    if len(index) != len(df) or (
        len(df) and not np.array_equal(index.tag, dedupe.tags_of(df["sha256"].tolist()))
    ):
        raise CatalogError(
            f"near-duplicate index ({len(index)} rows) is out of step with catalog {store.url(key)} "
            f"({len(df)} rows); nothing was changed"
        )
    return CatalogState(df.reset_index(drop=True), index, version, token, ptr)


def load_catalog(store: Storage) -> pd.DataFrame:
    """Every image ever accepted (CATALOG_COLUMNS plus dhash/width/height)."""
    return load_state(store).df


def _commit(
    store: Storage,
    state: CatalogState,
    df: pd.DataFrame,
    segments: list[str],
    what: str,
    new_segments: Sequence[str] = (),
) -> None:
    """Write the catalog as a new version and swap the pointer; old versions are pruned later.

    The pointer remembers the last KEEP_VERSIONS catalog keys and the segments a compaction
    retired, so pruning never needs to list storage and never deletes what a reader that loaded
    a recent pointer may still fetch.
    """
    version = state.version + 1
    key = f"catalog/v{version:06d}-{secrets.token_hex(4)}.parquet"
    buf = io.BytesIO()
    df[ALL_COLUMNS].to_parquet(buf, index=False)
    store.put(key, buf.getvalue())
    old = state.pointer
    history = [*old.get("history", []), key]
    retired = [dict(r) for r in old.get("retired", [])]
    gone = [s for s in state.index.segments if s not in set(segments)]
    if gone:
        retired.append({"version": version, "keys": gone})
    ptr = {
        "version": version,
        "catalog_key": key,
        "index": segments,
        "rows": len(df),
        "updated": what,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "history": history[-KEEP_VERSIONS:],
        "retired": [r for r in retired if r["version"] > version - KEEP_VERSIONS],
    }
    if not store.swap_pointer(POINTER, json.dumps(ptr, sort_keys=True).encode(), state.token):
        for k in [key, *new_segments]:  # ours alone, never visible: safe to remove
            store.delete(k)
        raise CatalogConflict(
            f"catalog pointer changed while {what} ran (another writer); rerun it"
        )
    log.info("catalog v%d: %d rows (%s)", version, len(df), what)
    for k in history[:-KEEP_VERSIONS]:
        store.delete(k)
    for r in retired:
        if r["version"] <= version - KEEP_VERSIONS:
            for k in r["keys"]:
                store.delete(k)


# ---------------------------------------------------------------------------------------------
# Curation


@dataclass
class CurationReport:
    night: str
    per_class: dict[str, dict[str, int]]  # new, duplicate, near_duplicate, quarantined
    new_total: int
    duplicate_total: int
    quarantined_total: int
    near_duplicate_total: int = 0
    catalog_rows: int = 0
    conflicts: list[dict[str, Any]] = field(default_factory=list)  # one per quarantined image

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CurationReport:
        return cls(**d)


_OUTCOME_FIELDS = (
    "label",
    "url",
    "query",
    "source",
    "status",
    "sha256",
    "orig_sha256",
    "phash",
    "width",
    "height",
)


def _outcome(o: Any) -> dict[str, Any]:
    if isinstance(o, Mapping):
        return {f: o.get(f) for f in _OUTCOME_FIELDS}
    return {f: getattr(o, f, None) for f in _OUTCOME_FIELDS}


def _decided(store: Storage) -> set[str]:
    return {d["sha256"] for d in load_decisions(store)}


def _signals(store: Storage, sha: str, phash: str | None) -> tuple[int, int, bool]:
    from freshnet.data.images import image_key

    try:
        data = store.get(image_key(sha))
    except NotFound:
        data = None
    p = int(phash, 16) if phash else None
    if data is None:
        if p is None:
            raise ValueError(
                f"image {sha} has no phash and is not in storage ({store.url(image_key(sha))})"
            )
        log.warning("image %s not in storage: near-duplicate check on pHash alone", sha)
        return p, 0, False
    try:
        fp, dh = dedupe.signals_from_bytes(data)
        if p is None:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                p = dedupe.phash_image(im)
        return p, dh, True
    except Exception as exc:  # noqa: BLE001 - a bad stored file must not stop the night
        if p is None:
            raise ValueError(f"image {sha}: no phash and stored bytes unreadable: {exc}") from None
        log.warning("image %s unreadable (%s): near-duplicate check on pHash alone", sha, exc)
        return p, 0, False


def _copy_pairs(
    store: Storage, existing: Sequence[str], pending: Sequence[dict[str, Any]], ddc: Any
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Disguised-copy pairs: (pending position, catalog row) and (pending a, pending b)."""
    from freshnet.data import copies, embed

    # Every image ever accepted is cached since its own night (computed once if the cache is new).
    tonight = [o["sha256"] for o in pending]
    new = embed.ensure_embeddings(store, [*existing, *tonight], progress=True, keep=tonight)
    # Only each new image's nearest cached rows are held, never the whole history: its memory
    # and the search stream segment by segment (a year of nights is 100k+ embeddings).
    old = embed.nearest_cached(store, new, existing, ddc.copy_candidates)
    args = (ddc.copy_candidates, ddc.copy_floor, ddc.copy_threshold)
    found = copies.find_copies(new, old, *args)
    within = copies.find_copies(new, None, *args)
    row_of = {s: i for i, s in reversed(list(enumerate(existing)))}
    pairs = [
        (q, row_of[old.shas[t]])
        for q, t in zip(found.query.tolist(), found.target.tolist(), strict=True)
    ]
    batch = list(zip(within.query.tolist(), within.target.tolist(), strict=True))
    log.info("disguised copies: %d of history, %d within tonight", len(pairs), len(batch))
    return pairs, batch


_COUNT_KINDS = ("new", "duplicate", "near_duplicate", "quarantined")


@dataclass
class _Tally:
    """Per-class counts and the report's conflict list, kept together so they never disagree."""

    counts: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    conflicts: list[dict[str, Any]] = field(default_factory=list)

    def ensure(self, label: str) -> None:
        # A label outside cfg.classes still gets all four counts.
        for kind in _COUNT_KINDS:
            self.counts[label][kind] += 0

    def count(self, label: str, kind: str) -> None:
        self.counts[label][kind] += 1

    def quarantine(self, sha: str, label: str, status: str, note: str) -> None:
        """Count a quarantined image and list it in the report (the one place the entry is built)."""
        self.counts[label]["quarantined"] += 1
        self.conflicts.append({"sha256": sha, "label": label, "status": status, "note": note})

    def report(self, night: str, catalog_rows: int) -> CurationReport:
        per_class = {c: dict(v) for c, v in sorted(self.counts.items())}
        return CurationReport(
            night=night,
            per_class=per_class,
            new_total=sum(v["new"] for v in per_class.values()),
            duplicate_total=sum(v["duplicate"] for v in per_class.values()),
            quarantined_total=sum(v["quarantined"] for v in per_class.values()),
            near_duplicate_total=sum(v["near_duplicate"] for v in per_class.values()),
            catalog_rows=catalog_rows,
            conflicts=self.conflicts,
        )


@dataclass
class _History:
    """The catalog's rows as tonight's curation reads and edits them (columns as lists)."""

    sha: list[str]
    status: list[str]
    notes: list[str]
    groups: list[str]
    labels: list[str]
    decided: set[str]  # images a reviewer decided on: curation never overrides them
    row_of: dict[str, int]  # sha256 and orig_sha256 of existing rows -> row
    members: dict[str, list[int]]  # group -> its rows
    group_split: dict[str, str]
    alias: dict[str, str] = field(default_factory=dict)  # group merged tonight -> group it joined

    @classmethod
    def of(cls, df: pd.DataFrame, decided: set[str]) -> _History:
        row_of: dict[str, int] = {}
        for i, (s, o) in enumerate(zip(df["sha256"], df["orig_sha256"], strict=True)):
            row_of.setdefault(s, i)
            if o:
                row_of.setdefault(o, i)
        groups = df["group"].tolist()
        members: dict[str, list[int]] = defaultdict(list)
        for i, g in enumerate(groups):
            members[g].append(i)
        return cls(
            sha=df["sha256"].tolist(),
            status=df["status"].tolist(),
            notes=df["note"].tolist(),
            groups=groups,
            labels=df["label"].tolist(),
            decided=decided,
            row_of=row_of,
            members=members,
            group_split=dict(zip(df["group"], df["split"], strict=True)),
        )

    def canon(self, g: str) -> str:
        """The group ``g`` belongs to now (groups merged earlier tonight point to the survivor)."""
        while g in self.alias:
            g = self.alias[g]
        return g

    def merge(self, g: str, into: str) -> None:
        # Callers merge only groups on one side of the split: rows change group, never split.
        self.alias[g] = into
        for r in self.members.pop(g):
            self.groups[r] = into
            self.members[into].append(r)

    def mark_conflict(self, rows: Iterable[int], all_labels: set[str]) -> None:
        """Quarantine existing rows whose group now carries several labels (decided rows stay)."""
        note = "labels: " + ", ".join(sorted(all_labels))
        for r in rows:
            if self.sha[r] in self.decided or self.status[r] in ("dropped", "split_conflict"):
                continue
            if self.status[r] in ("ok", "label_conflict"):
                self.status[r], self.notes[r] = "label_conflict", note


@dataclass
class _Batch:
    """Tonight's images that are no exact copy of anything held, in arrival order."""

    pending: list[dict[str, Any]] = field(default_factory=list)
    position: dict[str, int] = field(default_factory=dict)  # sha256/orig_sha256 -> pending index
    # pending index -> labels its exact copies arrived with tonight (a dispute within the batch)
    disputed: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))

    def add(self, o: dict[str, Any]) -> None:
        self.position[o["sha256"]] = len(self.pending)
        if o["orig_sha256"]:
            self.position.setdefault(o["orig_sha256"], len(self.pending))
        self.pending.append(o)


@dataclass
class _Hashes:
    """The near-duplicate signals of the pending images, by pending index."""

    phash: np.ndarray
    dhash: np.ndarray
    has_dhash: np.ndarray  # False: stored bytes missing or unreadable, pHash alone


@dataclass
class _Placement:
    """Where each pending image lands, by pending index."""

    group: list[str]
    split: list[str]
    status: list[str]
    note: list[str]


def _copy_of_history(o: dict[str, Any], hist: _History, tally: _Tally) -> bool:
    """Count ``o`` if it is an exact copy of a catalog row; False when it is not one."""
    hit = hist.row_of.get(o["sha256"], hist.row_of.get(o["orig_sha256"] or "", None))
    if hit is None:
        return False
    label = o["label"]
    if hist.labels[hit] != label and hist.status[hit] != "dropped":
        # The same photo under two labels: the labels are unreliable, not guessed.
        g = hist.groups[hit]
        labs = {hist.labels[r] for r in hist.members[g]} | {label}
        if o["source"] != "feedback":  # unreviewed feedback only reports the dispute
            hist.mark_conflict(hist.members[g], labs)
        note = f"exact copy of {hist.labels[hit]} image {hist.sha[hit]}"
        tally.quarantine(o["sha256"], label, "label_conflict", note)
    else:
        tally.count(label, "duplicate")
    return True


def _copy_within_batch(o: dict[str, Any], batch: _Batch, tally: _Tally) -> bool:
    """Count ``o`` if it is an exact copy of an image that arrived earlier tonight."""
    j = batch.position.get(o["sha256"], batch.position.get(o["orig_sha256"] or "", None))
    if j is None:
        return False
    label, first = o["label"], batch.pending[j]
    if first["label"] != label:
        if o["source"] != "feedback":  # unreviewed feedback only reports the dispute
            batch.disputed[j].add(label)
        note = f"exact copy of {first['label']} image {first['sha256']}"
        tally.quarantine(o["sha256"], label, "label_conflict", note)
    else:
        tally.count(label, "duplicate")
    return True


def _take_outcomes(outcomes: Sequence[Any], hist: _History, tally: _Tally) -> _Batch:
    """Stage 1: keep the accepted outcomes that are new bytes; count the exact copies."""
    batch = _Batch()
    for raw in outcomes:
        o = _outcome(raw)
        if o["status"] != "accepted":
            continue
        if not o["label"] or not o["sha256"]:
            raise ValueError(f"accepted outcome for {o['url']!r} lacks a label or sha256: {o}")
        tally.ensure(o["label"])
        if not (_copy_of_history(o, hist, tally) or _copy_within_batch(o, batch, tally)):
            batch.add(o)
    return batch


def _hash_signals(store: Storage, pending: Sequence[dict[str, Any]]) -> _Hashes:
    n = len(pending)
    hashes = _Hashes(np.zeros(n, np.uint64), np.zeros(n, np.uint64), np.zeros(n, bool))
    for i, o in enumerate(pending):
        p, d, ok = _signals(store, o["sha256"], o["phash"])
        hashes.phash[i], hashes.dhash[i], hashes.has_dhash[i] = p, d, ok
    return hashes


def _near_links(
    index: dedupe.HashIndex, h: _Hashes, groups: Sequence[str], ddc: Any
) -> tuple[dedupe.UnionFind, dict[int, set[str]]]:
    """Stage 2: near duplicates by pHash (confirmed by dHash).

    Returns the union of tonight's images that are near each other, and for each pending index
    the existing groups it is near.
    """
    n = len(h.phash)
    uf = dedupe.UnionFind(n)
    touched: dict[int, set[str]] = defaultdict(set)
    if not (ddc.near and n):
        return uf, touched
    P, D, HD = h.phash, h.dhash, h.has_dhash
    qi, ti, dist = index.query(P, ddc.near_threshold)
    if len(qi):
        keep = dedupe.confirm(
            index, ti, D[qi], HD[qi], dist, ddc.confirm_threshold, ddc.unconfirmed_threshold
        )
        for q, t in zip(qi[keep].tolist(), ti[keep].tolist(), strict=True):
            touched[q].add(groups[t])
    if n > 1:
        ii, jj, dist = dedupe.find_pairs(P, ddc.near_threshold)
        if len(ii):
            tmp = dedupe.HashIndex(P, D, HD, np.zeros(n, np.uint64))
            keep = dedupe.confirm(
                tmp, jj, D[ii], HD[ii], dist, ddc.confirm_threshold, ddc.unconfirmed_threshold
            )
            for a, b in zip(ii[keep].tolist(), jj[keep].tolist(), strict=True):
                uf.union(a, b)
    return uf, touched


def _link_disguised_copies(
    store: Storage,
    hist: _History,
    pending: Sequence[dict[str, Any]],
    ddc: Any,
    uf: dedupe.UnionFind,
    touched: dict[int, set[str]],
) -> None:
    """Stage 3, the second signal: disguised copies (crops, watermarks, flips) pHash cannot see."""
    found, within = _copy_pairs(store, hist.sha, pending, ddc)
    for q, t in found:
        touched[q].add(hist.groups[t])
    for a, b in within:
        uf.union(a, b)


def _quarantine_split_conflict(
    comp: Sequence[int],
    near: set[str],
    pending: Sequence[dict[str, Any]],
    hist: _History,
    placed: _Placement,
    tally: _Tally,
) -> None:
    """A component near groups in both splits belongs to neither: joining would leak."""
    gl = sorted(near)
    for i in comp:
        sha = pending[i]["sha256"]
        placed.group[i], placed.split[i], placed.status[i] = sha[:16], NO_SPLIT, "split_conflict"
        placed.note[i] = "near groups in both splits: " + ", ".join(
            f"{g} ({hist.group_split[g]})" for g in gl
        )
        tally.quarantine(sha, pending[i]["label"], "split_conflict", placed.note[i])


def _group_for(
    comp: Sequence[int],
    near: set[str],
    pending: Sequence[dict[str, Any]],
    hist: _History,
    dcfg: DatasetConfig,
) -> tuple[str, str]:
    """The group (and its split) a component joins: the smallest near group, merging the rest,
    or a new group named by its smallest sha256, split by the salted hash of that name."""
    if near:
        gid = min(near)
        split = hist.group_split[gid]
        for g in sorted(near - {gid}):
            hist.merge(g, gid)
        return gid, split
    gid = min(pending[i]["sha256"] for i in comp)[:16]
    return gid, split_for_group(gid, dcfg.split_salt, dcfg.holdout_fraction)


def _group_labels(
    comp: Sequence[int], existing: Sequence[int], batch: _Batch, hist: _History
) -> tuple[set[str], set[str]]:
    """(trusted, all) labels of a group with this component in it.

    Unreviewed feedback never takes other images out of the dataset: only trusted labels (web,
    reviewed) make a conflict for them; a feedback image sees every label.
    """
    pending = batch.pending
    comp_labels = {pending[i]["label"] for i in comp}
    for i in comp:
        comp_labels |= batch.disputed.get(i, set())
    trusted = {
        hist.labels[r]
        for r in existing
        if hist.status[r] in ("ok", "label_conflict", "noisy_label")
    }
    trusted |= {pending[i]["label"] for i in comp if pending[i]["source"] != "feedback"}
    trusted |= set().union(*(batch.disputed.get(i, set()) for i in comp))
    feedback = {hist.labels[r] for r in existing if hist.status[r] == "feedback"}
    return trusted, comp_labels | trusted | feedback


def _join_group(
    comp: Sequence[int],
    near: set[str],
    batch: _Batch,
    hist: _History,
    placed: _Placement,
    tally: _Tally,
    dcfg: DatasetConfig,
) -> None:
    """Place a component in its group; a group with several labels is quarantined, not guessed."""
    gid, split = _group_for(comp, near, batch.pending, hist, dcfg)
    hist.group_split[gid] = split
    existing = hist.members.get(gid, [])
    trusted, all_labels = _group_labels(comp, existing, batch, hist)
    dropped_only = bool(existing) and all(hist.status[r] == "dropped" for r in existing)
    for pos, i in enumerate(sorted(comp)):
        o = batch.pending[i]
        placed.group[i], placed.split[i] = gid, split
        seen_labels = all_labels if o["source"] == "feedback" else trusted
        if len(seen_labels) > 1:
            placed.status[i] = "label_conflict"
            placed.note[i] = "labels: " + ", ".join(sorted(seen_labels))
            tally.quarantine(o["sha256"], o["label"], "label_conflict", placed.note[i])
        elif dropped_only:
            placed.status[i] = "dropped"
            placed.note[i] = f"near-copy of dropped images in group {gid}"
            tally.count(o["label"], "quarantined")
        elif near or pos > 0:
            tally.count(o["label"], "near_duplicate")
        else:
            tally.count(o["label"], "new")
    if len(trusted) > 1:
        hist.mark_conflict(existing, trusted)


def _place(
    batch: _Batch,
    uf: dedupe.UnionFind,
    touched: dict[int, set[str]],
    hist: _History,
    tally: _Tally,
    dcfg: DatasetConfig,
) -> _Placement:
    """Stage 4: give each component of near images a group and a split (or quarantine it)."""
    n = len(batch.pending)
    # Corrections from the app wait for review instead of joining train/holdout at once.
    status = ["feedback" if o["source"] == "feedback" else "ok" for o in batch.pending]
    placed = _Placement([""] * n, [""] * n, status, [""] * n)
    for comp in sorted(uf.groups().values(), key=min):
        near = {hist.canon(g) for i in comp for g in touched[i]}
        splits = {hist.group_split[g] for g in near}
        if ("train" in splits and "holdout" in splits) or NO_SPLIT in splits:
            _quarantine_split_conflict(comp, near, batch.pending, hist, placed, tally)
        else:
            _join_group(comp, near, batch, hist, placed, tally, dcfg)
    return placed


def _new_rows(
    pending: Sequence[dict[str, Any]], h: _Hashes, placed: _Placement, night: str
) -> pd.DataFrame:
    """Stage 5: tonight's catalog rows."""
    return pd.DataFrame(
        {
            "sha256": [o["sha256"] for o in pending],
            "orig_sha256": [o["orig_sha256"] or "" for o in pending],
            "label": [o["label"] for o in pending],
            "url": [o["url"] or "" for o in pending],
            "query": [o["query"] or "" for o in pending],
            "source": [o["source"] or "" for o in pending],
            "phash": dedupe.u64_to_hex(h.phash),
            "group": placed.group,
            "split": placed.split,
            "first_seen": [night] * len(pending),
            "status": placed.status,
            "note": placed.note,
            "dhash": [
                f"{int(d):016x}" if ok else "" for d, ok in zip(h.dhash, h.has_dhash, strict=True)
            ],
            "width": [int(o["width"] or 0) for o in pending],
            "height": [int(o["height"] or 0) for o in pending],
        }
    )


def _write_index_segment(
    store: Storage, state: CatalogState, pending: Sequence[dict[str, Any]], h: _Hashes
) -> list[str]:
    """Tonight's rows of the near-duplicate index as a new segment; returns the new segment list."""
    seg = f"index/segments/{state.version + 1:06d}-{secrets.token_hex(4)}.npz"
    tags = dedupe.tags_of([o["sha256"] for o in pending])
    if len(state.index.segments) >= MAX_SEGMENTS:
        # Compaction, once every MAX_SEGMENTS nights: one O(all) write keeps loads cheap.
        full = state.index.appended(h.phash, h.dhash, h.has_dhash, tags)
        dedupe.write_segment(store, seg, full.phash, full.dhash, full.has_dhash, full.tag)
        return [seg]
    dedupe.write_segment(store, seg, h.phash, h.dhash, h.has_dhash, tags)
    return [*state.index.segments, seg]


def _store_curation(
    store: Storage,
    state: CatalogState,
    df: pd.DataFrame,
    new_rows: pd.DataFrame,
    pending: Sequence[dict[str, Any]],
    h: _Hashes,
    night: str,
) -> pd.DataFrame:
    """Stage 6: write the index segment and the catalog, then compare-and-swap the pointer."""
    out = pd.concat([df, new_rows], ignore_index=True) if len(df) else new_rows
    segments = list(state.index.segments)
    if pending:
        segments = _write_index_segment(store, state, pending, h)
    _commit(
        store,
        state,
        out,
        segments,
        f"curate night {night}",
        new_segments=segments[-1:] if pending else (),
    )
    return out


def curate(store: Storage, outcomes: Sequence[Any], night: str, cfg: Config) -> CurationReport:
    """Dedupe tonight's accepted images against all history, group, split, and persist the catalog.

    ``outcomes`` are ingest Outcomes (objects or dicts); only status "accepted" ones are curated.
    Per class: new (a new group), near_duplicate (joined an existing or new group), duplicate
    (exact copy of an image already held), quarantined (label or split conflict).
    """
    night = str(night)
    state = load_state(store)
    df = state.df.copy()
    hist = _History.of(df, _decided(store))
    tally = _Tally()
    for c in cfg.classes:
        tally.ensure(c)

    batch = _take_outcomes(outcomes, hist, tally)
    hashes = _hash_signals(store, batch.pending)
    uf, touched = _near_links(state.index, hashes, hist.groups, cfg.dedupe)
    if cfg.dedupe.copies and batch.pending:
        _link_disguised_copies(store, hist, batch.pending, cfg.dedupe, uf, touched)
    placed = _place(batch, uf, touched, hist, tally, cfg.dataset)

    df["status"], df["note"], df["group"] = hist.status, hist.notes, hist.groups
    new_rows = _new_rows(batch.pending, hashes, placed, night)
    out = _store_curation(store, state, df, new_rows, batch.pending, hashes, night)
    return tally.report(night, len(out))


# ---------------------------------------------------------------------------------------------
# Snapshots


@dataclass
class Snapshot:
    id: str
    key: str
    counts: dict[str, dict[str, int]]  # label -> {"train": n, "holdout": n}
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _counts(manifest: pd.DataFrame, classes: Iterable[str] = ()) -> dict[str, dict[str, int]]:
    out = {c: {"train": 0, "holdout": 0} for c in classes}
    for key, n in manifest.groupby(["label", "split"]).size().items():
        label, split = cast(tuple[str, str], key)
        out.setdefault(label, {"train": 0, "holdout": 0})[split] = int(n)
    return dict(sorted(out.items()))


def snapshot_id(manifest: pd.DataFrame) -> str:
    """Content hash of the canonical rows (sorted by sha256, fixed columns): same rows, same id."""
    rows = manifest[SNAPSHOT_COLUMNS].sort_values("sha256").astype(str).values.tolist()
    canon = json.dumps([SNAPSHOT_COLUMNS, rows], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def make_snapshot(store: Storage, cfg: Config) -> Snapshot:
    """Immutable manifest of the status-ok images of cfg.classes, named by its content hash."""
    df = load_catalog(store)
    m = df[(df["status"] == "ok") & df["label"].isin(cfg.classes)][SNAPSHOT_COLUMNS]
    m, waiting = cap_feedback_share(m, cfg.feedback.max_share)
    if waiting:
        log.info(
            "snapshot: %d accepted feedback image(s) wait (feedback.max_share %g)",
            waiting,
            cfg.feedback.max_share,
        )
    m = m.sort_values("sha256").reset_index(drop=True).astype(str)
    sid = snapshot_id(m)
    key = f"snapshots/{sid}.parquet"
    if not store.exists(key):
        buf = io.BytesIO()
        m.to_parquet(buf, index=False)
        store.put_if_absent(key, buf.getvalue())
    return Snapshot(sid, key, _counts(m, cfg.classes), len(m))


def load_manifest(store: Storage, snapshot_id: str) -> pd.DataFrame:
    """The rows of a snapshot; raises CatalogError naming a missing or unreadable snapshot."""
    key = f"snapshots/{snapshot_id}.parquet"
    try:
        data = store.get(key)
    except NotFound:
        raise CatalogError(f"snapshot {snapshot_id!r} not found at {store.url(key)}") from None
    try:
        return pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001
        raise CatalogError(f"snapshot {store.url(key)} is not readable Parquet: {exc}") from None


def load_snapshot(store: Storage, snapshot_id: str) -> Snapshot:
    m = load_manifest(store, snapshot_id)
    return Snapshot(snapshot_id, f"snapshots/{snapshot_id}.parquet", _counts(m), len(m))


def diff_snapshots(store: Storage, a: str, b: str) -> pd.DataFrame:
    """Per label and split: rows in A, in B, added (in B only) and removed (in A only)."""
    ma, mb = load_manifest(store, a), load_manifest(store, b)
    ka = set(zip(ma["sha256"], ma["label"], ma["split"], strict=True))
    kb = set(zip(mb["sha256"], mb["label"], mb["split"], strict=True))
    stats: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for _s, lab, sp in ka:
        stats[(lab, sp)]["in_a"] += 1
    for _s, lab, sp in kb:
        stats[(lab, sp)]["in_b"] += 1
    for _s, lab, sp in kb - ka:
        stats[(lab, sp)]["added"] += 1
    for _s, lab, sp in ka - kb:
        stats[(lab, sp)]["removed"] += 1
    cols = ["label", "split", "in_a", "in_b", "added", "removed"]
    rows = [[lab, sp] + [stats[(lab, sp)][c] for c in cols[2:]] for lab, sp in sorted(stats)]
    return pd.DataFrame(rows, columns=cols)


def format_diff(diff: pd.DataFrame) -> str:
    """A readable table of ``diff_snapshots`` with a total line (for the CLI)."""
    if diff.empty:
        return "both snapshots are empty"
    total = pd.DataFrame(
        [["(total)", "", *diff[["in_a", "in_b", "added", "removed"]].sum().tolist()]],
        columns=diff.columns,
    )
    return pd.concat([diff, total], ignore_index=True).to_string(index=False)


# ---------------------------------------------------------------------------------------------
# Quality gate


def check_quality(snapshot: Snapshot, cfg: DatasetConfig, classes: Sequence[str]) -> list[str]:
    """Problems that should stop the cycle (each names its class); [] when the snapshot is fit."""
    problems = []
    train = {}
    for c in classes:
        n = snapshot.counts.get(c, {})
        tr, ho = int(n.get("train", 0)), int(n.get("holdout", 0))
        train[c] = tr
        if tr < cfg.min_train_per_class:
            problems.append(
                f"class {c!r}: {tr} train images, need at least {cfg.min_train_per_class}"
            )
        if ho < cfg.min_holdout_per_class:
            problems.append(
                f"class {c!r}: {ho} holdout images, need at least {cfg.min_holdout_per_class}"
            )
    if train:
        big = max(train, key=lambda c: train[c])
        small = min(train, key=lambda c: train[c])
        if train[small] > 0 and train[big] / train[small] > cfg.max_imbalance:
            problems.append(
                f"class {small!r}: {train[small]} train images vs {train[big]} for {big!r} — "
                f"imbalance {train[big] / train[small]:.1f}x exceeds {cfg.max_imbalance:g}x"
            )
    return problems


def require_quality(snapshot: Snapshot, cfg: DatasetConfig, classes: Sequence[str]) -> None:
    """Raise QualityGateFailed with every problem when the gate fails."""
    problems = check_quality(snapshot, cfg, classes)
    if problems:
        raise QualityGateFailed(problems)


# ---------------------------------------------------------------------------------------------
# Quarantine review


def load_decisions(store: Storage) -> list[dict[str, Any]]:
    try:
        raw = store.get(DECISIONS_KEY)
    except NotFound:
        return []
    try:
        data = json.loads(raw)
        return list(data["decisions"])
    except Exception as exc:  # noqa: BLE001
        raise CatalogError(
            f"{store.url(DECISIONS_KEY)} is not valid decisions JSON: {exc}"
        ) from None


def _record_decision(store: Storage, entry: dict[str, Any]) -> None:
    decisions = load_decisions(store)
    decisions.append(entry)
    store.put(DECISIONS_KEY, json.dumps({"decisions": decisions}, indent=1).encode())


def list_quarantine(store: Storage) -> pd.DataFrame:
    """Images held back for review (label/split conflicts, noisy labels), oldest first."""
    df = load_catalog(store)
    q = df[df["status"].isin(QUARANTINE_STATUSES)]
    return q[
        ["sha256", "label", "status", "note", "group", "split", "first_seen", "url"]
    ].reset_index(drop=True)


def format_quarantine(q: pd.DataFrame) -> str:
    """A readable table of ``list_quarantine`` (short shas; the prefix works in the commands)."""
    if q.empty:
        return "quarantine is empty"
    view = q.assign(sha256=q["sha256"].str[:12])[
        ["sha256", "label", "status", "first_seen", "note", "url"]
    ]
    return f"{len(q)} image(s) in quarantine\n" + view.to_string(index=False, max_colwidth=60)


def _resolve(df: pd.DataFrame, sha: str) -> int:
    sha = (sha or "").strip().lower()
    if len(sha) < 6:
        raise QuarantineError(
            f"image id {sha!r}: give the sha256 or a prefix of at least 6 characters"
        )
    hits = np.flatnonzero(df["sha256"].str.startswith(sha).to_numpy())
    if len(hits) == 0:
        raise QuarantineError(f"no image with sha256 starting {sha!r} in the catalog")
    if len(hits) > 1:
        raise QuarantineError(
            f"sha256 prefix {sha!r} is ambiguous ({len(hits)} images); give more characters"
        )
    return int(hits[0])


def _retry_on_conflict(attempt: Callable[[], T], give_up: str, retries: int = 5) -> T:
    """Run ``attempt`` (load, change, commit) until its compare-and-swap of the pointer lands.

    Each attempt reloads the catalog, so a lost race is redone on top of the other writer's
    version instead of overwriting it; after ``retries`` lost races the caller is told to rerun.
    """
    for _ in range(retries):
        try:
            return attempt()
        except CatalogConflict:
            continue
    raise CatalogConflict(give_up)


def _cell(df: pd.DataFrame, r: int, column: str) -> str:
    """One catalog cell as text (every catalog column the messages quote holds strings)."""
    return str(df.at[r, column])


def _update(
    store: Storage,
    sha: str,
    action: str,
    change: Callable[[pd.DataFrame, int], None],
    retries: int = 5,
) -> dict[str, Any]:
    def attempt() -> tuple[pd.DataFrame, int, dict[str, Any]]:
        state = load_state(store)
        df = state.df.copy()
        r = _resolve(df, sha)
        before = {"label": df.at[r, "label"], "status": df.at[r, "status"]}
        change(df, r)
        _commit(
            store, state, df, list(state.index.segments), f"{action} {_cell(df, r, 'sha256')[:12]}"
        )
        return df, r, before

    give_up = f"{action} {sha}: the catalog kept changing under it; rerun"
    df, r, before = _retry_on_conflict(attempt, give_up, retries)
    # Recorded once, after the commit that landed: the audit log never lists a lost attempt.
    entry = {
        "sha256": df.at[r, "sha256"],
        "action": action,
        "before": before,
        "after": {"label": df.at[r, "label"], "status": df.at[r, "status"]},
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _record_decision(store, entry)
    return entry


def release(store: Storage, sha: str) -> dict[str, Any]:
    """Return a quarantined image to the dataset (status ok, its group's split)."""

    def change(df: pd.DataFrame, r: int) -> None:
        if df.at[r, "status"] == "split_conflict":
            raise QuarantineError(
                f"{_cell(df, r, 'sha256')[:12]} is near images in both train and holdout; releasing it "
                "would leak between them. Drop it instead"
            )
        df.at[r, "status"], df.at[r, "note"] = "ok", f"released (was {_cell(df, r, 'status')})"

    return _update(store, sha, "release", change)


def relabel(store: Storage, sha: str, label: str) -> dict[str, Any]:
    """Give an image the right label and return it to the dataset."""
    label = (label or "").strip()
    if not label:
        raise QuarantineError("relabel: the new label must not be empty")

    def change(df: pd.DataFrame, r: int) -> None:
        if df.at[r, "status"] == "split_conflict":
            raise QuarantineError(
                f"{_cell(df, r, 'sha256')[:12]} is near images in both splits; drop it instead"
            )
        old = _cell(df, r, "label")
        df.at[r, "label"], df.at[r, "status"] = label, "ok"
        df.at[r, "note"] = f"relabelled from {old}"

    return _update(store, sha, "relabel", change)


def drop(store: Storage, sha: str) -> dict[str, Any]:
    """Remove an image from every later snapshot (kept in the catalog so its copies stay out too)."""

    def change(df: pd.DataFrame, r: int) -> None:
        df.at[r, "note"] = f"dropped (was {_cell(df, r, 'status')}, {_cell(df, r, 'label')})"
        df.at[r, "status"] = "dropped"

    return _update(store, sha, "drop", change)


def quarantine_images(
    store: Storage, shas: Sequence[str], reason: str, note: str | Mapping[str, str]
) -> int:
    """Hold status-ok images back for review (e.g. reason "noisy_label"); returns how many changed.

    ``note`` is one note for all, or one per sha256. Images a reviewer already decided on keep
    that decision.
    """
    if reason not in QUARANTINE_STATUSES:
        raise QuarantineError(f"quarantine reason {reason!r} is not one of {QUARANTINE_STATUSES}")
    wanted = set(shas)
    if not wanted:
        return 0

    def attempt() -> int:
        state = load_state(store)
        df = state.df.copy()
        decided = _decided(store)
        sel = df["sha256"].isin(wanted) & (df["status"] == "ok") & ~df["sha256"].isin(decided)
        n = int(sel.sum())
        if n == 0:
            return 0
        df.loc[sel, "status"] = reason
        if isinstance(note, Mapping):
            df.loc[sel, "note"] = [note.get(x, "") for x in df.loc[sel, "sha256"]]
        else:
            df.loc[sel, "note"] = note
        _commit(store, state, df, list(state.index.segments), f"quarantine {n} {reason}")
        return n

    give_up = "quarantine_images: the catalog kept changing under it; rerun"
    return _retry_on_conflict(attempt, give_up)


def cap_feedback_share(manifest: pd.DataFrame, share: float) -> tuple[pd.DataFrame, int]:
    """Keep feedback rows at most ``share`` of each (label, split); oldest kept first.

    Returns the rows kept and how many feedback rows wait (they join as the class grows).
    """
    is_fb = manifest["source"] == "feedback"
    if share >= 1 or not is_fb.any():
        return manifest, 0
    drop: list[Any] = []
    for (_label, _split), part in manifest.groupby(["label", "split"]):
        fb = part[part["source"] == "feedback"]
        if fb.empty:
            continue
        others = len(part) - len(fb)
        allowed = math.floor(share * others / (1 - share) + 1e-9)
        if len(fb) > allowed:
            fb = fb.sort_values(["first_seen", "sha256"], kind="stable")
            drop += list(fb.index[allowed:])
    return manifest.drop(index=drop), len(drop)
