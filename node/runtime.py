"""Everything a node needs to serve the coordinator, resolved once at the edge."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from node.exchange import ExchangeSpec, LocalModel, Selector
from node.recipe import CLASSIFICATION, Recipe
from protocols import PublicKey, SigningKey

DEFAULT_METRIC_ALLOWLIST = CLASSIFICATION.allowlist()
"""What a classification node declares unless its partner narrows the list."""


@dataclass(frozen=True)
class NodeRuntime:
    """A partner's node: identity, trust anchor, private data, model and training recipe, local disk."""

    identity: SigningKey
    """The partner's signing key; its fingerprint is the member id."""
    coordinator_key: PublicKey
    """Only global models signed by this key are trained on."""
    federation_id: str
    """The federation this node belongs to; models for any other are refused."""
    task: str
    """Name of the task the node is set up for; models for any other task are refused."""
    make_model: Callable[[], nn.Module]
    """Builds a fresh model of the task's architecture (from the partner's own checkpoint, if any)."""
    train_data: Dataset
    """Private training split. Never leaves the node."""
    val_data: Dataset
    """Private validation split for federated evaluation. Never leaves the node."""
    workdir: Path
    """Where the node keeps its own models."""
    device: torch.device
    """Training device (CUDA when present)."""
    seed: int = 0
    """Node-local seed, mixed with the round's seed for shuffling."""
    recipe: Recipe = CLASSIFICATION
    """Loss, metrics, forward, optional train step and optimizer of the task."""
    subset: Selector | None = None
    """The task's choice of exchanged parameters, for exchange 'subset'."""
    metric_allowlist: frozenset[str] | None = None
    """The only metric names that may leave the node; None: the recipe's train_*/eval_* names."""
    personalize_epochs: int = 0
    """Local epochs of personalization after the last round (the partner's own model; never sent)."""
    # not an init field: `dataclasses.replace` then starts with an empty cache instead of sharing it
    _models: dict[ExchangeSpec, LocalModel] = field(
        default_factory=dict, init=False, compare=False, hash=False, repr=False
    )

    @property
    def allowlist(self) -> frozenset[str]:
        """The metric names this node may send."""
        return self.recipe.allowlist() if self.metric_allowlist is None else self.metric_allowlist

    def local_model(self, spec: ExchangeSpec) -> LocalModel:
        """The node's model for `spec`, built on first use and reused across rounds."""
        if spec not in self._models:
            self._models.clear()  # one model in memory at a time
            self._models[spec] = LocalModel(self.make_model, spec, self.subset)
        return self._models[spec]
