"""The task API: what a partner trains, in one small user file (docs/TASKS.md).

A `Task` holds plain-PyTorch recipes:
- `make_model`: a freshly initialised `nn.Module`;
- `local_data`: a node's own data, read from its `data-dir` (the path never leaves the node);
- `simulation_data`: the pool that simulation partitions (IID, Dirichlet or natural) and a held-out
  test set (the first edition's `load_data` still works and is converted);
- `recipe`: loss, metrics, forward, optionally optimizer and whole train step (node.Recipe);
- `defaults`: run-config values the task prefers (for example Adam), which a user's flags override;
- `exchange` / `subset`: which parameters cross the border.

A task is referenced by a built-in name (`digits`, `synthetic`, `lm`) or an import path
(`my_pkg.my_task:task`). The attribute may also be a function `(TaskOptions) -> Task`, for a task
that depends on a partner's checkpoint directory (`--model-dir`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from federation.errors import TaskError
from node import CLASSIFICATION, EXCHANGES, Recipe, Selector
from protocols import ID_PATTERN


@dataclass(frozen=True)
class LabeledArrays:
    """Features (float32, first axis = examples) and integer class labels."""

    features: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.features) != len(self.labels):
            raise ValueError(f"{len(self.features)} feature rows but {len(self.labels)} labels")
        if self.labels.ndim != 1 or self.labels.dtype.kind not in "iu":
            raise ValueError("labels must be a 1-D integer array")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> LabeledArrays:
        """The rows at `index`."""
        return LabeledArrays(self.features[index], self.labels[index])

    def to_dataset(self) -> TensorDataset:
        """A torch dataset of (float32 features, int64 labels)."""
        return TensorDataset(
            torch.from_numpy(np.ascontiguousarray(self.features, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(self.labels, dtype=np.int64)),
        )


@dataclass(frozen=True)
class TaskData:
    """First edition: a training pool and a held-out test set as labeled arrays."""

    train: LabeledArrays
    """Partitioned across nodes in simulation."""
    test: LabeledArrays
    """Held out: never given to any node; the coordinator's metrics are measured on it."""
    description: str
    """One line naming the held-out set (written to summary.json)."""

    def to_simulation(self) -> SimulationData:
        """The second edition's form of the same data."""
        return SimulationData(self.train.to_dataset(), self.test.to_dataset(), self.description, self.train.labels)


@dataclass(frozen=True)
class SimulationData:
    """What a simulation partitions across nodes, and the held-out set the coordinator evaluates on."""

    pool: Dataset
    """Map-style dataset partitioned across nodes."""
    test: Dataset
    """Held out: never given to any node."""
    description: str
    """One line naming the held-out set (written to summary.json)."""
    labels: np.ndarray | None = None
    """Class of each pool example, for a Dirichlet label-skew split (None: no Dirichlet split)."""
    owners: Sequence[str] | None = None
    """Owner key of each pool example (a hospital, a source), for a natural split (None: no natural split)."""

    def __post_init__(self) -> None:
        if isinstance(self.pool, IterableDataset):
            raise ValueError("the simulation pool must be a map-style Dataset (it is split by index)")
        n = len(self.pool)  # type: ignore[arg-type]
        for name, keys in (("labels", self.labels), ("owners", self.owners)):
            if keys is not None and len(keys) != n:
                raise ValueError(f"{name} has {len(keys)} entries for a pool of {n} examples")


@dataclass(frozen=True)
class LocalData:
    """A node's own data: training and validation splits (map-style or iterable datasets)."""

    train: Dataset
    val: Dataset


@dataclass(frozen=True)
class TaskOptions:
    """What a task factory `(TaskOptions) -> Task` is built from."""

    model_dir: Path | None = None
    """A causal-LM checkpoint directory the partner already holds (its own tokenizer included)."""


@dataclass(frozen=True)
class Task:
    """A model recipe, data recipes and a training recipe (docs/TASKS.md)."""

    name: str
    """Short identifier, signed into every global model envelope."""
    make_model: Callable[[], nn.Module]
    """Returns a freshly initialised model."""
    load_data: Callable[[int], TaskData] | None = None
    """First edition of the simulation data recipe: `seed -> TaskData` (labeled arrays)."""
    simulation_data: Callable[[int], SimulationData] | None = None
    """`seed -> SimulationData`: the pool simulation partitions and the held-out test set."""
    local_data: Callable[[Path], LocalData] | None = None
    """`data_dir -> LocalData`: a deployed node's own training and validation data."""
    recipe: Recipe = CLASSIFICATION
    """Loss, metrics, forward and (optionally) optimizer and train step."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Run-config values this task prefers, by kebab-case key (e.g. {"optimizer": "adam"})."""
    exchange: str = "all"
    """Which parameters cross the border by default: all, lora or subset."""
    subset: Selector | None = None
    """For exchange 'subset': `state-dict name -> crosses?`; the rest is frozen and never leaves a node."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    def simulation(self, seed: int) -> SimulationData:
        """The simulation data for `seed`, from whichever recipe the task has; errors name the recipe."""
        if self.simulation_data is not None:
            data = _call(self, "simulation_data", self.simulation_data, seed)
            if not isinstance(data, SimulationData):
                raise TaskError(
                    f"task {self.name!r}: simulation_data() returned a {type(data).__name__}, not a SimulationData"
                )
            return data
        if self.load_data is not None:
            legacy = _call(self, "load_data", self.load_data, seed)
            if not isinstance(legacy, TaskData):
                raise TaskError(f"task {self.name!r}: load_data() returned a {type(legacy).__name__}, not a TaskData")
            return legacy.to_simulation()
        raise TaskError(f"task {self.name!r} has no simulation data recipe (simulation_data or load_data)")


def _call(task: Task, recipe: str, fn: Callable[[int], Any], seed: int) -> Any:
    try:
        return fn(seed)
    except TaskError:
        raise
    except Exception as exc:
        raise TaskError(f"task {task.name!r}: {recipe}({seed}) failed: {exc}") from exc


TaskFactory = Callable[[TaskOptions], Task]


def check_task(task: Task, seed: int) -> SimulationData:
    """Build the task's model and simulation data once, so a broken task fails at start-up, not inside a run."""
    if not ID_PATTERN.fullmatch(task.name):
        raise TaskError(f"task name {task.name!r} must match {ID_PATTERN.pattern} (it is signed into every model)")
    if task.exchange not in EXCHANGES:
        raise TaskError(f"task {task.name!r}: exchange must be one of {', '.join(EXCHANGES)}")
    check_model(task)
    try:
        return task.simulation(seed)
    except ValueError as exc:  # SimulationData's own checks (sizes of labels / owners)
        if isinstance(exc, TaskError):
            raise
        raise TaskError(f"task {task.name!r}: {exc}") from exc


