"""Federated training against central training of the same model, on the same data, with the same settings.

Three comparisons, each measured in one run of this command (every number it writes comes from that run):

- **digits**: `weft simulate` (10 nodes, Dirichlet alpha 0.5, the digits task's own settings) against the
  same MLP trained centrally on the whole simulation pool (the union of what the 10 nodes hold) with the
  same optimizer settings for the same number of epochs (rounds x local epochs), both evaluated on the
  same held-out test split. Acceptance: the federated final accuracy is within 1.5 points of central.
- **lm**: `weft simulate --task lm --nodes 4 --partition natural` (full exchange) against the same model
  trained centrally on the pool with the same optimizer on the same number of training tokens (what
  the nodes consumed: every round, each node trains min(max-steps, steps per epoch) batches of blocks).
  Acceptance: federated held-out bits per byte within 10% of central; the command under 5 minutes.
- **lora**: a base checkpoint is trained centrally on other standard-library packages than the
  federation's, saved with its tokenizer, then `weft simulate --task lm --model-dir BASE --exchange lora`
  fine-tunes adapters on the federation's corpus. Acceptance: the signed updates carry at most 5% of
  the full model's bytes, and the held-out perplexity falls by at least 10% from round 0 (the base).

The federated side is always the real `weft simulate` command, run as a subprocess and timed whole; its
settings are read back from the run's summary.json and must equal what the task's defaults resolve to,
so the central side cannot drift from them. The central side runs the nodes' own training loop
(`node.train_local` with the task's recipe and optimizer) on pooled data: one round-equivalent at a
time, the round's scheduled learning rate, a fresh optimizer each round-equivalent, as a single node
holding all the data would.

Run (from the repository root):
    .venv/bin/python -m benchmarks.central_vs_federated [--only digits lm lora] [--seeds 0 1 2]

It writes docs/figures/central_vs_federated_<part>.png, benchmarks/results/central_vs_federated.json,
and each part's generated block of docs/BENCHMARKS.md (between its markers); `--no-doc` only prints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from federation.config import RunConfig
from federation.partition import dirichlet_partition, natural_partition, train_val_split
from federation.runtime import initial_model, resolve_run
from federation.tasks import Task, TaskOptions
from node import Recipe, TrainConfig, evaluate_local, train_local

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("digits", "lm", "lora")
CPU = torch.device("cpu")

DIGITS_NODES, DIGITS_ALPHA, DIGITS_MAX_GAP_POINTS = 10, 0.5, 1.5
LM_NODES, LM_MAX_RATIO, LM_MAX_WALL_S = 4, 1.10, 300.0
LORA_MAX_BYTES_FRACTION, LORA_MIN_PPL_DROP = 0.05, 0.10

BASE_OWNERS = (
    "ast", "configparser", "datetime", "difflib", "doctest", "enum", "html", "optparse",
    "pathlib", "pickle", "re", "shutil", "subprocess", "tarfile", "threading", "zipfile",
)  # fmt: skip
"""Standard-library packages the LoRA base model is trained on: none of them is in the lm task's
federation corpus (`federation.tasks.lm.SIM_OWNERS`), so the adapters have new text to learn."""
BASE_STEPS = 800
"""Central training steps of the LoRA base (batch 16 blocks of 128 bytes, AdamW 3e-3, cosine over 4 chunks)."""
LORA_SETTINGS: dict[str, Any] = {
    "learning-rate": 3e-3,
    "lora-rank": 4,
    "lora-targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
}
"""Flags of the lora run on top of the lm task's checkpoint defaults. Their learning rate (1e-4) suits full
fine-tuning of a real checkpoint; adapters want a larger step. Measured on this benchmark's base, 10 rounds
of 480 blocks per node: with peft's default targets (q_proj, v_proj) at rank 8, held-out perplexity fell
only 0.5% (learning rate 1e-4), 3.6% (3e-3) and 5.5% (1e-2); rank 4 on every linear layer at 3e-3 gave
14.8%, and its updates stay under 5% of the model's bytes."""


# ---- the federated side: the real `weft simulate` ------------------------------------------------------


