"""Label issues: is each image's label right, judged only by models that never trained on it.

Web search mislabels images every night (other breeds under a breed's query, cartoons,
collages). A model asked about labels it was trained on has memorized them and agrees, so every
probability used here is out of sample:

- images seen on earlier nights: K-fold cross-validation of a logistic regression on the cached
  frozen-backbone features, folds split by near-duplicate group (a copy in another fold would
  vouch for its own label);
- tonight's new images: the same classifier fit on the earlier images only (tonight's noise
  cannot vouch for itself), averaged with the champion's probabilities when the caller has them
  (it never trained on tonight's images).

cleanlab's ``find_label_issues`` then applies per-class thresholds (a class the classifier finds
hard gets a lower bar than an easy one) instead of one global confidence.

A large catalog is not refit whole every night: past ``label_check.max_rows`` earlier images,
``sample_earlier`` draws that many (per class, near-duplicate groups whole) with a seed that
changes each night, so a night's work stays flat and every old image is re-judged over the nights.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REGULARIZATION_C = 2.0  # logistic regression on unit-length features; 0.5-8 measured, 2 best
CHAMPION_WEIGHT = 0.5  # champion share where it may judge; 0.75 measured: twice the false flags


@dataclass
class LabelCheck:
    """What one check found; ``issues`` are dicts ready for the summary and the quarantine note."""

    checked: int
    issues: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # fallbacks and skips, each with its reason
    sources: dict[str, int] = field(default_factory=dict)  # rows per probability source

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Earlier images a class keeps whole (when it has no more) before a sample shrinks the big
# classes: cleanlab's per-class threshold of a small class would drift on a handful of rows.
MIN_PER_CLASS = 200


def night_seed(seed: int, night: str) -> int:
    """A sampling seed that differs per night (and per ``seed``), the same on a rerun night."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{night}".encode()).digest()[:8], "big")


