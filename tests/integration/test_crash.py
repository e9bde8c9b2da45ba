"""A simulated coordinator killed (SIGKILL) at several points, resumed each time, ends with the same model bytes.

`weft simulate` runs the coordinator in its own process, so killing that process kills the coordinator
mid-round. Kills land at exact places through the coordinator's crash points (WEFT_CRASH_AT: after the
updates are stored, after aggregation, with the round's model written but not committed, after the commit)
and once at a random moment; `--resume` continues each time. The final model must equal an uninterrupted
run's byte for byte, and the record must pass `weft audit verify`. (That nothing a killed run started
outlives it is tests/integration/test_sim_faults.py's.)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocols import load_public_key, read_signed_model

pytestmark = pytest.mark.integration

ARGS = ["--task", "synthetic", "--nodes", "4", "--rounds", "5", "--seed", "3", "--local-epochs", "2"]
TIMEOUT_S = 240


def weft(out: Path, *extra: str, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    env.pop("WEFT_CRASH_AT", None)
    if crash_at:
        env["WEFT_CRASH_AT"] = crash_at
    cmd = [sys.executable, "-m", "federation.cli", "simulate", *ARGS, "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, check=False)


def final_arrays(out: Path) -> dict[str, bytes]:
    key = load_public_key(out / "keys" / "coordinator.pub")
    model = read_signed_model(out / "global_model.npz", key)
    return {name: a.tobytes() for name, a in model.arrays.items()}


def resumes(out: Path) -> int:
    """How many resume records the ledger holds so far (a torn last line is not one)."""
    lines = (out / "ledger.jsonl").read_bytes().split(b"\n")[:-1]
    return sum(b'"kind":"resume"' in line for line in lines)


def status(out: Path) -> str:
    from coordinator import run_status

    return run_status(out)


def test_killed_and_resumed_runs_end_with_the_uninterrupted_model(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    proc = weft(reference)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "crashed"
    # Counts restart with each process: round 1 while the 4th node still trains (3 updates stored); round 2
    # after aggregating; round 3 with its model written but not committed; round 3 right after its commit.
    for i, point in enumerate(("stored:3", "aggregated:2", "model-written:2", "committed:1")):
        proc = weft(out, *(["--resume"] if i else []), crash_at=point)
        assert proc.returncode == -signal.SIGKILL, f"{point}: {proc.returncode}\n{proc.stderr[-2000:]}"
        assert status(out) == "interrupted"
        assert json.loads((out / "summary.json").read_text())["status"] == "running"
    rounds = [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2], rounds  # round 3 was committed with no metrics line yet: resume rebuilds it
    # once more at a random moment, from outside: once this attempt has resumed (its resume record is written),
    # 0.5-3 s into its rounds; on a fast machine it may finish first, and then there is nothing left to resume
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    cmd = [sys.executable, "-m", "federation.cli", "simulate", *ARGS, "--out", str(out), "--resume"]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while resumes(out) < 4 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(random.Random(0).uniform(0.5, 3.0))
    child.kill()
    if child.wait(timeout=30) != 0:  # the kill landed mid-run
        proc = weft(out, "--resume")
        assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["rounds"]) == ("completed", 5)
    assert final_arrays(out) == final_arrays(reference)
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]

    audit = subprocess.run(
        [sys.executable, "-m", "federation.cli", "audit", "verify", str(out),
         "--coordinator-key", str(out / "keys" / "coordinator.pub")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "5 round(s)" in audit.stdout and "5 aggregate(s) recomputed bit for bit" in audit.stdout
