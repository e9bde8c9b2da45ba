"""Scale: time per round and peak memory of 100 to 5,000 simulated nodes, 5% sampled per round, against Flower.

Both systems train the built-in `digits` task (64-64-10 MLP, Adam 0.02, 5 local epochs, batch 32) on the
same IID split of its pool (federation/partition.py: a node gets its own examples while the pool allows it,
10 shared ones beyond) through the same Flower 1.42 simulation engine (`flwr.simulation.run_simulation`,
Ray, one CPU per node, so as many nodes run at once as the machine has cores):

- **weft**: `weft simulate` (federation/simulation.py) with `--fraction-train 0.05 --min-train-nodes 2`:
  signed global models, verified signed updates spooled to disk, the ledger, a central evaluation on the
  held-out test set and a federated evaluation by the nodes whose update was accepted, every round.
- **Flower**: the stock `flwr.serverapp.strategy.FedAvg(fraction_train=0.05, fraction_evaluate=0.05,
  min_train_nodes=2, min_evaluate_nodes=2)` with a plain ClientApp that trains the same model on the same
  node data with the same recipe, and the same central evaluation (`evaluate_fn`) each round. The
  federated evaluation asks 5% of the nodes, as many as weft asks (weft asks the ones that trained).

How it is measured. Each (system, N) runs in a fresh process. Time per round: the time between the starts
of two successive rounds (weft: `Observer.round_started`; Flower: `FedAvg.configure_train`), the last round
ending when it is done (weft: `Observer.round_finished`; Flower: `FedAvg.start` returns); round 1 (Ray's
workers importing torch, first data loads) and everything before it (keys, manifest, Ray start-up) are
left out; the table gives the median of the other rounds.
Peak memory: the largest sum, sampled every 0.5 s, of the proportional set size (PSS: a page shared by k
processes counts 1/k in each, so Ray's shared object store and shared libraries count once) of the run's
whole process tree: the driver (coordinator or ServerApp, and Flower's engine), Ray's gcs_server, raylet
and workers (the simulated nodes).

Run `.venv/bin/python -m benchmarks.scale` (N = 100, 1,000, 5,000; about 15 minutes on 2 cores) or
`--quick` (N = 100 and 1,000, fewer rounds; a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.report import ROOT as _ROOT
from benchmarks.report import Check, Section

LAST = _ROOT / "benchmarks" / "results" / "scale.json"
"""The rows of the last run (what `benchmark_section` reads its check from)."""

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
FIGURE = "scale.png"
TASK = "digits"
FRACTION = 0.05
SIZES = (100, 1000, 5000)
QUICK_SIZES = (100, 1000)
ROUNDS, QUICK_ROUNDS = 6, 4
COMMAND = ".venv/bin/python -m benchmarks.scale"


# ---- one run, in its own process -------------------------------------------------------------------------


def _weft(nodes: int, rounds: int, out: Path) -> dict[str, Any]:
    """`weft simulate` of `nodes` nodes; the start time of each round."""
    from coordinator import NullObserver
    from federation.config import SimulationConfig
    from federation.runtime import resolve_run
    from federation.simulation import resolve_partition, simulate

    starts: list[float] = []
    ends: list[float] = []

    class Timer(NullObserver):
        def round_started(self, round: int, nodes: int) -> None:
            starts.append(time.monotonic())

        def round_finished(self, report: Any) -> None:
            ends.append(time.monotonic())

    explicit = {"task": TASK, "rounds": rounds, "fraction-train": FRACTION, "min-train-nodes": 2, "seed": 0}
    _, run = resolve_run(explicit, source="")
    cfg = resolve_partition(SimulationConfig(run=run, nodes=nodes, partition="iid", alpha=None, out_dir=out))
    t0 = time.monotonic()
    result = simulate(cfg, observer=Timer())
    return {"starts": [s - t0 for s in starts], "end": ends[-1] - t0, "accuracy": result.summary.get("final_accuracy")}


def _flower(nodes: int, rounds: int, out: Path) -> dict[str, Any]:
    """Flower's stock FedAvg and a plain ClientApp on the same data; the start time of each round."""
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
    from torch.utils.data import DataLoader

    from federation.simulation import SimulatedNodes, _task, _task_data

    task = _task(TASK, "")
    data = _task_data(TASK, "", 0)
    local = SimulatedNodes(TASK, 0, "iid", None, nodes, "flower", out)
    defaults = dict(task.defaults)
    epochs, lr, batch = int(defaults["local-epochs"]), float(defaults["learning-rate"]), int(defaults["batch-size"])
    starts: list[float] = []
    final: dict[str, float] = {}

    def evaluate(model: torch.nn.Module, dataset: Any) -> tuple[float, float, int]:
        model.eval()
        loss, correct, n = 0.0, 0, 0
        with torch.no_grad():
            for x, y in DataLoader(dataset, batch_size=256):
                out = model(x)
                loss += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
                correct += int((out.argmax(1) == y).sum())
                n += len(y)
        return loss / max(n, 1), correct / max(n, 1), n

    def model_from(msg: Message) -> torch.nn.Module:
        model = task.make_model()
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        return model

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        pid = int(context.node_config["partition-id"])
        train_set, _ = local.local_data(pid)
        model = model_from(msg)
        model.train()
        gen = torch.Generator().manual_seed(pid)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(epochs):
            for x, y in DataLoader(train_set, batch_size=batch, shuffle=True, generator=gen):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        metrics = MetricRecord({"num-examples": len(train_set)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    @client.evaluate()
    def evaluate_local(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        _, val_set = local.local_data(int(context.node_config["partition-id"]))
        loss, acc, n = evaluate(model_from(msg), val_set)
        metrics = MetricRecord({"eval_loss": loss, "eval_accuracy": acc, "num-examples": n})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    class Timed(FedAvg):
        def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Grid) -> Any:
            starts.append(time.monotonic())
            return super().configure_train(server_round, arrays, config, grid)

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = task.make_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc, _ = evaluate(model, data.test)
        final["accuracy"] = acc
        return MetricRecord({"loss": loss, "accuracy": acc})

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = Timed(
            fraction_train=FRACTION, fraction_evaluate=FRACTION, min_train_nodes=2, min_evaluate_nodes=2,
            min_available_nodes=nodes,
        )  # fmt: skip
        torch.manual_seed(0)
        initial = ArrayRecord(task.make_model().state_dict())
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, evaluate_fn=central)
        final["end"] = time.monotonic()

    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)
    np.random.seed(0)
    t0 = time.monotonic()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=nodes,
        backend_config={
            "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
            "init_args": {"log_to_driver": False, "logging_level": "ERROR", "address": "local"},
        },
    )
    return {"starts": [s - t0 for s in starts], "end": final["end"] - t0, "accuracy": final.get("accuracy")}


