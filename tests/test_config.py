"""Config: TOML + FRESHNET_* overrides; bad input names the key, the value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from freshnet.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    demo = load_config(REPO / "configs/demo.toml", env={})
    dogs = load_config(REPO / "configs/dogs.toml", env={})
    assert demo.source.kind == "demo"
    assert dogs.classes == ["siberian husky", "corgi", "pomeranian", "retriever", "samoyed"]
    assert dogs.queries == ["photo {label}", "photo {label} puppy", "photo {label} sleep"]
    assert dogs.source.kind == "duckduckgo"


def test_env_overrides_nested_keys_with_types():
    env = {
        "FRESHNET_TRAIN__EPOCHS": "7",
        "FRESHNET_STORAGE": "s3://bucket/prefix",
        "FRESHNET_DOWNLOAD__ALLOW_PRIVATE": '["10.0.0.0/8"]',
        "FRESHNET_HOME": "/ignored",
    }
    cfg = load_config(REPO / "configs/demo.toml", env=env)
    assert cfg.train.epochs == 7
    assert cfg.storage == "s3://bucket/prefix"
    assert cfg.download.allow_private == ["10.0.0.0/8"]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    return p


def test_bad_enum_names_key_value_and_allowed(tmp_path):
    p = _write(tmp_path, 'classes = ["a", "b"]\n[train]\narch = "vgg16"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p, env={})
    msg = str(e.value)
    assert "train.arch" in msg and "vgg16" in msg and "efficientnet_lite0" in msg and str(p) in msg


def test_unknown_key_and_bad_type_are_errors(tmp_path):
    p = _write(tmp_path, 'classes = ["a", "b"]\n[train]\nepoks = 3\nbatch_size = "big"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p, env={})
    assert "train.epoks" in str(e.value) and "train.batch_size" in str(e.value)


def test_query_without_label_and_duplicate_classes(tmp_path):
    p = _write(tmp_path, 'classes = ["a", "a"]\nqueries = ["photo"]\n')
    with pytest.raises(ConfigError) as e:
        load_config(p, env={})
    assert "classes" in str(e.value) and "queries" in str(e.value)


def test_bad_env_override_names_variable_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs/demo.toml", env={"FRESHNET_POLICY__ACCURACY_FLOOR": "2"})
    assert "policy.accuracy_floor" in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "classes = [\n"), env={})


def test_cli_config_check_exits_nonzero_naming_key(tmp_path):
    p = _write(tmp_path, 'classes = ["a", "b"]\n[source]\nkind = "bing"\n')
    r = subprocess.run(
        [sys.executable, "-m", "freshnet.cli", "config", "check", str(p)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2
    assert "source.kind" in r.stderr and "bing" in r.stderr and "duckduckgo" in r.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "freshnet.cli", "config", "check", "configs/demo.toml"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
