"""`weft simulate`: N honest nodes (plus optional adversaries) on Flower's Ray simulation engine.

The simulation runs the very ClientApp and ServerApp a deployment runs; only the resolvers
differ: each simulated node gets its own key file, its own partition and its own work folder
under the output directory, and the coordinator runs in this process.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context

from coordinator import (
    CoordinatorRuntime,
    CoordinatorSettings,
    Observer,
    RunResult,
    make_server_app,
)
from federation.adversary import Adversaries
from federation.config import SimulationConfig
from federation.errors import ConfigError
from federation.partition import partition, train_val_split
from federation.tasks import LabeledArrays, Task, TaskData, check_task, load_task
from node import NodeRuntime, evaluate_local, make_client_app, pick_device
from node.arrays import load_arrays, model_to_arrays
from protocols import (
    Manifest,
    Member,
    SigningKey,
    load_public_key,
    load_signing_key,
    save_public_key,
    save_signing_key,
)

for _var, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_var, _value)


# ---- node side: a picklable resolver, cached once per Ray worker -----------------------------------


@dataclass(frozen=True)
class SimulatedNodes:
    """Resolves a simulated node's runtime from its `partition-id`."""

    task: str
    seed: int
    alpha: float | None
    honest: int
    federation_id: str
    home: Path

    def __call__(self, context: Context) -> NodeRuntime:
        return _node_runtime(self, int(context.node_config["partition-id"]))

    def key_path(self, pid: int) -> Path:
        """A simulated node's private key file."""
        return self.home / "keys" / f"node-{pid:03d}.key"

    def local_data(self, pid: int) -> tuple[LabeledArrays, LabeledArrays]:
        """(train, validation) of node `pid`; adversaries reuse a copy of an honest partition."""
        data = _task_data(self.task, self.seed)
        parts = _partitions(self.task, self.seed, self.alpha, self.honest)
        local = data.train.subset(parts[pid % self.honest])
        train, val = train_val_split(len(local), self.seed, pid)
        return local.subset(train), local.subset(val)


@lru_cache(maxsize=256)
def _node_runtime(nodes: SimulatedNodes, pid: int) -> NodeRuntime:
    torch.set_num_threads(1)  # several simulated nodes share few cores
    task = load_task(nodes.task)
    train, val = nodes.local_data(pid)
    return NodeRuntime(
        identity=load_signing_key(nodes.key_path(pid)),
        coordinator_key=load_public_key(nodes.home / "keys" / "coordinator.pub"),
        federation_id=nodes.federation_id,
        task=task.name,
        make_model=task.make_model,
        train_data=train.to_dataset(),
        val_data=val.to_dataset(),
        workdir=nodes.home / "nodes" / f"node-{pid:03d}",
        device=pick_device("auto"),
        seed=pid,
    )


@lru_cache(maxsize=4)
def _task_data(task: str, seed: int) -> TaskData:
    return check_task(load_task(task), seed)


@lru_cache(maxsize=4)
def _partitions(task: str, seed: int, alpha: float | None, parts: int) -> list[np.ndarray]:
    return partition(_task_data(task, seed).train.labels, parts, alpha, seed)


# ---- coordinator side --------------------------------------------------------------------------------


