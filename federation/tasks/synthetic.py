"""Built-in task: a tiny synthetic 3-class problem (Gaussian blobs), for fast tests."""

from __future__ import annotations

import numpy as np
from torch import nn

from federation.tasks.api import LabeledArrays, Task, TaskData
from federation.tasks.files import labeled_csv_recipe

FEATURES, CLASSES, PER_CLASS = 8, 3, 200


def make_model() -> nn.Module:
    """An 8-16-3 MLP."""
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def load_data(seed: int) -> TaskData:
    """Three well-separated Gaussian blobs; a fixed 20% held out."""
    rng = np.random.default_rng(1234)  # the dataset itself never changes
    centers = rng.normal(0.0, 3.0, size=(CLASSES, FEATURES))
    x = np.concatenate([c + rng.normal(size=(PER_CLASS, FEATURES)) for c in centers]).astype(np.float32)
    y = np.repeat(np.arange(CLASSES), PER_CLASS).astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    n_test = len(y) // 5
    return TaskData(
        train=LabeledArrays(x[n_test:], y[n_test:]),
        test=LabeledArrays(x[:n_test], y[:n_test]),
        description=f"synthetic held-out test split: {n_test} points (seed {seed}), never given to any node",
    )


task = Task(
    name="synthetic",
    make_model=make_model,
    load_data=load_data,
    local_data=labeled_csv_recipe(features=FEATURES, classes=CLASSES),
)
