"""Federated evaluation: signed evaluation replies, checked before they count.

A node's evaluation reply carries an `EvaluationEnvelope` signed by the node (protocols.envelope). An
evaluation counts only if the signature verifies under an active member's key, the member is the one whose
update this node contributed, it is bound to this federation, run, round and global model digest, the
metrics sent are exactly the metrics signed, and every metric is allowlisted, finite and bounded. The
figure is the example-weighted mean, each weight capped at the member's `max_examples`, so no node can
decide it by claiming a huge count or an absurd value (an `eval_accuracy` of 1e308 once made the
federated accuracy infinite).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from coordinator.messaging import EVALUATION_REPLY_BYTES, collect
from protocols import (
    DecodeError,
    Domain,
    EvaluationEnvelope,
    Manifest,
    SignatureError,
    SignedBlob,
    wire,
)
from protocols.evaluation import federated_means, metric_problem
from protocols.text import printable


class _Refused(Exception):
    pass


def check_evaluation(
    reply: Message,
    member_of_node: Mapping[int, str],
    manifest: Manifest,
    binding: Mapping[str, Any],
) -> tuple[EvaluationEnvelope, SignedBlob]:
    """The verified envelope of one evaluation reply; raises `_Refused(reason)` otherwise."""
    if reply.has_error():
        raise _Refused(f"node error: {printable(reply.error.reason)}")
    content = reply.content
    record = content.config_records.get(wire.EVALUATION_RECORD)
    if record is None:
        raise _Refused("unsigned evaluation")
    body, signature = record.get(wire.ENVELOPE), record.get(wire.SIGNATURE)
    if not isinstance(body, bytes) or not isinstance(signature, bytes):
        raise _Refused("envelope or signature missing")
    try:
        env = EvaluationEnvelope.decode(body)
    except DecodeError as exc:
        raise _Refused(f"malformed envelope: {printable(exc)}") from exc
    member = manifest.get(env.sender)
    if member is None or not member.active:
        raise _Refused(f"sender {env.sender} is not an active member")
    try:
        member.public_key.verify(Domain.EVALUATION, body, signature)
    except (SignatureError, ValueError) as exc:
        raise _Refused("bad signature") from exc
    if member_of_node.get(reply.metadata.src_node_id) != env.sender:
        raise _Refused("signed by a member other than the one this node contributed for")
    for name, value in binding.items():
        if getattr(env, name) != value:
            raise _Refused(f"bound to another {name}")
    metrics_record = content.metric_records.get(wire.METRICS)
    sent = dict(metrics_record) if metrics_record is not None else {}
    if sent != {wire.NUM_EXAMPLES: env.num_examples, **env.metrics}:
        raise _Refused("metrics differ from the signed envelope")
    if env.num_examples < 1:
        raise _Refused("no examples")
    for name, value in env.metrics.items():
        problem = metric_problem(name, value)
        if problem:
            raise _Refused(problem)
    return env, SignedBlob(body, signature)


def collect_evaluations(
    grid: Grid,
    instructions: list[Message],
    caps: Mapping[int, int],
    members: Mapping[int, str],
    *,
    expect_round: int,
    model_digest: bytes,
    settings: Any,
    manifest: Manifest,
    timeout_s: float,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(capped example-weighted means of the `eval_*` metrics, the ledger's list of evaluations)."""
    binding = {
        "federation_id": settings.federation_id,
        "run_id": settings.run_id,
        "round": expect_round,
        "model_digest": model_digest,
    }
    records: list[dict[str, Any]] = []
    replies = collect(grid, instructions, timeout_s, EVALUATION_REPLY_BYTES)
    for reply, outcome in _checked(replies, members, manifest, binding):
        node = reply.metadata.src_node_id
        if isinstance(outcome, str):
            records.append({"node": node, "member": members.get(node), "refused": outcome})
            continue
        env, blob = outcome
        records.append({
            "node": node, "member": env.sender, "num_examples": env.num_examples,
            "weight": min(env.num_examples, caps.get(node, 0)), "metrics": dict(env.metrics),
            "envelope": blob.body.hex(), "signature": blob.signature.hex(),
        })  # fmt: skip
    records.sort(key=lambda r: (str(r.get("member")), r["node"]))
    return federated_means(counted(records)), records


def counted(records: list[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """(weight, metrics) of the counted evaluation records, in their order."""
    return [(r["weight"], r["metrics"]) for r in records if "refused" not in r]


def _checked(
    replies: Iterator[Message], members: Mapping[int, str], manifest: Manifest, binding: Mapping[str, Any]
) -> Iterator[tuple[Message, tuple[EvaluationEnvelope, SignedBlob] | str]]:
    for reply in replies:
        try:
            yield reply, check_evaluation(reply, members, manifest, binding)
        except _Refused as exc:
            yield reply, str(exc)
        except Exception as exc:  # untrusted input never stops the round
            yield reply, f"unverifiable evaluation: {type(exc).__name__}"
