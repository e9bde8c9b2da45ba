"""A task's training recipe: loss, metrics, how a batch is fed, and optionally a whole train step.

Everything here is plain PyTorch, passed in by the task and never baked into the model (docs/TASKS.md).
The defaults are classification: cross-entropy and accuracy over `(features, labels)` batches.

The node reports, for every metric `m` the recipe declares, `train_m` and `eval_m`; nothing else
leaves the node (node/egress.py), so the recipe's names are also the node's default metric allowlist.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

PHASES = ("train", "eval", "personal")
"""Prefixes of reported metrics: after local training, on a global model, after personalization."""

Batch = Any
"""Whatever the task's DataLoader yields: `(features, labels)` by default, a token tensor for language models."""

Forward = Callable[[nn.Module, Batch, torch.device], tuple[torch.Tensor, torch.Tensor]]
"""`(model, batch, device) -> (outputs, targets)`, both on `device`; one row of `targets` per example counted."""

BatchMetric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`(outputs, targets) -> mean over the batch` (a 0-d tensor; it stays on the device)."""

Derived = Callable[[Mapping[str, float]], float]
"""Computes a metric from the averaged ones, e.g. perplexity = exp(loss)."""


def classification_forward(model: nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x, y) -> (model(x), y)`, moved to `device` without a host sync."""
    x, y = batch
    return model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Share of rows whose arg-max output is the target class."""
    return (outputs.argmax(dim=-1) == targets).float().mean()


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits `outputs` against class indices `targets`."""
    return nn.functional.cross_entropy(outputs.float(), targets)


def perplexity(values: Mapping[str, float]) -> float:
    """exp(mean token cross-entropy), capped to stay finite."""
    return math.exp(min(values["loss"], 700.0))


def bits_per_byte(values: Mapping[str, float]) -> float:
    """Mean cross-entropy in bits, for a byte-level tokenizer (one token per byte)."""
    return values["loss"] / math.log(2)


@dataclass(frozen=True)
class StepContext:
    """What a task's own `train_step` gets besides the model and the batch."""

    optimizer: torch.optim.Optimizer
    device: torch.device
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    forward: Forward
    autocast: Callable[[], Any]
    """A context manager factory: mixed precision on CUDA, a no-op on CPU."""


TrainStep = Callable[[nn.Module, Batch, StepContext], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""`(model, batch, ctx) -> (loss, outputs, targets)` after the optimizer step (outputs/targets for metrics)."""

OptimizerFactory = Callable[[Iterable[nn.Parameter], Any], torch.optim.Optimizer]
"""`(trainable parameters, node.TrainConfig) -> optimizer`, for a task that needs its own."""


@dataclass(frozen=True)
class Recipe:
    """How a node trains and evaluates a task's model. All fields have classification defaults."""

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy
    """`(outputs, targets) -> mean loss` (a 0-d tensor)."""
    metrics: Mapping[str, BatchMetric] = field(default_factory=lambda: {"accuracy": accuracy})
    """Per-batch means, averaged over examples. `loss` is always reported too."""
    derived: Mapping[str, Derived] = field(default_factory=dict)
    """Metrics computed from the averaged ones (e.g. `perplexity` from `loss`)."""
    forward: Forward = classification_forward
    """Feeds one batch to the model."""
    train_step: TrainStep | None = None
    """A whole step of the task's own (forward, backward, optimizer step); rarely needed."""
    make_optimizer: OptimizerFactory | None = None
    """The task's own optimizer; when None, the run config's `optimizer` (sgd, adam, adamw) is used."""
    target: str = "accuracy"
    """The metric that names the best round."""
    maximize: bool = True
    """Whether a higher `target` is better (accuracy) or a lower one (loss, perplexity)."""

    def __post_init__(self) -> None:
        names = self.metric_names()
        if len(names) != 1 + len(self.metrics) + len(self.derived):
            raise ValueError(f"metric names must be distinct and not 'loss': {sorted(names)}")
        if self.target not in names:
            raise ValueError(f"target metric {self.target!r} is not one of {sorted(names)}")
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))
        object.__setattr__(self, "derived", MappingProxyType(dict(self.derived)))

    def metric_names(self) -> frozenset[str]:
        """Every metric this recipe reports (without the train_/eval_ prefix)."""
        return frozenset({"loss", *self.metrics, *self.derived})

    def allowlist(self) -> frozenset[str]:
        """The metric names a node running this recipe may send: `train_*`, `eval_*` and `personal_*` of each.

        `personal_*` are the node's validation metrics after its local personalization phase.
        """
        return frozenset(f"{phase}_{name}" for phase in PHASES for name in self.metric_names())


CLASSIFICATION = Recipe()
"""Cross-entropy and accuracy: the recipe of every task that does not bring its own."""
