"""Which parameters cross the border: all of them, LoRA adapters over a frozen base, or a task's subset.

The coordinator signs an `ExchangeSpec` into every global model's instructions, together with the
digest of the frozen state (every state entry that is not exchanged). A node builds its model from
the task's recipe and the spec, computes the digest of its own frozen base once, and refuses to
train when it differs from the signed one (docs/PROTOCOL.md, "frozen-digest").

LoRA (arXiv:2106.09685) comes from `peft`: the base is frozen, only the adapter matrices train and
travel, and `peft`'s own state-dict names are the array names on the wire.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from node.wireform import WireForm, from_wire
from protocols import ConfigValue, params_digest

EXCHANGES = ("all", "lora", "subset")
"""all: every state entry; lora: LoRA adapters over a frozen base; subset: the task's own choice."""

Selector = Callable[[str], bool]
"""A task's subset: `state-dict name -> crosses the border?`."""


@dataclass(frozen=True)
class ExchangeSpec(WireForm):
    """How the model that trains and travels is built from the task's model (signed per run)."""

    exchange: str = "all"
    """all, lora or subset (see EXCHANGES)."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float = 16.0
    """LoRA scaling alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path."""
    lora_targets: str = ""
    """Comma-separated module names to adapt; empty: peft's default for the architecture."""

    def __post_init__(self) -> None:
        if self.exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {', '.join(EXCHANGES)}, got {self.exchange!r}")
        if self.lora_rank < 1:
            raise ValueError("lora-rank must be >= 1")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError("lora-alpha must be > 0")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError("lora-dropout must be in [0, 1)")

    @classmethod
    def from_config(cls, config: Mapping[str, ConfigValue]) -> ExchangeSpec:
        """Parse the wire form (only this spec's keys are read); mistyped values raise ValueError."""
        return from_wire(cls, config)


def build_model(make_model: Callable[[], nn.Module], spec: ExchangeSpec, subset: Selector | None = None) -> nn.Module:
    """The task's model, with LoRA adapters over a frozen base when `spec.exchange == "lora"`.

    For `subset`, parameters the task's selector does not pick are frozen (requires_grad False).
    """
    model = make_model()
    if spec.exchange == "lora":
        return _with_lora(model, spec)
    if spec.exchange == "subset":
        if subset is None:
            raise ValueError("exchange 'subset' needs a task that declares which parameters cross")
        for name, param in model.named_parameters():
            param.requires_grad_(subset(name))
    return model


def _with_lora(model: nn.Module, spec: ExchangeSpec) -> nn.Module:
    from peft import LoraConfig, get_peft_model  # heavy: imported only for adapter runs

    targets = [t.strip() for t in spec.lora_targets.split(",") if t.strip()] or None
    # peft annotates lora_alpha as int but scales by lora_alpha / r in float: a float alpha is fine
    alpha: Any = spec.lora_alpha
    config = LoraConfig(r=spec.lora_rank, lora_alpha=alpha, lora_dropout=spec.lora_dropout, target_modules=targets)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ValueError(f"cannot add LoRA adapters to this model ({exc}); set lora-targets") from exc


def exchanged_names(model: nn.Module, spec: ExchangeSpec) -> frozenset[str]:
    """State-dict names that cross the border: everything for `all`, else the trainable parameters."""
    state = model.state_dict()
    if spec.exchange == "all":
        return frozenset(state)
    names = frozenset(name for name, p in model.named_parameters() if p.requires_grad)
    if not names:
        raise ValueError(f"exchange {spec.exchange!r}: the model has no trainable parameter to exchange")
    return names


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; bfloat16 (which numpy lacks) as its raw 16-bit pattern (int16)."""
    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().copy()


def exchanged_arrays(model: nn.Module, names: frozenset[str]) -> dict[str, np.ndarray]:
    """The arrays that cross the border, as numpy copies."""
    out: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        if name not in names:
            continue
        if tensor.dtype == torch.bfloat16:
            raise ValueError(
                f"parameter {name!r} is bfloat16, which has no numpy dtype; keep the exchanged weights in "
                "float32 (mixed precision is applied during training)"
            )
        out[name] = to_numpy(tensor)
    return out


def frozen_digest(model: nn.Module, names: frozenset[str]) -> str:
    """Hex digest of every state entry that does not cross the border (the frozen base)."""
    return params_digest({n: to_numpy(t) for n, t in model.state_dict().items() if n not in names}).hex()


def load_exchanged(model: nn.Module, arrays: Mapping[str, np.ndarray], names: frozenset[str]) -> None:
    """Load `arrays` into the exchanged part of `model` strictly: names, shapes and dtypes must match."""
    state = model.state_dict()
    if set(arrays) != names:
        missing, extra = sorted(names - set(arrays)), sorted(set(arrays) - names)
        raise ValueError(f"global model does not fit the local model: missing {missing[:5]}, extra {extra[:5]}")
    for name in names:
        tensor, array = state[name], arrays[name]
        if tuple(tensor.shape) != array.shape or str(tensor.dtype).removeprefix("torch.") != array.dtype.name:
            raise ValueError(
                f"global model array {name!r} is {array.dtype.name}{list(array.shape)}, "
                f"local model expects {tensor.dtype}{list(tensor.shape)}"
            )
    with torch.no_grad():
        for name in names:
            state[name].copy_(torch.from_numpy(np.asarray(arrays[name])))


class LocalModel:
    """A node's model for one ExchangeSpec: built once, reloaded with each global model.

    `names` are the state entries that travel; `frozen` is the hex digest of everything else,
    computed when the model is built (the base a LoRA run's adapters sit on).
    """

    def __init__(self, make_model: Callable[[], nn.Module], spec: ExchangeSpec, subset: Selector | None = None) -> None:
        self.spec = spec
        self.model = build_model(make_model, spec, subset)
        self.names = exchanged_names(self.model, spec)
        self.frozen = frozen_digest(self.model, self.names)

    def arrays(self) -> dict[str, np.ndarray]:
        """The exchanged arrays (numpy copies)."""
        return exchanged_arrays(self.model, self.names)

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Load a global model's exchanged arrays (strict)."""
        load_exchanged(self.model, arrays, self.names)
