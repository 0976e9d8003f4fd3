"""Config: TOML + FRESHNET_* overrides; bad input names the key, the value and what is allowed."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from freshnet.config import Config, ConfigError, parse_config
from freshnet.config_load import NON_CONFIG_ENV, config_env_names, load_config

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
        "FRESHNET_CACHE": "/not/a/config/key",  # read by freshnet/cycle.py, not the config
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


@pytest.mark.parametrize(
    ("name", "nearest"),
    [
        ("FRESHNET_TRIAN__EPOCHS", "FRESHNET_TRAIN__EPOCHS"),
        ("FRESHNET_TRAIN__EPOCHZ", "FRESHNET_TRAIN__EPOCHS"),
        ("FRESHNET_STORGE", "FRESHNET_STORAGE"),
        ("FRESHNET_WEBHOOK_ULR", "FRESHNET_WEBHOOK_URL"),
    ],
)
def test_unknown_env_name_is_an_error_naming_the_nearest_key(name, nearest):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs/demo.toml", env={name: "5"})
    assert f"{name}: not a config key; did you mean {nearest}?" in str(e.value)


def test_non_config_freshnet_variables_are_allowed():
    cfg = load_config(REPO / "configs/demo.toml", env=dict.fromkeys(NON_CONFIG_ENV, "1"))
    assert cfg.train.epochs == load_config(REPO / "configs/demo.toml", env={}).train.epochs


def test_every_freshnet_variable_in_the_project_is_a_key_or_allowed():
    """A FRESHNET_* variable read anywhere must be listed, or setting it breaks config loading."""
    known = set(config_env_names()) | NON_CONFIG_ENV
    docs = {"FRESHNET_", "FRESHNET_SECTION__KEY"}  # placeholders in docs and messages
    found: dict[str, str] = {}
    for top in ("freshnet", "flows", "tasks", "app", "infra", "benchmarks", "tests", "configs"):
        for path in (REPO / top).rglob("*"):
            if path.suffix not in (".py", ".sh", ".toml", ".yaml", ".md", "") or path.is_dir():
                continue
            if path.name == "test_config.py":
                continue  # the typos tested above
            text = path.read_text(errors="replace")
            for name in re.findall(r"FRESHNET_[A-Z0-9_]*", text):
                found.setdefault(name, str(path.relative_to(REPO)))
    for extra in ("prefect.yaml", "Makefile", "README.md"):
        for name in re.findall(r"FRESHNET_[A-Z0-9_]*", (REPO / extra).read_text()):
            found.setdefault(name, extra)
    missing = {n: where for n, where in found.items() if n not in known | docs}
    assert not missing, f"add these to NON_CONFIG_ENV in freshnet/config_load.py: {missing}"


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("{label} {0}", "positional placeholder"),
        ("photo {nope} {label}", "unknown placeholder {nope}"),
        ("photo {label", "not a valid template"),
        ("photo {label}}", "not a valid template"),
        ("photo {label.upper}", "only {label} is allowed"),
        ("photo", "does not contain {label}"),
    ],
)
def test_query_templates_are_validated_by_formatting(tmp_path, query, why):
    p = _write(
        tmp_path,
        f'classes = ["a", "b"]\nqueries = ["photo {{label}}", {query!r}]\n'.replace("'", '"'),
    )
    with pytest.raises(ConfigError) as e:
        load_config(p, env={})
    msg = str(e.value)
    assert "queries:" in msg and repr(query) in msg and why in msg


def test_query_templates_that_format_are_accepted():
    cfg = parse_config({"classes": ["a", "b"], "queries": ["{label}", "{{literal}} {label!s} pup"]})
    assert cfg.queries[1].format(label="corgi") == "{literal} corgi pup"


def _float_keys(model: type[BaseModel], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    keys = []
    for name, field in model.model_fields.items():
        args = (field.annotation, *typing.get_args(field.annotation))
        if float in args:
            keys.append((*path, name))
        for t in args:
            if isinstance(t, type) and issubclass(t, BaseModel):
                keys += _float_keys(t, (*path, name))
    return keys


def test_non_finite_numbers_rejected_for_every_float_field():
    keys = _float_keys(Config)
    assert ("download", "total_timeout_s") in keys and len(keys) > 20
    for key in keys:
        for bad in (math.inf, -math.inf, math.nan):
            data: dict = {"classes": ["a", "b"]}
            node = data
            for part in key[:-1]:
                node = node.setdefault(part, {})
            node[key[-1]] = bad
            with pytest.raises(ConfigError, match=re.escape(".".join(key))):
                parse_config(data)


def test_non_finite_numbers_rejected_from_toml_and_env(tmp_path):
    p = _write(tmp_path, 'classes = ["a", "b"]\n[download]\ntotal_timeout_s = inf\n')
    with pytest.raises(ConfigError, match="download.total_timeout_s.*finite"):
        load_config(p, env={})
    with pytest.raises(ConfigError, match="policy.canary_latency_s.*finite"):
        load_config(REPO / "configs/demo.toml", env={"FRESHNET_POLICY__CANARY_LATENCY_S": "nan"})


@pytest.mark.parametrize(
    ("classes", "why"),
    [
        (["a/b", "c"], "path separator"),
        (["../x", "c"], "path separator"),
        (["a\\b", "c"], "path separator"),
        (["x..y", "c"], "'..'"),
        ([".hidden", "c"], "starts with '.'"),
        (["..", "c"], "'..'"),
        (["tab\there", "c"], "control character"),
        (["nul\x00", "c"], "control character"),
        (["   ", "c"], "is empty"),
        (["x" * 101, "c"], "longer than 100"),
        (["A", "b", "a"], "distinct ignoring case"),
        (["Corgi", "CORGI"], "distinct ignoring case"),
    ],
)
def test_class_labels_must_be_safe_distinct_folder_names(classes, why):
    with pytest.raises(ConfigError) as e:
        parse_config({"classes": classes})
    msg = str(e.value)
    assert "classes:" in msg and why in msg
    if "distinct" not in why:
        assert "allowed:" in msg


def test_ordinary_class_labels_accepted():
    names = ["siberian husky", "St. Bernard", "shih-tzu (toy)", "café", "柴犬"]
    assert parse_config({"classes": [f"  {n} " for n in names]}).classes == names
