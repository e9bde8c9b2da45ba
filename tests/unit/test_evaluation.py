"""coordinator.evaluation: a node's evaluation counts only if it is signed, bound, allowlisted, finite and bounded.

Before, one node reporting `eval_accuracy=1e308` made the federated accuracy infinite and wrote `Infinity` into
metrics.jsonl and summary.json.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from flwr.app import ConfigRecord, Error, Message

from coordinator.evaluation import _Refused, check_evaluation, counted, federated_means
from coordinator.record import finite_json
from node.egress import evaluate_reply
from protocols import EvaluationEnvelope, SignedBlob, sign_evaluation, wire
from tests.unit.test_verify import FEDERATION, MANIFEST, MEMBER, NODE_ID, OTHER_MEMBER, RUN, instruction

DIGEST = bytes(range(32))
BINDING = {"federation_id": FEDERATION, "run_id": RUN, "round": 3, "model_digest": DIGEST}
MEMBERS = {NODE_ID: MEMBER.member_id}


def envelope(metrics: dict[str, float], **changes: Any) -> EvaluationEnvelope:
    fields: dict[str, Any] = {"federation_id": FEDERATION, "run_id": RUN, "round": 3, "sender": MEMBER.member_id,
                              "model_digest": DIGEST, "num_examples": 50, "metrics": metrics}  # fmt: skip
    fields.update(changes)
    return EvaluationEnvelope(**fields)


def reply_for(env: EvaluationEnvelope, key: Any = MEMBER) -> Message:
    return Message(
        evaluate_reply(env.num_examples, dict(env.metrics), sign_evaluation(key, env)), reply_to=instruction()
    )


def infinite_loss_reply() -> Message:
    """A reply whose signed envelope bytes carry eval_loss = +inf, which the honest encoder refuses to write
    (a node running its own software): the float's 8 bytes are patched, then signed."""
    from protocols import Domain

    body = envelope({"eval_loss": 1.0}).encode()
    one, inf = struct.pack(">d", 1.0), struct.pack(">d", math.inf)
    assert body.count(one) == 1
    body = body.replace(one, inf)
    blob = SignedBlob(body, MEMBER.sign(Domain.EVALUATION, body))
    return Message(evaluate_reply(50, {"eval_loss": 1.0}, blob), reply_to=instruction())


def refusal(msg: Message, members: dict[int, str] = MEMBERS) -> str:
    with pytest.raises(_Refused) as info:
        check_evaluation(msg, members, MANIFEST, BINDING)
    return str(info.value)


def test_an_honest_signed_evaluation_counts() -> None:
    env, blob = check_evaluation(reply_for(envelope({"eval_accuracy": 0.75, "eval_loss": 0.5})), MEMBERS, MANIFEST,
                                 BINDING)  # fmt: skip
    assert dict(env.metrics) == {"eval_accuracy": 0.75, "eval_loss": 0.5} and len(blob.signature) == 64


def test_an_absurd_accuracy_never_counts() -> None:
    assert refusal(reply_for(envelope({"eval_accuracy": 1e308}))).startswith("metric eval_accuracy = 1e+308")
    assert "is not in [0, 1]" in refusal(reply_for(envelope({"eval_accuracy": 1.5})))
    assert "out of bounds" in refusal(reply_for(envelope({"eval_loss": 1e300})))


def test_non_finite_values_never_count() -> None:
    # the honest encoder refuses NaN and infinity; a node running its own code could still sign them
    assert refusal(infinite_loss_reply()).startswith("malformed envelope:")


def test_names_outside_the_allowlist_never_count() -> None:
    assert "is not allowed" in refusal(reply_for(envelope({"favourite_patient_id": 12.0})))
    assert "is not allowed" in refusal(reply_for(envelope({"train_loss": 0.1})))


def test_unsigned_forged_and_rebound_evaluations_never_count() -> None:
    unsigned = Message(evaluate_reply(50, {"eval_loss": 1.0}, SignedBlob(b"", b"")), reply_to=instruction())
    del unsigned.content.config_records[wire.EVALUATION_RECORD]
    assert refusal(unsigned) == "unsigned evaluation"
    assert refusal(reply_for(envelope({"eval_loss": 1.0}, sender=OTHER_MEMBER.member_id), OTHER_MEMBER)).startswith(
        "signed by a member other than"
    )
    assert refusal(reply_for(envelope({"eval_loss": 1.0}, round=2))) == "bound to another round"
    assert refusal(reply_for(envelope({"eval_loss": 1.0}, model_digest=bytes(32)))) == "bound to another model_digest"
    msg = reply_for(envelope({"eval_loss": 1.0}))
    msg.content.config_records[wire.EVALUATION_RECORD] = ConfigRecord(
        {wire.ENVELOPE: envelope({"eval_loss": 1.0}).encode(), wire.SIGNATURE: bytes(64)}
    )
    assert refusal(msg) == "bad signature"


def test_metrics_sent_beside_the_envelope_must_be_the_signed_ones() -> None:
    msg = reply_for(envelope({"eval_loss": 1.0}))
    msg.content.metric_records[wire.METRICS]["eval_loss"] = 0.01
    assert refusal(msg) == "metrics differ from the signed envelope"


def test_an_error_reply_is_refused_with_its_text_bounded() -> None:
    msg = Message(Error(code=4001, reason="x\n" * 10_000), reply_to=instruction())
    text = refusal(msg)
    assert "\n" not in text and len(text) < 500


def test_the_federated_mean_caps_weights_and_averages_each_metric_over_who_reported_it() -> None:
    records = [
        {"member": "a", "node": 1, "weight": 10, "metrics": {"eval_accuracy": 0.5, "eval_loss": 2.0}},
        {"member": "b", "node": 2, "weight": 30, "metrics": {"eval_accuracy": 0.9}},
        {"member": "c", "node": 3, "refused": "metric eval_accuracy = 1e+308 is out of bounds"},
    ]
    assert federated_means(counted(records)) == {"eval_accuracy": (0.5 * 10 + 0.9 * 30) / 40, "eval_loss": 2.0}


def test_records_are_strict_json() -> None:
    assert finite_json({"a": math.inf, "b": [1.0, math.nan], "c": {"d": -math.inf}}) == {
        "a": None,
        "b": [1.0, None],
        "c": {"d": None},
    }
