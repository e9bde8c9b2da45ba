"""`weft simulate`: N honest nodes (plus optional adversaries) on Flower's Ray simulation engine.

The simulation runs the very ClientApp and ServerApp a deployment runs; only the resolvers
differ: each simulated node gets its own key file, its own partition and its own work folder
under the output directory, and the coordinator runs in this process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from torch.utils.data import Subset

from coordinator import (
    Observer,
    RunResult,
    make_server_app,
)
from federation.adversary import Adversaries
from federation.config import SimulationConfig
from federation.errors import ConfigError
from federation.partition import owners_of, split, train_val_split
from federation.runtime import RunPlan, build_coordinator, build_node
from federation.tasks import SimulationData, Task, TaskOptions, check_task, load_task
from node import NodeRuntime, make_client_app, pick_device
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
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # Ray's future default; silences its warning on CPU nodes
}.items():
    os.environ.setdefault(_var, _value)


# ---- node side: a picklable resolver, cached once per Ray worker -----------------------------------


@dataclass(frozen=True)
class SimulatedNodes:
    """Resolves a simulated node's runtime from its `partition-id`."""

    task: str
    seed: int
    partition: str
    alpha: float | None
    honest: int
    federation_id: str
    home: Path
    model_dir: str = ""
    personalize_epochs: int = 0

    def __call__(self, context: Context) -> NodeRuntime:
        return _node_runtime(self, int(context.node_config["partition-id"]))

    def key_path(self, pid: int) -> Path:
        """A simulated node's private key file."""
        return self.home / "keys" / f"node-{pid:03d}.key"

    def local_data(self, pid: int) -> tuple[Subset, Subset]:
        """(train, validation) of node `pid`; adversaries reuse a copy of an honest partition."""
        data = _task_data(self.task, self.model_dir, self.seed)
        parts = _partitions(self.task, self.model_dir, self.seed, self.partition, self.alpha, self.honest)
        local = parts[pid % self.honest]
        train, val = train_val_split(len(local), self.seed, pid)
        return Subset(data.pool, local[train].tolist()), Subset(data.pool, local[val].tolist())


@lru_cache(maxsize=256)
def _node_runtime(nodes: SimulatedNodes, pid: int) -> NodeRuntime:
    torch.set_num_threads(1)  # several simulated nodes share few cores
    train, val = nodes.local_data(pid)
    return build_node(
        _task(nodes.task, nodes.model_dir),
        identity=load_signing_key(nodes.key_path(pid)),
        coordinator_key=load_public_key(nodes.home / "keys" / "coordinator.pub"),
        federation_id=nodes.federation_id,
        train=train,
        val=val,
        workdir=nodes.home / "nodes" / f"node-{pid:03d}",
        device=pick_device("auto"),
        seed=pid,
        personalize_epochs=nodes.personalize_epochs,
    )


@lru_cache(maxsize=4)
def _task(reference: str, model_dir: str) -> Task:
    return load_task(reference, TaskOptions(Path(model_dir) if model_dir else None))


@lru_cache(maxsize=4)
def _task_data(reference: str, model_dir: str, seed: int) -> SimulationData:
    return check_task(_task(reference, model_dir), seed)


def _partitions(
    reference: str, model_dir: str, seed: int, kind: str, alpha: float | None, parts: int
) -> list[np.ndarray]:
    return _split(reference, model_dir, seed, kind, alpha, parts)[0]


@lru_cache(maxsize=4)
def _split(
    reference: str, model_dir: str, seed: int, kind: str, alpha: float | None, parts: int
) -> tuple[list[np.ndarray], bool]:
    """(each node's pool indices, whether examples are shared); a split that cannot be made is a ConfigError."""
    data = _task_data(reference, model_dir, seed)
    n = len(data.pool)  # type: ignore[arg-type]
    if kind == "natural" and data.owners is None:
        raise ConfigError(f"partition: task {reference!r} declares no owner key; use --partition iid or dirichlet")
    if kind == "dirichlet" and data.labels is None:
        raise ConfigError(f"partition: task {reference!r} declares no class labels; use --partition iid or natural")
    try:
        return split(kind, parts, seed, n=n, labels=data.labels, alpha=alpha, owners=data.owners)
    except ValueError as exc:
        raise ConfigError(f"nodes: cannot split task {reference!r} across {parts} nodes ({kind}): {exc}") from exc


def resolve_partition(cfg: SimulationConfig) -> SimulationConfig:
    """`cfg` with partition `auto` made concrete from what the task's pool declares (labels, owners)."""
    if cfg.partition != "auto":
        return cfg
    data = _task_data(cfg.run.task, cfg.run.model_dir, cfg.run.seed)
    kind = "dirichlet" if data.labels is not None else "natural" if data.owners is not None else "iid"
    return replace(cfg, partition=kind, alpha=cfg.alpha if kind == "dirichlet" else None)


# ---- coordinator side --------------------------------------------------------------------------------


