"""Crash-safe coordination in process: crash the round loop at every stage, resume, get the same model bytes.

The crash is an exception thrown at the coordinator's crash points (the same points the integration test
reaches with a real SIGKILL) or in the middle of appending a ledger line; the resumed run is a fresh
coordinator on the same folder with `resume=True`, and fresh nodes.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import coordinator.record
import coordinator.rounds
import protocols.ledger
from coordinator import RecordError, run_federation, run_status
from protocols.audit import verify_run
from protocols.ledger import LEDGER_FILE, read_ledger
from tests.unit.test_rounds import COORDINATOR, FakeGrid, flower_task_identity, nodes, runtime  # noqa: F401

ROUNDS = 3


class Crash(Exception):
    """Stands in for a SIGKILL."""


def resumable(out: Path, resume: bool) -> object:
    rt = runtime(out, rounds=ROUNDS)
    rt.settings = replace(rt.settings, resume=resume)
    return rt


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    from flwr.supercore.task_identity import TaskIdentity

    base = tmp_path_factory.mktemp("reference")
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1  # type: ignore[assignment]
    try:
        result = run_federation(FakeGrid(nodes(base)), resumable(base / "out", False))  # type: ignore[arg-type]
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved  # type: ignore[assignment]
    return {name: a.tobytes() for name, a in result.final_arrays.items()}


def crash_at(monkeypatch: pytest.MonkeyPatch, where: str, nth: int) -> None:
    """Throw `Crash` the `nth` time the loop passes `where` (a crash point, or `ledger-torn`)."""
    count = {"n": 0}

    def point(name: str) -> None:
        if name == where:
            count["n"] += 1
            if count["n"] == nth:
                raise Crash(where)

    monkeypatch.setattr(coordinator.rounds, "_point", point)
    monkeypatch.setattr(coordinator.record, "crash_point", point)
    if where == "ledger-torn":
        real = protocols.ledger.append_line

        def torn(path: Path, line: bytes) -> None:
            if b'"kind":"round"' in line:
                count["n"] += 1
                if count["n"] == nth:
                    with path.open("ab") as fh:
                        fh.write(line[: len(line) // 2])  # half a record, no newline: a kill mid-write
                    raise Crash(where)
            real(path, line)

        monkeypatch.setattr(protocols.ledger, "append_line", torn)


@pytest.mark.parametrize(
    ("where", "nth"),
    [("gathered", 1), ("gathered", 2), ("aggregated", 2), ("model-written", 1), ("ledger-torn", 2), ("committed", 3)],
)
def test_a_crash_anywhere_resumes_to_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: dict[str, bytes], where: str, nth: int
) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        crash_at(m, where, nth)
        with pytest.raises(Crash):
            run_federation(FakeGrid(nodes(tmp_path / "a")), resumable(out, False))  # type: ignore[arg-type]
    # the summary still says running (here its process, this one, is alive; after a real kill it reads
    # as interrupted: tests/integration/test_crash.py)
    assert json.loads((out / "summary.json").read_text())["status"] == "running" and run_status(out) == "running"
    result = run_federation(FakeGrid(nodes(tmp_path / "b")), resumable(out, True))  # type: ignore[arg-type]
    assert result.summary["status"] == "completed" and result.summary["rounds"] == ROUNDS
    assert {name: a.tobytes() for name, a in result.final_arrays.items()} == reference
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]  # nothing from the crashed attempt is left twice
    kinds = [e.kind for e in read_ledger(out / LEDGER_FILE).entries]
    assert kinds[0] == "start" and kinds[-1] == "end" and "resume" in kinds
    assert kinds.count("round") == ROUNDS
    verdict = verify_run(out, COORDINATOR.public_key)
    assert verdict.problems == [] and verdict.recomputed == ROUNDS


def test_several_crashes_in_one_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: dict[str, bytes]
) -> None:
    out = tmp_path / "out"
    for i, where in enumerate(("gathered", "aggregated", "model-written")):
        with monkeypatch.context() as m:
            crash_at(m, where, 1)
            with pytest.raises(Crash):
                run_federation(FakeGrid(nodes(tmp_path / f"n{i}")), resumable(out, i > 0))  # type: ignore[arg-type]
    result = run_federation(FakeGrid(nodes(tmp_path / "last")), resumable(out, True))  # type: ignore[arg-type]
    assert {name: a.tobytes() for name, a in result.final_arrays.items()} == reference
    assert [e.kind for e in read_ledger(out / LEDGER_FILE).entries].count("resume") == 3
    assert verify_run(out, COORDINATOR.public_key).problems == []


def test_a_completed_run_is_not_resumed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_federation(FakeGrid(nodes(tmp_path)), resumable(out, False))  # type: ignore[arg-type]
    with pytest.raises(RecordError, match="already completed 3 round"):
        run_federation(FakeGrid(nodes(tmp_path)), resumable(out, True))  # type: ignore[arg-type]


def test_resume_without_a_record_says_so(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="no run to resume"):
        run_federation(FakeGrid(nodes(tmp_path)), resumable(tmp_path / "out", True))  # type: ignore[arg-type]


def test_an_altered_record_is_not_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        crash_at(m, "gathered", 2)
        with pytest.raises(Crash):
            run_federation(FakeGrid(nodes(tmp_path)), resumable(out, False))  # type: ignore[arg-type]
    text = (out / LEDGER_FILE).read_text().replace('"num_examples":16', '"num_examples":17')
    (out / LEDGER_FILE).write_text(text)
    with pytest.raises(RecordError, match="refusing to resume an altered or foreign ledger"):
        run_federation(FakeGrid(nodes(tmp_path)), resumable(out, True))  # type: ignore[arg-type]


def test_an_unwritable_record_ends_with_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The output folder turns unwritable mid-run (here: its global/ folder is replaced by a file, which
    # stops root as well as anyone else).
    import shutil

    out = tmp_path / "out"

    def break_folder(name: str) -> None:
        if name == "gathered":
            shutil.rmtree(out / "global")
            (out / "global").write_text("not a folder")

    monkeypatch.setattr(coordinator.rounds, "_point", break_folder)
    with pytest.raises(RecordError, match=r"^out: cannot write the run's record at .*continue with --resume$"):
        run_federation(FakeGrid(nodes(tmp_path)), resumable(out, False))  # type: ignore[arg-type]


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    # Another process holds the record's lock (a coordinator still running): this one must not write beside it.
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, os, time; fd = os.open({str(out / '.lock')!r}, os.O_RDWR | os.O_CREAT);"
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RecordError, match="another coordinator process is writing this record"):
            run_federation(FakeGrid(nodes(tmp_path)), resumable(out, False))  # type: ignore[arg-type]
    finally:
        holder.kill()
        holder.wait(timeout=10)
