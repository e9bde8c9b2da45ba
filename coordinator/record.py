"""The run's record on disk, written through one sink; and reopened after a crash.

Layout of `out_dir` (docs/PROTOCOL.md, "The run record"):
    ledger.jsonl                the hash-chained, signed ledger (protocols.ledger): the record of truth
    metrics.jsonl               one JSON line per round, for people and plots
    global/round-0000.npz ...   the signed global model after each round (protocols.modelfile)
    global_model.npz            the signed latest global model (the final one once the run completes)
    rounds/NNNN/updates/        the stored updates aggregated in round NNNN (protocols.stored)
    state/round-NNNN.npz        the server optimizer's state after round NNNN (when it has any)
    manifests/vNNNN.json        every manifest version a round was verified against
    summary.json                the outcome: running, completed, failed, or interrupted

Crash safety: every file is written atomically and owner-only (protocols.files). A round is committed by
its ledger record, written after the round's model, state and updates are on disk; `reopen` takes the last
committed round as the truth and removes whatever a crash left after it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protocols import Manifest, SignedBlob, SigningKey, read_signed_model, write_signed_model
from protocols.files import append_line, atomic_write, private_dir, truncate_to
from protocols.ledger import LEDGER_FILE, LedgerEntry, LedgerWriter, read_ledger, verify_chain
from protocols.npz import load_npz, save_npz

FINAL_MODEL = "global_model.npz"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"


class RecordError(RuntimeError):
    """The record cannot be written (or reopened); the message names the path and the fix."""


@dataclass(frozen=True)
class Reopened:
    """What a resumed coordinator starts from: the last committed round."""

    start: Mapping[str, Any]
    """The ledger's start record body."""
    rounds: Sequence[Mapping[str, Any]]
    """The committed round records, in order."""
    ended: Mapping[int, Mapping[str, Any]]
    """The evaluation record of each round that got one, by round."""
    round: int
    """The last committed round (0: none yet)."""
    arrays: dict[str, np.ndarray]
    """The signed global model after that round."""
    signed: SignedBlob
    optimizer_state: dict[str, np.ndarray]


