"""The coordinator's held-out evaluation: the task's own recipe on data no node ever sees.

Used by simulation and deployment alike; the coordinator package only sees a `CentralEval` callable.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from federation.tasks import Task
from node import ExchangeSpec, LocalModel, evaluate_local


class CentralEvaluator:
    """Evaluates a global model's exchanged arrays on the task's held-out test set (CPU)."""

    def __init__(self, task: Task, spec: ExchangeSpec, test: Dataset, batch_size: int = 256) -> None:
        self.task, self.spec, self.test, self.batch_size = task, spec, test, batch_size
        self._local: LocalModel | None = None

    def __call__(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        if self._local is None:  # built on first use: a LoRA base is loaded once per run
            self._local = LocalModel(self.task.make_model, self.spec, self.task.subset)
        self._local.load(arrays)
        stats = evaluate_local(
            self._local.model, self.test, torch.device("cpu"), batch_size=self.batch_size, recipe=self.task.recipe
        )
        return dict(stats.metrics)
