"""Typed, validated configuration. Strings from the CLI, run_config and node_config become these
frozen dataclasses at the edge; a bad value fails at start-up with a message naming the field.

Defaults live here and nowhere else (pyproject's [tool.flwr.app.config] mirrors `RunConfig`, and a
test checks that it does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from federation.errors import ConfigError
from protocols import ConfigValue

ADVERSARY_REASONS: dict[str, str] = {
    "tamper": "digest_mismatch",
    "unsigned": "unsigned",
    "nonmember": "unknown_member",
    "replay": "replay",
    "nan": "non_finite",
    "shape": "shape_mismatch",
    "inflate": "example_count",
}
"""Each adversary kind, and the reason the coordinator must give when rejecting it."""


@dataclass(frozen=True)
class RunConfig:
    """What a run trains and how rounds are run (shared by simulation and deployment)."""

    task: str = "digits"
    """Built-in task name or `module:attr` import path."""
    rounds: int = 30
    """Training rounds."""
    local_epochs: int = 5
    """Local passes over each node's training split per round."""
    learning_rate: float = 0.1
    """Local SGD learning rate."""
    batch_size: int = 32
    """Local mini-batch size."""
    momentum: float = 0.9
    """Local SGD momentum."""
    seed: int = 0
    """Seeds the model initialisation, the data split and local shuffling."""
    quorum: float = 0.5
    """Fraction of manifest members whose accepted updates a round needs."""
    round_timeout_s: float = 600.0
    """How long a round waits for replies."""

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, "rounds", "must be >= 1")
        _require(self.local_epochs >= 1, "local-epochs", "must be >= 1")
        _require(math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning-rate", "must be > 0")
        _require(self.batch_size >= 1, "batch-size", "must be >= 1")
        _require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        _require(0 <= self.seed < 2**63, "seed", "must be a non-negative integer")
        _require(0 < self.quorum <= 1, "quorum", "must be in (0, 1]")
        _require(self.round_timeout_s > 0, "round-timeout-s", "must be > 0")

    def train_config(self) -> dict[str, ConfigValue]:
        """The instructions signed into every global model envelope."""
        from node import TrainConfig  # torch: imported only when a run is built

        return TrainConfig(
            local_epochs=self.local_epochs,
            learning_rate=self.learning_rate,
            momentum=self.momentum,
            batch_size=self.batch_size,
            seed=self.seed,
        ).to_config()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "run config") -> RunConfig:
        """Build from kebab-case keys (Flower's run_config); unknown keys are errors."""
        return _from_mapping(cls, values, source)


@dataclass(frozen=True)
class SimulationConfig:
    """A simulated federation on this machine or an existing Ray cluster."""

    run: RunConfig = field(default_factory=RunConfig)
    nodes: int = 10
    """Honest nodes, each with its own partition of the training pool."""
    alpha: float | None = 0.5
    """Dirichlet concentration for label skew; None for an IID split."""
    adversaries: Mapping[str, int] = field(default_factory=dict)
    """Extra adversarial nodes by kind (see ADVERSARY_REASONS); they never change honest data."""
    out_dir: Path = Path("runs/simulate")
    """Output folder (keys, manifest, record, plot)."""
    federation_id: str = "weft-sim"
    """Federation id written into the manifest and every signature."""
    ray_address: str | None = None
    """Address of an existing Ray cluster; None starts a local one."""
    cpus_per_node: float = 1.0
    """Ray CPUs reserved per simulated node (sets how many run at once)."""
    gpus_per_node: float = 0.0
    """Ray GPUs reserved per simulated node (e.g. 0.25 shares one GPU among four)."""
    federated_evaluation: bool = True
    """Ask nodes to evaluate each global model on their local validation split."""
    verbose: bool = False
    """Show Flower's and Ray's own logs."""

    def __post_init__(self) -> None:
        _require(self.nodes >= 1, "nodes", "must be >= 1")
        _require(self.alpha is None or (math.isfinite(self.alpha) and self.alpha > 0), "alpha", "must be > 0")
        for kind, count in self.adversaries.items():
            _require(
                kind in ADVERSARY_REASONS,
                "adversary",
                f"unknown kind {kind!r}; choose from {', '.join(ADVERSARY_REASONS)}",
            )
            _require(count >= 0, "adversary", f"count for {kind!r} must be >= 0")
        _require(self.cpus_per_node > 0, "cpus-per-node", "must be > 0")
        _require(self.gpus_per_node >= 0, "gpus-per-node", "must be >= 0")

    @property
    def adversary_kinds(self) -> list[str]:
        """One entry per adversarial node, in a fixed order."""
        return [kind for kind in ADVERSARY_REASONS for _ in range(self.adversaries.get(kind, 0))]


def parse_adversaries(text: str) -> dict[str, int]:
    """Parse `tamper=1,unsigned=2` (or `all` for one of each kind)."""
    if not text.strip():
        return {}
    if text.strip() == "all":
        return dict.fromkeys(ADVERSARY_REASONS, 1)
    out: dict[str, int] = {}
    for item in text.split(","):
        kind, sep, count = (part.strip() for part in item.partition("="))
        _require(
            bool(sep) and count.isascii() and count.isdigit(), "adversary", f"expected kind=count, got {item.strip()!r}"
        )
        _require(kind not in out, "adversary", f"kind {kind!r} given twice")
        _require(
            kind in ADVERSARY_REASONS, "adversary", f"unknown kind {kind!r}; choose from {', '.join(ADVERSARY_REASONS)}"
        )
        out[kind] = int(count)
    return out


# ---- helpers ---------------------------------------------------------------------------------------


def _require(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {problem}")


def _from_mapping(cls: type[RunConfig], values: Mapping[str, Any], source: str) -> RunConfig:
    defaults = cls()
    known = {f.name.replace("_", "-"): f.name for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        want = type(getattr(defaults, known[key]))
        kwargs[known[key]] = _coerce(value, want, f"{source}: {key}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def _coerce(value: Any, want: type, where: str) -> Any:
    """Accept the value if it is (or spells) the wanted scalar type."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected {want.__name__}, got a boolean")
    try:
        if want is int and (isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())):
            return int(value)
        if want is float and isinstance(value, int | float | str):
            return float(value)
        if want is str and isinstance(value, str) and value:
            return value
    except ValueError:
        pass
    raise ConfigError(f"{where}: expected {want.__name__}, got {value!r}")