def prepare(cfg: SimulationConfig) -> tuple[SimulatedNodes, Manifest, SigningKey]:
    """Create keys, partitions and the manifest under `cfg.out_dir`."""
    home = cfg.out_dir.resolve()
    if (home / "keys").exists() or (home / "summary.json").exists():
        raise FileExistsError(f"{home} already holds a simulation; choose another --out folder")
    # ---- everything that can fail on a user's input fails here, before any file is written ----
    _task_data(cfg.run.task, cfg.run.seed)  # validates the task (check_task) and caches its data
    try:
        _partitions(cfg.run.task, cfg.run.seed, cfg.alpha, cfg.nodes)
    except ValueError as exc:
        raise ConfigError(f"nodes / alpha: {exc}") from exc
    n_total = cfg.nodes + len(cfg.adversary_kinds)
    nodes = SimulatedNodes(cfg.run.task, cfg.run.seed, cfg.alpha, cfg.nodes, cfg.federation_id, home)
    coordinator = SigningKey.generate()
    save_signing_key(coordinator, home / "keys" / "coordinator.key")
    save_public_key(coordinator.public_key, home / "keys" / "coordinator.pub")
    members = []
    for pid in range(n_total):
        key = SigningKey.generate()
        save_signing_key(key, nodes.key_path(pid))
        kind = cfg.adversary_kinds[pid - cfg.nodes] if pid >= cfg.nodes else None
        if kind == "nonmember":
            continue  # its key is never registered
        train, _ = nodes.local_data(pid)
        name = f"node-{pid:03d}" if kind is None else f"adversary-{pid:03d}-{kind}"
        members.append(Member(name, key.public_key, jurisdiction="SIM", max_examples=len(train)))
    manifest = Manifest(cfg.federation_id, coordinator.public_key, tuple(members))
    manifest.save(home / "manifest.json")
    return nodes, manifest, coordinator


@dataclass(frozen=True)
class CentralEvaluator:
    """Evaluates a global model on the task's held-out test split."""

    task: Task
    test: LabeledArrays

    def __call__(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        model = self.task.make_model()
        load_arrays(model, arrays)
        stats = evaluate_local(model, self.test.to_dataset(), torch.device("cpu"))
        return {"loss": stats.loss, "accuracy": stats.accuracy}


def simulate(cfg: SimulationConfig, observer: Observer) -> RunResult:
    """Run the simulation to completion; raise if the run fails (e.g. a quorum is missed)."""
    from flwr.simulation import run_simulation

    nodes, manifest, coordinator = prepare(cfg)
    task = load_task(cfg.run.task)
    data = _task_data(cfg.run.task, cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    runtime = CoordinatorRuntime(
        settings=CoordinatorSettings(
            federation_id=cfg.federation_id,
            run_id=f"sim-{uuid.uuid4().hex[:12]}",
            task=task.name,
            rounds=cfg.run.rounds,
            out_dir=nodes.home,
            train_config=cfg.run.train_config(),
            quorum=cfg.run.quorum,
            round_timeout_s=cfg.run.round_timeout_s,
            federated_evaluation=cfg.federated_evaluation,
        ),
        identity=coordinator,
        manifest=manifest,
        initial_arrays=model_to_arrays(task.make_model()),
        central_eval=CentralEvaluator(task, data.test),
        central_eval_data=data.description,
        observer=observer,
    )
    results: list[RunResult] = []
    roles = {cfg.nodes + i: kind for i, kind in enumerate(cfg.adversary_kinds)}
    client_app = make_client_app(nodes, mods=[Adversaries(roles, nodes)] if roles else [])
    server_app = make_server_app(lambda _ctx: runtime, on_result=results.append)
    _quiet_logs(cfg.verbose)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg.nodes + len(roles),
        backend_config=_backend_config(cfg),
        verbose_logging=cfg.verbose,
    )
    if not results:
        raise RuntimeError("the simulation ended without a result; rerun with --verbose to see Flower's log")
    return results[0]


def _backend_config(cfg: SimulationConfig) -> dict[str, dict[str, Any]]:
    init_args: dict[str, Any] = {"log_to_driver": cfg.verbose, "logging_level": "INFO" if cfg.verbose else "ERROR"}
    # Without an address, always start a fresh local instance: a bare ray.init() would join whatever
    # cluster /tmp/ray/ray_current_cluster names, even a dead one left by a killed run (it then hangs).
    init_args["address"] = cfg.ray_address or "local"
    return {
        "client_resources": {"num_cpus": cfg.cpus_per_node, "num_gpus": cfg.gpus_per_node},
        "init_args": init_args,
    }


def _quiet_logs(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)
    logging.getLogger("weft").setLevel(logging.INFO if verbose else logging.ERROR)
