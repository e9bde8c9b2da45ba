"""node/: the train and evaluate handlers on a tiny torch model, and TrainConfig parsing."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import DEFAULT_TTL, ConfigRecord, Message, MessageType, Metadata, RecordDict
from torch import nn
from torch.utils.data import TensorDataset

from node.app import REFUSED_MODEL, handle_evaluate, handle_train
from node.arrays import from_record, model_to_arrays, to_record
from node.instructions import Instructions
from node.runtime import DEFAULT_METRIC_ALLOWLIST, NodeRuntime
from node.store import META_FILE, MODEL_FILE, load_local_model
from node.training import TrainConfig
from protocols import (
    Domain,
    GlobalModelEnvelope,
    SigningKey,
    UpdateEnvelope,
    params_digest,
    sign_global_model,
    wire,
)

FEDERATION, RUN, TASK = "fed-a", "run-1", "tiny"
GLOBAL_ROUND = 4
N_TRAIN, N_VAL = 20, 12

COORDINATOR = SigningKey.from_seed(bytes([1]) * 32)
NODE = SigningKey.from_seed(bytes([2]) * 32)
IMPOSTOR = SigningKey.from_seed(bytes([9]) * 32)

CONFIG = TrainConfig(local_epochs=1, learning_rate=0.1, batch_size=8, seed=3)
ALL_EXCHANGED = params_digest({}).hex()
"""Frozen-base digest when every parameter is exchanged: the digest of the empty vector."""


def make_model() -> nn.Module:
    return nn.Linear(4, 3)


def dataset(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def global_arrays() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return model_to_arrays(make_model())


def runtime(workdir: Path, **changes) -> NodeRuntime:
    rt = NodeRuntime(
        identity=NODE,
        coordinator_key=COORDINATOR.public_key,
        federation_id=FEDERATION,
        task=TASK,
        make_model=make_model,
        train_data=dataset(N_TRAIN, 1),
        val_data=dataset(N_VAL, 2),
        workdir=workdir,
        device=torch.device("cpu"),
    )
    return replace(rt, **changes)


def instruction(
    arrays: dict[str, np.ndarray] | None = None,
    signer: SigningKey = COORDINATOR,
    sent_arrays: dict[str, np.ndarray] | None = None,
    signed: bool = True,
    message_type: str = MessageType.TRAIN,
    **changes,
) -> Message:
    """A coordinator's instruction: arrays plus the signed global envelope. `changes` alter the
    envelope, `sent_arrays` replaces the arrays after signing."""
    arrays = global_arrays() if arrays is None else arrays
    envelope = GlobalModelEnvelope(
        federation_id=FEDERATION,
        run_id=RUN,
        round=GLOBAL_ROUND,
        model_digest=params_digest(arrays),
        task=TASK,
        config=Instructions(ALL_EXCHANGED, CONFIG).to_config(),
    )
    blob = sign_global_model(signer, replace(envelope, **changes))
    content = RecordDict({wire.ARRAYS: to_record(arrays if sent_arrays is None else sent_arrays)})
    if signed:
        content[wire.GLOBAL_RECORD] = ConfigRecord({wire.ENVELOPE: blob.body, wire.SIGNATURE: blob.signature})
    metadata = Metadata(
        run_id=1,
        message_id="instruction-1",
        src_node_id=1,
        dst_node_id=7,
        reply_to_message_id="",
        group_id=str(GLOBAL_ROUND + 1),
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=message_type,
    )
    return Message(content, metadata=metadata)


def update_of(reply: Message) -> tuple[UpdateEnvelope, dict[str, np.ndarray]]:
    record = reply.content.config_records[wire.UPDATE_RECORD]
    body, signature = record[wire.ENVELOPE], record[wire.SIGNATURE]
    NODE.public_key.verify(Domain.UPDATE, body, signature)  # raises unless the node signed it
    return UpdateEnvelope.decode(body), from_record(reply.content.array_records[wire.ARRAYS])


# ---- train ---------------------------------------------------------------------------------------


def test_train_reply_is_a_signed_update_bound_to_the_global_model(tmp_path: Path) -> None:
    start = global_arrays()
    reply = handle_train(runtime(tmp_path), instruction(start))
    assert not reply.has_error()
    env, arrays = update_of(reply)
    assert env.federation_id == FEDERATION
    assert env.run_id == RUN
    assert env.round == GLOBAL_ROUND + 1
    assert env.sender == NODE.member_id
    assert env.base_digest == params_digest(start)
    assert env.update_digest == params_digest(arrays)
    assert env.num_examples == N_TRAIN
    assert reply.metadata.src_node_id == 7
    # it trained: same structure, different values
    assert {n: (a.dtype, a.shape) for n, a in arrays.items()} == {n: (a.dtype, a.shape) for n, a in start.items()}
    assert any(not np.array_equal(arrays[n], start[n]) for n in start)


def test_train_reply_carries_only_the_allowed_records_and_metrics(tmp_path: Path) -> None:
    reply = handle_train(runtime(tmp_path), instruction())
    content = reply.content
    assert set(content.keys()) == {wire.ARRAYS, wire.METRICS, wire.UPDATE_RECORD}
    assert set(content.array_records) == {wire.ARRAYS}
    assert set(content.metric_records) == {wire.METRICS}
    assert set(content.config_records) == {wire.UPDATE_RECORD}
    assert set(content.config_records[wire.UPDATE_RECORD].keys()) == {wire.ENVELOPE, wire.SIGNATURE}
    metrics = dict(content.metric_records[wire.METRICS])
    assert set(metrics) <= DEFAULT_METRIC_ALLOWLIST | {wire.NUM_EXAMPLES}
    assert {"train_loss", "train_accuracy"} <= set(metrics)
    # what is sent is what is signed
    env, _ = update_of(reply)
    assert metrics == {wire.NUM_EXAMPLES: N_TRAIN, **env.metrics}


def test_narrowed_allowlist_lets_only_that_metric_out(tmp_path: Path) -> None:
    rt = runtime(tmp_path, metric_allowlist=frozenset({"train_loss"}))
    reply = handle_train(rt, instruction())
    metrics = dict(reply.content.metric_records[wire.METRICS])
    assert set(metrics) == {wire.NUM_EXAMPLES, "train_loss"}
    env, _ = update_of(reply)
    assert set(env.metrics) == {"train_loss"}


def test_node_keeps_its_local_model(tmp_path: Path) -> None:
    workdir = tmp_path / "node"
    reply = handle_train(runtime(workdir), instruction())
    env, arrays = update_of(reply)
    assert (workdir / MODEL_FILE).is_file()
    assert (workdir / META_FILE).is_file()
    local = load_local_model(workdir)
    assert set(local) == set(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(local[name], array)
        assert local[name].dtype == array.dtype
    meta = json.loads((workdir / META_FILE).read_text())
    assert meta["update_digest"] == env.update_digest.hex()
    assert meta["round"] == GLOBAL_ROUND + 1


def test_training_is_deterministic(tmp_path: Path) -> None:
    first, _ = update_of(handle_train(runtime(tmp_path / "a"), instruction()))
    second, _ = update_of(handle_train(runtime(tmp_path / "b"), instruction()))
    assert first.update_digest == second.update_digest


def test_node_seed_changes_the_update(tmp_path: Path) -> None:
    # Guards the determinism test: the update does depend on the seed it is given.
    first, _ = update_of(handle_train(runtime(tmp_path / "a"), instruction()))
    other, _ = update_of(handle_train(runtime(tmp_path / "b", seed=1), instruction()))
    assert first.update_digest != other.update_digest


def test_num_examples_is_the_dataset_size_with_several_epochs(tmp_path: Path) -> None:
    two_epochs = Instructions(ALL_EXCHANGED, replace(CONFIG, local_epochs=2)).to_config()
    env, _ = update_of(handle_train(runtime(tmp_path), instruction(config=two_epochs)))
    assert env.num_examples == N_TRAIN


def _altered() -> dict[str, np.ndarray]:
    arrays = global_arrays()
    arrays["bias"] = arrays["bias"] + np.float32(1)
    return arrays


@pytest.mark.parametrize(
    "kwargs",
    [
        {"signed": False},
        {"signer": IMPOSTOR},
        {"sent_arrays": _altered()},
        {"federation_id": "fed-b"},
        {"task": "other-task"},
        {"config": {**CONFIG.to_config(), "dropout": 1}},
    ],
    ids=[
        "unsigned",
        "wrong-signer",
        "arrays-altered",
        "wrong-federation",
        "wrong-task",
        "bad-config",
    ],
)
def test_untrusted_global_model_is_refused(tmp_path: Path, kwargs: dict) -> None:
    reply = handle_train(runtime(tmp_path), instruction(**kwargs))
    assert reply.has_error()
    assert not reply.has_content()
    assert reply.error.code == REFUSED_MODEL
    assert not (tmp_path / MODEL_FILE).exists()


# ---- evaluate ------------------------------------------------------------------------------------


def test_evaluate_reply_carries_only_metrics(tmp_path: Path) -> None:
    reply = handle_evaluate(runtime(tmp_path), instruction(message_type=MessageType.EVALUATE))
    assert not reply.has_error()
    assert set(reply.content.keys()) == {wire.METRICS, wire.EVALUATION_RECORD}  # the metrics, and the node's signature
    metrics = dict(reply.content.metric_records[wire.METRICS])
    assert set(metrics) == {wire.NUM_EXAMPLES, "eval_loss", "eval_accuracy"}
    assert metrics[wire.NUM_EXAMPLES] == N_VAL
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert metrics["eval_loss"] > 0.0
    assert not (tmp_path / MODEL_FILE).exists()


def test_evaluate_refuses_an_unsigned_model(tmp_path: Path) -> None:
    msg = instruction(signed=False, message_type=MessageType.EVALUATE)
    reply = handle_evaluate(runtime(tmp_path), msg)
    assert reply.has_error()
    assert reply.error.code == REFUSED_MODEL


# ---- node reply through the coordinator's checks -------------------------------------------------


def test_coordinator_accepts_the_nodes_reply(tmp_path: Path) -> None:
    from coordinator.verify import Accepted, Expectation, verify_reply
    from protocols import Manifest, Member, structure

    start = global_arrays()
    manifest = Manifest(FEDERATION, COORDINATOR.public_key, (Member("a", NODE.public_key, "DE", N_TRAIN),))
    expect = Expectation(FEDERATION, RUN, GLOBAL_ROUND + 1, params_digest(start), structure(start), manifest)
    outcome = verify_reply(handle_train(runtime(tmp_path), instruction(start)), expect)
    assert isinstance(outcome, Accepted), outcome
    assert outcome.member_id == NODE.member_id


# ---- TrainConfig ---------------------------------------------------------------------------------


def test_train_config_round_trips() -> None:
    assert TrainConfig.from_config(CONFIG.to_config()) == CONFIG
    assert TrainConfig.from_config({}) == TrainConfig()


def test_train_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="dropout"):
        TrainConfig.from_config({"local-epochs": 1, "dropout": 1})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("local-epochs", 1.5),
        ("batch-size", "32"),
        ("seed", 0.0),
        ("learning-rate", "0.1"),
        ("momentum", "0.9"),
    ],
)
def test_train_config_rejects_mistyped_values(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        TrainConfig.from_config({key: value})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("key", "value"),
    [("local-epochs", 0), ("batch-size", 0), ("learning-rate", 0.0), ("momentum", 1.0)],
)
def test_train_config_rejects_out_of_range_values(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        TrainConfig.from_config({key: value})  # type: ignore[dict-item]


def test_an_older_signed_model_of_the_same_run_is_refused(tmp_path: Path) -> None:
    # A genuine, coordinator-signed model from an earlier round replayed to the node.
    rt = runtime(tmp_path)
    assert not handle_train(rt, instruction(round=GLOBAL_ROUND)).has_error()
    old = handle_train(rt, instruction(round=GLOBAL_ROUND - 1))
    assert (old.error.code, old.error.reason) == (REFUSED_MODEL, "refused global model: stale_model")
    # the same round again (a retry) and a newer round are fine; another run starts afresh
    assert not handle_train(rt, instruction(round=GLOBAL_ROUND)).has_error()
    assert not handle_train(rt, instruction(round=GLOBAL_ROUND + 1)).has_error()
    assert not handle_train(rt, instruction(round=1, run_id="run-2")).has_error()
