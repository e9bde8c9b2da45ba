"""Client sampling, the quorum of a sampled round, linear reply collection and splits across thousands of nodes."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from coordinator import CoordinatorSettings, NotEnoughNodes, QuorumNotReached, run_federation
from coordinator.messaging import (
    EVALUATION_REPLY_BYTES,
    MAX_PULL_IDS,
    PULL_BUDGET_BYTES,
    collect,
    instructions,
    pull_batch,
)
from coordinator.rounds import round_quorum, sample_nodes, sample_size
from federation.errors import ConfigError
from federation.partition import SHARED_SIZE, shared_dirichlet_partition, shared_iid_partition, split
from protocols import Manifest, Member, SignedBlob, SigningKey
from tests.unit.test_rounds import COORDINATOR, FakeGrid, nodes, runtime


@pytest.fixture(autouse=True)
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages read the running task's identity; outside a Flower process, set one."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


# ---- how many, and which -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("connected", "fraction", "minimum", "expected"),
    [
        (1000, 0.05, 2, 50),  # 0.05 * 1000 is 50.000000000000004 in binary: still 50
        (100, 0.05, 2, 5),
        (10, 0.05, 2, 2),  # min_train_nodes
        (10, 0.05, 20, 10),  # never more than are connected
        (7, 1.0, 2, 7),
        (3, 0.34, 1, 2),  # ceil
        (0, 0.5, 2, 0),
    ],
)
def test_sample_size(connected: int, fraction: float, minimum: int, expected: int) -> None:
    assert sample_size(connected, fraction, minimum) == expected


def test_sample_is_deterministic_sorted_and_depends_on_run_and_round() -> None:
    ids = [int(x) for x in np.random.default_rng(0).integers(1, 2**62, size=1000)]
    first = sample_nodes(ids, 0.05, 2, "run-a", 1)
    assert len(first) == 50 and first == sorted(first) and set(first) <= set(ids)
    assert sample_nodes(list(reversed(ids)), 0.05, 2, "run-a", 1) == first  # the order of get_node_ids is moot
    assert sample_nodes(ids, 0.05, 2, "run-a", 2) != first
    assert sample_nodes(ids, 0.05, 2, "run-b", 1) != first
    assert sample_nodes(ids, 1.0, 2, "run-a", 1) == sorted(ids)
    # over many rounds every node is asked about equally often
    counts = np.zeros(len(ids))
    index = {nid: i for i, nid in enumerate(ids)}
    for rnd in range(1, 201):
        for nid in sample_nodes(ids, 0.05, 2, "run-a", rnd):
            counts[index[nid]] += 1
    assert counts.sum() == 200 * 50 and counts.max() < 30


def settings(fraction: float, quorum: float = 0.5) -> CoordinatorSettings:
    return CoordinatorSettings("fed", "run", "t", 1, Path("."), quorum=quorum, fraction_train=fraction)


def test_round_quorum_counts_members_without_sampling_and_the_nodes_asked_with_it() -> None:
    assert round_quorum(settings(1.0), active_members=10, asked=4) == 5  # the old rule: half of the members
    assert round_quorum(settings(0.05), active_members=1000, asked=50) == 25
    assert round_quorum(settings(0.05, quorum=0.01), active_members=1000, asked=50) == 1
    assert round_quorum(settings(0.05, quorum=1.0), active_members=1000, asked=2) == 2


# ---- the round loop with sampling ------------------------------------------------------------------------------


class RecordingGrid(FakeGrid):
    """A FakeGrid that remembers which node got which kind of instruction."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sent: list[tuple[str, int]] = []

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        self.sent += [(m.metadata.message_type, m.metadata.dst_node_id) for m in messages]
        return super().push_messages(messages)


