"""A stock ServerApp: each round, send the model to every node, collect the replies, average them.

The model has the same arrays as benchmarks/exchange_task.py's (`bulk`, `head.weight`, `head.bias`;
`params` float32 values in all). Aggregation is FedAvg's own (`aggregate_arrayrecords`, weighted by
`num-examples`). Each round's wall time, from sending to the averaged model, is written to
`out-dir/rounds.json` after every round.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

FEATURES, CLASSES = 8, 3
HEAD = FEATURES * CLASSES + CLASSES

app = ServerApp()


def initial_arrays(params: int) -> ArrayRecord:
    """Zeros for `bulk`, a seeded head: the same shapes as the weft task's model."""
    rng = np.random.default_rng(0)
    arrays = {
        "bulk": np.zeros(params - HEAD, dtype=np.float32),
        "head.weight": (rng.standard_normal((CLASSES, FEATURES)) * 0.1).astype(np.float32),
        "head.bias": np.zeros(CLASSES, dtype=np.float32),
    }
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


def write_json(path: Path, doc: dict[str, object]) -> None:
    """Write `doc` to `path` atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Wait for the nodes, then run the rounds."""
    cfg = context.run_config
    params, rounds, nodes = int(cfg["params"]), int(cfg["rounds"]), int(cfg["nodes"])
    timeout_s, wait_s = float(cfg["round-timeout-s"]), float(cfg["node-wait-s"])
    out = Path(str(cfg["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, object] = {"params": params, "nodes": nodes, "rounds": [], "status": "running"}

    deadline = time.monotonic() + wait_s
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(node_ids)} of {nodes} nodes connected within {wait_s:.0f} s")
        time.sleep(0.5)
        node_ids = sorted(grid.get_node_ids())

    arrays = initial_arrays(params)
    times: list[float] = []
    for rnd in range(1, rounds + 1):
        start = time.monotonic()
        messages = [
            Message(
                content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
            )
            for node in node_ids
        ]
        replies = [r for r in grid.send_and_receive(messages, timeout=timeout_s) if r.has_content()]
        if len(replies) < nodes:
            raise RuntimeError(f"round {rnd}: {len(replies)} of {nodes} replies")
        arrays = aggregate_arrayrecords([r.content for r in replies], "num-examples")
        del messages, replies
        times.append(round(time.monotonic() - start, 3))
        doc["rounds"] = times
        write_json(out / "rounds.json", doc)
    doc["status"] = "completed"
    write_json(out / "rounds.json", doc)
