"""Everything a node needs to serve the coordinator, resolved once at the edge."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from protocols import PublicKey, SigningKey

DEFAULT_METRIC_ALLOWLIST = frozenset({"train_loss", "train_accuracy", "eval_loss", "eval_accuracy"})
"""Metrics a node declares unless its partner narrows the list."""


@dataclass(frozen=True)
class NodeRuntime:
    """A partner's node: identity, trust anchor, private data, model recipe and local disk."""

    identity: SigningKey
    """The partner's signing key; its fingerprint is the member id."""
    coordinator_key: PublicKey
    """Only global models signed by this key are trained on."""
    federation_id: str
    """The federation this node belongs to; models for any other are refused."""
    task: str
    """Name of the task the node is set up for; models for any other task are refused."""
    make_model: Callable[[], nn.Module]
    """Builds a fresh model of the task's architecture."""
    train_data: Dataset
    """Private training split. Never leaves the node."""
    val_data: Dataset
    """Private validation split for federated evaluation. Never leaves the node."""
    workdir: Path
    """Where the node keeps its own latest local model."""
    device: torch.device
    """Training device (CUDA when present)."""
    seed: int = 0
    """Node-local seed, mixed with the round's seed for shuffling."""
    metric_allowlist: frozenset[str] = DEFAULT_METRIC_ALLOWLIST
    """The only metric names that may leave the node."""
