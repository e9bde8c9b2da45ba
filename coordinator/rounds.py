"""The round loop: an explicit run state, `start` or `resume`, then one `run_round` per round.

Each round: sign and send the global model, verify each reply as it arrives (an accepted update goes
straight to disk and leaves memory), apply the contribution policy and the aggregation rule
(protocols.aggregation), step the server optimizer, sign the new model, evaluate, and commit everything
through the one record sink (coordinator.record), whose ledger record is the commit point. A round that
ends with fewer accepted updates than the quorum fails loudly (`QuorumNotReached`) and produces no model.

Each round asks a sample of the connected nodes (`sample_nodes`: `max(min_train_nodes, ceil(fraction_train *
connected))` of them, drawn from the run id and the round over the sorted node ids, so the same nodes give the
same sample); with `fraction_train` 1 every connected node is asked and the quorum counts the manifest's active
members, otherwise it counts the nodes asked (`round_quorum`).

A coordinator killed at any point resumes from its last committed round (`resume`): the nodes retrain that
round from the same signed model with the same seeds, so the resumed run ends with the same model bytes.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from coordinator.evaluation import check_evaluation, collect_evaluations
from coordinator.messaging import EVALUATION_REPLY_BYTES
from coordinator.messaging import collect as _collect
from coordinator.messaging import instructions as _instructions
from coordinator.record import FINAL_MODEL, RecordError, RunRecord
from coordinator.record import crash_point as _point
from coordinator.runtime import Contribution, CoordinatorRuntime, RoundReport
from coordinator.spool import SpooledUpdate, UpdateSpool
from coordinator.verify import Accepted, Expectation, Rejected, verify_reply
from protocols import (
    ArraySpec,
    GlobalModelEnvelope,
    RejectReason,
    SignedBlob,
    params_digest,
    sign_global_model,
    structure,
    wire,
)
from protocols.aggregation import RoundAggregate, aggregate_round
from protocols.payload import WEIGHTS, as_weights, decode
from protocols.policy import below_floor

log = logging.getLogger("weft.coordinator")


class QuorumNotReached(RuntimeError):
    """A round accepted fewer updates than the quorum; no model was produced."""


class NotEnoughNodes(RuntimeError):
    """Too few nodes connected before the deadline."""


@dataclass(frozen=True)
class RunResult:
    """The outcome of a completed run."""

    summary: Mapping[str, Any]
    final_arrays: Mapping[str, np.ndarray]


@dataclass
class RunState:
    """Everything the loop carries from one round to the next (and what `resume` rebuilds from the record)."""

    round: int
    """The last completed round (0 before the first)."""
    arrays: dict[str, np.ndarray]
    """The current global model."""
    signed: SignedBlob
    """Its coordinator signature, with the instructions for the next round."""
    accepted: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    last: RoundReport | None = None
    best: RoundReport | None = None
    members_by_node: dict[int, str] = field(default_factory=dict)
    """{node id: member id} of the last round's contributors (asked to personalize at the end)."""


def sample_size(connected: int, fraction: float, minimum: int) -> int:
    """How many of `connected` nodes a round asks: `max(minimum, ceil(fraction * connected))`, at most all."""
    wanted = math.ceil(round(fraction * connected, 9))  # 0.05 * 1000 is 50.000000000000004 in binary
    return min(connected, max(minimum, wanted))


def sample_nodes(node_ids: Sequence[int], fraction: float, minimum: int, run_id: str, round_: int) -> list[int]:
    """The sorted ids of the nodes asked to train in round `round_`: a pure function of its arguments.

    The draw is seeded by SHA-256 of (run id, round), so a run (and its resume, which keeps the run id)
    asks the same nodes in the same round when the same node ids are connected.
    """
    ids = sorted(node_ids)
    k = sample_size(len(ids), fraction, minimum)
    if k >= len(ids):
        return ids
    seed = hashlib.sha256(f"weft-sample/v1/{run_id}/{round_}".encode()).digest()
    rng = np.random.default_rng(np.frombuffer(seed, dtype=np.uint32))
    return sorted(ids[i] for i in rng.choice(len(ids), size=k, replace=False))


