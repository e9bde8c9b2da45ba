"""Runs inside a partner: the Flower ClientApp, local PyTorch training, signing, the egress rule.

Never imports `coordinator`; the two meet only in `protocols`.
"""

from node.app import REFUSED_MODEL, RefusedModel, handle_evaluate, handle_train, make_client_app
from node.runtime import DEFAULT_METRIC_ALLOWLIST, NodeRuntime
from node.store import load_local_model
from node.training import Stats, TrainConfig, evaluate_local, pick_device, train_local

__all__ = [
    "DEFAULT_METRIC_ALLOWLIST",
    "REFUSED_MODEL",
    "NodeRuntime",
    "RefusedModel",
    "Stats",
    "TrainConfig",
    "evaluate_local",
    "handle_evaluate",
    "handle_train",
    "load_local_model",
    "make_client_app",
    "pick_device",
    "train_local",
]
