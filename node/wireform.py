"""The wire form of the node's typed instructions: flat kebab-case maps inside the signed envelope config.

`TrainConfig` and `ExchangeSpec` are frozen dataclasses whose fields all have defaults; this module turns
one into its wire map and back, typed by each field's default (int, float or str). A value of the wrong
type raises ValueError naming the key (the node then refuses the instruction, docs/PROTOCOL.md 6.1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

from protocols import ConfigValue

_T = TypeVar("_T")


class WireForm:
    """Mixin for a frozen dataclass of instructions: its wire map and its wire keys."""

    def to_config(self) -> dict[str, ConfigValue]:
        """Wire form (kebab-case keys)."""
        return to_wire(self)

    @classmethod
    def keys(cls) -> frozenset[str]:
        """The wire keys this dataclass reads."""
        return wire_keys(cls)


def to_wire(obj: Any) -> dict[str, ConfigValue]:
    """`{kebab-case field name: value}` of a dataclass instance."""
    return {f.name.replace("_", "-"): getattr(obj, f.name) for f in fields(obj)}


def wire_keys(cls: type[Any]) -> frozenset[str]:
    """The wire keys of a dataclass."""
    return frozenset(f.name.replace("_", "-") for f in fields(cls))


def from_wire(cls: type[_T], config: Mapping[str, ConfigValue]) -> _T:
    """Build `cls` from the keys of `config` it knows (others are the caller's to refuse); strict types."""
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        key = f.name.replace("_", "-")
        if key not in config:
            continue
        value, want = config[key], type(getattr(defaults, f.name))
        if want is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        if want is float and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        if want is str and not isinstance(value, str):
            raise ValueError(f"{key} must be text, got {value!r}")
        kwargs[f.name] = want(value)
    return cls(**kwargs)
