"""node/exchange.py, node/instructions.py, the node handlers per exchange, and the coordinator's signed record.

Expected digests are computed independently in each test (params_digest of the state the test
itself says must stay home); expected round numbers come from scripted central evaluations.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import MessageType
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from coordinator import CoordinatorRuntime, run_federation
from node.app import REFUSED_MODEL, handle_evaluate, handle_train
from node.arrays import load_arrays, model_to_arrays
from node.exchange import ExchangeSpec, LocalModel
from node.instructions import Instructions
from node.recipe import Recipe
from node.store import MODEL_FILE, PERSONAL_FILE, PERSONAL_META_FILE
from node.training import TrainConfig, evaluate_local, make_optimizer
from protocols import SignedBlob, open_global_model, params_digest, read_signed_model, wire
from protocols.npz import load_npz
from protocols.wire import PHASE, PHASE_PERSONALIZE, PHASE_TRAIN
from tests.unit.test_node import ALL_EXCHANGED, CONFIG, N_TRAIN, N_VAL, instruction, update_of
from tests.unit.test_node import runtime as node_runtime
from tests.unit.test_rounds import COORDINATOR as ROUNDS_COORDINATOR
from tests.unit.test_rounds import FakeGrid
from tests.unit.test_rounds import node as rounds_node
from tests.unit.test_rounds import runtime as rounds_runtime

CPU = torch.device("cpu")
LAST = ("2.weight", "2.bias")
FIRST = ("0.weight", "0.bias")


def two_layers(seed: int = 3, hidden: int = 5) -> nn.Module:
    """Linear(4, hidden) -> ReLU -> Linear(hidden, 3), filled from a local generator (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def last_layer(name: str) -> bool:
    return name.startswith("2.")


def numpy_state(model: nn.Module, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {n: t.detach().numpy().copy() for n, t in model.state_dict().items() if n in names}


SUBSET = ExchangeSpec(exchange="subset")


# ---- ExchangeSpec / Instructions wire forms -----------------------------------------------------


def test_exchange_spec_round_trips_and_ignores_other_keys() -> None:
    spec = ExchangeSpec(exchange="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, lora_targets="q_proj,v_proj")
    assert spec.to_config() == {
        "exchange": "lora",
        "lora-rank": 4,
        "lora-alpha": 8.0,
        "lora-dropout": 0.1,
        "lora-targets": "q_proj,v_proj",
    }
    assert ExchangeSpec.from_config(spec.to_config()) == spec
    assert ExchangeSpec.from_config({"learning-rate": 0.1, "lora-alpha": 32}) == ExchangeSpec(lora_alpha=32.0)
    assert ExchangeSpec.keys() == set(spec.to_config())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"exchange": "qlora"}, "exchange must be one of all, lora, subset, got 'qlora'"),
        ({"exchange": 1}, "exchange must be text, got 1"),
        ({"lora-rank": 2.0}, "lora-rank must be an integer, got 2.0"),
        ({"lora-rank": True}, "lora-rank must be an integer, got True"),
        ({"lora-rank": 0}, "lora-rank must be >= 1"),
        ({"lora-alpha": "16"}, "lora-alpha must be a number, got '16'"),
        ({"lora-alpha": 0.0}, "lora-alpha must be > 0"),
        ({"lora-dropout": 1.0}, r"lora-dropout must be in \[0, 1\)"),
        ({"lora-targets": 5}, "lora-targets must be text, got 5"),
    ],
)
def test_exchange_spec_errors_name_the_key(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExchangeSpec.from_config(config)


def test_instructions_round_trip_as_one_flat_map() -> None:
    todo = Instructions(
        "ab" * 32,
        TrainConfig(optimizer="adamw", learning_rate=0.003, max_steps=9),
        ExchangeSpec(exchange="lora", lora_rank=2, lora_targets="0,2"),
        PHASE_PERSONALIZE,
    )
    config = todo.to_config()
    assert set(config) == TrainConfig.keys() | ExchangeSpec.keys() | {"frozen-digest", "phase"}
    assert (config["frozen-digest"], config["phase"], config["lora-rank"]) == ("ab" * 32, "personalize", 2)
    assert Instructions.from_config(config) == todo
    # phase defaults to train
    assert Instructions.from_config({"frozen-digest": ALL_EXCHANGED}).phase == PHASE_TRAIN


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "the instructions carry no frozen-digest"),
        ({"learning-rate": 0.1}, "the instructions carry no frozen-digest"),
        ({"frozen-digest": 7}, "the instructions carry no frozen-digest"),
        ({"frozen-digest": "AB" * 32}, "frozen-digest must be 64 lowercase hex digits"),
        ({"frozen-digest": "ab" * 31 + "a"}, "frozen-digest must be 64 lowercase hex digits"),
        ({"frozen-digest": "ab" * 32 + "\n"}, "frozen-digest must be 64 lowercase hex digits"),
        ({"frozen-digest": ALL_EXCHANGED, "lora-scale": 2.0}, r"unknown training instruction\(s\): \['lora-scale'\]"),
        ({"frozen-digest": ALL_EXCHANGED, PHASE: "evaluate"}, "phase must be train or personalize, got 'evaluate'"),
        ({"frozen-digest": ALL_EXCHANGED, PHASE: 1}, "phase must be text"),
        ({"frozen-digest": ALL_EXCHANGED, "optimizer": "lion"}, "optimizer must be one of"),
        ({"frozen-digest": ALL_EXCHANGED, "exchange": "some"}, "exchange must be one of"),
    ],
)
def test_instructions_from_config_errors(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Instructions.from_config(config)


# ---- LocalModel per exchange ----------------------------------------------------------------------


def test_exchange_all_sends_every_state_entry() -> None:
    local = LocalModel(two_layers, ExchangeSpec())
    assert local.names == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert local.frozen == params_digest({}).hex() == ALL_EXCHANGED
    arrays = local.arrays()
    reference = model_to_arrays(two_layers())
    assert set(arrays) == set(reference)
    for name in reference:
        assert arrays[name].tobytes() == reference[name].tobytes()
    assert all(p.requires_grad for p in local.model.parameters())


def test_exchange_all_includes_buffers() -> None:
    local = LocalModel(lambda: nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), ExchangeSpec())
    assert local.names == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }
    assert local.arrays()["1.num_batches_tracked"].dtype == np.int64


