"""The config model: the top-level keys and sections, validated with errors naming key and allowed values."""

from __future__ import annotations

import json
import string
import unicodedata
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError, field_validator, model_validator

from freshnet.config_sections import (
    DatasetConfig,
    DedupeConfig,
    DownloadConfig,
    FeedbackConfig,
    ImagesConfig,
    LabelCheckConfig,
    PolicyConfig,
    PrefectConfig,
    Section,
    SourceConfig,
    SpaceConfig,
    TrainConfig,
)

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key, the value and what is allowed."""


class Config(Section):
    """The whole config: a TOML file, one table per section."""

    name: str = Field("freshnet", min_length=1)
    """Name of this classifier."""
    classes: list[str] = Field(min_length=2)
    """Class labels (distinct ignoring case; each becomes a folder name)."""
    queries: list[str] = Field(default_factory=lambda: ["photo {label}"], min_length=1)
    """Search queries, each a template containing `{label}`."""
    storage: str = "file://.freshnet"
    """Where images, snapshots, models and the ledger live: `file://PATH` or `s3://BUCKET/PREFIX`."""
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


def parse_config(data: dict[str, Any], origin: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  - {_describe(e)}" for e in exc.errors())
        raise ConfigError(f"{origin}: invalid config\n{problems}") from None
