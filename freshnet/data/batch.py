"""What one curation works on: the catalog's rows (History), tonight's new images (Batch) and the
per-class tally that becomes its CurationReport."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd


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


_COUNT_KINDS = ("new", "duplicate", "near_duplicate", "quarantined")


@dataclass
class Tally:
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
class History:
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
    def of(cls, df: pd.DataFrame, decided: set[str]) -> History:
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
class Batch:
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