def test_exchange_subset_sends_only_the_selected_layer() -> None:
    local = LocalModel(two_layers, SUBSET, last_layer)

    assert local.names == set(LAST)
    assert set(local.arrays()) == set(LAST)
    assert {n: p.requires_grad for n, p in local.model.named_parameters()} == {
        "0.weight": False,
        "0.bias": False,
        "2.weight": True,
        "2.bias": True,
    }
    # the frozen digest is that of the first layer, computed here from a fresh copy of the model
    assert local.frozen == params_digest(numpy_state(two_layers(), FIRST)).hex()
    assert local.frozen != ALL_EXCHANGED
    # another base gives another digest
    assert LocalModel(lambda: two_layers(seed=4), SUBSET, last_layer).frozen != local.frozen


def test_subset_frozen_bfloat16_base_is_digested_by_its_bit_pattern() -> None:
    def mixed() -> nn.Module:
        model = two_layers()
        model.get_submodule("0").to(torch.bfloat16)
        return model

    local = LocalModel(mixed, SUBSET, last_layer)
    base = mixed()
    expected = {n: base.state_dict()[n].view(torch.int16).numpy().copy() for n in FIRST}
    assert local.frozen == params_digest(expected).hex()
    assert all(a.dtype == np.float32 for a in local.arrays().values())


def test_subset_needs_a_selector_that_picks_something() -> None:
    with pytest.raises(ValueError, match="exchange 'subset' needs a task that declares"):
        LocalModel(two_layers, SUBSET, None)
    with pytest.raises(ValueError, match="exchange 'subset': the model has no trainable parameter"):
        LocalModel(two_layers, SUBSET, lambda name: False)


def test_exchanged_bfloat16_is_refused_by_name() -> None:
    def bf16() -> nn.Module:
        model = two_layers()
        model.get_submodule("2").to(torch.bfloat16)
        return model

    local = LocalModel(bf16, SUBSET, last_layer)
    with pytest.raises(ValueError, match=r"parameter '2\.(weight|bias)' is bfloat16"):
        local.arrays()


