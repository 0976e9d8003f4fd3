"""The label check's nightly work is bounded by label_check.max_rows (issue 15).

Real storage, catalog, embedding cache, scikit-learn and cleanlab; the embeddings are synthetic
(class centres plus noise) so the tests stay fast without a backbone.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from freshnet import cycle
from freshnet.config import Config
from freshnet.data import catalog, dedupe, embed, embed_cache, labels
from freshnet.storage_file import FileStorage

CLASSES = ["a", "b", "c"]


def _cfg(tmp_path, **label_check) -> Config:
    return Config.model_validate(
        {"storage": f"file://{tmp_path / 'store'}", "classes": CLASSES, "label_check": label_check}
    )


def _sha(i: int) -> str:
    return f"{i:064x}"


def _catalog(store, n_old: int, n_new: int, seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """n_old earlier rows over two nights and n_new rows of night "3", in groups of 1-3 images;
    every 25th row's label is flipped. Returns (catalog, flipped new shas)."""
    rng = np.random.default_rng(seed)
    n = n_old + n_new
    true = rng.integers(0, len(CLASSES), n)
    label = true.copy()
    flip = np.arange(n) % 25 == 7
    label[flip] = (true[flip] + 1) % len(CLASSES)
    group = np.cumsum(rng.random(n) < 0.6)  # consecutive rows share a group
    first = np.where(np.arange(n) < n_old, np.where(np.arange(n) < n_old // 2, "1", "2"), "3")
    shas = [_sha(i) for i in range(n)]
    df = pd.DataFrame(
        {
            "sha256": shas,
            "orig_sha256": "",
            "label": [CLASSES[c] for c in label],
            "url": [f"http://x/{i}.jpg" for i in range(n)],
            "query": "q",
            "source": "duckduckgo",
            "phash": "0" * 16,
            "group": [f"g{g:06d}" for g in group],
            "split": "train",
            "first_seen": first,
            "status": "ok",
            "note": "",
            "dhash": "0" * 16,
            "width": 400,
            "height": 300,
        }
    )
    # The near-duplicate index the catalog must stay in step with (hashes unused here).
    zero = np.zeros(n, np.uint64)
    key = "index/segments/000001-test.npz"
    dedupe.write_segment(store, key, zero, zero, np.ones(n, bool), dedupe.tags_of(shas))
    state = catalog.CatalogState(catalog.empty_catalog(), dedupe.HashIndex(), 0, None, {})
    catalog.commit(store, state, df, [key], "test catalog")
    # The embedding cache as curation leaves it: every image embedded.
    centres = rng.standard_normal((len(CLASSES), embed.DIM))
    e = centres[true] + 0.6 * rng.standard_normal((n, embed.DIM))
    e = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)
    thumb, hw = np.zeros((embed.THUMB, embed.THUMB), np.uint8), np.array([64, 64])
    key = f"{embed_cache.PREFIX}0000-test.npz"
    store.put(key, embed_cache._encode(shas, [(e[i], thumb, hw) for i in range(n)]))
    store.swap_pointer(embed_cache.POINTER, json.dumps({"segments": [key]}).encode(), None)
    new_flipped = [shas[i] for i in np.flatnonzero(flip) if i >= n_old]
    return df, new_flipped


@pytest.fixture
def spies(monkeypatch):
    """Records what the logistic regression is fitted on and which rows the check judged."""
    seen = {"fit_rows": [], "judged": [], "embedded": []}
    logistic, oos, ensure = (
        labels._logistic,
        labels.out_of_sample_probs,
        embed_cache.ensure_embeddings,
    )

    def spy_logistic(x_train, y_train, x_test, k):
        seen["fit_rows"].append(len(x_train))
        return logistic(x_train, y_train, x_test, k)

    def spy_oos(features, labs, groups, is_new, *args, **kwargs):
        out = oos(features, labs, groups, is_new, *args, **kwargs)
        seen["judged"].append((np.asarray(is_new), out[1], list(groups)))
        return out

    def spy_ensure(store, shas, *args, **kwargs):
        seen["embedded"].append(list(shas))
        return ensure(store, shas, *args, **kwargs)

    monkeypatch.setattr(labels, "_logistic", spy_logistic)
    monkeypatch.setattr(labels, "out_of_sample_probs", spy_oos)
    monkeypatch.setattr(embed_cache, "ensure_embeddings", spy_ensure)
    return seen


def test_below_the_bound_the_check_is_the_full_check_of_every_row(tmp_path, spies):
    store = FileStorage(tmp_path / "store")
    df, _ = _catalog(store, 200, 30)
    cfg = _cfg(tmp_path, max_rows=200)  # exactly the earlier rows: no sampling
    check = cycle.label_check_step(cfg, "3")
    # What the check did before max_rows existed: every row, cross-validated and judged.
    lc = cfg.label_check
    e = embed_cache.assemble(df["sha256"].tolist(), embed_cache.load_cache(store)[0]).emb
    is_new = (df["first_seen"] == "3").to_numpy()
    lab = df["label"].tolist()
    probs, judged, sources, _ = labels.out_of_sample_probs(
        e, lab, df["group"].tolist(), is_new, CLASSES, lc.folds, lc.seed
    )
    issues, _ = labels.find_issues(
        df["sha256"].tolist(), lab, probs, judged, CLASSES, lc.filter_by,
        lc.max_flag_fraction, lc.chance_fraction,
    )  # fmt: skip
    assert check["issues"] == issues and issues
    assert check["checked"] == len(df) and check["sources"] == sources
    assert not any("sampled" in n for n in check["notes"])


def test_above_the_bound_fits_are_bounded_and_every_new_row_is_judged(tmp_path, spies):
    store = FileStorage(tmp_path / "store")
    _catalog(store, 600, 30)
    check = cycle.label_check_step(_cfg(tmp_path, max_rows=150), "3")
    # Only the sample and tonight's rows were read from the cache and fitted on.
    assert len(spies["embedded"][0]) <= 150 + 30
    assert max(spies["fit_rows"]) <= 150 + 30
    is_new, judged, _ = spies["judged"][0]
    assert is_new.sum() == 30 and judged[is_new].all()
    sampled = int((~is_new).sum())
    assert 130 <= sampled <= 150  # whole groups: a little under the bound, never over
    assert f"{sampled} of 600 earlier images sampled (label_check.max_rows=150)" in (
        " ".join(check["notes"])
    )
    assert check["checked"] == sampled + 30


def test_each_night_samples_other_earlier_rows(tmp_path, spies):
    store = FileStorage(tmp_path / "store")
    df, _ = _catalog(store, 600, 30)
    cycle.label_check_step(_cfg(tmp_path, max_rows=150), "3")
    is_new = (df["first_seen"] == "3").to_numpy()
    lab, group = df["label"], df["group"]
    # The night's sample is the one its seed draws: a rerun of the night draws it again.
    tonight = labels.sample_earlier(lab, group, is_new, 150, labels.night_seed(0, "3"))[0]
    assert set(df["sha256"][tonight]) == set(spies["embedded"][0])
    # Another night's seed draws mostly other earlier rows (~150 of 600 each).
    other = labels.sample_earlier(lab, group, is_new, 150, labels.night_seed(0, "4"))[0]
    assert (tonight & other & ~is_new).sum() < 100 < (tonight != other).sum()


def test_sample_keeps_groups_whole_classes_in_proportion_and_small_classes_whole():
    rng = np.random.default_rng(1)
    sizes = {"big": 6000, "mid": 3000, "tiny": 40}
    lab = np.repeat(list(sizes), list(sizes.values()))
    n = len(lab)
    group = np.array([f"{lab[i]}{g}" for i, g in enumerate(np.cumsum(rng.random(n) < 0.5))])
    is_new = rng.random(n) < 0.02
    keep, note = labels.sample_earlier(lab, group, is_new, 2000, seed=5)
    old = ~is_new
    assert keep[is_new].all()
    assert 1900 <= (keep & old).sum() <= 2000
    assert note.startswith(f"{(keep & old).sum()} of {old.sum()} earlier images sampled")
    kept = pd.Series(keep[old]).groupby(group[old]).agg(["min", "max"])
    assert (kept["min"] == kept["max"]).all()  # a group is in or out, never split
    assert keep[old & (lab == "tiny")].all()
    share = {c: (keep & old & (lab == c)).sum() / (old & (lab == c)).sum() for c in sizes}
    assert abs(share["big"] - share["mid"]) < 0.03
    # Over nights every earlier row is judged: 20 nights at a ~21% sample cover nearly all.
    seen = np.zeros(n, bool)
    for night in range(20):
        seen |= labels.sample_earlier(lab, group, is_new, 2000, labels.night_seed(0, str(night)))[0]
    assert seen.mean() > 0.98
    # At or under the bound nothing is left out.
    keep, note = labels.sample_earlier(lab, group, is_new, int(old.sum()), seed=5)
    assert keep.all() and note is None
