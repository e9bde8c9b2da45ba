"""Flower App components for deployment (`flwr run`), named in pyproject's [tool.flwr.app.components].

The same `make_client_app` / `make_server_app` as the simulation, resolved from Flower's string
configs instead: a SuperNode's `--node-config` and the run's `--run-config`. Both are turned into
typed settings on first use; a missing or mistyped key fails with a message naming it. In both,
an empty value ("") counts as not set.

Node config (per partner, `flower-supernode --node-config "..."`):
    key                 path of the partner's private key (weft keygen)
    coordinator-key     path of the coordinator's public key (the only key models are trusted from)
    federation-id       federation this node serves
    workdir             folder where the node keeps its latest local (and personalized) model
    data-dir            the partner's own data folder, read by the task's local data recipe (for the
                        built-in digits and synthetic tasks: *.csv files of feature values and an integer
                        label per row). The data and the path itself never leave the node.
    task                (default: digits) built-in name or module:attr; the same task as the run's
    model-dir           (optional) checkpoint folder the partner holds, for task factories such as lm
    personalize-epochs  (default: 0) local epochs of fine-tuning on the final model, kept by the partner,
                        when the operator's run asks for personalization
    seed                (default: 0) node-local seed mixed into the round's shuffling seed
    device              (default: auto) auto, cpu or cuda[:N]

Run config (at the operator, `flwr run <app> <connection> --run-config "..."`): every RunConfig key
(a key left out takes the task's preferred value, then weft's default), plus
    manifest              path of the federation manifest (JSON)
    coordinator-key       path of the coordinator's private key
    out-dir               folder for the run's record
    run-id                optional; a fresh id is generated when absent
    personalize           optional (default false): after the last round, ask every node to fine-tune the
                          final model locally (for its own `personalize-epochs`) and report before/after
    federated-evaluation  optional (default true): ask every node to evaluate each new global model on
                          its own validation split (only declared metrics come back)
The SuperLink refuses `--run-config` keys that the app's [tool.flwr.app.config] does not declare, so
the operator's app folder declares all of them with "" (not set). Write that folder with
`python -m federation.apps FOLDER` (`write_app`; docs/DEPLOY.md).
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
from flwr.app import Context

from coordinator import CoordinatorRuntime, CoordinatorSettings, make_server_app
from federation.config import ConfigError, RunConfig, resolve_run_config
from federation.errors import TaskError
from federation.evaluation import CentralEvaluator
from federation.simulation import initial_model, instructions
from federation.tasks import (
    LocalData,
    SimulationData,
    Task,
    TaskOptions,
    check_model,
    check_task,
    load_local,
    load_task,
)
from node import NodeRuntime, make_client_app, pick_device
from protocols import Manifest, load_public_key, load_signing_key


@dataclass(frozen=True)
class NodeSettings:
    """A deployed node's settings, from `--node-config`."""

    key: Path
    coordinator_key: Path
    federation_id: str
    workdir: Path
    data_dir: Path
    task: str = "digits"
    model_dir: Path | None = None
    personalize_epochs: int = 0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.personalize_epochs < 0:
            raise ConfigError("node config: personalize-epochs must be >= 0")
        if not 0 <= self.seed < 2**63:
            raise ConfigError("node config: seed must be a non-negative integer")

    @classmethod
    def from_node_config(cls, values: Mapping[str, Any]) -> NodeSettings:
        """Parse Flower's node_config ("" counts as not set); errors name the key."""
        settings: NodeSettings = _parse(cls, {k: v for k, v in values.items() if v != ""}, "node config")
        return settings


@dataclass(frozen=True)
class DeploymentSettings:
    """Operator-side settings of a deployed run, from `--run-config` (besides RunConfig's keys)."""

    manifest: Path
    coordinator_key: Path
    out_dir: Path
    run_id: str = ""
    personalize: bool = False
    federated_evaluation: bool = True


def resolve_node(context: Context) -> NodeRuntime:
    """NodeRuntime from the SuperNode's node_config (built once per process)."""
    return _node_runtime(NodeSettings.from_node_config(dict(context.node_config)))


@lru_cache(maxsize=4)
def _node_runtime(s: NodeSettings) -> NodeRuntime:
    try:
        task = load_task(s.task, TaskOptions(s.model_dir))
    except TaskError as exc:
        raise TaskError(f"node config: {exc}") from exc
    data = _local_data(task, s.data_dir)
    try:
        device = pick_device(s.device)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"node config: device: {exc}") from exc
    return NodeRuntime(
        identity=load_signing_key(s.key),
        coordinator_key=load_public_key(s.coordinator_key),
        federation_id=s.federation_id,
        task=task.name,
        make_model=task.make_model,
        train_data=data.train,
        val_data=data.val,
        workdir=s.workdir,
        device=device,
        seed=s.seed,
        recipe=task.recipe,
        subset=task.subset,
        personalize_epochs=s.personalize_epochs,
    )


