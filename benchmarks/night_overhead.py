"""night_overhead: a night's non-training work against a catalog of N = 10k and 100k images.

The steps, as the nightly cycle runs them (freshnet.cycle), on file storage:

- catalog load and compare-and-swap write (catalog.load_state + one catalog.commit),
- curation of 1,000 new real photos (cycle.curate_step: exact + pHash near-duplicates against the
  index, disguised copies against the embedding cache, groups, splits, the catalog commit),
- snapshot write (cycle.snapshot_step, new images counted against last night's snapshot),
- champion evaluation (contest.evaluate_step) with a champion that scored last night's holdout,
- ledger record (Ledger.record) and the night's history record (cycle.record_night_step).

Ingest of the 1,000 photos (freshnet.data.ingest from a folder source) runs first, timed apart: its cost
does not depend on N and it is not in the issue's list. The existing N rows are built directly
(Parquet catalog, near-duplicate index segments, embedding cache segments, last night's snapshot,
a year of ledger and history records), not ingested: their images are hard links to the real
photos under synthetic sha256 names, their pHash/dHash are random, their embeddings random unit
vectors with real thumbnails; so their storage holds N image files, as a year of nights would.
The 1,000 new images: the 949 real flower photos plus 51 of them shrunk to 90% (real
near-duplicates, as the web returns them).

Each N runs in two fresh processes: one builds the state, one runs the night, so the peak RSS is
the night's alone (resource.getrusage of that process). Goals: < 30 s and < 2 GB peak RSS at
100k (`night_overhead_100k`), time(100k) / time(10k) <= 3 (`night_overhead_growth`). The model
forward passes on tonight's images (the embeddings of 1,000 new photos, the champion's predictions
of the new holdout rows) do not depend on N; they are timed apart (`model_forward_s`), with the
rest as `without_model_forward_s`. The floor of the night is measured too: the same night against
1,000 rows (`night_overhead_floor`), and the 100k night's time above it (`above_floor_s`).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHOTOS = Path(os.environ.get("FRESHNET_SHARED_DATA", REPO.parent / "shared" / "data")) / "photos"
CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
# NIGHT_OVERHEAD_SIZES="1000,5000" runs smaller catalogs (for trying the script out);
# NIGHT_OVERHEAD_PROFILE=DIR writes a cProfile of each night there (DIR/night-N.prof).
SIZES = tuple(int(x) for x in os.environ.get("NIGHT_OVERHEAD_SIZES", "10000,100000").split(","))
# The floor: the same night against a catalog of 1,000 rows. What it costs (the model forward
# passes, the copy check of tonight's images against each other, imports) no catalog size can
# remove; the goal at 100k is judged against it too (`above_floor_s`).
FLOOR_N = int(os.environ.get("NIGHT_OVERHEAD_FLOOR_N", "1000"))
NEW_IMAGES = 1000
NIGHT = "2026-12-03"
LAST_NIGHT = "2026-12-02"
NIGHTS = 365  # a year of nights behind the catalog
LEDGER_ENTRIES = 60  # promotions in that year
INDEX_SEGMENTS = 40  # near-duplicate index segments (compaction at 64)
EMBED_SEGMENTS = 40
CHAMPION = "v20261202-020000"


def config(root: Path, new_dir: Path):
    from freshnet.config import parse_config

    return parse_config(
        {
            "classes": CLASSES,
            "storage": f"file://{root / 'store'}",
            "source": {"kind": "folder", "path": str(new_dir)},
            "space": {"target": str(root / "space")},
        },
        "night_overhead",
    )


def synthetic_sha(i: int) -> str:
    return hashlib.sha256(f"night-overhead-{i}".encode()).hexdigest()


# ---------------------------------------------------------------- shared inputs (parent)


def prepare_inputs(tmp: Path) -> tuple[Path, Path, Path]:
    """The new photos' folder source, a local copy of the photos to hard-link, a tiny model."""
    from PIL import Image

    flowers = {c: sorted((PHOTOS / "flowers" / c).glob("*.jpg")) for c in CLASSES}
    if sum(len(v) for v in flowers.values()) < 900:
        raise SystemExit(f"need the real flower photos under {PHOTOS}")
    new_dir = tmp / "new"
    pool = tmp / "pool"  # hard links need one file system: the real photos, copied once
    pool.mkdir()
    everything = [p for c in CLASSES for p in flowers[c]]
    for c in CLASSES:
        (new_dir / c).mkdir(parents=True)
        for p in flowers[c]:
            os.symlink(p, new_dir / c / p.name)
    for n, p in enumerate(everything):
        shutil.copyfile(p, pool / f"{n:04d}.jpg")
    # Real near-duplicates: some photos again, shrunk to 90%.
    extra = NEW_IMAGES - len(everything)
    for p in everything[:: max(1, len(everything) // max(extra, 1))][:extra]:
        with Image.open(p) as im:
            small = im.convert("RGB").resize((round(im.width * 0.9), round(im.height * 0.9)))
            small.save(new_dir / p.parent.name / f"small-{p.name}", "JPEG", quality=90)
    return new_dir, pool, tiny_model(flowers, tmp / "model")


def tiny_model(flowers: dict[str, list[Path]], out: Path) -> Path:
    """A tiny real model (freshnet.model.train, 64 px, one epoch): the champion that gets evaluated."""
    import pandas as pd

    from freshnet.config_sections import TrainConfig
    from freshnet.model.train import train_model

    images = out / "images"
    images.mkdir(parents=True)
    rows = []
    for label in CLASSES:
        for p in flowers[label][:15]:
            sha = hashlib.sha256(p.read_bytes()).hexdigest()
            shutil.copyfile(p, images / f"{sha}.jpg")
            rows.append({"sha256": sha, "label": label, "split": "train"})
    cfg = TrainConfig(
        image_size=64, batch_size=16, epochs=1, freeze_epochs=0, device="cpu", augment=False
    )
    train_model(pd.DataFrame(rows), images, cfg, out / "model.pkl")
    return out / "model.pkl"


# ---------------------------------------------------------------- state of N rows (child)


def build_state(n: int, root: Path, new_dir: Path, pool: Path, model: Path) -> None:
    """A catalog of ``n`` rows after a year of nights, as storage would hold it."""
    import numpy as np
    import pandas as pd

    from freshnet import cycle, history
    from freshnet.data import catalog, dedupe, embed, embed_cache, hashing, place, snapshot
    from freshnet.space.ledger import Ledger

    cfg = config(root, new_dir)
    store = cycle.open_store(cfg)
    rng = np.random.default_rng(n)
    files = sorted(pool.glob("*.jpg"))
    shas = [synthetic_sha(i) for i in range(n)]
    groups = [s[:16] for s in shas]
    salt, frac = cfg.dataset.split_salt, cfg.dataset.holdout_fraction
    phash = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    dhash = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    first = [f"2025-12-{(i * NIGHTS // n) % 28 + 1:02d}" for i in range(n)]
    df = pd.DataFrame(
        {
            "sha256": shas,
            "orig_sha256": [""] * n,
            "label": [CLASSES[i % len(CLASSES)] for i in range(n)],
            "url": [f"https://example.org/img/{i}.jpg" for i in range(n)],
            "query": [f"photo {CLASSES[i % len(CLASSES)]}" for i in range(n)],
            "source": ["duckduckgo"] * n,
            "phash": hashing.u64_to_hex(phash),
            "group": groups,
            "split": [place.split_for_group(g, salt, frac) for g in groups],
            "first_seen": first,
            "status": ["ok"] * n,
            "note": [""] * n,
            "dhash": hashing.u64_to_hex(dhash),
            "width": [400] * n,
            "height": [300] * n,
        }
    )
    images = Path(store.root) / "images"
    for i, s in enumerate(shas):
        d = images / s[:2]
        d.mkdir(parents=True, exist_ok=True)
        os.link(files[i % len(files)], d / f"{s}.jpg")
    # The near-duplicate index in segments, as nights appended them, then the catalog pointer.
    bounds = np.linspace(0, n, INDEX_SEGMENTS + 1).astype(int)
    tags = dedupe.tags_of(shas)
    segments = []
    for k in range(INDEX_SEGMENTS):
        a, b = bounds[k], bounds[k + 1]
        key = f"index/segments/{k + 1:06d}-bench.npz"
        dedupe.write_segment(store, key, phash[a:b], dhash[a:b], np.ones(b - a, bool), tags[a:b])
        segments.append(key)
    state = catalog.CatalogState(
        catalog.empty_catalog(), dedupe.HashIndex(), NIGHTS, None, {"history": []}
    )
    catalog.commit(store, state, df, segments, "night_overhead setup")
    # The embedding cache: random unit vectors, real thumbnails.
    thumbs = []
    from PIL import Image

    for f in files[:200]:
        with Image.open(f) as im:
            thumbs.append(embed.thumbnail(im.convert("RGB")))
    bounds = np.linspace(0, n, EMBED_SEGMENTS + 1).astype(int)
    keys = []
    for k in range(EMBED_SEGMENTS):
        a, b = bounds[k], bounds[k + 1]
        e = rng.standard_normal((b - a, embed.DIM)).astype(np.float32)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        rows = [(e[j], *thumbs[(a + j) % len(thumbs)]) for j in range(b - a)]
        key = f"{embed_cache.PREFIX}{k:04d}-bench.npz"
        store.put(key, embed_cache._encode(shas[a:b], rows))
        keys.append(key)
    store.swap_pointer(embed_cache.POINTER, json.dumps({"segments": keys}).encode(), None)
    # Last night's snapshot, the champion that scored its holdout, a year of ledger and history.
    snap = cycle.snapshot_step(cfg)
    store.put(f"models/{CHAMPION}/model.pkl", model.read_bytes())
    holdout = snapshot.load_manifest(store, snap["id"])
    holdout = holdout[holdout["split"] == "holdout"]
    seed_champion_predictions(cfg, store, holdout)
    ledger = Ledger(store)
    for k in range(LEDGER_ENTRIES):
        version = f"v2026{k:04d}-020000" if k < LEDGER_ENTRIES - 1 else CHAMPION
        entry = ledger.append(
            version=version,
            commit=hashlib.sha1(version.encode()).hexdigest(),
            dataset=snap["id"],
            metrics={"holdout_accuracy": 0.9},
            model_key=f"models/{version}/model.pkl",
            target=cfg.space.target,
        )
    ledger.set_champion(entry)
    for k in range(NIGHTS):
        history.record(store, {"night": f"night-{k:03d}", "outcome": "kept"})
    (root / "state.json").write_text(json.dumps({"snapshot": snap["id"], "rows": snap["rows"]}))


def seed_champion_predictions(cfg, store, holdout) -> None:
    """Last night's champion predictions of its holdout, in the prediction cache (if there is one)."""
    try:
        from freshnet.model import predictions
    except ImportError:
        return
    import numpy as np

    k = len(CLASSES)
    probs = np.full((len(holdout), k), 0.1 / (k - 1), np.float32)
    truth = [CLASSES.index(lab) for lab in holdout["label"]]
    probs[np.arange(len(holdout)), truth] = 0.9
    predictions.save(store, CHAMPION, holdout["sha256"].tolist(), probs, sorted(CLASSES))


# ---------------------------------------------------------------- one night (child)


def run_night(n: int, root: Path, new_dir: Path) -> dict:
    import logging

    from freshnet import contest, cycle
    from freshnet.data import catalog, embed_cache, ingest, sources
    from freshnet.model import evaluate
    from freshnet.space.ledger import Ledger

    logging.disable(logging.WARNING)
    cfg = config(root, new_dir)
    store = cycle.open_store(cfg)
    last = json.loads((root / "state.json").read_text())
    steps: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        steps[name] = time.perf_counter() - t
        return out

    # The model forward passes on tonight's images (embeddings for the copy search, the
    # champion's predictions of new holdout rows) do not depend on N: timed apart, as the floor.
    forward = {"embed tonight's images": 0.0, "champion predicts new holdout rows": 0.0}

    def clocked(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                forward[name] += time.perf_counter() - t

        return wrapper

    embed_cache.embed_bytes = clocked("embed tonight's images", embed_cache.embed_bytes)
    evaluate.predict_files = clocked("champion predicts new holdout rows", evaluate.predict_files)

    t = time.perf_counter()
    report = sources.search_folder(cfg)
    outcomes = ingest.ingest(report.candidates, cfg, store, progress=False)
    ingest_key = cycle.put_json(store, f"nights/{NIGHT}/ingest.json", [vars(o) for o in outcomes])
    ingest_s = time.perf_counter() - t
    accepted = sum(1 for o in outcomes if o.status == "accepted")

    state = timed("catalog load", catalog.load_state, store)
    timed(
        "catalog compare-and-swap write",
        catalog.commit,
        store,
        state,
        state.df,
        list(state.index.segments),
        "night_overhead rewrite",
    )
    del state
    cur = timed("curate 1,000 new images", cycle.curate_step, cfg, NIGHT, ingest_key)
    snap = timed("snapshot write", cycle.snapshot_step, cfg, last["snapshot"])
    ev = timed(
        "champion evaluation",
        contest.evaluate_step,
        cfg,
        f"models/{CHAMPION}/model.pkl",
        CHAMPION,
        snap["id"],
    )
    ledger = Ledger(store)
    timed(
        "ledger record",
        ledger.record,
        version="v20261203-020000",
        commit=hashlib.sha1(b"tonight").hexdigest(),
        dataset=snap["id"],
        metrics={"holdout_accuracy": ev["accuracy"]},
        model_key="models/v20261203-020000/model.pkl",
        target=cfg.space.target,
    )
    timed(
        "night history record",
        cycle.record_night_step,
        cfg,
        {"night": NIGHT, "outcome": "promoted", "snapshot": snap["id"]},
    )
    return {
        "n": n,
        "steps": steps,
        "total": sum(steps.values()),
        "forward": forward,
        "ingest_s": ingest_s,
        "accepted": accepted,
        "curation": {k: cur[k] for k in ("new_total", "duplicate_total", "near_duplicate_total")},
        "catalog_rows": cur["catalog_rows"],
        "holdout": len(ev["shas"]),
        "prediction_cache": _has_prediction_cache(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def _has_prediction_cache() -> bool:
    try:
        from freshnet.model import predictions  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- parent


def child(*args: str) -> dict | None:
    cmd = [sys.executable, __file__, "--child", *args]
    env = {**os.environ, "FRESHNET_CACHE": str(Path(args[2]) / "cache")}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} {args[1]} failed:\n{proc.stderr[-4000:]}")
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def main() -> None:
    results = {}
    setup = {}
    with tempfile.TemporaryDirectory(prefix="freshnet-night-") as tmp_s:
        tmp = Path(tmp_s)
        t = time.perf_counter()
        new_dir, pool, model = prepare_inputs(tmp)
        print(f"inputs and tiny model ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        for n in (FLOOR_N, *SIZES):
            root = tmp / f"n{n}"
            root.mkdir()
            t = time.perf_counter()
            child("setup", str(n), str(root), str(new_dir), str(pool), str(model))
            setup[n] = time.perf_counter() - t
            os.sync()  # the state's gigabytes reach the disk now, not while the night is timed
            print(f"N={n}: state built in {setup[n]:.0f} s; running the night", file=sys.stderr)
            results[n] = child("night", str(n), str(root), str(new_dir))
            print(f"N={n}: night {results[n]['total']:.1f} s", file=sys.stderr)
            shutil.rmtree(root)

    small, big, base = results[SIZES[0]], results[SIZES[-1]], results[FLOOR_N]
    cols = (FLOOR_N, *SIZES)
    names = list(big["steps"])
    print(
        f"night overhead: {NEW_IMAGES} new real photos ({big['accepted']} accepted) against N "
        f"existing rows, file storage, {os.cpu_count()} CPUs"
    )
    print(f"{'step (s)':36} " + " ".join(f"{'N=' + str(n):>10}" for n in cols) + "   ratio")

    def row(label: str, values: list, fmt: str = ".2f", ratio: bool = False) -> None:
        cells = " ".join(f"{v:>10{fmt}}" for v in values)
        tail = f"   {values[-1] / values[-2]:.2f}x" if ratio and values[-2] else ""
        print(f"{label:36} {cells}{tail}")

    for name in names:
        row(name, [results[n]["steps"][name] for n in cols], ratio=True)
    growth = big["total"] / small["total"]
    row("total", [results[n]["total"] for n in cols], ratio=True)
    for name in big["forward"]:
        row(f"  of which {name}", [results[n]["forward"][name] for n in cols])
    print("  (model forward passes on tonight's images: the same work at every N)")
    floor = {n: sum(r["forward"].values()) for n, r in results.items()}
    rest = {n: r["total"] - floor[n] for n, r in results.items()}
    row("total minus model forward", [rest[n] for n in cols])
    row(f"above the N={FLOOR_N} night", [results[n]["total"] - base["total"] for n in cols])
    row("peak RSS of the night (MB)", [results[n]["peak_rss_mb"] for n in cols], ".0f")
    row("ingest, not counted (s)", [results[n]["ingest_s"] for n in cols])
    row("holdout rows evaluated", [results[n]["holdout"] for n in cols], "")
    row("catalog rows after the night", [results[n]["catalog_rows"] for n in cols], "")
    print(f"curation at N={SIZES[-1]}: {json.dumps(big['curation'])}")
    if not big["prediction_cache"]:
        print(
            "NOTE: no prediction cache in freshnet.model.evaluate: the champion scored every holdout row"
        )
    print(f"state setup (not counted): {', '.join(f'N={n} {s:.0f} s' for n, s in setup.items())}")
    figures = [
        {
            "benchmark": "night_overhead_100k",
            "unit": "s",
            "ours": round(big["total"], 2),
            "baseline": None,
            "goal": "ours < 30 and peak_rss_mb < 2048",
            "peak_rss_mb": round(big["peak_rss_mb"]),
            "steps": {k: round(v, 2) for k, v in big["steps"].items()},
            "prediction_cache": big["prediction_cache"],
            "model_forward_s": round(floor[SIZES[-1]], 2),
            "without_model_forward_s": round(rest[SIZES[-1]], 2),
            "floor_s": round(base["total"], 2),
            "above_floor_s": round(big["total"] - base["total"], 2),
        },
        {
            "benchmark": "night_overhead_floor",
            "unit": "s",
            "ours": round(base["total"], 2),
            "baseline": None,
            "goal": f"measured: the same night against {FLOOR_N} catalog rows",
            "model_forward_s": round(floor[FLOOR_N], 2),
            "steps": {k: round(v, 2) for k, v in base["steps"].items()},
        },
        {
            "benchmark": "night_overhead_growth",
            "unit": "ratio",
            "ours": round(growth, 2),
            "baseline": None,
            "goal": "ours <= 3",
            "night_10k_s": round(small["total"], 2),
            "night_100k_s": round(big["total"], 2),
            "peak_rss_mb_10k": round(small["peak_rss_mb"]),
            "without_model_forward": round(rest[SIZES[-1]] / rest[SIZES[0]], 2),
        },
    ]
    for f in figures:
        print(json.dumps(f))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "setup":
            n, root, new_dir, pool, model = rest
            build_state(int(n), Path(root), Path(new_dir), Path(pool), Path(model))
        else:
            n, root, new_dir = rest
            profile = os.environ.get("NIGHT_OVERHEAD_PROFILE")  # a folder: one cProfile per N
            if profile:
                import cProfile

                with cProfile.Profile() as prof:
                    out = run_night(int(n), Path(root), Path(new_dir))
                prof.dump_stats(str(Path(profile) / f"night-{n}.prof"))
            else:
                out = run_night(int(n), Path(root), Path(new_dir))
            print(json.dumps(out))
    else:
        main()
