"""Runs at the operator: the Flower ServerApp, verification, aggregation, signing, the record.

Never imports `node`; the two meet only in `protocols`.
"""

from coordinator.aggregate import Aggregator, FedAvg
from coordinator.app import make_server_app
from coordinator.record import FINAL_MODEL, RunRecord
from coordinator.rounds import NotEnoughNodes, QuorumNotReached, RunResult, run_federation
from coordinator.runtime import (
    CentralEval,
    CoordinatorRuntime,
    CoordinatorSettings,
    NullObserver,
    Observer,
    RoundReport,
)
from coordinator.server_opt import OuterNesterov, Plain, ServerOptimizer
from coordinator.spool import UpdateSpool
from coordinator.verify import Accepted, Expectation, Rejected, verify_reply

__all__ = [
    "FINAL_MODEL",
    "Accepted",
    "Aggregator",
    "CentralEval",
    "CoordinatorRuntime",
    "CoordinatorSettings",
    "Expectation",
    "FedAvg",
    "NotEnoughNodes",
    "NullObserver",
    "Observer",
    "OuterNesterov",
    "Plain",
    "QuorumNotReached",
    "Rejected",
    "RoundReport",
    "RunRecord",
    "RunResult",
    "ServerOptimizer",
    "UpdateSpool",
    "make_server_app",
    "run_federation",
    "verify_reply",
]
