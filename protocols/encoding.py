"""Canonical binary encoding for every signed weft structure.

One value has exactly one encoding, so a signature over the bytes is a signature over the value.
The rules (docs/PROTOCOL.md, "Canonical encoding"):

- integers are unsigned big-endian of a fixed width (u8, u32, u64) or signed i64 (two's complement);
- floats are IEEE-754 binary64, big-endian, and must be finite;
- text is u32 length + UTF-8 bytes; blobs are u32 length + bytes; digests are 32 raw bytes;
- maps are u32 count + entries sorted by the key's UTF-8 bytes, keys unique.

`Reader` is strict: reading past the end, invalid UTF-8, unsorted or duplicate map keys, non-finite
floats, unknown value tags and trailing bytes all raise `DecodeError`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

from protocols.errors import DecodeError

MAX_TEXT_BYTES = 4096
MAX_BLOB_BYTES = 1 << 20
MAX_MAP_ENTRIES = 1024

ConfigValue = int | float | str
"""Value types allowed in a signed config map: tagged `i` (i64), `f` (f64) or `s` (text)."""


class Writer:
    """Append-only builder of canonical bytes."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> Writer:
        """Append one unsigned byte."""
        self._parts.append(_pack(">B", value, "u8"))
        return self

    def u32(self, value: int) -> Writer:
        """Append an unsigned 32-bit big-endian integer."""
        self._parts.append(_pack(">I", value, "u32"))
        return self

    def u64(self, value: int) -> Writer:
        """Append an unsigned 64-bit big-endian integer."""
        self._parts.append(_pack(">Q", value, "u64"))
        return self

    def i64(self, value: int) -> Writer:
        """Append a signed 64-bit big-endian integer."""
        self._parts.append(_pack(">q", value, "i64"))
        return self

    def f64(self, value: float) -> Writer:
        """Append a finite IEEE-754 binary64, big-endian."""
        if not math.isfinite(value):
            raise ValueError(f"only finite floats can be encoded, got {value!r}")
        self._parts.append(struct.pack(">d", float(value)))
        return self

    def text(self, value: str) -> Writer:
        """Append u32 length + UTF-8 bytes."""
        raw = value.encode("utf-8")
        if len(raw) > MAX_TEXT_BYTES:
            raise ValueError(f"text longer than {MAX_TEXT_BYTES} bytes")
        return self.u32(len(raw)).raw(raw)

    def blob(self, value: bytes) -> Writer:
        """Append u32 length + bytes."""
        if len(value) > MAX_BLOB_BYTES:
            raise ValueError(f"blob longer than {MAX_BLOB_BYTES} bytes")
        return self.u32(len(value)).raw(value)

    def digest(self, value: bytes) -> Writer:
        """Append a 32-byte digest, raw."""
        if len(value) != 32:
            raise ValueError(f"a digest is 32 bytes, got {len(value)}")
        return self.raw(value)

    def metrics(self, values: Mapping[str, float]) -> Writer:
        """Append a map of text -> f64, sorted by key."""
        keys = _sorted_keys(values)
        self.u32(len(keys))
        for key in keys:
            self.text(key).f64(values[key])
        return self

    def config(self, values: Mapping[str, ConfigValue]) -> Writer:
        """Append a map of text -> tagged value (`i` i64, `f` f64, `s` text), sorted by key."""
        keys = _sorted_keys(values)
        self.u32(len(keys))
        for key in keys:
            self.text(key)
            value = values[key]
            if isinstance(value, bool):
                raise ValueError(f"config value {key!r}: booleans are not allowed, use 0/1")
            if isinstance(value, int):
                self.raw(b"i").i64(value)
            elif isinstance(value, float):
                self.raw(b"f").f64(value)
            elif isinstance(value, str):
                self.raw(b"s").text(value)
            else:
                raise ValueError(f"config value {key!r} has unsupported type {type(value).__name__}")
        return self

    def raw(self, value: bytes) -> Writer:
        """Append bytes as they are (no length prefix)."""
        self._parts.append(bytes(value))
        return self

    def getvalue(self) -> bytes:
        """Return everything appended so far."""
        return b"".join(self._parts)


