"""One pydantic model for the whole config: a TOML file plus FRESHNET_* environment overrides."""

from __future__ import annotations

import difflib
import json
import os
import string
import tomllib
import typing
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

ENV_PREFIX = "FRESHNET_"

# FRESHNET_* variables that are not config keys: read with os.environ by storage, the app, the
# flows, the worker scripts, tests and benchmarks. Every other FRESHNET_* name must be a config
# key (a mistyped override is an error, not silently ignored), so a new variable read anywhere
# in the project must be added here (tests/test_config.py checks that).
NON_CONFIG_ENV = frozenset(
    {
        "FRESHNET_ALLOW_WEIGHT_DOWNLOAD",  # freshnet/model/train.py: may download pretrained weights
        "FRESHNET_APP_DIR",  # freshnet/space/publish.py: the app folder pushed to the Space
        "FRESHNET_BENCH_MODEL",  # benchmarks/app_latency.py
        "FRESHNET_CACHE",  # freshnet/cycle.py: local cache folder
        "FRESHNET_COMPILE",  # app/app.py
        "FRESHNET_CONCURRENCY",  # app/app.py
        "FRESHNET_FEEDBACK",  # app/app.py: feedback sink
        "FRESHNET_FEEDBACK_EVERY_MIN",  # app/app.py: how often the Hub sink commits
        "FRESHNET_FEEDBACK_REPO",  # app/app.py: the feedback dataset repo
        "FRESHNET_FEEDBACK_TOKEN",  # app/app.py, freshnet/data/feedback.py: that dataset's token
        "FRESHNET_GIT_URL",  # prefect.yaml pull step (infra/README.md)
        "FRESHNET_MAX_DECODE_MB",  # app/app.py
        "FRESHNET_MAX_PIXELS",  # app/app.py
        "FRESHNET_MAX_UPLOAD_MB",  # app/app.py
        "FRESHNET_NOTIFY_WEBHOOK_URL",  # infra/bootstrap.py
        "FRESHNET_PROJECT_DIR",  # prefect.yaml, infra/worker.sh
        "FRESHNET_QUEUE_SIZE",  # app/app.py
        "FRESHNET_S3_ADDRESSING_STYLE",  # freshnet/storage.py
        "FRESHNET_S3_ENDPOINT_URL",  # freshnet/storage.py
        "FRESHNET_S3_MAX_ATTEMPTS",  # freshnet/storage.py
        "FRESHNET_S3_PUBLIC_ENDPOINT_URL",  # freshnet/storage.py: presigned URLs for browsers
        "FRESHNET_S3_REGION",  # freshnet/storage.py
        "FRESHNET_S3_TIMEOUT_S",  # freshnet/storage.py
        "FRESHNET_SHARED_DATA",  # tests and benchmarks: the shared photo folder
        "FRESHNET_SPACE_TEST_MODEL",  # tests/model_helpers.py
        "FRESHNET_TORCH_THREADS",  # app/app.py
        "FRESHNET_UPLOAD_TTL_S",  # app/app.py
        "FRESHNET_VENV",  # infra/worker.sh, infra/Dockerfile.gpu-worker
        "FRESHNET_WEBHOOK_URL",  # flows/hooks.py: failure notifications
        "FRESHNET_WORKER_NAME",  # infra/worker.sh
    }
)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key, the value and what is allowed."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default. inf and nan are
    # never a sensible timeout, threshold or rate, and would pass every ge/le bound check.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
    # The night's search breaker (DuckDuckGo blocks for minutes after a burst of searches): on a
    # rate-limit answer, or an empty first page for a query that had results on an earlier
    # night, all searching pauses this long, then resumes where it stopped.
    cooldown_s: float = Field(900.0, ge=0)
    search_budget_s: float = Field(3600.0, gt=0)  # wall time the night's search may take
    search_budget_calls: int = Field(300, ge=1)  # ddgs calls per night, retries included
    # The night's calls are spread over this long (pause_s at least between two), not fired
    # back to back; 0 = only pause_s.
    search_spread_s: float = Field(300.0, ge=0)
    # Passed to DDGS(proxy=...); None = ddgs reads DDGS_PROXY. No credentials here (the config
    # is a Prefect parameter): a proxy with user:password goes in DDGS_PROXY.
    proxy: str | None = None
    # demo: images per query and night served by the local image web
    demo_per_query: int = Field(40, ge=1, le=1000)
    demo_seed: int = 0
    demo_port: int = Field(0, ge=0, le=65535)  # 0 = a free port

    @field_validator("proxy")
    @classmethod
    def _proxy_without_credentials(cls, v: str | None) -> str | None:
        if not v:
            return None
        if "://" not in v:
            raise ValueError("must be a URL such as http://host:3128 or socks5://host:1080")
        if "@" in v.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError(
                "must not carry credentials (the config is a Prefect parameter); "
                "set DDGS_PROXY in the worker's environment instead"
            )
        return v

    @model_validator(mode="after")
    def _spread_within_budget(self) -> SourceConfig:
        if self.search_spread_s > self.search_budget_s:
            raise ValueError(
                f"source.search_spread_s ({self.search_spread_s:g}) must not exceed "
                f"source.search_budget_s ({self.search_budget_s:g})"
            )
        return self


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
    # Memory one image may need to decode, by bytes per pixel of its mode (a 16-bit or RGBA
    # image under max_pixels can still need gigabytes).
    max_decode_mb: int = Field(256, ge=16, le=16_384)
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
    # nearest neighbours verified by aligned thumbnails (freshnet/data/copies.py says how the
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
    # A night whose yield collapses ends Failed (named Degraded; its results are kept) and
    # notifies: more than this share of its searches failed, or of its downloads were rejected.
    max_failed_searches: float = Field(0.5, ge=0, le=1)
    max_rejected_downloads: float = Field(0.5, ge=0, le=1)


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
    # Earlier images cross-validated per night; past it a per-night sample of this many (whole
    # near-duplicate groups, per class): the refit grows with rows (149 s at 50k, 15 s at 10k).
    max_rows: int = Field(20_000, ge=100)


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
    # None: 0 on CPU; on CUDA min(8, cores) for loader "files", 2 for "cache" (it only copies rows)
    num_workers: int | None = Field(None, ge=0, le=64)
    freeze_bn: bool = True  # body BatchNorm keeps pretrained statistics (small data, small batches)
    # "cache": images decoded and resized once into a memory-mapped uint8 cache (extended each
    # night), augmentation on the batch on the training device; "files": decode every epoch.
    loader: Literal["cache", "files"] = "cache"
    cache_margin: float = Field(1.15, ge=1.0, le=2.0)  # cached side / image_size, for random crops


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
    # The Prefect Secret block infra/bootstrap.py creates; HF_TOKEN is used when it does not exist.
    hf_token_secret: str | None = "hf-token"
    serve_port: int = Field(7860, ge=1, le=65535)  # `freshnet serve` / `make app`
    serve_poll_s: float = Field(2.0, gt=0)  # how often `freshnet serve` looks for a new commit
    # The app's corrections through the Hub (issue 16): "hf://datasets/<owner>/<name>" or
    # "<owner>/<name>", a dataset repo the owner creates. The app commits to it with
    # huggingface_hub's CommitScheduler (its token: the Space secret FRESHNET_FEEDBACK_TOKEN, write
    # access to this dataset only); the nightly reads it with FRESHNET_FEEDBACK_TOKEN or the
    # Prefect Secret block below (read access to this dataset is enough). None: feedback_dir only.
    feedback_repo: str | None = None
    feedback_token_secret: str | None = "hf-feedback-token"
    feedback_every_min: float = Field(5.0, gt=0)  # the app commits its corrections this often

    @field_validator("feedback_repo")
    @classmethod
    def _dataset_repo(cls, v: str | None) -> str | None:
        if not v:
            return None
        bare = v.removeprefix("hf://datasets/").strip("/")
        parts = bare.split("/")
        if v.startswith("hf://") and not v.startswith("hf://datasets/") or len(parts) != 2:
            raise ValueError(
                f"{v!r} is not a dataset repo: use 'hf://datasets/<owner>/<name>' or '<owner>/<name>'"
            )
        allowed = set(string.ascii_letters + string.digits + "._-")
        if not all(p and len(p) <= 96 and set(p) <= allowed and p[0] not in "._-" for p in parts):
            raise ValueError(f"{v!r}: owner and name may hold letters, digits, '.', '_' and '-'")
        return f"hf://datasets/{bare}"


