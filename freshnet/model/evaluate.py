"""Holdout evaluation: metrics, paired McNemar test, paired bootstrap CI, confusion-matrix plot."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freshnet.model.loaders import LABEL_COL, PATH_COL, image_path

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    version: str
    labels: list[str]  # rows/columns of the confusion matrix: model classes plus any holdout label
    shas: list[str]  # holdout rows, sorted by sha256 so two evaluations align row by row
    truth: list[str]
    predicted: list[str]
    accuracy: float
    per_class: dict[str, dict[str, float]]  # label -> precision, recall, f1, support
    confusion: list[list[int]]  # confusion[i][j]: truth labels[i] predicted labels[j]
    vocab: list[str] = field(default_factory=list)  # the model's classes
    confidence: list[float] = field(default_factory=list)  # probability of the predicted class
    # Where the predictions came from (freshnet.model.predictions): rows read from the cache of this
    # model version vs rows the model scored for this evaluation.
    cached_predictions: int = 0
    new_predictions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Evaluation:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def n(self) -> int:
        return len(self.shas)


@dataclass
class Comparison:
    n: int  # paired rows compared
    champion_accuracy: float
    challenger_accuracy: float
    delta: float  # challenger - champion, on the same rows
    ci_low: float
    ci_high: float
    mcnemar_p: float
    b: int  # champion right, challenger wrong
    c: int  # champion wrong, challenger right
    shared_classes: list[str]
    classes_changed: bool
    note: str = ""
    resamples: int = 0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Comparison:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def predict_files(model_path: Path, paths: list[Path]) -> tuple[list[str], np.ndarray, list[str]]:
    """Predict image files with an exported model: (predicted labels, probabilities [n, k], vocab)."""
    import numpy as np
    import pandas as pd
    import torch
    from fastai.learner import load_learner

    learn = load_learner(Path(model_path), cpu=not torch.cuda.is_available())
    vocab = [str(v) for v in learn.dls.vocab]
    if not paths:
        return [], np.zeros((0, len(vocab)), dtype=np.float32), vocab
    # Same columns the training DataBlock reads, so every item transform applies as in training.
    items = pd.DataFrame({PATH_COL: [str(p) for p in paths], LABEL_COL: vocab[0]})
    dl = learn.dls.test_dl(items, bs=64, num_workers=0)
    # What get_preds does, with model and batches in channels-last: oneDNN's channels-last kernels
    # (the depthwise convolutions above all) take ~30% less time on CPU for the same numbers, and
    # the Space app predicts in channels-last too.
    model = learn.model.eval().to(memory_format=torch.channels_last)
    activation = getattr(learn.loss_func, "activation", lambda x: torch.softmax(x, dim=-1))
    with torch.inference_mode():
        probs = torch.cat(
            [
                activation(model(b[0].contiguous(memory_format=torch.channels_last)).float())
                for b in dl
            ]
        )
    probs_np = probs.numpy()
    predicted = [vocab[i] for i in probs_np.argmax(axis=1)]
    return predicted, probs_np, vocab


def metrics_from(
    truth: list[str], predicted: list[str], labels: list[str]
) -> tuple[float, dict[str, Any], list[list[int]]]:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix."""
    index = {lab: i for i, lab in enumerate(labels)}
    k = len(labels)
    conf = [[0] * k for _ in range(k)]
    for t, p in zip(truth, predicted, strict=True):
        conf[index[t]][index[p]] += 1
    n = len(truth)
    correct = sum(conf[i][i] for i in range(k))
    per_class: dict[str, dict[str, float]] = {}
    for i, lab in enumerate(labels):
        tp = conf[i][i]
        support = sum(conf[i])
        predicted_n = sum(conf[r][i] for r in range(k))
        precision = tp / predicted_n if predicted_n else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[lab] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return (correct / n if n else 0.0), per_class, conf


def holdout_rows(holdout: pd.DataFrame) -> pd.DataFrame:
    """The distinct holdout rows sorted by sha256: the row order every evaluation uses."""
    if "split" in holdout.columns and (holdout["split"] != "holdout").any():
        raise ValueError("evaluate_model got non-holdout rows (split != 'holdout')")
    return holdout.drop_duplicates("sha256").sort_values("sha256")