# ---- the driver: one fresh process per run, its tree's memory sampled -----------------------------------------


def _tree_pss(pid: int) -> int:
    """Sum of the PSS (RSS where PSS cannot be read) of process `pid` and all its descendants, in bytes."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
            total += int(getattr(info, "pss", info.rss))
        except psutil.Error:
            continue
    return total


def measure(system: str, nodes: int, rounds: int) -> dict[str, Any]:
    """Run one (system, N) in a fresh process; its round times and its process tree's peak memory."""
    with tempfile.TemporaryDirectory(prefix=f"weft-scale-{system}-{nodes}-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.scale", "--one", system, "--nodes", str(nodes),
               "--rounds", str(rounds), "--result", str(result_file), "--out", str(Path(tmp) / "run")]  # fmt: skip
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _tree_pss(proc.pid))
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, err = proc.communicate()
        stop.set()
        sampler.join()
        if proc.returncode != 0 or not result_file.exists():
            raise RuntimeError(f"{system} N={nodes} failed (exit {proc.returncode}):\n{err[-3000:]}")
        out = json.loads(result_file.read_text())
    times = [b - a for a, b in zip(out["starts"], [*out["starts"][1:], out["end"]], strict=True)]
    steady = times[1:]
    return {
        "system": system,
        "nodes": nodes,
        "sampled": max(2, round(FRACTION * nodes)),
        "rounds": rounds,
        "round_s": statistics.median(steady),
        "round_s_all": [round(t, 3) for t in times],
        "startup_s": out["starts"][0] if out["starts"] else None,
        "wall_s": time.monotonic() - started,
        "peak_mib": peak / 2**20,
        "load": os.getloadavg()[1],  # the machine's 5-minute load average as the run ended (other work shares it)
        "accuracy": out.get("accuracy"),
    }