class RunRecord:
    """Writes the record of one run; the round loop never touches a file directly."""

    def __init__(self, out_dir: Path, key: SigningKey, ledger: LedgerWriter, keep_updates: bool = True) -> None:
        self.out_dir, self._key, self.ledger, self.keep_updates = out_dir, key, ledger, keep_updates
        self.metrics_path = out_dir / METRICS
        self._saved_manifests: set[int] = set()

    # ---- opening -----------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, out_dir: Path, key: SigningKey, federation_id: str, run_id: str, keep_updates: bool = True
    ) -> RunRecord:
        """A new record; refuses a folder that already holds one."""
        for name in (METRICS, SUMMARY, LEDGER_FILE):
            if (out_dir / name).exists():
                raise FileExistsError(
                    f"{out_dir} already holds a run's record; choose another output folder (or --resume it)"
                )
        _writable(out_dir)
        _lock(out_dir)
        atomic_write(out_dir / METRICS, b"")
        return cls(out_dir, key, LedgerWriter(out_dir / LEDGER_FILE, key, federation_id, run_id), keep_updates)

    @classmethod
    def reopen(cls, out_dir: Path, key: SigningKey, keep_updates: bool = True) -> tuple[RunRecord, Reopened]:
        """Reopen a record after a crash or a stop: cut back to the last committed round, return it."""
        path = out_dir / LEDGER_FILE
        if not path.exists():
            raise RecordError(f"{out_dir}: no run to resume (no {LEDGER_FILE}); start it without --resume")
        _writable(out_dir)
        _lock(out_dir)
        read = read_ledger(path)
        if read.torn_tail:  # a crash in the middle of appending: that record was never committed
            truncate_to(path, read.valid_bytes)
        entries = read.entries
        problems = verify_chain(entries, key.public_key)
        if not entries or problems:
            raise RecordError(
                f"{out_dir}: refusing to resume an altered or foreign ledger: {(problems or ['empty'])[0]}"
            )
        last = entries[-1]
        if last.kind == "end" and last.body.get("status") == "completed":
            raise RecordError(
                f"{out_dir}: the run already completed {last.body.get('rounds')} round(s); nothing to resume"
            )
        rounds = [e.body for e in entries if e.kind == "round"]
        ended = {int(e.body["round"]): e.body for e in entries if e.kind == "evaluation"}
        done = int(rounds[-1]["round"]) if rounds else 0
        expected = rounds[-1]["global_digest"] if rounds else entries[0].body["initial_digest"]
        record = cls(out_dir, key, LedgerWriter.continuing(path, key, last), keep_updates)
        record._cut_back(done)
        record._rebuild_metrics(rounds, ended)
        model = read_signed_model(record._model_path(done), key.public_key)
        if model.envelope.model_digest.hex() != expected:
            raise RecordError(
                f"{record._model_path(done)} does not hold the model the ledger committed for round {done}"
            )
        signed = _signed_blob(record._model_path(done))
        state_path = record._state_path(done)
        state = load_npz(state_path) if state_path.exists() else {}
        if done >= 1:
            write_signed_model(out_dir / FINAL_MODEL, model.arrays, signed)
        start = entries[0].body
        return record, Reopened(start, rounds, ended, done, dict(model.arrays), signed, state)

    def _cut_back(self, done: int) -> None:
        """Remove every file of rounds after `done` and metrics lines beyond it."""
        for folder, pattern in ((self.out_dir / "global", "round-*.npz"), (self.out_dir / "state", "round-*.npz")):
            for path in folder.glob(pattern) if folder.exists() else ():
                if _round_of(path.stem) > done:
                    path.unlink()
        rounds_dir = self.out_dir / "rounds"
        for path in rounds_dir.iterdir() if rounds_dir.exists() else ():
            if path.name.isdigit() and int(path.name) > done:
                shutil.rmtree(path)
        if done == 0:
            (self.out_dir / FINAL_MODEL).unlink(missing_ok=True)

    def _rebuild_metrics(self, rounds: Sequence[Mapping[str, Any]], ended: Mapping[int, Mapping[str, Any]]) -> None:
        """metrics.jsonl is a projection of the ledger: rewrite it from the committed rounds."""
        lines = [metrics_line(body, ended.get(int(body["round"]))) for body in rounds]
        atomic_write(self.metrics_path, b"".join(_json_line(line) for line in lines))

    # ---- writing -----------------------------------------------------------------------------------

    def updates_dir(self, round_: int) -> Path:
        """Where a round's verified updates are stored."""
        return self.out_dir / "rounds" / f"{round_:04d}" / "updates"

    def begin(self, arrays: Mapping[str, np.ndarray], signed: SignedBlob, fields: Mapping[str, Any]) -> None:
        """Write the signed initial model and the ledger's start record."""
        write_signed_model(self._model_path(0), arrays, signed)
        self.ledger.append("start", {**fields, "initial_model": self._rel(self._model_path(0))})

    def note_resume(self, round_: int) -> None:
        """Record in the ledger that the run was resumed after `round_`."""
        self.ledger.append("resume", {"after_round": round_, "host": socket.gethostname(), "pid": os.getpid()})

    def save_manifest(self, manifest: Manifest) -> str:
        """Keep a copy of the manifest version in force (once per version); returns its path in the record."""
        path = self.out_dir / "manifests" / f"v{manifest.version:04d}.json"
        if manifest.version not in self._saved_manifests:
            signed = manifest if manifest.signature is not None else manifest.sign(self._key)  # built in process
            atomic_write(path, signed.to_json().encode())
            self._saved_manifests.add(manifest.version)
        return self._rel(path)

    def commit_round(
        self,
        round_: int,
        arrays: Mapping[str, np.ndarray],
        signed: SignedBlob,
        optimizer_state: Mapping[str, np.ndarray],
        ledger_fields: Mapping[str, Any],
    ) -> LedgerEntry:
        """Write the round's model and state, then commit the round with its ledger record, then global_model.npz."""
        write_signed_model(self._model_path(round_), arrays, signed)
        state = None
        if optimizer_state:
            save_npz(self._state_path(round_), optimizer_state)
            state = self._rel(self._state_path(round_))
        if not self.keep_updates:
            shutil.rmtree(self.updates_dir(round_).parent, ignore_errors=True)
        crash_point("model-written")
        entry = self.ledger.append(
            "round",
            {**finite_json(ledger_fields), "model_file": self._rel(self._model_path(round_)), "optimizer_state": state},
        )
        write_signed_model(self.out_dir / FINAL_MODEL, arrays, signed)
        return entry

    def end_round(self, round_fields: Mapping[str, Any], ended: Mapping[str, Any]) -> None:
        """The round's evaluation record (the signed evaluations of the committed model), then its metrics line."""
        entry = self.ledger.append("evaluation", finite_json(ended))
        self._append_metrics(metrics_line(round_fields, entry.body))

    def fail_round(self, round_: int, error: str, manifest_version: int) -> None:
        """Record a round that failed (no model was produced) in the ledger and metrics."""
        self.ledger.append("failure", {"round": round_, "error": error, "manifest_version": manifest_version})
        self._append_metrics(
            {"round": round_, "status": "failed", "error": error, "manifest_version": manifest_version}
        )

    def append_personalization(self, nodes: list[dict[str, Any]]) -> None:
        """Record each node's validation metrics before and after its local personalization."""
        self._append_metrics({"phase": "personalization", "nodes": nodes})

    def end(self, status: str, fields: Mapping[str, Any]) -> None:
        """The ledger's last record: how the run ended."""
        self.ledger.append("end", {**fields, "status": status})

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        """Write summary.json (atomically)."""
        path = self.out_dir / SUMMARY
        text = json.dumps(finite_json(summary), indent=2, sort_keys=True, allow_nan=False)
        atomic_write(path, (text + "\n").encode())
        return path

    # ---- paths -------------------------------------------------------------------------------------

    def _model_path(self, round_: int) -> Path:
        return self.out_dir / "global" / f"round-{round_:04d}.npz"

    def _state_path(self, round_: int) -> Path:
        return self.out_dir / "state" / f"round-{round_:04d}.npz"

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.out_dir).as_posix()

    def _append_metrics(self, line: Mapping[str, Any]) -> None:
        append_line(self.metrics_path, _json_line(line))


