"""The promotion policy, table-tested on hand-built evaluations (no models needed)."""

from __future__ import annotations

import pytest

from freshnet.config import PolicyConfig
from freshnet.evaluate import Evaluation, compare, metrics_from
from freshnet.policy import Decision, decide, decision_report

CLASSES = ["a", "b", "c"]


def make_eval(
    version: str, correct: list[bool], truth: list[str] | None = None, vocab=None, wrong_as=None
):
    """An Evaluation whose row i is right when correct[i]; wrong rows predict the next class."""
    n = len(correct)
    vocab = list(vocab or CLASSES)
    truth = truth or [CLASSES[i % 3] for i in range(n)]
    predicted = []
    for t, ok in zip(truth, correct, strict=True):
        if ok:
            predicted.append(t)
        else:
            predicted.append(wrong_as or next(v for v in vocab if v != t))
    labels = vocab + sorted(set(truth) - set(vocab))
    acc, per_class, conf = metrics_from(truth, predicted, labels)
    shas = [f"{i:064x}" for i in range(n)]
    return Evaluation(
        version, labels, shas, truth, predicted, acc, per_class, conf, vocab, [0.9] * n
    )


def rule(d: Decision, name: str):
    return next(r for r in d.rules if r.name == name)


N = 90
BASE = [i % 10 != 0 for i in range(N)]  # 0.90


def flip(correct: list[bool], idx: list[int], value: bool) -> list[bool]:
    out = list(correct)
    for i in idx:
        out[i] = value
    return out


CASES = [
    # name, champion correct (None = first run), challenger correct, policy overrides, promote, failing rules
    ("first_run_above_floor", None, BASE, {}, True, []),
    ("first_run_below_floor", None, [i % 2 == 0 for i in range(N)], {}, False, ["accuracy_floor"]),
    ("first_run_bootstrap_off", None, BASE, {"bootstrap_first": False}, False, ["first_run"]),
    ("tie", BASE, BASE, {}, True, []),
    ("tie_needs_improvement", BASE, BASE, {"min_improvement": 0.01}, False, ["improvement"]),
    ("improvement", BASE, [True] * N, {}, True, []),
    ("regression", [True] * N, BASE, {}, False, ["improvement"]),
    (
        "below_floor_even_if_better",
        [False] * N,
        [i % 3 == 0 for i in range(N)],
        {},
        False,
        ["accuracy_floor"],
    ),
    # Class "a" rows are 0,3,6,...: lose 4 of 30 (recall drop 0.133) but win 5 elsewhere.
    (
        "class_recall_drop",
        flip([True] * N, [1, 2, 4, 5, 7], False),
        flip([True] * N, [0, 3, 6, 9], False),
        {},
        False,
        ["class_recall_drop"],
    ),
    (
        "significance_on_small_gain",
        BASE,
        flip(BASE, [0], True),
        {"significance": 0.05},
        False,
        ["significance"],
    ),
    (
        "significance_on_big_gain",
        [i % 3 != 0 for i in range(N)],
        [True] * N,
        {"significance": 0.05, "max_recall_drop": 1.0},
        True,
        [],
    ),
    ("significance_off_small_gain", BASE, flip(BASE, [0], True), {}, True, []),
]


@pytest.mark.parametrize(
    ("name", "champ", "chall", "over", "promote", "failing"), CASES, ids=[c[0] for c in CASES]
)
def test_policy_table(name, champ, chall, over, promote, failing):
    policy = PolicyConfig(**over)
    challenger = make_eval("v2", chall)
    champion = make_eval("v1", champ) if champ is not None else None
    cmp = compare(champion, challenger, resamples=500) if champion is not None else None
    d = decide(challenger, champion, cmp, policy)
    assert d.promote is promote, d.to_markdown()
    assert sorted(r.name for r in d.rules if not r.passed) == sorted(failing)
    # Every rule carries a value, a threshold field and a verdict; the markdown lists them all.
    md = d.to_markdown()
    for r in d.rules:
        assert f"| {r.name} |" in md
    assert ("PROMOTE" in md) is promote