def check_model(task: Task) -> nn.Module:
    """Build the task's model once; a broken recipe fails with a message naming the task."""
    try:
        model = task.make_model()
    except Exception as exc:
        raise TaskError(f"task {task.name!r}: make_model() failed: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise TaskError(f"task {task.name!r}: make_model() returned a {type(model).__name__}, not an nn.Module")
    for name, tensor in model.state_dict().items():
        if tensor.dtype == torch.bfloat16 and task.exchange == "all":
            raise TaskError(f"task {task.name!r}: parameter {name!r} is bfloat16; keep weights in float32")
    return model


def load_local(task: Task, data_dir: Path) -> LocalData:
    """A node's own data from `data_dir` through the task's local data recipe; errors name the task."""
    if task.local_data is None:
        raise TaskError(f"task {task.name!r} has no local data recipe (local_data): it cannot read a data-dir")
    if not data_dir.is_dir():
        raise TaskError(f"data-dir {data_dir} is not a folder; create it and put the node's data files in it")
    try:
        data = task.local_data(data_dir)
    except TaskError:
        raise
    except Exception as exc:
        raise TaskError(f"task {task.name!r}: cannot read data-dir {data_dir}: {exc}") from exc
    if not isinstance(data, LocalData):
        raise TaskError(f"task {task.name!r}: local_data returned a {type(data).__name__}, not LocalData")
    return data


def load_task(reference: str, options: TaskOptions | None = None) -> Task:
    """Resolve a built-in name or a `module:attr` import path to a Task (calling a factory with `options`)."""
    from federation.tasks import BUILTIN

    options = options or TaskOptions()
    target: object = BUILTIN[reference] if reference in BUILTIN else _import(reference)
    if isinstance(target, Task):
        if options.model_dir is not None:
            raise TaskError(f"task {reference!r} does not take a model-dir (only task factories such as 'lm' do)")
        return target
    if callable(target) and not isinstance(target, type) and getattr(target, "__weft_task_factory__", False):
        try:
            task = target(options)
        except TaskError:
            raise
        except Exception as exc:
            raise TaskError(f"task {reference!r}: building the task failed: {exc}") from exc
        if isinstance(task, Task):
            return task
    raise TaskError(f"task {reference!r} is a {type(target).__name__}, expected federation.tasks.Task")


def task_factory(fn: TaskFactory) -> TaskFactory:
    """Mark `fn` as a task factory: `load_task` calls it with the run's TaskOptions."""
    fn.__weft_task_factory__ = True  # type: ignore[attr-defined]
    return fn


def _import(reference: str) -> object:
    from federation.tasks import BUILTIN

    if ":" not in reference:
        raise TaskError(
            f"task {reference!r} is neither a built-in ({', '.join(sorted(BUILTIN))}) "
            "nor an import path of the form 'package.module:attribute'"
        )
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise TaskError(f"task {reference!r}: expected 'package.module:attribute' with both parts")
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        dotted = module_name.removesuffix(".py").replace("\\", ".").replace("/", ".").strip(".")
        raise TaskError(
            f"task {reference!r}: {module_name!r} is a file path; give it as an import path, "
            f"e.g. '{dotted}:{attr}' (run weft from the folder that holds it)"
        )
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as exc:  # the task file (or a module it imports) does not parse
        where = f"{exc.filename}, line {exc.lineno}" if exc.filename else f"module {module_name!r}"
        raise TaskError(
            f"task {reference!r}: syntax error in {where}: {exc.msg}; fix that line of the task file"
        ) from exc
    except ImportError as exc:
        raise TaskError(f"task {reference!r}: cannot import module {module_name!r} ({exc})") from exc
    except Exception as exc:  # the task module raised while it was imported
        file, line = _raising_module(exc)
        where = f"{file}, line {line}" if file else f"module {module_name!r}"
        detail = " ".join(str(exc).split()) or "(no message)"
        raise TaskError(
            f"task {reference!r}: importing it raised {type(exc).__name__} in {where}: {detail}; "
            f"fix the task file (`python -c 'import {module_name}'` shows the traceback)"
        ) from exc
    target = getattr(module, attr, None)
    if target is None:
        raise TaskError(f"task {reference!r}: module {module_name!r} has no attribute {attr!r}")
    return target


def _raising_module(exc: BaseException) -> tuple[str | None, int | None]:
    """(file, line) of the outermost module body in `exc`'s traceback: the module being imported, where it failed."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "<module>" and not code.co_filename.startswith("<"):
            return code.co_filename, tb.tb_lineno
        tb = tb.tb_next
    return None, None
