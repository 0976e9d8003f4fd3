"""One pydantic model for the whole config: a TOML file plus FRESHNET_* environment overrides."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "FRESHNET_"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key, the value and what is allowed."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(_Section):
    kind: Literal["demo", "urls", "folder", "duckduckgo", "feedback"] = "demo"
    path: str | None = None  # urls: CSV/JSONL file; folder: root with one folder per label
    max_results: int = Field(100, ge=1, le=10_000)  # per query
    # duckduckgo
    region: str = "wt-wt"
    safesearch: Literal["on", "moderate", "off"] = "moderate"
    license_image: str | None = None
    pause_s: float = Field(1.0, ge=0)  # at least this long between two search calls
    max_retries: int = Field(4, ge=0, le=20)
    backoff_s: float = Field(2.0, ge=0)  # first retry delay; doubles per retry, plus jitter
    backoff_max_s: float = Field(60.0, ge=0)
    max_pages: int = Field(5, ge=1, le=100)  # ddgs returns one page per call
    ddgs_backend: str = "auto"
    ddgs_timeout_s: float = Field(10.0, gt=0)
    size: str | None = None  # ddgs image filters: Small, Medium, Large, Wallpaper
    type_image: str | None = None  # photo, clipart, gif, transparent, line
    layout: str | None = None  # Square, Tall, Wide
    color: str | None = None
    # demo: images per query and night served by the local image web
    demo_per_query: int = Field(40, ge=1, le=1000)
    demo_seed: int = 0
    demo_port: int = Field(0, ge=0, le=65535)  # 0 = a free port


class DownloadConfig(_Section):
    concurrency: int = Field(32, ge=1, le=1024)
    per_host: int = Field(4, ge=1, le=256)
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0)
    total_timeout_s: float = Field(30.0, gt=0)
    max_bytes: int = Field(15_000_000, ge=1024)
    max_redirects: int = Field(3, ge=0, le=20)
    # Networks (CIDR) that may be fetched although private/loopback; empty = public only.
    allow_private: list[str] = Field(default_factory=list)
    user_agent: str = "freshnet/0.1 (+https://github.com/freshnet/freshnet)"
    workers: int = Field(0, ge=0, le=64)  # normalizer processes; 0 = one per CPU core


class ImagesConfig(_Section):
    max_side: int = Field(400, ge=32, le=4096)
    min_side: int = Field(64, ge=1)
    max_pixels: int = Field(64_000_000, ge=10_000)  # decompression-bomb cap
    jpeg_quality: int = Field(90, ge=30, le=100)


class DedupeConfig(_Section):
    near: bool = True
    # Hamming bits on the 64-bit pHash. 8 keeps >= 0.95 recall on resize/JPEG q40/5% crop/±10%
    # brightness of the real photos while no two distinct ones are within 10 bits
    # (benchmarks/dedupe.py), and keeps the 1M-hash search cheap (3 bands, radius 2).
    near_threshold: int = Field(8, ge=0, le=32)
    # Second, independent signal: a pHash candidate is a near-duplicate only if the dHash of the
    # stored normalized images is also within this many bits (rejects chance pHash matches at scale).
    confirm_threshold: int = Field(12, ge=0, le=64)
    # When an image has no dHash (its stored bytes were unreadable), only this pHash distance counts.
    unconfirmed_threshold: int = Field(4, ge=0, le=32)
    # Disguised copies (crops, rescales, watermarks, flips), which the pHash misses: embedding
    # nearest neighbours verified by aligned thumbnails (freshnet/copies.py says how the
    # threshold was measured).
    copies: bool = True
    # Nearest embeddings verified per image: a copy's original was always its first or second
    # neighbour (978 real photos); each candidate costs ~1.5 ms of alignment.
    copy_candidates: int = Field(3, ge=1, le=100)
    copy_floor: float = Field(0.5, ge=-1, le=1)  # cosine similarity a candidate needs
    copy_threshold: float = Field(0.77, gt=0, le=1)  # aligned correlation that makes a copy


class DatasetConfig(_Section):
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    split_salt: str = "freshnet"
    min_train_per_class: int = Field(30, ge=1)
    min_holdout_per_class: int = Field(10, ge=1)
    max_imbalance: float = Field(5.0, ge=1)
    min_new_images: int = Field(1, ge=0)  # fewer new images than this: skip training


class LabelCheckConfig(_Section):
    enabled: bool = True
    folds: int = Field(5, ge=2, le=50)  # cross-validation folds on the cached embeddings
    # cleanlab.filter.find_label_issues(filter_by=...): "both" keeps an image only when two of
    # cleanlab's rules agree (measured: higher precision at a small cost in recall).
    filter_by: Literal[
        "prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given"
    ] = "both"
    use_champion: bool = True  # average in the champion's probabilities for tonight's images
    # A flagged label's out-of-sample probability must be below chance_fraction x 1/classes
    # (what a guess gives). Measured on flower photos with 10-20% flips (5 classes): ceiling
    # 0.2 lifted precision 0.78 -> 0.80, 0.1 to 0.86 at recall 0.85 -> 0.84; but without a
    # champion (softer probabilities) half of chance lost true flips: below chance it is.
    chance_fraction: float = Field(1.0, gt=0, le=1)
    max_flag_fraction: float = Field(0.25, gt=0, le=1)  # per class; more means bad queries
    seed: int = 0


class TrainConfig(_Section):
    arch: Literal["efficientnet_lite0", "resnet18", "resnet34", "resnet50"] = "efficientnet_lite0"
    init: Literal["imagenet", "champion", "scratch"] = "imagenet"
    epochs: int = Field(3, ge=1, le=1000)
    freeze_epochs: int = Field(1, ge=0, le=100)
    lr: float | Literal["find"] = 5e-3
    image_size: int = Field(192, ge=32, le=1024)  # photos gain over 160 px; CPU ~1.4x
    batch_size: int = Field(32, ge=1, le=4096)
    resize_method: Literal["squish", "crop", "pad"] = "squish"
    augment: bool = True
    valid_fraction: float = Field(0.1, gt=0, lt=0.5)  # carved out of train, never the holdout
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The old in-sample check (the new model judges its own training labels); off by default:
    # a model has memorized the labels it trained on (benchmarks/web_noise.py measures it).
    in_sample_noise: bool = False
    noise_confidence: float = Field(0.9, gt=0.5, le=1.0)  # its quarantine threshold
    noise_top_loss_fraction: float = Field(0.0, ge=0, le=0.5)  # also list this top-loss tail
    min_scale: float = Field(0.75, gt=0, le=1.0)  # RandomResizedCrop lower bound when augmenting
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: bf16 or fp16 on CUDA
    num_workers: int | None = Field(None, ge=0, le=64)  # None: 0 on CPU, min(8, cores) on CUDA
    freeze_bn: bool = True  # body BatchNorm keeps pretrained statistics (small data, small batches)


class PolicyConfig(_Section):
    accuracy_floor: float = Field(0.80, ge=0, le=1)
    min_improvement: float = Field(0.0, ge=-1, le=1)
    significance: float | None = Field(None, gt=0, lt=1)
    max_recall_drop: float = Field(0.10, ge=0, le=1)
    bootstrap_first: bool = True  # first run promotes when above the floor
    bootstrap_resamples: int = Field(2000, ge=100)
    canary_latency_s: float = Field(5.0, gt=0)


class SpaceConfig(_Section):
    # hf://spaces/<owner>/<name>, a git URL, or a local path (a git repo is created there).
    target: str = ".freshnet/space"
    title: str = "freshnet classifier"
    description: str = ""
    examples_dir: str | None = None  # images shown as examples; default: holdout samples
    wait_running: bool = False  # hf: wait for the Space runtime and send a canary
    feedback_dir: str = ".freshnet/feedback"
    # Added by the space helper:
    wait_timeout_s: float = Field(900.0, gt=0)  # hf: how long to wait for RUNNING
    hf_token_secret: str | None = None  # Prefect Secret block holding the HF token (else HF_TOKEN)
    serve_port: int = Field(7860, ge=1, le=65535)  # `freshnet serve` / `make app`
    serve_poll_s: float = Field(2.0, gt=0)  # how often `freshnet serve` looks for a new commit


class PrefectConfig(_Section):
    timezone: str = "UTC"
    train_deployment: str | None = None  # "train/train": run training there (served mode)
    train_timeout_s: float = Field(3 * 3600, gt=0)


class Config(_Section):
    name: str = Field("freshnet", min_length=1)
    classes: list[str] = Field(min_length=2)
    queries: list[str] = Field(default_factory=lambda: ["photo {label}"], min_length=1)
    storage: str = "file://.freshnet"
    source: SourceConfig = Field(default_factory=SourceConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    label_check: LabelCheckConfig = Field(default_factory=LabelCheckConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    prefect: PrefectConfig = Field(default_factory=PrefectConfig)

    @field_validator("classes")
    @classmethod
    def _classes_distinct(cls, v: list[str]) -> list[str]:
        cleaned = [c.strip() for c in v]
        if any(not c for c in cleaned):
            raise ValueError("class names must not be empty")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError(f"class names must be distinct, got {cleaned}")
        return cleaned

    @field_validator("queries")
    @classmethod
    def _queries_have_label(cls, v: list[str]) -> list[str]:
        for q in v:
            if "{label}" not in q:
                raise ValueError(f"every query must contain '{{label}}', got {q!r}")
        return v

    @field_validator("storage")
    @classmethod
    def _storage_scheme(cls, v: str) -> str:
        if not (v.startswith("file://") or v.startswith("s3://")):
            raise ValueError(f"must start with file:// or s3://, got {v!r}")
        return v

    @model_validator(mode="after")
    def _source_needs_path(self) -> Config:
        if self.source.kind in ("urls", "folder") and not self.source.path:
            raise ValueError(f"source.path is required when source.kind is {self.source.kind!r}")
        return self

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
    msg = err.get("msg", "invalid")
    ctx = err.get("ctx") or {}
    allowed = ctx.get("expected")
    value = err.get("input")
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    text = f"{loc}: {msg} (got {shown})"
    if allowed and str(allowed) not in msg:
        text += f"; allowed: {allowed}"
    return text


def _set_path(data: dict[str, Any], path: list[str], raw: str) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{ENV_PREFIX}{'__'.join(path).upper()}: {part} is not a section")
    # Env values are TOML/JSON literals when they parse as such, plain strings otherwise.
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    node[path[-1]] = value


def apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Apply FRESHNET_SECTION__KEY=value overrides (double underscore separates levels)."""
    sections = set(Config.model_fields)
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if path[0] not in sections:
            continue  # other FRESHNET_* variables (e.g. FRESHNET_HOME) are not config keys
        _set_path(data, path, raw)
    return data


def parse_config(data: dict[str, Any], origin: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  - {_describe(e)}" for e in exc.errors())
        raise ConfigError(f"{origin}: invalid config\n{problems}") from None


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Load a TOML config file and apply FRESHNET_* overrides from ``env`` (default: os.environ)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    data = apply_env(data, os.environ if env is None else env)
    return parse_config(data, str(path))
