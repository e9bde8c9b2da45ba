"""Built-in task: 8x8 handwritten digits bundled with scikit-learn (1,797 images, no download)."""

from __future__ import annotations

import numpy as np
from torch import nn

from federation.tasks.api import LabeledArrays, Task, TaskData
from federation.tasks.files import labeled_csv_recipe

TEST_FRACTION = 0.2


def make_model() -> nn.Module:
    """A 64-64-10 MLP."""
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def load_data(seed: int) -> TaskData:
    """Pixels scaled to [0, 1]; a seeded, stratified 20% held out as the test set."""
    from sklearn.datasets import load_digits  # imported here: a deployed node reading its own files never needs it

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[: round(TEST_FRACTION * np.sum(y == c))] for c in range(10)]
    )
    mask = np.zeros(len(y), dtype=bool)
    mask[test_idx] = True
    test = LabeledArrays(x[mask], y[mask])
    return TaskData(
        train=LabeledArrays(x[~mask], y[~mask]),
        test=test,
        description=(
            f"digits held-out test split: {len(test)} images (stratified 20%, seed {seed}), never given to any node"
        ),
    )


task = Task(
    name="digits",
    make_model=make_model,
    load_data=load_data,
    local_data=labeled_csv_recipe(features=64, classes=10),
    # Adam suits this MLP better than SGD (docs/BENCHMARKS.md: central vs federated); flags override.
    defaults={"optimizer": "adam", "learning-rate": 0.02, "local-epochs": 5, "batch-size": 32},
)