def evaluation_from(
    version: str,
    rows: pd.DataFrame,
    probs: np.ndarray,
    vocab: list[str],
    cached: int = 0,
) -> Evaluation:
    """The evaluation of ``version`` from its probabilities on ``rows`` (from holdout_rows).

    Every decision number (accuracy, per-class, confusion, and the paired tests in compare)
    depends only on the arg-max class of each row, so cached and freshly computed probabilities
    give the same numbers as long as they give the same classes.
    """
    shas = rows["sha256"].tolist()
    truth = rows["label"].astype(str).tolist()
    if probs.shape != (len(shas), len(vocab)):
        raise ValueError(
            f"probabilities of shape {probs.shape} for {len(shas)} rows x {len(vocab)} classes"
        )
    predicted = [vocab[i] for i in probs.argmax(axis=1)] if len(shas) else []
    labels = list(vocab) + sorted(set(truth) - set(vocab))
    acc, per_class, conf = metrics_from(truth, predicted, labels)
    confidence = [float(p.max()) for p in probs] if len(probs) else []
    log.info(
        "evaluated %s on %d holdout images: accuracy %.4f (%d predictions from the cache, %d new)",
        version,
        len(shas),
        acc,
        cached,
        len(shas) - cached,
    )
    return Evaluation(
        version,
        labels,
        shas,
        truth,
        predicted,
        acc,
        per_class,
        conf,
        list(vocab),
        confidence,
        cached_predictions=cached,
        new_predictions=len(shas) - cached,
    )


def evaluate_model(
    model_path: Path, version: str, holdout: pd.DataFrame, image_dir: Path
) -> Evaluation:
    """Score one model on the holdout rows (sorted by sha256 so evaluations pair up row by row)."""
    rows = holdout_rows(holdout)
    paths = [image_path(image_dir, s) for s in rows["sha256"]]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} holdout image(s) missing under {image_dir}, e.g. {missing[0]}"
        )
    _, probs, vocab = predict_files(Path(model_path), paths)
    return evaluation_from(version, rows, probs, vocab)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: binomial test of b vs c discordant pairs at p = 1/2."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # Exact integer sum, then one division: no floating-point drift for large n.
    tail = sum(math.comb(n, i) for i in range(k + 1))
    p: float = 2 * tail / 2**n
    return min(1.0, p)


def bootstrap_delta_ci(
    champ_correct: np.ndarray,
    chall_correct: np.ndarray,
    resamples: int,
    seed: int,
    level: float = 0.95,
) -> tuple[float, float]:
    """Paired percentile bootstrap CI of accuracy(challenger) - accuracy(champion)."""
    import numpy as np

    n = len(champ_correct)
    if n == 0:
        return float("nan"), float("nan")
    diff = chall_correct.astype(np.float64) - champ_correct.astype(np.float64)
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    chunk = max(1, 2_000_000 // n)  # bounded memory for large holdouts
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(m, n))
        out[start : start + m] = diff[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(out, alpha)), float(np.quantile(out, 1 - alpha))


