"""The coordinator's round loop, in process: real node handlers behind a fake Grid (no Ray).

The fake Grid delivers each instruction to `node.handle_train` / `handle_evaluate` of the node it
is addressed to, and hands replies back in an order chosen by the test, so arrival order, dropped
nodes and missed quorums can be staged exactly.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType
from flwr.supercore.task_identity import TaskIdentity
from torch import nn
from torch.utils.data import TensorDataset

from coordinator import CoordinatorRuntime, CoordinatorSettings, QuorumNotReached, run_federation
from node import Instructions, NodeRuntime, TrainConfig, handle_evaluate, handle_train
from node.arrays import model_to_arrays
from protocols import Manifest, Member, SigningKey, params_digest, read_signed_model

COORDINATOR = SigningKey.from_seed(bytes([40]) * 32)
NODE_KEYS = [SigningKey.from_seed(bytes([41 + i]) * 32) for i in range(3)]
FEDERATION, TASK = "fed-rounds", "tiny"


@pytest.fixture(autouse=True)
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages read the running task's identity; outside a Flower process, set one."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def make_model() -> nn.Module:
    return nn.Linear(4, 3)


def node(i: int, workdir: Path) -> NodeRuntime:
    g = torch.Generator().manual_seed(100 + i)
    data = TensorDataset(torch.randn(16 + 4 * i, 4, generator=g), torch.randint(0, 3, (16 + 4 * i,), generator=g))
    return NodeRuntime(
        identity=NODE_KEYS[i],
        coordinator_key=COORDINATOR.public_key,
        federation_id=FEDERATION,
        task=TASK,
        make_model=make_model,
        train_data=data,
        val_data=data,
        workdir=workdir / f"node-{i}",
        device=torch.device("cpu"),
        seed=i,
    )


class FakeGrid:
    """Delivers instructions to in-process node handlers; replies come back in `order(replies)`."""

    def __init__(
        self,
        nodes: dict[int, NodeRuntime],
        order: Callable[[list[Message]], list[Message]] = list,
        silent: Iterable[int] = (),
    ) -> None:
        self.nodes, self.order, self.silent = nodes, order, set(silent)
        self.pending: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        replies = []
        for mid in list(ids):
            msg = self.pending.pop(mid, None)
            if msg is None or msg.metadata.dst_node_id in self.silent:
                continue
            rt = self.nodes[msg.metadata.dst_node_id]
            handler = handle_train if msg.metadata.message_type == MessageType.TRAIN else handle_evaluate
            replies.append(handler(rt, msg))
        return self.order(replies)


def runtime(out: Path, quorum: float = 0.5, rounds: int = 2, timeout: float = 5.0) -> CoordinatorRuntime:
    members = tuple(Member(f"n{i}", k.public_key, "XX", 1000) for i, k in enumerate(NODE_KEYS))
    torch.manual_seed(0)
    return CoordinatorRuntime(
        settings=CoordinatorSettings(
            federation_id=FEDERATION,
            run_id="run-rounds",
            task=TASK,
            rounds=rounds,
            out_dir=out,
            train_config=Instructions(
                params_digest({}).hex(), TrainConfig(local_epochs=1, learning_rate=0.1, batch_size=4, seed=5)
            ).to_config(),
            quorum=quorum,
            round_timeout_s=timeout,
            node_wait_timeout_s=1.0,
        ),
        identity=COORDINATOR,
        manifest=Manifest(FEDERATION, COORDINATOR.public_key, members),
        initial_arrays=model_to_arrays(make_model()),
    )


def nodes(tmp_path: Path) -> dict[int, NodeRuntime]:
    # Flower node ids are arbitrary integers; use large, unordered ones
    return {nid: node(i, tmp_path) for i, nid in enumerate([9001, 17, 4242])}


def test_run_completes_and_signs_every_round(tmp_path: Path) -> None:
    result = run_federation(FakeGrid(nodes(tmp_path)), runtime(tmp_path / "out"))  # type: ignore[arg-type]
    s = result.summary
    assert (s["status"], s["rounds"], s["accepted"], s["rejected"]) == ("completed", 2, 6, 0)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["round"], x["accepted"], x["missing"]) for x in lines] == [(1, 3, 0), (2, 3, 0)]
    assert set(lines[0]) >= {"federated_loss", "federated_accuracy", "rejected_by_reason", "global_model_digest"}
    model = read_signed_model(tmp_path / "out" / "global_model.npz", COORDINATOR.public_key)
    assert model.envelope.round == 2 and model.envelope.model_digest.hex() == s["global_model_digest"]
    assert len(list((tmp_path / "out" / "rounds" / "0002" / "updates").iterdir())) == 3


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_arrival_order_does_not_change_the_model(tmp_path: Path, seed: int) -> None:
    in_order = run_federation(FakeGrid(nodes(tmp_path / "a")), runtime(tmp_path / "a" / "out"))  # type: ignore[arg-type]

    def shuffled(replies: list[Message]) -> list[Message]:
        random.Random(seed).shuffle(replies)
        return replies

    grid = FakeGrid(nodes(tmp_path / "b"), order=shuffled)
    other = run_federation(grid, runtime(tmp_path / "b" / "out"))  # type: ignore[arg-type]
    assert other.summary["global_model_digest"] == in_order.summary["global_model_digest"]
    for name, array in in_order.final_arrays.items():
        assert other.final_arrays[name].tobytes() == array.tobytes()


def test_a_silent_node_costs_its_contribution_not_the_round(tmp_path: Path) -> None:
    grid = FakeGrid(nodes(tmp_path), silent=[17])
    result = run_federation(grid, runtime(tmp_path / "out", timeout=0.5))  # type: ignore[arg-type]
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["accepted"], x["missing"], x["rejected"]) for x in lines] == [(2, 1, 0), (2, 1, 0)]
    assert result.summary["accepted"] == 4


def test_a_missed_quorum_raises_and_writes_no_model_for_that_round(tmp_path: Path) -> None:
    grid = FakeGrid(nodes(tmp_path), silent=[17, 4242])
    out = tmp_path / "out"
    with pytest.raises(QuorumNotReached, match=r"round 1: accepted 1 update\(s\), quorum is 2"):
        run_federation(grid, runtime(out, timeout=0.5))  # type: ignore[arg-type]
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    assert not (out / "global" / "round-0001.npz").exists()
    # no final model at all: the signed initial model is never passed off as a trained one
    assert not (out / "global_model.npz").exists()
    assert read_signed_model(out / "global" / "round-0000.npz", COORDINATOR.public_key).envelope.round == 0
    assert json.loads((out / "summary.json").read_text())["global_model_file"] is None


def test_updates_are_weighted_by_example_count(tmp_path: Path) -> None:
    # One round, then recompute FedAvg from the spooled updates, weighting by each node's dataset size
    # (file names sort like the spool: update digest first).
    from protocols.stored import StoredUpdate

    result = run_federation(FakeGrid(nodes(tmp_path)), runtime(tmp_path / "out", rounds=1))  # type: ignore[arg-type]
    updates = sorted((tmp_path / "out" / "rounds" / "0001" / "updates").iterdir())
    sizes = {NODE_KEYS[i].member_id: 16 + 4 * i for i in range(3)}
    total = {name: np.zeros_like(a, dtype=np.float64) for name, a in result.final_arrays.items()}
    for path in updates:
        member = path.stem.split("-")[1]
        stored = StoredUpdate(path)
        for name in total:
            total[name] += stored.array(name).astype(np.float64) * sizes[member]
    for name, acc in total.items():
        expected = (acc / sum(sizes.values())).astype(np.float32)
        np.testing.assert_array_equal(result.final_arrays[name], expected)


def test_an_existing_record_is_never_overwritten(tmp_path: Path) -> None:
    run_federation(FakeGrid(nodes(tmp_path)), runtime(tmp_path / "out", rounds=1))  # type: ignore[arg-type]
    with pytest.raises(FileExistsError, match="already holds a run's record"):
        run_federation(FakeGrid(nodes(tmp_path)), runtime(tmp_path / "out", rounds=1))  # type: ignore[arg-type]


def test_too_few_nodes_fails_with_a_failed_summary(tmp_path: Path) -> None:
    from coordinator import NotEnoughNodes

    grid = FakeGrid({9001: node(0, tmp_path)})  # quorum 0.5 of 3 members needs 2 nodes
    with pytest.raises(NotEnoughNodes, match="only 1 node"):
        run_federation(grid, runtime(tmp_path / "out"))  # type: ignore[arg-type]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["status"], summary["rounds"], summary["global_model_file"]) == ("failed", 0, None)


def test_federated_evaluation_asks_only_accepted_nodes(tmp_path: Path) -> None:
    # A node whose update is rejected (here: not in the manifest) is not asked to evaluate.
    grid_nodes = nodes(tmp_path)
    outsider = SigningKey.from_seed(bytes([99]) * 32)
    grid_nodes[555] = replace_identity(node(2, tmp_path / "x"), outsider)
    asked: list[int] = []
    grid = FakeGrid(grid_nodes)
    original = grid.push_messages

    def record(messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        asked.extend(m.metadata.dst_node_id for m in messages if m.metadata.message_type == MessageType.EVALUATE)
        return original(messages)

    grid.push_messages = record  # type: ignore[method-assign]
    run_federation(grid, runtime(tmp_path / "out", rounds=1))  # type: ignore[arg-type]
    assert sorted(asked) == [17, 4242, 9001]


def replace_identity(rt: NodeRuntime, key: SigningKey) -> NodeRuntime:
    from dataclasses import replace

    return replace(rt, identity=key)
