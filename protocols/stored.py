"""Stored updates: each accepted update, exactly as its member signed it, beside the ledger.

`rounds/NNNN/updates/<update digest hex>-<member id>.update` (docs/PROTOCOL.md, section 15, "Stored
updates") holds the member's signed envelope and signature and the update's arrays as raw little-endian
bytes at 64-byte aligned offsets:

    b"weft/stored-update/v1\\x00" || u32 D || directory (D bytes) || zero padding || array data ...

    directory = blob envelope || blob signature || u32 count
                || for each array, in ascending order of its name's UTF-8 bytes:
                     text name || text dtype || u32 ndim || u64 dim... || u64 offset || u64 nbytes

(big-endian integers and `text`/`blob` as in protocols.encoding). The first array starts at the first
multiple of 64 after the directory, each next one at the first multiple of 64 after the previous one's end,
and the file ends where the last array ends: the file's bytes are a function of its contents. Anyone
holding the file can check the signature against the manifest, the arrays against the signed digest, and
recompute the round's aggregate from these files alone.

Writing is one pass of `write(2)` calls over the arrays' own memory (no archive, no CRC: the signed
BLAKE3 digest covers the bytes); reading maps the file and returns `numpy.frombuffer` views, so reading an
array back copies nothing.
"""

from __future__ import annotations

import math
import mmap
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocols.digest import DTYPES, MAX_NAME_BYTES
from protocols.encoding import Reader, Writer
from protocols.envelope import SignedBlob
from protocols.errors import DecodeError
from protocols.files import atomic_file

MAGIC = b"weft/stored-update/v1\x00"
ALIGN = 64
"""Every array's data starts at a multiple of this offset."""
MAX_DIRECTORY_BYTES = 1 << 26
"""A directory longer than this (64 MiB) is refused."""
MAX_NDIM = 64
SUFFIX = ".update"

NAME = re.compile(r"(?P<digest>[0-9a-f]{64})-(?P<member>[0-9a-f]{16})\.update")
_PREFIX = len(MAGIC) + 4
_ZEROS = bytes(ALIGN)
WHOLE_FILE_MAP = 1 << 26
"""Stored updates up to this size (64 MiB) are mapped whole, once; bigger ones one array at a time."""
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
"""Linux: map every page in one call instead of one fault per 4 KiB page."""


def stored_name(update_digest: bytes, member_id: str) -> str:
    """The file name of a stored update."""
    return f"{update_digest.hex()}-{member_id}{SUFFIX}"


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _layout(signed: SignedBlob, arrays: Mapping[str, np.ndarray]) -> tuple[bytes, list[tuple[_Entry, np.ndarray]], int]:
    """(file head incl. magic and directory, entries with their little-endian C-order arrays, file size)."""
    names = sorted(arrays, key=lambda n: n.encode("utf-8"))
    prepared: list[tuple[str, np.ndarray]] = []
    for name in names:
        array = np.asarray(arrays[name])
        if not isinstance(name, str) or not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise ValueError(f"array name {name!r} must be non-empty text of at most {MAX_NAME_BYTES} bytes")
        if array.dtype.name not in DTYPES:
            raise ValueError(f"array {name!r} has unsupported dtype {array.dtype.name}")
        le = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(array.shape)  # keeps 0-d
        prepared.append((name, le))
    # the directory's length does not depend on the offsets (fixed-width u64s): lay it out twice
    head_len = _PREFIX + len(_directory(signed, [(n, a, 0) for n, a in prepared]))
    offset = _aligned(head_len)
    placed: list[tuple[str, np.ndarray, int]] = []
    end = head_len
    for name, array in prepared:
        placed.append((name, array, offset))
        end = offset + array.nbytes
        offset = _aligned(end)
    directory = _directory(signed, placed)
    head = MAGIC + len(directory).to_bytes(4, "big") + directory
    entries = [(_Entry(name, array.dtype, tuple(array.shape), off, array.nbytes), array) for name, array, off in placed]
    return head, entries, end


def _directory(signed: SignedBlob, placed: list[tuple[str, np.ndarray, int]]) -> bytes:
    w = Writer().blob(signed.body).blob(signed.signature).u32(len(placed))
    for name, array, offset in placed:
        w.text(name).text(array.dtype.name).u32(array.ndim)
        for dim in array.shape:
            w.u64(int(dim))
        w.u64(offset).u64(array.nbytes)
    return w.getvalue()


def write_stored_update(path: Path, arrays: Mapping[str, np.ndarray], signed: SignedBlob, sync: bool = True) -> None:
    """Write one update with its member's signed envelope (atomic, owner-only).

    `sync=False` skips the fsync: the file is complete for every reader at once, but not yet durable
    across a power loss; call `sync_files` on it before anything that depends on it is committed.
    """
    head, entries, _ = _layout(signed, arrays)
    with atomic_file(path, sync=sync) as fh:
        fh.write(head)
        position = len(head)
        for entry, array in entries:
            fh.write(_ZEROS[: entry.offset - position])
            if array.nbytes:
                fh.write(memoryview(array.reshape(-1)).cast("B"))  # type: ignore[arg-type]
            position = entry.offset + entry.nbytes


