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
    resume                optional (default false): continue the run recorded in out-dir from its last
                          committed round (`weft coordinator start --resume`; the run keeps its ledger's run id)
The SuperLink refuses `--run-config` keys that the app's [tool.flwr.app.config] does not declare, so
the operator's app folder declares all of them with "" (not set). Write that folder with
`python -m federation.apps FOLDER` (`write_app`; docs/DEPLOY.md).
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import sys
from dataclasses import fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import tomli_w
from flwr.app import Context

from coordinator import CoordinatorRuntime, make_server_app
from federation.config import (
    ConfigError,
    DeploymentSettings,
    NodeSettings,
    RunConfig,
    parse_settings,
)
from federation.errors import TaskError
from federation.runtime import RunPlan, build_coordinator, build_node, resolve_run
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

log = logging.getLogger("weft.node")


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
    identity = load_signing_key(s.key)
    log.info(
        "node %s of federation %s (jurisdiction %s): task %s, %s training and %s validation examples on %s",
        identity.member_id, s.federation_id, s.jurisdiction or "not stated", task.name,
        _size(data.train), _size(data.val), device,
    )  # fmt: skip
    return build_node(
        task,
        identity=identity,
        coordinator_key=load_public_key(s.coordinator_key),
        federation_id=s.federation_id,
        train=data.train,
        val=data.val,
        workdir=s.workdir,
        device=device,
        seed=s.seed,
        personalize_epochs=s.personalize_epochs,
    )


def _size(data: object) -> str:
    """The number of examples, when the dataset knows it (an iterable one may not)."""
    try:
        return str(len(data))  # type: ignore[arg-type]
    except TypeError:
        return "an unknown number of"


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
    # The app declares the deployment keys with "" defaults (the SuperLink refuses override keys the
    # FAB does not declare); "" counts as not set, so a forgotten path fails naming its key.
    dep = parse_settings(DeploymentSettings, {k: v for k, v in values.items() if k not in run_keys}, "run config")
    task, run = resolve_run({k: v for k, v in values.items() if k in run_keys}, "run config")
    identity = load_signing_key(dep.coordinator_key)
    plan = RunPlan(
        manifest=Manifest.load(dep.manifest, coordinator_key=identity.public_key),
        identity=identity,
        out_dir=dep.out_dir,
        run_id=dep.run_id,
        held_out=_held_out(task, run.seed),
        record={"personalize": dep.personalize, "federated-evaluation": dep.federated_evaluation},
        federated_evaluation=dep.federated_evaluation,
        personalize=dep.personalize,
        resume=dep.resume,
    )
    try:
        return build_coordinator(task, run, plan)
    except ConfigError as exc:
        raise ConfigError(f"run config: {exc}") from exc


def _held_out(task: Task, seed: int) -> SimulationData | None:
    """The task's held-out test set for the coordinator's evaluation; None for a task without one."""
    if task.simulation_data is None and task.load_data is None:
        check_model(task)  # a broken model recipe still fails here, before any node is asked
        return None
    return check_task(task, seed)


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