@dataclass(frozen=True)
class FederatedRun:
    """One `weft simulate` command: its record and how long the whole command took."""

    out: Path
    command: list[str]
    wall_s: float
    summary: Mapping[str, Any]
    rows: list[dict[str, Any]]

    @property
    def run_config(self) -> RunConfig:
        """The run's resolved settings, as recorded in summary.json."""
        keys = {f.name.replace("_", "-") for f in fields(RunConfig)}
        return RunConfig.from_mapping({k: v for k, v in self.summary["config"].items() if k in keys}, "summary.json")

    def curve(self, metric: str) -> list[float]:
        """The held-out `metric` after each round (1..rounds)."""
        return [float(r[metric]) for r in self.rows]


def weft_simulate(flags: Sequence[str], out: Path) -> FederatedRun:
    """Run `weft simulate FLAGS --out OUT` in a fresh process (progress on stderr), timed from start to exit."""
    command = [sys.executable, "-m", "federation.cli", "simulate", *flags, "--out", str(out)]
    shown = "weft simulate " + " ".join([*flags, "--out", str(out)])
    print(f"\n$ {shown}", file=sys.stderr, flush=True)
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ}, check=False)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"`{shown}` failed with exit code {done.returncode}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in lines if "round" in r and "status" not in r and "phase" not in r]
    summary = json.loads((out / "summary.json").read_text())
    return FederatedRun(out, ["weft", "simulate", *flags], wall, summary, rows)


def same_settings(run: FederatedRun, expected: RunConfig) -> RunConfig:
    """The federated run's recorded settings, which must be the ones the central side uses."""
    recorded = run.run_config
    if recorded != expected:
        diff = {k: (v, expected.to_json()[k]) for k, v in recorded.to_json().items() if v != expected.to_json()[k]}
        raise SystemExit(f"{run.out}: the run recorded other settings than the task resolves to: {diff}")
    return recorded


# ---- the central side: the nodes' own loop on pooled data ---------------------------------------------


def round_seed(seed: int, round_: int) -> int:
    """Shuffling seed of a central round-equivalent (mixed like a node's)."""
    return int(np.random.SeedSequence([seed, round_, 1_000_003]).generate_state(1)[0])


def evaluate(model: nn.Module, test: Dataset, recipe: Recipe) -> dict[str, float]:
    """The recipe's held-out metrics of `model` (what the coordinator measures on the federated model)."""
    return dict(evaluate_local(model, test, CPU, recipe=recipe).metrics)


def train_central(
    model: nn.Module,
    pool: Dataset,
    test: Dataset,
    recipe: Recipe,
    run: RunConfig,
    steps: Callable[[int, TrainConfig], TrainConfig] | None = None,
) -> tuple[list[dict[str, float]], float]:
    """Train `model` on `pool` one round-equivalent at a time; (held-out metrics at 0..rounds, wall seconds).

    Round-equivalent r uses `run.train_config(r)` (its scheduled learning rate, a fresh optimizer),
    optionally reshaped by `steps(r, config)` (the lm budget sets its step count).
    """
    curve = [evaluate(model, test, recipe)]
    started = time.monotonic()
    for r in range(1, run.rounds + 1):
        config = TrainConfig.from_config(run.train_config(r))
        if steps is not None:
            config = steps(r, config)
        train_local(model, pool, config, CPU, seed=round_seed(run.seed, r), recipe=recipe)
        curve.append(evaluate(model, test, recipe))
        print(f"  central round-equivalent {r:3d}/{run.rounds}: {_brief(curve[-1])}", file=sys.stderr, flush=True)
    return curve, time.monotonic() - started


def initial_weights(task: Task, run: RunConfig) -> nn.Module:
    """The federation's round-0 model (same seed, same construction as `weft simulate`)."""
    return initial_model(task, run.exchange_spec(), run.seed).model


