"""Web noise benchmarks: mislabeled images, disguised copies leaking into the holdout, their cost.

Run from the repo root: ``.venv/bin/python benchmarks/web_noise.py`` (no arguments, no network;
about 13 minutes on 2 cores). Every night runs the real pipeline on the real photos of
``../shared/data/photos`` (5 flower classes, ~190 photos each, plus 29 scenes): each photo goes
through ``images.normalize`` into a file:// store, then ``curate.curate``,
``cycle.label_check_step``, ``snapshot.make_snapshot`` and ``snapshot_train.train_snapshot``
exactly as the nightly cycle calls them. Baselines run in the same process and run. Prints a
table, then one JSON object per figure (DESIGN.md § Benchmarks).

Two nights on the flowers: night 1 is a seeded 60% of each class with true labels; it is curated,
label-checked (no champion yet), snapshotted, and its train split trains the champion. Night 2 is
the remaining 40%, run on a fresh copy of the night-1 store for each variant, so night 1 and the
champion are computed once. Training uses the default recipe (192 px, 1 frozen + 3 epochs), so
the overhead is measured against a real night's training time.

Figures:
- noise_recall / noise_precision: on night 2, for a class pair (A, B), round(f x B's night-2
  count) of A's night-2 photos are relabelled B (f = 0.10, 0.20; pairs roses->tulips,
  daisy->dandelion). Recall: flipped images the label check flags / flipped images. Precision:
  flipped flagged / (flipped flagged + flagged images that are neither flipped nor flagged in
  the clean run, f = 0). "ours" is the mean over runs, "detail" has every run. Baseline: the
  in-sample check as it was (a model trained on the uncurated f=0.20 snapshot judges its own
  training labels, ``evaluate.find_label_noise`` at p >= 0.9), on the flipped images in train.
- noisy_vs_clean_accuracy: holdout accuracy of a challenger trained on the curated f=0.20 store
  minus that of a challenger trained on the clean (f=0) store, both scored on the clean
  snapshot's holdout. Baseline: the same delta for the uncurated (no label check) noisy model.
- curation_overhead: night 2's embedding + copy search + label check (curate with copies on minus
  curate with dedupe.copies=false, plus label_check_step; a cold embedding cache for tonight's
  images) / the wall time of training the clean night-2 challenger. Baseline: pHash-only curation
  time / the same training time (the night without them).
- leak_recall: a disguised copy of every night-1 holdout photo (crop 3-10% per axis, split at
  random between its two sides; rescale 0.5-1.5x; a small white "(c) stockphoto" watermark;
  brightness x0.8-1.2; mirror with p=0.5; JPEG quality 40-95; seeded) is ingested on night 2
  under a new URL with the same label. A copy leaks when its catalog row is split "train" with
  status "ok"; leak_recall = 1 - leaked / copies. Ours: default config; baseline: pHash only
  (dedupe.copies=false).
- leak_false_positive_rate: all 978 photos (flowers and scenes, all distinct) ingested in one
  night into a fresh store; the fraction of photos that end up in a group with any other photo.
  Ours: default config; baseline: pHash only.

To save time, stores after the clean run start with its embedding cache (embeddings are keyed by
image sha256, so they are the values those stores would compute); only the clean run and the
leak runs embed tonight's images themselves, and the clean run is the one that is timed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

# tqdm reads this when it is imported: no progress bars in the benchmark's output.
os.environ.setdefault("TQDM_DISABLE", "1")


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from freshnet import cycle  # noqa: E402
from freshnet.config import Config, parse_config  # noqa: E402
from freshnet.config_sections import ImagesConfig  # noqa: E402
from freshnet.data import embed_cache, images  # noqa: E402
from freshnet.data.catalog import load_catalog  # noqa: E402
from freshnet.data.curate import curate  # noqa: E402
from freshnet.data.snapshot import load_manifest, make_snapshot  # noqa: E402
from freshnet.model import evaluate, loaders, snapshot_train  # noqa: E402
from freshnet.storage import Storage  # noqa: E402
from freshnet.storage_open import open_storage  # noqa: E402
from tests.web_noise_helpers import disguise  # noqa: E402

SHARED = Path(os.environ.get("FRESHNET_SHARED_DATA", REPO.parent / "shared" / "data"))
CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
PAIRS = [("roses", "tulips"), ("daisy", "dandelion")]  # (true class A, wrong label B)
FRACTIONS = [0.10, 0.20]
NIGHT1_SHARE = 0.6
SEED = 0
TRAIN: dict = {}  # the default recipe: what a night really trains
IN_SAMPLE_CONFIDENCE = 0.9
START = time.perf_counter()


def progress(msg: str) -> None:
    print(f"[{time.perf_counter() - START:5.0f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Photo:
    path: Path
    label: str  # true class (or "scene")
    sha256: str
    data: bytes  # normalized JPEG, what ingest stores
    orig_sha256: str
    phash: str
    width: int
    height: int

    def outcome(self, label: str | None = None, url: str | None = None) -> dict:
        """An accepted ingest outcome for this photo (``label`` differs for a flipped one)."""
        label = label or self.label
        rel = self.path.relative_to(SHARED / "photos").as_posix()
        return {
            "label": label,
            "url": url or f"https://photos.example/{rel}",
            "query": f"photo {label}",
            "source": "benchmark",
            "status": "accepted",
            "sha256": self.sha256,
            "orig_sha256": self.orig_sha256,
            "phash": self.phash,
            "width": self.width,
            "height": self.height,
        }


def load_photo(path: Path, label: str, data: bytes | None = None) -> Photo:
    n = images.normalize(data if data is not None else path.read_bytes(), ImagesConfig())
    return Photo(path, label, n.sha256, n.data, n.orig_sha256, n.phash, n.width, n.height)


def load_photos() -> tuple[dict[str, list[Photo]], list[Photo]]:
    root = SHARED / "photos"
    flowers = {
        c: [load_photo(p, c) for p in sorted((root / "flowers" / c).glob("*.jpg"))] for c in CLASSES
    }
    scenes = [load_photo(p, "scene") for p in sorted((root / "scenes").glob("*.jpg"))]
    if sum(map(len, flowers.values())) < 900 or not scenes:
        sys.exit(f"need the flower and scene photos under {root}")
    return flowers, scenes


def config(root: Path, **sections: dict) -> Config:
    data: dict = {"classes": CLASSES, "storage": f"file://{root}", "train": TRAIN}
    data.update(sections)
    return parse_config(data, "web_noise")


def put(store: Storage, outcomes: list[dict], by_sha: dict[str, bytes]) -> None:
    for o in outcomes:
        store.put(images.image_key(o["sha256"]), by_sha[o["sha256"]])


def share_embeddings(src: Storage, dst: Storage) -> None:
    """Give ``dst`` the embedding cache of ``src`` (keyed by image sha256: the same values)."""
    raw, _ = src.read_pointer(embed_cache.POINTER)
    for key in json.loads(raw)["segments"]:
        dst.put(key, src.get(key))
    _, token = dst.read_pointer(embed_cache.POINTER)
    if not dst.swap_pointer(embed_cache.POINTER, raw, token):
        raise RuntimeError("embedding pointer changed while it was shared")


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def flagged(check: dict) -> set[str]:
    return {i["sha256"] for i in check["issues"]}


def train_and_eval(cfg: Config, version: str, holdout, image_dir: Path) -> dict:
    """Snapshot ``cfg``'s store, train a challenger on it and score it on ``holdout``."""
    store = open_storage(cfg.storage)
    snap = make_snapshot(store, cfg)
    result, seconds = timed(
        snapshot_train.train_snapshot, store, snap.id, cfg, version, cycle.cache_dir(cfg)
    )
    model_path = cycle.cache_dir(cfg) / "models" / version / "model.pkl"
    ev = evaluate.evaluate_model(model_path, version, holdout, image_dir)
    return {
        "snapshot": snap.id,
        "train_s": seconds,
        "accuracy": ev.accuracy,
        "model_path": model_path,
        "result": result,
    }