def _local_data(task: Task, data_dir: Path) -> LocalData:
    """The partner's own data (`load_local`); every error names the key and the folder or file.

    The message is only ever logged on the node: a failing node sends a fixed code and text.
    """
    try:
        return load_local(task, data_dir)
    except TaskError as exc:
        detail = str(exc) if "data-dir" in str(exc) else f"data-dir {data_dir}: {exc}"
        raise TaskError(f"node config: {detail}") from exc


def resolve_coordinator(context: Context) -> CoordinatorRuntime:
    """CoordinatorRuntime from the run's run_config.

    The run's settings are resolved as in `weft simulate`: weft's defaults, then the task's preferred
    values, then the keys the operator set.
    """
    values = {k: v for k, v in dict(context.run_config).items() if v != ""}
    run_keys = {f.name.replace("_", "-") for f in fields(RunConfig)}
    explicit = {k: v for k, v in values.items() if k in run_keys}
    # The app declares the deployment keys with "" defaults (the SuperLink refuses override keys the
    # FAB does not declare); "" counts as not set, so a forgotten path fails naming its key.
    dep: DeploymentSettings = _parse(
        DeploymentSettings, {k: v for k, v in values.items() if k not in run_keys}, "run config"
    )
    defaults = RunConfig()
    model_dir = str(explicit.get("model-dir", defaults.model_dir))
    try:
        task = load_task(str(explicit.get("task", defaults.task)), TaskOptions(Path(model_dir) if model_dir else None))
    except TaskError as exc:
        raise TaskError(f"run config: {exc}") from exc
    run = resolve_run_config(explicit, {"exchange": task.exchange, **task.defaults}, "run config")
    held_out = _held_out(task, run.seed)
    manifest = Manifest.load(dep.manifest)
    spec = run.exchange_spec()
    try:
        start = initial_model(task, spec, run.seed)
    except ValueError as exc:
        raise ConfigError(f"run config: exchange: {exc}") from exc
    return CoordinatorRuntime(
        settings=CoordinatorSettings(
            federation_id=manifest.federation_id,
            run_id=dep.run_id or f"run-{uuid.uuid4().hex[:12]}",
            task=task.name,
            rounds=run.rounds,
            out_dir=dep.out_dir,
            train_config=instructions(run, spec, start.frozen),
            record_config={
                **run.to_json(),
                "personalize": dep.personalize,
                "federated-evaluation": dep.federated_evaluation,
            },
            quorum=run.quorum,
            round_timeout_s=run.round_timeout_s,
            target_metric=task.recipe.target,
            maximize=task.recipe.maximize,
            personalize=dep.personalize,
            federated_evaluation=dep.federated_evaluation,
        ),
        identity=load_signing_key(dep.coordinator_key),
        manifest=manifest,
        initial_arrays=start.arrays(),
        central_eval=CentralEvaluator(task, spec, held_out.test) if held_out else None,
        central_eval_data=held_out.description if held_out else "",
    )


def _held_out(task: Task, seed: int) -> SimulationData | None:
    """The task's held-out test set for the coordinator's evaluation; None for a task without one."""
    if task.simulation_data is None and task.load_data is None:
        check_model(task)  # a broken model recipe still fails here, before any node is asked
        return None
    return check_task(task, seed)


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
        kind = str(by_key[key].type)
        try:
            if kind in ("Path", "Path | None"):
                kwargs[by_key[key].name] = Path(str(value))
            elif kind == "int":
                if isinstance(value, bool) or not str(value).lstrip("-").isdigit():
                    raise ValueError
                kwargs[by_key[key].name] = int(value)
            elif kind == "float":
                if isinstance(value, bool):
                    raise ValueError
                kwargs[by_key[key].name] = float(value)
            elif kind == "bool":
                if not isinstance(value, bool) and str(value).lower() not in ("true", "false"):
                    raise ValueError
                kwargs[by_key[key].name] = value if isinstance(value, bool) else str(value).lower() == "true"
            else:
                kwargs[by_key[key].name] = str(value)
        except ValueError:
            raise ConfigError(f"{source}: {key}: expected {kind}, got {value!r}") from None
    return cls(**kwargs)


def write_app(folder: Path) -> Path:
    """Write the operator's config-only Flower App (`folder/pyproject.toml`) for `flwr run FOLDER ...`.

    The FAB `flwr run` builds from it holds no code: the SuperLink and every SuperNode import
    `federation.apps` from the weft they installed themselves. Its run config declares every
    RunConfig key and the deployment keys with "" (not set), so `--run-config` carries only what the
    operator sets, and a key left out takes the task's preferred value or weft's default.
    """
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", folder.name):
        raise ConfigError(f"app folder {folder}: Flower needs a name of letters, digits and hyphens, e.g. weft-app")
    config: dict[str, Any] = {f.name.replace("_", "-"): "" for f in fields(RunConfig)}
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
        "# Written by `python -m federation.apps`: a config-only Flower App for `flwr run`.\n"
        "# Every key is \"\" (not set): the task's preferred value, then weft's default, applies.\n"
        + tomli_w.dumps(doc)
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