def test_first_run_lists_floor_and_bootstrap():
    d = decide(make_eval("v1", BASE), None, None, PolicyConfig())
    assert d.first_run and d.promote
    assert [r.name for r in d.rules] == ["bundle", "accuracy_floor", "first_run"]
    floor = rule(d, "accuracy_floor")
    assert floor.value == pytest.approx(0.9) and floor.threshold == 0.8


def test_bundle_error_blocks_promotion_with_reason():
    ch = make_eval("v2", [True] * N)
    d = decide(
        ch,
        make_eval("v1", BASE),
        None,
        PolicyConfig(),
        bundle_error="ModuleNotFoundError: No module named 'freshnet'",
    )
    assert not d.promote
    r = rule(d, "bundle")
    assert not r.passed and "No module named 'freshnet'" in r.detail
    assert "bundle" in d.summary
    # First run too: a model that cannot be served is never promoted.
    assert not decide(ch, None, None, PolicyConfig(), bundle_error="boom").promote


def test_significance_rule_reports_p_value_and_is_listed_when_off():
    champ, chall = make_eval("v1", BASE), make_eval("v2", [True] * N)
    cmp = compare(champ, chall, resamples=500)
    on = rule(decide(chall, champ, cmp, PolicyConfig(significance=0.05)), "significance")
    off = rule(decide(chall, champ, cmp, PolicyConfig()), "significance")
    assert on.value == pytest.approx(cmp.mcnemar_p) and on.threshold == 0.05 and on.passed
    assert off.passed and off.threshold is None and "not required" in off.detail


def test_changed_class_set_compares_on_shared_classes():
    # The challenger learned a new class "d"; holdout rows of "d" are left out of the paired comparison.
    truth = [CLASSES[i % 3] for i in range(N)] + ["d"] * 10
    champ = make_eval("v1", BASE + [False] * 10, truth=truth, vocab=CLASSES)
    chall = make_eval("v2", BASE + [True] * 10, truth=truth, vocab=CLASSES + ["d"])
    cmp = compare(champ, chall, resamples=500)
    assert cmp.classes_changed and cmp.shared_classes == CLASSES and cmp.n == N
    assert cmp.delta == pytest.approx(0.0)
    assert "shared classes" in cmp.note and "'d'" in cmp.note
    d = decide(chall, champ, cmp, PolicyConfig())
    assert d.promote
    cs = rule(d, "class_set")
    assert cs.value == "changed" and "added ['d']" in cs.detail
    assert any("shared classes" in n for n in d.notes)


def test_decide_computes_comparison_when_missing():
    d = decide(make_eval("v2", BASE), make_eval("v1", [True] * N), None, PolicyConfig())
    assert not d.promote and rule(d, "improvement").value == pytest.approx(-0.1)


def test_no_paired_rows_blocks():
    champ = make_eval("v1", BASE)
    chall = make_eval("v2", BASE)
    chall.shas = [f"{i + 1000:064x}" for i in range(N)]
    d = decide(chall, champ, None, PolicyConfig())
    assert not d.promote and not rule(d, "paired_rows").passed


def test_decision_roundtrip_and_report():
    champ, chall = make_eval("v1", BASE), make_eval("v2", [True] * N)
    cmp = compare(champ, chall, resamples=500)
    d = decide(chall, champ, cmp, PolicyConfig())
    again = Decision.from_dict(d.to_dict())
    assert again == d
    md = decision_report(d, chall, champ, cmp, "v2.png")
    assert "# Decision for v2: PROMOTE" in md
    assert f"{cmp.delta:+.4f}" in md and f"[{cmp.ci_low:+.4f}, {cmp.ci_high:+.4f}]" in md
    assert f"p = **{cmp.mcnemar_p:.4g}**" in md
    assert "![confusion matrix](v2.png)" in md
    for lab in CLASSES:
        assert f"| {lab} |" in md
    for r in d.rules:
        assert f"| {r.name} |" in md
    first = decision_report(decide(chall, None, None, PolicyConfig()), chall, None, None, None)
    assert "first run" in first and "confusion" not in first