def test_only_sampled_nodes_train_and_the_ledger_says_how_many(tmp_path: Path) -> None:
    rt = runtime(tmp_path / "out", rounds=3)
    rt.settings = replace(rt.settings, fraction_train=0.3, min_train_nodes=1)  # ceil(0.9) = 1 of 3
    grid = RecordingGrid(nodes(tmp_path))
    result = run_federation(grid, rt)  # type: ignore[arg-type]
    assert result.summary["accepted"] == 3
    train = [nid for kind, nid in grid.sent if kind == MessageType.TRAIN]
    evaluate = [nid for kind, nid in grid.sent if kind == MessageType.EVALUATE]
    assert len(train) == 3 and evaluate == train  # only the node whose update was accepted evaluates
    expected = [sample_nodes(list(grid.nodes), 0.3, 1, "run-rounds", r) for r in (1, 2, 3)]
    assert [[nid] for nid in train] == expected
    rounds = [json.loads(x)["body"] for x in (tmp_path / "out" / "ledger.jsonl").read_text().splitlines()]
    rounds = [b for b in rounds if b.get("kind") == "round"]
    assert [(b["nodes"], b["connected"]) for b in rounds] == [(1, 3)] * 3
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["nodes"] for m in metrics] == [1, 1, 1]


def test_a_sampled_round_needs_the_quorum_of_the_nodes_asked(tmp_path: Path) -> None:
    rt = runtime(tmp_path / "out", timeout=0.3)
    rt.settings = replace(rt.settings, fraction_train=0.6, min_train_nodes=1)  # ceil(1.8) = 2 of 3 asked
    grid = FakeGrid(nodes(tmp_path), silent=[9001, 17, 4242])
    with pytest.raises(QuorumNotReached, match=r"quorum is 1 \(50% of 2 nodes asked\).*no reply from 2"):
        run_federation(grid, rt)  # type: ignore[arg-type]


def test_the_run_waits_for_min_train_nodes(tmp_path: Path) -> None:
    rt = runtime(tmp_path / "out", quorum=0.3)  # the quorum alone would start with 1 node
    rt.settings = replace(rt.settings, fraction_train=0.5, min_train_nodes=3)
    grid = FakeGrid({k: v for k, v in list(nodes(tmp_path).items())[:2]})
    with pytest.raises(NotEnoughNodes, match=r"only 2 node.* the run needs 3"):
        run_federation(grid, rt)  # type: ignore[arg-type]


# ---- collecting replies: batched, bounded, linear ---------------------------------------------------------------


class CountingGrid(FakeGrid):
    """Replies at once to everything pushed (FakeGrid's push); counts the ids of every pull."""

    def __init__(self) -> None:
        super().__init__({})
        self.pulls: list[int] = []

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        ids = list(ids)
        self.pulls.append(len(ids))
        return [Message(RecordDict(), reply_to=self.pending.pop(i)) for i in ids if i in self.pending]


def messages(count: int, params: int) -> list[Message]:
    arrays = {"w": np.zeros(params, dtype=np.float32)}
    return instructions(range(1, count + 1), MessageType.TRAIN, arrays, SignedBlob(b"body", b"signature"))


def test_small_replies_are_pulled_many_per_call() -> None:
    grid = CountingGrid()
    replies = list(collect(grid, messages(600, 256), timeout_s=5))  # type: ignore[arg-type]
    assert len(replies) == 600
    assert grid.pulls == [MAX_PULL_IDS, MAX_PULL_IDS, 600 - 2 * MAX_PULL_IDS]  # one sweep, linear


def test_big_replies_are_pulled_one_per_call() -> None:
    grid = CountingGrid()
    big = PULL_BUDGET_BYTES // 4 + 1  # float32: one model is over the budget
    replies = list(collect(grid, messages(3, big), timeout_s=5))  # type: ignore[arg-type]
    assert len(replies) == 3 and grid.pulls == [1, 1, 1]