def sample_earlier(
    labels: Sequence[str],
    groups: Sequence[str],
    is_new: np.ndarray,
    max_rows: int,
    seed: int,
    min_per_class: int = MIN_PER_CLASS,
) -> tuple[np.ndarray, str | None]:
    """(rows to check tonight as a bool mask, a note or None when nothing was left out).

    Every new row is kept. When more than ``max_rows`` rows are earlier ones, at most
    ``max_rows`` of them are kept: whole near-duplicate groups (so folds still split by group),
    drawn per class in proportion to the class's size, a class with at most ``min_per_class``
    earlier rows kept whole (the others shrink to make room). A mixed-label group counts for
    the label of its first row.
    """
    import pandas as pd

    is_new = np.asarray(is_new, bool)
    keep = np.ones(len(is_new), bool)
    old = np.flatnonzero(~is_new)
    if len(old) <= max_rows:
        return keep, None
    rng = np.random.default_rng(seed)
    codes, _ = pd.factorize(pd.Series(np.asarray(groups, dtype=object)[old]))
    size = np.bincount(codes)
    first = np.unique(codes, return_index=True)[1]  # first row of each group
    cls, _ = pd.factorize(pd.Series(np.asarray(labels, dtype=object)[old[first]]))
    counts = np.bincount(cls, weights=size).astype(int)  # earlier rows per class
    floor = np.minimum(counts, min_per_class)
    if floor.sum() > max_rows:  # too many classes for the floor: an equal share each
        floor = np.minimum(counts, max_rows // len(counts))
    extra = counts - floor
    quota = floor + np.floor(extra * ((max_rows - floor.sum()) / max(extra.sum(), 1))).astype(int)
    taken_groups = np.zeros(len(size), bool)
    for c in range(len(counts)):
        members = rng.permutation(np.flatnonzero(cls == c))
        taken = 0
        for g in members:  # first fit: a group too big for what is left is skipped, not split
            if taken + size[g] <= quota[c]:
                taken_groups[g] = True
                taken += size[g]
                if taken == quota[c]:
                    break
    keep[old] = taken_groups[codes]
    sampled = int(keep[old].sum())
    return keep, (
        f"{sampled} of {len(old)} earlier images sampled (label_check.max_rows={max_rows}); "
        "the others are judged on later nights"
    )


def _logistic(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, k: int) -> np.ndarray:
    """Class probabilities (n, k) of a logistic regression; classes absent from y_train get 0."""
    from sklearn.linear_model import LogisticRegression

    present = np.unique(y_train)
    out = np.zeros((len(x_test), k))
    if len(present) == 1:
        out[:, present[0]] = 1.0
        return out
    m = LogisticRegression(C=REGULARIZATION_C, max_iter=2000)
    m.fit(x_train, y_train)
    out[:, m.classes_] = m.predict_proba(x_test)
    return out


def cross_validated_probs(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, k: int, folds: int, seed: int
) -> np.ndarray:
    """Out-of-fold probabilities; near-duplicate groups never straddle two folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    probs = np.zeros((len(y), k))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(x, y, groups):
        probs[test] = _logistic(x[train], y[train], x[test], k)
    return probs


def out_of_sample_probs(
    features: np.ndarray,
    labels: Sequence[str],
    groups: Sequence[str],
    is_new: np.ndarray,
    classes: Sequence[str],
    folds: int,
    seed: int = 0,
    champion: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, int], list[str]]:
    """(probabilities (n, k), rows that could be judged, rows per source, notes).

    ``champion`` holds the champion's probabilities over ``classes`` for rows it never trained
    on, NaN elsewhere. A class with fewer images than ``folds`` (or than 2 earlier images for the
    new-image classifier) is not judged; a note says why.
    """
    classes = list(classes)
    k = len(classes)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index.get(lab, -1) for lab in labels])
    counts = np.bincount(y[y >= 0], minlength=k)
    notes: list[str] = []
    small = [classes[c] for c in range(k) if 0 < counts[c] < max(2, folds)]
    for c in small:
        notes.append(
            f"class {c!r}: {counts[index[c]]} image(s), fewer than the {folds} folds of the "
            "label check; its labels are not judged tonight"
        )
    judged = (y >= 0) & ~np.isin(y, [index[c] for c in small])
    probs = np.full((len(y), k), np.nan)
    sources: dict[str, int] = {}
    if len(np.unique(y[judged])) < 2:
        notes.append("fewer than 2 classes with enough images: label check skipped")
        return probs, np.zeros(len(y), bool), sources, notes
    rows = np.flatnonzero(judged)
    group_of = np.asarray(groups)
    cv = cross_validated_probs(features[rows], y[rows], group_of[rows], k, folds, seed)
    probs[rows] = cv
    sources["cross-validation"] = len(rows)
    old, new = rows[~is_new[rows]], rows[is_new[rows]]
    old_counts = np.bincount(y[old], minlength=k)
    if len(new) and (old_counts[np.unique(y[rows])] >= 2).all():
        # Tonight's images judged by what came before them: their own noise cannot vouch for them.
        probs[new] = _logistic(features[old], y[old], features[new], k)
        sources["cross-validation"] -= len(new)
        sources["earlier images"] = len(new)
    if champion is not None:
        have = rows[~np.isnan(champion[rows]).any(axis=1)]
        if len(have):
            w = CHAMPION_WEIGHT
            probs[have] = (1 - w) * probs[have] + w * champion[have]
            sources["champion (averaged)"] = len(have)
    return probs, judged, sources, notes


def find_issues(
    shas: Sequence[str],
    labels: Sequence[str],
    probs: np.ndarray,
    judged: np.ndarray,
    classes: Sequence[str],
    filter_by: str,
    max_fraction: float,
    chance_fraction: float = 1.0,
) -> tuple[list[dict[str, Any]], list[str]]:
    """cleanlab's label issues among the judged rows, at most ``max_fraction`` of any class.

    A flagged label must also have an out-of-sample probability below ``chance_fraction`` / k
    (k classes): cleanlab estimates how many labels of a class are wrong and removes that many,
    and when tonight's noise raises the estimate it takes borderline images too, whose labels
    the models still find plausible.

    Returns (issues sorted worst first, notes). An issue names the suggested class and the
    label's out-of-sample probability (its "label quality").
    """
    from cleanlab.filter import find_label_issues

    classes = list(classes)
    rows = np.flatnonzero(judged)
    notes: list[str] = []
    if len(rows) == 0:
        return [], notes
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[labels[int(r)]] for r in rows])
    p = probs[rows]
    p = p / p.sum(axis=1, keepdims=True)
    # cleanlab needs every class present among the given labels: keep the columns that are.
    present = np.unique(y)
    remap = {c: i for i, c in enumerate(present)}
    p_sub = p[:, present]
    p_sub = p_sub / np.maximum(p_sub.sum(axis=1, keepdims=True), 1e-12)
    y_sub = np.array([remap[c] for c in y])
    # n_jobs=1: cleanlab otherwise forks a multiprocessing pool, and a fork of this
    # multi-threaded process (torch, Prefect) deadlocked in the flowers end-to-end test.
    flagged = find_label_issues(y_sub, p_sub, filter_by=filter_by, n_jobs=1)
    quality = p[np.arange(len(y)), y]
    flagged &= quality < chance_fraction / len(classes)
    issues = []
    for c in present:
        members = np.flatnonzero((y == c) & flagged)
        cap = int(np.floor(max_fraction * int((y == c).sum())))
        if len(members) > cap:
            notes.append(
                f"class {classes[c]!r}: {len(members)} of {int((y == c).sum())} labels look wrong, "
                f"more than label_check.max_flag_fraction={max_fraction:g}; only the {cap} least "
                "likely are held back (check the queries of this class)"
            )
            members = members[np.argsort(quality[members])[:cap]]
        for i in members:
            suggested = int(np.argmax(p[i]))
            issues.append(
                {
                    "sha256": shas[rows[i]],
                    "label": classes[c],
                    "suggested": classes[suggested],
                    "label_p": round(float(quality[i]), 4),
                    "suggested_p": round(float(p[i, suggested]), 4),
                }
            )
    issues.sort(key=lambda d: d["label_p"])
    return issues, notes