def _shown(path: Path) -> str:
    """`path` relative to the repository when it lies inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _brief(metrics: Mapping[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))


# ---- digits ---------------------------------------------------------------------------------------------


def bench_digits(seeds: Sequence[int], work: Path, figures: Path) -> dict[str, Any]:
    """Federated vs central digits, one row per seed."""
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        # what `weft simulate --seed S` resolves: weft's defaults < the task's preferences < the flags
        task, expected = resolve_run({"task": "digits", "seed": seed}, "benchmark")
        fed = weft_simulate(["--seed", str(seed)], work / f"digits-seed{seed}")
        run = same_settings(fed, expected)
        data = task.simulation(seed)
        # the pool is exactly what the nodes split between them (checked, so nothing is held out twice)
        parts = dirichlet_partition(data.labels, DIGITS_NODES, DIGITS_ALPHA, seed)  # type: ignore[arg-type]
        assert sum(len(p) for p in parts) == len(data.pool)  # type: ignore[arg-type]
        central, central_wall = train_central(initial_weights(task, run), data.pool, data.test, task.recipe, run)
        fed_acc = fed.curve("accuracy")
        cen_acc = [m["accuracy"] for m in central]
        best_round = int(np.argmax(fed_acc)) + 1
        best_central = int(np.argmax(cen_acc[1:])) + 1
        gap = 100 * (cen_acc[-1] - fed_acc[-1])
        rows.append(
            {
                "seed": seed,
                "federated_final_accuracy": fed_acc[-1],
                "central_final_accuracy": cen_acc[-1],
                "gap_points": gap,
                "within": gap <= DIGITS_MAX_GAP_POINTS,
                "federated_best": {"round": best_round, "accuracy": fed_acc[best_round - 1]},
                "central_best": {"epochs": best_central * run.local_epochs, "accuracy": cen_acc[best_central]},
                "weft_simulate_wall_s": fed.wall_s,
                "run_wall_s": fed.summary["wall_s"],
                "central_wall_s": central_wall,
                "pool": len(data.pool),  # type: ignore[arg-type]
                "test": len(data.test),  # type: ignore[arg-type]
                "federated_curve": fed_acc,
                "central_curve": cen_acc,
                "run_dir": _shown(fed.out),
            }
        )
    settings = {k: v for k, v in run.to_json().items() if k != "seed"}
    _plot_digits(rows, settings, figures / "central_vs_federated_digits.png")
    return {"settings": settings, "task_defaults": dict(task.defaults), "rows": rows}


def _plot_digits(rows: list[dict[str, Any]], settings: Mapping[str, Any], path: Path) -> None:
    epochs_per_round = int(settings["local-epochs"])
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    for i, row in enumerate(rows):
        color = f"C{i}"
        xs = [epochs_per_round * r for r in range(len(row["central_curve"]))]
        ax.plot(xs, row["central_curve"], color=color, ls="--", lw=1.2, label=f"central, seed {row['seed']}")
        ax.plot(
            xs,
            [row["central_curve"][0], *row["federated_curve"]],
            color=color,
            marker="o",
            ms=2.5,
            lw=1.2,
            label=f"federated (10 nodes, Dirichlet 0.5), seed {row['seed']}",
        )
    ax.set_ylim(0.8, 1.0)
    ax.set_xlabel(f"epochs (federated: round x {epochs_per_round} local epochs)")
    ax.set_ylabel("held-out test accuracy")
    ax.set_title(
        f"digits: federated vs central, {settings['optimizer']} lr {settings['learning-rate']:g}, "
        f"batch {settings['batch-size']}, {settings['rounds']} rounds x {epochs_per_round} epochs"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- lm: the token budget -------------------------------------------------------------------------------


def blocks_per_round(examples: int, config: TrainConfig) -> tuple[int, int]:
    """(optimizer steps, blocks trained on) of one node's round, exactly as `train_local` takes them.

    Each epoch is `examples // batch` full batches and one short one; training stops after
    `max-steps` batches (when set) or `local-epochs` epochs.
    """
    per_epoch = [config.batch_size] * (examples // config.batch_size)
    if examples % config.batch_size:
        per_epoch.append(examples % config.batch_size)
    batches = per_epoch * config.local_epochs
    if config.max_steps:
        batches = batches[: config.max_steps]
    return len(batches), sum(batches)


def federated_budget(owners: Sequence[str], nodes: int, run: RunConfig) -> list[dict[str, int]]:
    """Per round: the steps and blocks all nodes of a natural split trained on (their 80% training splits)."""
    sizes = [
        len(train_val_split(len(part), run.seed, pid)[0]) for pid, part in enumerate(natural_partition(owners, nodes))
    ]
    out = []
    for r in range(1, run.rounds + 1):
        config = TrainConfig.from_config(run.train_config(r))
        per_node = [blocks_per_round(n, config) for n in sizes]
        out.append({"steps": sum(s for s, _ in per_node), "blocks": sum(b for _, b in per_node)})
    return out


def bench_lm(seed: int, work: Path, figures: Path, data_parallel: bool = False) -> dict[str, Any]:
    """Federated (4 nodes, natural split) vs central bits per byte on the same token budget.

    With `data_parallel`, a second central run takes batches `nodes` times larger (as many sequential
    steps per round-equivalent as one node takes), on the same tokens.
    """
    task, expected = resolve_run({"task": "lm", "seed": seed}, "benchmark")
    flags = ["--task", "lm", "--nodes", str(LM_NODES), "--partition", "natural", "--seed", str(seed)]
    fed = weft_simulate(flags, work / "lm")
    run = same_settings(fed, expected)
    data = task.simulation(seed)
    assert data.owners is not None
    budget = federated_budget(data.owners, LM_NODES, run)
    block = int(data.pool[0].shape[0])
    pool_size = len(data.pool)  # type: ignore[arg-type]

    def reshaper(batch_factor: int) -> Callable[[int, TrainConfig], TrainConfig]:
        """Round-equivalent r: the blocks the nodes trained on in round r, in batches `batch_factor` x larger."""

        def central_round(r: int, config: TrainConfig) -> TrainConfig:
            batch = config.batch_size * batch_factor
            steps = max(1, round(budget[r - 1]["blocks"] / batch))
            epochs = max(1, math.ceil(steps * batch / pool_size))
            return replace(config, batch_size=batch, max_steps=steps, local_epochs=epochs)

        return central_round

    fed_bpb = fed.curve("bits_per_byte")
    result: dict[str, Any] = {
        "settings": dict(run.to_json()),
        "nodes": LM_NODES,
        "partition_owners": fed.summary["config"].get("partition-owners"),
        "block": block,
        "pool_blocks": pool_size,
        "test_blocks": len(data.test),  # type: ignore[arg-type]
        "test_description": data.description,
        "federated_tokens": sum(b["blocks"] for b in budget) * block,
        "federated_steps": sum(b["steps"] for b in budget),
        "federated_steps_per_node": sum(b["steps"] for b in budget) // LM_NODES,
        "federated_final_bpb": fed_bpb[-1],
        "federated_final_perplexity": fed.curve("perplexity")[-1],
        "weft_simulate_wall_s": fed.wall_s,
        "run_wall_s": fed.summary["wall_s"],
        "federated_curve": fed_bpb,
        "tokens_per_round": [b["blocks"] * block for b in budget],
        "run_dir": _shown(fed.out),
        "central": [],
    }
    for factor in (1, LM_NODES) if data_parallel else (1,):
        shape = reshaper(factor)
        configs = [shape(r, TrainConfig.from_config(run.train_config(r))) for r in range(1, run.rounds + 1)]
        curve, wall = train_central(initial_weights(task, run), data.pool, data.test, task.recipe, run, steps=shape)
        result["central"].append(
            {
                "batch_size": configs[0].batch_size,
                "tokens": sum(blocks_per_round(pool_size, c)[1] for c in configs) * block,
                "steps": sum(c.max_steps for c in configs),
                "final_bpb": curve[-1]["bits_per_byte"],
                "final_perplexity": curve[-1]["perplexity"],
                "ratio": fed_bpb[-1] / curve[-1]["bits_per_byte"],
                "wall_s": wall,
                "curve": [m["bits_per_byte"] for m in curve],
            }
        )
    same = result["central"][0]
    result["ratio"] = same["ratio"]
    result["within"] = same["ratio"] <= LM_MAX_RATIO
    result["fast_enough"] = fed.wall_s <= LM_MAX_WALL_S
    _plot_lm(result, figures / "central_vs_federated_lm.png")
    return result


def _plot_lm(result: Mapping[str, Any], path: Path) -> None:
    tokens = np.cumsum([0, *result["tokens_per_round"]]) / 1e6
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    start = result["central"][0]["curve"][0]
    ax.plot(tokens, [start, *result["federated_curve"]], marker="o", ms=3, label="federated (4 nodes, natural split)")
    for c in result["central"]:
        ax.plot(tokens, c["curve"], marker="s", ms=3, ls="--", label=f"central (pooled data), batch {c['batch_size']}")
    ax.set_xlabel("training tokens (millions; federated: summed over nodes)")
    ax.set_ylabel("held-out bits per byte")
    s = result["settings"]
    ax.set_title(
        f"lm: federated vs central, {s['optimizer']} lr {s['learning-rate']:g} {s['lr-schedule']}, "
        f"{s['rounds']} rounds x <= {s['max-steps']} steps x batch {s['batch-size']}"
    )
    ax.set_ylim(top=min(start, 2 * result["federated_curve"][-1]))
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- lora: a base checkpoint, then adapters over it -----------------------------------------------------


def make_base(model_dir: Path, seed: int) -> dict[str, Any]:
    """Train the built-in lm model centrally on `BASE_OWNERS` and save it with its tokenizer to `model_dir`."""
    from federation.tasks import lm
    from federation.tasks.text import TokenBlocks, stdlib_corpus, token_blocks

    overlap = set(BASE_OWNERS) & set(lm.SIM_OWNERS)
    assert not overlap, f"base owners overlap the federation corpus: {overlap}"
    tokenizer = lm.tokenizer_for(TaskOptions())
    corpus = stdlib_corpus(lm.SIM_BYTES_PER_OWNER, BASE_OWNERS)
    blocks = TokenBlocks(np.concatenate([token_blocks([text], tokenizer, lm.BLOCK) for text in corpus.values()]))
    torch.manual_seed(seed)
    model = lm.make_builtin_model()
    recipe = lm.make_recipe(byte_level=True)
    schedule = RunConfig(rounds=4, optimizer="adamw", learning_rate=3e-3, lr_schedule="cosine", grad_clip=1.0)
    chunk = BASE_STEPS // schedule.rounds
    started = time.monotonic()
    stats = None
    for r in range(1, schedule.rounds + 1):
        config = replace(
            TrainConfig.from_config(schedule.train_config(r)),
            batch_size=16,
            max_steps=chunk,
            local_epochs=math.ceil(chunk * 16 / len(blocks)),
        )
        stats = train_local(model, blocks, config, CPU, seed=round_seed(seed, r), recipe=recipe)
        print(f"  base chunk {r}/{schedule.rounds}: train {_brief(stats.metrics)}", file=sys.stderr, flush=True)
    wall = time.monotonic() - started
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)  # type: ignore[operator]
    tokenizer.save_pretrained(model_dir)
    return {
        "owners": list(BASE_OWNERS),
        "blocks": len(blocks),
        "steps": chunk * schedule.rounds,
        "batch_size": 16,
        "optimizer": "adamw lr 3e-3, cosine over 4 chunks, grad clip 1",
        "final_train_bits_per_byte": stats.metrics["bits_per_byte"] if stats else None,
        "wall_s": wall,
    }


def update_bytes(run_dir: Path) -> dict[str, Any]:
    """Bytes of the accepted signed updates per round and node: their arrays, and their files on disk."""
    from protocols.stored import StoredUpdate

    arrays, files = [], []
    for path in sorted((run_dir / "rounds").glob("*/updates/*.update")):
        arrays.append(sum(a.nbytes for a in StoredUpdate(path).arrays().values()))
        files.append(path.stat().st_size)
    if not arrays:
        raise SystemExit(f"{run_dir}: no accepted update on disk")
    return {
        "updates": len(arrays),
        "array_bytes_min": min(arrays),
        "array_bytes_max": max(arrays),
        "file_bytes_max": max(files),
    }


def round0_metrics(task: Task, run: RunConfig, run_dir: Path, test: Dataset) -> dict[str, float]:
    """Held-out metrics of the run's signed round-0 global model (the base with fresh, zero-effect adapters)."""
    from federation.evaluation import CentralEvaluator
    from protocols.modelfile import RESERVED_PREFIX
    from protocols.npz import load_npz

    arrays = {
        k: v for k, v in load_npz(run_dir / "global" / "round-0000.npz").items() if not k.startswith(RESERVED_PREFIX)
    }
    return dict(CentralEvaluator(task, run.exchange_spec(), test)(arrays))


