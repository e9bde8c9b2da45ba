"""One builder of the coordinator's and the nodes' runtimes, called by simulation and deployment alike.

Simulation (`federation/simulation.py`) and deployment (`federation/apps.py`) differ only in where
keys, data and settings come from; what a run *is* (the task resolved with its preferred settings,
the seeded round-0 model, the signed per-round instructions, the held-out evaluation, the record)
is built here, once (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from coordinator import (
    CoordinatorRuntime,
    CoordinatorSettings,
    NullObserver,
    Observer,
    OuterNesterov,
    Plain,
    ServerOptimizer,
)
from coordinator.rounds import sample_size
from federation.config import ConfigError, RunConfig, resolve_run_config
from federation.errors import TaskError
from federation.evaluation import CentralEvaluator
from federation.tasks import SimulationData, Task, TaskOptions, load_task
from node import ExchangeSpec, LocalModel, NodeRuntime
from protocols import ConfigValue, Manifest, PublicKey, SigningKey, wire
from protocols.aggregation import FedAvg, Rule
from protocols.policy import ContributionPolicy


def resolve_run(explicit: Mapping[str, Any], source: str) -> tuple[Task, RunConfig]:
    """The run's task and its configuration: weft's defaults, the task's preferences, then `explicit`.

    `explicit` holds the kebab-case keys a user set (flags or run-config keys); "" counts as not set.
    """
    explicit = {k: v for k, v in explicit.items() if v != ""}
    defaults = RunConfig()
    model_dir = str(explicit.get("model-dir", defaults.model_dir))
    prefix = f"{source}: " if source else ""
    try:
        task = load_task(str(explicit.get("task", defaults.task)), TaskOptions(Path(model_dir) if model_dir else None))
    except TaskError as exc:
        raise TaskError(f"{prefix}{exc}") from exc
    return task, resolve_run_config(explicit, {"exchange": task.exchange, **task.defaults}, source)


def initial_model(task: Task, spec: ExchangeSpec, seed: int) -> LocalModel:
    """The round-0 model (seeded), whose exchanged arrays start the run and whose frozen digest is signed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LocalModel(task.make_model, spec, task.subset)


def instructions(run: RunConfig, spec: ExchangeSpec, frozen: str) -> Callable[[int], dict[str, ConfigValue]]:
    """The signed config of each round: training settings (scheduled learning rate), exchange spec, base digest."""

    def of_round(round_: int) -> dict[str, ConfigValue]:
        return {**run.train_config(round_), **spec.to_config(), wire.FROZEN_DIGEST: frozen}

    return of_round


def aggregation_rule(run: RunConfig) -> Rule:
    """The run's aggregation rule (protocols/aggregation.py, protocols/robust.py)."""
    from protocols.robust import Krum, Median, TrimmedMean

    if run.aggregation == "median":
        return Median()
    if run.aggregation == "trimmed-mean":
        return TrimmedMean(run.trim)
    if run.aggregation == "krum":
        return Krum(run.krum_f, run.krum_m)
    return FedAvg()


def contribution_policy(run: RunConfig, maximize: bool) -> ContributionPolicy:
    """The run's contribution policy (protocols/policy.py); 0 turns the floor, cap and bound off."""
    return ContributionPolicy(
        weighting=run.weighting,
        quality_floor=run.quality_floor or None,
        maximize=maximize,
        max_share=run.max_share or None,
        norm_bound=run.norm_bound or None,
    )


def server_optimizer(run: RunConfig) -> ServerOptimizer:
    """The run's server optimizer (protocols/server_opt.py; docs/decisions/0011-server-optimizers.md)."""
    from protocols.server_opt import FedAdam, FedAvgM

    lr, momentum = run.server_learning_rate, run.server_momentum
    if run.server_optimizer == "nesterov":
        return OuterNesterov(lr, momentum)
    if run.server_optimizer == "fedavgm":
        return FedAvgM(lr, momentum)
    if run.server_optimizer == "fedadam":
        return FedAdam(lr, beta1=momentum, beta2=run.server_beta2, tau=run.server_epsilon)
    if run.server_optimizer == "fedavg":
        return Plain()
    raise ConfigError(f"server-optimizer: {run.server_optimizer!r} is not known")


