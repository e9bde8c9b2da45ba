"""An example task that reads a partner's own folder of files: regression on sensor readings.

Each partner keeps its readings as JSON lines in its node's `data-dir` (never sent anywhere):

    {"features": [0.1, -1.2, 0.7, 0.0, 2.1, -0.3], "target": 1.25}

The model is trained with mean squared error and reports mean absolute error too. For researchers,
`simulation_data` generates readings from 8 sites whose sensors are calibrated differently, with the
site as the owner key, so `--partition natural` gives each node whole sites.

    weft simulate --task examples.sensor_task:task --nodes 4 --partition natural --rounds 15
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from federation.tasks import LocalData, SimulationData, Task
from node import Recipe

FEATURES, SITES, PER_SITE = 6, 8, 150
TRUE_WEIGHTS = np.linspace(-1.0, 1.0, FEATURES)


def make_model() -> nn.Module:
    """A small MLP: 6 readings -> 1 predicted value."""
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, 1))


def as_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    """(float32 readings, float32 targets) pairs."""
    return TensorDataset(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32)))


def local_data(data_dir: Path) -> LocalData:
    """Every `*.jsonl` file in the partner's folder; the last 20% of rows validate."""
    x, y = [], []
    for path in sorted(data_dir.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                x.append(row["features"])
                y.append(row["target"])
    if len(y) < 5:
        raise ValueError(f"found {len(y)} readings in *.jsonl files; need at least 5")
    cut = int(0.8 * len(y))
    xs, ys = np.asarray(x), np.asarray(y)
    return LocalData(train=as_dataset(xs[:cut], ys[:cut]), val=as_dataset(xs[cut:], ys[cut:]))


def simulation_data(seed: int) -> SimulationData:
    """Readings from 8 differently calibrated sites; a seeded 20% of every site held out."""
    rng = np.random.default_rng(1234)  # the data never changes; the seed only picks the held-out rows
    x = rng.normal(size=(SITES * PER_SITE, FEATURES))
    offsets = np.repeat(rng.normal(0.0, 0.5, size=SITES), PER_SITE)  # each site's calibration offset
    y = np.tanh(x @ TRUE_WEIGHTS) + offsets + rng.normal(0.0, 0.05, size=len(x))
    sites = np.repeat([f"site-{s}" for s in range(SITES)], PER_SITE)
    test = np.random.default_rng(seed).random(len(y)) < 0.2
    return SimulationData(
        pool=as_dataset(x[~test], y[~test]),
        test=as_dataset(x[test], y[test]),
        description=f"sensor held-out readings: {int(test.sum())} rows from all {SITES} sites (seed {seed})",
        owners=sites[~test].tolist(),
    )


def forward(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A regression batch: predictions of shape (n,) against targets of shape (n,)."""
    x, y = batch
    return model(x.to(device)).squeeze(-1), y.to(device)


task = Task(
    name="sensors",
    make_model=make_model,
    simulation_data=simulation_data,
    local_data=local_data,
    recipe=Recipe(
        loss=nn.functional.mse_loss,
        metrics={"mae": lambda pred, target: (pred - target).abs().mean()},
        forward=forward,
        target="loss",
        maximize=False,
    ),
    defaults={"optimizer": "adam", "learning-rate": 0.005, "local-epochs": 2, "rounds": 15},
)
