"""Robust aggregation against validly signed poison: final accuracy per rule, clean and under attack.

On the built-in digits task (Dirichlet alpha 0.5 label skew, 10 nodes in total), each aggregation rule
(FedAvg, coordinate-wise median, trimmed mean, multi-Krum) is run three times with the real `weft simulate`:

- **clean**: `--nodes 10`, no adversary;
- **signflip**: `--nodes 8 --adversary signflip=2`: two of the ten members send `global - (trained - global)`;
- **scale**: `--nodes 8 --adversary scale=2`: two of the ten send `global + 100 * (trained - global)`.

The adversaries are members of the manifest and sign their poison with their own keys, so verification
accepts it; only the aggregation rule stands between them and the model (federation/adversary.py). They
train on copies of honest partitions (nodes 0 and 1), so the honest data is the whole pool in every run.

Acceptance (the issue's): under each attack, the median, the trimmed mean and Krum each end within 3 points
of the clean FedAvg run's final accuracy, while FedAvg's damage is shown beside them. Each robust rule is
also compared with its own clean run (the cost of the attack to that rule, apart from the rule's own cost on
non-IID data).

Run (from the repository root):
    .venv/bin/python -m benchmarks.robust_aggregation [--seed 0] [--rounds 10] [--no-doc]

It writes docs/figures/robust_aggregation.png, benchmarks/results/robust_aggregation.json and the section
of docs/BENCHMARKS.md between the robust-aggregation markers (`--no-doc` only prints it). Every number it
writes comes from the runs of that one command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from benchmarks.central_vs_federated import FederatedRun, machine, weft_simulate

ROOT = Path(__file__).resolve().parent.parent
TOTAL_NODES, ATTACKERS, ALPHA = 10, 2, 0.5
MAX_DROP_POINTS = 3.0
RULES = ("fedavg", "median", "trimmed-mean", "krum")
ROBUST = ("median", "trimmed-mean", "krum")
ATTACKS = ("clean", "signflip", "scale")
BEGIN, END = "<!-- robust-aggregation:begin -->", "<!-- robust-aggregation:end -->"
SECTION_BEFORE = "## Not measured yet"
"""The section goes right before this heading of docs/BENCHMARKS.md (at the end when it is absent)."""

DEFAULT_TRIM = 0.2
"""Trimmed mean: with 10 updates, floor(0.2 x 10) = 2 values dropped at each end of every coordinate,
exactly the number of attackers (weft's default)."""
DEFAULT_KRUM_F = 2
"""Krum: the number of Byzantine updates tolerated, the true number of attackers (weft's default)."""
DEFAULT_KRUM_M = TOTAL_NODES - DEFAULT_KRUM_F
"""Multi-Krum averages the m = n - f best-scored updates (the usual choice; Blanchard et al.). Plain Krum
(m = 1) keeps a single node's update per round, which on a label-skewed split is one node's few classes."""


@dataclass(frozen=True)
class Settings:
    """What one invocation runs: the shared flags and each rule's parameters."""

    seed: int
    rounds: int
    trim: float
    krum_f: int
    krum_m: int

    def rule_flags(self, rule: str) -> list[str]:
        """`weft simulate` flags selecting `rule` with its parameters."""
        flags = ["--aggregation", rule]
        if rule == "trimmed-mean":
            flags += ["--trim", f"{self.trim:g}"]
        elif rule == "krum":
            flags += ["--krum-f", str(self.krum_f), "--krum-m", str(self.krum_m)]
        return flags

    def flags(self, rule: str, attack: str) -> list[str]:
        """The whole `weft simulate` command line (less `--out`) of one (rule, attack) run."""
        shared = ["--task", "digits", "--partition", "dirichlet", "--alpha", f"{ALPHA:g}"]
        shared += ["--rounds", str(self.rounds), "--seed", str(self.seed)]
        if attack == "clean":
            nodes = ["--nodes", str(TOTAL_NODES)]
        else:
            nodes = ["--nodes", str(TOTAL_NODES - ATTACKERS), "--adversary", f"{attack}={ATTACKERS}"]
        return [*shared, *nodes, *self.rule_flags(rule)]

    def label(self, rule: str) -> str:
        """The rule with its parameters, as the table and plot name it."""
        if rule == "trimmed-mean":
            return f"trimmed mean (trim {self.trim:g})"
        if rule == "krum":
            kind = "Krum" if self.krum_m == 1 else "multi-Krum"
            return f"{kind} (f {self.krum_f}, m {self.krum_m})"
        return {"fedavg": "FedAvg", "median": "median"}[rule]


# ---- the runs -------------------------------------------------------------------------------------------


def adversary_selection(out: Path) -> dict[str, Any]:
    """From the run's signed ledger: the adversaries' accepted and selected updates and their policy shares.

    Members are named in manifest.json (`adversary-NNN-<kind>`); each round's ledger entry lists every
    contribution with `selected` (Krum's choice; True for the rules that use every update) and its policy
    `share` (FedAvg's weight; the median and the trimmed mean ignore shares). `adversary_share` is the
    adversaries' summed share per round, averaged over rounds.
    """
    names = {m["member_id"]: m["name"] for m in json.loads((out / "manifest.json").read_text())["members"]}
    accepted = selected = honest_dropped = 0
    shares: list[float] = []
    for line in (out / "ledger.jsonl").read_text().splitlines():
        body = json.loads(line)["body"] if line.strip() else {}
        if body.get("kind") != "round":
            continue
        share = 0.0
        for c in body["contributions"]:
            bad = names.get(c["member"], "").startswith("adversary-")
            accepted += bad
            selected += bool(bad and c["selected"])
            honest_dropped += bool(not bad and not c["selected"])
            share += float(c["share"]) if bad else 0.0
        shares.append(share)
    return {
        "adversary_accepted": accepted,
        "adversary_selected": selected,
        "honest_dropped": honest_dropped,
        "adversary_share": sum(shares) / len(shares) if shares else 0.0,
    }


def run_one(settings: Settings, rule: str, attack: str, work: Path, reuse: bool) -> dict[str, Any]:
    """One `weft simulate` run (or, with `reuse`, its earlier record in `work` when the settings match)."""
    flags = settings.flags(rule, attack)
    out = work / f"{attack}-{rule}"
    earlier = _earlier(out) if reuse else None
    reused = earlier is not None and earlier["flags"] == flags
    if earlier is not None and reused:
        print(f"\nreusing {out} ({' '.join(flags)})", file=sys.stderr, flush=True)
        run = _load(out, flags, earlier)
    else:
        run = weft_simulate(flags, out)
        meta = {"flags": flags, "weft_simulate_wall_s": run.wall_s}
        (out / "benchmark-run.json").write_text(json.dumps(meta) + "\n")
    summary = run.summary
    if summary.get("status") != "completed" or int(summary["rounds"]) != settings.rounds:
        raise SystemExit(f"{out}: the run did not complete {settings.rounds} rounds: {summary.get('status')}")
    _check_recorded(run, settings, rule, attack)
    curve = run.curve("accuracy")
    best = int(np.argmax(curve))
    return {
        "rule": rule,
        "attack": attack,
        "label": settings.label(rule),
        "command": "weft simulate " + " ".join(flags),
        "final_accuracy": float(summary["final_accuracy"]),
        "best": {"round": best + 1, "accuracy": curve[best]},
        "curve": curve,
        "recorded_rule": summary["rule"],
        "accepted": int(summary["accepted"]),
        "rejected": int(summary["rejected"]),
        **adversary_selection(out),
        "weft_simulate_wall_s": run.wall_s if np.isfinite(run.wall_s) else None,
        "run_wall_s": float(summary["wall_s"]),
        "reused": reused,
        "run_dir": _shown(out),
    }


def _check_recorded(run: FederatedRun, settings: Settings, rule: str, attack: str) -> None:
    """The run's own record (summary.json, its ledger's rule) must say it ran what was asked."""
    config = run.summary["config"]
    want: dict[str, Any] = {
        "task": "digits",
        "partition": "dirichlet",
        "alpha": ALPHA,
        "rounds": settings.rounds,
        "seed": settings.seed,
        "aggregation": rule,
        "nodes": TOTAL_NODES if attack == "clean" else TOTAL_NODES - ATTACKERS,
        "adversaries": {} if attack == "clean" else {attack: ATTACKERS},
    }
    rule_want: dict[str, Any] = {"rule": rule}
    if rule == "trimmed-mean":
        rule_want["trim"] = settings.trim
    elif rule == "krum":
        rule_want |= {"f": settings.krum_f, "m": settings.krum_m}
    got = {k: config.get(k) for k in want}
    if got != want or run.summary["rule"] != rule_want:
        raise SystemExit(f"{run.out}: recorded {got}, rule {run.summary['rule']}; expected {want}, rule {rule_want}")


def _earlier(out: Path) -> dict[str, Any] | None:
    """What this benchmark recorded of a completed earlier run in `out`: its flags and its command's wall time.

    The first version of this file wrote only the list of flags (benchmark-flags.json); its wall time is unknown.
    """
    if not (out / "summary.json").exists():
        return None
    meta, legacy = out / "benchmark-run.json", out / "benchmark-flags.json"
    if meta.exists():
        return dict(json.loads(meta.read_text()))
    if legacy.exists():
        return {"flags": json.loads(legacy.read_text()), "weft_simulate_wall_s": None}
    return None


def _load(out: Path, flags: Sequence[str], earlier: Mapping[str, Any]) -> FederatedRun:
    """The record of an earlier run, read as `weft_simulate` reads a fresh one."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in lines if "round" in r and "status" not in r and "phase" not in r]
    summary = json.loads((out / "summary.json").read_text())
    wall = earlier.get("weft_simulate_wall_s")
    return FederatedRun(out, ["weft", "simulate", *flags], float("nan") if wall is None else wall, summary, rows)


def _shown(path: Path) -> str:
    """`path` relative to the repository when it lies inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def judge(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Differences in points to the clean FedAvg run and to each rule's own clean run; the 3-point verdicts."""
    by = {(r["rule"], r["attack"]): r for r in rows}
    reference = by[("fedavg", "clean")]["final_accuracy"]
    verdicts: dict[str, dict[str, bool]] = {}
    for r in rows:
        own = by.get((r["rule"], "clean"))
        r["vs_clean_fedavg_points"] = 100 * (r["final_accuracy"] - reference)
        r["vs_own_clean_points"] = None if own is None else 100 * (r["final_accuracy"] - own["final_accuracy"])
        r["within_3_of_clean_fedavg"] = r["vs_clean_fedavg_points"] >= -MAX_DROP_POINTS
        r["within_3_of_own_clean"] = None if own is None else r["vs_own_clean_points"] >= -MAX_DROP_POINTS
        if r["rule"] in ROBUST and r["attack"] != "clean":
            verdicts.setdefault(r["rule"], {})[r["attack"]] = r["within_3_of_clean_fedavg"]
    return {
        "clean_fedavg_final_accuracy": reference,
        "threshold_accuracy": reference - MAX_DROP_POINTS / 100,
        "verdicts": verdicts,
        "all_pass": all(ok for v in verdicts.values() for ok in v.values()),
    }


# ---- the figure -----------------------------------------------------------------------------------------


def plot(res: Mapping[str, Any], path: Path) -> None:
    """Grouped bars of final accuracy (x: rule; bars: clean / signflip / scale) beside the per-round curves."""
    rows, s = res["rows"], res["settings"]
    by = {(r["rule"], r["attack"]): r for r in rows}
    rules = [r for r in RULES if any((r, a) in by for a in ATTACKS)]
    attacks = [a for a in ATTACKS if any((r, a) in by for r in rules)]
    names = {"clean": "clean (10 honest)", "signflip": "2 of 10 sign-flip", "scale": "2 of 10 scale x100"}
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True, width_ratios=(1.15, 1))
    width = 0.8 / len(attacks)
    for j, attack in enumerate(attacks):
        xs = [i + (j - (len(attacks) - 1) / 2) * width for i in range(len(rules))]
        ys = [by[(r, attack)]["final_accuracy"] if (r, attack) in by else np.nan for r in rules]
        drawn = bars.bar(xs, ys, width, label=names[attack], color=f"C{j}")
        bars.bar_label(drawn, labels=[f"{y:.3f}" for y in ys], fontsize=7, padding=1)
    line = res["judgement"]["threshold_accuracy"]
    bars.axhline(line, color="k", ls="--", lw=1, label=f"clean FedAvg - {MAX_DROP_POINTS:g} points ({line:.3f})")
    bars.set_xticks(range(len(rules)), [res["labels"][r] for r in rules], fontsize=8)
    bars.set_ylim(0, 1.3)
    bars.set_yticks(np.linspace(0, 1, 6))
    bars.set_ylabel("final held-out test accuracy")
    bars.set_title("final accuracy per rule", fontsize=10)
    bars.legend(fontsize=8, loc="upper center", ncol=2)
    bars.grid(axis="y", alpha=0.3)
    styles = {"clean": "-", "signflip": "--", "scale": ":"}
    for i, rule in enumerate(rules):
        for attack in attacks:
            if (rule, attack) in by:
                curve = by[(rule, attack)]["curve"]
                curves.plot(
                    range(1, len(curve) + 1),
                    curve,
                    color=f"C{i + 3}",
                    ls=styles[attack],
                    marker="o",
                    ms=2,
                    lw=1.2,
                    label=f"{rule}, {attack}",
                )
    curves.axhline(line, color="k", ls="--", lw=0.8)
    curves.set_ylim(0, 1.02)
    curves.set_xlabel("round")
    curves.set_ylabel("held-out test accuracy")
    curves.set_title("accuracy per round (line style: attack)", fontsize=10)
    curves.legend(fontsize=7, ncol=2, loc="lower right")
    curves.grid(alpha=0.3)
    fig.suptitle(
        f"digits, {TOTAL_NODES} nodes (Dirichlet alpha {ALPHA:g}), {s['rounds']} rounds x {s['local-epochs']} "
        f"local epochs, seed {s['seed']}: {ATTACKERS} of {TOTAL_NODES} members send validly signed poison",
        fontsize=11,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the report -----------------------------------------------------------------------------------------


def _yes(ok: bool | None) -> str:
    return "" if ok is None else ("yes" if ok else "**NO**")


def _points(value: float | None) -> str:
    return "" if value is None else f"{value:+.2f}"


def section(res: Mapping[str, Any], command: str) -> str:
    """The whole BENCHMARKS.md section (heading included), generated from one invocation's results."""
    s, j, rows = res["settings"], res["judgement"], res["rows"]
    paragraphs = [
        "Can a compromised member that signs its poison properly wreck the model, and does the aggregation rule "
        f"stop it? {ATTACKERS} of {TOTAL_NODES} members send harmful updates under their own valid keys: "
        "verification accepts them (they are members, and the bytes match the signatures), so only the rule "
        "(`--aggregation`) stands between them and the model. Everything in this section is written by "
        "`benchmarks/robust_aggregation.py` from the runs of the command above. Raw numbers, curves and run "
        "folders are in `benchmarks/results/robust_aggregation.json`.",
        f"- **Runs:** the real `weft simulate` on digits, {TOTAL_NODES} members, Dirichlet(α={ALPHA:g}) label "
        f"skew, {s['rounds']} rounds of {s['local-epochs']} local epochs ({s['optimizer']}, learning rate "
        f"{s['learning-rate']:g}), seed {s['seed']}. Each run's recorded settings and its ledger's rule are "
        "checked against what was asked.",
        f"- **Attacks:** clean is `--nodes {TOTAL_NODES}`. Attacked is `--nodes {TOTAL_NODES - ATTACKERS} "
        f"--adversary signflip={ATTACKERS}` (each sends `global - (trained - global)`) or `--adversary "
        f"scale={ATTACKERS}` (each sends `global + 100 * (trained - global)`). The adversaries first train "
        "honestly on copies of nodes 0 and 1's partitions, so the honest nodes hold the whole pool in every run.",
        f"- **Rules:** FedAvg (weighted by example count); coordinate-wise median; trimmed mean with trim "
        f"{s['trim']:g} (floor({s['trim']:g} × {TOTAL_NODES}) = {math.floor(s['trim'] * TOTAL_NODES)} values "
        f"dropped at each end of every coordinate); Krum with f = {s['krum_f']}, m = {s['krum_m']}"
        f"{_krum_note(s)}.",
        f"- **Acceptance:** under each attack, each robust rule's final accuracy is within {MAX_DROP_POINTS:g} "
        f"points of the clean FedAvg run ({j['clean_fedavg_final_accuracy']:.4f}, so at least "
        f'{j["threshold_accuracy"]:.4f}). "Own clean" compares a rule with its own clean run: what the attack '
        "cost that rule, apart from what the rule itself costs on skewed data without any attack.",
    ]
    wrapped = [
        textwrap.fill(p, width=110, subsequent_indent="  " if p.startswith("- ") else "", break_on_hyphens=False)
        for p in paragraphs
    ]
    intro = (
        f"## Robust aggregation under validly signed poison\n\n```bash\n{command}\n```\n\n"
        + wrapped[0]
        + "\n\n"
        + "\n".join(wrapped[1:])
        + "\n\n"
    )
    table = [
        "| rule | run | final accuracy | vs clean FedAvg (points) | within 3 | vs own clean (points) | "
        "best (round) | adversary updates aggregated | `weft simulate` wall (run itself) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["attack"] == "clean":
            bad = "none sent"
        elif r["rule"] == "krum":
            bad = (
                f"{r['adversary_selected']} of {r['adversary_accepted']} (Krum's selection; "
                f"{r['honest_dropped']} honest left out)"
            )
        elif r["rule"] == "fedavg":
            bad = f"all {r['adversary_accepted']} ({r['adversary_share']:.1%} of the weight)"
        else:
            bad = f"all {r['adversary_accepted']} (every update enters the rule; shares ignored)"
        wall = "?" if r["weft_simulate_wall_s"] is None else f"{r['weft_simulate_wall_s']:.0f} s"
        robust_attacked = r["rule"] in ROBUST and r["attack"] != "clean"
        table.append(
            f"| {r['label']} | {r['attack']} | {r['final_accuracy']:.4f} | {_points(r['vs_clean_fedavg_points'])} | "
            f"{_yes(r['within_3_of_clean_fedavg']) if robust_attacked else ''} | "
            f"{_points(r['vs_own_clean_points']) if r['attack'] != 'clean' else ''} | "
            f"{r['best']['accuracy']:.4f} ({r['best']['round']}) | {bad} | {wall} ({r['run_wall_s']:.0f} s) |"
        )
    lines = []
    for rule, per in j["verdicts"].items():
        got = ", ".join(f"{a}: {'PASS' if ok else '**FAIL**'}" for a, ok in per.items())
        lines.append(f"- {res['labels'][rule]}: {got}")
    by = {(r["rule"], r["attack"]): r for r in rows}
    damage = [
        f"{a} {by[('fedavg', a)]['final_accuracy']:.4f} ({_points(by[('fedavg', a)]['vs_clean_fedavg_points'])})"
        for a in ATTACKS[1:]
        if ("fedavg", a) in by
    ]
    tail = (
        "\n\nWithin 3 points of clean FedAvg, per robust rule and attack:\n\n"
        + "\n".join(lines)
        + "\n\n"
        + textwrap.fill(
            f"FedAvg under attack: {'; '.join(damage)} points. One test image is "
            f"{100 / res['test_images']:.2f} points. {_fedavg_note(by)}",
            width=110,
            break_on_hyphens=False,
        )
        + "\n\n"
        "![digits: final accuracy per aggregation rule, clean and with 2 of 10 members sending sign-flipped or "
        "x100-scaled updates, beside accuracy per round](figures/robust_aggregation.png)\n\n"
        f"Machine: {res['machine']}. The {len(rows)} `weft simulate` commands took {res['runs_wall_s']:.0f} s "
        "in all.\n"
    )
    return intro + "\n".join(table) + tail


def _fedavg_note(by: Mapping[tuple[str, str], Mapping[str, Any]]) -> str:
    """Why FedAvg suffers as much as it does: the adversaries' weight in its aggregate."""
    notes = []
    flip = by.get(("fedavg", "signflip"))
    if flip is not None:
        w = flip["adversary_share"]
        notes.append(
            f"Under sign-flip the two adversaries carry {w:.1%} of FedAvg's weight (the example counts of the "
            "partitions they copy), so to first order (when their steps resemble the honest average) the "
            f"aggregate keeps 1 - 2 x {w:.3f} = {1 - 2 * w:.2f} of a clean step: FedAvg slows down rather than "
            "reverses."
        )
    scale = by.get(("fedavg", "scale"))
    if scale is not None:
        w = scale["adversary_share"]
        notes.append(
            f"Under x100 scaling the same {w:.1%} of the weight makes the aggregate's step about "
            f"{1 - w + 100 * w:.0f} times a clean one; accuracy after each round: "
            f"{', '.join(f'{a:.2f}' for a in scale['curve'])}."
        )
    return " ".join(notes)


def _krum_note(s: Mapping[str, Any]) -> str:
    if s["krum_m"] == 1:
        return " (plain Krum: one update per round)"
    return (
        f" (multi-Krum: the {s['krum_m']} best-scored updates are averaged by example count; plain Krum, m = 1, "
        "keeps one node's update per round, i.e. one node's few classes on this skewed split)"
    )


def write_section(doc: Path, text: str) -> None:
    """Replace the text between the markers in `doc`; add the markers before `SECTION_BEFORE` the first time."""
    current = doc.read_text()
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
    elif SECTION_BEFORE in current:
        head, tail = current.split(SECTION_BEFORE, 1)
        tail = f"\n\n{SECTION_BEFORE}{tail}"
    else:
        head, tail = current.rstrip("\n") + "\n\n", "\n"
    doc.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of every run (default: 10, as in the issue)")
    parser.add_argument("--trim", type=float, default=DEFAULT_TRIM, help=f"trimmed mean (default: {DEFAULT_TRIM:g})")
    parser.add_argument("--krum-f", type=int, default=DEFAULT_KRUM_F, help=f"Krum f (default: {DEFAULT_KRUM_F})")
    parser.add_argument("--krum-m", type=int, default=DEFAULT_KRUM_M, help=f"Krum m (default: {DEFAULT_KRUM_M})")
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--work", type=Path, help="folder for the runs (default: runs/robust-aggregation-<time>)")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse runs already in --work that were started with the same flags"
    )
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "robust_aggregation.png")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "robust_aggregation.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--no-doc", action="store_true", help="print the section instead of writing it into --doc")
    args = parser.parse_args(argv)
    if "clean" not in args.attacks or "fedavg" not in args.rules:
        parser.error("the clean FedAvg run is the reference: keep 'clean' in --attacks and 'fedavg' in --rules")
    settings = Settings(args.seed, args.rounds, args.trim, args.krum_f, args.krum_m)
    work = (args.work or ROOT / "runs" / time.strftime("robust-aggregation-%Y%m%d-%H%M%S")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rows = []
    for attack in [a for a in ATTACKS if a in args.attacks]:
        for rule in [r for r in RULES if r in args.rules]:
            row = run_one(settings, rule, attack, work, args.reuse)
            rows.append(row)
            print(f"  {attack:8s} {rule:12s} final accuracy {row['final_accuracy']:.4f}", file=sys.stderr, flush=True)
    first = json.loads((ROOT / rows[0]["run_dir"] / "summary.json").read_text())
    recorded = first["config"]
    res: dict[str, Any] = {
        "settings": {
            "seed": args.seed,
            "rounds": args.rounds,
            "trim": args.trim,
            "krum_f": args.krum_f,
            "krum_m": args.krum_m,
            "total_nodes": TOTAL_NODES,
            "attackers": ATTACKERS,
            "alpha": ALPHA,
            "scale_factor": 100.0,
            **{k: recorded[k] for k in ("optimizer", "learning-rate", "local-epochs", "batch-size", "weighting")},
        },
        "labels": {rule: settings.label(rule) for rule in RULES},
        "test_images": _test_images(first["accuracy_measured_on"]),
        "accuracy_measured_on": first["accuracy_measured_on"],
        "rows": rows,
        "machine": machine(),
        "wall_s": time.monotonic() - started,
        "runs_wall_s": sum(r["weft_simulate_wall_s"] or 0.0 for r in rows),
    }
    res["judgement"] = judge(rows)
    command = ".venv/bin/python -m benchmarks.robust_aggregation" + _nondefault(args)
    res["command"] = command
    plot(res, args.figure)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    text = section(res, command)
    print(f"\n{text}", flush=True)
    if not args.no_doc:
        write_section(args.doc, text)
    print(f"runs: {_shown(work)}\nresults: {_shown(args.results)}\nfigure: {_shown(args.figure)}", file=sys.stderr)
    return 0 if res["judgement"]["all_pass"] else 1


def _test_images(described: str) -> int:
    """The held-out test size from summary.json's `accuracy_measured_on` ("... split: 359 images ...")."""
    found = re.search(r"(\d+) images", described)
    if found is None:
        raise SystemExit(f"cannot read the test size from {described!r}")
    return int(found.group(1))


def _nondefault(args: argparse.Namespace) -> str:
    """The command-line options of this invocation that change what is measured."""
    out = f" --seed {args.seed} --rounds {args.rounds}"
    if args.trim != DEFAULT_TRIM:
        out += f" --trim {args.trim:g}"
    if args.krum_f != DEFAULT_KRUM_F:
        out += f" --krum-f {args.krum_f}"
    if args.krum_m != DEFAULT_KRUM_M:
        out += f" --krum-m {args.krum_m}"
    if list(args.rules) != list(RULES):
        out += " --rules " + " ".join(args.rules)
    if list(args.attacks) != list(ATTACKS):
        out += " --attacks " + " ".join(args.attacks)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
