"""Plots of a run's record: one panel per held-out metric, contributions, personalization."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

BOOKKEEPING = frozenset(
    {"round", "manifest_version", "nodes", "accepted", "rejected", "missing", "duration_s", "contributions",
     "rejections", "rejected_by_reason", "global_model_digest", "status", "error", "phase"}
)  # fmt: skip
"""Keys of a metrics.jsonl line that are not metrics."""
ORDER = ("loss", "accuracy", "perplexity", "bits_per_byte")


def run_title(run: Mapping[str, Any], sim: Mapping[str, Any] | None = None) -> str:
    """The run's key settings in one line (plot titles, the CLI's first line)."""
    parts = [f"task {run['task']}"]
    if sim:
        split = sim["partition"] + (f"(alpha={sim['alpha']})" if sim.get("alpha") is not None else "")
        parts.append(f"{sim['nodes']} nodes {split}")
    parts.append(f"{run['rounds']} rounds x {run['local-epochs']} ep")
    if run.get("max-steps"):
        parts.append(f"<= {run['max-steps']} steps")
    lr = f"lr {run['learning-rate']:g}" + (f" {run['lr-schedule']}" if run.get("lr-schedule") != "constant" else "")
    parts.append(f"{run['optimizer']} {lr}")
    if run.get("exchange") != "all":
        parts.append(f"exchange {run['exchange']}" + (f" r={run['lora-rank']}" if run["exchange"] == "lora" else ""))
    parts.append(f"seed {run['seed']}")
    return ", ".join(parts)


def metric_names(rows: list[dict[str, Any]]) -> list[str]:
    """Held-out metric names found in round lines, in a readable order."""
    found = {
        k for r in rows for k, v in r.items()
        if k not in BOOKKEEPING and not k.startswith("federated_") and isinstance(v, int | float)
    }  # fmt: skip
    return [m for m in ORDER if m in found] + sorted(found - set(ORDER))


def plot_metrics(metrics_jsonl: Path, out_png: Path, title: str = "") -> Path:
    """Each held-out metric per round (with the nodes' weighted validation figure beside it) as a PNG."""
    lines = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    rows = [r for r in lines if "round" in r and "status" not in r and "phase" not in r]
    personal = next((r for r in lines if r.get("phase") == "personalization"), None)
    names = metric_names(rows) or ["loss"]
    attacked = any(r.get("rejected") for r in rows)
    panels = len(names) + int(attacked) + int(personal is not None)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), constrained_layout=True, squeeze=False)
    rounds = [r["round"] for r in rows]
    for ax, key in zip(axes[0], names, strict=False):
        held_out = [r.get(key) for r in rows]
        if any(v is not None for v in held_out):
            ax.plot(rounds, held_out, marker="o", ms=3, label=f"held-out test {key}")
        fed = [r.get(f"federated_{key}") for r in rows]
        if any(v is not None for v in fed):
            ax.plot(rounds, fed, marker="s", ms=3, ls="--", label=f"nodes' validation {key} (weighted)")
        ax.set_xlabel("round")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    extra = list(axes[0][len(names) :])
    if attacked:
        _plot_contributions(extra.pop(0), rows)
    if personal is not None:
        _plot_personalization(extra.pop(0), personal["nodes"], names[0])
    if title:
        fig.suptitle(title)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def _plot_contributions(ax: plt.Axes, rows: list[dict]) -> None:
    """Accepted updates and rejections (stacked by reason) per round."""
    rounds = [r["round"] for r in rows]
    ax.bar(rounds, [r["accepted"] for r in rows], color="tab:green", label="accepted")
    bottom = [r["accepted"] for r in rows]
    reasons = sorted({reason for r in rows for reason in r.get("rejected_by_reason", {})})
    palette = [f"C{i}" for i in (0, 1, 3, 4, 5, 6, 7, 8, 9)]  # C2 (green) means accepted
    for reason, color in zip(reasons, palette * 2, strict=False):
        counts = [r.get("rejected_by_reason", {}).get(reason, 0) for r in rows]
        ax.bar(rounds, counts, bottom=bottom, color=color, label=f"rejected: {reason}")
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set_xlabel("round")
    ax.set_ylabel("replies")
    ax.set_title("contributions per round")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _plot_personalization(ax: plt.Axes, nodes: list[dict], metric: str) -> None:
    """Each node's local validation `metric` on the shared model and on its personalized one."""
    key = metric if any(metric in n["before"] for n in nodes) else "loss"
    xs = range(len(nodes))
    ax.bar([x - 0.2 for x in xs], [n["before"].get(key, 0.0) for n in nodes], width=0.4, label="shared model")
    ax.bar([x + 0.2 for x in xs], [n["after"].get(key, 0.0) for n in nodes], width=0.4, label="personalized")
    ax.set_xticks(list(xs), [n["member"][:6] for n in nodes], rotation=45, fontsize="small")
    ax.set_ylabel(f"local validation {key}")
    ax.set_title("N+1: each partner's own model")
    ax.legend(fontsize="small")
