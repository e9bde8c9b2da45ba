"""The CUDA path of node training: bf16 autocast, pinned-memory loading, no host sync per batch.

CI and this project's machines have no GPU: the CUDA tests skip there, and run wherever CUDA is present.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from node.training import TrainConfig, _amp_dtype, _loader, evaluate_local, train_local

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def data(n: int = 256) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def test_loader_pins_memory_only_for_cuda() -> None:
    assert _loader(data(), 8, torch.device("cuda"), shuffle_seed=0).pin_memory is True
    assert _loader(data(), 8, torch.device("cpu"), shuffle_seed=0).pin_memory is False


def test_no_autocast_on_cpu() -> None:
    assert _amp_dtype(torch.device("cpu")) is None


@cuda
def test_cuda_training_uses_bf16_autocast_where_supported() -> None:
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert _amp_dtype(torch.device("cuda")) == expected


@cuda
def test_cuda_training_learns_and_returns_the_model_to_the_cpu() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    device = torch.device("cuda")
    before = evaluate_local(model, data(), device)
    stats = train_local(model, data(), TrainConfig(local_epochs=5, optimizer="adam", learning_rate=0.01), device, 0)
    after = evaluate_local(model, data(), device)
    assert next(model.parameters()).device.type == "cpu"
    assert next(model.parameters()).dtype == torch.float32  # weights stay float32; autocast is per op
    assert stats.num_examples == 256
    assert after.loss < before.loss and after.accuracy > 0.9


@cuda
def test_the_training_loop_never_waits_on_the_host_per_batch() -> None:
    # A host sync inside the loop (`.item()`, `float(tensor)`) raises in this mode; the loop's running
    # sums stay on the device and are read once at the end, outside the checked region.
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    device = torch.device("cuda")
    model.to(device)
    seen: list[int] = []

    class Checked(TensorDataset):
        def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
            seen.append(i)
            return super().__getitem__(i)

    ds = Checked(*data().tensors)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            torch.zeros(1, device=device).item()  # the mode is on: a sync raises
        from node.recipe import CLASSIFICATION
        from node.training import _Totals

        totals = _Totals(CLASSIFICATION, device)
        for x, y in _loader(ds, 32, device, shuffle_seed=0):
            logits = model(x.to(device, non_blocking=True))
            totals.add(nn.functional.cross_entropy(logits, y.to(device, non_blocking=True)), logits, y.to(device))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(seen) == 256
    assert totals.count() == 256
