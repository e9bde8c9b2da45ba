"""An example classification task with its own optimizer: scikit-learn's bundled wine data.

178 samples, 13 features, 3 classes. The task prefers AdamW with weight decay and a cosine
learning-rate schedule; a user's flags (`--optimizer sgd`, `--learning-rate ...`) still override it.

Run it from the repository root (so that `examples` is importable):
    weft simulate --task examples.wine_task:task --nodes 4 --iid --rounds 20
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_wine
from torch import nn

from federation.tasks import LabeledArrays, Task, TaskData


def make_model() -> nn.Module:
    """A small MLP: 13 standardised features -> 3 classes."""
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 3))


def load_data(seed: int) -> TaskData:
    """Standardised features; a seeded 25% held out for the coordinator's evaluation."""
    x, y = load_wine(return_X_y=True)
    x = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = len(y) // 4
    test, train = order[:n_test], order[n_test:]
    return TaskData(
        train=LabeledArrays(x[train], y[train].astype(np.int64)),
        test=LabeledArrays(x[test], y[test].astype(np.int64)),
        description=f"wine held-out split: {n_test} samples (seed {seed})",
    )


task = Task(
    name="wine",
    make_model=make_model,
    load_data=load_data,
    defaults={
        "optimizer": "adamw",
        "learning-rate": 0.01,
        "weight-decay": 0.01,
        "lr-schedule": "cosine",
        "local-epochs": 2,
        "batch-size": 16,
    },
)