class FeedbackConfig(_Section):
    """The app's corrections (space.feedback_dir): bounded intake, reviewed before training."""

    max_per_night: int = Field(200, ge=0, le=100_000)  # records read per night; 0 = none
    # Accepted feedback is at most this share of each class's train and of its holdout rows.
    max_share: float = Field(0.1, ge=0, le=1)
    max_record_bytes: int = Field(16_384, ge=512, le=1_000_000)  # one record's JSON
    max_image_bytes: int = Field(10_000_000, ge=1024, le=100_000_000)


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
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)

    @field_validator("classes")
    @classmethod
    def _classes_distinct(cls, v: list[str]) -> list[str]:
        # Labels become folder names (folder source, feedback, quarantine, the app's examples):
        # each must be one safe path component, and two labels must not share a folder on a
        # case-insensitive filesystem (macOS, Windows).
        cleaned = [c.strip() for c in v]
        for c in cleaned:
            problem = _label_problem(c)
            if problem:
                raise ValueError(f"class name {c!r} {problem}; {LABEL_RULE}")
        seen: dict[str, str] = {}
        for c in cleaned:
            folded = unicodedata.normalize("NFC", c).casefold()
            if folded in seen:
                raise ValueError(
                    f"class names must be distinct ignoring case, got {seen[folded]!r} and {c!r} "
                    "(they would share one folder)"
                )
            seen[folded] = c
        return cleaned

    @field_validator("queries")
    @classmethod
    def _queries_have_label(cls, v: list[str]) -> list[str]:
        for q in v:
            problem = _template_problem(q)
            if problem:
                raise ValueError(
                    f"query {q!r} {problem}; a query is a template with {{label}} for the class "
                    "name and {{ }} for literal braces, e.g. 'photo {label}'"
                )
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