def round_quorum(settings: Any, active_members: int, asked: int) -> int:
    """Accepted updates a round that asked `asked` nodes needs.

    Without sampling (`fraction_train` 1) it is `quorum` of the manifest's active members, as always; with
    sampling it is `quorum` of the nodes asked (at least 1): a sampled round could never reach the former.
    """
    if settings.fraction_train >= 1:
        return int(settings.min_accepted(active_members))
    return max(1, math.ceil(round(settings.quorum * asked, 9)))


def run_federation(grid: Grid, rt: CoordinatorRuntime) -> RunResult:
    """Run (or, with `settings.resume`, continue) every round of `rt.settings`; return the summary."""
    coordinator = Coordinator(grid, rt)
    state = coordinator.resume() if rt.settings.resume else coordinator.start()
    while state.round < rt.settings.rounds:
        state = coordinator.run_round(state)
    return coordinator.finish(state)


class Coordinator:
    """One run's coordinator: `start()` or `resume()`, then `run_round()` until done, then `finish()`."""

    def __init__(self, grid: Grid, rt: CoordinatorRuntime) -> None:
        self.grid, self.rt = grid, rt
        self.template: dict[str, ArraySpec] = structure(rt.initial_arrays)
        self.record: RunRecord | None = None
        self.started = time.monotonic()

    @property
    def need(self) -> int:
        """Accepted updates a round without sampling needs (suspended and revoked members do not count)."""
        return self.rt.settings.min_accepted(len(self.rt.manifest.active))

    @property
    def wait_for(self) -> int:
        """Connected nodes round 1 waits for: the quorum of active members, and at least `min_train_nodes`
        (never more than the active members)."""
        s = self.rt.settings
        return min(max(1, len(self.rt.manifest.active)), max(self.need, s.min_train_nodes))

    # ---- beginning -----------------------------------------------------------------------------------

    def start(self) -> RunState:
        """A new run: write the signed initial model and the ledger's start record; wait for the nodes."""
        s, rt = self.rt.settings, self.rt
        record = RunRecord.create(s.out_dir, rt.identity, s.federation_id, s.run_id, keep_updates=s.store_updates)
        self.record = record
        arrays = {name: np.asarray(a) for name, a in rt.initial_arrays.items()}
        signed = self._sign(0, arrays)
        self._guard(lambda: record.begin(arrays, signed, self._start_fields(arrays)))
        state = RunState(0, arrays, signed)
        self._summary(state, "running")
        self._wait_for_nodes(state)
        return state

    def resume(self) -> RunState:
        """Continue a stopped or crashed run from its last committed round."""
        s, rt = self.rt.settings, self.rt
        record, opened = RunRecord.reopen(s.out_dir, rt.identity, keep_updates=s.store_updates)
        self.record = record
        start = opened.start
        if start.get("federation_id") != s.federation_id or start.get("task") != s.task:
            raise RecordError(
                f"{s.out_dir}: the record is of another federation or task; resume with the same settings"
            )
        mine = self._start_fields(opened.arrays)
        start = {"payload": WEIGHTS, **start}  # runs recorded before payloads existed sent weights
        for name in ("rule", "policy", "server_optimizer", "payload"):
            if start.get(name) != mine[name]:
                raise RecordError(
                    f"{name}: the run was started with {start.get(name)}, this resume asks for {mine[name]}; "
                    "resume with the settings the run was started with"
                )
        # signatures bind the run id: the resumed run keeps the one its ledger started with
        rt.settings = replace(s, run_id=str(start["run_id"]))
        rt.server_optimizer.load_state(opened.optimizer_state)
        state = RunState(opened.round, opened.arrays, opened.signed)
        for body in opened.rounds:
            self._tally(state, body, opened.ended.get(int(body["round"])))
        if state.round < rt.settings.rounds:  # the next round's instructions (the schedule) are signed afresh
            state.signed = self._sign(state.round, state.arrays)
        self._guard(lambda: record.note_resume(opened.round))
        log.warning("resuming %s after round %d", s.out_dir, opened.round)
        self._summary(state, "running")
        self._wait_for_nodes(state)
        return state

    # ---- one round -----------------------------------------------------------------------------------

    def run_round(self, state: RunState) -> RunState:
        """Train, verify, aggregate, sign, evaluate and commit one round; return the new state."""
        s, rt, record = self.rt.settings, self.rt, self._record()
        rnd = state.round + 1
        round_start = time.monotonic()
        connected = sorted(self.grid.get_node_ids())
        node_ids = sample_nodes(connected, s.fraction_train, s.min_train_nodes, s.run_id, rnd)
        active = len(rt.manifest.active)
        need = round_quorum(s, active, len(node_ids))
        rt.observer.round_started(rnd, len(node_ids))
        base_digest = params_digest(state.arrays)
        manifest_file = self._guard(lambda: record.save_manifest(rt.manifest))
        expect = Expectation(s.federation_id, s.run_id, rnd, base_digest, self.template, rt.manifest, s.payload,
                             state.arrays)  # fmt: skip
        spool = UpdateSpool(record.updates_dir(rnd))
        instructions = _instructions(node_ids, MessageType.TRAIN, state.arrays, state.signed)

        # ---- verify each reply as it arrives; store the good ones --------------------------------------
        rejected, replied, caps, members = self._gather(instructions, expect, spool)
        _point("gathered")

        # ---- quorum: never produce a model from too few updates ----------------------------------------
        if len(spool) < need:
            reasons = ", ".join(f"{r}={n}" for r, n in sorted(Counter(str(x.reason) for x in rejected).items()))
            of = f"{active} active members" if s.fraction_train >= 1 else f"{len(node_ids)} nodes asked"
            error = (
                f"round {rnd}: accepted {len(spool)} update(s), quorum is {need} "
                f"({s.quorum:.0%} of {of}); rejected {len(rejected)}"
                f"{f' ({reasons})' if reasons else ''}, no reply from {len(node_ids) - replied}"
            )
            self._guard(lambda: record.fail_round(rnd, error, rt.manifest.version))
            self._guard(lambda: record.end("failed", {"rounds": state.round, "error": error}))
            self._summary(state, "failed", error=error)
            raise QuorumNotReached(error)

        # ---- policy and rule, in canonical order; the server optimizer; sign -----------------------------
        inputs = self._guard(spool.inputs)
        # compressed updates are aggregated as the weights they decode to
        inputs = [replace(i, source=as_weights(i.source, state.arrays, self.template, s.payload)) for i in inputs]
        agg = aggregate_round(self.template, state.arrays, inputs, rt.policy, rt.rule)
        _point("aggregated")
        arrays = rt.server_optimizer.step(state.arrays, agg.arrays)
        signed = self._sign(rnd, arrays)
        digest = params_digest(arrays)

        # ---- evaluate on the coordinator's held-out data, then commit ----------------------------------
        # The commit (model, optimizer state, then the ledger record) comes before the new model is sent
        # anywhere: a node never sees a model that a crash could take back (nodes refuse to go back a round).
        central = dict(rt.central_eval(arrays)) if rt.central_eval else {}
        accepted = [Contribution(item.member_id, item.update_digest.hex(), item.num_examples) for item in agg.order]
        report = RoundReport(
            round=rnd,
            nodes=len(node_ids),
            accepted=tuple(accepted),
            rejected=tuple(rejected),
            missing=len(node_ids) - replied,
            global_digest=digest.hex(),
            central=central,
            federated={},
            duration_s=0.0,
        )
        fields = self._round_fields(report, agg, spool, rejected, base_digest, manifest_file)
        fields["connected"] = len(connected)
        self._guard(lambda: record.commit_round(rnd, arrays, signed, rt.server_optimizer.state(), fields))
        _point("committed")

        # ---- federated evaluation of the committed model: signed replies, checked, in the ledger -----------
        evaluations: list[dict[str, Any]] = []
        federated: dict[str, float] = {}
        if s.federated_evaluation:
            federated, evaluations = collect_evaluations(
                self.grid, _instructions(sorted(caps), MessageType.EVALUATE, arrays, signed), caps, members,
                expect_round=rnd, model_digest=digest, settings=s, manifest=rt.manifest, timeout_s=s.round_timeout_s,
            )  # fmt: skip
        report = replace(report, federated=federated, duration_s=time.monotonic() - round_start)
        ended = {"round": rnd, "model_digest": digest.hex(), "evaluations": evaluations, "federated": federated,
                 "duration_s": round(report.duration_s, 3)}  # fmt: skip
        self._guard(lambda: record.end_round(fields, ended))
        next_state = RunState(rnd, arrays, signed, members_by_node=members)
        next_state.accepted, next_state.rejected = state.accepted, state.rejected
        next_state.rejected_by_reason, next_state.best = dict(state.rejected_by_reason), state.best
        self._count(next_state, report)
        self._summary(next_state, "running")
        rt.observer.round_finished(report)
        return next_state

    def finish(self, state: RunState) -> RunResult:
        """The N+1 phase (each partner personalizes locally), then the ledger's end record and the summary."""
        s, record = self.rt.settings, self._record()
        personal: list[dict[str, Any]] = []
        if s.personalize and state.members_by_node:
            phase = {wire.PHASE: wire.PHASE_PERSONALIZE}
            signed = self._sign(s.rounds, state.arrays, phase)
            binding = {"federation_id": s.federation_id, "run_id": s.run_id, "round": s.rounds,
                       "model_digest": params_digest(state.arrays)}  # fmt: skip
            personal = _personalize(self.grid, state.members_by_node, state.arrays, signed, binding,
                                    self.rt.manifest, s.round_timeout_s)  # fmt: skip
            self._guard(lambda: record.append_personalization(personal))
        final = params_digest(state.arrays).hex()
        self._guard(lambda: record.end("completed", {"rounds": state.round, "final_digest": final}))
        summary = self._summary(state, "completed", personal=personal)
        return RunResult(summary=summary, final_arrays=state.arrays)

    # ---- the steps -------------------------------------------------------------------------------------

    def _gather(
        self, instructions: list[Message], expect: Expectation, spool: UpdateSpool
    ) -> tuple[list[Rejected], int, dict[int, int], dict[int, str]]:
        """Verify each reply as it arrives; store accepted updates.

        Returns the rejections, the number of replies seen, {node id: example cap} of the nodes whose
        update was accepted (the only ones asked to evaluate), and {node id: member id} of the same nodes.
        """
        rt, policy = self.rt, self.rt.policy
        rejected: list[Rejected] = []
        replied = 0
        caps: dict[int, int] = {}
        members: dict[int, str] = {}
        measure = policy.weighting == "quality" or policy.quality_floor is not None
        # while no reply is waiting, the spool makes the updates stored so far durable (fsync), so little is
        # left to sync on the round's critical path when the last one arrives
        for reply in _collect(self.grid, instructions, rt.settings.round_timeout_s, idle=spool.sync):
            replied += 1
            outcome = verify_reply(reply, expect)
            if isinstance(outcome, Accepted):
                outcome = self._admit(outcome, spool, measure, caps, members, expect)
            if isinstance(outcome, Rejected):
                log.warning("round %d: rejected node %s: %s (%s)", expect.round, outcome.node_id, outcome.reason,
                            outcome.detail)  # fmt: skip
                rejected.append(outcome)
            rt.observer.reply_checked(expect.round, outcome)
            del reply, outcome  # keep at most one update in memory
            # Flower's records hold reference cycles; without this young-generation pass the dropped
            # replies linger until the collector's threshold (benchmarks/aggregation.py, "Coordinator memory").
            gc.collect(0)
        return rejected, replied, caps, members

    def _admit(
        self,
        ok: Accepted,
        spool: UpdateSpool,
        measure: bool,
        caps: dict[int, int],
        members: dict[int, str],
        expect: Expectation,
    ) -> Accepted | Rejected:
        """Apply the quality floor (when set); store an admitted update."""
        rt = self.rt
        score = None
        if measure:
            if rt.central_eval is None:
                raise RuntimeError("a quality policy needs held-out data at the coordinator")
            weights = ok.arrays
            if expect.payload != WEIGHTS and expect.base is not None:  # the weights a compressed update stands for
                weights = decode(ok.arrays, expect.base, self.template, expect.payload)
            value = rt.central_eval(weights).get(rt.settings.target_metric)
            score = float(value) if value is not None else float("nan")
            if below_floor(rt.policy, score):
                return Rejected(ok.node_id, RejectReason.BELOW_QUALITY_FLOOR,
                                f"{rt.settings.target_metric} {score:.6g} is worse than the floor "
                                f"{rt.policy.quality_floor:.6g}", ok.member_id)  # fmt: skip
        env = ok.envelope
        # the spool writes it while the next reply is checked; its writer passes the crash point `stored`
        self._guard(lambda: spool.put(ok.member_id, env.update_digest, env.num_examples, ok.arrays, ok.signed, score))
        member = rt.manifest.get(ok.member_id)
        caps[ok.node_id] = member.max_examples if member else 0
        members[ok.node_id] = ok.member_id
        return ok

    def _wait_for_nodes(self, state: RunState) -> None:
        s = self.rt.settings
        deadline = time.monotonic() + s.node_wait_timeout_s
        want = self.wait_for
        while (have := len(list(self.grid.get_node_ids()))) < want:
            if time.monotonic() > deadline:
                error = f"only {have} node(s) connected within {s.node_wait_timeout_s:.0f} s; the run needs {want}"
                self._summary(state, "failed", error=error)
                raise NotEnoughNodes(error)
            time.sleep(0.5)

    # ---- signing and bookkeeping ---------------------------------------------------------------------

    def _sign(
        self, round_: int, arrays: Mapping[str, np.ndarray], phase: Mapping[str, str] | None = None
    ) -> SignedBlob:
        """Sign the model after `round_` with the instructions for the next round (or `phase`'s)."""
        s = self.rt.settings
        envelope = GlobalModelEnvelope(
            federation_id=s.federation_id,
            run_id=s.run_id,
            round=round_,
            model_digest=params_digest(arrays),
            task=s.task,
            config={**s.instructions(round_ + 1), **(phase or {})},
        )
        return sign_global_model(self.rt.identity, envelope)

    def _start_fields(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        s, rt = self.rt.settings, self.rt
        return {
            "task": s.task,
            "coordinator_key": rt.identity.public_key.hex(),
            "initial_digest": params_digest(arrays).hex(),
            "rounds": s.rounds,
            "rule": rt.rule.describe(),
            "policy": rt.policy.describe(),
            "server_optimizer": rt.server_optimizer.describe(),
            "store_updates": s.store_updates,
            "payload": s.payload,
            "config": dict(s.record_config),
        }

    def _round_fields(
        self,
        report: RoundReport,
        agg: RoundAggregate,
        spool: UpdateSpool,
        rejected: list[Rejected],
        base_digest: bytes,
        manifest_file: str,
    ) -> dict[str, Any]:
        """The ledger's round record: everything `weft audit verify` needs to recheck and recompute it."""
        rt, record = self.rt, self._record()
        stored = {(e.update_digest, e.member_id): e for e in spool.entries()}
        selected = set(agg.selected)
        contributions = []
        for i, item in enumerate(agg.order):
            entry: SpooledUpdate = stored[(item.update_digest, item.member_id)]
            blob = entry.signed
            contributions.append({
                "member": item.member_id,
                "update_digest": item.update_digest.hex(),
                "num_examples": item.num_examples,
                "envelope": blob.body.hex(),
                "signature": blob.signature.hex(),
                "stored": entry.path.relative_to(record.out_dir).as_posix() if record.keep_updates else None,
                "score": item.score,
                "norm": agg.norms[i],
                "scale": agg.scales[i],
                "share": agg.shares[i],
                "selected": i in selected,
            })  # fmt: skip
        return {
            "round": report.round,
            "manifest": {
                "version": rt.manifest.version,
                "digest": hashlib.sha256(rt.manifest.canonical_bytes()).hexdigest(),
                "file": manifest_file,
            },
            "base_digest": base_digest.hex(),
            "nodes": report.nodes,
            "missing": report.missing,
            "contributions": contributions,
            "rejected": [r.to_json() for r in rejected],
            "rule": rt.rule.describe(),
            "policy": rt.policy.describe(),
            "server_optimizer": rt.server_optimizer.describe(),
            "rule_scores": list(agg.rule_scores),
            "aggregate_digest": params_digest(agg.arrays).hex(),
            "global_digest": report.global_digest,
            "central": dict(report.central),
        }

    def _tally(self, state: RunState, body: Mapping[str, Any], ended: Mapping[str, Any] | None) -> None:
        """Rebuild the running totals, last and best round from a committed round record (and its end record)."""
        report = RoundReport(
            round=int(body["round"]),
            nodes=int(body.get("nodes", 0)),
            accepted=tuple(
                Contribution(c["member"], c["update_digest"], c["num_examples"]) for c in body["contributions"]
            ),
            rejected=tuple(
                Rejected(r.get("node", 0), RejectReason(r["reason"]), r.get("detail", ""), r.get("member"))
                for r in body.get("rejected", [])
            ),
            missing=int(body.get("missing", 0)),
            global_digest=str(body["global_digest"]),
            central={k: v for k, v in body.get("central", {}).items() if isinstance(v, int | float)},
            federated={k: v for k, v in (ended or {}).get("federated", {}).items() if isinstance(v, int | float)},
            duration_s=0.0,
        )
        self._count(state, report)

    def _count(self, state: RunState, report: RoundReport) -> None:
        state.accepted += len(report.accepted)
        state.rejected += len(report.rejected)
        for rej in report.rejected:
            state.rejected_by_reason[str(rej.reason)] = state.rejected_by_reason.get(str(rej.reason), 0) + 1
        state.last = report
        if _better(self.rt.settings, report, state.best):
            state.best = report

    def _summary(
        self, state: RunState, status: str, error: str | None = None, personal: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        s, rt = self.rt.settings, self.rt
        last, best = state.last, state.best
        out: dict[str, Any] = {
            "status": status,
            "federation_id": s.federation_id,
            "run_id": s.run_id,
            "task": s.task,
            "config": dict(s.record_config),
            "rounds": state.round,
            "final": {"round": last.round, **last.central} if last else None,
            "best": {"round": best.round, "by": s.target_metric, **best.central} if best else None,
            "final_federated": dict(last.federated) if last else None,
            "final_accuracy": last.central.get("accuracy") if last else None,
            "final_loss": last.central.get("loss") if last else None,
            "final_federated_accuracy": last.federated.get("eval_accuracy") if last else None,
            "accuracy_measured_on": rt.central_eval_data,
            "accepted": state.accepted,
            "rejected": state.rejected,
            "rejected_by_reason": dict(sorted(state.rejected_by_reason.items())),
            "global_model_digest": last.global_digest if last else None,
            "global_model_file": FINAL_MODEL if last else None,
            "coordinator_public_key": rt.identity.public_key.hex(),
            "manifest_version": rt.manifest.version,
            "rule": rt.rule.describe(),
            "policy": rt.policy.describe(),
            "server_optimizer": rt.server_optimizer.describe(),
            "wall_s": round(time.monotonic() - self.started, 2),
        }
        if status == "running":
            out["pid"], out["host"] = os.getpid(), socket.gethostname()
        if personal:
            out["personalization"] = personal
        if error:
            out["error"] = error
        if self.record is not None:
            self._guard(lambda: self._record().write_summary(out))
        return out

    def _record(self) -> RunRecord:
        assert self.record is not None, "start() or resume() first"
        return self.record

    def _guard(self, write: Any) -> Any:
        """Run one record write; an OSError (disk full, folder made read-only) becomes one clear RecordError."""
        try:
            return write()
        except OSError as exc:
            where = exc.filename or self.rt.settings.out_dir
            raise RecordError(
                f"out: cannot write the run's record at {where} ({exc.strerror or exc}); free space or fix the "
                f"folder's permissions, then continue with --resume"
            ) from exc


# ---- helpers -----------------------------------------------------------------------------------------


def _personalize(
    grid: Grid,
    members: Mapping[int, str],
    arrays: Mapping[str, np.ndarray],
    signed: SignedBlob,
    binding: Mapping[str, Any],
    manifest: Any,
    timeout_s: float,
) -> list[dict[str, Any]]:
    """Ask the last round's contributors to personalize the final model; collect each one's before/after.

    Only signed, checked evaluation replies count (coordinator.evaluation): `eval_*` on the final model,
    `personal_*` after the node's local fine-tuning (absent when the partner configured none).
    """
    out: list[dict[str, Any]] = []
    messages = _instructions(sorted(members), MessageType.EVALUATE, arrays, signed)
    for reply in _collect(grid, messages, timeout_s, EVALUATION_REPLY_BYTES):
        try:
            env, _ = check_evaluation(reply, members, manifest, binding)
        except Exception as exc:  # a refused or unverifiable reply is left out, and said so in the log
            log.warning("personalization reply from node %s refused: %s", reply.metadata.src_node_id, exc)
            continue
        metrics = dict(env.metrics)
        out.append(
            {
                "member": env.sender,
                "before": {k.removeprefix("eval_"): v for k, v in sorted(metrics.items()) if k.startswith("eval_")},
                "after": {
                    k.removeprefix("personal_"): v for k, v in sorted(metrics.items()) if k.startswith("personal_")
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
    return bool(value > old if s.maximize else value < old)
