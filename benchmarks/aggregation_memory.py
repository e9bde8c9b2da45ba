"""Coordinator memory while aggregating N updates: weft's fold-from-spool vs Flower's stock FedAvg.

Baseline: Flower's `FedAvg` receives every reply at once (`Grid.send_and_receive`) and averages them
with `strategy_utils.aggregate_arrayrecords`, so all N replies are in memory together.
weft: each reply is verified (digest), spooled to disk and dropped; the aggregate is folded from the
spool one update at a time (coordinator/rounds.py).

Each case runs in a fresh subprocess; peak memory is tracemalloc's peak (numpy reports its buffers
to tracemalloc). Run:  .venv/bin/python benchmarks/aggregation_memory.py [--params 1000000] [--nodes 10 40]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def _reply(i: int, params: int):  # -> RecordDict
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    rng = np.random.default_rng(i)
    arrays = {"w": rng.standard_normal(params, dtype=np.float32)}
    return RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": 10 + i}),
        }
    )


def baseline(nodes: int, params: int) -> None:
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    replies = [_reply(i, params) for i in range(nodes)]
    aggregate_arrayrecords(replies, "num-examples")


def weft(nodes: int, params: int) -> None:
    from coordinator.aggregate import FedAvg
    from coordinator.arrays import from_record
    from coordinator.spool import UpdateSpool
    from protocols import params_digest, structure

    with tempfile.TemporaryDirectory() as tmp:
        spool = UpdateSpool(Path(tmp))
        template = None
        for i in range(nodes):
            reply = _reply(i, params)
            arrays = from_record(reply["arrays"])
            template = template or structure(arrays)
            spool.put(f"{i:016x}", params_digest(arrays), 10 + i, arrays)
            del reply, arrays
        agg = FedAvg()
        agg.begin(template)
        for entry in spool.in_order():
            agg.fold(entry.load(), entry.weight)
        agg.finish()


def _measure(case: str, nodes: int, params: int) -> dict[str, float]:
    tracemalloc.start()
    t0 = time.perf_counter()
    {"baseline": baseline, "weft": weft}[case](nodes, params)
    wall = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    return {"peak_mib": peak / 2**20, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=int, default=1_000_000, help="float32 parameters per model")
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, nodes, params = args.child
        print(json.dumps(_measure(case, int(nodes), int(params))))
        return
    model_mib = args.params * 4 / 2**20
    print(f"model: {args.params:,} float32 parameters = {model_mib:.1f} MiB")
    header = ("nodes", "flower peak MiB", "weft peak MiB", "weft/flower", "flower s", "weft s")
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, (5, 15, 13, 11, 8, 6), strict=True)))
    for nodes in args.nodes:
        res = {}
        for case in ("baseline", "weft"):
            cmd = [sys.executable, __file__, "--child", case, str(nodes), str(args.params)]
            res[case] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        b, w = res["baseline"], res["weft"]
        print(
            f"{nodes:>5}  {b['peak_mib']:>15.1f}  {w['peak_mib']:>13.1f}  {w['peak_mib'] / b['peak_mib']:>11.3f}"
            f"  {b['wall_s']:>8.2f}  {w['wall_s']:>6.2f}"
        )


if __name__ == "__main__":
    main()