LORA = ExchangeSpec(exchange="lora", lora_rank=2, lora_alpha=4.0, lora_targets="0,2")
LORA_NAMES = {f"base_model.model.{i}.lora_{m}.default.weight" for i in (0, 2) for m in ("A", "B")}


def wide() -> nn.Module:
    """Linear(4, 64) -> ReLU -> Linear(64, 64) -> ReLU -> Linear(64, 3), deterministic; LoRA on 0 and 2."""
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_lora_sends_only_the_adapters_and_starts_as_the_base() -> None:
    local = LocalModel(wide, LORA)
    base = wide()

    # only the adapters travel, and only they train
    assert local.names == LORA_NAMES
    arrays = local.arrays()
    assert set(arrays) == LORA_NAMES
    assert {n for n, p in local.model.named_parameters() if p.requires_grad} == LORA_NAMES
    shapes = {n: a.shape for n, a in arrays.items()}
    assert shapes == {
        "base_model.model.0.lora_A.default.weight": (2, 4),
        "base_model.model.0.lora_B.default.weight": (64, 2),
        "base_model.model.2.lora_A.default.weight": (2, 64),
        "base_model.model.2.lora_B.default.weight": (64, 2),
    }
    sent = sum(a.nbytes for a in arrays.values())
    total = sum(t.numel() * t.element_size() for t in local.model.state_dict().values())
    assert sent == 4 * (8 + 128 + 128 + 128)
    assert total == sent + 4 * (4 * 64 + 64 + 64 * 64 + 64 + 64 * 3 + 3)
    assert sent / total < 0.08

    # B starts at zero, so the adapted model computes exactly what the base does
    assert not arrays["base_model.model.0.lora_B.default.weight"].any()
    assert not arrays["base_model.model.2.lora_B.default.weight"].any()
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))
    local.model.eval()
    with torch.no_grad():
        assert torch.equal(local.model(x), base(x))

    # the frozen digest is the base's, under peft's names (adapted layers gain a `base_layer`)
    assert local.frozen == params_digest(peft_named(base)).hex()


def peft_named(base: nn.Module) -> dict[str, np.ndarray]:
    """The base model's state under the names peft gives it when layers 0 and 2 are adapted."""
    out = {}
    for name, tensor in base.state_dict().items():
        layer, kind = name.split(".")
        inner = f"{layer}.base_layer" if layer in ("0", "2") else layer
        out[f"base_model.model.{inner}.{kind}"] = tensor.numpy().copy()
    return out


def test_lora_targets_that_do_not_exist_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot add LoRA adapters to this model"):
        LocalModel(wide, replace(LORA, lora_targets="7"))


# ---- strict loading ----------------------------------------------------------------------------------


