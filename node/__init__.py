"""Runs inside a partner: the Flower ClientApp, local PyTorch training, signing, the egress rule.

Never imports `coordinator`; the two meet only in `protocols`.
"""

from node.app import REFUSED_MODEL, RefusedModel, handle_evaluate, handle_train, make_client_app
from node.exchange import EXCHANGES, ExchangeSpec, LocalModel, Selector
from node.instructions import PHASE_PERSONALIZE, PHASE_TRAIN, Instructions
from node.recipe import CLASSIFICATION, Recipe, StepContext, accuracy, bits_per_byte, cross_entropy, perplexity
from node.runtime import DEFAULT_METRIC_ALLOWLIST, NodeRuntime
from node.store import load_local_model
from node.training import OPTIMIZERS, Stats, TrainConfig, evaluate_local, make_optimizer, pick_device, train_local

__all__ = [
    "CLASSIFICATION",
    "DEFAULT_METRIC_ALLOWLIST",
    "EXCHANGES",
    "OPTIMIZERS",
    "PHASE_PERSONALIZE",
    "PHASE_TRAIN",
    "REFUSED_MODEL",
    "ExchangeSpec",
    "Instructions",
    "LocalModel",
    "NodeRuntime",
    "Recipe",
    "RefusedModel",
    "Selector",
    "Stats",
    "StepContext",
    "TrainConfig",
    "accuracy",
    "bits_per_byte",
    "cross_entropy",
    "evaluate_local",
    "handle_evaluate",
    "handle_train",
    "load_local_model",
    "make_client_app",
    "make_optimizer",
    "perplexity",
    "pick_device",
    "train_local",
]
