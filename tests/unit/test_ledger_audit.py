"""The ledger (protocols.ledger) and `weft audit verify` (protocols.audit) on real in-process runs.

An honest run verifies; a hand-edited ledger line, a swapped stored update, a forged round signature and a
contribution from a revoked member each fail, naming the round and what is wrong.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coordinator import run_federation
from federation.cli import main
from protocols import Domain, Manifest, SigningKey
from protocols.audit import verify_run
from protocols.ledger import GENESIS, LEDGER_FILE, LedgerWriter, read_ledger, verify_chain
from tests.unit.test_rounds import COORDINATOR, FakeGrid, flower_task_identity, nodes, runtime  # noqa: F401

ROUNDS = 3


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One honest 3-round run, copied fresh into each test that tampers with it."""
    base = tmp_path_factory.mktemp("honest")
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1  # type: ignore[assignment]
    try:
        run_federation(FakeGrid(nodes(base)), runtime(base / "out", rounds=ROUNDS))  # type: ignore[arg-type]
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved  # type: ignore[assignment]
    return base / "out"


@pytest.fixture
def run_dir(honest_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(honest_run, out)
    return out


def rewrite_ledger(run_dir: Path, edit: Callable[[dict[str, Any]], None], key: SigningKey = COORDINATOR) -> None:
    """Re-sign the whole ledger after `edit` changes record bodies: what a dishonest coordinator could do."""
    entries = read_ledger(run_dir / LEDGER_FILE).entries
    path = run_dir / LEDGER_FILE
    path.unlink()
    first = entries[0].body
    writer = LedgerWriter(path, key, first["federation_id"], first["run_id"])
    for entry in entries:
        body = {k: v for k, v in entry.body.items() if k not in ("ledger", "seq", "prev", "federation_id", "run_id")}
        edit(body)
        writer.append(body.pop("kind"), body)


# ---- the ledger itself --------------------------------------------------------------------------------


def test_the_ledger_is_chained_and_signed(run_dir: Path) -> None:
    read = read_ledger(run_dir / LEDGER_FILE)
    kinds = [e.kind for e in read.entries]
    assert kinds == ["start", "round", "evaluation", "round", "evaluation", "round", "evaluation", "end"]
    assert read.entries[0].body["prev"] == GENESIS
    assert [e.seq for e in read.entries] == list(range(8))
    assert all(b.body["prev"] == a.digest for a, b in zip(read.entries, read.entries[1:], strict=False))
    assert verify_chain(read.entries, COORDINATOR.public_key) == []
    assert not read.torn_tail
    round1 = read.entries[1].body
    assert round1["rule"] == {"rule": "fedavg"} and round1["policy"]["weighting"] == "examples"
    total = sum(c["num_examples"] for c in round1["contributions"])
    assert [c["share"] for c in round1["contributions"]] == pytest.approx(
        [c["num_examples"] / total for c in round1["contributions"]], rel=1e-12
    )
    assert all(
        len(c["envelope"]) > 100 and c["stored"].startswith("rounds/0001/updates/") for c in round1["contributions"]
    )


def test_a_dropped_record_breaks_the_chain(run_dir: Path) -> None:
    lines = (run_dir / LEDGER_FILE).read_bytes().splitlines(keepends=True)
    (run_dir / LEDGER_FILE).write_bytes(b"".join(lines[:2] + lines[3:]))
    problems = verify_chain(read_ledger(run_dir / LEDGER_FILE).entries, COORDINATOR.public_key)
    assert any("ledger line 3: seq is 3, expected 2" in p for p in problems)
    assert any("chain is broken" in p for p in problems)


def test_a_torn_last_line_is_reported_not_parsed(run_dir: Path) -> None:
    with (run_dir / LEDGER_FILE).open("ab") as fh:
        fh.write(b'{"body": {"kind": "rou')
    read = read_ledger(run_dir / LEDGER_FILE)
    assert read.torn_tail and len(read.entries) == 8
    assert read.valid_bytes == len((run_dir / LEDGER_FILE).read_bytes()) - len(b'{"body": {"kind": "rou')


def test_record_files_are_readable_by_their_owner_only(run_dir: Path, honest_run: Path) -> None:
    updates = list((honest_run / "rounds" / "0001" / "updates").iterdir())
    files = [honest_run / n for n in (LEDGER_FILE, "summary.json", "metrics.jsonl", "global/round-0001.npz")]
    for path in files + updates:
        assert path.stat().st_mode & 0o077 == 0, path
    for folder in (honest_run, honest_run / "rounds" / "0001" / "updates", honest_run / "global"):
        assert folder.stat().st_mode & 0o077 == 0, folder


# ---- the audit ------------------------------------------------------------------------------------------


def test_an_honest_run_verifies_and_every_aggregate_is_recomputed(run_dir: Path) -> None:
    verdict = verify_run(run_dir, COORDINATOR.public_key)
    assert verdict.problems == []
    assert (verdict.rounds, verdict.recomputed, verdict.contributions, verdict.status) == (
        ROUNDS,
        ROUNDS,
        9,
        "completed",
    )


def test_the_audit_reports_its_progress_round_by_round(run_dir: Path) -> None:
    seen: list[int] = []
    assert verify_run(run_dir, COORDINATOR.public_key, progress=seen.append).ok
    assert seen == [1, 2, 3]


def test_the_cli_says_ok_and_exits_0(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(run_dir)]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"OK: {run_dir}: ledger intact and signed; 3 round(s), 9 contribution(s) verified; 3 ")
    assert "pass --coordinator-key to pin it" in out.err