def test_load_replaces_only_the_exchanged_part() -> None:
    local = LocalModel(two_layers, SUBSET, last_layer)
    incoming = numpy_state(two_layers(seed=9), LAST)
    local.load(incoming)
    state = local.model.state_dict()
    for name in LAST:
        assert state[name].numpy().tobytes() == incoming[name].tobytes()
    for name, array in numpy_state(two_layers(), FIRST).items():
        assert state[name].numpy().tobytes() == array.tobytes()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {k: v for k, v in a.items() if k != "2.bias"}, r"missing \['2.bias'\], extra \[\]"),
        (lambda a: {**a, "0.weight": np.zeros((5, 4), np.float32)}, r"missing \[\], extra \['0.weight'\]"),
        (
            lambda a: {**a, "2.weight": np.zeros((3, 4), np.float32)},
            r"global model array '2.weight' is float32\[3, 4\], local model expects torch.float32\[3, 5\]",
        ),
        (
            lambda a: {**a, "2.bias": a["2.bias"].astype(np.float64)},
            r"global model array '2.bias' is float64\[3\], local model expects torch.float32\[3\]",
        ),
    ],
    ids=["missing", "extra", "shape", "dtype"],
)
def test_load_is_strict(change, message: str) -> None:
    local = LocalModel(two_layers, SUBSET, last_layer)
    before = {n: t.clone() for n, t in local.model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        local.load(change(numpy_state(two_layers(seed=9), LAST)))
    for name, tensor in local.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # nothing was half-loaded


# ---- the node per exchange -------------------------------------------------------------------------


def subset_instruction(frozen: str, message_type: str = MessageType.TRAIN, **changes):
    todo = Instructions(frozen, CONFIG, SUBSET)
    return instruction(
        numpy_state(two_layers(seed=8), LAST), config=todo.to_config(), message_type=message_type, **changes
    )


def recording_recipe(seen: list[TrainConfig]) -> Recipe:
    def factory(params, config):
        seen.append(config)
        return make_optimizer(params, config)

    return Recipe(make_optimizer=factory)


def test_node_trains_and_sends_only_the_subset(tmp_path: Path) -> None:
    seen: list[TrainConfig] = []
    rt = node_runtime(tmp_path, make_model=two_layers, subset=last_layer, recipe=recording_recipe(seen))
    frozen = params_digest(numpy_state(two_layers(), FIRST)).hex()
    start = numpy_state(two_layers(seed=8), LAST)

    reply = handle_train(rt, subset_instruction(frozen))

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    env, arrays = update_of(reply)
    assert set(arrays) == set(LAST)
    assert env.update_digest == params_digest(arrays)
    assert env.base_digest == params_digest(start)
    assert env.num_examples == N_TRAIN
    assert all(not np.array_equal(arrays[n], start[n]) for n in LAST)
    assert seen == [CONFIG]
    # the frozen layer stayed the node's own
    kept = rt.local_model(SUBSET).model.state_dict()
    for name, array in numpy_state(two_layers(), FIRST).items():
        assert kept[name].numpy().tobytes() == array.tobytes()


@pytest.mark.parametrize("handler", [handle_train, handle_evaluate])
def test_a_different_base_is_refused_and_nothing_trains(tmp_path: Path, handler) -> None:
    seen: list[TrainConfig] = []
    # the node holds another base (its first layer differs from the coordinator's)
    rt = node_runtime(tmp_path, make_model=lambda: two_layers(seed=4), subset=last_layer, recipe=recording_recipe(seen))
    coordinators_base = params_digest(numpy_state(two_layers(), FIRST)).hex()
    kind = MessageType.TRAIN if handler is handle_train else MessageType.EVALUATE

    reply = handler(rt, subset_instruction(coordinators_base, message_type=kind))

    assert reply.has_error()
    assert (reply.error.code, reply.error.reason) == (REFUSED_MODEL, "refused global model: base_mismatch")
    assert seen == []
    assert not (tmp_path / MODEL_FILE).exists()


def test_all_exchange_with_a_non_empty_frozen_digest_is_refused(tmp_path: Path) -> None:
    config = Instructions("0" * 64, CONFIG).to_config()
    reply = handle_train(node_runtime(tmp_path), instruction(config=config))
    assert (reply.error.code, reply.error.reason) == (REFUSED_MODEL, "refused global model: base_mismatch")


def test_node_trains_lora_adapters_only(tmp_path: Path) -> None:
    coordinator_side = LocalModel(wide, LORA)
    start = coordinator_side.arrays()
    rt = node_runtime(tmp_path, make_model=wide)
    config = Instructions(coordinator_side.frozen, CONFIG, LORA).to_config()

    reply = handle_train(rt, instruction(start, config=config))

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    _, arrays = update_of(reply)
    assert set(arrays) == LORA_NAMES
    assert any(not np.array_equal(arrays[n], start[n]) for n in LORA_NAMES)
    state = rt.local_model(LORA).model.state_dict()
    for name, array in peft_named(wide()).items():
        assert state[name].numpy().tobytes() == array.tobytes(), name


# ---- personalization -------------------------------------------------------------------------------


def personalize_instruction(phase: str = PHASE_PERSONALIZE):
    config = Instructions(ALL_EXCHANGED, replace(CONFIG, max_steps=1), phase=phase).to_config()
    return instruction(config=config, message_type=MessageType.EVALUATE)


def test_personalize_reports_before_and_after_and_keeps_the_model(tmp_path: Path) -> None:
    seen: list[TrainConfig] = []
    rt = node_runtime(tmp_path, personalize_epochs=2, recipe=recording_recipe(seen))
    msg = personalize_instruction()
    start = {n: a.numpy() for n, a in msg.content.array_records[wire.ARRAYS].items()}

    reply = handle_evaluate(rt, msg)

    assert not reply.has_error()
    metrics = dict(reply.content.metric_records[wire.METRICS])
    assert set(metrics) == {
        wire.NUM_EXAMPLES,
        "eval_loss",
        "eval_accuracy",
        "personal_loss",
        "personal_accuracy",
    }
    assert metrics[wire.NUM_EXAMPLES] == N_VAL
    # two epochs, no step cap, everything else as signed
    assert seen == [replace(CONFIG, local_epochs=2, max_steps=0)]

    # eval_* are the global model's validation metrics
    model = nn.Linear(4, 3)
    load_arrays(model, start)
    before = evaluate_local(model, rt.val_data, CPU)
    assert (metrics["eval_loss"], metrics["eval_accuracy"]) == (before.loss, before.accuracy)

    # personal_* are those of the kept personal model
    kept = load_npz(tmp_path / PERSONAL_FILE)
    assert set(kept) == set(start)
    assert any(not np.array_equal(kept[n], start[n]) for n in start)
    load_arrays(model, kept)
    after = evaluate_local(model, rt.val_data, CPU)
    assert (metrics["personal_loss"], metrics["personal_accuracy"]) == (after.loss, after.accuracy)
    meta = json.loads((tmp_path / PERSONAL_META_FILE).read_text())
    assert meta == {"personalize_epochs": 2, "validation_metrics": {"loss": after.loss, "accuracy": after.accuracy}}

    # the shared model was not touched by personalization
    shared = rt.local_model(ExchangeSpec()).arrays()
    assert all(shared[n].tobytes() == start[n].tobytes() for n in start)
    assert not (tmp_path / MODEL_FILE).exists()


@pytest.mark.parametrize(
    ("epochs", "phase"),
    [(0, PHASE_PERSONALIZE), (2, PHASE_TRAIN)],
    ids=["no-personalize-epochs", "train-phase"],
)
def test_no_personalization_unless_asked_and_configured(tmp_path: Path, epochs: int, phase: str) -> None:
    seen: list[TrainConfig] = []
    rt = node_runtime(tmp_path, personalize_epochs=epochs, recipe=recording_recipe(seen))
    reply = handle_evaluate(rt, personalize_instruction(phase))
    metrics = dict(reply.content.metric_records[wire.METRICS])
    assert set(metrics) == {wire.NUM_EXAMPLES, "eval_loss", "eval_accuracy"}
    assert seen == []
    assert not (tmp_path / PERSONAL_FILE).exists()
    assert not (tmp_path / PERSONAL_META_FILE).exists()


# ---- the coordinator: per-round signed instructions, summary ----------------------------------------


@pytest.fixture
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages read the running task's identity; outside a Flower process, set one."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


LR = {1: 0.1, 2: 0.05, 3: 0.025, 4: 0.0125}
"""The schedule: round about to be trained -> learning rate (4: signed into the final model)."""
SCRIPT = [{"loss": 0.3, "accuracy": 0.5}, {"loss": 0.4, "accuracy": 0.8}, {"loss": 0.6, "accuracy": 0.7}]
"""Central metrics of rounds 1, 2, 3: best accuracy in round 2, best loss in round 1, last is round 3."""
RECORD = {"rounds": 3, "lr-schedule": "step", "learning-rate": 0.1, "nested": {"tags": ["a", "b"]}}


def schedule(round_: int) -> dict:
    return Instructions(ALL_EXCHANGED, TrainConfig(learning_rate=LR[round_], batch_size=4, seed=5)).to_config()


def scripted_run(
    tmp_path: Path, node_ids: list[int], target: str = "accuracy", maximize: bool = True, **settings
) -> tuple[CoordinatorRuntime, list[str], list[float], FakeGrid]:
    """A 3-round run over the given node ids whose central evaluation plays SCRIPT."""
    lrs: list[float] = []
    evaluated: list[str] = []

    def factory(params, config):
        lrs.append(config.learning_rate)
        return make_optimizer(params, config)

    grid_nodes = {
        nid: replace(rounds_node(i, tmp_path), recipe=Recipe(make_optimizer=factory)) for i, nid in enumerate(node_ids)
    }

    def central_eval(arrays):
        evaluated.append(params_digest(arrays).hex())
        return SCRIPT[len(evaluated) - 1]

    base = rounds_runtime(tmp_path / "out", rounds=3)
    rt = replace(
        base,
        settings=replace(
            base.settings,
            train_config=schedule,
            record_config=RECORD,
            target_metric=target,
            maximize=maximize,
            **settings,
        ),
        central_eval=central_eval,
        central_eval_data="scripted held-out set",
    )
    return rt, evaluated, lrs, FakeGrid(grid_nodes)


@pytest.mark.usefixtures("flower_task_identity")
def test_summary_and_per_round_signed_learning_rate(tmp_path: Path) -> None:
    rt, evaluated, lrs, grid = scripted_run(tmp_path, [9001, 17, 4242])
    sent: list[tuple[str, int, object]] = []
    push = grid.push_messages

    def spy(messages):
        messages = list(messages)
        for m in messages:
            record = m.content.config_records[wire.GLOBAL_RECORD]
            env = open_global_model(
                SignedBlob(record[wire.ENVELOPE], record[wire.SIGNATURE]), ROUNDS_COORDINATOR.public_key
            )
            sent.append((m.metadata.message_type, env.round, env.config["learning-rate"]))
        return push(messages)

    grid.push_messages = spy  # type: ignore[method-assign]

    result = run_federation(grid, rt)  # type: ignore[arg-type]

    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert (summary["status"], summary["rounds"]) == ("completed", 3)
    assert summary["config"] == RECORD
    assert summary["final"] == {"round": 3, "loss": 0.6, "accuracy": 0.7}
    assert summary["best"] == {"round": 2, "by": "accuracy", "loss": 0.4, "accuracy": 0.8}
    assert (summary["final_accuracy"], summary["final_loss"]) == (0.7, 0.6)
    assert summary["accuracy_measured_on"] == "scripted held-out set"

    # the central evaluation saw each round's new global model
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert evaluated == [x["global_model_digest"] for x in lines]
    assert [(x["round"], x["loss"], x["accuracy"]) for x in lines] == [(1, 0.3, 0.5), (2, 0.4, 0.8), (3, 0.6, 0.7)]

    # each round's instructions carry that round's learning rate, signed; the nodes trained with it
    train = [(r, lr) for kind, r, lr in sent if kind == MessageType.TRAIN]
    assert train == [(0, 0.1)] * 3 + [(1, 0.05)] * 3 + [(2, 0.025)] * 3
    evaluate = [(r, lr) for kind, r, lr in sent if kind == MessageType.EVALUATE]
    assert evaluate == [(1, 0.05)] * 3 + [(2, 0.025)] * 3 + [(3, 0.0125)] * 3
    assert lrs == [0.1] * 3 + [0.05] * 3 + [0.025] * 3
    for r in range(4):
        model = read_signed_model(out / "global" / f"round-{r:04d}.npz", ROUNDS_COORDINATOR.public_key)
        assert (model.envelope.round, model.envelope.config["learning-rate"]) == (r, LR[r + 1])


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize(
    ("target", "maximize", "best"),
    [("accuracy", True, 2), ("loss", False, 1), ("loss", True, 3), ("accuracy", False, 1)],
)
def test_best_round_follows_the_target_and_direction(tmp_path: Path, target: str, maximize: bool, best: int) -> None:
    # one node is enough (quorum 0.3 of 3 members); no federated evaluation: only the central script counts
    rt, _, _, grid = scripted_run(tmp_path, [17], target, maximize, quorum=0.3, federated_evaluation=False)
    summary = run_federation(grid, rt).summary  # type: ignore[arg-type]
    assert summary["best"] == {"round": best, "by": target, **SCRIPT[best - 1]}
    assert summary["final"] == {"round": 3, **SCRIPT[2]}


@pytest.mark.usefixtures("flower_task_identity")
def test_a_nan_first_round_is_not_the_best(tmp_path: Path) -> None:
    rt, _, _, grid = scripted_run(tmp_path, [17], "loss", False, quorum=0.3, federated_evaluation=False)
    script = [{"loss": float("nan"), "accuracy": 0.1}, {"loss": 0.5, "accuracy": 0.6}, {"loss": 0.4, "accuracy": 0.7}]
    calls: list[int] = []

    def central_eval(arrays):
        calls.append(1)
        return script[len(calls) - 1]

    summary = run_federation(grid, replace(rt, central_eval=central_eval)).summary  # type: ignore[arg-type]
    assert summary["best"] == {"round": 3, "by": "loss", **script[2]}
