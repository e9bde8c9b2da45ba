"""The run's record on disk: one metrics line per round, signed checkpoints and a summary.

Layout of `out_dir`:
    metrics.jsonl               one JSON object per round (appended and fsynced as rounds finish)
    global/round-0000.npz ...   signed global model after each round (protocols.modelfile)
    global_model.npz            the signed final global model
    rounds/NNNN/updates/        the verified updates aggregated in round NNNN
    summary.json                the outcome of the run
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.runtime import RoundReport
from protocols import SignedBlob, write_signed_model

FINAL_MODEL = "global_model.npz"


class RunRecord:
    """Writes the record of one run."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = out_dir / "metrics.jsonl"
        if self.metrics_path.exists() or (out_dir / "summary.json").exists():
            raise FileExistsError(f"{out_dir} already holds a run's record; choose another output folder")
        self.metrics_path.write_text("")

    def updates_dir(self, round_: int) -> Path:
        """Where a round's verified updates are spooled."""
        return self.out_dir / "rounds" / f"{round_:04d}" / "updates"

    def checkpoint(self, round_: int, arrays: Mapping[str, np.ndarray], signed: SignedBlob) -> Path:
        """Write the signed global model after `round_`; from round 1 on, also as the final model."""
        path = self.out_dir / "global" / f"round-{round_:04d}.npz"
        write_signed_model(path, arrays, signed)
        if round_ >= 1:  # the initial model is never passed off as a trained one
            write_signed_model(self.out_dir / FINAL_MODEL, arrays, signed)
        return path

    def append_round(self, report: RoundReport, manifest_version: int) -> None:
        """Add one line to metrics.jsonl (with the version of the manifest the round was verified against)."""
        reasons: dict[str, int] = {}
        for rej in report.rejected:
            reasons[str(rej.reason)] = reasons.get(str(rej.reason), 0) + 1
        line = {
            "round": report.round,
            "manifest_version": manifest_version,
            **dict(report.central),  # held-out metrics: loss, accuracy (or perplexity, ...)
            **{f"federated_{k.removeprefix('eval_')}": v for k, v in report.federated.items()},
            "nodes": report.nodes,
            "accepted": len(report.accepted),
            "contributions": [
                {"member": c.member_id, "update_digest": c.update_digest, "num_examples": c.weight}
                for c in report.accepted
            ],
            "rejected": len(report.rejected),
            "rejected_by_reason": dict(sorted(reasons.items())),
            "rejections": [r.to_json() for r in report.rejected],
            "missing": report.missing,
            "global_model_digest": report.global_digest,
            "duration_s": round(report.duration_s, 3),
        }
        self._append(line)

    def append_personalization(self, nodes: list[dict[str, Any]]) -> None:
        """Record each node's validation metrics before and after its local personalization."""
        self._append({"phase": "personalization", "nodes": nodes})

    def append_failure(self, round_: int, error: str, manifest_version: int) -> None:
        """Record a round that failed (no model was produced)."""
        self._append({"round": round_, "status": "failed", "error": error, "manifest_version": manifest_version})

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        """Write summary.json."""
        path = self.out_dir / "summary.json"
        path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        return path

    def _append(self, line: Mapping[str, Any]) -> None:
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
