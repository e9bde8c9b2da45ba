"""Faults in a real simulation: nodes whose process dies mid-round, and a `weft simulate` that is killed.

- 7 honest nodes and 3 `die` nodes (10 members): the die nodes SIGKILL their own Ray worker process
  after their first optimizer step in rounds 1 and 3, and train honestly in round 2. Every round must
  complete with the rest; the dead nodes are recorded as node_error; in round 2 they are back.
- `weft simulate` SIGKILLed after round 1 has started: within seconds no process it started (Ray's
  gcs_server, raylet, agents and workers, weft's watchdog) may be left (federation/reaper.py; Linux).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--task", "synthetic", "--seed", "7", "--local-epochs", "1"]
TIMEOUT_S = 240


def weft_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "federation.cli", "simulate", *ARGS, "--out", str(out), *extra]


def env() -> dict[str, str]:
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- dying nodes -----------------------------------------------------------------------------------------


def test_three_of_ten_nodes_die_mid_round_and_every_round_completes_with_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "dying"
    cmd = weft_cmd(out, "--nodes", "7", "--adversary", "die=3", "--rounds", "3")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env(), cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]

    manifest = json.loads((out / "manifest.json").read_text())
    dying = {m["member_id"] for m in manifest["members"] if m["name"].endswith("-die")}
    assert len(dying) == 3 and len(manifest["members"]) == 10

    lines = metrics(out)
    assert [line["round"] for line in lines] == [1, 2, 3]
    for line in lines:
        contributors = {c["member"] for c in line["contributions"]}
        if line["round"] % 2 == 1:  # the die nodes died mid-training: answered as node_error, at once
            assert (line["accepted"], line["rejected"], line["missing"]) == (7, 3, 0), line
            assert line["rejected_by_reason"] == {"node_error": 3}
            assert not contributors & dying
        else:  # replaced processes: the same nodes are back and accepted
            assert (line["accepted"], line["rejected"], line["missing"]) == (10, 0, 0), line
            assert dying <= contributors
        assert line["duration_s"] < 60  # nobody waited for the round's timeout
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "completed" and s["rounds"] == 3
    assert (s["accepted"], s["rejected"], s["rejected_by_reason"]) == (24, 6, {"node_error": 6})


# ---- a killed run leaves nothing behind ------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _descendants(root: int) -> set[int]:
    kids, out, todo = _children(), set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(kids.get(pid, []))
    return out - {root}


def _live(pid: int) -> bool:
    """Alive and not a zombie (a zombie is dead; only its exit status waits for a parent)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _in_session(sid: int) -> set[int]:
    """Live processes of session `sid` (the killed run's: it started in a session of its own)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _live(int(entry.name)):
            try:
                if os.getsid(int(entry.name)) == sid:
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def _mentions(text: str) -> set[int]:
    """Live processes whose command line mentions `text`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if text.encode() in (entry / "cmdline").read_bytes() and _live(int(entry.name)):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def _describe(pids: set[int]) -> str:
    lines = []
    for pid in sorted(pids):
        try:
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
            lines.append(f"{pid}: {cmdline[:150]!r}")
        except OSError:
            lines.append(f"{pid}: (gone)")
    return "\n".join(lines)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the reaper and this check use Linux /proc")
def test_a_sigkilled_simulation_leaves_no_process_behind(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    log = (tmp_path / "weft.log").open("w")
    proc = subprocess.Popen(
        weft_cmd(out, "--nodes", "3", "--rounds", "500", "--local-epochs", "3"),
        stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=REPO, start_new_session=True,
    )  # fmt: skip
    started: set[int] = set()
    session_dir = ""
    try:
        deadline = time.monotonic() + 120
        # mid-run: round 1 is recorded, and later rounds are in flight on the nodes' Ray workers
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None, (tmp_path / "weft.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "round 1 did not finish within 120 s"
            time.sleep(0.2)
        started = _descendants(proc.pid)
        names = [(Path("/proc") / str(p) / "cmdline").read_bytes() for p in started if _live(p)]
        for expected in (b"raylet", b"gcs_server", b"ray::ClientAppActor", b"ray::DashboardAgent", b"reaper.py"):
            assert any(expected in n for n in names), (expected, names)
        sessions = [s for s in Path("/tmp/ray").glob(f"session_*_{proc.pid}")] if Path("/tmp/ray").is_dir() else []
        session_dir = str(sessions[0]) if sessions else ""

        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        left: set[int] = set()
        while time.monotonic() < deadline:
            left = {p for p in started if _live(p)} | _in_session(proc.pid) | _mentions(str(tmp_path))
            if session_dir:
                left |= _mentions(session_dir)
            if not left:
                break
            time.sleep(0.25)
        assert not left, "processes outlived the killed run:\n" + _describe(left)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in started | _in_session(proc.pid):
            if _live(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        log.close()