def test_a_hand_edited_ledger_line_fails(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = (run_dir / LEDGER_FILE).read_text().splitlines(keepends=True)
    doc = json.loads(lines[3])
    doc["body"]["contributions"][0]["num_examples"] += 1  # claim a bigger weight for one member
    lines[3] = json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n"
    (run_dir / LEDGER_FILE).write_text("".join(lines))
    assert main(["audit", "verify", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "FAIL: ledger line 4: the coordinator's signature does not verify (the record was altered)" in out


def test_a_swapped_stored_update_fails(run_dir: Path) -> None:
    first, second = sorted((run_dir / "rounds" / "0002" / "updates").iterdir())[:2]
    first.write_bytes(second.read_bytes())
    verdict = verify_run(run_dir, COORDINATOR.public_key)
    assert any(p.startswith("round 2: contribution of member") and "carries another envelope" in p
               for p in verdict.problems), verdict.problems  # fmt: skip


def test_a_stored_update_with_changed_arrays_fails(run_dir: Path) -> None:
    import numpy as np

    from protocols.stored import StoredUpdate, write_stored_update

    path = sorted((run_dir / "rounds" / "0001" / "updates").iterdir())[0]
    update = StoredUpdate(path)
    entries = {name: np.array(a) for name, a in update.arrays().items()}
    signed = update.signed()
    name = sorted(entries)[0]
    entries[name] = entries[name] + np.asarray(1e-3, dtype=entries[name].dtype)
    write_stored_update(path, entries, signed)
    verdict = verify_run(run_dir, COORDINATOR.public_key)
    assert any("round 1:" in p and "is not the update that was signed" in p for p in verdict.problems)


def test_a_forged_round_signature_fails(run_dir: Path) -> None:
    forger = SigningKey.from_seed(bytes([7]) * 32)
    lines = (run_dir / LEDGER_FILE).read_text().splitlines(keepends=True)
    doc = json.loads(lines[2])
    body = json.dumps(doc["body"], sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    doc["signature"] = forger.sign(Domain.LEDGER, body).hex()
    lines[2] = json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n"
    (run_dir / LEDGER_FILE).write_text("".join(lines))
    verdict = verify_run(run_dir, COORDINATOR.public_key)
    assert "ledger line 3: the coordinator's signature does not verify (the record was altered)" in verdict.problems


def test_a_ledger_signed_by_another_coordinator_fails_when_the_key_is_pinned(run_dir: Path) -> None:
    other = SigningKey.from_seed(bytes([8]) * 32)
    verdict = verify_run(run_dir, other.public_key)
    assert verdict.problems and "not " + other.public_key.member_id in verdict.problems[-1]


def test_a_contribution_from_a_revoked_member_fails(run_dir: Path) -> None:
    # A dishonest coordinator folds in a revoked member's update and re-signs everything it controls:
    # a manifest version 2 that revokes n1, cited by round 2. The member's own signature still binds the update.
    v1 = Manifest.load(run_dir / "manifests" / "v0001.json", COORDINATOR.public_key)
    n1 = v1.find("n1")
    v2 = v1.with_status(n1.member_id, "revoked").save(run_dir / "manifests" / "v0002.json", COORDINATOR)
    assert v2.version == 2
    import hashlib

    def cite_v2(body: dict[str, Any]) -> None:
        if body.get("kind") == "round" and body["round"] == 2:
            body["manifest"] = {"version": 2, "digest": hashlib.sha256(v2.canonical_bytes()).hexdigest(),
                                "file": "manifests/v0002.json"}  # fmt: skip

    rewrite_ledger(run_dir, cite_v2)
    verdict = verify_run(run_dir, COORDINATOR.public_key)
    assert f"round 2: contribution of member {n1.member_id}: member 'n1' is revoked in manifest version 2" in (
        verdict.problems
    ), verdict.problems


def test_a_changed_global_model_file_fails(run_dir: Path) -> None:
    shutil.copy(run_dir / "global" / "round-0001.npz", run_dir / "global" / "round-0002.npz")
    verdict = verify_run(run_dir, COORDINATOR.public_key)
    assert "round 2: round-0002.npz is not the model the ledger records (digest differs)" in verdict.problems


def test_an_inflated_federated_metric_fails(run_dir: Path) -> None:
    def inflate(body: dict[str, Any]) -> None:
        if body.get("kind") == "evaluation" and body["round"] == 1:
            body["federated"]["eval_accuracy"] = 0.999

    rewrite_ledger(run_dir, inflate)
    verdict = verify_run(run_dir, COORDINATOR.public_key)
    assert "round 1: the federated metrics are not the mean of the signed evaluations" in verdict.problems


def test_not_a_run_folder_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    verdict = verify_run(tmp_path)
    assert verdict.problems == [f"{tmp_path}: no {LEDGER_FILE}; this is not a weft run record"]


def test_the_audit_runs_without_flwr_or_torch(run_dir: Path) -> None:
    # A partner's auditor may have neither installed: block both imports and run the real command.
    import subprocess
    import sys

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('flwr', 'torch', 'transformers', 'ray'):\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from federation.cli import main\n"
        f"sys.exit(main(['audit', 'verify', {str(run_dir)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK: ") and "3 aggregate(s) recomputed bit for bit" in proc.stdout