def test_pull_batch_keeps_a_batch_under_the_budget() -> None:
    assert pull_batch(0) == MAX_PULL_IDS
    assert pull_batch(EVALUATION_REPLY_BYTES) == min(MAX_PULL_IDS, PULL_BUDGET_BYTES // EVALUATION_REPLY_BYTES)
    assert pull_batch(PULL_BUDGET_BYTES // 3) == 3
    assert pull_batch(10 * PULL_BUDGET_BYTES) == 1
    for size in (1, 1000, 2**20, 2**24, 2**30):
        assert 1 <= pull_batch(size) <= MAX_PULL_IDS
        assert pull_batch(size) == 1 or pull_batch(size) * size <= PULL_BUDGET_BYTES


def test_late_replies_are_picked_up_by_a_later_sweep() -> None:
    class Late(CountingGrid):
        def __init__(self) -> None:
            super().__init__()
            self.sweeps = 0

        def pull_messages(self, ids: Iterable[str]) -> list[Message]:
            self.sweeps += 1
            if self.sweeps == 1:  # nothing has arrived yet
                list(ids)
                return []
            return super().pull_messages(ids)

    grid = Late()
    assert len(list(collect(grid, messages(5, 4), timeout_s=5))) == 5  # type: ignore[arg-type]


# ---- the manifest's lookups are built once -------------------------------------------------------------------


def test_manifest_lookups_are_computed_once() -> None:
    keys = [SigningKey.from_seed(i.to_bytes(32, "big")) for i in range(1, 41)]
    manifest = Manifest("fed", COORDINATOR.public_key, tuple(Member(f"m{i}", k.public_key, "XX", 10) for i, k in
                                                                enumerate(keys)))  # fmt: skip
    assert manifest.active is manifest.active and len(manifest.active) == 40
    assert manifest.canonical_bytes() is manifest.canonical_bytes()
    suspended = manifest.with_status(keys[0].member_id, "suspended")
    assert len(suspended.active) == 39 and suspended.canonical_bytes() != manifest.canonical_bytes()
    assert Manifest.from_json(suspended.sign(COORDINATOR).to_json()).canonical_bytes() == suspended.canonical_bytes()


# ---- splitting a pool across thousands of nodes -----------------------------------------------------------------


@pytest.mark.parametrize("parts", [1000, 5000])
@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_a_small_pool_is_shared_across_thousands_of_nodes(parts: int, kind: str) -> None:
    labels = np.repeat(np.arange(10), 144)  # digits-sized: 1,440 examples
    got, shared = split(kind, parts, seed=0, n=len(labels), labels=labels, alpha=0.5)
    again, _ = split(kind, parts, seed=0, n=len(labels), labels=labels, alpha=0.5)
    assert shared and len(got) == parts
    for part, same in zip(got, again, strict=True):
        assert len(part) == SHARED_SIZE == len(set(part.tolist()))  # distinct within a node
        assert part.min() >= 0 and part.max() < len(labels)
        assert np.array_equal(part, same)
    used = np.unique(np.concatenate(got))
    assert len(used) == len(labels)  # every example is dealt before any repeats


def test_a_pool_large_enough_stays_disjoint() -> None:
    labels = np.repeat(np.arange(3), 400)
    parts, shared = split("iid", 100, seed=0, n=len(labels), labels=labels)
    assert not shared and sum(len(p) for p in parts) == len(labels)


def test_shared_dirichlet_skews_labels() -> None:
    labels = np.repeat(np.arange(10), 100)
    skewed = shared_dirichlet_partition(labels, 500, alpha=0.05, seed=1)
    flat = shared_dirichlet_partition(labels, 500, alpha=100.0, seed=1)

    def top_share(parts: list[np.ndarray]) -> float:
        return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))

    assert top_share(skewed) > 0.7 > 0.4 > top_share(flat)


def test_impossible_splits_fail_clearly() -> None:
    with pytest.raises(ValueError, match="1 example"):
        shared_iid_partition(1, 10, seed=0)
    with pytest.raises(ValueError, match="2 owner"):
        split("natural", 3, seed=0, n=4, owners=["a", "a", "b", "b"])
    from federation.simulation import _split

    with pytest.raises(ConfigError, match="partition: task 'synthetic' declares no owner key"):
        _split("synthetic", "", 0, "natural", None, 1000)


@pytest.mark.parametrize("parts", [1000, 5000])
def test_builtin_synthetic_splits_across_thousands_of_nodes(parts: int) -> None:
    from federation.simulation import SimulatedNodes

    sim = SimulatedNodes("synthetic", 0, "dirichlet", 0.5, parts, "fed", Path("unused"))
    for pid in (0, parts // 2, parts - 1):
        train, val = sim.local_data(pid)
        assert len(train) >= 1 and len(val) >= 1
