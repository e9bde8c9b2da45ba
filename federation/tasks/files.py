"""Reading a partner's own folder of labeled rows: the local data recipe of the built-in classifiers.

The format is plain CSV that any tool writes: one example per line, the feature values and then the
integer class label; blank lines and lines starting with `#` are skipped. Every `*.csv` file in the
folder (sorted by name) is read. The node keeps a seeded 20% of the rows for local validation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from federation.errors import TaskError
from federation.partition import train_val_split
from federation.tasks.api import LabeledArrays, LocalData


def read_labeled_csv(data_dir: Path, features: int) -> LabeledArrays:
    """All rows of every `*.csv` in `data_dir`; each row has `features` numbers and a label."""
    files = sorted(data_dir.glob("*.csv"))
    if not files:
        raise TaskError(f"data-dir {data_dir} holds no *.csv file (rows of {features} features and a label)")
    rows: list[list[float]] = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            cells = line.split(",")
            if len(cells) != features + 1:
                raise TaskError(f"{path.name}, line {number}: {len(cells)} values, expected {features} and a label")
            try:
                rows.append([float(c) for c in cells])
            except ValueError:
                raise TaskError(f"{path.name}, line {number}: a value is not a number") from None
    if not rows:
        raise TaskError(f"data-dir {data_dir}: the *.csv files hold no rows")
    table = np.asarray(rows)
    labels = table[:, -1]
    if (
        not np.all(np.isfinite(labels))
        or not np.all(labels == np.round(labels))
        or labels.min() < 0
        or labels.max() >= 2**31
    ):
        raise TaskError(f"data-dir {data_dir}: the last column must be a non-negative integer class label")
    return LabeledArrays(table[:, :-1].astype(np.float32), labels.astype(np.int64))


def write_labeled_csv(path: Path, data: LabeledArrays) -> Path:
    """Write `data` in the format `read_labeled_csv` reads (for preparing a partner's folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        ",".join([*(f"{v:.9g}" for v in row), str(int(label))])
        for row, label in zip(data.features, data.labels, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def labeled_csv_recipe(features: int, classes: int) -> Callable[[Path], LocalData]:
    """A local data recipe reading `read_labeled_csv(data_dir, features)`, split 80/20 for validation."""

    def local_data(data_dir: Path) -> LocalData:
        rows = read_labeled_csv(data_dir, features)
        if rows.labels.max() >= classes:
            raise TaskError(f"data-dir {data_dir}: label {int(rows.labels.max())} is out of range [0, {classes})")
        if len(rows) < 2:
            raise TaskError(f"data-dir {data_dir}: need at least 2 rows (training and validation)")
        train, val = train_val_split(len(rows), seed=0, node=0)
        return LocalData(rows.subset(train).to_dataset(), rows.subset(val).to_dataset())

    return local_data
