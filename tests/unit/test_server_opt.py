"""protocols/server_opt.py: the outer step on a 2x3 array, worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator import OuterNesterov, Plain
from federation.config import ConfigError, RunConfig
from federation.runtime import server_optimizer

CURRENT = {"w": np.array([[1, 2, 3], [4, 5, 6]], np.float32), "steps": np.array([7], np.int64)}
AGGREGATE = {"w": np.array([[0, 2, 4], [4, 4, 4]], np.float32), "steps": np.array([9], np.int64)}


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
    with pytest.raises(ConfigError, match="server-optimizer: must be one of fedavg, nesterov"):
        RunConfig(server_optimizer="adam")
