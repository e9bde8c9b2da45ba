"""FedAvgM and FedAdam on real in-process runs: `weft audit verify` recomputes them, a resume carries their state.

The runs are the round loop's own (tests/unit/test_rounds.py: real node handlers behind a fake Grid). The
audit (protocols/audit.py `verify_run`) rebuilds the optimizer from the ledger's description and steps it
from round 1; a resumed coordinator reloads the state checkpointed with the last committed round
(coordinator/record.py) and must end with the same model bytes as a run that never stopped.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator import CoordinatorRuntime, RecordError, run_federation
from protocols.audit import verify_run
from protocols.ledger import LEDGER_FILE, read_ledger
from protocols.npz import load_npz
from protocols.server_opt import FedAdam, FedAvgM, OuterNesterov, Plain, ServerOptimizer
from tests.unit.test_ledger_audit import rewrite_ledger
from tests.unit.test_resume import Crash, crash_at
from tests.unit.test_rounds import COORDINATOR, FakeGrid, flower_task_identity, nodes, runtime  # noqa: F401

ROUNDS = 3
OPTIMIZERS: dict[str, Callable[[], ServerOptimizer]] = {
    "fedavgm": lambda: FedAvgM(lr=0.9, momentum=0.6),
    "fedadam": lambda: FedAdam(lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3),
}


def run_with(out: Path, make: Callable[[], ServerOptimizer], resume: bool = False) -> CoordinatorRuntime:
    rt = runtime(out, rounds=ROUNDS)
    rt.server_optimizer = make()
    rt.settings = replace(rt.settings, resume=resume)
    return rt


def final_bytes(result: Any) -> dict[str, bytes]:
    return {name: a.tobytes() for name, a in result.final_arrays.items()}


class Done:
    """An uninterrupted run: its record folder and its final model bytes."""

    def __init__(self, out: Path, final: dict[str, bytes]) -> None:
        self.out, self.final = out, final


def _in_flower_task(fn: Callable[[], Any]) -> Any:
    """Run `fn` with a Flower task identity set (module fixtures cannot use the autouse one)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    try:
        return fn()
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Done]:
    """One uninterrupted run with each optimizer (and with plain FedAvg); tests that alter one copy it."""
    makers: dict[str, Callable[[], ServerOptimizer]] = {"fedavg": Plain, **OPTIMIZERS}
    done = {}
    for name, make in makers.items():
        base = tmp_path_factory.mktemp(name)
        result = _in_flower_task(lambda: run_federation(FakeGrid(nodes(base)), run_with(base / "out", make)))  # type: ignore[arg-type]  # noqa: B023
        done[name] = Done(base / "out", final_bytes(result))
    return done


def copy_of(run: Done, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run.out, out)
    return out


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_audit_recomputes_every_round_bit_for_bit(name: str, runs: dict[str, Done]) -> None:
    out = runs[name].out
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert runs[name].final != runs["fedavg"].final  # the optimizer did move the model its own way
    start = read_ledger(out / LEDGER_FILE).entries[0].body
    assert start["server_optimizer"] == OPTIMIZERS[name]().describe()
    state = load_npz(out / "state" / f"round-{ROUNDS:04d}.npz")
    keys = {"weight", "bias"}
    assert set(state) == (keys if name == "fedavgm" else {f"{p}/{k}" for p in "mv" for k in keys})
    assert all(b.dtype == np.float64 for b in state.values())
    verdict = verify_run(out, COORDINATOR.public_key)
    assert verdict.problems == [] and verdict.recomputed == ROUNDS and verdict.status == "completed"


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_audit_catches_a_different_hyperparameter(tmp_path: Path, name: str, runs: dict[str, Done]) -> None:
    """The ledger claims another learning rate (re-signed, chain intact): the models are not what it gives."""
    out = copy_of(runs[name], tmp_path)

    def other_lr(body: dict[str, Any]) -> None:
        if "server_optimizer" in body:
            body["server_optimizer"] = {**body["server_optimizer"], "lr": body["server_optimizer"]["lr"] * 0.5}

    rewrite_ledger(out, other_lr)
    verdict = verify_run(out, COORDINATOR.public_key)
    assert any("recomputed global model differs" in p for p in verdict.problems), verdict.problems


