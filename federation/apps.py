"""Flower App components for deployment (`flwr run`), named in pyproject's [tool.flwr.app.components].

The same `make_client_app` / `make_server_app` as the simulation, resolved from Flower's string
configs instead: a SuperNode's `--node-config` and the run's `--run-config`. Both are turned into
typed settings on first use; a missing or mistyped key fails with a message naming it.

Node config (per partner, `flower-supernode --node-config "..."`):
    key              path of the partner's private key (weft keygen)
    coordinator-key  path of the coordinator's public key (the only key models are trusted from)
    federation-id    federation this node serves
    workdir          folder where the node keeps its latest local model
    partition-id / num-partitions   which slice of the task's bundled data this node holds
    task (default: digits), alpha (default: 0 = IID), data-seed (default: 0), device (default: auto)

Run config (at the operator, `flwr run <app> <connection> --run-config "..."`): every RunConfig key, plus
    manifest         path of the federation manifest (JSON)
    coordinator-key  path of the coordinator's private key
    out-dir          folder for the run's record
    run-id           optional; a fresh id is generated when absent
The SuperLink refuses `--run-config` keys that the app's [tool.flwr.app.config] does not declare, so
the operator's app folder declares these four with "" defaults; "" counts as not set. Write that
folder with `python -m federation.apps FOLDER` (`write_app`; docs/DEPLOY.md).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import uuid
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import tomli_w
import torch
from flwr.app import Context

from coordinator import CoordinatorRuntime, CoordinatorSettings, make_server_app
from federation.config import ConfigError, RunConfig
from federation.partition import partition, train_val_split
from federation.simulation import CentralEvaluator
from federation.tasks import load_task
from node import NodeRuntime, make_client_app, pick_device
from node.arrays import model_to_arrays
from protocols import Manifest, load_public_key, load_signing_key


@dataclass(frozen=True)
class NodeSettings:
    """A deployed node's settings, from `--node-config`."""

    key: Path
    coordinator_key: Path
    federation_id: str
    workdir: Path
    partition_id: int
    num_partitions: int
    task: str = "digits"
    alpha: float = 0.0
    data_seed: int = 0
    device: str = "auto"

    @classmethod
    def from_node_config(cls, values: Mapping[str, Any]) -> NodeSettings:
        """Parse Flower's node_config; errors name the key."""
        return _parse(cls, values, "node config")


@dataclass(frozen=True)
class DeploymentSettings:
    """Operator-side settings of a deployed run, from `--run-config` (besides RunConfig's keys)."""

    manifest: Path
    coordinator_key: Path
    out_dir: Path
    run_id: str = ""


def resolve_node(context: Context) -> NodeRuntime:
    """NodeRuntime from the SuperNode's node_config (built once per process)."""
    return _node_runtime(NodeSettings.from_node_config(dict(context.node_config)))


@lru_cache(maxsize=4)
def _node_runtime(s: NodeSettings) -> NodeRuntime:
    task = load_task(s.task)
    data = task.load_data(s.data_seed).train
    parts = partition(data.labels, s.num_partitions, s.alpha if s.alpha > 0 else None, s.data_seed)
    if not 0 <= s.partition_id < s.num_partitions:
        raise ConfigError(f"node config: partition-id must be in [0, {s.num_partitions})")
    local = data.subset(parts[s.partition_id])
    train, val = train_val_split(len(local), s.data_seed, s.partition_id)
    return NodeRuntime(
        identity=load_signing_key(s.key),
        coordinator_key=load_public_key(s.coordinator_key),
        federation_id=s.federation_id,
        task=task.name,
        make_model=task.make_model,
        train_data=local.subset(train).to_dataset(),
        val_data=local.subset(val).to_dataset(),
        workdir=s.workdir,
        device=pick_device(s.device),
        seed=s.partition_id,
    )


