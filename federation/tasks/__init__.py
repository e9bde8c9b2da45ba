"""Tasks: model + data recipes. Built-ins need no download."""

from federation.tasks import digits, synthetic
from federation.tasks.api import LabeledArrays, Task, TaskData, TaskError, check_task, load_task

BUILTIN: dict[str, Task] = {"digits": digits.task, "synthetic": synthetic.task}

__all__ = ["BUILTIN", "LabeledArrays", "Task", "TaskData", "TaskError", "check_task", "load_task"]
