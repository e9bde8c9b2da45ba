"""Tasks: model, data and training recipes (docs/TASKS.md). Built-ins need no download."""

from federation.tasks import digits, lm, synthetic
from federation.tasks.api import (
    LabeledArrays,
    LocalData,
    SimulationData,
    Task,
    TaskData,
    TaskError,
    TaskFactory,
    TaskOptions,
    check_model,
    check_task,
    load_local,
    load_task,
    task_factory,
)

BUILTIN: dict[str, Task | TaskFactory] = {"digits": digits.task, "lm": lm.make_task, "synthetic": synthetic.task}

__all__ = [
    "BUILTIN",
    "LabeledArrays",
    "LocalData",
    "SimulationData",
    "Task",
    "TaskData",
    "TaskError",
    "TaskFactory",
    "TaskOptions",
    "check_model",
    "check_task",
    "load_local",
    "load_task",
    "task_factory",
]
