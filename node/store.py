"""The partner's own copy of its latest locally trained model (the "N" of N+1)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from protocols import UpdateEnvelope
from protocols.npz import load_npz, save_npz

MODEL_FILE = "local_model.npz"
PERSONAL_FILE = "personal_model.npz"
PERSONAL_META_FILE = "personal_model.json"
META_FILE = "local_model.json"
SEEN_FILE = "seen_rounds.json"


def save_local_model(workdir: Path, arrays: Mapping[str, np.ndarray], envelope: UpdateEnvelope) -> Path:
    """Write the arrays and what was signed about them; atomic, so a crash never leaves half a file."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / MODEL_FILE
    save_npz(path, arrays)
    meta = {
        "federation_id": envelope.federation_id,
        "run_id": envelope.run_id,
        "round": envelope.round,
        "member_id": envelope.sender,
        "base_digest": envelope.base_digest.hex(),
        "update_digest": envelope.update_digest.hex(),
        "num_examples": envelope.num_examples,
        "metrics": dict(envelope.metrics),
    }
    meta_tmp = workdir / (META_FILE + ".tmp")
    meta_tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    meta_tmp.replace(workdir / META_FILE)
    return path


def save_personal_model(
    workdir: Path, arrays: Mapping[str, np.ndarray], metrics: Mapping[str, float], epochs: int
) -> Path:
    """Keep the partner's personalized model (never sent anywhere) beside the shared one."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / PERSONAL_FILE
    save_npz(path, arrays)
    meta = {"personalize_epochs": epochs, "validation_metrics": dict(metrics)}
    tmp = workdir / (PERSONAL_META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tmp.replace(workdir / PERSONAL_META_FILE)
    return path


def load_local_model(workdir: Path) -> dict[str, np.ndarray]:
    """The node's latest local model."""
    return load_npz(workdir / MODEL_FILE)


def record_round(workdir: Path, run_id: str, round_: int) -> int | None:
    """Note a global model of `round_` in `run_id`; return the newest round seen before, if any.

    The file keeps the highest round per run (atomic write), so a caller can refuse older models.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / SEEN_FILE
    seen = json.loads(path.read_text()) if path.is_file() else {}
    before = seen.get(run_id)
    newest = before if isinstance(before, int) else None
    seen[run_id] = round_ if newest is None else max(round_, newest)
    tmp = workdir / (SEEN_FILE + ".tmp")
    tmp.write_text(json.dumps(seen, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return newest
