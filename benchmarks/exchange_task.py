"""A weft task whose model is almost all one big parameter, for the exchange benchmark (benchmarks/exchange.py).

The model is `bulk` (one float32 vector) plus a tiny linear head on 8 features; the logits add the first
3 entries of `bulk`, so one optimizer step changes the whole vector (SGD writes the dense gradient) while
training costs next to nothing. What remains of a round is what the benchmark measures: sending the
signed model, the node's signing of its update, the coordinator's verification, storage and aggregation.

The size is in the attribute name: `benchmarks.exchange_task:task_<P>` is a task of `P` float32
parameters in all (`task_250000000` is the 1 GB model). A node reads no files: its `data-dir` may be
empty. There is no simulation data recipe, so the coordinator evaluates nothing centrally.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from federation.tasks import LocalData, Task

FEATURES, CLASSES, EXAMPLES = 8, 3, 16
HEAD = FEATURES * CLASSES + CLASSES  # parameters of the head


class Bulk(nn.Module):
    """`bulk` (params - HEAD float32 entries) and a linear head; only bulk[:CLASSES] enters the logits."""

    def __init__(self, params: int) -> None:
        super().__init__()
        if params <= HEAD + CLASSES:
            raise ValueError(f"params must exceed {HEAD + CLASSES}")
        self.bulk = nn.Parameter(torch.zeros(params - HEAD))
        gen = torch.Generator().manual_seed(0)
        self.head = nn.Linear(FEATURES, CLASSES)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(CLASSES, FEATURES, generator=gen) * 0.1)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: the head's, shifted by the first entries of bulk."""
        out: torch.Tensor = self.head(x) + self.bulk[:CLASSES]
        return out


def local_data(data_dir: Path) -> LocalData:
    """A few fixed examples; the partner's folder is not read."""
    del data_dir
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(EXAMPLES, FEATURES, generator=gen)
    y = torch.randint(0, CLASSES, (EXAMPLES,), generator=gen)
    data = TensorDataset(x, y)
    return LocalData(train=data, val=data)


def make_task(params: int) -> Task:
    """The exchange task with `params` float32 parameters in all."""
    return Task(
        name="exchange",
        make_model=lambda: Bulk(params),
        local_data=local_data,
        defaults={
            "optimizer": "sgd",
            "momentum": 0.0,  # no momentum buffer: one more model-sized tensor on each node otherwise
            "learning-rate": 0.01,
            "local-epochs": 1,
            "max-steps": 1,
            "batch-size": EXAMPLES,
        },
    )


def __getattr__(name: str) -> Task:
    """`task_<P>`: the exchange task of P parameters (so a run's `task` key carries the size)."""
    match = re.fullmatch(r"task_(\d+)", name)
    if match is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return make_task(int(match.group(1)))