LABEL_RULE = (
    "allowed: a non-empty name of at most 100 characters without '/', '\\', '..', control "
    "characters or a leading '.'"
)


def _label_problem(label: str) -> str | None:
    """Why ``label`` cannot be a folder name (None when it can)."""
    if not label:
        return "is empty"
    if len(label) > 100:
        return "is longer than 100 characters"
    if "/" in label or "\\" in label:
        return "contains a path separator"
    if ".." in label:
        return "contains '..'"
    if label.startswith("."):
        return "starts with '.' (a hidden folder)"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in label):
        return "contains a control character"
    return None


def _template_problem(query: str) -> str | None:
    """Why ``query`` fails as a search template (None when ``query.format(label=...)`` works)."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(query) if f is not None}
        query.format(label="x")
    except KeyError as exc:
        return f"has an unknown placeholder {{{exc.args[0]}}}"
    except IndexError:
        return "has a positional placeholder ({} or {0})"
    except (ValueError, AttributeError, TypeError) as exc:
        return f"is not a valid template ({exc})"
    odd = sorted(f for f in fields if f != "label")
    if odd:  # {label.upper} or {label[0]} format without error but are never what was meant
        return f"has a placeholder {{{odd[0]}}} (only {{label}} is allowed)"
    if "label" not in fields:
        return "does not contain {label}"
    return None


def _describe(err: ErrorDetails) -> str:
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


def _env_names(model: type[BaseModel], path: tuple[str, ...] = ()) -> list[str]:
    """Every override name the model accepts: one per section and per key."""
    names = []
    for key, field in model.model_fields.items():
        here = (*path, key)
        names.append(ENV_PREFIX + "__".join(here).upper())
        ann = field.annotation
        for t in (ann, *typing.get_args(ann)):
            if isinstance(t, type) and issubclass(t, BaseModel):
                names += _env_names(t, here)
    return names


def config_env_names() -> list[str]:
    """The FRESHNET_<SECTION>__<KEY> names that override config keys."""
    return _env_names(Config)


def apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Apply FRESHNET_SECTION__KEY=value overrides (double underscore separates levels).

    A FRESHNET_* name that is neither a config key nor in NON_CONFIG_ENV is an error naming the
    nearest known name: a mistyped override must not leave the default in place unnoticed.
    """
    known = set(config_env_names())
    unknown = []
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in NON_CONFIG_ENV:
            continue
        if name.upper() not in known:
            unknown.append(name)
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        _set_path(data, path, raw)
    if unknown:
        # Compared without the shared prefix, which would make every name look close.
        n = len(ENV_PREFIX)
        candidates = sorted(c[n:] for c in known | NON_CONFIG_ENV)
        lines = []
        for name in unknown:
            near = difflib.get_close_matches(name[n:].upper(), candidates, n=1, cutoff=0.6)
            hint = f"; did you mean {ENV_PREFIX}{near[0]}?" if near else ""
            lines.append(f"  - {name}: not a config key{hint}")
        raise ConfigError(
            "unknown FRESHNET_* environment variable(s):\n"
            + "\n".join(lines)
            + "\n  config overrides are FRESHNET_<SECTION>__<KEY> (e.g. FRESHNET_TRAIN__EPOCHS);"
            " other FRESHNET_* variables freshnet reads are listed in"
            " freshnet/config.py NON_CONFIG_ENV"
        )
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
