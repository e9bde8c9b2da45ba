"""Runs at the operator: the Flower ServerApp, verification, aggregation, signing, the record.

Never imports `node`; the two meet only in `protocols`. The arithmetic of aggregation, the contribution
policy and the server optimizers lives in `protocols` (aggregation, robust, policy, server_opt), because
`weft audit verify` recomputes it without flwr or torch.
"""

from coordinator.app import make_server_app
from coordinator.record import FINAL_MODEL, RecordError, RunRecord, mark_interrupted, run_status
from coordinator.rounds import Coordinator, NotEnoughNodes, QuorumNotReached, RunResult, RunState, run_federation
from coordinator.runtime import (
    CentralEval,
    CoordinatorRuntime,
    CoordinatorSettings,
    NullObserver,
    Observer,
    RoundReport,
)
from coordinator.spool import UpdateSpool
from coordinator.verify import Accepted, Expectation, Rejected, verify_reply
from protocols.aggregation import FedAvg, Rule
from protocols.server_opt import OuterNesterov, Plain, ServerOptimizer

__all__ = [
    "FINAL_MODEL",
    "Accepted",
    "CentralEval",
    "Coordinator",
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
    "RecordError",
    "Rejected",
    "RoundReport",
    "Rule",
    "RunRecord",
    "RunResult",
    "RunState",
    "ServerOptimizer",
    "UpdateSpool",
    "make_server_app",
    "mark_interrupted",
    "run_federation",
    "run_status",
    "verify_reply",
]