def resolve_coordinator(context: Context) -> CoordinatorRuntime:
    """CoordinatorRuntime from the run's run_config."""
    values = dict(context.run_config)
    run_keys = {f.name.replace("_", "-") for f in fields(RunConfig)}
    run = RunConfig.from_mapping({k: v for k, v in values.items() if k in run_keys})
    # The app declares the deployment keys with "" defaults (the SuperLink refuses override keys the
    # FAB does not declare); "" counts as not set, so a forgotten path fails naming its key.
    dep_values = {k: v for k, v in values.items() if k not in run_keys and v != ""}
    dep = _parse(DeploymentSettings, dep_values, "run config")
    manifest = Manifest.load(dep.manifest)
    task = load_task(run.task)
    data = task.load_data(run.seed)
    torch.manual_seed(run.seed)
    return CoordinatorRuntime(
        settings=CoordinatorSettings(
            federation_id=manifest.federation_id,
            run_id=dep.run_id or f"run-{uuid.uuid4().hex[:12]}",
            task=task.name,
            rounds=run.rounds,
            out_dir=dep.out_dir,
            train_config=run.train_config(),
            quorum=run.quorum,
            round_timeout_s=run.round_timeout_s,
        ),
        identity=load_signing_key(dep.coordinator_key),
        manifest=manifest,
        initial_arrays=model_to_arrays(task.make_model()),
        central_eval=CentralEvaluator(task, data.test),
        central_eval_data=data.description,
    )


def _parse(cls: type[Any], values: Mapping[str, Any], source: str) -> Any:
    """Build a settings dataclass from kebab-case string-keyed values, naming bad keys."""
    by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
    unknown = sorted(set(values) - set(by_key))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(by_key)}")
    missing = sorted(k for k, f in by_key.items() if k not in values and f.default is MISSING)
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {missing}")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        kind = by_key[key].type
        try:
            if kind in ("Path", Path):
                kwargs[by_key[key].name] = Path(str(value))
            elif kind in ("int", int):
                if isinstance(value, bool) or not str(value).lstrip("-").isdigit():
                    raise ValueError
                kwargs[by_key[key].name] = int(value)
            elif kind in ("float", float):
                kwargs[by_key[key].name] = float(value)
            else:
                kwargs[by_key[key].name] = str(value)
        except ValueError:
            raise ConfigError(f"{source}: {key}: expected {kind}, got {value!r}") from None
    return cls(**kwargs)


def write_app(folder: Path) -> Path:
    """Write the operator's config-only Flower App (`folder/pyproject.toml`) for `flwr run FOLDER ...`.

    The FAB `flwr run` builds from it holds no code: the SuperLink and every SuperNode import
    `federation.apps` from the weft they installed themselves. Its run config is RunConfig's
    defaults plus the deployment keys (empty, to be set with `--run-config`).
    """
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", folder.name):
        raise ConfigError(f"app folder {folder}: Flower needs a name of letters, digits and hyphens, e.g. weft-app")
    defaults = RunConfig()
    config: dict[str, Any] = {f.name.replace("_", "-"): getattr(defaults, f.name) for f in fields(RunConfig)}
    config.update({f.name.replace("_", "-"): "" for f in fields(DeploymentSettings)})
    meta = importlib.metadata.metadata("weft")
    doc = {
        "project": {
            "name": "weft",
            "version": meta["Version"],
            "description": meta["Summary"],
            "license": "Apache-2.0",
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "weft",
                    "components": {"serverapp": "federation.apps:serverapp", "clientapp": "federation.apps:clientapp"},
                    "config": config,
                }
            }
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pyproject.toml"
    path.write_text(
        "# Written by `python -m federation.apps`: a config-only Flower App for `flwr run`.\n" + tomli_w.dumps(doc)
    )
    return path


clientapp = make_client_app(resolve_node)
serverapp = make_server_app(resolve_coordinator)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m federation.apps FOLDER   (writes FOLDER/pyproject.toml for `flwr run FOLDER ...`)")
    try:
        print(f"wrote {write_app(Path(sys.argv[1]))}")
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
