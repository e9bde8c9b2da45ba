"""The instructions a coordinator signs into a global model envelope's config, parsed at the node.

One flat map of kebab-case keys: the training config (node.training.TrainConfig), the exchange spec
(node.exchange.ExchangeSpec), the digest of the frozen base, and the phase. An unknown key, a
mistyped value or a missing frozen digest is refused before any training happens.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from node.exchange import ExchangeSpec
from node.training import TrainConfig
from protocols import ConfigValue
from protocols.wire import FROZEN_DIGEST, PHASE, PHASE_PERSONALIZE, PHASE_TRAIN

_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Instructions:
    """Everything the coordinator signed about how to train on a global model."""

    frozen_digest: str
    """Hex digest of the state that does not travel (the base of a LoRA run)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    exchange: ExchangeSpec = field(default_factory=ExchangeSpec)
    phase: str = PHASE_TRAIN

    def __post_init__(self) -> None:
        if not _HEX_DIGEST.fullmatch(self.frozen_digest):
            raise ValueError(f"{FROZEN_DIGEST} must be 64 lowercase hex digits")
        if self.phase not in (PHASE_TRAIN, PHASE_PERSONALIZE):
            raise ValueError(f"{PHASE} must be {PHASE_TRAIN} or {PHASE_PERSONALIZE}, got {self.phase!r}")

    def to_config(self) -> dict[str, ConfigValue]:
        """Wire form: one flat map."""
        return {
            **self.train.to_config(),
            **self.exchange.to_config(),
            FROZEN_DIGEST: self.frozen_digest,
            PHASE: self.phase,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, ConfigValue]) -> Instructions:
        """Parse the signed config; unknown keys, bad values or a missing frozen digest raise ValueError."""
        train_keys, spec_keys = TrainConfig.keys(), ExchangeSpec.keys()
        unknown = set(config) - train_keys - spec_keys - {FROZEN_DIGEST, PHASE}
        if unknown:
            raise ValueError(f"unknown training instruction(s): {sorted(unknown)}")
        frozen, phase = config.get(FROZEN_DIGEST), config.get(PHASE, PHASE_TRAIN)
        if not isinstance(frozen, str):
            raise ValueError(f"the instructions carry no {FROZEN_DIGEST}")
        if not isinstance(phase, str):
            raise ValueError(f"{PHASE} must be text")
        return cls(
            frozen_digest=frozen,
            train=TrainConfig.from_config({k: v for k, v in config.items() if k in train_keys}),
            exchange=ExchangeSpec.from_config({k: v for k, v in config.items() if k in spec_keys}),
            phase=phase,
        )
