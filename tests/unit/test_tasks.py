"""federation/tasks/: load_task, the digits and synthetic built-ins, LabeledArrays."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from federation.tasks import BUILTIN, LabeledArrays, Task, TaskError, digits, load_task, synthetic

# ---- load_task ---------------------------------------------------------------------------------------------


def test_load_task_builtins() -> None:
    assert load_task("digits") is digits.task
    assert load_task("synthetic") is synthetic.task
    assert sorted(BUILTIN) == ["digits", "lm", "synthetic"]
    assert load_task("lm").name == "lm"
    assert digits.task.name == "digits"
    assert synthetic.task.name == "synthetic"


def test_load_task_import_path_to_builtin_object() -> None:
    assert load_task("federation.tasks.digits:task") is digits.task


def test_load_task_unknown_name() -> None:
    with pytest.raises(TaskError) as exc_info:
        load_task("nope")
    assert str(exc_info.value) == (
        "task 'nope' is neither a built-in (digits, lm, synthetic) "
        "nor an import path of the form 'package.module:attribute'"
    )


def test_load_task_missing_module() -> None:
    with pytest.raises(TaskError) as exc_info:
        load_task("no_such_module_xyz:task")
    assert str(exc_info.value).startswith("task 'no_such_module_xyz:task': cannot import module 'no_such_module_xyz' (")


def test_load_task_missing_attribute() -> None:
    with pytest.raises(TaskError) as exc_info:
        load_task("federation.tasks.digits:missing")
    assert str(exc_info.value) == (
        "task 'federation.tasks.digits:missing': module 'federation.tasks.digits' has no attribute 'missing'"
    )


def test_load_task_attribute_not_a_task() -> None:
    with pytest.raises(TaskError) as exc_info:
        load_task("federation.tasks.digits:make_model")
    assert str(exc_info.value) == (
        "task 'federation.tasks.digits:make_model' is a function, expected federation.tasks.Task"
    )


USER_TASK = textwrap.dedent(
    """
    import numpy as np
    from torch import nn

    from federation.tasks import LabeledArrays, Task, TaskData


    def make_model():
        return nn.Linear(4, 2)


    def load_data(seed):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(40, 4)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64)
        return TaskData(LabeledArrays(x[:30], y[:30]), LabeledArrays(x[30:], y[30:]), "user test split")


    task = Task(name="mine", make_model=make_model, load_data=load_data)
    """
)


def test_load_user_task_from_module_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mymodule.py").write_text(USER_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mymodule", raising=False)
    try:
        task = load_task("mymodule:task")
        assert isinstance(task, Task)
        assert task.name == "mine"
        data = task.load_data(0)
        assert (len(data.train), len(data.test)) == (30, 10)

        torch.manual_seed(0)
        model = task.make_model()
        before = [p.detach().clone() for p in model.parameters()]
        x, y = data.train.to_dataset().tensors
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loss_before = torch.nn.functional.cross_entropy(model(x), y)
        loss_before.backward()
        optimizer.step()
        with torch.no_grad():
            loss_after = torch.nn.functional.cross_entropy(model(x), y)
        assert model(x).shape == (30, 2)
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
        assert torch.isfinite(loss_after)
        assert loss_after.item() < loss_before.item()
    finally:
        sys.modules.pop("mymodule", None)


# ---- digits ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits0():
    return digits.load_data(0)


def test_digits_sizes_and_features(digits0) -> None:
    assert (len(digits0.train), len(digits0.test)) == (1438, 359)
    assert len(digits0.train) + len(digits0.test) == 1797
    for split in (digits0.train, digits0.test):
        assert split.features.dtype == np.float32
        assert split.features.shape[1] == 64
        assert split.features.min() == 0.0
        assert split.features.max() == 1.0
        assert split.labels.dtype == np.int64
    assert "359 images" in digits0.description
    assert "seed 0" in digits0.description


def test_digits_test_split_is_stratified(digits0) -> None:
    _, y = load_digits(return_X_y=True)
    totals = np.bincount(y, minlength=10)
    in_test = np.bincount(digits0.test.labels, minlength=10)
    in_train = np.bincount(digits0.train.labels, minlength=10)
    assert np.all(in_test > 0)
    assert np.all(np.abs(in_test - 0.2 * totals) <= 1)
    assert np.array_equal(in_test, np.round(0.2 * totals).astype(int))
    assert np.array_equal(in_test + in_train, totals)


def test_digits_split_is_a_partition_of_the_dataset(digits0) -> None:
    # Digits holds duplicate images, so compare multisets of (row, label) rather than sets.
    x, y = load_digits(return_X_y=True)
    every = sorted(np.concatenate([(x / 16.0).astype(np.float32), y[:, None].astype(np.float32)], axis=1).tolist())
    split = np.concatenate(
        [
            np.concatenate([digits0.train.features, digits0.train.labels[:, None].astype(np.float32)], axis=1),
            np.concatenate([digits0.test.features, digits0.test.labels[:, None].astype(np.float32)], axis=1),
        ]
    )
    assert sorted(split.tolist()) == every


def test_digits_is_deterministic_for_a_seed(digits0) -> None:
    again = digits.load_data(0)
    other = digits.load_data(1)
    assert np.array_equal(again.test.features, digits0.test.features)
    assert np.array_equal(again.test.labels, digits0.test.labels)
    assert np.array_equal(again.train.features, digits0.train.features)
    assert len(other.test) == 359
    assert not np.array_equal(other.test.features, digits0.test.features)


def test_digits_model_shape() -> None:
    out = digits.make_model()(torch.zeros(5, 64))
    assert out.shape == (5, 10)


# ---- synthetic ---------------------------------------------------------------------------------------------


def test_synthetic_shapes() -> None:
    data = synthetic.load_data(0)
    assert data.train.features.shape == (480, 8)
    assert data.test.features.shape == (120, 8)
    assert data.train.features.dtype == np.float32
    assert sorted(np.unique(np.concatenate([data.train.labels, data.test.labels])).tolist()) == [0, 1, 2]
    assert np.array_equal(np.bincount(np.concatenate([data.train.labels, data.test.labels])), [200, 200, 200])
    assert synthetic.make_model()(torch.zeros(4, 8)).shape == (4, 3)


def test_synthetic_is_deterministic() -> None:
    a, b = synthetic.load_data(3), synthetic.load_data(3)
    assert np.array_equal(a.train.features, b.train.features)
    assert np.array_equal(a.train.labels, b.train.labels)
    assert np.array_equal(a.test.features, b.test.features)


def test_synthetic_points_do_not_depend_on_seed() -> None:
    def all_rows(seed: int) -> list[list[float]]:
        d = synthetic.load_data(seed)
        x = np.concatenate([d.train.features, d.test.features])
        y = np.concatenate([d.train.labels, d.test.labels]).astype(np.float32)
        return sorted(np.concatenate([x, y[:, None]], axis=1).tolist())

    assert all_rows(0) == all_rows(1)
    # ...but the held-out split does.
    assert not np.array_equal(synthetic.load_data(0).test.features, synthetic.load_data(1).test.features)


# ---- LabeledArrays -------------------------------------------------------------------------------------------


def test_labeled_arrays_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError) as exc_info:
        LabeledArrays(np.zeros((3, 2), dtype=np.float32), np.zeros(2, dtype=np.int64))
    assert str(exc_info.value) == "3 feature rows but 2 labels"


@pytest.mark.parametrize(
    "labels",
    [np.zeros(3, dtype=np.float32), np.zeros(3, dtype=bool), np.array(["a", "b", "c"]), np.zeros((3, 1), dtype=int)],
)
def test_labeled_arrays_rejects_non_integer_labels(labels: np.ndarray) -> None:
    with pytest.raises(ValueError) as exc_info:
        LabeledArrays(np.zeros((3, 2), dtype=np.float32), labels)
    assert str(exc_info.value) == "labels must be a 1-D integer array"


def test_labeled_arrays_to_dataset_dtypes_and_subset() -> None:
    arrays = LabeledArrays(np.arange(6, dtype=np.float64).reshape(3, 2), np.array([2, 0, 1], dtype=np.int32))
    assert len(arrays) == 3
    x, y = arrays.to_dataset().tensors
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert x.tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert y.tolist() == [2, 0, 1]
    sub = arrays.subset(np.array([2, 0]))
    assert sub.labels.tolist() == [1, 2]
    assert sub.features.tolist() == [[4.0, 5.0], [0.0, 1.0]]


@pytest.mark.parametrize("reference", [":task", "federation.tasks.digits:"])
def test_load_task_with_an_empty_part_names_the_expected_form(reference: str) -> None:
    with pytest.raises(TaskError, match=r"expected 'package\.module:attribute' with both parts"):
        load_task(reference)


def test_example_wine_task_from_docs_loads_and_fits_its_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    task = load_task("examples.wine_task:task")
    data = task.load_data(0)
    assert (task.name, len(data.train), len(data.test)) == ("wine", 134, 44)
    assert task.make_model()(torch.from_numpy(data.test.features)).shape == (44, 3)


def _task(**changes: object) -> Task:
    from dataclasses import replace

    return replace(synthetic.task, **changes)


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (lambda: _task(name="my wine"), "task name 'my wine' must match"),
        (lambda: _task(make_model=lambda: 42), "make_model() returned a int, not an nn.Module"),
        (lambda: _task(make_model=lambda: torch.nn.Linear(2, 2).to(torch.bfloat16)), "is bfloat16"),
        (lambda: _task(load_data=lambda seed: (seed, seed)), "load_data() returned a tuple, not a TaskData"),
        (lambda: _task(load_data=lambda seed: 1 / 0), "load_data(0) failed: division by zero"),
    ],
    ids=["name", "model-type", "bfloat16", "data-type", "data-raises"],
)
def test_check_task_fails_at_start_up_naming_the_problem(task, message: str) -> None:  # type: ignore[no-untyped-def]
    from federation.tasks import check_task

    with pytest.raises(TaskError) as exc_info:
        check_task(task(), 0)
    assert message in str(exc_info.value)