# ---- disguised copies ---------------------------------------------------------------------------


def leak_counts(store: Storage, copies: list[tuple[Photo, Photo]]) -> dict:
    df = load_catalog(store).set_index("sha256")
    out = Counter()
    for orig, copy in copies:
        row = df.loc[copy.sha256]
        leaked = row["split"] == "train" and row["status"] == "ok"
        out["leaked"] += leaked
        out["grouped_with_original"] += row["group"] == df.loc[orig.sha256, "group"]
        out["split_conflict"] += row["status"] == "split_conflict"
        out["holdout_by_chance"] += (row["split"] == "holdout") and (
            row["group"] != df.loc[orig.sha256, "group"]
        )
    n = len(copies)
    return {
        "copies": n,
        "recall": 1 - out["leaked"] / n,
        "leaked": out["leaked"],
        "grouped_with_original": out["grouped_with_original"],
        "split_conflict": out["split_conflict"],
        "holdout_by_chance": out["holdout_by_chance"],
    }


# ---- false positives ------------------------------------------------------------------------------


def grouped_photos(store: Storage, photos: list[Photo]) -> tuple[int, list[list[str]]]:
    """Photos that share a group (or an exact sha256) with another photo, and those groups."""
    df = load_catalog(store).set_index("sha256")
    by_group: dict[str, list[str]] = defaultdict(list)
    for p in photos:
        by_group[df.loc[p.sha256, "group"]].append(p.path.name)
    shared = [sorted(names) for names in by_group.values() if len(names) > 1]
    return sum(len(g) for g in shared), shared