def bench_lora(seed: int, work: Path, figures: Path) -> dict[str, Any]:
    """Adapter exchange over a base checkpoint: bytes on the wire, held-out perplexity before and after."""
    base_dir = work / "lora-base"
    base = make_base(base_dir, seed)
    explicit: dict[str, Any] = {"task": "lm", "model-dir": str(base_dir), "exchange": "lora", "seed": seed}
    flags = ["--task", "lm", "--model-dir", str(base_dir), "--exchange", "lora", "--nodes", str(LM_NODES)]
    flags += ["--partition", "natural", "--seed", str(seed)]
    for key, value in LORA_SETTINGS.items():
        explicit[key] = value
        flags += [f"--{key}", _flag(value)]
    task, expected = resolve_run(explicit, "benchmark")
    fed = weft_simulate(flags, work / "lora")
    run = same_settings(fed, expected)
    data = task.simulation(seed)
    before = round0_metrics(task, run, fed.out, data.test)
    full_model = task.make_model()
    full_bytes = sum(t.numel() * t.element_size() for t in full_model.state_dict().values())
    sizes = update_bytes(fed.out)
    ppl = [before["perplexity"], *fed.curve("perplexity")]
    result = {
        "settings": {k: v for k, v in run.to_json().items() if k != "model-dir"},
        "base": base,
        "extra_flags": [f for key, value in LORA_SETTINGS.items() for f in (f"--{key}", _flag(value))],
        "nodes": LM_NODES,
        "full_model_bytes": full_bytes,
        "full_model_parameters": sum(p.numel() for p in full_model.parameters()),
        **sizes,
        "bytes_fraction": sizes["array_bytes_max"] / full_bytes,
        "perplexity_round0": before["perplexity"],
        "perplexity_final": ppl[-1],
        "bpb_round0": before.get("bits_per_byte"),
        "bpb_final": fed.curve("bits_per_byte")[-1] if "bits_per_byte" in fed.rows[-1] else None,
        "perplexity_drop": 1 - ppl[-1] / ppl[0],
        "perplexity_curve": ppl,
        "weft_simulate_wall_s": fed.wall_s,
        "run_wall_s": fed.summary["wall_s"],
        "run_dir": _shown(fed.out),
    }
    result["small_enough"] = result["bytes_fraction"] <= LORA_MAX_BYTES_FRACTION
    result["better_enough"] = result["perplexity_drop"] >= LORA_MIN_PPL_DROP
    _plot_lora(result, figures / "central_vs_federated_lora.png")
    return result


