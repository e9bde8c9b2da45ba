"""The contribution policy on real in-process rounds: the weights it gives, in the ledger, recomputed by the audit.

Nodes 0, 1 and 2 of tests/unit/test_rounds.py hold 16, 20 and 24 examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator import run_federation
from protocols.audit import verify_run
from protocols.ledger import LEDGER_FILE, read_ledger
from protocols.policy import ContributionPolicy
from tests.unit.test_rounds import COORDINATOR, NODE_KEYS, FakeGrid, flower_task_identity, nodes, runtime  # noqa: F401

SIZES = {NODE_KEYS[i].member_id: 16 + 4 * i for i in range(3)}


def rounds_of(out: Path) -> list[dict[str, Any]]:
    return [e.body for e in read_ledger(out / LEDGER_FILE).entries if e.kind == "round"]


def run(tmp_path: Path, policy: ContributionPolicy, central: Any = None, rounds: int = 2) -> Path:
    out = tmp_path / "out"
    rt = runtime(out, rounds=rounds)
    rt.policy = policy
    if central is not None:
        rt.central_eval = central
    run_federation(FakeGrid(nodes(tmp_path)), rt)  # type: ignore[arg-type]
    return out


def test_the_anti_capture_cap_by_hand(tmp_path: Path) -> None:
    # shares by examples: 16/60, 20/60, 24/60 = 0.2667, 0.3333, 0.4. Cap 0.35: 0.4 -> 0.35 and its 0.05 goes
    # 16:20 to the others: 0.2889, 0.3611; 0.3611 -> 0.35 and its 0.0111 goes to the first: 0.3.
    out = run(tmp_path, ContributionPolicy(max_share=0.35))
    for body in rounds_of(out):
        shares = {c["member"]: c["share"] for c in body["contributions"]}
        assert [shares[NODE_KEYS[i].member_id] for i in range(3)] == pytest.approx([0.3, 0.35, 0.35], abs=1e-12)
        assert body["policy"]["max_share"] == 0.35
    assert verify_run(out, COORDINATOR.public_key).problems == []


def test_equal_weighting(tmp_path: Path) -> None:
    out = run(tmp_path, ContributionPolicy(weighting="equal"))
    for body in rounds_of(out):
        assert [c["share"] for c in body["contributions"]] == pytest.approx([1 / 3] * 3, abs=1e-15)
    assert verify_run(out, COORDINATOR.public_key).problems == []


def test_the_norm_bound_scales_long_updates_down_to_it(tmp_path: Path) -> None:
    out = run(tmp_path, ContributionPolicy(norm_bound=0.05))
    for body in rounds_of(out):
        for c in body["contributions"]:
            assert c["norm"] > 0.05  # a round of SGD moves this model further than that
            assert c["scale"] == 0.05 / c["norm"]
        assert body["policy"]["norm_bound"] == 0.05
    assert verify_run(out, COORDINATOR.public_key).problems == []


def test_the_quality_floor_rejects_the_worst_update_and_the_ledger_says_so(tmp_path: Path) -> None:
    # A stand-in held-out evaluator whose score is a fixed function of the model; first measure every
    # update's score with quality weighting, then set the floor between the lowest and the rest.
    def central(arrays: Any) -> dict[str, float]:
        return {"accuracy": float(1.0 / (1.0 + sum(float(np.abs(a).sum()) for a in arrays.values())))}

    measured = run(tmp_path / "measure", ContributionPolicy(weighting="quality"), central, rounds=1)
    (body,) = rounds_of(measured)
    scores = sorted(c["score"] for c in body["contributions"])
    assert [c["share"] for c in body["contributions"]] == pytest.approx(
        [c["score"] / sum(scores) for c in body["contributions"]], abs=1e-15
    )
    floor = (scores[0] + scores[1]) / 2
    out = run(tmp_path / "floor", ContributionPolicy(quality_floor=floor), central, rounds=1)
    (body,) = rounds_of(out)
    assert len(body["contributions"]) == 2
    (rejected,) = body["rejected"]
    assert rejected["reason"] == "below_quality_floor" and f"{floor:.6g}" in rejected["detail"]
    assert all(c["score"] >= floor for c in body["contributions"])
    assert verify_run(out, COORDINATOR.public_key).problems == []
