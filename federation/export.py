"""`weft export`: a finished run's signed global model as a standard Hugging Face model directory.

The export trusts nothing in the run directory that the coordinator did not sign:
- the coordinator's public key (`--coordinator-key`, else `RUN_DIR/keys/coordinator.pub`) must be the
  one summary.json names;
- `global_model.npz` must verify under that key (signature and array digest), and its envelope must
  agree with summary.json on federation, run, task and model digest;
- the exchange settings in summary.json must equal the signed ones;
- the rebuilt frozen base (the task's model, seeded as the run seeded it) must hash to the signed
  `frozen-digest`, so adapters are never merged into a different base.

Then the model is written with `save_pretrained` (safetensors):
- exchange `all` / `subset`: the whole model;
- exchange `lora`: the adapters merged into the base (default), or the adapters alone
  (adapter_model.safetensors + adapter_config.json, for `peft.PeftModel.from_pretrained`).

The task's tokenizer is saved beside the model when the task provides one (see `task_tokenizer`),
and `weft_export.json` records where the model came from.
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from federation.errors import ConfigError
from federation.tasks import Task, TaskError, TaskOptions, load_task
from node import ExchangeSpec, LocalModel
from protocols import ProtocolError, PublicKey, SignedModel, load_public_key, read_signed_model, wire

SUMMARY = "summary.json"
FINAL_MODEL = "global_model.npz"
"""coordinator.record.FINAL_MODEL, spelled again here: federation/export.py never imports the coordinator."""
COORDINATOR_KEY = Path("keys") / "coordinator.pub"
RECORD = "weft_export.json"
"""The provenance file written beside the exported model."""
TOKENIZER_HOOK = "tokenizer_for"
"""Name of the optional function `(TaskOptions) -> tokenizer | None` in the module that defines a task's model."""

MODEL = "model"
MERGED = "merged"
ADAPTERS = "adapters"
"""What an export holds: the whole model, LoRA adapters merged into the base, or the adapters alone."""


class ExportRefused(ConfigError):
    """The run cannot be exported; the message says why (the CLI prints it and exits with code 2)."""


@dataclass(frozen=True)
class ExportResult:
    """What `export_run` wrote."""

    out: Path
    """The model directory."""
    exported: str
    """MODEL, MERGED or ADAPTERS."""
    run_id: str
    """The run that trained the model."""
    federation_id: str
    """The federation it belongs to."""
    round: int
    """Rounds behind the exported global model."""
    model_digest: str
    """Hex digest of the signed exchanged arrays."""
    tokenizer: bool
    """Whether the task's tokenizer was saved too."""


@dataclass(frozen=True)
class _Run:
    """A run directory whose final model verified against its coordinator key."""

    summary: Mapping[str, Any]
    config: Mapping[str, Any]
    model: SignedModel
    spec: ExchangeSpec


def export_run(
    run_dir: Path,
    out: Path,
    coordinator_key: Path | None = None,
    adapters_only: bool = False,
    tokenizer: object | None = None,
) -> ExportResult:
    """Verify the run's final global model and write it to `out` as a Hugging Face model directory.

    `coordinator_key` is the trust anchor (default: `run_dir/keys/coordinator.pub`). `adapters_only`
    writes a LoRA run's adapters instead of the merged model. `tokenizer` (anything with
    `save_pretrained`) is saved beside the model; None: the task's own, if it provides one
    (`task_tokenizer`). Raises ExportRefused (a ConfigError) with the reason; `out` is left untouched then.
    """
    _check_out(out)
    run = _verified_run(run_dir, coordinator_key)
    if adapters_only and run.spec.exchange != "lora":
        raise ExportRefused(f"--adapters-only: run exchanged {run.spec.exchange!r} weights, not LoRA adapters")
    options = TaskOptions(_model_dir(run.config))
    task = _load_task(run, options)
    with _quiet_libraries():
        local = _rebuild(task, run)
        if tokenizer is None:
            tokenizer = task_tokenizer(task, options)
        exported = ADAPTERS if adapters_only else MERGED if run.spec.exchange == "lora" else MODEL
        env = run.model.envelope
        result = ExportResult(
            out, exported, env.run_id, env.federation_id, env.round, env.model_digest.hex(), tokenizer is not None
        )
        _write(out, lambda tmp: _save(local, exported, tokenizer, tmp, _record(result, run, run_dir, local)))
    return result