def compare(
    champion: Evaluation, challenger: Evaluation, resamples: int = 2000, seed: int = 0
) -> Comparison:
    """Pair the two evaluations by sha256; when the class sets differ, compare on shared classes."""
    import numpy as np

    champ_vocab = set(champion.vocab or champion.labels)
    chall_vocab = set(challenger.vocab or challenger.labels)
    shared = sorted(champ_vocab & chall_vocab)
    changed = champ_vocab != chall_vocab
    champ_rows = {
        s: (t, p) for s, t, p in zip(champion.shas, champion.truth, champion.predicted, strict=True)
    }
    notes = []
    pairs = []
    for s, t, p in zip(challenger.shas, challenger.truth, challenger.predicted, strict=True):
        if s not in champ_rows:
            continue
        ct, cp = champ_rows[s]
        if ct != t:
            raise ValueError(
                f"holdout row {s} has label {ct!r} for the champion but {t!r} for the challenger"
            )
        if changed and t not in shared:
            continue
        pairs.append((t == cp, t == p))
    unpaired = len(set(challenger.shas) ^ set(champion.shas))
    if unpaired:
        notes.append(f"{unpaired} holdout row(s) scored by only one model were left out")
    if changed:
        added = sorted(chall_vocab - champ_vocab)
        removed = sorted(champ_vocab - chall_vocab)
        notes.append(
            f"class set changed (added {added or 'none'}, removed {removed or 'none'}): "
            f"compared on the {len(shared)} shared classes only"
        )
    n = len(pairs)
    if n == 0:
        notes.append("no paired holdout rows to compare")
        return Comparison(0, 0.0, 0.0, 0.0, float("nan"), float("nan"), 1.0, 0, 0, shared, changed,
                          "; ".join(notes), resamples, seed)  # fmt: skip
    arr = np.array(pairs, dtype=bool)
    champ_ok, chall_ok = arr[:, 0], arr[:, 1]
    b = int((champ_ok & ~chall_ok).sum())
    c = int((~champ_ok & chall_ok).sum())
    lo, hi = bootstrap_delta_ci(champ_ok, chall_ok, resamples, seed)
    champ_acc, chall_acc = float(champ_ok.mean()), float(chall_ok.mean())
    return Comparison(
        n=n,
        champion_accuracy=champ_acc,
        challenger_accuracy=chall_acc,
        delta=chall_acc - champ_acc,
        ci_low=lo,
        ci_high=hi,
        mcnemar_p=mcnemar_exact(b, c),
        b=b,
        c=c,
        shared_classes=shared,
        classes_changed=changed,
        note="; ".join(notes),
        resamples=resamples,
        seed=seed,
    )


def confusion_png(ev: Evaluation) -> bytes:
    """The confusion matrix as a PNG (matplotlib Agg, no global pyplot state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.array(ev.confusion, dtype=int).reshape(len(ev.labels), len(ev.labels))
    k = len(ev.labels)
    size = max(4.0, 0.6 * k + 2.5)
    fig = Figure(figsize=(size, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(k), ev.labels, rotation=45, ha="right")
    ax.set_yticks(range(k), ev.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"{ev.version}: accuracy {ev.accuracy:.3f} (n={ev.n})")
    top = m.max() if m.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(m[i, j]),
                ha="center",
                va="center",
                color="white" if m[i, j] > top / 2 else "black",
            )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def find_label_noise(
    model_path: Path,
    manifest_train: pd.DataFrame,
    image_dir: Path,
    confidence: float,
    top_loss_fraction: float = 0.0,
) -> list[dict[str, Any]]:
    """Training images the model puts in another class with probability >= ``confidence``.

    With ``top_loss_fraction`` > 0 the highest-loss tail of the misclassified images is added too.
    Returns ``{"sha256", "label", "predicted", "p", "reason"}`` sorted by p, most confident first.
    """
    import numpy as np

    if len(manifest_train) == 0:
        return []
    shas = manifest_train["sha256"].tolist()
    labels = manifest_train[LABEL_COL].astype(str).tolist()
    predicted, probs, vocab = predict_files(
        Path(model_path), [image_path(image_dir, s) for s in shas]
    )
    index = {v: i for i, v in enumerate(vocab)}
    found: dict[str, dict[str, Any]] = {}
    losses = []
    for i, (sha, lab, pred) in enumerate(zip(shas, labels, predicted, strict=True)):
        if lab not in index or pred == lab:
            continue
        p = float(probs[i].max())
        loss = -math.log(max(float(probs[i][index[lab]]), 1e-12))
        losses.append((loss, i))
        if p >= confidence:
            found[sha] = {
                "sha256": sha,
                "label": lab,
                "predicted": pred,
                "p": p,
                "reason": "confident",
            }
    if top_loss_fraction > 0 and losses:
        k = max(1, int(round(len(shas) * top_loss_fraction)))
        for _, i in sorted(losses, reverse=True)[:k]:
            if shas[i] not in found:
                p = float(np.max(probs[i]))
                found[shas[i]] = {
                    "sha256": shas[i],
                    "label": labels[i],
                    "predicted": predicted[i],
                    "p": p,
                    "reason": "top_loss",
                }
    return sorted(found.values(), key=lambda d: -d["p"])
