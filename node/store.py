"""The partner's own copy of its latest locally trained model (the "N" of N+1), and the node's state:
the rounds it has seen and the error-feedback residual of its compressed updates."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocols import ArraySpec, UpdateEnvelope
from protocols.npz import load_npz, save_npz

log = logging.getLogger("weft.node")

MODEL_FILE = "local_model.npz"
PERSONAL_FILE = "personal_model.npz"
PERSONAL_META_FILE = "personal_model.json"
META_FILE = "local_model.json"
SEEN_FILE = "seen_rounds.json"
RESIDUAL_FILE = "residual.npz"
"""The error-feedback residual the node's latest compressed update left (protocols/payload.py, `encode`)."""
RESIDUAL_PREV_FILE = "residual.prev.npz"
"""The residual before that one: what a retried round starts from, so a resumed run repeats its bytes."""
_RESIDUAL_META = "__weft__.residual"


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
        "payload": envelope.payload,
    }
    meta_tmp = workdir / (META_FILE + ".tmp")
    meta_tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    meta_tmp.replace(workdir / META_FILE)
    return path


@dataclass(frozen=True)
class ResidualKey:
    """What a residual belongs to: it is only ever added to an update of the same run, payload and model."""

    federation_id: str
    run_id: str
    payload: str


def load_residual(
    workdir: Path, key: ResidualKey, round_: int, template: Mapping[str, ArraySpec]
) -> dict[str, np.ndarray] | None:
    """The residual to add to the update of `round_`: the newest one kept for `key` from a round before it.

    None (start from zero) when there is none, or it was left by another federation, run or payload, or does
    not fit `template` (every floating array, float32, same shape, finite).
    """
    best: tuple[int, dict[str, np.ndarray]] | None = None
    for name in (RESIDUAL_FILE, RESIDUAL_PREV_FILE):
        found = _read_residual(workdir / name, key, template)
        if found is not None and found[0] < round_ and (best is None or found[0] > best[0]):
            best = found
    return None if best is None else best[1]


def save_residual(workdir: Path, key: ResidualKey, round_: int, residual: Mapping[str, np.ndarray]) -> None:
    """Keep the residual of the update of `round_` (atomic); the one it replaces, if of an earlier round of
    the same run and payload, is kept as the previous one (what a retry of `round_` starts from)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / RESIDUAL_FILE
    current = _read_meta(path)
    if current is not None and current.get("key") == _key_json(key) and _round_of(current) < round_:
        os.replace(path, workdir / RESIDUAL_PREV_FILE)  # atomic: a crash here leaves it as the previous one
    meta = json.dumps({"key": _key_json(key), "round": round_}, sort_keys=True).encode()
    save_npz(path, {**residual, _RESIDUAL_META: np.frombuffer(meta, dtype=np.uint8)})


def _key_json(key: ResidualKey) -> dict[str, str]:
    return {"federation_id": key.federation_id, "run_id": key.run_id, "payload": key.payload}


def _round_of(meta: Mapping[str, object]) -> int:
    value = meta.get("round")
    return value if isinstance(value, int) else -1


def _read_meta(path: Path) -> dict[str, object] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(npz[_RESIDUAL_META].tobytes())
        return meta if isinstance(meta, dict) else None
    except Exception:  # a damaged or foreign file: no residual (the next update starts from zero)
        log.warning("ignoring the unreadable error-feedback residual %s", path)
        return None


def _read_residual(
    path: Path, key: ResidualKey, template: Mapping[str, ArraySpec]
) -> tuple[int, dict[str, np.ndarray]] | None:
    meta = _read_meta(path)
    if meta is None or meta.get("key") != _key_json(key):
        return None
    try:
        arrays = {n: a for n, a in load_npz(path).items() if n != _RESIDUAL_META}
    except Exception:
        log.warning("ignoring the unreadable error-feedback residual %s", path)
        return None
    floating = {n: s for n, s in template.items() if np.dtype(s.dtype).kind == "f"}
    fits = set(arrays) == set(floating) and all(
        a.dtype == np.float32 and tuple(a.shape) == tuple(floating[n].shape) and np.isfinite(a).all()
        for n, a in arrays.items()
    )
    if not fits:
        log.warning("the error-feedback residual %s does not fit the model; starting from zero", path)
        return None
    return _round_of(meta), arrays


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