def sync_files(paths: list[Path]) -> None:
    """fsync each file, then each distinct folder holding them (so their renames are durable too)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for folder in sorted({p.parent for p in paths}):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_directory(path: Path) -> tuple[SignedBlob, dict[str, _Entry], int]:
    """Parse and check a stored update's directory: (signed blob, entries by name, file size)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        prefix = fh.read(_PREFIX)
        if len(prefix) != _PREFIX or prefix[: len(MAGIC)] != MAGIC:
            raise DecodeError(f"{path}: not a stored update (bad magic)")
        length = int.from_bytes(prefix[len(MAGIC) :], "big")
        if length > MAX_DIRECTORY_BYTES or _PREFIX + length > size:
            raise DecodeError(f"{path}: truncated or oversized directory")
        raw = fh.read(length)
    if len(raw) != length:
        raise DecodeError(f"{path}: truncated directory")
    r = Reader(raw)
    signed = SignedBlob(r.blob(), r.blob())
    count = r.u32()
    entries: dict[str, _Entry] = {}
    end = offset = _PREFIX + length
    previous: bytes | None = None
    for _ in range(count):
        name = r.text()
        key = name.encode("utf-8")
        if not name or len(key) > MAX_NAME_BYTES or (previous is not None and key <= previous):
            raise DecodeError(f"{path}: array names must be non-empty, at most 512 bytes and strictly ascending")
        previous = key
        dtype_name = r.text()
        if dtype_name not in DTYPES:
            raise DecodeError(f"{path}: array {name!r} has unsupported dtype {dtype_name[:40]!r}")
        ndim = r.u32()
        if ndim > MAX_NDIM:
            raise DecodeError(f"{path}: array {name!r} has {ndim} dimensions")
        shape = tuple(r.u64() for _ in range(ndim))
        at, nbytes = r.u64(), r.u64()
        dtype = np.dtype(dtype_name).newbyteorder("<")
        offset = _aligned(end)
        if at != offset or nbytes != math.prod(shape) * dtype.itemsize:
            raise DecodeError(f"{path}: array {name!r} is not where or as long as its header says")
        end = offset + nbytes
        entries[name] = _Entry(name, dtype, shape, offset, nbytes)
    r.finish()
    if end != size:
        raise DecodeError(f"{path}: the file holds {size} bytes, its directory describes {end}")
    return signed, entries, size


@dataclass(frozen=True)
class StoredUpdate:
    """A stored update on disk, read one array at a time (an `UpdateSource`)."""

    path: Path

    def array(self, name: str) -> np.ndarray:
        """The update's array `name`: a read-only view of the mapped file (KeyError if it has none)."""
        _, entries, _ = self._directory()
        entry = entries[name]
        return self._view(entry)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array of the update (without the signed envelope), as read-only views."""
        _, entries, _ = self._directory()
        return {name: self._view(entry) for name, entry in entries.items()}

    def names(self) -> list[str]:
        """The update's array names, in ascending order of their UTF-8 bytes."""
        return list(self._directory()[1])

    def signed(self) -> SignedBlob:
        """The member's envelope bytes and signature, as received."""
        return self._directory()[0]

    def _directory(self) -> tuple[SignedBlob, dict[str, _Entry], int]:
        cached = self.__dict__.get("_parsed")  # parsed once per object: a fold asks for every array in turn
        if cached is not None:
            return cached
        try:
            parsed = _read_directory(self.path)
        except DecodeError:
            raise
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(f"{self.path}: not a stored update ({type(exc).__name__}: {exc})") from exc
        self.__dict__["_parsed"] = parsed  # a frozen dataclass: its fields stay as they are, this is a cache
        return parsed

    def _view(self, entry: _Entry) -> np.ndarray:
        if entry.nbytes == 0:
            return np.zeros(entry.shape, dtype=entry.dtype)
        size = self._directory()[2]
        if size <= WHOLE_FILE_MAP:  # a small update: map the whole file once, every array is a view of it
            whole = self.__dict__.get("_whole")
            if whole is None:
                with open(self.path, "rb") as fh:
                    whole = mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
                self.__dict__["_whole"] = whole
            count = entry.nbytes // entry.dtype.itemsize
            return np.frombuffer(whole, dtype=entry.dtype, count=count, offset=entry.offset).reshape(entry.shape)
        start = entry.offset - entry.offset % mmap.ALLOCATIONGRANULARITY  # map just this array's pages
        length = entry.offset + entry.nbytes - start
        with open(self.path, "rb") as fh:
            # map just this array, every page at once (_POPULATE)
            mapped = mmap.mmap(
                fh.fileno(), length, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ, offset=start
            )
        count = entry.nbytes // entry.dtype.itemsize  # the map lives as long as the view
        return np.frombuffer(mapped, dtype=entry.dtype, count=count, offset=entry.offset - start).reshape(entry.shape)
