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
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
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
    if title:
        fig.suptitle(title)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
