"""The promotion decision: a pure function of two evaluations, their comparison and the policy."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from freshnet.evaluate import Comparison, Evaluation, compare

if TYPE_CHECKING:
    from freshnet.config import PolicyConfig

# Float noise must not turn an exact tie into a regression.
EPS = 1e-9


@dataclass
class Rule:
    name: str
    value: Any
    threshold: Any
    passed: bool
    detail: str


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
        return [r for r in self.rules if not r.passed]

    def to_markdown(self) -> str:
        verdict = "**PROMOTE**" if self.promote else "**KEEP CHAMPION**"
        lines = [f"Decision: {verdict} — {self.summary}", ""]
        lines += ["| rule | value | threshold | verdict | detail |", "|---|---|---|---|---|"]
        for r in self.rules:
            mark = "pass" if r.passed else "FAIL"
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
) -> Decision:
    """Promote only when every rule passes; every rule is listed with its value and verdict."""
    rules: list[Rule] = []
    notes: list[str] = []
    rules.append(
        Rule(
            "bundle",
            "ok" if bundle_error is None else "broken",
            "loads and predicts canaries",
            bundle_error is None,
            "bundle validated in a clean process" if bundle_error is None else bundle_error,
        )
    )
    rules.append(
        Rule(
            "accuracy_floor",
            challenger.accuracy,
            policy.accuracy_floor,
            challenger.accuracy + EPS >= policy.accuracy_floor,
            f"challenger holdout accuracy on {challenger.n} images",
        )
    )
    first_run = champion is None
    if first_run:
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
    else:
        if comparison is None:
            comparison = compare(champion, challenger, resamples=policy.bootstrap_resamples)
        rules += _comparison_rules(challenger, champion, comparison, policy)
        if comparison.note:
            notes.append(comparison.note)
    failed = [r.name for r in rules if not r.passed]
    promote = not failed
    if promote:
        summary = (
            "first model above the floor"
            if first_run
            else "challenger is at least as good on every rule"
        )
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
                True,
                f"not required (McNemar b={cmp.b}, c={cmp.c})",
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


def decision_report(
    decision: Decision,
    challenger: Evaluation,
    champion: Evaluation | None,
    comparison: Comparison | None,
    confusion_png_name: str | None,
) -> str:
    """Markdown: champion vs challenger, Δ with CI, p-value, per-class table, confusion matrix, rules."""
    verdict = "PROMOTE" if decision.promote else "KEEP CHAMPION"
    out = [f"# Decision for {challenger.version}: {verdict}", "", decision.summary, ""]
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
        out.append("")
        if comparison is not None:
            out.append(
                f"On {comparison.n} paired images: Δ accuracy = **{comparison.delta:+.4f}** "
                f"(95% bootstrap CI [{comparison.ci_low:+.4f}, {comparison.ci_high:+.4f}], "
                f"{comparison.resamples} resamples, seed {comparison.seed}); "
                f"exact McNemar p = **{comparison.mcnemar_p:.4g}** "
                f"(champion-only correct b = {comparison.b}, challenger-only correct c = {comparison.c})."
            )
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
    out.append("")
    if confusion_png_name:
        out += [
            "## Confusion matrix (challenger)",
            "",
            f"![confusion matrix]({confusion_png_name})",
            "",
        ]
    out += ["## Rules", "", decision.to_markdown()]
    return "\n".join(out)
