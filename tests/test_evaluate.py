"""Evaluation statistics: McNemar, paired bootstrap, metrics, alignment by sha256, confusion PNG."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from freshnet.model.evaluate import (
    Comparison,
    Evaluation,
    bootstrap_delta_ci,
    compare,
    confusion_png,
    mcnemar_exact,
    metrics_from,
)


@pytest.mark.parametrize(
    ("b", "c"),
    [(0, 0), (1, 0), (0, 5), (3, 3), (10, 2), (2, 10), (25, 40), (7, 1), (60, 90), (400, 455)],
)
def test_mcnemar_matches_scipy_binomtest(b, c):
    expected = (
        1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue
    )
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_mcnemar_known_values_and_bad_input():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    with pytest.raises(ValueError, match="discordant"):
        mcnemar_exact(-1, 2)


def test_metrics_per_class_and_confusion():
    truth = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "a", "c"]
    acc, per, conf = metrics_from(truth, pred, ["a", "b", "c"])
    assert acc == pytest.approx(4 / 6)
    assert conf == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert per["a"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    assert per["b"]["precision"] == pytest.approx(0.5) and per["b"]["recall"] == pytest.approx(0.5)
    assert per["c"]["f1"] == pytest.approx(1.0)


def _ev(version, shas, truth, pred, vocab=("a", "b")):
    labels = list(vocab) + sorted(set(truth) - set(vocab))
    acc, per, conf = metrics_from(truth, pred, labels)
    return Evaluation(version, labels, shas, truth, pred, acc, per, conf, list(vocab))


def test_compare_pairs_rows_by_sha_not_by_position():
    shas = ["s1", "s2", "s3", "s4"]
    truth = ["a", "b", "a", "b"]
    champ = _ev("v1", shas, truth, ["a", "b", "b", "a"])  # right on s1, s2
    # The challenger lists its rows in another order and has an extra one the champion never saw.
    chall = _ev(
        "v2", ["s4", "s3", "s2", "s1", "s5"], ["b", "a", "b", "a", "a"], ["b", "a", "a", "a", "b"]
    )
    cmp = compare(champ, chall, resamples=1000, seed=1)
    # Paired rows s1..s4: champion right {s1,s2}, challenger right {s4,s3,s1}.
    assert cmp.n == 4
    assert (cmp.b, cmp.c) == (1, 2)
    assert cmp.champion_accuracy == pytest.approx(0.5) and cmp.challenger_accuracy == pytest.approx(
        0.75
    )
    assert cmp.delta == pytest.approx(0.25)
    assert "only one model" in cmp.note
    assert not cmp.classes_changed


def test_compare_rejects_conflicting_labels():
    champ = _ev("v1", ["s1"], ["a"], ["a"])
    chall = _ev("v2", ["s1"], ["b"], ["b"])
    with pytest.raises(ValueError, match="s1"):
        compare(champ, chall)


def test_bootstrap_is_seeded_and_covers_the_delta():
    rng = np.random.default_rng(0)
    champ = rng.random(400) < 0.80
    chall = rng.random(400) < 0.90
    lo, hi = bootstrap_delta_ci(champ, chall, 2000, seed=7)
    assert (lo, hi) == bootstrap_delta_ci(champ, chall, 2000, seed=7)
    delta = chall.mean() - champ.mean()
    assert lo < delta < hi
    assert 0.02 < hi - lo < 0.2
    # Identical predictions: the paired CI collapses to zero.
    assert bootstrap_delta_ci(champ, champ, 1000, seed=0) == (0.0, 0.0)


def test_comparison_and_evaluation_roundtrip():
    ev = _ev("v1", ["s1", "s2"], ["a", "b"], ["a", "a"])
    assert Evaluation.from_dict(ev.to_dict()) == ev
    cmp = compare(ev, ev, resamples=200)
    assert Comparison.from_dict(cmp.to_dict()) == cmp
    assert cmp.mcnemar_p == 1.0 and cmp.delta == 0.0


def test_confusion_png_is_a_png():
    ev = _ev("v1", ["s1", "s2", "s3"], ["a", "b", "c"], ["a", "a", "c"])
    data = confusion_png(ev)
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
