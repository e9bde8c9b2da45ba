"""The round loop, written once: sign, send, verify each reply as it arrives, fold, sign again.

Replies are pulled as they come in and verified one by one; an accepted update goes straight to
the spool on disk and leaves memory. A round that ends with fewer accepted updates than the quorum
fails the run loudly (`QuorumNotReached`) and never produces a model.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from coordinator.aggregate import Aggregator
from coordinator.arrays import to_record
from coordinator.record import FINAL_MODEL, RunRecord
from coordinator.runtime import Contribution, CoordinatorRuntime, Observer, RoundReport
from coordinator.spool import UpdateSpool
from coordinator.verify import Accepted, Expectation, Rejected, verify_reply
from protocols import ArraySpec, GlobalModelEnvelope, SignedBlob, params_digest, sign_global_model, structure, wire

log = logging.getLogger("weft.coordinator")

PULL_INTERVAL_S = 0.1


class QuorumNotReached(RuntimeError):
    """A round accepted fewer updates than the quorum; no model was produced."""


class NotEnoughNodes(RuntimeError):
    """Too few nodes connected before the deadline."""


@dataclass(frozen=True)
class RunResult:
    """The outcome of a completed run."""

    summary: Mapping[str, Any]
    final_arrays: Mapping[str, np.ndarray]


def run_federation(grid: Grid, rt: CoordinatorRuntime) -> RunResult:
    """Run every round of `rt.settings`; write the record; return the summary."""
    s = rt.settings
    record = RunRecord(s.out_dir)
    need = s.min_accepted(len(rt.manifest.active))  # suspended and revoked members do not count
    started = time.monotonic()
    global_arrays = {name: np.asarray(a) for name, a in rt.initial_arrays.items()}
    template = structure(global_arrays)
    signed = _sign(rt, 0, global_arrays)
    record.checkpoint(0, global_arrays, signed)
    totals: dict[str, Any] = {"accepted": 0, "rejected": 0, "rejected_by_reason": {}}
    try:
        _wait_for_nodes(grid, need, s.node_wait_timeout_s)
    except NotEnoughNodes as exc:
        record.write_summary(_summary(rt, 0, None, None, totals, started, status="failed", error=str(exc)))
        raise
    report: RoundReport | None = None
    best: RoundReport | None = None
    members_by_node: dict[int, str] = {}

    for rnd in range(1, s.rounds + 1):
        round_start = time.monotonic()
        # ---- send the signed global model to every connected node -------------------------------
        node_ids = sorted(grid.get_node_ids())
        rt.observer.round_started(rnd, len(node_ids))
        base_digest = params_digest(global_arrays)
        expect = Expectation(s.federation_id, s.run_id, rnd, base_digest, template, rt.manifest)
        spool = UpdateSpool(record.updates_dir(rnd))
        instructions = _instructions(node_ids, MessageType.TRAIN, global_arrays, signed)

        # ---- verify each reply as it arrives; spool the good ones -------------------------------
        rejected, replied, evaluators, members_by_node = _gather_updates(
            grid, instructions, expect, spool, rt.observer, s.round_timeout_s
        )

        # ---- quorum: never produce a model from too few updates ---------------------------------
        if len(spool) < need:
            reasons = ", ".join(f"{r}={n}" for r, n in sorted(Counter(str(x.reason) for x in rejected).items()))
            error = (
                f"round {rnd}: accepted {len(spool)} update(s), quorum is {need} "
                f"({s.quorum:.0%} of {len(rt.manifest.active)} active members); rejected {len(rejected)}"
                f"{f' ({reasons})' if reasons else ''}, no reply from {len(node_ids) - replied}"
            )
            record.append_failure(rnd, error, manifest_version=rt.manifest.version)
            record.write_summary(_summary(rt, rnd - 1, report, best, totals, started, status="failed", error=error))
            raise QuorumNotReached(error)

        # ---- aggregate in canonical order, sign the new global model ----------------------------
        aggregate, accepted = _fold(rt.aggregator, template, spool)
        global_arrays = rt.server_optimizer.step(global_arrays, aggregate)
        del aggregate
        signed = _sign(rt, rnd, global_arrays)
        record.checkpoint(rnd, global_arrays, signed)

        # ---- evaluate ------------------------------------------------------------------------------
        central = dict(rt.central_eval(global_arrays)) if rt.central_eval else {}
        federated = (
            _federated_evaluate(grid, evaluators, global_arrays, signed, s.round_timeout_s)
            if s.federated_evaluation
            else {}
        )
        report = RoundReport(
            round=rnd,
            nodes=len(node_ids),
            accepted=tuple(accepted),
            rejected=tuple(rejected),
            missing=len(node_ids) - replied,
            global_digest=params_digest(global_arrays).hex(),
            central=central,
            federated=federated,
            duration_s=time.monotonic() - round_start,
        )
        record.append_round(report, manifest_version=rt.manifest.version)
        _add_totals(totals, report)
        best = report if _better(s, report, best) else best
        rt.observer.round_finished(report)

    # ---- N+1: every partner may keep a locally personalized model ----------------------------------
    personal: list[dict[str, Any]] = []
    if s.personalize:
        phase = {wire.PHASE: wire.PHASE_PERSONALIZE}
        personal = _personalize(grid, members_by_node, global_arrays, _sign(rt, s.rounds, global_arrays, phase), s)
        record.append_personalization(personal)

    summary = _summary(rt, s.rounds, report, best, totals, started, status="completed", personal=personal)
    record.write_summary(summary)
    return RunResult(summary=summary, final_arrays=global_arrays)


# ---- one round's steps ---------------------------------------------------------------------------------


def _gather_updates(
    grid: Grid,
    instructions: list[Message],
    expect: Expectation,
    spool: UpdateSpool,
    observer: Observer,
    timeout_s: float,
) -> tuple[list[Rejected], int, dict[int, int], dict[int, str]]:
    """Verify each reply as it arrives; spool accepted updates.

    Returns the rejections, the number of replies seen, {node id: example cap} of the nodes whose
    update was accepted (the only ones asked to evaluate), and {node id: member id} of the same nodes.
    """
    rejected: list[Rejected] = []
    replied = 0
    accepted_nodes: dict[int, int] = {}
    members: dict[int, str] = {}
    for reply in _collect(grid, instructions, timeout_s):
        replied += 1
        outcome = verify_reply(reply, expect)
        if isinstance(outcome, Accepted):
            env = outcome.envelope
            spool.put(outcome.member_id, env.update_digest, env.num_examples, outcome.arrays, outcome.signed)
            member = expect.manifest.get(outcome.member_id)
            accepted_nodes[outcome.node_id] = member.max_examples if member else 0
            members[outcome.node_id] = outcome.member_id
        else:
            log.warning(
                "round %d: rejected node %s: %s (%s)", expect.round, outcome.node_id, outcome.reason, outcome.detail
            )
            rejected.append(outcome)
        observer.reply_checked(expect.round, outcome)
        del reply, outcome  # keep at most one update in memory
        # Flower's records hold reference cycles; without this young-generation pass the dropped
        # replies linger until the collector's threshold (measured: 46 -> 85 MiB from 10 to 40 nodes
        # with a 3.8 MiB model; with it, 28 MiB flat). benchmarks/aggregation_memory.py.
        gc.collect(0)
    return rejected, replied, accepted_nodes, members


def _fold(
    aggregator: Aggregator, template: Mapping[str, ArraySpec], spool: UpdateSpool
) -> tuple[dict[str, np.ndarray], list[Contribution]]:
    """Fold the spooled updates in canonical order; return (new global model, what was folded, in order)."""
    aggregator.begin(template)
    folded = []
    for entry in spool.in_order():
        aggregator.fold(entry.load(), entry.weight)
        folded.append(Contribution(entry.member_id, entry.update_digest.hex(), entry.weight))
    return aggregator.finish(), folded


# ---- messaging -------------------------------------------------------------------------------------


def _instructions(
    node_ids: Iterable[int], kind: str, arrays: Mapping[str, np.ndarray], signed: SignedBlob
) -> list[Message]:
    record = to_record(arrays)
    global_record = ConfigRecord({wire.ENVELOPE: signed.body, wire.SIGNATURE: signed.signature})
    return [
        Message(
            RecordDict({wire.ARRAYS: record, wire.GLOBAL_RECORD: global_record}), dst_node_id=nid, message_type=kind
        )
        for nid in node_ids
    ]


def _collect(grid: Grid, messages: list[Message], timeout_s: float) -> Iterator[Message]:
    """Push `messages`; yield each reply as soon as it is pulled, until all arrive or time runs out."""
    pending = list(grid.push_messages(messages))
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        arrived = False
        # One id per pull: at most one reply (one update) is in memory at a time (invariant 6).
        for message_id in list(pending):
            for reply in grid.pull_messages([message_id]):
                pending.remove(message_id)
                arrived = True
                yield reply
                del reply
        if not arrived:
            time.sleep(PULL_INTERVAL_S)
    if pending:
        log.warning("%d node(s) did not reply within %.0f s", len(pending), timeout_s)


def _wait_for_nodes(grid: Grid, need: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(list(grid.get_node_ids())) < need:
        if time.monotonic() > deadline:
            have = len(list(grid.get_node_ids()))
            raise NotEnoughNodes(f"only {have} node(s) connected within {timeout_s:.0f} s; quorum needs {need}")
        time.sleep(0.5)


def _federated_evaluate(
    grid: Grid, caps: Mapping[int, int], arrays: Mapping[str, np.ndarray], signed: SignedBlob, timeout_s: float
) -> dict[str, float]:
    """Example-weighted mean of the evaluation metrics declared by the nodes in `caps`.

    Only nodes whose update was accepted this round are asked, and each weight is capped at that
    member's `max_examples`, so no node can decide the figure by claiming a huge count.
    """
    sums: dict[str, float] = {}
    total = 0
    for reply in _collect(grid, _instructions(sorted(caps), MessageType.EVALUATE, arrays, signed), timeout_s):
        if reply.has_error() or wire.METRICS not in reply.content.metric_records:
            continue
        metrics = dict(reply.content.metric_records[wire.METRICS])
        n = metrics.pop(wire.NUM_EXAMPLES, 0)
        if not isinstance(n, int) or n < 1:
            continue
        n = min(n, caps.get(reply.metadata.src_node_id, 0))
        total += n
        for name, value in metrics.items():
            if isinstance(value, int | float) and np.isfinite(value):
                sums[name] = sums.get(name, 0.0) + float(value) * n
    return {name: value / total for name, value in sums.items()} if total else {}


def _personalize(
    grid: Grid, members: Mapping[int, str], arrays: Mapping[str, np.ndarray], signed: SignedBlob, s: Any
) -> list[dict[str, Any]]:
    """Ask the last round's contributors to personalize the final model; collect each one's before/after.

    Only declared scalar metrics come back: `eval_*` on the final model, `personal_*` after the
    node's local fine-tuning (absent when the partner configured none).
    """
    out: list[dict[str, Any]] = []
    instructions = _instructions(sorted(members), MessageType.EVALUATE, arrays, signed)
    for reply in _collect(grid, instructions, s.round_timeout_s):
        if reply.has_error() or wire.METRICS not in reply.content.metric_records:
            continue
        metrics = dict(reply.content.metric_records[wire.METRICS])
        metrics.pop(wire.NUM_EXAMPLES, None)
        finite = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and np.isfinite(v)}
        out.append(
            {
                "member": members.get(reply.metadata.src_node_id, "?"),
                "before": {k.removeprefix("eval_"): v for k, v in sorted(finite.items()) if k.startswith("eval_")},
                "after": {
                    k.removeprefix("personal_"): v for k, v in sorted(finite.items()) if k.startswith("personal_")
                },
            }
        )
    return sorted(out, key=lambda row: row["member"])


def _better(s: Any, report: RoundReport, best: RoundReport | None) -> bool:
    """Whether `report` beats `best` on the target metric; a missing or non-finite value never does."""
    value = report.central.get(s.target_metric)
    if value is None or not np.isfinite(value):
        return False
    if best is None:
        return True
    old = best.central[s.target_metric]
    return value > old if s.maximize else value < old


# ---- signing and bookkeeping -------------------------------------------------------------------------


def _sign(
    rt: CoordinatorRuntime, round_: int, arrays: Mapping[str, np.ndarray], phase: Mapping[str, str] | None = None
) -> SignedBlob:
    """Sign the model after `round_` with the instructions for the next round (or `phase`'s)."""
    s = rt.settings
    envelope = GlobalModelEnvelope(
        federation_id=s.federation_id,
        run_id=s.run_id,
        round=round_,
        model_digest=params_digest(arrays),
        task=s.task,
        config={**s.instructions(round_ + 1), **(phase or {})},
    )
    return sign_global_model(rt.identity, envelope)


def _add_totals(totals: dict[str, Any], report: RoundReport) -> None:
    totals["accepted"] += len(report.accepted)
    totals["rejected"] += len(report.rejected)
    by_reason = totals["rejected_by_reason"]
    for rej in report.rejected:
        by_reason[str(rej.reason)] = by_reason.get(str(rej.reason), 0) + 1


def _summary(
    rt: CoordinatorRuntime,
    rounds_done: int,
    last: RoundReport | None,
    best: RoundReport | None,
    totals: Mapping[str, Any],
    started: float,
    status: str,
    error: str | None = None,
    personal: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    s = rt.settings
    out: dict[str, Any] = {
        "status": status,
        "federation_id": s.federation_id,
        "run_id": s.run_id,
        "task": s.task,
        "config": dict(s.record_config),
        "rounds": rounds_done,
        "final": {"round": last.round, **last.central} if last else None,
        "best": {"round": best.round, "by": s.target_metric, **best.central} if best else None,
        "final_federated": dict(last.federated) if last else None,
        "final_accuracy": last.central.get("accuracy") if last else None,
        "final_loss": last.central.get("loss") if last else None,
        "final_federated_accuracy": last.federated.get("eval_accuracy") if last else None,
        "accuracy_measured_on": rt.central_eval_data,
        "accepted": totals["accepted"],
        "rejected": totals["rejected"],
        "rejected_by_reason": dict(sorted(totals["rejected_by_reason"].items())),
        "global_model_digest": last.global_digest if last else None,
        "global_model_file": FINAL_MODEL if last else None,
        "coordinator_public_key": rt.identity.public_key.hex(),
        "manifest_version": rt.manifest.version,
        "wall_s": round(time.monotonic() - started, 2),
    }
    if personal:
        out["personalization"] = personal
    if error:
        out["error"] = error
    return out