def prepare(cfg: SimulationConfig) -> tuple[SimulatedNodes, Manifest, SigningKey]:
    """Create keys, partitions and the manifest under `cfg.out_dir` (or, with `resume`, reload them)."""
    cfg = resolve_partition(cfg)
    home = cfg.out_dir.resolve()
    if cfg.resume:
        return _reload(cfg, home)
    if (home / "keys").exists() or (home / "summary.json").exists():
        raise FileExistsError(f"{home} already holds a simulation; choose another --out folder, or add --resume")
    run = cfg.run
    # ---- everything that can fail on a user's input fails here, before any file is written ----
    _task_data(run.task, run.model_dir, run.seed)  # validates the task (check_task) and caches its data
    _partitions(run.task, run.model_dir, run.seed, cfg.partition, cfg.alpha, cfg.nodes)  # ConfigError if impossible
    n_total = cfg.nodes + len(cfg.adversary_kinds)
    nodes = SimulatedNodes(
        run.task, run.seed, cfg.partition, cfg.alpha, cfg.nodes, cfg.federation_id, home, run.model_dir,
        cfg.personalize_epochs,
    )  # fmt: skip
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
        members.append(Member(name, key.public_key, jurisdiction="SIM", max_examples=max(len(train), 1)))
    manifest = Manifest(cfg.federation_id, coordinator.public_key, tuple(members))
    manifest = manifest.save(home / "manifest.json", coordinator)  # signed v2 manifest, version 1
    return nodes, manifest, coordinator


def _reload(cfg: SimulationConfig, home: Path) -> tuple[SimulatedNodes, Manifest, SigningKey]:
    """The keys and manifest of the simulation recorded in `home`, for `--resume`."""
    key_file = home / "keys" / "coordinator.key"
    if not key_file.exists():
        raise ConfigError(f"resume: {home} holds no simulation to resume (no keys/coordinator.key); drop --resume")
    coordinator = load_signing_key(key_file)
    manifest = Manifest.load(home / "manifest.json", coordinator.public_key)
    run = cfg.run
    _task_data(run.task, run.model_dir, run.seed)
    nodes = SimulatedNodes(
        run.task, run.seed, cfg.partition, cfg.alpha, cfg.nodes, cfg.federation_id, home, run.model_dir,
        cfg.personalize_epochs,
    )  # fmt: skip
    n_total = cfg.nodes + len(cfg.adversary_kinds)
    missing = [pid for pid in range(n_total) if not nodes.key_path(pid).exists()]
    if missing or manifest.federation_id != cfg.federation_id:
        raise ConfigError(
            f"resume: {home} was simulated with other settings (nodes, adversaries or federation id); "
            "resume with the command that started it"
        )
    return nodes, manifest, coordinator


def simulate(cfg: SimulationConfig, observer: Observer) -> RunResult:
    """Run the simulation to completion; raise if the run fails (e.g. a quorum is missed)."""
    from flwr.simulation import run_simulation

    cfg = resolve_partition(cfg)
    nodes, manifest, coordinator = prepare(cfg)
    task = _task(cfg.run.task, cfg.run.model_dir)
    data = _task_data(cfg.run.task, cfg.run.model_dir, cfg.run.seed)
    plan = RunPlan(
        manifest=manifest,
        identity=coordinator,
        out_dir=nodes.home,
        run_id_prefix="sim",
        held_out=data,
        record=_record_config(cfg, data),
        federated_evaluation=cfg.federated_evaluation,
        personalize=cfg.personalize_epochs > 0,
        observer=observer,
        resume=cfg.resume,
    )
    runtime = build_coordinator(task, cfg.run, plan)
    results: list[RunResult] = []
    errors: list[BaseException] = []
    roles = {cfg.nodes + i: kind for i, kind in enumerate(cfg.adversary_kinds)}
    client_app = make_client_app(nodes, mods=[Adversaries(roles, nodes)] if roles else [])
    server_app = make_server_app(lambda _ctx: runtime, on_result=results.append, on_error=errors.append)
    _quiet_logs(cfg.verbose)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.nodes + len(roles),
            backend_config=_backend_config(cfg),
            verbose_logging=cfg.verbose,
        )
    except Exception:
        if errors:  # the coordinator's own error says what went wrong; Flower's wrapper does not
            raise errors[0] from None
        raise
    if errors:
        raise errors[0]
    if not results:
        raise RuntimeError("the simulation ended without a result; rerun with --verbose to see Flower's log")
    return results[0]


def _record_config(cfg: SimulationConfig, data: SimulationData) -> dict[str, object]:
    """The complete resolved configuration for summary.json; a natural split also records who holds which owner."""
    record: dict[str, object] = cfg.to_json()
    _, shared = _split(cfg.run.task, cfg.run.model_dir, cfg.run.seed, cfg.partition, cfg.alpha, cfg.nodes)
    if shared:  # too few examples for a disjoint split: each node got its own draw (federation/partition.py)
        record["partition-shared"] = True
    if cfg.partition == "natural" and data.owners is not None:
        record["partition-owners"] = owners_of(data.owners, cfg.nodes)
    return record


def _backend_config(cfg: SimulationConfig) -> dict[str, dict[str, Any]]:
    """Flower's backend config for `cfg`; also makes Flower run it on weft's Ray backend, which replaces a
    node process that dies mid-round and leaves no Ray process behind (federation/sim_backend.py)."""
    from federation.sim_backend import use_weft_backend

    use_weft_backend()
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
