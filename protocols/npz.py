"""Writing named arrays as an uncompressed `.npz` archive, for any array name.

`numpy.savez(file, **arrays)` cannot store an array named `file`; this writes the zip entries
directly (the same format `numpy.load` reads), atomically via a temporary file and rename.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write `arrays` to `path` (temp file + rename, so readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(array), allow_pickle=False)
    tmp.replace(path)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Read every array of an `.npz` archive, never unpickling."""
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}