def test_the_audit_refuses_a_description_it_cannot_rebuild(tmp_path: Path, runs: dict[str, Done]) -> None:
    out = copy_of(runs["fedadam"], tmp_path)

    def extra_key(body: dict[str, Any]) -> None:
        if "server_optimizer" in body:
            body["server_optimizer"] = {**body["server_optimizer"], "bias_correction": True}

    rewrite_ledger(out, extra_key)
    problems = verify_run(out, COORDINATOR.public_key).problems
    assert any("cannot rebuild the aggregation settings" in p for p in problems), problems


@pytest.mark.parametrize(
    ("name", "where", "nth"),
    [("fedavgm", "gathered", 3), ("fedadam", "aggregated", 3), ("fedadam", "model-written", 2)],
)
def test_a_resume_carries_the_optimizer_state(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    runs: dict[str, Done],
    name: str,
    where: str,
    nth: int,
) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        crash_at(m, where, nth)
        with pytest.raises(Crash):
            run_federation(FakeGrid(nodes(tmp_path / "a")), run_with(out, OPTIMIZERS[name]))  # type: ignore[arg-type]
    resumed = run_federation(FakeGrid(nodes(tmp_path / "b")), run_with(out, OPTIMIZERS[name], resume=True))  # type: ignore[arg-type]
    assert resumed.summary["status"] == "completed" and resumed.summary["rounds"] == ROUNDS
    assert final_bytes(resumed) == runs[name].final
    assert "resume" in [e.kind for e in read_ledger(out / LEDGER_FILE).entries]
    verdict = verify_run(out, COORDINATOR.public_key)
    assert verdict.problems == [] and verdict.recomputed == ROUNDS


def test_a_resume_without_the_state_would_not_match(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runs: dict[str, Done]
) -> None:
    """The control: the same resume with the checkpointed state thrown away ends with another model."""
    make = OPTIMIZERS["fedadam"]
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        crash_at(m, "gathered", 3)
        with pytest.raises(Crash):
            run_federation(FakeGrid(nodes(tmp_path / "a")), run_with(out, make))  # type: ignore[arg-type]
    monkeypatch.setattr(FedAdam, "load_state", lambda self, state: None)
    resumed = run_federation(FakeGrid(nodes(tmp_path / "b")), run_with(out, make, resume=True))  # type: ignore[arg-type]
    assert final_bytes(resumed) != runs["fedadam"].final


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FedAdam run that crashed in round 2 (round 1 committed, with its state)."""
    base = tmp_path_factory.mktemp("crashed")

    def crash() -> None:
        with pytest.MonkeyPatch.context() as m, pytest.raises(Crash):
            crash_at(m, "gathered", 2)
            run_federation(FakeGrid(nodes(base)), run_with(base / "out", OPTIMIZERS["fedadam"]))  # type: ignore[arg-type]

    _in_flower_task(crash)
    return base / "out"


@pytest.mark.parametrize(
    "other",
    [lambda: FedAdam(lr=0.05, beta1=0.9, beta2=0.999, tau=1e-3), lambda: FedAvgM(lr=0.05), lambda: OuterNesterov()],
    ids=["other-beta2", "fedavgm", "nesterov"],
)
def test_a_resume_with_other_server_settings_is_refused(
    tmp_path: Path, crashed: Path, other: Callable[[], ServerOptimizer]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(crashed, out)
    with pytest.raises(RecordError, match="server_optimizer: the run was started with"):
        run_federation(FakeGrid(nodes(tmp_path)), run_with(out, other, resume=True))  # type: ignore[arg-type]
    assert json.loads((out / "summary.json").read_text())["status"] == "running"  # untouched, still resumable
    assert load_npz(out / "state" / "round-0001.npz").keys() == {"m/weight", "m/bias", "v/weight", "v/bias"}
