"""federation/tasks/api.py, federation/tasks/files.py and the natural split of federation/partition.py.

Expected splits and messages are worked out by hand in each test.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

from federation.errors import TaskError
from federation.partition import natural_partition, owners_of
from federation.tasks import (
    LabeledArrays,
    LocalData,
    SimulationData,
    Task,
    TaskData,
    TaskOptions,
    load_local,
    load_task,
    task_factory,
)
from federation.tasks.files import labeled_csv_recipe, read_labeled_csv, write_labeled_csv


def make_model() -> nn.Module:
    return nn.Linear(2, 3)


def labeled(n: int, seed: int = 0, features: int = 2, classes: int = 3) -> LabeledArrays:
    rng = np.random.default_rng(seed)
    return LabeledArrays(
        rng.standard_normal((n, features)).astype(np.float32), rng.integers(0, classes, n).astype(np.int64)
    )


# ---- Task.simulation: first and second edition ---------------------------------------------------


def test_first_edition_load_data_is_converted() -> None:
    seeds: list[int] = []
    train, test = labeled(6, seed=1), labeled(3, seed=2)

    def load_data(seed: int) -> TaskData:
        seeds.append(seed)
        return TaskData(train, test, "three held-out rows")

    data = Task("old", make_model, load_data=load_data).simulation(17)

    assert seeds == [17]
    assert isinstance(data, SimulationData)
    assert data.description == "three held-out rows"
    assert data.owners is None
    assert data.labels is not None and np.array_equal(data.labels, train.labels)
    assert isinstance(data.pool, TensorDataset) and isinstance(data.test, TensorDataset)
    x, y = data.pool.tensors
    assert (x.dtype, y.dtype, len(data.pool), len(data.test)) == (torch.float32, torch.int64, 6, 3)
    assert np.array_equal(x.numpy(), train.features) and np.array_equal(y.numpy(), train.labels)
    assert np.array_equal(data.test.tensors[0].numpy(), test.features)


def test_second_edition_simulation_data_is_returned_as_is_and_preferred() -> None:
    pool = TensorDataset(torch.zeros(4, 2), torch.tensor([0, 1, 2, 0]))
    made = SimulationData(pool, pool, "same", owners=["a", "a", "b", "c"])

    def legacy(seed: int) -> TaskData:
        raise AssertionError("load_data must not be called when simulation_data exists")

    task = Task("new", make_model, load_data=legacy, simulation_data=lambda seed: made)
    assert task.simulation(0) is made


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (Task("none", make_model), "task 'none' has no simulation data recipe (simulation_data or load_data)"),
        (
            Task("wrong", make_model, simulation_data=lambda seed: {"pool": []}),  # type: ignore[arg-type,return-value]
            "task 'wrong': simulation_data() returned a dict, not a SimulationData",
        ),
        (
            Task("legacy", make_model, load_data=lambda seed: labeled(3)),  # type: ignore[arg-type,return-value]
            "task 'legacy': load_data() returned a LabeledArrays, not a TaskData",
        ),
        (
            Task("boom", make_model, load_data=lambda seed: 1 // 0),  # type: ignore[arg-type,return-value]
            "task 'boom': load_data(5) failed: integer division or modulo by zero",
        ),
    ],
)
def test_simulation_errors_name_the_task_and_recipe(task: Task, message: str) -> None:
    with pytest.raises(TaskError) as exc_info:
        task.simulation(5)
    assert str(exc_info.value) == message


# ---- SimulationData checks ------------------------------------------------------------------------


POOL = TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": np.array([0, 1, 2])}, "labels has 3 entries for a pool of 4 examples"),
        ({"owners": ["a", "b", "c", "d", "e"]}, "owners has 5 entries for a pool of 4 examples"),
        ({"labels": np.zeros(4, np.int64), "owners": ["a"]}, "owners has 1 entries for a pool of 4 examples"),
    ],
)
def test_simulation_data_sizes_must_match_the_pool(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as exc_info:
        SimulationData(POOL, POOL, "d", **kwargs)
    assert str(exc_info.value) == message


def test_simulation_data_refuses_an_iterable_pool() -> None:
    class Stream(IterableDataset):
        def __iter__(self):
            return iter([])

    with pytest.raises(ValueError, match="the simulation pool must be a map-style Dataset"):
        SimulationData(Stream(), POOL, "d")
    # an iterable held-out set is fine (it is only evaluated, never split)
    assert SimulationData(POOL, Stream(), "d").owners is None


def test_simulation_data_inside_the_recipe_fails_naming_the_task() -> None:
    task = Task("bad-owners", make_model, simulation_data=lambda seed: SimulationData(POOL, POOL, "d", owners=["a"]))
    with pytest.raises(TaskError, match=r"task 'bad-owners': simulation_data\(0\) failed: owners has 1 entries"):
        task.simulation(0)


# ---- the CSV folder format --------------------------------------------------------------------------


def test_csv_round_trip_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    rows = labeled(7, seed=3, features=3, classes=4)
    path = write_labeled_csv(tmp_path / "folder" / "part.csv", rows)
    text = path.read_text()
    lines = text.splitlines()
    path.write_text(
        "# exported by a sensor\n\n" + "\n".join(lines[:3]) + "\n   # indented comment\n\n" + "\n".join(lines[3:])
    )

    back = read_labeled_csv(tmp_path / "folder", features=3)

    assert back.features.dtype == np.float32 and back.labels.dtype == np.int64
    assert back.features.tobytes() == rows.features.tobytes()  # 9 significant digits: float32 exactly
    assert np.array_equal(back.labels, rows.labels)


def test_csv_reads_every_file_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.csv").write_text("3,4,1\n")
    (tmp_path / "a.csv").write_text("1,2,0\n5.5, -6 ,2\n")
    (tmp_path / "notes.txt").write_text("9,9,9\n")
    rows = read_labeled_csv(tmp_path, features=2)
    assert rows.features.tolist() == [[1.0, 2.0], [5.5, -6.0], [3.0, 4.0]]
    assert rows.labels.tolist() == [0, 2, 1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("# header\n1,2,0\n\n3,4\n", "bad.csv, line 4: 2 values, expected 2 and a label"),
        ("1,2,0\n1,2,0,\n", "bad.csv, line 2: 4 values, expected 2 and a label"),
        ("# a\n# b\n1,x,0\n", "bad.csv, line 3: a value is not a number"),
        ("# only comments\n\n", "the *.csv files hold no rows"),
        ("1,2,0.5\n", "the last column must be a non-negative integer class label"),
        ("1,2,-1\n", "the last column must be a non-negative integer class label"),
        ("1,2,0\n1,2,3\n", r"label 3 is out of range [0, 3)"),
        ("1,2,0\n", "need at least 2 rows (training and validation)"),
    ],
)
def test_load_local_csv_errors_name_the_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bad.csv").write_text(content)
    task = Task("sensor", make_model, local_data=labeled_csv_recipe(features=2, classes=3))
    with pytest.raises(TaskError) as exc_info:
        load_local(task, tmp_path)
    assert message in str(exc_info.value)

    task = Task("sensor", make_model, local_data=labeled_csv_recipe(features=2, classes=3))
    with pytest.raises(TaskError):
        load_local(task, tmp_path)


def test_load_local_keeps_a_seeded_fifth_for_validation(tmp_path: Path) -> None:
    rows = labeled(10, seed=4)
    write_labeled_csv(tmp_path / "rows.csv", rows)
    task = Task("sensor", make_model, local_data=labeled_csv_recipe(features=2, classes=3))

    data = load_local(task, tmp_path)

    assert isinstance(data, LocalData)
    order = np.random.default_rng([0, 0]).permutation(10)  # seed 0, node 0: 2 validation rows, 8 training
    train_x, train_y = data.train.tensors  # type: ignore[attr-defined]
    val_x, val_y = data.val.tensors  # type: ignore[attr-defined]
    assert np.array_equal(val_x.numpy(), rows.features[order[:2]])
    assert np.array_equal(val_y.numpy(), rows.labels[order[:2]])
    assert np.array_equal(train_x.numpy(), rows.features[order[2:]])
    assert np.array_equal(train_y.numpy(), rows.labels[order[2:]])


def test_load_local_errors(tmp_path: Path) -> None:
    no_recipe = Task("plain", make_model)
    with pytest.raises(TaskError, match="task 'plain' has no local data recipe"):
        load_local(no_recipe, tmp_path)

    csv = Task("sensor", make_model, local_data=labeled_csv_recipe(features=2, classes=3))
    missing = tmp_path / "nowhere"
    with pytest.raises(TaskError) as exc_info:
        load_local(csv, missing)
    assert str(exc_info.value) == f"data-dir {missing} is not a folder; create it and put the node's data files in it"
    with pytest.raises(TaskError, match=r"holds no \*\.csv file \(rows of 2 features and a label\)"):
        load_local(csv, tmp_path)

    def broken(data_dir: Path) -> LocalData:
        raise OSError("permission denied")

    with pytest.raises(TaskError, match=f"task 'broken': cannot read data-dir {tmp_path}: permission denied"):
        load_local(Task("broken", make_model, local_data=broken), tmp_path)

    wrong = Task("wrong", make_model, local_data=lambda d: (1, 2))  # type: ignore[arg-type,return-value]
    with pytest.raises(TaskError, match="task 'wrong': local_data returned a tuple, not LocalData"):
        load_local(wrong, tmp_path)


# ---- natural split ----------------------------------------------------------------------------------


def test_natural_partition_deals_largest_owners_to_the_lightest_node() -> None:
    #          0    1    2    3    4    5    6    7    8
    owners = ["b", "a", "c", "a", "b", "a", "d", "c", "e"]
    # sizes a=3, b=2, c=2, d=1, e=1 -> in order a, b, c, d, e (ties by name)
    # a -> node 0 (3, 0); b -> node 1 (3, 2); c -> node 1 (3, 4); d -> node 0 (4, 4); e -> tie -> node 0 (5, 4)
    parts = natural_partition(owners, 2)
    assert [p.tolist() for p in parts] == [[1, 3, 5, 6, 8], [0, 2, 4, 7]]
    assert owners_of(owners, 2) == [["a", "d", "e"], ["b", "c"]]


def test_natural_partition_three_nodes() -> None:
    owners = ["x"] * 4 + ["y"] * 3 + ["z"] * 3 + ["w"] * 2
    # x(4) -> 0, y(3) -> 1, z(3) -> 2, w(2) -> node 1 (loads 4, 3, 3: first lightest)
    parts = natural_partition(owners, 3)
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 10, 11], [7, 8, 9]]
    assert owners_of(owners, 3) == [["x"], ["w", "y"], ["z"]]


def test_natural_partition_needs_an_owner_per_node() -> None:
    with pytest.raises(ValueError) as exc_info:
        natural_partition(["a", "a", "b", "b"], 3)
    assert str(exc_info.value) == "the data has 2 owner(s); a natural split needs at least one per node (3)"
    with pytest.raises(ValueError, match="2 examples cannot be split across 3 nodes"):
        natural_partition(["a", "b"], 3)


# ---- load_task and task factories -------------------------------------------------------------------


PLAIN = Task("plain", make_model)


@pytest.fixture
def user_module(monkeypatch: pytest.MonkeyPatch) -> tuple[types.ModuleType, list[TaskOptions]]:
    """An importable module `weft_user_tasks` holding a plain task and task factories."""
    calls: list[TaskOptions] = []
    module = types.ModuleType("weft_user_tasks")

    @task_factory
    def factory(options: TaskOptions) -> Task:
        calls.append(options)
        return Task(f"from-{options.model_dir.name if options.model_dir else 'nothing'}", make_model)

    @task_factory
    def failing(options: TaskOptions) -> Task:
        raise RuntimeError("no checkpoint here")

    def not_a_task(options: TaskOptions) -> str:
        return "task"

    not_a_task.__weft_task_factory__ = True  # type: ignore[attr-defined]  # what @task_factory does

    def undecorated(options: TaskOptions) -> Task:
        return PLAIN

    module.__dict__.update(
        plain=PLAIN, factory=factory, failing=failing, not_a_task=not_a_task, undecorated=undecorated
    )
    monkeypatch.setitem(sys.modules, "weft_user_tasks", module)
    return module, calls


def test_task_factory_receives_the_options(user_module, tmp_path: Path) -> None:
    _, calls = user_module
    checkpoint = tmp_path / "my-llm"
    task = load_task("weft_user_tasks:factory", TaskOptions(model_dir=checkpoint))
    assert task.name == "from-my-llm"
    assert calls == [TaskOptions(model_dir=checkpoint)]
    assert load_task("weft_user_tasks:factory").name == "from-nothing"
    assert calls[1] == TaskOptions()


def test_a_plain_task_refuses_a_model_dir(user_module, tmp_path: Path) -> None:
    assert load_task("weft_user_tasks:plain") is PLAIN
    with pytest.raises(TaskError) as exc_info:
        load_task("weft_user_tasks:plain", TaskOptions(model_dir=tmp_path))
    assert str(exc_info.value) == (
        "task 'weft_user_tasks:plain' does not take a model-dir (only task factories such as 'lm' do)"
    )
    with pytest.raises(TaskError, match="does not take a model-dir"):
        load_task("synthetic", TaskOptions(model_dir=tmp_path))


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("weft_user_tasks:failing", "task 'weft_user_tasks:failing': building the task failed: no checkpoint here"),
        ("weft_user_tasks:not_a_task", "task 'weft_user_tasks:not_a_task' is a function, expected"),
        ("weft_user_tasks:undecorated", "task 'weft_user_tasks:undecorated' is a function, expected"),
    ],
)
def test_task_factory_errors(user_module, reference: str, message: str) -> None:
    with pytest.raises(TaskError) as exc_info:
        load_task(reference)
    assert str(exc_info.value).startswith(message)


def test_task_factory_marks_the_function_and_returns_it() -> None:
    def fn(options: TaskOptions) -> Task:
        return PLAIN

    assert task_factory(fn) is fn
    assert fn.__weft_task_factory__ is True  # type: ignore[attr-defined]
