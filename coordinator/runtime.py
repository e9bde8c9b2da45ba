"""The coordinator's typed settings and runtime, and the events it reports while running."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from coordinator.verify import Accepted, Rejected
from protocols import ID_PATTERN, ConfigValue, Manifest, SigningKey
from protocols.aggregation import FedAvg, Rule
from protocols.policy import ContributionPolicy
from protocols.server_opt import Plain, ServerOptimizer


@dataclass(frozen=True)
class CoordinatorSettings:
    """How one run is coordinated."""

    federation_id: str
    """Federation id (also in the manifest)."""
    run_id: str
    """Unique id of this run; every signature binds it."""
    task: str
    """Task name sent to nodes in the signed global envelope."""
    rounds: int
    """Number of training rounds."""
    out_dir: Path
    """Where the record (metrics, checkpoints, updates, summary) is written."""
    train_config: Mapping[str, ConfigValue] | Callable[[int], Mapping[str, ConfigValue]] = field(default_factory=dict)
    """Instructions signed into every global envelope (local epochs, learning rate, ...): one map for
    every round, or a function of the round about to be trained (a learning-rate schedule)."""
    record_config: Mapping[str, Any] = field(default_factory=dict)
    """The run's complete resolved configuration, written into summary.json as `config`."""
    target_metric: str = "accuracy"
    """The held-out metric that names the best round."""
    maximize: bool = True
    """Whether a higher `target_metric` is better."""
    personalize: bool = False
    """After the last round, ask every node to personalize the final model locally and report before/after."""
    quorum: float = 0.5
    """Fraction of manifest members whose accepted updates a round needs (at least one)."""
    round_timeout_s: float = 600.0
    """How long a round waits for replies; late nodes lose that round's contribution."""
    node_wait_timeout_s: float = 120.0
    """How long the run waits for enough nodes to connect before round 1."""
    federated_evaluation: bool = True
    """Also ask every node to evaluate each new global model on its local validation split."""
    resume: bool = False
    """Continue the run recorded in `out_dir` from its last committed round instead of starting one."""
    store_updates: bool = True
    """Keep every accepted update in the record (so `weft audit verify` can recompute each aggregate)."""
    fraction_train: float = 1.0
    """Fraction of the connected nodes sampled to train each round (Flower's `fraction_train`)."""
    min_train_nodes: int = 1
    """Fewest nodes sampled to train in a round (all connected nodes when fewer are connected)."""
    payload: str = "weights"
    """What nodes send back (protocols.payload): an update with any other payload is rejected."""

    def __post_init__(self) -> None:
        if not ID_PATTERN.fullmatch(self.run_id) or not ID_PATTERN.fullmatch(self.federation_id):
            raise ValueError(f"run_id and federation_id must match {ID_PATTERN.pattern}")
        if self.rounds < 1:
            raise ValueError("rounds must be >= 1")
        if not 0 < self.quorum <= 1:
            raise ValueError("quorum must be in (0, 1]")
        if self.round_timeout_s <= 0 or self.node_wait_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if not 0 < self.fraction_train <= 1:
            raise ValueError("fraction_train must be in (0, 1]")
        if self.min_train_nodes < 1:
            raise ValueError("min_train_nodes must be >= 1")

    def instructions(self, round_: int) -> dict[str, ConfigValue]:
        """The config signed into the global model that round `round_` trains on."""
        config = self.train_config(round_) if callable(self.train_config) else self.train_config
        return dict(config)

    def min_accepted(self, members: int) -> int:
        """Accepted updates a round needs, for a manifest of `members` members."""
        return max(1, math.ceil(self.quorum * members))


@dataclass(frozen=True)
class Contribution:
    """One update folded into a global model."""

    member_id: str
    update_digest: str
    """Hex digest of the update's parameter vector."""
    weight: int
    """Its FedAvg weight: the example count the member signed."""


@dataclass(frozen=True)
class RoundReport:
    """What happened in one round."""

    round: int
    nodes: int
    """Nodes the round was sent to."""
    accepted: tuple[Contribution, ...]
    """The updates aggregated, in the order they were folded."""
    rejected: tuple[Rejected, ...]
    missing: int
    """Nodes that did not reply before the deadline."""
    global_digest: str
    """Hex digest of the new global model."""
    central: Mapping[str, float]
    """Coordinator-side evaluation on held-out data (`loss`, `accuracy`), if configured."""
    federated: Mapping[str, float]
    """Example-weighted node-side evaluation (`eval_loss`, `eval_accuracy`), if enabled."""
    duration_s: float


class Observer(Protocol):
    """Receives progress events (a live display, a log)."""

    def round_started(self, round: int, nodes: int) -> None:
        """A round's instructions went out to `nodes` nodes."""

    def reply_checked(self, round: int, outcome: Accepted | Rejected) -> None:
        """One reply was verified."""

    def round_finished(self, report: RoundReport) -> None:
        """A round completed."""


class NullObserver:
    """Ignores every event."""

    def round_started(self, round: int, nodes: int) -> None:
        """Ignore."""

    def reply_checked(self, round: int, outcome: Accepted | Rejected) -> None:
        """Ignore."""

    def round_finished(self, report: RoundReport) -> None:
        """Ignore."""


CentralEval = Callable[[Mapping[str, np.ndarray]], Mapping[str, float]]
"""Evaluates a global model on the coordinator's held-out data; returns `loss`, `accuracy`."""


@dataclass
class CoordinatorRuntime:
    """Everything the round loop needs, resolved at the edge."""

    settings: CoordinatorSettings
    identity: SigningKey
    """The coordinator's key; signs every global model."""
    manifest: Manifest
    """Who may contribute."""
    initial_arrays: Mapping[str, np.ndarray]
    """Round-0 global model."""
    central_eval: CentralEval | None = None
    central_eval_data: str = ""
    """One line describing the held-out data `central_eval` uses (goes into summary.json)."""
    rule: Rule = field(default_factory=FedAvg)
    """How accepted updates are combined (FedAvg, or a robust rule from protocols.robust)."""
    policy: ContributionPolicy = field(default_factory=ContributionPolicy)
    """How much each contribution counts: weighting, quality floor, anti-capture cap, norm bound."""
    server_optimizer: ServerOptimizer = field(default_factory=Plain)
    """How each round's aggregate moves the global model (plain FedAvg, or DiLoCo's outer Nesterov step)."""
    observer: Observer = field(default_factory=NullObserver)

    def __post_init__(self) -> None:
        if self.manifest.federation_id != self.settings.federation_id:
            raise ValueError(
                f"manifest is for federation {self.manifest.federation_id!r}, "
                f"settings say {self.settings.federation_id!r}"
            )
        if self.manifest.coordinator_key != self.identity.public_key:
            raise ValueError("the coordinator key does not match the manifest's coordinator public_key")
        if (self.policy.weighting == "quality" or self.policy.quality_floor is not None) and not self.central_eval:
            raise ValueError("a quality policy needs held-out data at the coordinator to score each update")