@dataclass(frozen=True)
class RunPlan:
    """What the coordinator needs besides the round loop's own settings."""

    manifest: Manifest
    identity: SigningKey
    out_dir: Path
    run_id: str = ""
    """Empty: a fresh id with `run_id_prefix`."""
    run_id_prefix: str = "run"
    held_out: SimulationData | None = None
    """The task's held-out set for central evaluation (None: none)."""
    record: Mapping[str, Any] | None = None
    """Settings recorded in summary.json besides the RunConfig (simulation or deployment settings)."""
    federated_evaluation: bool = True
    personalize: bool = False
    observer: Observer | None = None
    resume: bool = False
    """Continue the run recorded in `out_dir` from its last committed round."""


def build_coordinator(task: Task, run: RunConfig, plan: RunPlan) -> CoordinatorRuntime:
    """The coordinator's runtime for `task` under `run`: round-0 model, signed instructions, evaluation, record."""
    spec = run.exchange_spec()
    try:
        start = initial_model(task, spec, run.seed)
    except ValueError as exc:
        raise ConfigError(f"exchange: {exc}") from exc
    held_out = plan.held_out
    active = len(plan.manifest.active)
    settings_need = max(1, math.ceil(run.quorum * active))  # as CoordinatorSettings.min_accepted
    if run.fraction_train < 1:  # as coordinator.rounds.round_quorum, with as few nodes as the run waits for
        waits_for = min(active, max(settings_need, run.min_train_nodes))
        asked = sample_size(waits_for, run.fraction_train, run.min_train_nodes)
        settings_need = max(1, math.ceil(round(run.quorum * asked, 9)))
    if run.aggregation == "krum" and settings_need < run.krum_f + 3:
        raise ConfigError(
            f"krum-f: Krum tolerating {run.krum_f} Byzantine update(s) needs at least {run.krum_f + 3} updates a "
            f"round, but the quorum only guarantees {settings_need}; raise --quorum (or --min-train-nodes) or lower "
            "--krum-f"
        )
    if run.aggregation == "krum" and run.krum_m > len(plan.manifest.active):
        raise ConfigError(f"krum-m: {run.krum_m} is more than the {len(plan.manifest.active)} active members")
    if (run.weighting == "quality" or run.quality_floor) and held_out is None:
        raise ConfigError("weighting: a quality policy needs the task's held-out data at the coordinator")
    return CoordinatorRuntime(
        settings=CoordinatorSettings(
            federation_id=plan.manifest.federation_id,
            run_id=plan.run_id or f"{plan.run_id_prefix}-{uuid.uuid4().hex[:12]}",
            task=task.name,
            rounds=run.rounds,
            out_dir=plan.out_dir,
            train_config=instructions(run, spec, start.frozen),
            record_config={**run.to_json(), **(plan.record or {})},
            quorum=run.quorum,
            round_timeout_s=run.round_timeout_s,
            federated_evaluation=plan.federated_evaluation,
            target_metric=task.recipe.target,
            maximize=task.recipe.maximize,
            personalize=plan.personalize,
            resume=plan.resume,
            store_updates=run.store_updates,
            fraction_train=run.fraction_train,
            min_train_nodes=run.min_train_nodes,
            payload=run.payload,
        ),
        identity=plan.identity,
        manifest=plan.manifest,
        initial_arrays=start.arrays(),
        central_eval=CentralEvaluator(task, spec, held_out.test) if held_out is not None else None,
        server_optimizer=server_optimizer(run),
        rule=aggregation_rule(run),
        policy=contribution_policy(run, task.recipe.maximize),
        central_eval_data=held_out.description if held_out is not None else "",
        observer=plan.observer or NullObserver(),
    )


def build_node(
    task: Task,
    *,
    identity: SigningKey,
    coordinator_key: PublicKey,
    federation_id: str,
    train: Dataset,
    val: Dataset,
    workdir: Path,
    device: torch.device,
    seed: int = 0,
    personalize_epochs: int = 0,
) -> NodeRuntime:
    """A node's runtime for `task`: its identity and trust anchor, its own data, the task's recipe."""
    return NodeRuntime(
        identity=identity,
        coordinator_key=coordinator_key,
        federation_id=federation_id,
        task=task.name,
        make_model=task.make_model,
        train_data=train,
        val_data=val,
        workdir=workdir,
        device=device,
        seed=seed,
        recipe=task.recipe,
        subset=task.subset,
        personalize_epochs=personalize_epochs,
    )