def _flag(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _plot_lora(result: Mapping[str, Any], path: Path) -> None:
    ppl = result["perplexity_curve"]
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    ax.plot(range(len(ppl)), ppl, marker="o", ms=3, label="federated LoRA adapters over the base")
    ax.axhline(ppl[0], color="grey", ls=":", label="round 0: the base checkpoint")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out perplexity (per byte)")
    s = result["settings"]
    ax.set_title(
        f"lora: r={s['lora-rank']} adapters, {result['bytes_fraction']:.2%} of the model's bytes per update, "
        f"{s['optimizer']} lr {s['learning-rate']:g}"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- report -------------------------------------------------------------------------------------------


def machine() -> str:
    """One line naming the machine and the versions."""
    import flwr

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()}-core CPU ({cpu}), {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"flwr {flwr.__version__}; measured {time.strftime('%Y-%m-%d')}"
    )


def _yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def digits_block(res: Mapping[str, Any], command: str) -> str:
    s = res["settings"]
    head = (
        f"Settings (the digits task's defaults, resolved as `weft simulate` resolves them): {s['optimizer']}, "
        f"learning rate {s['learning-rate']:g} ({s['lr-schedule']}), batch {s['batch-size']}, {s['rounds']} rounds x "
        f"{s['local-epochs']} local epochs = {s['rounds'] * s['local-epochs']} epochs for the central run. "
        f"Pool {res['rows'][0]['pool']} images (central trains on all of them; each node trains on 80% of its "
        f"share and validates on the rest), held-out test {res['rows'][0]['test']} images.\n\n"
    )
    table = [
        "| seed | federated final accuracy | central final accuracy | gap (points) | within 1.5 | "
        "federated best (round) | central best (epoch) | `weft simulate` wall (run itself) | central wall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        table.append(
            f"| {r['seed']} | {r['federated_final_accuracy']:.4f} | {r['central_final_accuracy']:.4f} | "
            f"{r['gap_points']:+.2f} | {_yes(r['within'])} | {r['federated_best']['accuracy']:.4f} "
            f"({r['federated_best']['round']}) | {r['central_best']['accuracy']:.4f} ({r['central_best']['epochs']}) | "
            f"{r['weft_simulate_wall_s']:.1f} s ({r['run_wall_s']:.1f} s) | {r['central_wall_s']:.1f} s |"
        )
    gaps = [r["gap_points"] for r in res["rows"]]
    tail = (
        f"\n\nGap = central minus federated final accuracy, in points; largest {max(gaps):+.2f}, mean "
        f"{sum(gaps) / len(gaps):+.2f}. One test image is {100 / res['rows'][0]['test']:.2f} points.\n\n"
        "![digits: federated accuracy per round against central accuracy per epoch-equivalent]"
        "(figures/central_vs_federated_digits.png)\n"
    )
    return f"```bash\n{command}\n```\n\n" + head + "\n".join(table) + tail


def lm_block(res: Mapping[str, Any], command: str) -> str:
    s = res["settings"]
    owners = "; ".join(f"node {i}: {', '.join(o)}" for i, o in enumerate(res["partition_owners"] or []))
    head = (
        f"Settings (the lm task's defaults): {s['optimizer']}, learning rate {s['learning-rate']:g} {s['lr-schedule']} "
        f"({s['warmup-rounds']} warm-up round), batch {s['batch-size']} blocks of {res['block']} bytes, "
        f"{s['rounds']} rounds of at most {s['max-steps']} steps, grad clip {s['grad-clip']:g}. "
        f"Natural split by package ({owners}). Pool {res['pool_blocks']} blocks, held-out test "
        f"{res['test_blocks']} blocks.\n\n"
    )
    table = [
        "| run | training tokens | optimizer steps | held-out bits per byte | perplexity | federated / central "
        "| wall |",
        "|---|---|---|---|---|---|---|",
        f"| federated (`weft simulate`: whole command, run itself) | {res['federated_tokens']:,} | "
        f"{res['federated_steps']} ({res['federated_steps_per_node']} per node) | {res['federated_final_bpb']:.4f} | "
        f"{res['federated_final_perplexity']:.3f} | | {res['weft_simulate_wall_s']:.1f} s, {res['run_wall_s']:.1f} s |",
    ]
    for c in res["central"]:
        table.append(
            f"| central (pooled data), batch {c['batch_size']} | {c['tokens']:,} | {c['steps']} | "
            f"{c['final_bpb']:.4f} | {c['final_perplexity']:.3f} | {c['ratio']:.3f} | {c['wall_s']:.1f} s |"
        )
    tail = (
        f"\n\nFederated / central bits per byte, same batch: **{res['ratio']:.3f}** (within 10%: "
        f"{_yes(res['within'])}). `weft simulate --task lm --nodes 4 --partition natural` under 5 minutes: "
        f"{_yes(res['fast_enough'])}.\n\n"
        "![lm: held-out bits per byte against training tokens](figures/central_vs_federated_lm.png)\n"
    )
    return f"```bash\n{command}\n```\n\n" + head + "\n".join(table) + tail


def lora_block(res: Mapping[str, Any], command: str) -> str:
    s, b = res["settings"], res["base"]
    head = (
        f"Base: the built-in lm model trained centrally for {b['steps']} steps (batch {b['batch_size']}, "
        f"{b['optimizer']}) on {len(b['owners'])} other standard-library packages ({', '.join(b['owners'])}; "
        f"{b['blocks']} blocks, {b['wall_s']:.0f} s), saved with `save_pretrained` beside its tokenizer. "
        f"Federation: {res['nodes']} nodes, natural split of the lm corpus, `--exchange lora` (rank "
        f"{s['lora-rank']}, alpha {s['lora-alpha']:g}, targets {s['lora-targets'] or 'peft default'}), "
        f"{s['optimizer']} learning rate {s['learning-rate']:g} {s['lr-schedule']}, batch {s['batch-size']}, "
        f"{s['rounds']} rounds of at most {s['max-steps']} steps. Flags on top of the lm task's checkpoint "
        f"defaults: `{' '.join(res['extra_flags'])}` (see `LORA_SETTINGS` in the benchmark for why).\n\n"
    )
    table = [
        "| measure | value |",
        "|---|---|",
        f"| full model | {res['full_model_parameters']:,} parameters, {res['full_model_bytes']:,} bytes |",
        f"| signed update per node per round (arrays; file with envelope) | {res['array_bytes_max']:,} bytes; "
        f"{res['file_bytes_max']:,} bytes ({res['updates']} accepted updates) |",
        f"| update / full model | **{res['bytes_fraction']:.2%}** (at most 5%: {_yes(res['small_enough'])}) |",
        f"| held-out perplexity, round 0 (the base) | {res['perplexity_round0']:.3f}"
        + (f" ({res['bpb_round0']:.4f} bits per byte)" if res["bpb_round0"] is not None else "")
        + " |",
        f"| held-out perplexity, round {s['rounds']} | {res['perplexity_final']:.3f}"
        + (f" ({res['bpb_final']:.4f} bits per byte)" if res["bpb_final"] is not None else "")
        + " |",
        f"| perplexity drop | **{res['perplexity_drop']:.1%}** (at least 10%: {_yes(res['better_enough'])}) |",
        f"| `weft simulate` wall (run itself) | {res['weft_simulate_wall_s']:.1f} s ({res['run_wall_s']:.1f} s) |",
    ]
    tail = "\n\n![lora: held-out perplexity per round](figures/central_vs_federated_lora.png)\n"
    return f"```bash\n{command}\n```\n\n" + head + "\n".join(table) + tail


def write_doc_block(doc: Path, part: str, block: str) -> None:
    """Replace the text between this part's markers in `doc`."""
    begin, end = f"<!-- central-vs-federated:{part}:begin -->", f"<!-- central-vs-federated:{part}:end -->"
    text = doc.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{doc} lacks the markers {begin} / {end}; add them where the {part} block belongs")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{block}{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="which comparisons to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="digits seeds (default: 0 1 2)")
    parser.add_argument("--seed", type=int, default=0, help="lm and lora seed (default: 0)")
    parser.add_argument(
        "--lm-data-parallel",
        action="store_true",
        help="lm: also train centrally with batches 4x larger (one node's step count, same tokens)",
    )
    parser.add_argument("--work", type=Path, help="folder for the runs (default: runs/central-vs-federated-<time>)")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "central_vs_federated.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--no-doc", action="store_true", help="print the blocks instead of writing them into --doc")
    args = parser.parse_args(argv)
    # one thread, as each simulated node has: on 2 shared cores more threads only add contention
    torch.set_num_threads(1)
    work = (args.work or ROOT / "runs" / time.strftime("central-vs-federated-%Y%m%d-%H%M%S")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads(args.results.read_text()) if args.results.exists() else {}
    here = machine()
    for part in [p for p in PARTS if p in args.only]:
        started = time.monotonic()
        command = ".venv/bin/python -m benchmarks.central_vs_federated --only " + part
        if part == "digits":
            command += " --seeds " + " ".join(map(str, args.seeds))
            res = bench_digits(args.seeds, work, args.figures)
            block = digits_block
        elif part == "lm":
            command += f" --seed {args.seed}" + (" --lm-data-parallel" if args.lm_data_parallel else "")
            res = bench_lm(args.seed, work, args.figures, args.lm_data_parallel)
            block = lm_block
        else:
            command += f" --seed {args.seed}"
            res = bench_lora(args.seed, work, args.figures)
            block = lora_block
        res["machine"] = here
        res["part_wall_s"] = time.monotonic() - started
        results[part] = res
        text = block(res, command) + f"\nMachine: {here}. This part took {res['part_wall_s']:.0f} s in all.\n"
        print(f"\n{text}", flush=True)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        if not args.no_doc:
            write_doc_block(args.doc, part, text)
    print(f"runs: {_shown(work)}\nresults: {_shown(args.results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