def _json_line(line: Mapping[str, Any]) -> bytes:
    return (json.dumps(finite_json(line), sort_keys=True, allow_nan=False) + "\n").encode()


def metrics_line(round_body: Mapping[str, Any], ended: Mapping[str, Any] | None) -> dict[str, Any]:
    """One metrics.jsonl line, from a round's ledger record and (once it exists) its evaluation record."""
    rejected = list(round_body.get("rejected", []))
    reasons: dict[str, int] = {}
    for rej in rejected:
        reasons[str(rej.get("reason"))] = reasons.get(str(rej.get("reason")), 0) + 1
    federated = dict((ended or {}).get("federated", {}))
    contributions = list(round_body.get("contributions", []))
    return {
        "round": round_body["round"],
        "manifest_version": round_body.get("manifest", {}).get("version"),
        **dict(round_body.get("central", {})),  # held-out metrics: loss, accuracy (or perplexity, ...)
        **{f"federated_{k.removeprefix('eval_')}": v for k, v in federated.items()},
        "nodes": round_body.get("nodes"),
        "accepted": len(contributions),
        "contributions": [
            {k: c.get(k) for k in ("member", "update_digest", "num_examples", "share")} for c in contributions
        ],
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "rejections": rejected,
        "missing": round_body.get("missing"),
        "global_model_digest": round_body.get("global_digest"),
        "duration_s": (ended or {}).get("duration_s"),
    }


def crash_point(name: str) -> None:
    """A crash-test point: with WEFT_CRASH_AT=<name>:<n>, the process kills itself the n-th time it passes here.

    The crash-safety tests use it to SIGKILL the coordinator at exact places: `stored` (one more update
    stored, other nodes still training), `gathered` (updates stored,
    nothing aggregated), `aggregated`, `model-written` (the round's model on disk, its ledger record not),
    `committed` (ledger record written, metrics and summary not). Never set in normal use.
    """
    spec = os.environ.get("WEFT_CRASH_AT")
    if not spec:
        return
    where, _, count = spec.partition(":")
    if where != name:
        return
    left = int(count or "1") - 1
    os.environ["WEFT_CRASH_AT"] = f"{where}:{left}"
    if left == 0:
        os.kill(os.getpid(), 9)


def mark_interrupted(out_dir: Path) -> None:
    """After Ctrl-C: a summary that says `running` now says `interrupted` (the ledger is left as it is)."""
    path = out_dir / SUMMARY
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if summary.get("status") == "running":
        summary["status"] = "interrupted"
        summary.pop("pid", None)
        atomic_write(path, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None: records are strict JSON, never `Infinity`."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def run_status(out_dir: Path) -> str:
    """`running`, `completed`, `failed` or `interrupted` (a `running` record whose process is gone)."""
    try:
        summary = json.loads((out_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return "interrupted" if (out_dir / LEDGER_FILE).exists() else "missing"
    status = str(summary.get("status", "missing"))
    if status == "running" and not _alive(summary.get("pid"), summary.get("host")):
        return "interrupted"
    return status


def _alive(pid: object, host: object) -> bool:
    if not isinstance(pid, int) or host != socket.gethostname():
        return host != socket.gethostname() and isinstance(pid, int)  # another machine's run: assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signed_blob(path: Path) -> SignedBlob:
    from protocols.modelfile import ENVELOPE_ENTRY, SIGNATURE_ENTRY

    entries = load_npz(path)
    return SignedBlob(entries[ENVELOPE_ENTRY].tobytes(), entries[SIGNATURE_ENTRY].tobytes())


def _round_of(stem: str) -> int:
    try:
        return int(stem.removeprefix("round-"))
    except ValueError:
        return -1


_LOCKS: dict[Path, int] = {}
"""Open lock files, by record folder: held until the process ends (the kernel drops the lock with it)."""


def _lock(out_dir: Path) -> None:
    """Refuse a second writer: one coordinator process per record folder, ever at the same time."""
    import fcntl

    key = out_dir.resolve()
    if key in _LOCKS:  # this process already holds it (a resumed run in the same process, as in tests)
        return
    fd = os.open(out_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise RecordError(
            f"{out_dir}: another coordinator process is writing this record; stop it first (or use another folder)"
        ) from exc
    _LOCKS[key] = fd


def _writable(out_dir: Path) -> None:
    try:
        private_dir(out_dir)
        probe = out_dir / f".weft-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RecordError(f"out: cannot write to {out_dir} ({exc.strerror or exc}); choose a writable folder") from exc
