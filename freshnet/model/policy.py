"""The promotion decision: a pure function of two evaluations, their comparison and the policy."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from freshnet.model.evaluate import Comparison, Evaluation, compare

if TYPE_CHECKING:
    from freshnet.config_sections import PolicyConfig

# Float noise must not turn an exact tie into a regression.
EPS = 1e-9

PASS, FAIL, NOT_RUN = "pass", "fail", "not run"
STATUSES = (PASS, FAIL, NOT_RUN)


@dataclass
class Rule:
    """One rule of the decision. ``status`` is pass, fail or "not run" (never evaluated tonight).

    ``passed`` is True only for pass, so a rule that did not run can never read as passed.
    """

    name: str
    value: Any
    threshold: Any
    passed: bool
    detail: str
    status: str = ""

    def __post_init__(self) -> None:
        if not self.status:  # entries written before the tri-state had only ``passed``
            self.status = PASS if self.passed else FAIL
        if self.status not in STATUSES:
            raise ValueError(
                f"rule {self.name}: status must be one of {STATUSES}, got {self.status!r}"
            )
        self.passed = self.status == PASS


def not_run(name: str, threshold: Any, detail: str) -> Rule:
    return Rule(name, None, threshold, False, detail, NOT_RUN)


def rule_status(rule: dict[str, Any]) -> str:
    """pass / fail / not run of a rule stored as a dict (older dicts carry only ``passed``)."""
    status: str | None = rule.get("status")
    if status in STATUSES:
        return status
    return PASS if rule.get("passed") else FAIL


@dataclass
class Decision:
    promote: bool
    rules: list[Rule]
    summary: str
    first_run: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        rules = [Rule(**r) for r in d.get("rules", [])]
        return cls(
            d["promote"], rules, d["summary"], d.get("first_run", False), list(d.get("notes", []))
        )

    def failed(self) -> list[Rule]:
        return [r for r in self.rules if r.status == FAIL]

    def rules_markdown(self) -> str:
        """The rules as a markdown table (value, threshold, verdict, detail), then the notes."""
        lines = ["| rule | value | threshold | verdict | detail |", "|---|---|---|---|---|"]
        for r in self.rules:
            mark = {PASS: "pass", FAIL: "**FAIL**", NOT_RUN: "not run"}[r.status]
            lines.append(
                f"| {r.name} | {_fmt(r.value)} | {_fmt(r.threshold)} | {mark} | {_cell(r.detail)} |"
            )
        for n in self.notes:
            lines += ["", f"Note: {n}"]
        return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}"
    return _cell(str(v))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def decide(
    challenger: Evaluation,
    champion: Evaluation | None,
    comparison: Comparison | None,
    policy: PolicyConfig,
    bundle_error: str | None = None,
    bundle_checked: bool = False,
) -> Decision:
    """Promote only when no rule fails; every rule is listed with its value and verdict.

    The bundle is built and checked only for a challenger that passed the other rules, so before
    that (``bundle_checked`` False and no ``bundle_error``) its rule is "not run", never "pass".
    Without a champion the comparison rules are listed as "not run" too.
    """
    rules: list[Rule] = [
        Rule(
            "accuracy_floor",
            challenger.accuracy,
            policy.accuracy_floor,
            challenger.accuracy + EPS >= policy.accuracy_floor,
            f"challenger holdout accuracy on {challenger.n} images",
        )
    ]
    notes: list[str] = []
    first_run = champion is None
    if champion is None:  # first run (tested directly so the type checker narrows champion)
        rules.append(
            Rule(
                "first_run",
                True,
                policy.bootstrap_first,
                policy.bootstrap_first,
                "no champion yet: the first model is promoted when above the floor"
                if policy.bootstrap_first
                else "no champion yet and bootstrap_first is off: promote manually",
            )
        )
        for name, threshold in (
            ("paired_rows", "> 0"),
            ("improvement", policy.min_improvement),
            ("significance", policy.significance),
            ("class_recall_drop", policy.max_recall_drop),
        ):
            rules.append(not_run(name, threshold, "no champion to compare with"))
    else:
        if comparison is None:
            comparison = compare(champion, challenger, resamples=policy.bootstrap_resamples)
        rules += _comparison_rules(challenger, champion, comparison, policy)
        if comparison.note:
            notes.append(comparison.note)
    others_fail = any(r.status == FAIL for r in rules)
    if bundle_error is not None:
        bundle = Rule("bundle", "broken", "loads and predicts canaries", False, bundle_error)
    elif bundle_checked:
        bundle = Rule(
            "bundle",
            "ok",
            "loads and predicts canaries",
            True,
            "bundle validated in a clean process",
        )
    else:
        bundle = not_run(
            "bundle",
            "loads and predicts canaries",
            "no bundle built: the challenger failed another rule"
            if others_fail
            else "not built yet: the bundle is built and checked in a clean process next, "
            "before anything is published",
        )
    rules.insert(0, bundle)
    failed = [r.name for r in rules if r.status == FAIL]
    promote = not failed
    if promote:
        summary = (
            "first model above the floor"
            if first_run
            else "challenger is at least as good on every rule"
        )
        if bundle.status == NOT_RUN:
            summary += " (the bundle check comes next)"
    else:
        summary = "failed: " + ", ".join(failed)
    return Decision(promote, rules, summary, first_run, notes)


def _comparison_rules(
    challenger: Evaluation, champion: Evaluation, cmp: Comparison, policy: PolicyConfig
) -> list[Rule]:
    rules = [
        Rule(
            "paired_rows",
            cmp.n,
            "> 0",
            cmp.n > 0,
            f"{cmp.n} holdout images scored by both models"
            if cmp.n
            else "no holdout rows in common",
        )
    ]
    ci = f"95% CI [{cmp.ci_low:+.4f}, {cmp.ci_high:+.4f}]"
    rules.append(
        Rule(
            "improvement",
            cmp.delta,
            policy.min_improvement,
            cmp.n > 0 and cmp.delta + EPS >= policy.min_improvement,
            f"challenger {cmp.challenger_accuracy:.4f} vs champion {cmp.champion_accuracy:.4f}; {ci}",
        )
    )
    if policy.significance is None:
        rules.append(
            Rule(
                "significance",
                cmp.mcnemar_p,
                None,
                False,
                f"not required (policy.significance unset); McNemar b={cmp.b}, c={cmp.c}",
                NOT_RUN,
            )
        )
    else:
        ok = cmp.c > cmp.b and cmp.mcnemar_p <= policy.significance
        why = (
            ""
            if ok
            else ("; challenger does not win more discordant pairs" if cmp.c <= cmp.b else "")
        )
        rules.append(
            Rule(
                "significance",
                cmp.mcnemar_p,
                policy.significance,
                ok,
                f"exact McNemar on discordant pairs b={cmp.b}, c={cmp.c}{why}",
            )
        )
    worst, worst_class = 0.0, None
    for label in cmp.shared_classes:
        before = champion.per_class.get(label, {}).get("recall")
        after = challenger.per_class.get(label, {}).get("recall")
        support = challenger.per_class.get(label, {}).get("support", 0)
        if before is None or after is None or not support:
            continue
        drop = before - after
        if worst_class is None or drop > worst:
            worst, worst_class = drop, label
    rules.append(
        Rule(
            "class_recall_drop",
            worst,
            policy.max_recall_drop,
            worst <= policy.max_recall_drop + EPS,
            f"largest drop: {worst_class} ({worst:+.4f})"
            if worst_class
            else "no shared class with holdout rows",
        )
    )
    champ_vocab = set(champion.vocab or champion.labels)
    chall_vocab = set(challenger.vocab or challenger.labels)
    added, removed = sorted(chall_vocab - champ_vocab), sorted(champ_vocab - chall_vocab)
    rules.append(
        Rule(
            "class_set",
            "changed" if cmp.classes_changed else "same",
            None,
            True,
            f"compared on shared classes {cmp.shared_classes}; added {added or 'none'}, removed {removed or 'none'}"
            if cmp.classes_changed
            else f"{len(cmp.shared_classes)} classes on both sides",
        )
    )
    return rules


def paired_counts(cmp: Comparison) -> dict[str, int]:
    """The 2×2 table of the paired rows: who was right on each holdout image."""
    champ_right = round(cmp.champion_accuracy * cmp.n)
    both = champ_right - cmp.b
    return {
        "both right": both,
        "champion only": cmp.b,
        "challenger only": cmp.c,
        "both wrong": cmp.n - both - cmp.b - cmp.c,
    }


def confusion_markdown(ev: Evaluation) -> str:
    """The confusion matrix as a markdown table: one row per actual class, one column per prediction."""
    head = "| actual ↓ / predicted → | " + " | ".join(_cell(lab) for lab in ev.labels) + " |"
    lines = [head, "|---" * (len(ev.labels) + 1) + "|"]
    for i, (lab, row) in enumerate(zip(ev.labels, ev.confusion, strict=True)):
        # The diagonal (right answers) in bold, so the errors stand out around it.
        cells = [f"**{n}**" if i == j else str(n) for j, n in enumerate(row)]
        lines.append(f"| {_cell(lab)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decision_report(
    decision: Decision,
    challenger: Evaluation,
    champion: Evaluation | None,
    comparison: Comparison | None,
    confusion_url: str | None = None,
) -> str:
    """Markdown: verdict, rules, champion vs challenger with the paired numbers, per-class table,
    and the confusion matrix as a table (and as an image when ``confusion_url`` is one a browser
    can load: the report is read in the Prefect UI, where a relative path shows nothing)."""
    verdict = "PROMOTE" if decision.promote else "KEEP CHAMPION"
    out = [f"# Decision for {challenger.version}: {verdict}", "", decision.summary, ""]
    out += ["## Rules", "", decision.rules_markdown()]
    out += ["## Champion vs challenger", ""]
    if champion is None:
        out += [f"No champion yet (first run). Challenger `{challenger.version}`: "
                f"accuracy {challenger.accuracy:.4f} on {challenger.n} holdout images.", ""]  # fmt: skip
    else:
        out += ["| | champion | challenger |", "|---|---|---|"]
        out.append(f"| version | `{champion.version}` | `{challenger.version}` |")
        out.append(
            f"| holdout accuracy (all rows) | {champion.accuracy:.4f} | {challenger.accuracy:.4f} |"
        )
        out.append(f"| holdout images | {champion.n} | {challenger.n} |")
        if comparison is not None and comparison.n:
            out.append(
                f"| accuracy on the {comparison.n} paired images | "
                f"{comparison.champion_accuracy:.4f} | {comparison.challenger_accuracy:.4f} |"
            )
        out.append("")
        if comparison is not None:
            out.append(
                f"On {comparison.n} paired images: Δ accuracy = **{comparison.delta:+.4f}** "
                f"(95% bootstrap CI [{comparison.ci_low:+.4f}, {comparison.ci_high:+.4f}], "
                f"{comparison.resamples} resamples, seed {comparison.seed}); "
                f"exact McNemar p = **{comparison.mcnemar_p:.4g}** "
                f"(champion-only correct b = {comparison.b}, challenger-only correct c = {comparison.c})."
            )
            out += ["", "| paired images | count |", "|---|---|"]
            out += [f"| {k} | {v} |" for k, v in paired_counts(comparison).items()]
            if comparison.note:
                out += ["", f"Note: {comparison.note}"]
            out.append("")
    out += ["## Per-class results", ""]
    labels = list(challenger.labels)
    if champion is not None:
        labels += [lab for lab in champion.labels if lab not in labels]
        out += ["| class | support | champion recall | challenger precision | challenger recall | challenger F1 | Δ recall |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
    else:
        out += ["| class | support | precision | recall | F1 |", "|---|---|---|---|---|"]
    for lab in labels:
        ch = challenger.per_class.get(lab)
        cp = champion.per_class.get(lab) if champion is not None else None
        p = f"{ch['precision']:.3f}" if ch else "—"
        r = f"{ch['recall']:.3f}" if ch else "—"
        f1 = f"{ch['f1']:.3f}" if ch else "—"
        support = int(ch["support"]) if ch else int(cp["support"]) if cp else 0
        if champion is None:
            out.append(f"| {_cell(lab)} | {support} | {p} | {r} | {f1} |")
        else:
            cr = f"{cp['recall']:.3f}" if cp else "—"
            d = f"{ch['recall'] - cp['recall']:+.3f}" if ch and cp else "—"
            out.append(f"| {_cell(lab)} | {support} | {cr} | {p} | {r} | {f1} | {d} |")
    out += ["", f"## Confusion matrix (challenger `{challenger.version}`)", ""]
    out += [confusion_markdown(challenger), ""]
    if confusion_url:
        out += [f"![confusion matrix of {challenger.version}]({confusion_url})", ""]
    return "\n".join(out)
