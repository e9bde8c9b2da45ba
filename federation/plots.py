"""Plots of a run's record."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_metrics(metrics_jsonl: Path, out_png: Path, title: str = "") -> Path:
    """Accuracy and loss per round (held-out and federated) as a two-panel PNG."""
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "accuracy" in r]
    rounds = [r["round"] for r in rows]
    attacked = any(r.get("rejected") for r in rows)
    fig, axes = plt.subplots(1, 3 if attacked else 2, figsize=(15 if attacked else 10, 4), constrained_layout=True)
    ax_acc, ax_loss = axes[0], axes[1]
    for ax, key, label in ((ax_acc, "accuracy", "accuracy"), (ax_loss, "loss", "loss")):
        held_out = [r.get(key) for r in rows]
        if any(v is not None for v in held_out):
            ax.plot(rounds, held_out, marker="o", ms=3, label=f"held-out test {label}")
        fed = [r.get(f"federated_{key}") for r in rows]
        if any(v is not None for v in fed):
            ax.plot(rounds, fed, marker="s", ms=3, ls="--", label=f"nodes' validation {label} (weighted)")
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if attacked:
        _plot_contributions(axes[2], rows)
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
