"""Writing named arrays as an uncompressed `.npz` archive, for any array name.

`numpy.savez(file, **arrays)` cannot store an array named `file`; this writes the zip entries
directly (the same format `numpy.load` reads), atomically via a temporary file, fsync and rename, readable
by its owner only (protocols.files).
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from protocols.errors import DecodeError
from protocols.files import atomic_file


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write `arrays` to `path` (temp file + rename, so readers never see half a file)."""
    with atomic_file(path) as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(array), allow_pickle=False)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Read every array of an `.npz` archive, never unpickling."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except OSError:
        raise  # missing or unreadable file: the caller names it
    except Exception as exc:  # a damaged archive fails in zipfile or numpy in many ways: one error type for all
        raise DecodeError(f"{path} is not a readable .npz archive ({type(exc).__name__}: {exc})") from exc
