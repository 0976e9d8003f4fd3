"""Curation stage 4: give each component of near images a group and a split, or quarantine it;
the split is a pure function of the group id, so an image never moves between train and holdout."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from freshnet.config_sections import DatasetConfig
from freshnet.data import dedupe
from freshnet.data.batch import Batch, History, Tally

NO_SPLIT = "none"  # split of a split_conflict image: it belongs to neither side


def split_for_group(group: str, salt: str, holdout_fraction: float) -> str:
    """Holdout membership as a pure function of the group id (salted sha256 vs the fraction)."""
    h = hashlib.sha256(f"{salt}\x00{group}".encode()).digest()
    return "holdout" if int.from_bytes(h[:8], "big") / 2.0**64 < holdout_fraction else "train"


@dataclass
class Placement:
    """Where each pending image lands, by pending index."""

    group: list[str]
    split: list[str]
    status: list[str]
    note: list[str]


def _quarantine_split_conflict(
    comp: Sequence[int],
    near: set[str],
    pending: Sequence[dict[str, Any]],
    hist: History,
    placed: Placement,
    tally: Tally,
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
    hist: History,
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
    comp: Sequence[int], existing: Sequence[int], batch: Batch, hist: History
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
    batch: Batch,
    hist: History,
    placed: Placement,
    tally: Tally,
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


def place(
    batch: Batch,
    uf: dedupe.UnionFind,
    touched: dict[int, set[str]],
    hist: History,
    tally: Tally,
    dcfg: DatasetConfig,
) -> Placement:
    """Stage 4: give each component of near images a group and a split (or quarantine it)."""
    n = len(batch.pending)
    # Corrections from the app wait for review instead of joining train/holdout at once.
    status = ["feedback" if o["source"] == "feedback" else "ok" for o in batch.pending]
    placed = Placement([""] * n, [""] * n, status, [""] * n)
    for comp in sorted(uf.groups().values(), key=min):
        near = {hist.canon(g) for i in comp for g in touched[i]}
        splits = {hist.group_split[g] for g in near}
        if ("train" in splits and "holdout" in splits) or NO_SPLIT in splits:
            _quarantine_split_conflict(comp, near, batch.pending, hist, placed, tally)
        else:
            _join_group(comp, near, batch, hist, placed, tally, dcfg)
    return placed
