"""Render README.md's config table from the pydantic config model (`make docs` rewrites it).

usage: tools/config_table.py [--check]   (--check: exit 1 when README.md's table is stale)
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from freshnet.config import Config

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- config-table:begin (generated from freshnet/config*.py by `make docs`) -->"
END = "<!-- config-table:end -->"


def _section(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def fields(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every config key as ("section.key", its field), in declaration order, sections expanded."""
    for name, field in model.model_fields.items():
        sub = _section(field.annotation)
        if sub is None:
            yield prefix + name, field
    for name, field in model.model_fields.items():
        sub = _section(field.annotation)
        if sub is not None:
            yield from fields(sub, f"{prefix}{name}.")


def _toml(value: Any) -> str:
    """A default as it is written in the TOML file."""
    return "`" + json.dumps(value) + "`"


def default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return _toml(field.default_factory())
    if field.default is PydanticUndefined:
        return "required"
    if field.default is None:
        return "unset"
    return _toml(field.default)


def _kind(t: Any) -> str:
    if typing.get_origin(t) is Literal:
        return ", ".join(_toml(v) for v in typing.get_args(t))
    if t is bool:
        return "`true`, `false`"
    if typing.get_origin(t) is list:
        return f"list of {_kind(typing.get_args(t)[0])}"
    return {int: "integer", float: "number", str: "text"}.get(t, getattr(t, "__name__", str(t)))


def allowed(field: FieldInfo) -> str:
    """The type, its bounds and, for optional keys, that they may be left out."""
    t = field.annotation
    optional = False
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        optional = len(args) < len(typing.get_args(t))
        text = " or ".join(_kind(a) for a in args)
    else:
        text = _kind(t)
    bounds = []
    for m in field.metadata:
        for cls, sign, attr in ((Ge, "≥", "ge"), (Gt, ">", "gt"), (Le, "≤", "le"), (Lt, "<", "lt")):
            if isinstance(m, cls):
                bounds.append(f"{sign} {getattr(m, attr):g}")
        if isinstance(m, MinLen):
            many = typing.get_origin(t) is list
            bounds.append(f"at least {m.min_length} items" if many else "not empty")
    if bounds:
        text += ", " + ", ".join(bounds)
    return text + (", or unset" if optional else "")


def render() -> str:
    """The markdown table, one row per key."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for key, field in fields():
        cells = [
            f"`{key}`",
            default(field),
            allowed(field),
            " ".join((field.description or "").split()),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def with_table(readme: str, table: str) -> str:
    """``readme`` with the text between the markers replaced by ``table``."""
    head, sep, rest = readme.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise ValueError(f"README.md: the markers {BEGIN!r} and {END!r} are missing")
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when README.md is stale")
    args = ap.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    new = with_table(text, render())
    if new == text:
        return 0
    if args.check:
        print("README.md's config table is out of date: run `make docs`", file=sys.stderr)
        return 1
    README.write_text(new, encoding="utf-8")
    print("README.md: config table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
