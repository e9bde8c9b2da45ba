"""Command-line flags generated from the settings dataclasses: one generator for every `weft` command.

A field becomes `--field-name`, typed by its annotation (`X | None` takes X; `tuple[X, ...]` repeats), required
when it has no default, documented by its `help` metadata (or a caller's table), with its default shown.
A boolean field that defaults to True becomes `--no-field-name`. Every flag's parsed value is None unless
the user gave it, so the field's default, or a task's preferred value, applies (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, fields
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints


def flag(name: str) -> str:
    """`field_name` -> `--field-name`."""
    return "--" + name.replace("_", "-")


def _kind(hint: Any) -> tuple[Any, bool]:
    """(element type, repeatable) of a field's type hint."""
    if get_origin(hint) in (Union, UnionType):
        hint = next(t for t in get_args(hint) if t is not type(None))
    if get_origin(hint) is tuple:
        return get_args(hint)[0], True
    return hint, False


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type[Any],
    names: Iterable[str] | None = None,
    prefix: str = "",
    help_texts: Mapping[str, str] | None = None,
    aliases: Mapping[str, list[str]] | None = None,
    metavars: Mapping[str, str] | None = None,
) -> None:
    """One flag per field of `cls` (or of `names`), stored as `prefix + field name`."""
    hints, by_name = get_type_hints(cls), {f.name: f for f in fields(cls)}
    for name in names if names is not None else by_name:
        f = by_name[name]
        kind, repeat = _kind(hints[name])
        required = f.default is MISSING and f.default_factory is MISSING
        default = None if required or f.default is MISSING else f.default
        text = (help_texts or {}).get(name) or f.metadata.get("help", "")
        shown = "" if required or repeat else f" (default: {default!r})"
        extra = (aliases or {}).get(name, [])
        if kind is bool:
            negate = default is True  # the flag turns it off
            parser.add_argument("--no-" + flag(name)[2:] if negate else flag(name), *extra, dest=prefix + name,
                                default=None, action="store_const", const=not negate,
                                help=(f"do not {text}" if negate else text) + shown)  # fmt: skip
            continue
        metavar = (metavars or {}).get(name, kind.__name__.upper())
        parser.add_argument(flag(name), *extra, dest=prefix + name, type=kind, required=required, default=None,
                            action="append" if repeat else "store", metavar=metavar, help=text + shown)  # fmt: skip


def given(args: argparse.Namespace, cls: type[Any], prefix: str = "") -> dict[str, Any]:
    """The fields of `cls` the user gave as flags, by field name (repeated flags as tuples)."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        value = getattr(args, prefix + f.name, None)
        if value is not None:
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out
