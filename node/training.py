"""Local training and evaluation in plain PyTorch.

The federation machinery never touches the model: these functions take an ordinary `nn.Module`,
`Dataset` (map-style or iterable) and the task's `Recipe`, and return plain numbers. On CUDA they
train with automatic mixed precision (bfloat16 where supported, else float16 with a gradient
scaler), load batches through pinned memory, and keep running sums on the device so the loop never
waits on the host; on CPU they run in float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from node.recipe import CLASSIFICATION, Recipe, StepContext
from node.wireform import WireForm, from_wire
from protocols import ConfigValue
from protocols.payload import PAYLOADS

OPTIMIZERS = ("sgd", "adam", "adamw")
"""Optimizers a run can name; a task may bring its own instead (`Recipe.make_optimizer`)."""

PAYLOAD_KINDS = PAYLOADS
"""What a node can send: weights, delta-fp16, delta-int8, delta-int4 (protocols/payload.py decodes each at the
coordinator and in the audit)."""


@dataclass(frozen=True)
class TrainConfig(WireForm):
    """What the coordinator asks a node to do in one round (carried in the signed global envelope)."""

    local_epochs: int = 1
    """Passes over the node's training split per round."""
    max_steps: int = 0
    """Cap on optimizer steps per round (0: no cap): bounds a round on a large local dataset."""
    optimizer: str = "sgd"
    """sgd (with momentum), adam or adamw."""
    learning_rate: float = 0.05
    """Learning rate of this round (the coordinator applies the run's schedule)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """L2 penalty (sgd, adam) or decoupled weight decay (adamw)."""
    beta1: float = 0.9
    """Adam/AdamW first-moment decay."""
    beta2: float = 0.999
    """Adam/AdamW second-moment decay."""
    grad_clip: float = 0.0
    """Clip the gradient norm to this value (0: off)."""
    batch_size: int = 32
    """Mini-batch size."""
    seed: int = 0
    """Run seed; mixed with the round and the node's own seed for shuffling."""
    payload: str = "weights"
    """What the node sends back: its weights, or its signed change as delta-fp16, delta-int8 or delta-int4."""
    error_feedback: int = 1
    """1: carry the rounding error of a compressed delta into the node's next update; 0: drop it."""

    def __post_init__(self) -> None:
        _check(self.local_epochs >= 1, "local-epochs must be >= 1")
        _check(self.max_steps >= 0, "max-steps must be >= 0")
        _check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        _check(math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning-rate must be a positive number")
        _check(0 <= self.momentum < 1, "momentum must be in [0, 1)")
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight-decay must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        _check(math.isfinite(self.grad_clip) and self.grad_clip >= 0, "grad-clip must be >= 0")
        _check(self.batch_size >= 1, "batch-size must be >= 1")
        _check(0 <= self.seed < 2**63, "seed must be a non-negative integer")
        _check(self.payload in PAYLOAD_KINDS, f"payload must be one of {', '.join(PAYLOAD_KINDS)}")
        _check(self.error_feedback in (0, 1), "error-feedback must be 0 or 1")

    @classmethod
    def from_config(cls, config: Mapping[str, ConfigValue]) -> TrainConfig:
        """Parse the wire form; unknown or mistyped keys raise ValueError naming the key."""
        unknown = set(config) - cls.keys()
        if unknown:
            raise ValueError(f"unknown training instruction(s): {sorted(unknown)}")
        return from_wire(cls, config)


def _check(ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(problem)


@dataclass(frozen=True)
class Stats:
    """Example-weighted means of the recipe's metrics over `num_examples` examples."""

    metrics: Mapping[str, float]
    """`loss`, each recipe metric, and each derived metric."""
    num_examples: int

    @property
    def loss(self) -> float:
        """Mean loss."""
        return self.metrics["loss"]

    @property
    def accuracy(self) -> float:
        """Mean accuracy (classification recipes)."""
        return self.metrics["accuracy"]

    def prefixed(self, phase: str) -> dict[str, float]:
        """`{phase_name: value}`, e.g. `train_loss`."""
        return {f"{phase}_{name}": value for name, value in self.metrics.items()}


def pick_device(preference: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cpu` / `cuda[:N]` are taken as given."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} requested but CUDA is not available")
    return device


def make_optimizer(params: Iterable[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `config.optimizer` names, over `params`."""
    params = list(params)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
        )
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.learning_rate, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay)


def train_local(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    device: torch.device,
    seed: int,
    recipe: Recipe = CLASSIFICATION,
) -> Stats:
    """Train `model` in place for `config.local_epochs` (at most `config.max_steps` steps); return mean stats.

    Only parameters with `requires_grad` are optimised: frozen ones (a LoRA base) stay as they are.
    The returned `num_examples` is the size of the local training set (the FedAvg weight), not
    examples x epochs; for an iterable dataset, the examples seen in the first epoch.
    """
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    factory = recipe.make_optimizer or make_optimizer
    optimizer = factory(trainable, config)
    torch.manual_seed(seed)
    loader = _loader(data, config.batch_size, device, shuffle_seed=seed)
    amp_dtype = _amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    ctx = StepContext(optimizer, device, recipe.loss, recipe.forward, partial(_autocast, device, amp_dtype))
    totals = _Totals(recipe, device)
    steps, first_epoch_examples = 0, None
    for _epoch in range(config.local_epochs):
        for batch in loader:
            if recipe.train_step is not None:
                loss, outputs, targets = recipe.train_step(model, batch, ctx)
            else:
                loss, outputs, targets = _step(model, batch, ctx, scaler, trainable, config.grad_clip)
            totals.add(loss, outputs, targets)
            steps += 1
            if config.max_steps and steps >= config.max_steps:
                break
        if first_epoch_examples is None:
            first_epoch_examples = totals.count()
        if config.max_steps and steps >= config.max_steps:
            break
    model.to("cpu")
    stats = totals.stats()
    size = len(data) if not isinstance(data, IterableDataset) else first_epoch_examples  # type: ignore[arg-type]
    return Stats(stats.metrics, num_examples=int(size or 0))


def _step(
    model: nn.Module,
    batch: Any,
    ctx: StepContext,
    scaler: torch.amp.GradScaler | None,
    trainable: list[nn.Parameter],
    grad_clip: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ordinary step: forward under autocast, backward, clip, optimizer step."""
    ctx.optimizer.zero_grad(set_to_none=True)
    with ctx.autocast():
        outputs, targets = ctx.forward(model, batch, ctx.device)
        loss = ctx.loss(outputs, targets)
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(ctx.optimizer)
            nn.utils.clip_grad_norm_(trainable, grad_clip)
        scaler.step(ctx.optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(trainable, grad_clip)
        ctx.optimizer.step()
    return loss, outputs, targets


@torch.no_grad()
def evaluate_local(
    model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 256, recipe: Recipe = CLASSIFICATION
) -> Stats:
    """Example-weighted mean loss and metrics of `model` on `data`."""
    model.to(device).eval()
    totals = _Totals(recipe, device)
    amp_dtype = _amp_dtype(device)
    for batch in _loader(data, batch_size, device, shuffle_seed=None):
        with _autocast(device, amp_dtype):
            outputs, targets = recipe.forward(model, batch, device)
            loss = recipe.loss(outputs, targets)
        totals.add(loss, outputs, targets)
    model.to("cpu")
    return totals.stats()


def _loader(data: Dataset, batch_size: int, device: torch.device, shuffle_seed: int | None) -> DataLoader:
    """Batches of `data`; map-style data is shuffled with a seeded generator when `shuffle_seed` is set."""
    shuffle = shuffle_seed is not None and not isinstance(data, IterableDataset)
    generator = torch.Generator().manual_seed(shuffle_seed) if shuffle and shuffle_seed is not None else None
    return DataLoader(
        data, batch_size=batch_size, shuffle=shuffle, generator=generator, pin_memory=device.type == "cuda"
    )


class _Totals:
    """Running example-weighted sums of loss and metrics, kept on the device (no per-batch host sync)."""

    def __init__(self, recipe: Recipe, device: torch.device) -> None:
        self.recipe = recipe
        self.sums: dict[str, torch.Tensor] = {}
        self.n = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        batch = targets.shape[0]
        values = {"loss": loss.detach()}
        with torch.no_grad():
            for name, metric in self.recipe.metrics.items():
                values[name] = metric(outputs.detach(), targets)
        for name, value in values.items():
            term = value.double() * batch
            self.sums[name] = self.sums[name] + term if name in self.sums else term
        self.n += batch

    def count(self) -> int:
        return int(self.n.item())

    def stats(self) -> Stats:
        n = max(self.count(), 1)
        means = {name: float(total.item()) / n for name, total in self.sums.items()}
        if not means:  # no batch at all: report NaN-free zeros for every declared name
            means = dict.fromkeys(["loss", *self.recipe.metrics], 0.0)
        for name, fn in self.recipe.derived.items():
            means[name] = float(fn(means))
        return Stats(means, num_examples=self.count())


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
