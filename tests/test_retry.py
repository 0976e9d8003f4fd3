"""A retried or rerun night names the same model version, so it reuses a finished training."""

from __future__ import annotations

import time

from freshnet import contest, cycle
from freshnet.config import parse_config


def _cfg(tmp_path, **train):
    return parse_config(
        {"classes": ["a", "b"], "storage": f"file://{tmp_path / 'store'}", "train": train}
    )


def test_every_attempt_at_a_night_names_the_same_version(tmp_path):
    cfg = _cfg(tmp_path)
    first = contest.night_version(cfg, "2026-12-03", "snapA", None)
    time.sleep(1.1)  # versions are time stamps: a regenerated one would differ now
    assert contest.night_version(cfg, "2026-12-03", "snapA", None) == first
    # Anything that changes what would be trained names a new version.
    others = {
        contest.night_version(cfg, "2026-12-03", "snapB", None),
        contest.night_version(cfg, "2026-12-03", "snapA", "models/v1/model.pkl"),
        contest.night_version(_cfg(tmp_path, epochs=7), "2026-12-03", "snapA", None),
    }
    assert first not in others


def test_a_finished_training_is_found_by_its_version(tmp_path):
    cfg = _cfg(tmp_path)
    assert contest.find_train_result(cfg, "v1") is None
    cycle.put_json(cycle.open_store(cfg), "models/v1/result.json", {"model_key": "k"})
    assert contest.find_train_result(cfg, "v1") == {"model_key": "k"}
