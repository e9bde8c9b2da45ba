"""The canonical digest of a parameter vector (a named set of arrays).

    digest = BLAKE3-256( b"weft/params/v2\\x00"
                      || u32 count
                      || for each array, in ascending order of its name's UTF-8 bytes:
                           text name || text dtype || u32 ndim || u64 dim... || u64 nbytes
                           || the array's bytes, C order, little-endian )

`text` is u32 length + UTF-8 (protocols.encoding). `dtype` is one of `DTYPES`. The digest
depends on names, dtypes, shapes and values, never on insertion order or host byte order.

Version 2 hashes with BLAKE3 (docs/decisions/0010-blake3-parameter-digest.md): SHA-256 alone ran slower than a
whole unverified aggregation. Large inputs are hashed on several threads; BLAKE3's output does not depend on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import blake3
import numpy as np

from protocols.encoding import Writer

PARAMS_DOMAIN = b"weft/params/v2\x00"

_THREADED_BYTES = 1 << 21  # from an array this large on, BLAKE3 hashes on every core (same result)

DTYPES = frozenset({"bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"})
"""The dtypes a parameter vector may hold (numpy names)."""

MAX_NAME_BYTES = 512


@dataclass(frozen=True)
class ArraySpec:
    """What must match, per array, between a global model and an update."""

    dtype: str
    """Numpy dtype name, one of `DTYPES`."""
    shape: tuple[int, ...]
    """Array shape."""

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


def structure(arrays: Mapping[str, np.ndarray]) -> dict[str, ArraySpec]:
    """Name -> (dtype, shape) of a parameter vector."""
    return {name: ArraySpec(a.dtype.name, tuple(int(d) for d in a.shape)) for name, a in arrays.items()}


def params_digest(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The 32-byte canonical digest of `arrays`; raises ValueError for unsupported contents."""
    names = sorted(arrays, key=lambda n: n.encode("utf-8"))
    # threads pay off only for large `update` calls: many small arrays hash faster on one core
    largest = max((int(np.asarray(arrays[name]).nbytes) for name in names), default=0)
    h = blake3.blake3(PARAMS_DOMAIN, max_threads=blake3.blake3.AUTO if largest >= _THREADED_BYTES else 1)
    h.update(Writer().u32(len(names)).getvalue())
    for name in names:
        array = np.asarray(arrays[name])
        _check(name, array)
        le = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        header = Writer().text(name).text(array.dtype.name).u32(array.ndim)
        for dim in array.shape:
            header.u64(dim)
        header.u64(le.nbytes)
        h.update(header.getvalue())
        h.update(memoryview(le.reshape(-1)).cast("B"))  # type: ignore[arg-type]
    return h.digest()


def _check(name: str, array: np.ndarray) -> None:
    if not isinstance(name, str):
        raise ValueError(f"array names must be text, got {type(name).__name__}")
    if not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"array name {name!r} must be non-empty text of at most 512 bytes")
    if array.dtype.name not in DTYPES:
        raise ValueError(f"array {name!r} has unsupported dtype {array.dtype.name}")
