"""The run plot: two panels for a clean run, a third (contributions) once anything was rejected."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from federation.plots import plot_metrics


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def write_metrics(path: Path, rejected: int) -> Path:
    rows = [
        {
            "round": r,
            "accuracy": 0.5 + 0.1 * r,
            "loss": 1.0 / r,
            "federated_accuracy": 0.4 + 0.1 * r,
            "federated_loss": 1.2 / r,
            "accepted": 3,
            "rejected": rejected,
            "rejected_by_reason": {"unsigned": rejected} if rejected else {},
        }
        for r in (1, 2, 3)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_clean_run_plots_accuracy_and_loss(tmp_path: Path) -> None:
    out = plot_metrics(write_metrics(tmp_path / "m.jsonl", rejected=0), tmp_path / "m.png")
    assert png_size(out) == (1200, 480)  # 10 x 4 inches at 120 dpi


def test_attacked_run_adds_a_contributions_panel(tmp_path: Path) -> None:
    out = plot_metrics(write_metrics(tmp_path / "m.jsonl", rejected=2), tmp_path / "m.png")
    assert png_size(out) == (1800, 480)  # 15 x 4 inches


def test_failed_round_lines_are_skipped(tmp_path: Path) -> None:
    path = write_metrics(tmp_path / "m.jsonl", rejected=0)
    path.write_text(path.read_text() + json.dumps({"round": 4, "status": "failed", "error": "quorum"}) + "\n")
    assert png_size(plot_metrics(path, tmp_path / "m.png")) == (1200, 480)