class Reader:
    """Strict reader of canonical bytes; every failure raises `DecodeError`."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(bytes(data))
        self._pos = 0

    def take(self, n: int) -> bytes:
        """Read exactly `n` raw bytes."""
        if n < 0 or self._pos + n > len(self._data):
            raise DecodeError(f"truncated: wanted {n} bytes at offset {self._pos}")
        out = self._data[self._pos : self._pos + n].tobytes()
        self._pos += n
        return out

    def u8(self) -> int:
        """Read one unsigned byte."""
        return int(struct.unpack(">B", self.take(1))[0])

    def u32(self) -> int:
        """Read an unsigned 32-bit big-endian integer."""
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        """Read an unsigned 64-bit big-endian integer."""
        return int(struct.unpack(">Q", self.take(8))[0])

    def i64(self) -> int:
        """Read a signed 64-bit big-endian integer."""
        return int(struct.unpack(">q", self.take(8))[0])

    def f64(self) -> float:
        """Read a finite binary64."""
        value = float(struct.unpack(">d", self.take(8))[0])
        if not math.isfinite(value):
            raise DecodeError("non-finite float")
        return value

    def text(self) -> str:
        """Read u32 length + UTF-8."""
        n = self.u32()
        if n > MAX_TEXT_BYTES:
            raise DecodeError(f"text of {n} bytes exceeds {MAX_TEXT_BYTES}")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("text is not valid UTF-8") from exc

    def blob(self) -> bytes:
        """Read u32 length + bytes."""
        n = self.u32()
        if n > MAX_BLOB_BYTES:
            raise DecodeError(f"blob of {n} bytes exceeds {MAX_BLOB_BYTES}")
        return self.take(n)

    def digest(self) -> bytes:
        """Read a 32-byte digest."""
        return self.take(32)

    def metrics(self) -> dict[str, float]:
        """Read a sorted text -> f64 map."""
        out: dict[str, float] = {}
        for _ in range(self._count()):
            key = self._next_key(out)
            out[key] = self.f64()
        return out

    def config(self) -> dict[str, ConfigValue]:
        """Read a sorted text -> tagged-value map."""
        out: dict[str, ConfigValue] = {}
        for _ in range(self._count()):
            key = self._next_key(out)
            tag = self.take(1)
            if tag == b"i":
                out[key] = self.i64()
            elif tag == b"f":
                out[key] = self.f64()
            elif tag == b"s":
                out[key] = self.text()
            else:
                raise DecodeError(f"unknown config value tag {tag!r} for key {key!r}")
        return out

    def finish(self) -> None:
        """Fail unless every byte was consumed."""
        if self._pos != len(self._data):
            raise DecodeError(f"{len(self._data) - self._pos} trailing bytes")

    def _count(self) -> int:
        n = self.u32()
        if n > MAX_MAP_ENTRIES:
            raise DecodeError(f"map of {n} entries exceeds {MAX_MAP_ENTRIES}")
        return n

    def _next_key(self, seen: dict[str, Any]) -> str:
        key = self.text()
        if seen:
            last = next(reversed(seen))
            if key.encode("utf-8") <= last.encode("utf-8"):
                raise DecodeError(f"map keys not strictly sorted at {key!r}")
        return key


def _pack(fmt: str, value: int, name: str) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} needs an int, got {type(value).__name__}")
    try:
        return struct.pack(fmt, value)
    except struct.error as exc:
        raise ValueError(f"{value} does not fit in {name}") from exc


def _sorted_keys(values: Mapping[str, object]) -> list[str]:
    keys = sorted(values, key=lambda k: k.encode("utf-8"))
    for key in keys:
        if not isinstance(key, str) or not key:
            raise ValueError(f"map keys must be non-empty text, got {key!r}")
    return keys
