"""docs/ARCHITECTURE.md, invariant 1: nothing but parameters and declared scalar metrics leaves a node.

A node is given training and validation data whose raw bytes spell a canary, a work folder whose
path carries the canary, and a metric allowlist. Every byte of its train and evaluate replies, as
Flower serialises them for the wire, is then searched for the canary, and the reply's structure is
checked against the egress rule.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from flwr.common.serde import message_to_proto
from torch.utils.data import TensorDataset

from node.app import handle_evaluate, handle_train
from protocols import wire
from tests.unit.test_node import instruction, runtime

CANARY = b"CANARY-7f3a-private-row"


def canary_dataset(n: int) -> TensorDataset:
    """Features whose float32 bytes repeat the canary; labels from the canary bytes too."""
    raw = (CANARY * (n * 16 // len(CANARY) + 1))[: n * 16]
    features = np.frombuffer(raw, dtype=np.float32).reshape(n, 4).copy()
    labels = np.frombuffer(raw[:n], dtype=np.uint8).astype(np.int64) % 3
    assert CANARY[:8] in features.tobytes()
    return TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))


def wire_bytes(reply: object) -> bytes:
    return message_to_proto(reply).SerializeToString()  # type: ignore[arg-type]


def test_no_data_or_path_bytes_leave_a_node(tmp_path: Path) -> None:
    workdir = tmp_path / CANARY.decode()
    rt = replace(runtime(workdir), train_data=canary_dataset(24), val_data=canary_dataset(8))
    train = handle_train(rt, instruction())
    evaluate = handle_evaluate(rt, instruction(message_type="evaluate"))
    assert not train.has_error() and not evaluate.has_error()
    for reply in (train, evaluate):
        data = wire_bytes(reply)
        assert len(data) > 0
        for probe in (CANARY, CANARY[:8], str(workdir).encode(), str(tmp_path).encode()):
            assert probe not in data
    # the node did keep its own model, under the canary-named folder, on its own disk
    assert (workdir / "local_model.npz").is_file()


def test_reply_structure_is_exactly_the_egress_rule(tmp_path: Path) -> None:
    rt = replace(runtime(tmp_path), metric_allowlist=frozenset({"train_loss", "eval_accuracy"}))
    train = handle_train(rt, instruction())
    assert set(train.content.keys()) == {wire.ARRAYS, wire.METRICS, wire.UPDATE_RECORD}
    assert set(train.content.metric_records[wire.METRICS].keys()) == {wire.NUM_EXAMPLES, "train_loss"}
    assert set(train.content.config_records[wire.UPDATE_RECORD].keys()) == {wire.ENVELOPE, wire.SIGNATURE}
    assert set(train.content.array_records[wire.ARRAYS].keys()) == {"weight", "bias"}
    evaluate = handle_evaluate(rt, instruction(message_type="evaluate"))
    assert set(evaluate.content.keys()) == {wire.METRICS, wire.EVALUATION_RECORD}
    assert set(evaluate.content.metric_records[wire.METRICS].keys()) == {wire.NUM_EXAMPLES, "eval_accuracy"}
    assert set(evaluate.content.config_records[wire.EVALUATION_RECORD].keys()) == {wire.ENVELOPE, wire.SIGNATURE}


def test_a_failing_node_sends_a_fixed_code_never_its_error_text(tmp_path: Path) -> None:
    # Training fails with the canary (a path, a label value...) in its message: the ClientApp logs
    # it locally and the wire carries only the fixed failure code and text.
    from flwr.app import Context, RecordDict

    from node.app import FAILURE_REASON, NODE_FAILURE, make_client_app

    def leaky_model() -> torch.nn.Module:
        raise RuntimeError(f"cannot read {CANARY.decode()} at /data/patients.csv")

    rt = replace(runtime(tmp_path), make_model=leaky_model)
    app = make_client_app(lambda _ctx: rt)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    for msg in (instruction(), instruction(message_type="evaluate")):
        reply = app(msg, context)
        assert reply.has_error()
        assert (reply.error.code, reply.error.reason) == (NODE_FAILURE, FAILURE_REASON)
        data = wire_bytes(reply)
        assert CANARY not in data and b"patients" not in data


def test_a_refusal_names_only_a_fixed_code(tmp_path: Path) -> None:
    from node.app import REFUSED_MODEL

    reply = handle_train(runtime(tmp_path), instruction(federation_id="other-federation"))
    assert (reply.error.code, reply.error.reason) == (REFUSED_MODEL, "refused global model: wrong_federation")
