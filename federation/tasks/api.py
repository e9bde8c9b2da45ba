"""The task API: a model recipe and a data recipe, brought by the user in one small file.

A task is a `Task` object referenced by import path (`my_pkg.my_task:task`) or a built-in name
(`digits`, `synthetic`). See docs/TASKS.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from federation.errors import TaskError
from protocols import ID_PATTERN


@dataclass(frozen=True)
class LabeledArrays:
    """Features (float32, first axis = examples) and integer class labels."""

    features: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.features) != len(self.labels):
            raise ValueError(f"{len(self.features)} feature rows but {len(self.labels)} labels")
        if self.labels.ndim != 1 or self.labels.dtype.kind not in "iu":
            raise ValueError("labels must be a 1-D integer array")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> LabeledArrays:
        """The rows at `index`."""
        return LabeledArrays(self.features[index], self.labels[index])

    def to_dataset(self) -> TensorDataset:
        """A torch dataset of (float32 features, int64 labels)."""
        return TensorDataset(
            torch.from_numpy(np.ascontiguousarray(self.features, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(self.labels, dtype=np.int64)),
        )


@dataclass(frozen=True)
class TaskData:
    """A task's data: a training pool that simulation partitions across nodes, and a held-out test set."""

    train: LabeledArrays
    """Partitioned across nodes in simulation."""
    test: LabeledArrays
    """Held out: never given to any node; the coordinator's accuracy is measured on it."""
    description: str
    """One line naming the held-out set (written to summary.json)."""


@dataclass(frozen=True)
class Task:
    """A model recipe and a data recipe for classification with cross-entropy."""

    name: str
    """Short identifier, signed into every global model envelope."""
    make_model: Callable[[], nn.Module]
    """Returns a freshly initialised model whose output is class logits."""
    load_data: Callable[[int], TaskData]
    """Returns the task's data for a seed (the seed fixes the held-out split)."""


def check_task(task: Task, seed: int) -> TaskData:
    """Build the task's model and data once, so a broken task fails at start-up, not inside a run."""
    if not ID_PATTERN.fullmatch(task.name):
        raise TaskError(f"task name {task.name!r} must match {ID_PATTERN.pattern} (it is signed into every model)")
    try:
        model = task.make_model()
    except Exception as exc:
        raise TaskError(f"task {task.name!r}: make_model() failed: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise TaskError(f"task {task.name!r}: make_model() returned a {type(model).__name__}, not an nn.Module")
    for name, tensor in model.state_dict().items():
        if tensor.dtype == torch.bfloat16:
            raise TaskError(f"task {task.name!r}: parameter {name!r} is bfloat16; keep weights in float32")
    try:
        data = task.load_data(seed)
    except Exception as exc:
        raise TaskError(f"task {task.name!r}: load_data({seed}) failed: {exc}") from exc
    if not isinstance(data, TaskData):
        raise TaskError(f"task {task.name!r}: load_data() returned a {type(data).__name__}, not a TaskData")
    return data


def load_task(reference: str) -> Task:
    """Resolve a built-in name or a `module:attr` import path to a Task."""
    from federation.tasks import BUILTIN

    if reference in BUILTIN:
        return BUILTIN[reference]
    if ":" not in reference:
        raise TaskError(
            f"task {reference!r} is neither a built-in ({', '.join(sorted(BUILTIN))}) "
            "nor an import path of the form 'package.module:attribute'"
        )
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise TaskError(f"task {reference!r}: expected 'package.module:attribute' with both parts")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"task {reference!r}: cannot import module {module_name!r} ({exc})") from exc
    task = getattr(module, attr, None)
    if task is None:
        raise TaskError(f"task {reference!r}: module {module_name!r} has no attribute {attr!r}")
    if not isinstance(task, Task):
        raise TaskError(f"task {reference!r} is a {type(task).__name__}, expected federation.tasks.Task")
    return task