def task_tokenizer(task: Task, options: TaskOptions) -> object | None:
    """The task's tokenizer, by convention: `tokenizer_for(options)` in the module defining `task.make_model`.

    A task without that function (digits, synthetic, most user tasks) has none: only the model is exported.
    """
    module = sys.modules.get(getattr(task.make_model, "__module__", "") or "")
    hook = getattr(module, TOKENIZER_HOOK, None)
    if not callable(hook):
        return None
    try:
        tok: object | None = hook(options)
    except Exception as exc:
        raise TaskError(f"task {task.name!r}: {TOKENIZER_HOOK}() failed: {exc}") from exc
    if tok is not None and not callable(getattr(tok, "save_pretrained", None)):
        raise TaskError(
            f"task {task.name!r}: {TOKENIZER_HOOK}() returned a {type(tok).__name__} without save_pretrained"
        )
    return tok


# ---- verification -----------------------------------------------------------------------------------------


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportRefused(f"--out {out} exists and is not an empty folder; refusing to overwrite it")


def _verified_run(run_dir: Path, coordinator_key: Path | None) -> _Run:
    summary = _read_summary(run_dir)
    key = _trusted_key(run_dir, coordinator_key, summary)
    model = _read_model(run_dir / FINAL_MODEL, key)
    _check_envelope(model, summary)
    config = summary["config"]
    return _Run(summary, config, model, _exchange_spec(config, model))


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SUMMARY
    if not path.is_file():
        raise ExportRefused(f"{path} not found: {run_dir} is not a finished weft run directory")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportRefused(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(summary, dict):
        raise ExportRefused(f"{path} is not a run summary (expected a JSON object)")
    if summary.get("status") != "completed":
        raise ExportRefused(f"{path}: the run did not complete (status {summary.get('status')!r}); nothing to export")
    if not isinstance(summary.get("config"), dict):
        raise ExportRefused(f'{path} has no run config ("config"); it was written by an older weft')
    return summary


def _trusted_key(run_dir: Path, given: Path | None, summary: Mapping[str, Any]) -> PublicKey:
    path = given if given is not None else run_dir / COORDINATOR_KEY
    try:
        key = load_public_key(path)
    except ProtocolError as exc:
        raise ExportRefused(f"coordinator key: {exc}") from exc
    if key.hex() != summary.get("coordinator_public_key"):
        raise ExportRefused(
            f"coordinator key {path} (member {key.member_id}) is not the key that ran this federation "
            f"(summary.json names {summary.get('coordinator_public_key')!r}); refusing to export"
        )
    return key


def _read_model(path: Path, key: PublicKey) -> SignedModel:
    if not path.is_file():
        raise ExportRefused(f"{path} not found: the run left no signed global model")
    try:
        return read_signed_model(path, key)
    except ProtocolError as exc:
        raise ExportRefused(f"{path} is not a model signed by the coordinator: {exc}") from exc


def _check_envelope(model: SignedModel, summary: Mapping[str, Any]) -> None:
    env = model.envelope
    signed = {
        "federation_id": env.federation_id,
        "run_id": env.run_id,
        "task": env.task,
        "global_model_digest": env.model_digest.hex(),
    }
    for name, value in signed.items():
        if summary.get(name) != value:
            raise ExportRefused(
                f"summary.json says {name} {summary.get(name)!r} but the signed global model says {value!r}; "
                "the run directory was altered"
            )


def _exchange_spec(config: Mapping[str, Any], model: SignedModel) -> ExchangeSpec:
    try:
        spec = ExchangeSpec.from_config(config)
        signed = ExchangeSpec.from_config(model.envelope.config)
    except ValueError as exc:
        raise ExportRefused(f"exchange settings: {exc}") from exc
    if spec != signed:
        raise ExportRefused(
            f"summary.json's exchange settings {spec.to_config()} differ from the signed ones {signed.to_config()}"
        )
    return spec


def _model_dir(config: Mapping[str, Any]) -> Path | None:
    value = config.get("model-dir", "")
    if not isinstance(value, str):
        raise ExportRefused(f"summary.json: model-dir must be a string, got {value!r}")
    return Path(value) if value else None


def _load_task(run: _Run, options: TaskOptions) -> Task:
    reference = run.config.get("task")
    if not isinstance(reference, str) or not reference:
        raise ExportRefused("summary.json: the run config names no task")
    task = load_task(reference, options)
    if task.name != run.model.envelope.task:
        raise ExportRefused(
            f"task {reference!r} is now named {task.name!r}, but the signed model is for task "
            f"{run.model.envelope.task!r}"
        )
    return task


def _rebuild(task: Task, run: _Run) -> LocalModel:
    """The run's model (seeded like the run's initial model), checked against the signed base, then loaded."""
    seed = run.config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ExportRefused(f"summary.json: seed must be an integer, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # as federation.simulation.initial_model: a random base is the run's base
        try:
            local = LocalModel(task.make_model, run.spec, task.subset)
        except ValueError as exc:
            raise ExportRefused(f"exchange: {exc}") from exc
    _require_pretrained(task, local)
    signed = run.model.envelope.config.get(wire.FROZEN_DIGEST)
    if signed != local.frozen:
        raise ExportRefused(
            f"task {task.name!r} rebuilds a frozen base with digest {local.frozen[:16]}…, but the run signed "
            f"{str(signed)[:16]}…: a different base (check model-dir and the task's version)"
        )
    try:
        local.load(run.model.arrays)
    except ValueError as exc:
        raise ExportRefused(f"task {task.name!r}: {exc}") from exc
    return local


def _require_pretrained(task: Task, local: LocalModel) -> None:
    from transformers import PreTrainedModel

    base = _base_model(local.model)
    if not isinstance(base, PreTrainedModel):
        raise ExportRefused(
            f"task {task.name!r}: its model is a plain {type(base).__name__}, not a Hugging Face PreTrainedModel; "
            "export writes Hugging Face model directories (causal LMs)"
        )


def _base_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # a peft.PeftModel
    return get_base() if callable(get_base) else model


# ---- writing ---------------------------------------------------------------------------------------------


def _save(local: LocalModel, exported: str, tokenizer: object | None, tmp: Path, record: dict[str, Any]) -> None:
    model: Any = local.model
    if exported == MERGED:
        model = model.merge_and_unload()
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
    record["files"] = sorted([*(p.name for p in tmp.iterdir()), RECORD])
    (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _record(result: ExportResult, run: _Run, run_dir: Path, local: LocalModel) -> dict[str, Any]:
    return {
        "exported": result.exported,
        "federation_id": result.federation_id,
        "run_id": result.run_id,
        "round": result.round,
        "task": run.model.envelope.task,
        "task_reference": run.config.get("task"),
        "model_digest": result.model_digest,
        "frozen_digest": local.frozen,
        "exchange": run.spec.to_config(),
        "tokenizer": result.tokenizer,
        "coordinator_public_key": run.summary["coordinator_public_key"],
        "source": str(run_dir.resolve()),
    }


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """No progress bars or deprecation notices from transformers / peft: `weft export` prints one line."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _write(out: Path, fill: Callable[[Path], None]) -> None:
    """Fill a fresh sibling folder, then rename it to `out`: a failed export leaves nothing behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.weft-export-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        fill(tmp)
        if out.exists():
            out.rmdir()  # empty (checked before): rename(2) would also replace it, rmdir says so plainly
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
