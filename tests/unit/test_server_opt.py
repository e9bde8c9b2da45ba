"""protocols/server_opt.py: the outer steps on a 2x3 array, worked out by hand; descriptions and state."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from coordinator import OuterNesterov, Plain
from federation.config import ConfigError, RunConfig
from federation.runtime import server_optimizer
from protocols.npz import load_npz, save_npz
from protocols.server_opt import FedAdam, FedAvgM, ServerOptimizer, optimizer_from_description

CURRENT: dict[str, np.ndarray] = {"w": np.array([[1, 2, 3], [4, 5, 6]], np.float32), "steps": np.array([7], np.int64)}
AGGREGATE: dict[str, np.ndarray] = {"w": np.array([[0, 2, 4], [4, 4, 4]], np.float32), "steps": np.array([9], np.int64)}


def test_plain_fedavg_takes_the_aggregate() -> None:
    out = Plain().step(CURRENT, AGGREGATE)
    assert out.keys() == AGGREGATE.keys() and all(np.array_equal(out[k], AGGREGATE[k]) for k in out)


def test_outer_nesterov_two_steps_by_hand() -> None:
    opt = OuterNesterov(lr=0.5, momentum=0.5)
    # g = current - aggregate = [[1, 0, -1], [0, 1, 2]]; m = g; next = current - 0.5 * (g + 0.5 * g)
    first = opt.step(CURRENT, AGGREGATE)
    assert first["w"].dtype == np.float32
    np.testing.assert_array_equal(first["w"], np.array([[0.25, 2, 3.75], [4, 4.25, 4.5]], np.float32))
    np.testing.assert_array_equal(first["steps"], [9])  # integer state comes from the aggregate
    # g2 = ones; m2 = 0.5 * g + ones = [[1.5, 1, 0.5], [1, 1.5, 2]]; next2 = current2 - 0.5 * (ones + 0.5 * m2)
    second = opt.step(first, {"w": first["w"] - 1, "steps": np.array([11])})
    expected = first["w"] - np.array([[0.875, 0.75, 0.625], [0.75, 0.875, 1.0]], np.float32)
    np.testing.assert_array_equal(second["w"], expected)
    np.testing.assert_array_equal(opt.state()["w"], [[1.5, 1, 0.5], [1, 1.5, 2]])


def test_outer_nesterov_with_unit_lr_and_no_momentum_is_fedavg() -> None:
    out = OuterNesterov(lr=1.0, momentum=0.0).step(CURRENT, AGGREGATE)
    np.testing.assert_array_equal(out["w"], AGGREGATE["w"])


@pytest.mark.parametrize(("lr", "momentum"), [(0.0, 0.9), (float("nan"), 0.9), (0.7, 1.0), (0.7, -0.1)])
def test_outer_nesterov_refuses_bad_settings(lr: float, momentum: float) -> None:
    with pytest.raises(ValueError):
        OuterNesterov(lr, momentum)


def test_the_run_config_picks_the_server_optimizer() -> None:
    assert isinstance(server_optimizer(RunConfig()), Plain)
    opt = server_optimizer(RunConfig(server_optimizer="nesterov", server_learning_rate=0.5, server_momentum=0.8))
    assert isinstance(opt, OuterNesterov) and (opt.lr, opt.momentum) == (0.5, 0.8)
    with pytest.raises(ConfigError, match="server-optimizer: must be one of fedavg, fedavgm, fedadam, nesterov"):
        RunConfig(server_optimizer="adam")


# ---- FedAvgM and FedAdam -----------------------------------------------------------------------------------


def test_fedavgm_two_steps_by_hand() -> None:
    opt = FedAvgM(lr=0.5, momentum=0.5)
    # g = [[1, 0, -1], [0, 1, 2]]; v = g; next = current - 0.5 * g
    first = opt.step(CURRENT, AGGREGATE)
    assert first["w"].dtype == np.float32
    np.testing.assert_array_equal(first["w"], np.array([[0.5, 2, 3.5], [4, 4.5, 5]], np.float32))
    np.testing.assert_array_equal(first["steps"], [9])
    # g2 = ones; v2 = 0.5 * g + ones = [[1.5, 1, 0.5], [1, 1.5, 2]]; next2 = first - 0.5 * v2
    second = opt.step(first, {"w": first["w"] - 1, "steps": np.array([11])})
    np.testing.assert_array_equal(second["w"], np.array([[-0.25, 1.5, 3.25], [3.5, 3.75, 4]], np.float32))
    np.testing.assert_array_equal(second["steps"], [11])
    state = opt.state()
    assert state.keys() == {"w"} and state["w"].dtype == np.float64
    np.testing.assert_array_equal(state["w"], [[1.5, 1, 0.5], [1, 1.5, 2]])


def test_fedavgm_with_unit_lr_and_no_momentum_is_fedavg() -> None:
    opt = FedAvgM(lr=1.0, momentum=0.0)
    out = opt.step(CURRENT, AGGREGATE)
    np.testing.assert_array_equal(out["w"], AGGREGATE["w"])
    np.testing.assert_array_equal(opt.step(out, CURRENT)["w"], CURRENT["w"])  # no memory of the first step


# FedAdam with lr 0.5, beta1 0.5, beta2 9/16, tau 1: every square root below is exact.
ADAM = {"lr": 0.5, "beta1": 0.5, "beta2": 0.5625, "tau": 1.0}
G1 = np.array([[1, 0, -1], [0, 1, -1]], np.float32)
G2 = np.array([[1, 0, 1], [0, -1, 1]], np.float32)


def test_fedadam_two_steps_by_hand() -> None:
    opt = FedAdam(**ADAM)
    # m1 = 0.5 * g1 = [[.5, 0, -.5], [0, .5, -.5]]
    # v1 = 9/16 * tau**2 + 7/16 * g1**2 = [[1, 9/16, 1], [9/16, 1, 1]]   (v starts at tau**2, not 0)
    # next1 = current - 0.5 * m1 / (sqrt(v1) + 1) = current - [[.125, 0, -.125], [0, .125, -.125]]
    first = opt.step(CURRENT, {"w": CURRENT["w"] - G1, "steps": np.array([9])})
    assert first["w"].dtype == np.float32
    np.testing.assert_array_equal(first["w"], np.array([[0.875, 2, 3.125], [4, 4.875, 6.125]], np.float32))
    np.testing.assert_array_equal(first["steps"], [9])
    state = opt.state()
    assert state.keys() == {"m/w", "v/w"} and all(b.dtype == np.float64 for b in state.values())
    np.testing.assert_array_equal(state["m/w"], [[0.5, 0, -0.5], [0, 0.5, -0.5]])
    np.testing.assert_array_equal(state["v/w"], [[1, 0.5625, 1], [0.5625, 1, 1]])
    # m2 = 0.5 * m1 + 0.5 * g2 = [[.75, 0, .25], [0, -.25, .25]]
    # v2 = 9/16 * v1 + 7/16 * g2**2 = [[1, 81/256, 1], [81/256, 1, 1]]
    # next2 = next1 - 0.5 * m2 / (sqrt(v2) + 1) = next1 - [[.1875, 0, .0625], [0, -.0625, .0625]]
    second = opt.step(first, {"w": first["w"] - G2, "steps": np.array([11])})
    np.testing.assert_array_equal(second["w"], np.array([[0.6875, 2, 3.0625], [4, 4.9375, 6.0625]], np.float32))
    np.testing.assert_array_equal(opt.state()["m/w"], [[0.75, 0, 0.25], [0, -0.25, 0.25]])
    np.testing.assert_array_equal(opt.state()["v/w"], [[1, 81 / 256, 1], [81 / 256, 1, 1]])


def test_fedadam_step_is_bounded_by_tau() -> None:
    """|next - current| <= lr * |m| / tau, however large the pseudo-gradient."""
    opt = FedAdam(lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    current = {"w": np.zeros(3, np.float64)}
    out = opt.step(current, {"w": np.array([-1e6, 0.0, 1e-9])})
    m = opt.state()["m/w"]
    assert (np.abs(out["w"]) <= 0.01 * np.abs(m) / 1e-3).all()
    np.testing.assert_array_equal(np.sign(out["w"]), [-1, 0, 1])  # towards the aggregate
    assert abs(out["w"][0]) <= 0.01 * (1 - 0.9) / np.sqrt(1 - 0.99)  # a first step: at most lr (1-b1) / sqrt(1-b2)


@pytest.mark.parametrize(
    "make",
    [lambda: OuterNesterov(2.0, 0.9), lambda: FedAvgM(2.0, 0.9), lambda: FedAdam(1e6, 0.9, 0.99, 1e-6)],
    ids=["nesterov", "fedavgm", "fedadam"],
)
def test_a_non_finite_step_is_refused(make: Callable[[], ServerOptimizer]) -> None:
    opt = make()
    current = {"w": np.array([60000.0], np.float16)}
    with pytest.raises(ValueError, match="not finite"):
        opt.step(current, {"w": np.array([-60000.0], np.float16)})


@pytest.mark.parametrize(
    ("lr", "beta1", "beta2", "tau"),
    [(0.0, 0.9, 0.99, 1e-3), (float("inf"), 0.9, 0.99, 1e-3), (0.1, 1.0, 0.99, 1e-3), (0.1, 0.9, 1.0, 1e-3),
     (0.1, 0.9, -0.1, 1e-3), (0.1, 0.9, 0.99, 0.0), (0.1, 0.9, 0.99, float("nan"))],
)  # fmt: skip
def test_fedadam_refuses_bad_settings(lr: float, beta1: float, beta2: float, tau: float) -> None:
    with pytest.raises(ValueError):
        FedAdam(lr, beta1, beta2, tau)


@pytest.mark.parametrize(("lr", "momentum"), [(0.0, 0.9), (float("nan"), 0.9), (1.0, 1.0), (1.0, -0.1)])
def test_fedavgm_refuses_bad_settings(lr: float, momentum: float) -> None:
    with pytest.raises(ValueError):
        FedAvgM(lr, momentum)


@pytest.mark.parametrize(
    "opt",
    [Plain(), OuterNesterov(0.5, 0.8), FedAvgM(0.75, 0.5), FedAdam(0.03, 0.8, 0.95, 1e-4)],
    ids=lambda o: o.name,
)
def test_described_rebuilt_and_reloaded_optimizers_step_alike(opt: ServerOptimizer, tmp_path: Path) -> None:
    """What the coordinator records and checkpoints is enough to go on bit for bit (audit, resume)."""
    d = opt.describe()
    assert d["optimizer"] == opt.name
    first = opt.step(CURRENT, AGGREGATE)
    save_npz(tmp_path / "state.npz", opt.state())
    twin = optimizer_from_description(json.loads(json.dumps(d)))
    assert twin.describe() == d and type(twin) is type(opt)
    twin.load_state(load_npz(tmp_path / "state.npz"))
    later = {"w": first["w"] * 0.5 - 0.25, "steps": np.array([12])}
    a, b = opt.step(first, later), twin.step(first, later)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.parametrize(
    "d",
    [
        {"optimizer": "fedavgm", "lr": 1.0},
        {"optimizer": "fedavgm", "lr": 1.0, "momentum": 0.9, "extra": 1},
        {"optimizer": "fedavgm", "lr": "1.0", "momentum": 0.9},
        {"optimizer": "fedavgm", "lr": True, "momentum": 0.9},
        {"optimizer": "fedadam", "lr": 0.01, "beta1": 0.9, "beta2": 0.99},
        {"optimizer": "fedadam", "lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3, "momentum": 0.9},
        {"optimizer": "fedadam", "lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": None},
        {"optimizer": "fedadam", "lr": 0.01, "beta1": 0.9, "beta2": 1.5, "tau": 1e-3},
        {"optimizer": "nesterov", "lr": 0.7, "momentum": [0.9]},
        {"optimizer": "fedyogi", "lr": 0.01},
        {"optimizer": "fedavg", "lr": 1.0},
    ],
)
def test_descriptions_are_read_strictly(d: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        optimizer_from_description(d)


def test_load_state_refuses_what_the_optimizer_did_not_write() -> None:
    buf = np.zeros((2, 3))
    with pytest.raises(ValueError, match="float64"):
        FedAvgM().load_state({"w": buf.astype(np.float32)})
    with pytest.raises(ValueError, match="m/<name> and a v/<name>"):
        FedAdam().load_state({"m/w": buf})
    with pytest.raises(ValueError, match="m/<name> and a v/<name>"):
        FedAdam().load_state({"m/w": buf, "v/w": buf, "w": buf})
    with pytest.raises(ValueError, match="shape"):
        FedAdam().load_state({"m/w": buf, "v/w": np.zeros(3)})
    with pytest.raises(ValueError):
        Plain().load_state({"w": buf})
    FedAdam().load_state({})  # a fresh optimizer's (empty) state


def test_the_run_config_picks_fedavgm_and_fedadam() -> None:
    run = RunConfig(server_optimizer="fedavgm", server_learning_rate=1.0, server_momentum=0.5)
    opt = server_optimizer(run)
    assert isinstance(opt, FedAvgM) and opt.describe() == {"optimizer": "fedavgm", "lr": 1.0, "momentum": 0.5}
    run = RunConfig(
        server_optimizer="fedadam",
        server_learning_rate=0.03,
        server_momentum=0.8,
        server_beta2=0.95,
        server_epsilon=1e-4,
    )
    adam = server_optimizer(run)
    assert isinstance(adam, FedAdam)
    assert adam.describe() == {"optimizer": "fedadam", "lr": 0.03, "beta1": 0.8, "beta2": 0.95, "tau": 1e-4}