# ---- main -------------------------------------------------------------------------------------------


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore")  # torch/fastai deprecation chatter, not results
    tmp = Path(tempfile.mkdtemp(prefix="freshnet-web-noise-"))
    os.environ["FRESHNET_CACHE"] = str(tmp / "cache")
    try:
        run(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(tmp: Path) -> None:
    flowers, scenes = load_photos()
    everything = [p for c in CLASSES for p in flowers[c]] + scenes
    by_sha = {p.sha256: p.data for p in everything}
    by_sha_photo = {p.sha256: p for p in everything}
    rng = random.Random(SEED)
    night1: dict[str, list[Photo]] = {}
    night2: dict[str, list[Photo]] = {}
    for c in CLASSES:
        ps = list(flowers[c])
        rng.shuffle(ps)
        k = round(NIGHT1_SHARE * len(ps))
        night1[c], night2[c] = ps[:k], ps[k:]
    progress(f"{len(everything)} photos normalized")

    # ---- night 1 and the champion, once --------------------------------------------------------
    root1 = tmp / "night1"
    cfg1 = config(root1)
    s1 = open_storage(cfg1.storage)
    out1 = [p.outcome() for c in CLASSES for p in night1[c]]
    put(s1, out1, by_sha)
    curate(s1, out1, "1", cfg1)
    check1 = cycle.label_check_step(cfg1, "1", None)
    snap1 = make_snapshot(s1, cfg1)
    progress(f"night 1: {len(out1)} photos, {len(check1['issues'])} flagged; training champion")
    trained1, champion_s = timed(
        snapshot_train.train_snapshot, s1, snap1.id, cfg1, "champion", cycle.cache_dir(cfg1)
    )
    champion = {"version": "champion", "model_key": trained1["model_key"]}
    progress(f"champion trained in {champion_s:.0f}s")

    def copy_night1(name: str, **sections: dict) -> tuple[Config, Storage]:
        root = tmp / name
        shutil.copytree(root1, root)
        cfg = config(root, **sections)
        return cfg, open_storage(cfg.storage)

    def night2_outcomes(pair: tuple[str, str] | None, f: float) -> tuple[list[dict], set[str]]:
        """Night 2's outcomes; with a pair (A, B), f x |B| of A's photos are labelled B."""
        flips: list[Photo] = []
        if pair and f > 0:
            a, b = pair
            pool = sorted(night2[a], key=lambda p: p.sha256)
            random.Random(f"{a}->{b}").shuffle(pool)  # f=0.10's flips are among f=0.20's
            flips = pool[: round(f * len(night2[b]))]
        flipped = {p.sha256 for p in flips}
        out = [p.outcome() for c in CLASSES for p in night2[c] if p.sha256 not in flipped]
        out += [p.outcome(label=pair[1]) for p in flips]
        return out, flipped

    # ---- clean night 2 (f = 0): timed with a cold embedding cache ---------------------------
    clean_out, _ = night2_outcomes(None, 0.0)
    cfg_c, s_c = copy_night1("clean")
    put(s_c, clean_out, by_sha)
    _, curate_on_s = timed(curate, s_c, clean_out, "2", cfg_c)
    check_c, label_s = timed(cycle.label_check_step, cfg_c, "2", champion)
    clean_flags = flagged(check_c)
    snap_c = make_snapshot(s_c, cfg_c)
    manifest_c = load_manifest(s_c, snap_c.id)
    holdout = manifest_c[manifest_c["split"] == "holdout"]
    eval_dir = loaders.materialize(s_c, holdout, cycle.cache_dir(cfg_c) / "images")
    progress(f"clean night 2: {len(clean_flags)} flagged; training the clean challenger")
    clean = train_and_eval(cfg_c, "clean", holdout, eval_dir)
    progress(f"clean challenger: {clean['train_s']:.0f}s, accuracy {clean['accuracy']:.4f}")

    cfg_p, s_p = copy_night1("phash-only", dedupe={"copies": False})
    put(s_p, clean_out, by_sha)
    _, curate_off_s = timed(curate, s_p, clean_out, "2", cfg_p)

    # ---- noisy night 2 runs ------------------------------------------------------------------
    runs = []
    curated = None
    for pair in PAIRS:
        for f in FRACTIONS:
            out, flipped = night2_outcomes(pair, f)
            cfg_n, s_n = copy_night1(f"{pair[0]}-{pair[1]}-{f:.2f}")
            share_embeddings(s_c, s_n)
            put(s_n, out, by_sha)
            curate(s_n, out, "2", cfg_n)
            flags = flagged(cycle.label_check_step(cfg_n, "2", champion))
            tp = len(flags & flipped)
            fp = len(flags - flipped - clean_flags)
            status = load_catalog(s_n).set_index("sha256")["status"]
            runs.append(
                {
                    "pair": f"{pair[0]}->{pair[1]}",
                    "f": f,
                    "flipped": len(flipped),
                    "flagged": len(flags),
                    "flipped_flagged": tp,
                    "new_false_flags": fp,
                    "also_clean_flags": len((flags - flipped) & clean_flags),
                    "flipped_label_conflict": int(
                        sum(status[s] == "label_conflict" for s in flipped)
                    ),
                    "recall": tp / len(flipped),
                    "precision": tp / (tp + fp) if tp + fp else None,
                    "raw_precision": tp / len(flags) if flags else None,
                    "flags": flags,
                    "flipped_shas": flipped,
                }
            )
            progress(
                f"{pair[0]}->{pair[1]} f={f:.2f}: {tp}/{len(flipped)} flipped flagged, "
                f"{fp} new false flags"
            )
            if pair == PAIRS[0] and f == FRACTIONS[-1]:
                curated = train_and_eval(cfg_n, "curated", holdout, eval_dir)
                progress(f"curated challenger: accuracy {curated['accuracy']:.4f}")

    # ---- baseline: today's in-sample check on the uncurated f=0.20 snapshot -----------------
    pair, f = PAIRS[0], FRACTIONS[-1]
    out, flipped = night2_outcomes(pair, f)
    cfg_u, s_u = copy_night1("in-sample", label_check={"enabled": False})
    share_embeddings(s_c, s_u)
    put(s_u, out, by_sha)
    curate(s_u, out, "2", cfg_u)
    cycle.label_check_step(cfg_u, "2", champion)  # off: returns at once, as on such a night
    noisy = train_and_eval(cfg_u, "noisy", holdout, eval_dir)
    manifest_u = load_manifest(s_u, noisy["snapshot"])
    train_u = manifest_u[manifest_u["split"] == "train"].reset_index(drop=True)
    found = evaluate.find_label_noise(
        noisy["model_path"],
        train_u,
        cycle.cache_dir(cfg_u) / "images",
        IN_SAMPLE_CONFIDENCE,
    )
    in_flags = {d["sha256"] for d in found}
    flipped_train = flipped & set(train_u["sha256"])
    in_tp = len(in_flags & flipped_train)
    ours_run = next(r for r in runs if r["pair"] == f"{pair[0]}->{pair[1]}" and r["f"] == f)
    ours_train = ours_run["flags"] & flipped_train
    union = ours_train | (in_flags & flipped_train)
    in_sample = {
        "flipped_in_train": len(flipped_train),
        "flagged": len(in_flags),
        "flipped_flagged": in_tp,
        "recall": in_tp / len(flipped_train) if flipped_train else None,
        "precision": in_tp / len(in_flags) if in_flags else None,
        "ours_recall_same_images": len(ours_train) / len(flipped_train) if flipped_train else None,
        "union_recall": len(union) / len(flipped_train) if flipped_train else None,
        "accuracy": noisy["accuracy"],
    }
    progress(f"in-sample baseline: {in_tp}/{len(flipped_train)} flipped train images flagged")

    # ---- leaks: disguised copies of night 1's holdout ------------------------------------------
    manifest1 = load_manifest(s1, snap1.id)
    crng = random.Random(SEED + 1)
    copies = []
    for sha in sorted(manifest1.loc[manifest1["split"] == "holdout", "sha256"]):
        orig = by_sha_photo[sha]
        copies.append((orig, load_photo(orig.path, orig.label, disguise(orig.path, crng))))
    leak_out = [
        c.outcome(url=f"https://copies.example/{i}/{o.path.name}")
        for i, (o, c) in enumerate(copies)
    ]
    copy_bytes = {c.sha256: c.data for _, c in copies}
    leaks = {}
    for name, sections in (("ours", {}), ("baseline", {"dedupe": {"copies": False}})):
        cfg_l, s_l = copy_night1(f"leak-{name}", **sections)
        put(s_l, leak_out, copy_bytes)
        curate(s_l, leak_out, "2", cfg_l)
        leaks[name] = leak_counts(s_l, copies)
    progress(f"leaks: ours {leaks['ours']['leaked']}, pHash only {leaks['baseline']['leaked']}")

    # ---- false positives: every photo in one night, fresh store ------------------------------
    all_out = [p.outcome() for p in everything]
    fps = {}
    for name, sections in (("ours", {}), ("baseline", {"dedupe": {"copies": False}})):
        cfg_f = config(tmp / f"fp-{name}", **sections)
        s_f = open_storage(cfg_f.storage)
        if name == "ours":
            share_embeddings(s_c, s_f)  # the flowers' embeddings; the scenes are computed
        put(s_f, all_out, by_sha)
        report = curate(s_f, all_out, "1", cfg_f)
        n, groups = grouped_photos(s_f, everything)
        fps[name] = {
            "grouped": n,
            "rate": n / len(everything),
            "near_duplicate": report.near_duplicate_total,
            "duplicate": report.duplicate_total,
            "groups": groups,
        }
    progress("false positives measured")

    report_all(
        dict(
            runs=runs,
            clean_flags=clean_flags,
            check1=check1,
            in_sample=in_sample,
            clean=clean,
            curated=curated,
            curate_on_s=curate_on_s,
            curate_off_s=curate_off_s,
            label_s=label_s,
            champion_s=champion_s,
            leaks=leaks,
            fps=fps,
            photos=len(everything),
            night_sizes={c: [len(night1[c]), len(night2[c])] for c in CLASSES},
            holdout_n=len(holdout),
            clean_night_sizes=len(clean_out),
        )
    )


def _r(v, nd: int = 4):
    return round(v, nd) if isinstance(v, float) else v


def report_all(g: dict) -> None:
    """Print the table, the notes and one JSON object per figure; ``g`` holds what run measured."""
    runs, in_sample, clean, curated = g["runs"], g["in_sample"], g["clean"], g["curated"]
    leaks, fps = g["leaks"], g["fps"]
    recalls = [r["recall"] for r in runs]
    precisions = [r["precision"] for r in runs if r["precision"] is not None]
    overhead = g["curate_on_s"] - g["curate_off_s"] + g["label_s"]
    public_runs = [
        {k: _r(v) for k, v in r.items() if k not in ("flags", "flipped_shas")} for r in runs
    ]
    figures = [
        {
            "benchmark": "noise_recall",
            "unit": "fraction",
            "ours": _r(sum(recalls) / len(recalls)),
            "baseline": _r(in_sample["recall"]),
            "goal": "ours >= 0.8 at precision >= 0.8",
            "detail": {
                "runs": public_runs,
                "clean_run_flags": len(g["clean_flags"]),
                "night1_flags": len(g["check1"]["issues"]),
                "baseline": f"in-sample find_label_noise p>={IN_SAMPLE_CONFIDENCE}, f=0.20 "
                f"{PAIRS[0][0]}->{PAIRS[0][1]}, flipped images in train",
                "in_sample": {k: _r(v) for k, v in in_sample.items()},
            },
        },
        {
            "benchmark": "noise_precision",
            "unit": "fraction",
            "ours": _r(sum(precisions) / len(precisions)) if precisions else None,
            "baseline": _r(in_sample["precision"]),
            "goal": "ours >= 0.8",
            "detail": {
                "runs": [
                    {k: r[k] for k in ("pair", "f", "precision", "raw_precision")}
                    for r in public_runs
                ],
                "definition": "flipped flagged / (flipped flagged + flagged that are neither "
                "flipped nor flagged in the clean run); baseline: flipped flagged / flagged",
            },
        },
        {
            "benchmark": "leak_recall",
            "unit": "fraction",
            "ours": _r(leaks["ours"]["recall"]),
            "baseline": _r(leaks["baseline"]["recall"]),
            "goal": "ours >= 0.99",
            "detail": {"ours": leaks["ours"], "baseline_phash_only": leaks["baseline"]},
        },
        {
            "benchmark": "leak_false_positive_rate",
            "unit": "fraction",
            "ours": _r(fps["ours"]["rate"], 5),
            "baseline": _r(fps["baseline"]["rate"], 5),
            "goal": "ours <= 0.001",
            "detail": {
                "photos": g["photos"],
                "ours": fps["ours"],
                "baseline_phash_only": fps["baseline"],
            },
        },
        {
            "benchmark": "noisy_vs_clean_accuracy",
            "unit": "accuracy delta",
            "ours": _r(curated["accuracy"] - clean["accuracy"]),
            "baseline": _r(in_sample["accuracy"] - clean["accuracy"]),
            "goal": "ours >= -0.015",
            "detail": {
                "clean_accuracy": _r(clean["accuracy"]),
                "curated_noisy_accuracy": _r(curated["accuracy"]),
                "uncurated_noisy_accuracy": _r(in_sample["accuracy"]),
                "holdout": g["holdout_n"],
                "noise": f"f=0.20 {PAIRS[0][0]}->{PAIRS[0][1]}",
                "train": TRAIN,
            },
        },
        {
            "benchmark": "curation_overhead",
            "unit": "fraction of training time",
            "ours": _r(overhead / clean["train_s"]),
            "baseline": _r(g["curate_off_s"] / clean["train_s"]),
            "goal": "ours <= 0.20",
            "detail": {
                "curate_with_copies_s": _r(g["curate_on_s"], 2),
                "curate_phash_only_s": _r(g["curate_off_s"], 2),
                "label_check_s": _r(g["label_s"], 2),
                "train_s": _r(clean["train_s"], 2),
                "champion_train_s": _r(g["champion_s"], 2),
                "night2_images": g["clean_night_sizes"],
                "train": TRAIN,
                "baseline": "pHash-only curation time / training time",
            },
        },
    ]

    print()
    print(f"{'benchmark':28} {'unit':26} {'ours':>10} {'baseline':>10}  goal")
    print("-" * 100)
    for f in figures:
        ours = "-" if f["ours"] is None else f"{f['ours']:.4g}"
        base = "-" if f["baseline"] is None else f"{f['baseline']:.4g}"
        print(f"{f['benchmark']:28} {f['unit']:26} {ours:>10} {base:>10}  {f['goal']}")
    print()
    print(
        f"  nights: {g['night_sizes']} photos per class (night 1, night 2); training "
        f"{TRAIN}; champion {g['champion_s']:.0f}s"
    )
    print(
        f"  flags without noise: night 1 {len(g['check1']['issues'])}, clean night 2 "
        f"{len(g['clean_flags'])} (excluded from precision)"
    )
    print(f"  {'pair':20} {'f':>5} {'flipped':>8} {'flagged':>8} {'hit':>5} {'new fp':>7} "
          f"{'recall':>7} {'prec':>6}")  # fmt: skip
    for r in runs:
        prec = "-" if r["precision"] is None else f"{r['precision']:.3f}"
        print(
            f"  {r['pair']:20} {r['f']:5.2f} {r['flipped']:8d} {r['flagged']:8d} "
            f"{r['flipped_flagged']:5d} {r['new_false_flags']:7d} {r['recall']:7.3f} {prec:>6}"
        )
    s = in_sample
    print(
        f"  in-sample check (f=0.20 {PAIRS[0][0]}->{PAIRS[0][1]}, p>={IN_SAMPLE_CONFIDENCE}): "
        f"{s['flipped_flagged']}/{s['flipped_in_train']} flipped train images, "
        f"{s['flagged']} flagged in all"
    )
    print(
        f"  union with ours on those {s['flipped_in_train']} images: recall "
        f"{_r(s['ours_recall_same_images'], 3)} (ours) -> {_r(s['union_recall'], 3)} (union)"
    )
    print(
        f"  accuracy on the clean holdout ({g['holdout_n']}): clean {clean['accuracy']:.4f}, "
        f"curated noisy {curated['accuracy']:.4f}, uncurated noisy {s['accuracy']:.4f}"
    )
    for name in ("ours", "baseline"):
        lk = leaks[name]
        print(
            f"  leaks {name:8}: {lk['leaked']}/{lk['copies']} copies in train; "
            f"{lk['grouped_with_original']} grouped with original, "
            f"{lk['split_conflict']} split_conflict, {lk['holdout_by_chance']} holdout by chance"
        )
    for name in ("ours", "baseline"):
        fp = fps[name]
        print(
            f"  false groups {name:8}: {fp['grouped']}/{g['photos']} photos "
            f"({fp['near_duplicate']} near_duplicate, {fp['duplicate']} duplicate) {fp['groups']}"
        )
    print(
        f"  overhead: curate {g['curate_on_s']:.1f}s (pHash only {g['curate_off_s']:.1f}s) + "
        f"label check {g['label_s']:.1f}s vs training {clean['train_s']:.1f}s"
    )
    print(f"  total {time.perf_counter() - START:.0f} s")
    print()
    for f in figures:
        print(json.dumps(f))


if __name__ == "__main__":
    main()
