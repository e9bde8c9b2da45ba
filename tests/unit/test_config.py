"""federation/config.py: RunConfig parsing and validation, pyproject defaults, adversaries, SimulationConfig."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from federation.config import (
    ADVERSARY_REASONS,
    ConfigError,
    RunConfig,
    SimulationConfig,
    parse_adversaries,
    resolve_run_config,
)
from node import TrainConfig
from protocols import RejectReason

REPO_ROOT = Path(__file__).resolve().parents[2]
KEBAB_FIELDS = {f.name.replace("_", "-") for f in fields(RunConfig)}
KINDS = "tamper, unsigned, nonmember, replay, nan, shape, inflate, signflip, scale, die"


def error_of(exc_info: pytest.ExceptionInfo[ConfigError]) -> str:
    return str(exc_info.value)


# ---- RunConfig.from_mapping -----------------------------------------------------------------------------


def test_from_mapping_maps_kebab_keys_to_fields() -> None:
    cfg = RunConfig.from_mapping(
        {
            "task": "synthetic",
            "rounds": 3,
            "local-epochs": 2,
            "learning-rate": 0.25,
            "batch-size": 16,
            "seed": 7,
            "quorum": 0.75,
            "round-timeout-s": 12.5,
        }
    )
    assert cfg == RunConfig(
        task="synthetic",
        rounds=3,
        local_epochs=2,
        learning_rate=0.25,
        batch_size=16,
        seed=7,
        quorum=0.75,
        round_timeout_s=12.5,
    )


def test_from_mapping_keeps_defaults_for_missing_keys() -> None:
    assert RunConfig.from_mapping({}) == RunConfig()
    assert RunConfig.from_mapping({"rounds": 4}) == RunConfig(rounds=4)


def test_from_mapping_coerces_strings_and_ints() -> None:
    cfg = RunConfig.from_mapping({"rounds": "3", "learning-rate": "0.1", "quorum": 1, "round-timeout-s": "60"})
    assert cfg.rounds == 3
    assert type(cfg.rounds) is int
    assert cfg.learning_rate == 0.1
    assert type(cfg.learning_rate) is float
    assert cfg.quorum == 1.0
    assert type(cfg.quorum) is float
    assert cfg.round_timeout_s == 60.0
    assert type(cfg.round_timeout_s) is float


def test_from_mapping_rejects_unknown_key_naming_it_and_listing_known() -> None:
    with pytest.raises(ConfigError) as exc_info:
        RunConfig.from_mapping({"rounds": 3, "epochs": 2})
    assert error_of(exc_info) == f"run config: unknown key(s) ['epochs']; known keys: {sorted(KEBAB_FIELDS)}"
    assert {"optimizer", "weight-decay", "lr-schedule", "exchange", "lora-rank", "max-steps"} <= KEBAB_FIELDS


def test_from_mapping_snake_case_key_is_unknown() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['local_epochs'\]"):
        RunConfig.from_mapping({"local_epochs": 2})


def test_from_mapping_uses_source_in_messages() -> None:
    with pytest.raises(ConfigError) as exc_info:
        RunConfig.from_mapping({"quorum": 0}, source="node config")
    assert error_of(exc_info) == "node config: quorum: must be in (0, 1]"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rounds": "x"}, "run config: rounds: expected int, got 'x'"),
        ({"rounds": 2.5}, "run config: rounds: expected int, got 2.5"),
        ({"rounds": "3.0"}, "run config: rounds: expected int, got '3.0'"),
        ({"seed": True}, "run config: seed: expected int, got a boolean"),
        ({"learning-rate": False}, "run config: learning-rate: expected float, got a boolean"),
        ({"learning-rate": "fast"}, "run config: learning-rate: expected float, got 'fast'"),
        ({"optimizer": "lion"}, "run config: optimizer: must be one of sgd, adam, adamw"),
        ({"exchange": "half"}, "run config: exchange: must be one of all, lora, subset"),
        ({"lr-schedule": "step"}, "run config: lr-schedule: must be one of constant, cosine"),
        ({"weight-decay": -0.1}, "run config: weight-decay: must be >= 0"),
        ({"rounds": 3, "warmup-rounds": 3}, "run config: warmup-rounds: must be in [0, rounds)"),
        ({"task": 3}, "run config: task: expected str, got 3"),
    ],
)
def test_from_mapping_mistyped_value_names_field(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as exc_info:
        RunConfig.from_mapping(values)
    assert error_of(exc_info) == message


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rounds": 0}, "run config: rounds: must be >= 1"),
        ({"rounds": "-2"}, "run config: rounds: must be >= 1"),
        ({"quorum": 0}, "run config: quorum: must be in (0, 1]"),
        ({"quorum": 1.5}, "run config: quorum: must be in (0, 1]"),
        ({"quorum": "nan"}, "run config: quorum: must be in (0, 1]"),
        ({"learning-rate": -1}, "run config: learning-rate: must be > 0"),
        ({"learning-rate": 0}, "run config: learning-rate: must be > 0"),
        ({"learning-rate": "inf"}, "run config: learning-rate: must be > 0"),
        ({"local-epochs": 0}, "run config: local-epochs: must be >= 1"),
        ({"batch-size": 0}, "run config: batch-size: must be >= 1"),
        ({"round-timeout-s": 0}, "run config: round-timeout-s: must be > 0"),
    ],
)
def test_from_mapping_out_of_range_names_field(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as exc_info:
        RunConfig.from_mapping(values)
    assert error_of(exc_info) == message


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ConfigError) as exc_info:
        RunConfig(quorum=0)
    assert error_of(exc_info) == "quorum: must be in (0, 1]"
    assert RunConfig(quorum=1.0).quorum == 1.0


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# ---- pyproject mirrors the defaults ------------------------------------------------------------------------


def pyproject_run_config() -> dict[str, object]:
    with (REPO_ROOT / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


def test_pyproject_run_config_keys_equal_run_config_fields() -> None:
    assert set(pyproject_run_config()) == KEBAB_FIELDS


def test_pyproject_run_config_values_equal_defaults() -> None:
    table = pyproject_run_config()
    assert RunConfig.from_mapping(table) == RunConfig()
    defaults = RunConfig()
    for f in fields(RunConfig):
        value = table[f.name.replace("_", "-")]
        assert value == getattr(defaults, f.name), f.name
        assert type(value) is type(getattr(defaults, f.name)), f.name


# ---- train_config ----------------------------------------------------------------------------------------


def test_train_config_matches_node_train_config() -> None:
    run = RunConfig()
    assert run.train_config() == {
        "local-epochs": 5,
        "max-steps": 0,
        "optimizer": "sgd",
        "learning-rate": 0.1,
        "momentum": 0.9,
        "weight-decay": 0.0,
        "beta1": 0.9,
        "beta2": 0.999,
        "grad-clip": 0.0,
        "batch-size": 32,
        "seed": 0,
        "payload": "weights",
        "error-feedback": 1,
    }
    assert set(run.train_config()) == TrainConfig.keys()


def test_train_config_round_trips_through_node() -> None:
    run = RunConfig(local_epochs=2, learning_rate=0.3, batch_size=8, seed=11, optimizer="adamw", weight_decay=0.01)
    parsed = TrainConfig.from_config(run.train_config())
    assert parsed == TrainConfig(
        local_epochs=2, learning_rate=0.3, momentum=0.9, batch_size=8, seed=11, optimizer="adamw", weight_decay=0.01
    )
    assert TrainConfig.from_config(RunConfig().train_config()).to_config() == RunConfig().train_config()


def test_empty_string_means_not_set() -> None:
    # the deployed app declares every key with "" so that only what the operator sets overrides
    assert RunConfig.from_mapping({"task": "", "rounds": "", "optimizer": ""}) == RunConfig()


def test_cosine_schedule_with_warmup_by_hand() -> None:
    # rounds 5, warm-up 1: round 1 = lr * 1/2; then cosine from lr to 0.1 * lr over rounds 2..5
    run = RunConfig(rounds=5, learning_rate=0.1, lr_schedule="cosine", warmup_rounds=1, min_lr_ratio=0.1)
    got = [run.learning_rate_at(r) for r in range(1, 6)]
    # progress (r - 2) / 3 -> 0, 1/3, 2/3, 1: cos factors 1, 0.75, 0.25, 0
    expected = [0.05, 0.1, 0.01 + 0.09 * 0.75, 0.01 + 0.09 * 0.25, 0.01]
    assert got == pytest.approx(expected, abs=1e-12)
    assert run.train_config(3)["learning-rate"] == pytest.approx(0.0775)
    assert RunConfig(learning_rate=0.2).learning_rate_at(17) == 0.2  # constant


def test_task_defaults_sit_under_explicit_values() -> None:
    prefers = {"optimizer": "adam", "learning-rate": 0.001, "local-epochs": 1}
    run = resolve_run_config({"learning-rate": 0.01}, prefers, "flags")
    assert (run.optimizer, run.learning_rate, run.local_epochs, run.rounds) == ("adam", 0.01, 1, RunConfig().rounds)
    with pytest.raises(ConfigError, match=r"task defaults: unknown key\(s\) \['epochs'\]"):
        resolve_run_config({}, {"epochs": 3}, "flags")


def test_to_json_records_every_field() -> None:
    assert set(RunConfig().to_json()) == KEBAB_FIELDS
    assert RunConfig.from_mapping(RunConfig(optimizer="adam").to_json()) == RunConfig(optimizer="adam")


# ---- parse_adversaries -------------------------------------------------------------------------------------


def test_parse_adversaries_counts() -> None:
    assert parse_adversaries("tamper=1,nan=2") == {"tamper": 1, "nan": 2}
    assert parse_adversaries(" replay=3 , inflate=0 ") == {"replay": 3, "inflate": 0}


@pytest.mark.parametrize("text", ["", "   "])
def test_parse_adversaries_empty(text: str) -> None:
    assert parse_adversaries(text) == {}


def test_parse_adversaries_all_is_one_of_each() -> None:
    assert parse_adversaries("all") == dict.fromkeys(ADVERSARY_REASONS, 1)
    assert list(parse_adversaries("all")) == ["tamper", "unsigned", "nonmember", "replay", "nan", "shape", "inflate"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus=1", f"adversary: unknown kind 'bogus'; choose from {KINDS}"),
        ("tamper", "adversary: expected kind=count, got 'tamper'"),
        ("tamper=x", "adversary: expected kind=count, got 'tamper=x'"),
        ("tamper=-1", "adversary: expected kind=count, got 'tamper=-1'"),
        ("tamper=1,", "adversary: expected kind=count, got ''"),
    ],
)
def test_parse_adversaries_errors_name_adversary(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc_info:
        parse_adversaries(text)
    assert error_of(exc_info) == message


# ---- SimulationConfig ------------------------------------------------------------------------------------


def test_adversary_kinds_follow_reason_order_with_repeats() -> None:
    cfg = SimulationConfig(adversaries={"inflate": 1, "tamper": 2, "nan": 1, "shape": 0})
    assert cfg.adversary_kinds == ["tamper", "tamper", "nan", "inflate"]
    assert SimulationConfig().adversary_kinds == []
    assert SimulationConfig(adversaries=parse_adversaries("all")).adversary_kinds == list(ADVERSARY_REASONS)


def test_simulation_config_alpha_none_is_iid() -> None:
    cfg = SimulationConfig(alpha=None)
    assert cfg.alpha is None
    assert SimulationConfig().alpha == 0.5


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"nodes": 0}, "nodes: must be >= 1"),
        ({"alpha": 0.0}, "alpha: must be > 0"),
        ({"alpha": -0.5}, "alpha: must be > 0"),
        ({"alpha": float("nan")}, "alpha: must be > 0"),
        ({"alpha": float("inf")}, "alpha: must be > 0"),
        ({"cpus-per-node": 0.0}, "cpus-per-node: must be > 0"),
        ({"gpus-per-node": -1.0}, "gpus-per-node: must be >= 0"),
        ({"adversaries": {"bogus": 1}}, f"adversary: unknown kind 'bogus'; choose from {KINDS}"),
        ({"adversaries": {"tamper": -1}}, "adversary: count for 'tamper' must be >= 0"),
    ],
)
def test_simulation_config_errors_name_field(changes: dict[str, object], message: str) -> None:
    kwargs = {key.replace("-", "_"): value for key, value in changes.items()}
    with pytest.raises(ConfigError) as exc_info:
        SimulationConfig(**kwargs)  # type: ignore[arg-type]
    assert error_of(exc_info) == message


# ---- adversary reasons --------------------------------------------------------------------------------------


def test_adversary_reasons_are_reject_reasons() -> None:
    valid = {reason.value for reason in RejectReason}
    assert set(ADVERSARY_REASONS.values()) <= valid
    assert [RejectReason(v) for v in ADVERSARY_REASONS.values()] == [
        RejectReason.DIGEST_MISMATCH,
        RejectReason.UNSIGNED,
        RejectReason.UNKNOWN_MEMBER,
        RejectReason.REPLAY,
        RejectReason.NON_FINITE,
        RejectReason.SHAPE_MISMATCH,
        RejectReason.EXAMPLE_COUNT,
    ]
    assert len(set(ADVERSARY_REASONS.values())) == len(ADVERSARY_REASONS)


def test_negative_seed_is_refused_at_start_up() -> None:
    with pytest.raises(ConfigError) as exc_info:
        RunConfig.from_mapping({"seed": "-1"})
    assert error_of(exc_info) == "run config: seed: must be a non-negative integer"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tamper=²", "adversary: expected kind=count, got 'tamper=²'"),
        ("tamper=1,tamper=2", "adversary: kind 'tamper' given twice"),
    ],
)
def test_parse_adversaries_refuses_odd_counts_and_repeats(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc_info:
        parse_adversaries(text)
    assert str(exc_info.value) == message


def test_parse_adversaries_strips_spaces_around_kind_and_count() -> None:
    assert parse_adversaries(" tamper = 1 , nan=2") == {"tamper": 1, "nan": 2}


def test_simulation_starts_a_fresh_local_ray_unless_given_an_address() -> None:
    # A bare ray.init() joins the cluster /tmp/ray/ray_current_cluster names, even a dead one.
    from federation.simulation import _backend_config

    assert _backend_config(SimulationConfig())["init_args"]["address"] == "local"
    assert _backend_config(SimulationConfig(ray_address="127.0.0.1:6379"))["init_args"]["address"] == "127.0.0.1:6379"
