"""federation/adversary.py, the adversary counts of federation/config.py, and federation/reaper.py.

The adversaries' effect on a real run (rejected, accepted, dead nodes) is in tests/integration.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from federation import adversary
from federation.adversary import Adversaries, corrupt_delta, dies_in
from federation.config import (
    ACCEPTED_ADVERSARIES,
    ADVERSARY_OUTCOMES,
    ADVERSARY_REASONS,
    FAULT_REASONS,
    MAX_ADVERSARIES,
    ConfigError,
    SimulationConfig,
    parse_adversaries,
)
from federation.reaper import TOKEN_ENV, Marks, Reaper, marked_processes, reap
from node.app import handle_train
from protocols import RejectReason, params_digest
from tests.unit.test_node import GLOBAL_ROUND, global_arrays, instruction, runtime, update_of

# ---- signflip and scale: exact numbers -------------------------------------------------------------------


def test_signflip_negates_the_delta_and_scale_multiplies_it_by_100() -> None:
    g: dict[str, np.ndarray] = {
        "w": np.array([1.0, 2.0, -3.0], dtype=np.float32),
        "steps": np.array([5], dtype=np.int64),
    }
    t: dict[str, np.ndarray] = {
        "w": np.array([1.5, 1.0, -3.0], dtype=np.float32),
        "steps": np.array([6], dtype=np.int64),
    }
    flipped = corrupt_delta(g, t, -1.0)
    np.testing.assert_array_equal(flipped["w"], np.array([0.5, 3.0, -3.0], dtype=np.float32))
    scaled = corrupt_delta(g, t, 100.0)
    np.testing.assert_array_equal(scaled["w"], np.array([51.0, -98.0, -3.0], dtype=np.float32))
    for out in (flipped, scaled):
        assert out["w"].dtype == np.float32
        np.testing.assert_array_equal(out["steps"], [6])  # integer arrays are sent as trained
        assert out["steps"].dtype == np.int64


def test_corrupt_delta_keeps_each_dtype_and_leaves_the_inputs_alone() -> None:
    g: dict[str, np.ndarray] = {"a": np.array([[0.25, -1.0]], dtype=np.float64), "b": np.array([2.0], dtype=np.float16)}
    t: dict[str, np.ndarray] = {"a": np.array([[0.75, 1.0]], dtype=np.float64), "b": np.array([2.5], dtype=np.float16)}
    out = corrupt_delta(g, t, -1.0)
    np.testing.assert_array_equal(out["a"], [[-0.25, -3.0]])
    np.testing.assert_array_equal(out["b"], np.array([1.5], dtype=np.float16))
    assert (out["a"].dtype, out["b"].dtype) == (np.float64, np.float16)
    np.testing.assert_array_equal(t["a"], [[0.75, 1.0]])  # not modified in place


def _context(pid: int = 0) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": pid}, state=RecordDict(), run_config={})


@pytest.mark.parametrize(("kind", "factor"), [("signflip", -1.0), ("scale", 100.0)])
def test_signflip_and_scale_send_a_validly_signed_corrupted_update(tmp_path: Path, kind: str, factor: float) -> None:
    rt = runtime(tmp_path)
    start = global_arrays()
    msg = instruction(start)
    honest = handle_train(rt, msg)
    honest_env, trained = update_of(honest)
    reply = Adversaries({0: kind}, lambda _ctx: rt)(msg, _context(), lambda _m, _c: honest)
    env, sent = update_of(reply)  # raises unless the node's own key signed it
    assert env.update_digest != honest_env.update_digest
    assert env.update_digest == params_digest(sent)
    assert (env.round, env.base_digest, env.num_examples) == (honest_env.round, honest_env.base_digest, 20)
    for name in start:
        expected = start[name] + np.float32(factor) * (trained[name] - start[name])
        np.testing.assert_array_equal(sent[name], expected.astype(np.float32))
    # a different node is not touched
    assert Adversaries({1: kind}, lambda _ctx: rt)(msg, _context(0), lambda _m, _c: honest) is honest


# ---- die -------------------------------------------------------------------------------------------------


def test_die_nodes_die_in_odd_rounds_only() -> None:
    assert [r for r in range(1, 8) if dies_in(r)] == [1, 3, 5, 7]
    assert not dies_in(None)


class _Killed(Exception):
    pass


def test_a_die_node_kills_its_own_process_after_its_first_optimizer_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kills: list[tuple[int, int]] = []
    steps: list[int] = []

    def fake_kill(pid: int, sig: int) -> None:
        kills.append((pid, sig))
        raise _Killed

    monkeypatch.setattr(adversary.os, "kill", fake_kill)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train(_msg: Message, _ctx: Context) -> Message:
        for step in range(3):
            opt.zero_grad()
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
            steps.append(step)
        raise AssertionError("training went on after the process should have died")

    msg = instruction(global_arrays(), round=0)  # the instruction of round 1: an odd round
    with pytest.raises(_Killed):
        Adversaries({0: "die"}, lambda _ctx: runtime(tmp_path))(msg, _context(), train)
    assert steps == [] and kills == [(os.getpid(), signal.SIGKILL)]  # died inside the first opt.step()


def test_a_die_node_trains_honestly_in_even_rounds(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    even = instruction(global_arrays(), round=GLOBAL_ROUND + 1)  # global model of round 5 -> round 6
    assert not dies_in(GLOBAL_ROUND + 2)
    honest = handle_train(rt, even)
    assert Adversaries({0: "die"}, lambda _ctx: rt)(even, _context(), lambda _m, _c: honest) is honest


# ---- configuration ---------------------------------------------------------------------------------------


def test_every_kind_has_an_outcome_and_rejected_kinds_keep_their_reasons() -> None:
    assert list(ADVERSARY_OUTCOMES) == [*ADVERSARY_REASONS, *ACCEPTED_ADVERSARIES, *FAULT_REASONS]
    assert {ADVERSARY_OUTCOMES[k] for k in ACCEPTED_ADVERSARIES} == {None}
    assert RejectReason(FAULT_REASONS["die"]) == RejectReason.NODE_ERROR
    assert parse_adversaries("signflip=1,scale=2,die=3") == {"signflip": 1, "scale": 2, "die": 3}
    # `all` stays one of each kind the coordinator must reject
    assert parse_adversaries("all") == dict.fromkeys(ADVERSARY_REASONS, 1)
    assert SimulationConfig(adversaries={"die": 1, "scale": 1, "tamper": 1}).adversary_kinds == [
        "tamper",
        "scale",
        "die",
    ]


def _too_large(count: str, kind: str) -> str:
    return (
        f"adversary: count {count} for {kind!r} is too large; use at most {MAX_ADVERSARIES} adversarial nodes in total"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tamper=99999999999999999999", _too_large("999999999999...", "tamper")),
        ("tamper=1001", _too_large("1001", "tamper")),
        ("nan=" + "9" * 5000, _too_large("999999999999...", "nan")),
        (
            "tamper=600,die=401",
            f"adversary: 1001 adversarial nodes in total; use at most {MAX_ADVERSARIES} (lower the counts)",
        ),
        ("tamper=1.5", "adversary: expected kind=count, got 'tamper=1.5'"),
        ("die=-3", "adversary: expected kind=count, got 'die=-3'"),
    ],
)
def test_adversary_counts_are_bounded(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc_info:
        parse_adversaries(text)
    assert str(exc_info.value) == message


def test_adversary_counts_at_the_bound_and_with_leading_zeros_are_fine() -> None:
    assert parse_adversaries(f"tamper={MAX_ADVERSARIES}") == {"tamper": MAX_ADVERSARIES}
    assert parse_adversaries("scale=0007,die=000") == {"scale": 7, "die": 0}


def test_simulation_config_bounds_the_adversaries_too() -> None:
    with pytest.raises(ConfigError, match=r"^adversary: 1001 adversarial nodes in total"):
        SimulationConfig(adversaries={"tamper": 1000, "die": 1})


# ---- reaper ----------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="the reaper reads Linux /proc")


@needs_proc
def test_reap_kills_exactly_the_processes_carrying_the_token() -> None:
    token = "t" + os.urandom(8).hex()
    tagged = subprocess.Popen(["sleep", "60"], env={**os.environ, TOKEN_ENV: token})
    other = subprocess.Popen(["sleep", "60"], env={**os.environ, TOKEN_ENV: token + "x"})
    try:
        assert marked_processes(Marks(token)) == [tagged.pid]
        assert reap(Marks(token), grace_s=2.0) == [tagged.pid]
        assert tagged.wait(timeout=5) == -signal.SIGTERM
        assert other.poll() is None
    finally:
        for p in (tagged, other):
            p.kill()
            p.wait()


@needs_proc
def test_the_watchdog_reaps_the_run_when_its_process_is_sigkilled(tmp_path: Path) -> None:
    # A stand-in for `weft simulate`: starts a Reaper, spawns a tagged grandchild that ignores SIGTERM and
    # leaves the session folder's log open, reports the folder, prints pids, then waits to be killed.
    session = tmp_path / "session_x"
    session.mkdir()
    script = textwrap.dedent(
        f"""
        import subprocess, sys, time
        from federation.reaper import Reaper
        reaper = Reaper.start()
        with reaper.tagged():
            child = subprocess.Popen([sys.executable, "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
        logger = subprocess.Popen(["sh", "-c", "exec sleep 60 >> {session}/agent.log"])
        time.sleep(0.2)
        reaper.report_session({str(session)!r})
        print(child.pid, logger.pid, reaper._watchdog.pid, flush=True)
        time.sleep(60)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env,
                           cwd=Path(__file__).resolve().parents[2], start_new_session=True)  # fmt: skip
    pids: list[int] = []
    try:
        assert run.stdout is not None
        pids = [int(x) for x in run.stdout.readline().split()]
        assert len(pids) == 3 and all(_alive(p) for p in pids)
        run.kill()
        run.wait()
        for pid in pids:  # tagged child (SIGKILL after the grace), session logger, and the watchdog itself
            assert _wait_gone(pid, 30.0), f"process {pid} outlived its run"  # generous: CI machines may be busy
    finally:
        run.kill()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@needs_proc
def test_close_reaps_and_lets_the_watchdog_go() -> None:
    reaper = Reaper.start()
    with reaper.tagged():
        assert os.environ[TOKEN_ENV] == reaper.token
        child = subprocess.Popen(["sleep", "60"])
    assert TOKEN_ENV not in os.environ
    watchdog = reaper._watchdog
    assert watchdog is not None
    try:
        assert reaper.close(grace_s=2.0) == [child.pid]
        assert child.wait(timeout=5) == -signal.SIGTERM
        assert watchdog.wait(timeout=5) == 0
    finally:
        child.kill()
        child.wait()
