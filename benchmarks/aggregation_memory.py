"""Coordinator memory while collecting and aggregating N updates: weft's round loop vs Flower's stock path.

Both sides pull the same N signed replies from a Grid that builds each reply only when it is pulled
(as a SuperLink serves them from its store), so memory measured is what the coordinator holds.

- Flower baseline: `Grid.send_and_receive` gathers every reply, then FedAvg's
  `strategy_utils.aggregate_arrayrecords` averages them: all N replies are in memory together.
- weft: the real round-loop steps (verify each pulled reply, store it, then `aggregate_round`): each reply is
  verified (signature, binding, digest, structure), spooled to disk and dropped; the aggregate is then
  folded from the spool one update at a time.

Each case runs in a fresh subprocess; peak memory is tracemalloc's peak (numpy reports its buffers).
Run:  .venv/bin/python benchmarks/aggregation_memory.py [--params 1000000] [--nodes 10 40]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

FEDERATION, RUN = "bench", "bench-run"


class LazyGrid:
    """Answers each pulled train instruction with a freshly built, honestly signed reply."""

    def __init__(self, nodes: int, params: int, base_digest: bytes) -> None:
        from protocols import SigningKey

        self.keys = {nid: SigningKey.from_seed(nid.to_bytes(32, "big")) for nid in range(1, nodes + 1)}
        self.params, self.base_digest = params, base_digest
        self.pending: dict[str, object] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.keys)

    def push_messages(self, messages: Iterable[object]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # type: ignore[attr-defined]
            self.pending[msg.metadata.message_id] = msg  # type: ignore[attr-defined]
            ids.append(msg.metadata.message_id)  # type: ignore[attr-defined]
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[object]:
        return [self._reply(self.pending.pop(i)) for i in list(ids) if i in self.pending]

    def send_and_receive(self, messages: Iterable[object], timeout: float | None = None) -> list[object]:
        return self.pull_messages(self.push_messages(messages))

    def _reply(self, msg):  # type: ignore[no-untyped-def]
        from flwr.app import Message

        from node.egress import train_reply
        from protocols import UpdateEnvelope, params_digest, sign_update

        nid = msg.metadata.dst_node_id
        arrays = {"w": np.random.default_rng(nid).standard_normal(self.params, dtype=np.float32)}
        env = UpdateEnvelope(
            federation_id=FEDERATION,
            run_id=RUN,
            round=1,
            sender=self.keys[nid].member_id,
            base_digest=self.base_digest,
            update_digest=params_digest(arrays),
            num_examples=10 + nid,
        )
        return Message(train_reply(arrays, sign_update(self.keys[nid], env), env.num_examples, {}), reply_to=msg)


def _setup(nodes: int, params: int):  # type: ignore[no-untyped-def]
    from flwr.app import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from coordinator.rounds import _instructions
    from protocols import GlobalModelEnvelope, SignedBlob, params_digest

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    global_arrays = {"w": np.zeros(params, dtype=np.float32)}
    digest = params_digest(global_arrays)
    env = GlobalModelEnvelope(FEDERATION, RUN, 0, digest, "bench")
    grid = LazyGrid(nodes, params, digest)
    messages = _instructions(sorted(grid.keys), MessageType.TRAIN, global_arrays, SignedBlob(env.encode(), b""))
    return grid, messages, global_arrays


def baseline(nodes: int, params: int) -> None:
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    grid, messages, _ = _setup(nodes, params)
    replies = list(grid.send_and_receive(messages))
    aggregate_arrayrecords([r.content for r in replies], "num-examples")  # type: ignore[attr-defined]


def weft(nodes: int, params: int) -> None:
    """The coordinator's path: verify each reply as it is pulled, store it, then aggregate_round from disk."""
    import gc

    from coordinator.messaging import collect
    from coordinator.spool import UpdateSpool
    from coordinator.verify import Accepted, Expectation, verify_reply
    from protocols import Manifest, Member, SigningKey, params_digest, structure
    from protocols.aggregation import FedAvg, aggregate_round
    from protocols.policy import ContributionPolicy

    grid, messages, global_arrays = _setup(nodes, params)
    members = tuple(Member(f"n{nid}", key.public_key, "XX", 10**6) for nid, key in grid.keys.items())
    manifest = Manifest(FEDERATION, SigningKey.from_seed(bytes(32)).public_key, members)
    template = structure(global_arrays)
    expect = Expectation(FEDERATION, RUN, 1, params_digest(global_arrays), template, manifest)

    with tempfile.TemporaryDirectory() as tmp:
        spool = UpdateSpool(Path(tmp))
        for reply in collect(grid, messages, timeout_s=600):  # type: ignore[arg-type]
            ok = verify_reply(reply, expect)
            assert isinstance(ok, Accepted), "every benchmark update must verify"
            env = ok.envelope
            spool.put(ok.member_id, env.update_digest, env.num_examples, ok.arrays, ok.signed)
            del reply, ok
            gc.collect(0)
        assert len(spool) == nodes
        aggregate_round(template, global_arrays, spool.inputs(), ContributionPolicy(), FedAvg())


def _measure(case: str, nodes: int, params: int) -> dict[str, float]:
    # import everything first, so the peak measures data, not modules
    import flwr.serverapp.strategy.strategy_utils  # noqa: F401

    import coordinator.rounds  # noqa: F401
    import node.egress  # noqa: F401

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
    print(f"model: {args.params:,} float32 parameters = {args.params * 4 / 2**20:.1f} MiB")
    header = ("nodes", "flower peak MiB", "weft peak MiB", "weft/flower", "flower s", "weft s")
    widths = (5, 15, 13, 11, 8, 6)
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for nodes in args.nodes:
        res = {}
        for case in ("baseline", "weft"):
            cmd = [sys.executable, __file__, "--child", case, str(nodes), str(args.params)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
            res[case] = json.loads(proc.stdout.strip().splitlines()[-1])
        b, w = res["baseline"], res["weft"]
        row = (nodes, b["peak_mib"], w["peak_mib"], w["peak_mib"] / b["peak_mib"], b["wall_s"], w["wall_s"])
        print(f"{row[0]:>5}  {row[1]:>15.1f}  {row[2]:>13.1f}  {row[3]:>11.3f}  {row[4]:>8.2f}  {row[5]:>6.2f}")


if __name__ == "__main__":
    main()
