"""Local training and evaluation in plain PyTorch.

The federation machinery never touches the model: these functions take an ordinary `nn.Module`
and `Dataset`, and return plain numbers. On CUDA they train with automatic mixed precision
(bfloat16 where supported, else float16 with a gradient scaler); on CPU in float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from protocols import ConfigValue


@dataclass(frozen=True)
class TrainConfig:
    """What the coordinator asks a node to do in one round (carried in the signed global envelope)."""

    local_epochs: int = 1
    """Passes over the node's training split per round."""
    learning_rate: float = 0.05
    """SGD learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    batch_size: int = 32
    """Mini-batch size."""
    seed: int = 0
    """Run seed; mixed with the round and the node's own seed for shuffling."""

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            raise ValueError("local-epochs must be >= 1")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError("learning-rate must be a positive number")
        if not 0 <= self.momentum < 1:
            raise ValueError("momentum must be in [0, 1)")
        if self.batch_size < 1:
            raise ValueError("batch-size must be >= 1")
        if not 0 <= self.seed < 2**63:
            raise ValueError("seed must be a non-negative integer")

    def to_config(self) -> dict[str, ConfigValue]:
        """Wire form (kebab-case keys)."""
        return {
            "local-epochs": self.local_epochs,
            "learning-rate": self.learning_rate,
            "momentum": self.momentum,
            "batch-size": self.batch_size,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, ConfigValue]) -> TrainConfig:
        """Parse the wire form; unknown or mistyped keys raise ValueError naming the key."""
        known = {"local-epochs", "learning-rate", "momentum", "batch-size", "seed"}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown training instruction(s): {sorted(unknown)}")
        kwargs: dict[str, int | float] = {}
        for key, value in config.items():
            want: type = float if key in {"learning-rate", "momentum"} else int
            if want is int and not isinstance(value, int):
                raise ValueError(f"{key} must be an integer, got {value!r}")
            if want is float and not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number, got {value!r}")
            kwargs[key.replace("-", "_")] = want(value)
        return cls(**kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Stats:
    """Mean loss and accuracy over `num_examples` examples."""

    loss: float
    accuracy: float
    num_examples: int


def pick_device(preference: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cpu` / `cuda[:N]` are taken as given."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} requested but CUDA is not available")
    return device


def train_local(model: nn.Module, data: Dataset, config: TrainConfig, device: torch.device, seed: int) -> Stats:
    """Train `model` in place with SGD for `config.local_epochs`; return mean training stats."""
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=True, generator=generator)
    amp_dtype = _amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    total = _Totals()
    for _epoch in range(config.local_epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, amp_dtype):
                logits = model(x)
                loss = nn.functional.cross_entropy(logits, y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            total.add(loss, logits, y)
    model.to("cpu")
    # The FedAvg weight is the size of the local dataset, not examples x epochs.
    return replace(total.stats(), num_examples=len(data))  # type: ignore[arg-type]


@torch.no_grad()
def evaluate_local(model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 256) -> Stats:
    """Mean cross-entropy loss and accuracy of `model` on `data`."""
    model.to(device).eval()
    total = _Totals()
    for x, y in DataLoader(data, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        with _autocast(device, _amp_dtype(device)):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
        total.add(loss, logits, y)
    model.to("cpu")
    return total.stats()


class _Totals:
    """Running sums for example-weighted mean loss and accuracy."""

    def __init__(self) -> None:
        self.loss, self.correct, self.n = 0.0, 0, 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        batch = int(y.shape[0])
        self.loss += float(loss.detach().float()) * batch
        self.correct += int((logits.argmax(dim=1) == y).sum())
        self.n += batch

    def stats(self) -> Stats:
        n = max(self.n, 1)
        return Stats(loss=self.loss / n, accuracy=self.correct / n, num_examples=self.n)


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