def run_all(quick: bool) -> list[dict[str, Any]]:
    sizes, rounds = (QUICK_SIZES, QUICK_ROUNDS) if quick else (SIZES, ROUNDS)
    rows = []
    for nodes in sizes:
        for system in ("weft", "flower"):
            try:
                row = measure(system, nodes, rounds)
            except RuntimeError as exc:  # e.g. Ray's memory monitor killed a worker on a crowded machine
                print(f"{system} N={nodes}: {str(exc).splitlines()[0]}; once more", file=sys.stderr)
                row = measure(system, nodes, rounds)
            print(
                f"{system:6s} N={nodes:5d}: {row['round_s']:.3f} s/round (all: {row['round_s_all']}), "
                f"peak {row['peak_mib']:.0f} MiB, run {row['wall_s']:.0f} s",
                file=sys.stderr,
            )
            rows.append(row)
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for system, marker in (("weft", "o"), ("flower", "s")):
        mine = [r for r in rows if r["system"] == system]
        label = "weft" if system == "weft" else "Flower FedAvg (stock)"
        left.plot([r["nodes"] for r in mine], [r["round_s"] for r in mine], marker=marker, label=label)
        right.plot([r["nodes"] for r in mine], [r["peak_mib"] for r in mine], marker=marker, label=label)
    for ax, title in ((left, "time per round (s, median, round 1 excluded)"), (right, "peak memory (MiB, PSS)")):
        ax.set_xscale("log")
        ax.set_xlabel("simulated nodes (5% sampled per round)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(quick: bool = False) -> str:
    """Run the benchmark; its Markdown section (tables, the command, the plot it writes to docs/figures/)."""
    started = time.monotonic()
    rows = run_all(quick)
    LAST.parent.mkdir(parents=True, exist_ok=True)
    LAST.write_text(json.dumps(rows, indent=1) + "\n")
    figure = FIGURE.replace(".png", "_quick.png") if quick else FIGURE  # a quick run never replaces the full plot
    _plot(rows, FIGURES / figure)
    by = {(r["system"], r["nodes"]): r for r in rows}
    sizes = sorted({r["nodes"] for r in rows})
    lines = [
        "## Scale: 100 to 5,000 simulated nodes, 5% sampled per round",
        "",
        f"Task `{TASK}`, IID split, {rows[0]['rounds']} rounds, one CPU per simulated node, "
        f"{os.cpu_count()} cores; weft against Flower 1.42's stock FedAvg on the same data and engine "
        "(benchmarks/scale.py says exactly what each side does). Time per round: median time between the starts "
        "of successive rounds, round 1 and start-up excluded. Peak memory: the run's whole process tree "
        "(driver, Ray's services and workers), proportional set size, sampled every 0.5 s.",
        "",
        "| nodes | asked per round | weft s/round | Flower s/round | weft / Flower | weft peak MiB | Flower peak MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        w, f = by[("weft", n)], by[("flower", n)]
        lines.append(
            f"| {n:,} | {w['sampled']} | {w['round_s']:.3f} | {f['round_s']:.3f} | {w['round_s'] / f['round_s']:.2f}x "
            f"| {w['peak_mib']:.0f} | {f['peak_mib']:.0f} |"
        )
    lines += [
        "",
        "| run | every round's time (s), round 1 first | start-up before round 1 (s) | whole run (s) | load |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']} N={r['nodes']:,} | {', '.join(f'{t:.2f}' for t in r['round_s_all'])} "
            f"| {r['startup_s']:.1f} | {r['wall_s']:.0f} | {r['load']:.1f} |"
        )
    lines += [
        "",
        "Load: the machine's 5-minute load average when the run ended; above the core count, other processes "
        "shared the CPUs and the times are noisier.",
        "",
        f"![time per round and peak memory against N](figures/{figure})",
        "",
        f"Reproduce: `{COMMAND}{' --quick' if quick else ''}` (N = {', '.join(f'{n:,}' for n in sizes)}; "
        f"this took {time.monotonic() - started:.0f} s).",
        "",
    ]
    return "\n".join(lines)


def benchmark_section(quick: bool = False) -> Section:
    """What `python -m benchmarks` runs: `section`, and the issue's target at N = 1,000."""
    text = section(quick)
    rows = json.loads(LAST.read_text()) if LAST.exists() else []
    by = {(r["system"], r["nodes"]): r for r in rows}
    checks = []
    if ("weft", 1000) in by and ("flower", 1000) in by:
        ratio = by[("weft", 1000)]["round_s"] / by[("flower", 1000)]["round_s"]
        checks.append(Check("1,000-node simulation, 5% sampled: time per round <= 1.0x Flower's stock FedAvg",
                            f"{ratio:.2f}x", ratio <= 1.0))  # fmt: skip
    return Section(text, tuple(checks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="N = 100 and 1,000 only, fewer rounds")
    parser.add_argument("--one", choices=("weft", "flower"), help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=QUICK_ROUNDS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # a child: one run, its result as JSON
        run = _weft if args.one == "weft" else _flower
        result = run(args.nodes, args.rounds, args.out)
        args.result.write_text(json.dumps(result))
        os._exit(0)  # Flower's and Ray's threads may hold the interpreter; the result is written
    print(section(quick=args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
