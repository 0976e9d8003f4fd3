"""The promotion policy, table-tested on hand-built evaluations (no models needed)."""

from __future__ import annotations

import pytest

from freshnet.config_sections import PolicyConfig
from freshnet.model.evaluate import Evaluation, compare, metrics_from
from freshnet.model.policy import Decision, Rule, decide, decision_report, rule_status

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
    assert d.promote is promote, d.rules_markdown()
    assert sorted(r.name for r in d.rules if r.status == "fail") == sorted(failing)
    # Every rule carries a value, a threshold field and a verdict; the markdown lists them all.
    md = d.rules_markdown()
    for r in d.rules:
        assert f"| {r.name} |" in md
    # The bundle is checked after the decision: until then its rule did not run, never "pass".
    bundle = rule(d, "bundle")
    assert bundle.status == "not run" and not bundle.passed
    assert "| bundle | — | loads and predicts canaries | not run |" in md


def test_first_run_lists_floor_and_bootstrap():
    d = decide(make_eval("v1", BASE), None, None, PolicyConfig())
    assert d.first_run and d.promote
    status = {r.name: r.status for r in d.rules}
    assert status == {
        "bundle": "not run",
        "accuracy_floor": "pass",
        "first_run": "pass",
        # Nothing to compare with: the comparison rules are listed as not run, not as passed.
        "paired_rows": "not run",
        "improvement": "not run",
        "significance": "not run",
        "class_recall_drop": "not run",
    }
    assert rule(d, "improvement").detail == "no champion to compare with"
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
    assert off.status == "not run" and off.threshold is None and "not required" in off.detail


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
    md = decision_report(
        d, chall, champ, cmp, "https://s3.example/decisions/v2.png?X-Amz-Signature=1"
    )
    assert "# Decision for v2: PROMOTE" in md
    assert f"{cmp.delta:+.4f}" in md and f"[{cmp.ci_low:+.4f}, {cmp.ci_high:+.4f}]" in md
    assert f"p = **{cmp.mcnemar_p:.4g}**" in md
    assert "![confusion matrix of v2](https://s3.example/decisions/v2.png?X-Amz-Signature=1)" in md
    for lab in CLASSES:
        assert f"| {lab} |" in md
    for r in d.rules:
        assert f"| {r.name} |" in md
    first = decision_report(decide(chall, None, None, PolicyConfig()), chall, None, None, None)
    # Without a URL a browser can load, the matrix is still there as a table, with no broken image.
    assert "first run" in first and "## Confusion matrix" in first and "![" not in first


def test_report_has_confusion_table_and_paired_counts():
    champ_ok = flip(BASE, [1, 2], False)  # champion: 9 + 2 more wrong
    chall_ok = flip([True] * N, [4, 5, 7], False)  # challenger: 3 wrong, on other rows
    champ, chall = make_eval("v1", champ_ok), make_eval("v2", chall_ok)
    cmp = compare(champ, chall, resamples=200)
    md = decision_report(decide(chall, champ, cmp, PolicyConfig()), chall, champ, cmp, None)
    # Row by row: actual class, then the counts per predicted class, diagonal in bold.
    for i, lab in enumerate(chall.labels):
        cells = [f"**{n}**" if i == j else str(n) for j, n in enumerate(chall.confusion[i])]
        assert f"| {lab} | " + " | ".join(cells) + " |" in md
    both_right = sum(a and b for a, b in zip(champ_ok, chall_ok, strict=True))
    both_wrong = sum(not a and not b for a, b in zip(champ_ok, chall_ok, strict=True))
    assert f"| both right | {both_right} |" in md and f"| both wrong | {both_wrong} |" in md
    assert f"| champion only | {cmp.b} |" in md and f"| challenger only | {cmp.c} |" in md
    assert (cmp.b, cmp.c) == (3, 11)


def test_bundle_rule_is_not_run_until_checked():
    champ, better, worse = (
        make_eval("v1", BASE),
        make_eval("v2", [True] * N),
        make_eval("v3", [False] * N),
    )
    keep = decide(worse, champ, None, PolicyConfig())
    b = rule(keep, "bundle")
    # A KEEP night builds no bundle: the report must not claim one was validated.
    assert not keep.promote and b.status == "not run" and "no bundle built" in b.detail
    assert "bundle validated" not in keep.rules_markdown()
    assert "bundle" not in keep.summary  # it did not fail either
    pending = decide(better, champ, None, PolicyConfig())
    assert pending.promote and rule(pending, "bundle").status == "not run"
    assert "bundle check comes next" in pending.summary
    checked = decide(better, champ, None, PolicyConfig(), bundle_checked=True)
    assert checked.promote and rule(checked, "bundle").status == "pass"
    assert "bundle validated in a clean process" in rule(checked, "bundle").detail
    broken = decide(better, champ, None, PolicyConfig(), bundle_error="canary mismatch")
    assert not broken.promote and rule(broken, "bundle").status == "fail"


def test_rules_stored_before_the_tri_state_still_read():
    old = {"promote": True, "summary": "ok", "rules": [
        {"name": "bundle", "value": "ok", "threshold": None, "passed": True, "detail": "x"},
        {"name": "improvement", "value": -0.1, "threshold": 0.0, "passed": False, "detail": "y"},
    ]}  # fmt: skip
    d = Decision.from_dict(old)
    assert [r.status for r in d.rules] == ["pass", "fail"]
    assert [rule_status(r) for r in old["rules"]] == ["pass", "fail"]
    assert rule_status({"name": "bundle", "passed": False, "status": "not run"}) == "not run"
    with pytest.raises(ValueError, match="status must be one of"):
        Rule("x", 1, 1, True, "", "maybe")
