"""Writing a run's record: atomically, readable by its owner only.

A reader (a resumed coordinator, `weft audit verify`, a partner's auditor) never sees half a file: every
file is written to a temporary name in the same folder, flushed to disk and renamed over the target.
Files are created with mode 0600 and folders with 0700 whatever the process umask, because a record holds
signed updates and envelopes that are the consortium's, not the machine's other users'.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) as owner-only folders; tighten an existing one we own."""
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):  # every folder we create is owner-only, not just the last one
        folder.mkdir(mode=DIR_MODE, exist_ok=True)
        folder.chmod(DIR_MODE)  # mkdir's mode is masked by the umask
    if path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
        path.chmod(DIR_MODE)
    return path


@contextlib.contextmanager
def atomic_file(path: Path, sync: bool = True) -> Iterator[BinaryIO]:
    """A file object whose contents appear at `path` all at once when the block ends (temp file, fsync,
    rename), mode 0600; if the block raises, nothing appears and the temp file is removed.

    `sync=False` leaves out the fsync (the caller syncs later, before anything depends on the file
    surviving a power loss; every reader still sees the whole file or none of it)."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with os.fdopen(fd, "w+b") as fh:
            yield fh
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file, fsync, rename), mode 0600."""
    with atomic_file(path) as fh:
        fh.write(data)


def append_line(path: Path, line: bytes) -> None:
    """Append one line (which must end with a newline) and fsync it; the file is created 0600."""
    if not line.endswith(b"\n") or b"\n" in line[:-1]:
        raise ValueError("append_line takes exactly one line ending with a newline")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    try:
        os.write(fd, line)  # one write(2) of one line: a crash leaves a whole line or a torn last line
        os.fsync(fd)
    finally:
        os.close(fd)


def truncate_to(path: Path, size: int) -> None:
    """Cut `path` back to its first `size` bytes (dropping what a crash left half-written) and fsync."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
