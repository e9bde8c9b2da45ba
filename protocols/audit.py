"""`weft audit verify`: check a run's record offline, trusting nothing the operator says.

Given a run folder (a simulation's `--out`, or a deployed coordinator's run folder), it checks:
- the ledger: every record signed by the coordinator, the hash chain unbroken, nothing dropped or moved;
- every manifest version the rounds cite: signed by the coordinator, with the digest the ledger records;
- every contribution: its envelope signed by a member that was active in the manifest in force, bound to
  this federation, run, round and base model, within the member's example cap; its stored update the very
  arrays that were signed;
- every round's aggregate, recomputed bit for bit from the stored updates with the recorded policy, rule
  and server optimizer (protocols.aggregation), against the digest the coordinator signed, and every signed
  global model file against the ledger;
- every counted evaluation: signed by the member, bound to the model evaluated; the federated figures
  recomputed from them.

Pure Python + numpy + cryptography: it runs without flwr or torch. Specified in docs/PROTOCOL.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocols.aggregation import RoundInput, aggregate_round
from protocols.digest import params_digest, structure
from protocols.envelope import EvaluationEnvelope, UpdateEnvelope
from protocols.errors import ProtocolError
from protocols.evaluation import federated_means, metric_problem
from protocols.identity import Domain, PublicKey
from protocols.ledger import LEDGER_FILE, LedgerEntry, read_ledger, verify_chain
from protocols.manifest import Manifest
from protocols.modelfile import read_signed_model
from protocols.payload import WEIGHTS, as_weights
from protocols.reasons import RejectReason
from protocols.server_opt import ServerOptimizer, optimizer_from_description
from protocols.stored import StoredUpdate
from protocols.text import printable


@dataclass
class Verdict:
    """The outcome of an audit: `ok` only when nothing at all is wrong."""

    run_dir: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rounds: int = 0
    contributions: int = 0
    recomputed: int = 0
    status: str = "unknown"

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems


class _Stop(Exception):
    """A problem after which nothing further can be checked."""


def verify_run(
    run_dir: Path, coordinator_key: PublicKey | None = None, progress: Callable[[int], None] | None = None
) -> Verdict:
    """Audit the record in `run_dir`; with `coordinator_key`, the ledger must be signed by exactly that key.

    `progress`, when given, is called with each round number once that round has been checked.
    """
    verdict = Verdict(run_dir)
    try:
        _Audit(run_dir, coordinator_key, verdict, progress).run()
    except _Stop as exc:
        verdict.problems.append(str(exc))
    except Exception as exc:  # a record malformed in a way no check names: still a verdict, never a crash
        verdict.problems.append(f"the record is malformed: {type(exc).__name__}: {printable(exc)}")
    return verdict


class _Audit:
    def __init__(
        self, run_dir: Path, pinned: PublicKey | None, verdict: Verdict, progress: Callable[[int], None] | None
    ) -> None:
        self.dir, self.pinned, self.v, self.progress = run_dir, pinned, verdict, progress
        self.manifests: dict[int, Manifest] = {}
        self.last: tuple[int, str, Manifest | None] = (0, "", None)
        """(round, global digest, manifest in force) of the last committed round."""

    def problem(self, text: str) -> None:
        self.v.problems.append(text)

    # ---- the whole run -------------------------------------------------------------------------------

    def run(self) -> None:
        path = self.dir / LEDGER_FILE
        if not path.exists():
            raise _Stop(f"{self.dir}: no {LEDGER_FILE}; this is not a weft run record")
        try:
            read = read_ledger(path)
        except ProtocolError as exc:
            raise _Stop(str(exc)) from exc
        if read.torn_tail:
            self.v.notes.append("the ledger ends with a torn record: the coordinator was killed while writing it")
        entries = read.entries
        if not entries:
            raise _Stop("the ledger is empty")
        start = entries[0].body
        key = self._coordinator_key(start)
        chain = verify_chain(entries, key)
        if chain:
            self.v.problems.extend(chain)
            raise _Stop("the ledger's chain or signatures are broken: its contents cannot be trusted")
        rule, policy, optimizer = self._rebuild(start)
        base = self._model(0, str(start.get("initial_digest")), key)
        self.v.status = "interrupted"
        expected = 1
        for entry in entries[1:]:
            if entry.kind == "round":
                rnd = int(entry.body.get("round", -1))
                if rnd != expected:
                    self.problem(f"round {rnd}: expected round {expected} next (ledger line {entry.number})")
                    return
                after = self._round(entry, start, base, key, rule, policy, optimizer)
                if after is None:
                    return
                base = after
                expected += 1
                self.v.rounds = rnd
                if self.progress is not None:
                    self.progress(rnd)
            elif entry.kind == "evaluation":
                rnd, digest, manifest = self.last
                if entry.body.get("round") != rnd or entry.body.get("model_digest") != digest:
                    self.problem(f"ledger line {entry.number}: an evaluation record of another round than {rnd}")
                else:
                    self._evaluations(entry.body, rnd, manifest)
            elif entry.kind == "end":
                self.v.status = str(entry.body.get("status"))
                final = entry.body.get("final_digest")
                if final is not None and final != params_digest(base).hex():
                    self.problem(f"end record: final digest {final} is not the last round's model")
            elif entry.kind == "failure":
                self.v.notes.append(f"round {entry.body.get('round')} failed: {str(entry.body.get('error'))[:200]}")
            elif entry.kind == "resume":
                self.v.notes.append(f"resumed after round {entry.body.get('after_round')}")
                self.v.status = "interrupted"  # until an end record says otherwise

    def _coordinator_key(self, start: Mapping[str, Any]) -> PublicKey:
        try:
            recorded = PublicKey.from_hex(str(start.get("coordinator_key")))
        except (ValueError, ProtocolError) as exc:
            raise _Stop("start record: coordinator_key is not an Ed25519 public key") from exc
        if self.pinned is None:
            self.v.notes.append(
                f"trusting the coordinator key the ledger names ({recorded.member_id}); "
                "pass --coordinator-key to pin it"
            )
            return recorded
        if recorded != self.pinned:
            raise _Stop(f"the ledger was written by coordinator {recorded.member_id}, not {self.pinned.member_id}")
        return self.pinned

    def _rebuild(self, start: Mapping[str, Any]) -> tuple[Any, Any, ServerOptimizer]:
        from protocols.policy import policy_from_description
        from protocols.robust import rule_from_description

        try:
            return (
                rule_from_description(start["rule"]),
                policy_from_description(start["policy"]),
                optimizer_from_description(start["server_optimizer"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _Stop(f"start record: cannot rebuild the aggregation settings ({exc})") from exc

    def _model(self, round_: int, digest: str, key: PublicKey) -> dict[str, np.ndarray]:
        path = self.dir / "global" / f"round-{round_:04d}.npz"
        try:
            model = read_signed_model(path, key)
        except (ProtocolError, OSError) as exc:
            raise _Stop(f"round {round_}: the signed global model {path.name}: {exc}") from exc
        if model.envelope.model_digest.hex() != digest:
            raise _Stop(f"round {round_}: {path.name} is not the model the ledger records (digest differs)")
        if model.envelope.round != round_:
            raise _Stop(f"round {round_}: {path.name} is signed as the model of round {model.envelope.round}")
        return dict(model.arrays)

    def _manifest(self, info: Mapping[str, Any], key: PublicKey, rnd: int) -> Manifest | None:
        version = info.get("version")
        if not isinstance(version, int):
            self.problem(f"round {rnd}: no manifest version recorded")
            return None
        if version not in self.manifests:
            path = self.dir / "manifests" / f"v{version:04d}.json"
            try:
                self.manifests[version] = Manifest.load(path, key)
            except (ProtocolError, OSError) as exc:
                self.problem(f"round {rnd}: manifest version {version} ({path.name}): {exc}")
                return None
        manifest = self.manifests[version]
        if hashlib.sha256(manifest.canonical_bytes()).hexdigest() != info.get("digest"):
            self.problem(f"round {rnd}: manifest version {version} is not the one the ledger records (digest)")
            return None
        return manifest

    # ---- one round ---------------------------------------------------------------------------------------

    def _round(
        self,
        entry: LedgerEntry,
        start: Mapping[str, Any],
        base: dict[str, np.ndarray],
        key: PublicKey,
        rule: Any,
        policy: Any,
        optimizer: ServerOptimizer,
    ) -> dict[str, np.ndarray] | None:
        body = entry.body
        rnd = int(body["round"])
        for name in ("rule", "policy", "server_optimizer"):
            if body.get(name) != start.get(name):
                self.problem(f"round {rnd}: {name} differs from the one the run started with")
        base_digest = params_digest(base).hex()
        if body.get("base_digest") != base_digest:
            self.problem(f"round {rnd}: base_digest is not the previous round's model")
        manifest = self._manifest(body.get("manifest") or {}, key, rnd)
        self.last = (rnd, str(body.get("global_digest")), manifest)
        for rej in body.get("rejected", []):
            if rej.get("reason") not in {r.value for r in RejectReason}:
                self.problem(f"round {rnd}: rejection with unknown reason {str(rej.get('reason'))[:40]!r}")
        inputs: list[RoundInput] = []
        complete = True
        for c in body.get("contributions", []):
            item = self._contribution(c, rnd, base, base_digest, start, manifest, policy)
            self.v.contributions += 1
            if item is None:
                complete = False
            else:
                inputs.append(item)
        next_model = self._model(rnd, str(body.get("global_digest")), key)
        if not complete or not inputs:
            if complete:
                self.problem(f"round {rnd}: a committed round with no contribution")
            return next_model if not self.v.problems else None
        try:
            agg = aggregate_round(structure(base), base, inputs, policy, rule)
        except (ValueError, ProtocolError, KeyError) as exc:
            self.problem(f"round {rnd}: the aggregate cannot be recomputed: {exc}")
            return None
        recorded = body.get("contributions", [])
        if [c.get("share") for c in recorded] != list(agg.shares):
            self.problem(f"round {rnd}: the recorded shares are not what the policy gives")
        if [bool(c.get("selected")) for c in recorded] != [i in set(agg.selected) for i in range(len(agg.order))]:
            self.problem(f"round {rnd}: the recorded selection is not what the rule selects")
        if params_digest(agg.arrays).hex() != body.get("aggregate_digest"):
            self.problem(f"round {rnd}: the recomputed aggregate differs from the recorded one")
            return None
        stepped = optimizer.step(base, agg.arrays)
        if params_digest(stepped).hex() != body.get("global_digest"):
            self.problem(f"round {rnd}: the recomputed global model differs from the one the coordinator signed")
            return None
        self.v.recomputed += 1
        return next_model

    def _contribution(
        self,
        c: Mapping[str, Any],
        rnd: int,
        base: dict[str, np.ndarray],
        base_digest: str,
        start: Mapping[str, Any],
        manifest: Manifest | None,
        policy: Any,
    ) -> RoundInput | None:
        who = f"round {rnd}: contribution of member {str(c.get('member'))[:16]}"
        try:
            body, signature = bytes.fromhex(str(c["envelope"])), bytes.fromhex(str(c["signature"]))
            env = UpdateEnvelope.decode(body)
        except (KeyError, ValueError, ProtocolError) as exc:
            self.problem(f"{who}: its envelope cannot be read ({exc})")
            return None
        member = manifest.get(env.sender) if manifest else None
        if member is None:
            self.problem(f"{who}: sender {env.sender} is not in the manifest in force")
            return None
        try:
            member.public_key.verify(Domain.UPDATE, body, signature)
        except (ProtocolError, ValueError):
            self.problem(f"{who}: the member's signature on the envelope does not verify")
            return None
        if not member.active:
            self.problem(f"{who}: member {member.name!r} is {member.status} in manifest version {manifest.version}")  # type: ignore[union-attr]
        expected = {
            "sender": c.get("member"),
            "federation_id": start.get("federation_id"),
            "run_id": start.get("run_id"),
            "round": rnd,
        }
        for name, value in expected.items():
            if getattr(env, name) != value:
                self.problem(f"{who}: the envelope's {name} is {getattr(env, name)!r}, the ledger says {value!r}")
        if env.base_digest.hex() != base_digest:
            self.problem(f"{who}: trained from another base model")
        run_payload = start.get("payload", WEIGHTS)
        if env.payload != run_payload:
            self.problem(f"{who}: sent payload {env.payload!r}, the run asked for {run_payload!r}")
        if env.update_digest.hex() != c.get("update_digest") or env.num_examples != c.get("num_examples"):
            self.problem(f"{who}: digest or example count differ from its signed envelope")
        if not 1 <= env.num_examples <= member.max_examples:
            self.problem(f"{who}: claims {env.num_examples} examples, allowed 1..{member.max_examples}")
        from protocols.policy import below_floor

        score = c.get("score")
        if policy.quality_floor is not None and below_floor(policy, score):
            self.problem(f"{who}: its quality score {score} is below the floor {policy.quality_floor}")
        stored = c.get("stored")
        if stored is None:
            self.v.notes.append(f"round {rnd}: updates were not stored; the aggregate was not recomputed")
            return None
        update = StoredUpdate(self.dir / str(stored))
        try:
            signed = update.signed()
            digest = params_digest(update.arrays())
        except (ProtocolError, OSError, ValueError) as exc:
            self.problem(f"{who}: stored update {stored}: {exc}")
            return None
        if (signed.body, signed.signature) != (body, signature):
            self.problem(f"{who}: stored update {stored} carries another envelope than the ledger records")
            return None
        if digest != env.update_digest:
            self.problem(f"{who}: stored update {stored} is not the update that was signed (digest differs)")
            return None
        # a compressed update is signed over its compressed arrays; the aggregate is built from the
        # weights they decode to against the round's base model (protocols/payload.py)
        source = as_weights(update, base, structure(base), env.payload)
        return RoundInput(env.sender, env.update_digest, env.num_examples, source,
                          float(score) if isinstance(score, int | float) else None)  # fmt: skip

    def _evaluations(self, body: Mapping[str, Any], rnd: int, manifest: Manifest | None) -> None:
        """Re-check every counted evaluation as the coordinator had to, and recompute the federated means."""
        counted: list[tuple[int, Mapping[str, float]]] = []
        for e in body.get("evaluations", []):
            if "refused" in e:
                continue
            who = f"round {rnd}: evaluation by member {str(e.get('member'))[:16]}"
            try:
                raw, signature = bytes.fromhex(str(e["envelope"])), bytes.fromhex(str(e["signature"]))
                env = EvaluationEnvelope.decode(raw)
            except (KeyError, ValueError, ProtocolError) as exc:
                self.problem(f"{who}: its envelope cannot be read ({exc})")
                continue
            member = manifest.get(env.sender) if manifest else None
            try:
                if member is None:
                    raise ValueError("not a member")
                member.public_key.verify(Domain.EVALUATION, raw, signature)
            except (ProtocolError, ValueError):
                self.problem(f"{who}: its signature does not verify under a member key")
                continue
            if not member.active or e.get("member") != env.sender:
                self.problem(f"{who}: not signed by an active member, or recorded under another member")
            if env.round != rnd or env.model_digest.hex() != body.get("model_digest"):
                self.problem(f"{who}: it evaluated another model than round {rnd}'s")
            for name, value in env.metrics.items():
                problem = metric_problem(name, value)
                if problem:
                    self.problem(f"{who}: {problem}; it should never have counted")
            weight = min(env.num_examples, member.max_examples)
            if weight != e.get("weight") or dict(env.metrics) != e.get("metrics"):
                self.problem(f"{who}: the recorded weight or metrics differ from the signed ones")
            counted.append((weight, env.metrics))
        means = federated_means(counted)
        if body.get("evaluations") is not None and means != body.get("federated", {}):
            self.problem(f"round {rnd}: the federated metrics are not the mean of the signed evaluations")
