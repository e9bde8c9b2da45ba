"""A live per-round display of a run (rich), with a plain line per round when output is not a TTY."""

from __future__ import annotations

import threading
from collections import Counter
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from coordinator import Accepted, Rejected, RoundReport


class RoundProgress:
    """An `coordinator.Observer` that renders rounds, replies and accuracy as they happen."""

    def __init__(self, rounds: int, console: Console | None = None, target: str = "accuracy") -> None:
        self.target = target
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]round"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._task = self._progress.add_task("starting Ray and the nodes...", total=rounds)
        self._lock = threading.Lock()
        self._ok = 0
        self._bad: Counter[str] = Counter()
        self._nodes = 0

    def __enter__(self) -> RoundProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._progress.stop()

    def round_started(self, round: int, nodes: int) -> None:
        """Reset the per-round counters."""
        with self._lock:
            self._ok, self._bad, self._nodes = 0, Counter(), nodes
            self._update(f"round {round}: sent to {nodes} nodes")

    def reply_checked(self, round: int, outcome: Accepted | Rejected) -> None:
        """Count one verified reply."""
        with self._lock:
            if isinstance(outcome, Accepted):
                self._ok += 1
            else:
                self._bad[str(outcome.reason)] += 1
            done = self._ok + sum(self._bad.values())
            self._update(f"round {round}: {done}/{self._nodes} replies, {self._ok} accepted")

    def round_finished(self, report: RoundReport) -> None:
        """Print the round's line and advance the bar."""
        acc = report.central.get(self.target)
        loss = report.central.get("loss")
        rejected = ", ".join(f"{k}={v}" for k, v in sorted(self._bad.items())) or "none"
        line = (
            f"round {report.round:>3}  accepted {len(report.accepted):>3}  "
            f"rejected {len(report.rejected):>2} ({rejected})"
            + (f"  {self.target} {acc:.4f}" if acc is not None and self.target != "loss" else "")
            + (f"  loss {loss:.4f}" if loss is not None else "")
            + f"  {report.duration_s:.1f}s"
        )
        with self._lock:
            self._progress.console.print(line)
            self._progress.advance(self._task)
            self._update(f"{self.target} {acc:.4f}" if acc is not None else "")

    def _update(self, description: str) -> None:
        self._progress.update(self._task, description=description)
