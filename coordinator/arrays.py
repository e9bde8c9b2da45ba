"""Conversions between numpy parameter vectors and Flower ArrayRecords (coordinator side).

A Flower `Array` carries its values as `.npy` bytes (`numpy.save` format). `Array.numpy()` parses them with
`numpy.load`, which copies the whole array. The coordinator reads untrusted replies of many gigabytes, so
`from_record` parses the `.npy` header itself, strictly, and returns read-only `numpy.frombuffer` views of
the received bytes: no copy, and never a pickle. Anything that is not exactly a plain `.npy` array of a
weft dtype (`protocols.digest.DTYPES`) raises `ValueError` (coordinator.verify turns it into `malformed`).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from protocols.digest import DTYPES

NPY_MAGIC = b"\x93NUMPY"
MAX_HEADER_BYTES = 1 << 16
"""A `.npy` header longer than this is refused (numpy writes well under 1 KiB for any real array)."""

_DESCRS = {
    np.dtype(name).newbyteorder("<").str if np.dtype(name).itemsize > 1 else np.dtype(name).str: name for name in DTYPES
}
"""Accepted `descr` strings: little-endian (`<f4` ...) or byte-order-free (`|u1`, `|i1`, `|b1`) -> dtype name."""


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """numpy arrays -> ArrayRecord (keys kept)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> read-only numpy views of the received bytes; ValueError for anything malformed."""
    out: dict[str, np.ndarray] = {}
    for name in record:
        try:
            out[name] = array_view(record[name])
        except ValueError as exc:
            raise ValueError(f"array {name!r}: {exc}") from exc
    return out


def array_view(array: Array) -> np.ndarray:
    """One Flower `Array` as a read-only view of its `.npy` bytes, checked against its declared dtype and shape."""
    if array.stype != "numpy.ndarray":
        raise ValueError(f"unsupported serialization {str(array.stype)[:40]!r}")
    data = array.data
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError("array data is not bytes")
    view = npy_view(data)
    if str(array.dtype) != view.dtype.name:
        raise ValueError(f"declared dtype {str(array.dtype)[:40]!r} differs from the data's {view.dtype.name}")
    if tuple(array.shape) != view.shape:
        raise ValueError(f"declared shape {list(array.shape)[:8]} differs from the data's {list(view.shape)}")
    return view


def npy_header(data: bytes | bytearray | memoryview) -> tuple[np.dtype, tuple[int, ...], int]:
    """Parse a `.npy` header strictly: (dtype, shape, offset of the data); ValueError when it is not one weft reads.

    Versions 1.0 and 2.0 only; `descr` must be a little-endian or byte-order-free dtype of `DTYPES`;
    `fortran_order` must be False; `shape` a tuple of integers >= 0; exactly these three keys.
    """
    raw = memoryview(data)
    if raw.nbytes < 10 or bytes(raw[:6]) != NPY_MAGIC:
        raise ValueError("not .npy data (bad magic)")
    major, minor = raw[6], raw[7]
    if (major, minor) == (1, 0):
        length, start = int.from_bytes(raw[8:10], "little"), 10
    elif (major, minor) == (2, 0):
        if raw.nbytes < 12:
            raise ValueError("truncated .npy header")
        length, start = int.from_bytes(raw[8:12], "little"), 12
    else:
        raise ValueError(f".npy version {major}.{minor} is not supported")
    if length > MAX_HEADER_BYTES or start + length > raw.nbytes:
        raise ValueError("truncated or oversized .npy header")
    try:
        text = bytes(raw[start : start + length]).decode("latin1")
        header = ast.literal_eval(text)  # literals only: no names, calls or pickles
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ValueError("unreadable .npy header") from exc
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise ValueError("the .npy header must hold exactly descr, fortran_order and shape")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(descr, str) or descr not in _DESCRS:
        raise ValueError(f"unsupported .npy dtype {str(descr)[:40]!r}")
    if fortran is not False:
        raise ValueError("Fortran-ordered .npy data is not accepted")
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 64:
        raise ValueError("the .npy shape must be a tuple of integers >= 0")
    return np.dtype(_DESCRS[descr]).newbyteorder("<"), shape, start + length


def npy_view(data: bytes | bytearray | memoryview) -> np.ndarray:
    """A `.npy` byte string as a read-only array view (no copy); ValueError unless the byte count is exact."""
    dtype, shape, offset = npy_header(data)
    count = math.prod(shape)
    size = memoryview(data).nbytes
    if size - offset != count * dtype.itemsize:
        raise ValueError(f".npy data holds {size - offset} bytes, its header declares {count * dtype.itemsize}")
    view = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    view.flags.writeable = False
    return view
