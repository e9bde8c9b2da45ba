"""Conversions between a torch model, numpy parameter vectors and Flower ArrayRecords."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn


def model_to_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state_dict as numpy arrays (copies, on CPU)."""
    out: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        if tensor.dtype == torch.bfloat16:
            raise ValueError(
                f"parameter {name!r} is bfloat16, which has no numpy dtype; keep the model's "
                "weights in float32 (mixed precision is applied during training)"
            )
        out[name] = tensor.detach().cpu().numpy().copy()
    return out


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load `arrays` into `model` strictly: every name, shape and dtype must match."""
    state = model.state_dict()
    if set(state) != set(arrays):
        missing, extra = sorted(set(state) - set(arrays)), sorted(set(arrays) - set(state))
        raise ValueError(f"global model does not fit the local model: missing {missing}, extra {extra}")
    for name, tensor in state.items():
        array = arrays[name]
        if tuple(tensor.shape) != array.shape or str(tensor.dtype).removeprefix("torch.") != array.dtype.name:
            raise ValueError(
                f"global model array {name!r} is {array.dtype.name}{list(array.shape)}, "
                f"local model expects {tensor.dtype}{list(tensor.shape)}"
            )
    model.load_state_dict({name: torch.from_numpy(np.array(a)) for name, a in arrays.items()})


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """numpy arrays -> ArrayRecord (keys kept)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> numpy arrays."""
    return {name: record[name].numpy() for name in record}
