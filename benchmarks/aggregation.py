"""Verified aggregation against Flower's unverified one: throughput, coordinator memory, and the cost of trust.

Every weft reply here is a real signed reply (an `UpdateEnvelope` signed by the member's key, the arrays as
Flower `Array`s of `.npy` bytes, the declared example count), and both sides read the same Flower messages.

1. Aggregation throughput. N replies of P float32 parameters are built once and held in memory; then, side
   by side in the same process on the same `RecordDict`s:
   - Flower: `flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords` (FedAvg's stock path: decode
     every array, weight and sum in float32, no verification, nothing stored);
   - weft, end to end: for each reply `coordinator.verify.verify_reply` (signature, binding, structure,
     BLAKE3 digest, finite check) and `UpdateSpool.put` (a stored update on disk), then `aggregate_round`
     (canonical order, float64 chunk-major fold, cast) from the spooled files; each stage timed apart, and
     the `fsync` of the round's files (`UpdateSpool.sync`) timed apart too;
   - bare baselines on the same bytes: memcpy, SHA-256 (hashlib) and BLAKE3.
   Throughput is the replies' array bytes (N x P x 4) divided by the time.
2. Coordinator memory. Replies are built one at a time (as a SuperLink hands them out); Flower's stock path
   must hold all N of them, weft verifies, stores and drops each. Each case runs in a fresh subprocess that
   reports tracemalloc's peak (Python and numpy allocations: what the coordinator itself holds) and, sampled
   every 20 ms from /proc/self/status, the peak resident anonymous memory (RssAnon) and the peak of all
   resident memory (VmRSS, which also counts the spooled files' pages while they are mapped: page cache the
   kernel can drop at any time). The 16 x 1B-parameter case runs for weft only.
3. The cost of trust: per GB, the node's digest and signature, the coordinator's checks, and bare hashing;
   and these operations as a share of a round.

Run:  .venv/bin/python -m benchmarks.aggregation [--quick]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
RESULTS = ROOT / "benchmarks" / "results"
FEDERATION, RUN, ROUND = "bench", "bench-run", 1
BLOCK = 1 << 20
"""Each update's values repeat a random block of this many float32s (building 4 GB replies fast)."""
ARRAYS = 16
"""Arrays per model: the parameters are split evenly over them (plus one small bias)."""
GB = 1e9
COMMAND = ".venv/bin/python -m benchmarks.aggregation"


# ---- signed replies ---------------------------------------------------------------------------------------


def layout(params: int) -> list[tuple[str, int]]:
    """(name, elements) of a model of `params` float32 parameters: ARRAYS weights and a 1000-element bias."""
    bias = min(1000, params)
    rest = params - bias
    sizes = [rest // ARRAYS + (1 if i < rest % ARRAYS else 0) for i in range(ARRAYS)]
    return [(f"layer{i:02d}.weight", n) for i, n in enumerate(sizes) if n] + [("output.bias", bias)]


def _npy(elements: int, block: bytes) -> bytes:
    """The `.npy` bytes of a float32 vector of `elements` values repeating `block` (one allocation)."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (elements,)})
    whole, rest = divmod(elements * 4, len(block))
    return b"".join([head.getvalue(), *([block] * whole), block[:rest]])


@dataclass
class Federation:
    """Keys, manifest, the global model and what a valid reply must match."""

    params: int
    nodes: int

    def __post_init__(self) -> None:
        from protocols import Manifest, Member, SigningKey, params_digest, structure

        self.keys = [SigningKey.from_seed((i + 1).to_bytes(32, "big")) for i in range(self.nodes)]
        members = tuple(Member(f"n{i}", k.public_key, "XX", 10**9) for i, k in enumerate(self.keys))
        self.manifest = Manifest(FEDERATION, SigningKey.from_seed(bytes(32)).public_key, members)
        self.layout = layout(self.params)
        self.global_arrays = {name: np.zeros(n, dtype=np.float32) for name, n in self.layout}
        self.template = structure(self.global_arrays)
        self.base_digest = params_digest(self.global_arrays)

    def expectation(self) -> Any:
        from coordinator.verify import Expectation

        return Expectation(FEDERATION, RUN, ROUND, self.base_digest, self.template, self.manifest)

    def reply(self, i: int) -> Any:
        """Node i's honestly signed reply (a Flower Message as the coordinator pulls it)."""
        from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

        from protocols import UpdateEnvelope, params_digest, sign_update, wire

        block = np.random.default_rng(i).standard_normal(BLOCK, dtype=np.float32).tobytes()
        record = ArrayRecord()
        views = {}
        for name, n in self.layout:
            data = _npy(n, block)
            record[name] = Array(dtype="float32", shape=(n,), stype="numpy.ndarray", data=data)
            views[name] = np.frombuffer(data, dtype=np.float32, offset=len(data) - 4 * n)
        env = UpdateEnvelope(FEDERATION, RUN, ROUND, self.keys[i].member_id, self.base_digest,
                             params_digest(views), num_examples=10 + i)  # fmt: skip
        signed = sign_update(self.keys[i], env)
        content = RecordDict(
            {
                wire.ARRAYS: record,
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: env.num_examples}),
                wire.UPDATE_RECORD: ConfigRecord({wire.ENVELOPE: signed.body, wire.SIGNATURE: signed.signature}),
            }
        )
        return Message(content, reply_to=_instruction(i))


def _instruction(i: int) -> Any:
    from flwr.app import DEFAULT_TTL, Message, MessageType, Metadata, RecordDict

    metadata = Metadata(run_id=1, message_id=f"instruction-{i}", src_node_id=1, dst_node_id=100 + i,
                        reply_to_message_id="", group_id=str(ROUND), created_at=time.time(), ttl=DEFAULT_TTL,
                        message_type=MessageType.TRAIN)  # fmt: skip
    return Message(RecordDict(), metadata=metadata)


# ---- the two coordinators ----------------------------------------------------------------------------------


def flower_aggregate(replies: Sequence[Any]) -> Any:
    """Flower's stock FedAvg aggregation of the replies (what its strategy calls after gathering them)."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from protocols import wire

    return aggregate_arrayrecords([r.content for r in replies], wire.NUM_EXAMPLES)


@dataclass
class WeftTimes:
    verify: float = 0.0
    store: float = 0.0
    sync: float = 0.0
    fold: float = 0.0

    @property
    def end_to_end(self) -> float:
        """Verify, store and fold; the fsync is reported apart (`with_sync`)."""
        return self.verify + self.store + self.fold

    @property
    def with_sync(self) -> float:
        return self.end_to_end + self.sync


def weft_aggregate(fed: Federation, replies: Iterator[Any], spool_dir: Path) -> tuple[WeftTimes, Any]:
    """The round loop's steps: verify each reply, store it, drop it; sync the round's files; aggregate_round."""
    from coordinator.spool import UpdateSpool
    from coordinator.verify import Accepted, verify_reply
    from protocols.aggregation import FedAvg, aggregate_round
    from protocols.policy import ContributionPolicy

    times = WeftTimes()
    expect = fed.expectation()
    spool = UpdateSpool(spool_dir)
    for reply in replies:
        t0 = time.perf_counter()
        ok = verify_reply(reply, expect)
        t1 = time.perf_counter()
        assert isinstance(ok, Accepted), f"every benchmark reply must verify: {ok}"
        env = ok.envelope
        spool.put(ok.member_id, env.update_digest, env.num_examples, ok.arrays, ok.signed)
        times.verify += t1 - t0
        times.store += time.perf_counter() - t1
        del reply, ok
        gc.collect(0)  # as coordinator/rounds.py does after each reply: a Flower Message holds reference cycles
    t0 = time.perf_counter()
    spool.sync()
    t1 = time.perf_counter()
    agg = aggregate_round(fed.template, fed.global_arrays, spool.inputs(), ContributionPolicy(), FedAvg())
    times.sync, times.fold = t1 - t0, time.perf_counter() - t1
    return times, agg


# ---- 1. throughput ----------------------------------------------------------------------------------------


def _best(fn: Callable[[], float], repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def throughput_case(nodes: int, params: int, scratch: Path) -> dict[str, Any]:
    """Every side on the same N replies; times are the best of 2 runs (1 for more than 2 GB of replies)."""
    import blake3

    fed = Federation(params, nodes)
    replies = [fed.reply(i) for i in range(nodes)]
    datas = [a.data for r in replies for a in r.content.array_records["arrays"].values()]
    total = sum(len(d) for d in datas)
    repeats = 2 if total <= 2 * 10**9 else 1
    biggest = max(len(d) for d in datas)

    def memcpy() -> float:
        dst = np.empty(biggest, dtype=np.uint8)
        t0 = time.perf_counter()
        for d in datas:
            np.copyto(dst[: len(d)], np.frombuffer(d, dtype=np.uint8))
        return time.perf_counter() - t0

    def sha256() -> float:
        return _timed(lambda: [hashlib.sha256(d).digest() for d in datas])

    def b3() -> float:
        return _timed(lambda: [blake3.blake3(d, max_threads=blake3.blake3.AUTO).digest() for d in datas])

    def flower() -> float:
        t = _timed(lambda: flower_aggregate(replies))
        gc.collect()
        return t

    weft_runs: list[WeftTimes] = []

    def weft() -> float:
        folder = scratch / "spool"
        times, _ = weft_aggregate(fed, iter(replies), folder)
        shutil.rmtree(folder)
        gc.collect()
        weft_runs.append(times)
        return times.end_to_end

    flower_s = weft_s = float("inf")
    for _ in range(repeats):  # interleaved, so both see the same machine state
        flower_s = min(flower_s, flower())
        weft_s = min(weft_s, weft())
    best = min(weft_runs, key=lambda t: t.end_to_end)
    stages = {k: min(getattr(t, k) for t in weft_runs) for k in ("verify", "store", "sync", "fold")}
    out = {
        "nodes": nodes,
        "params": params,
        "bytes": total,
        "flower_s": flower_s,
        "weft_s": weft_s,
        "weft_with_sync_s": best.with_sync,
        **{f"{k}_s": v for k, v in stages.items()},
        "memcpy_s": _best(memcpy, repeats),
        "sha256_s": _best(sha256, repeats),
        "blake3_s": _best(b3, repeats),
    }
    return out


def throughput_cases(quick: bool) -> list[tuple[int, int]]:
    """(nodes, params): Flower's side holds all N replies, so N x P x 4 bytes stays under about 8 GB here."""
    if quick:
        return [(8, 1_000_000), (4, 4_000_000)]
    return [(8, 1_000_000), (32, 1_000_000), (8, 25_000_000), (32, 25_000_000), (16, 100_000_000), (4, 250_000_000)]


# ---- 2. memory (each case in a fresh subprocess) ------------------------------------------------------------


class _RssSampler:
    """Peak VmRSS and RssAnon of this process, sampled from /proc/self/status every 20 ms."""

    def __init__(self) -> None:
        self.peak = {"VmRSS": 0, "RssAnon": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        with open("/proc/self/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self) -> _RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def memory_child(case: str, nodes: int, params: int, scratch: str) -> dict[str, Any]:
    """One memory case (run in a fresh process): `flower` or `weft`, replies built one at a time."""
    import flwr.serverapp.strategy.strategy_utils  # noqa: F401  (import first: the peak measures data)

    import coordinator.spool
    import coordinator.verify  # noqa: F401

    fed = Federation(params, nodes)
    gc.collect()
    base_rss = _RssSampler()
    base_rss._sample()
    tracemalloc.start()
    t0 = time.perf_counter()
    with _RssSampler() as rss:
        if case == "flower":
            replies = [fed.reply(i) for i in range(nodes)]  # what Grid.send_and_receive returns
            flower_aggregate(replies)
            times = None
        else:
            times, _ = weft_aggregate(fed, (fed.reply(i) for i in range(nodes)), Path(scratch))
    wall = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "case": case,
        "nodes": nodes,
        "params": params,
        "tracemalloc_peak": peak,
        "rss_peak": rss.peak["VmRSS"],
        "anon_peak": rss.peak["RssAnon"],
        "rss_before": base_rss.peak["VmRSS"],
        "wall_s": wall,
        "times": None if times is None else times.__dict__,
    }


def run_memory(case: str, nodes: int, params: int, scratch: Path) -> dict[str, Any]:
    folder = scratch / f"mem-{case}-{nodes}-{params}"
    cmd = [sys.executable, "-m", "benchmarks.aggregation", "--memory-child", case, str(nodes), str(params), str(folder)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if proc.returncode != 0:
        return {"case": case, "nodes": nodes, "params": params, "error": proc.stderr.strip().splitlines()[-1:]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def memory_cases(quick: bool) -> tuple[int, list[int], list[int]]:
    """(params, weft node counts, Flower node counts)."""
    if quick:
        return 2_000_000, [2, 4, 8], [2, 4, 8]
    return 100_000_000, [2, 4, 8, 16, 32], [2, 4, 8, 16]


BIG_NODES, BIG_PARAMS = 16, 1_000_000_000


# ---- 3. the cost of trust -------------------------------------------------------------------------------------


def trust_costs(params: int) -> dict[str, float]:
    """Seconds per reply of a `params`-parameter model: node digest + sign, coordinator verify, bare hashes."""
    import blake3

    from coordinator.verify import Accepted, verify_reply
    from protocols import params_digest, sign_update

    fed = Federation(params, 1)
    reply = fed.reply(0)
    from protocols import UpdateEnvelope, wire

    record = reply.content.array_records[wire.ARRAYS]
    datas = [record[name].data for name in record]
    views = {
        name: np.frombuffer(record[name].data, dtype=np.float32, offset=len(record[name].data) - 4 * n)
        for name, n in fed.layout
    }
    body = reply.content.config_records[wire.UPDATE_RECORD][wire.ENVELOPE]
    env = UpdateEnvelope.decode(body)  # type: ignore[arg-type]

    def node() -> float:
        return _timed(lambda: sign_update(fed.keys[0], env) if params_digest(views) == env.update_digest else None)

    def coordinator() -> float:
        t0 = time.perf_counter()
        ok = verify_reply(reply, fed.expectation())
        t = time.perf_counter() - t0
        assert isinstance(ok, Accepted)
        return t

    return {
        "params": params,
        "bytes": sum(len(d) for d in datas),
        "node_s": _best(node, 3),
        "coordinator_s": _best(coordinator, 3),
        "sha256_s": _best(lambda: _timed(lambda: [hashlib.sha256(d).digest() for d in datas]), 3),
        "blake3_s": _best(
            lambda: _timed(lambda: [blake3.blake3(d, max_threads=blake3.blake3.AUTO).digest() for d in datas]), 3
        ),
        "blake3_1t_s": _best(lambda: _timed(lambda: [blake3.blake3(d).digest() for d in datas]), 3),
    }


def real_round() -> dict[str, Any] | None:
    """The LM task's federated run in benchmarks/results/central_vs_federated.json: model size, nodes, round time."""
    path = RESULTS / "central_vs_federated.json"
    try:
        lm = json.loads(path.read_text())["lm"]
        lora = json.loads(path.read_text())["lora"]
        return {"params": int(lora["full_model_parameters"]), "nodes": int(lm["nodes"]),
                "rounds": int(lm["settings"]["rounds"]), "run_wall_s": float(lm["run_wall_s"])}  # fmt: skip
    except (OSError, KeyError, ValueError, TypeError):
        return None


# ---- the report ---------------------------------------------------------------------------------------------


def _gbs(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / GB if seconds > 0 else float("inf")


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _machine() -> str:
    import platform

    import flwr

    return (
        f"{os.cpu_count()}-core CPU ({platform.machine()}), {_ram_gib():.0f} GiB RAM; "
        f"Python {platform.python_version()}, numpy {np.__version__}, flwr {flwr.__version__}"
    )


def _ram_gib() -> float:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


def _plot_throughput(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{r['nodes']}x{r['params'] / 1e6:g}M" for r in rows]
    x = np.arange(len(rows))
    series = [("weft end to end (verify+store+fold)", "weft_s"), ("weft fold alone", "fold_s"),
              ("Flower aggregate_arrayrecords", "flower_s"), ("memcpy", "memcpy_s"),
              ("SHA-256", "sha256_s"), ("BLAKE3", "blake3_s")]  # fmt: skip
    width = 0.8 / len(series)
    for k, (label, key) in enumerate(series):
        ax.bar(x + (k - len(series) / 2 + 0.5) * width, [_gbs(r["bytes"], r[key]) for r in rows], width, label=label)
    ax.set_xticks(x, labels)
    ax.set_xlabel("updates x float32 parameters")
    ax.set_ylabel("GB/s of update bytes (higher is better)")
    ax.set_title("Aggregation throughput, same signed replies")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_memory(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for case, label in (("flower", "Flower stock (holds every reply)"), ("weft", "weft (verify, store, fold)")):
        ok = [r for r in rows if r["case"] == case and "error" not in r]
        if ok:
            ax.plot(
                [r["nodes"] for r in ok],
                [r["tracemalloc_peak"] / 2**30 for r in ok],
                "o-",
                label=f"{label}: tracemalloc",
            )
            ax.plot([r["nodes"] for r in ok], [r["anon_peak"] / 2**30 for r in ok], "x--", label=f"{label}: RssAnon")
    params = rows[0]["params"] if rows else 0
    ax.set_xlabel("updates aggregated")
    ax.set_ylabel("coordinator peak memory (GiB)")
    ax.set_title(f"Coordinator memory, {params / 1e6:g}M float32 parameters")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section(quick: bool = False) -> Any:
    """Run the benchmark: its Markdown and the targets it checked, as a `benchmarks.report.Section`
    (figures are written to docs/figures/)."""
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="weft-bench-"))
    try:
        return _section(quick, scratch, started)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _section(quick: bool, scratch: Path, started: float) -> Any:
    from benchmarks.report import Check, Section

    FIGURES.mkdir(parents=True, exist_ok=True)
    command = COMMAND + (" --quick" if quick else "")
    lines = [
        "## Verified aggregation against Flower's stock aggregation",
        "",
        f"```\n{command}\n```",
        "",
        f"Machine: {_machine()}. Written by `benchmarks/aggregation.py`"
        + (" in quick mode (small models; the 16 x 1B case is skipped)." if quick else "."),
        "",
        "Every weft reply is a real signed reply (Ed25519 over an `UpdateEnvelope` carrying the BLAKE3 parameter",
        "digest), and weft and Flower read the very same Flower `Message`s. Flower's side is",
        "`flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords` (what its FedAvg strategy runs): decode,",
        "weight and sum in float32, with no check and nothing stored. weft's side is what `coordinator/rounds.py`",
        "does: `verify_reply` on every reply (signature, binding, structure, digest, finite), `UpdateSpool.put`",
        "(a stored update on disk, docs/PROTOCOL.md section 15), then `aggregate_round` (canonical order, float64",
        "chunk-major fold, cast) from the spooled files, deterministic whatever the arrival order.",
        "",
        "### Throughput",
        "",
        "GB/s of update bytes (N x P x 4 bytes); ratios are against Flower in the same run. *end to end* is verify +",
        "store + fold; the `fsync` of the round's files before the commit (disk-bound, not CPU) is shown apart.",
        "",
        "| updates x params | GB | Flower | weft end to end | ratio | + fsync | verify | store | fold | fold ratio "
        "| memcpy | SHA-256 | BLAKE3 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for nodes, params in throughput_cases(quick):
        r = throughput_case(nodes, params, scratch)
        rows.append(r)
        b = r["bytes"]
        lines.append(
            f"| {nodes} x {params / 1e6:g}M | {b / GB:.2f} | {_gbs(b, r['flower_s']):.2f} | {_gbs(b, r['weft_s']):.2f} "
            f"| **{r['flower_s'] / r['weft_s']:.2f}x** | {_gbs(b, r['weft_with_sync_s']):.2f} "
            f"| {_gbs(b, r['verify_s']):.2f} | {_gbs(b, r['store_s']):.2f} | {_gbs(b, r['fold_s']):.2f} "
            f"| **{r['flower_s'] / r['fold_s']:.2f}x** | {_gbs(b, r['memcpy_s']):.2f} | {_gbs(b, r['sha256_s']):.2f} "
            f"| {_gbs(b, r['blake3_s']):.2f} |"
        )
    name = "aggregation_throughput_quick.png" if quick else "aggregation_throughput.png"
    _plot_throughput(rows, FIGURES / name)
    lines += [
        "",
        f"![aggregation throughput in GB/s per case, weft against Flower and bare baselines](figures/{name})",
        "",
    ]
    lines += [
        "*verify* is `verify_reply` (decoding is zero-copy: the `.npy` header is parsed and the arrays are views of",
        "the received bytes; the digest is BLAKE3 on every core; the finite check runs in cache-sized chunks).",
        "*store* writes each update once, with `write(2)` from the arrays' own memory (no archive, no CRC), into",
        "the page cache. *fold* maps the spooled files back and folds all updates chunk by chunk into a small float64",
        "buffer on every core, then casts straight into the model's dtype. *+ fsync* adds `UpdateSpool.sync()`:",
        "the round's files made durable before it can be committed; it runs at the disk's write speed.",
        "",
    ]

    # ---- memory
    params, weft_nodes, flower_nodes = memory_cases(quick)
    mem_rows = []
    for nodes in sorted(set(weft_nodes) | set(flower_nodes)):
        for case in ("flower", "weft"):
            if nodes in (flower_nodes if case == "flower" else weft_nodes):
                mem_rows.append(run_memory(case, nodes, params, scratch))
    lines += [
        "### Coordinator memory",
        "",
        f"{params / 1e6:g}M float32 parameters ({params * 4 / 2**20:,.0f} MiB per update), replies built one at a time"
        " (as a SuperLink hands them out). Each case runs in a fresh process. *tracemalloc* is the peak of",
        "Python and numpy allocations (what the coordinator holds); *RssAnon* the peak resident anonymous memory;",
        "*VmRSS* also counts the spooled files' pages while the fold maps them (page cache the kernel may drop).",
        "Both sides also hold the global model (one update's size) and build each reply in the same process.",
        "",
        "| updates | Flower tracemalloc MiB | Flower RssAnon MiB | weft tracemalloc MiB | weft RssAnon MiB "
        "| weft VmRSS MiB | Flower s | weft s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["case"], r["nodes"]): r for r in mem_rows}
    for nodes in sorted({r["nodes"] for r in mem_rows}):
        f, w = by.get(("flower", nodes), {}), by.get(("weft", nodes), {})

        def cell(r: dict[str, Any], key: str) -> str:
            if not r:
                return "not run"
            return "failed" if "error" in r else _mib(r[key])

        lines.append(
            f"| {nodes} | {cell(f, 'tracemalloc_peak')} | {cell(f, 'anon_peak')} | {cell(w, 'tracemalloc_peak')} "
            f"| {cell(w, 'anon_peak')} | {cell(w, 'rss_peak')} | {f.get('wall_s', float('nan')):.1f} "
            f"| {w.get('wall_s', float('nan')):.1f} |"
        )
    name = "aggregation_memory_quick.png" if quick else "aggregation_memory.png"
    _plot_memory(mem_rows, FIGURES / name)
    lines += ["", f"![coordinator peak memory against the number of updates, weft and Flower](figures/{name})", ""]
    errors = [r for r in mem_rows if "error" in r]
    for r in errors:
        lines.append(f"- {r['case']} with {r['nodes']} updates failed: {' '.join(r['error'])}")

    # ---- 16 x 1B
    need = BIG_NODES * BIG_PARAMS * 4
    big: dict[str, Any] | None = None
    if quick:
        lines += [f"**{BIG_NODES} x 1B parameters**: skipped in quick mode (run without `--quick`).", ""]
    else:
        free = shutil.disk_usage(scratch).free
        if free < need * 1.1:
            lines += [f"**{BIG_NODES} x 1B parameters**: not run: the spool needs {need / GB:.0f} GB of disk and "
                      f"{scratch} has {free / GB:.0f} GB free.", ""]  # fmt: skip
        else:
            big = run_memory("weft", BIG_NODES, BIG_PARAMS, scratch)
            if "error" in big:
                lines += [f"**{BIG_NODES} x 1B parameters**: failed: {' '.join(big['error'])}", ""]
            else:
                t = big["times"]
                lines += [
                    f"**{BIG_NODES} x 1B parameters** (4 GB per update, {need / GB:.0f} GB of updates, weft only:"
                    f" Flower's stock path would hold all {BIG_NODES} replies, {need / GB:.0f} GB, on this"
                    f" {_ram_gib():.0f} GiB machine): aggregated in {big['wall_s']:.0f} s (verify {t['verify']:.0f} s,"
                    f" store {t['store']:.0f} s, fsync {t['sync']:.0f} s, fold {t['fold']:.0f} s) with peak"
                    f" tracemalloc {big['tracemalloc_peak'] / 2**30:.1f} GiB, RssAnon {big['anon_peak'] / 2**30:.1f}"
                    f" GiB, VmRSS {big['rss_peak'] / 2**30:.1f} GiB: {big['tracemalloc_peak'] / (BIG_PARAMS * 4):.1f}"
                    " model sizes (the global model, then a reply being checked and the one being written, or the"
                    " aggregate being folded), whatever the number of updates. The spooled files did not fit the"
                    " page cache, so store, fsync and fold ran at the disk's speed here.",
                    "",
                ]

    # ---- trust
    sizes = [1_000_000, 10_000_000] if quick else [1_000_000, 100_000_000, 1_000_000_000]
    trust = [trust_costs(p) for p in sizes]
    lines += [
        "### The cost of trust",
        "",
        "Per reply: the node's side is the parameter digest (BLAKE3) and the Ed25519 signature of its envelope;",
        "the coordinator's side is all of `verify_reply` (zero-copy decode, signature, binding, structure, digest,",
        "finite check). GB/s of update bytes, against bare hashing of the same bytes.",
        "",
        "| params | node digest + sign | coordinator verify | BLAKE3 (all cores) | BLAKE3 (1 thread) | SHA-256 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for t in trust:
        b = t["bytes"]
        lines.append(
            f"| {t['params'] / 1e6:g}M | {_gbs(b, t['node_s']):.2f} GB/s ({t['node_s'] * 1e3:.1f} ms) "
            f"| {_gbs(b, t['coordinator_s']):.2f} GB/s ({t['coordinator_s'] * 1e3:.1f} ms) "
            f"| {_gbs(b, t['blake3_s']):.2f} | {_gbs(b, t['blake3_1t_s']):.2f} | {_gbs(b, t['sha256_s']):.2f} |"
        )
    per_gb_node = sum(t["node_s"] for t in trust) / sum(t["bytes"] for t in trust) * GB
    per_gb_coord = sum(t["coordinator_s"] for t in trust) / sum(t["bytes"] for t in trust) * GB
    lines += [""]
    lines += [
        f"Per GB of update: about {per_gb_node:.2f} s on each node (in parallel across nodes) and {per_gb_coord:.2f} s",
        "on the coordinator per reply (one after another). A round with N nodes therefore adds roughly",
        "`node + N x coordinator` seconds of trust work to its critical path, plus each node checking the signed",
        "global model (one more digest). What a round costs otherwise (local training) does not depend on weft.",
        "",
    ]
    real = real_round()
    trust_share: float | None = None
    if real is not None:
        p, n = real["params"], real["nodes"]
        round_s = real["run_wall_s"] / real["rounds"]
        nbytes = p * 4
        trust_s = nbytes / GB * (2 * per_gb_node + n * per_gb_coord)
        trust_share = trust_s / round_s
        lines += [
            f"In the measured LM run of docs/BENCHMARKS.md (`benchmarks/results/central_vs_federated.json`: {p:,}"
            f" float32 parameters, {n} nodes, {real['rounds']} rounds in {real['run_wall_s']:.0f} s, so"
            f" {round_s:.1f} s per round), the trust operations take about {trust_s * 1e3:.1f} ms per round:"
            f" {trust_s / round_s:.3%} of the round. The model is small; for bigger ones the table below gives the"
            " trust work per round at these rates and the shortest round it stays under 5% of.",
            "",
        ]
    lines += [
        "| params | updates per round | trust work per round | under 5% of a round of at least |",
        "|---:|---:|---:|---:|",
    ]
    for p in (100_000_000, 1_000_000_000, 7_000_000_000):
        for n in (8, 32):
            s = p * 4 / GB * (2 * per_gb_node + n * per_gb_coord)
            lines.append(f"| {p / 1e9:g}B | {n} | {s:.1f} s | {s / 0.05 / 60:.1f} min |")
    lines += [
        "",
        "A round of local training on a model of that size (minutes to hours on accelerators) is far longer;",
        "the coordinator's part grows with N because it verifies replies one after another as they arrive,",
        "overlapping the nodes that are still training.",
        "",
        f"Whole benchmark: {time.perf_counter() - started:.0f} s.",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("aggregation_quick.json" if quick else "aggregation.json")
    out.write_text(json.dumps({"machine": _machine(), "throughput": rows, "memory": mem_rows, "big": big,
                               "trust": trust, "real_round": real}, indent=1) + "\n")  # fmt: skip
    e2e = min(r["flower_s"] / r["weft_s"] for r in rows)
    fold = min(r["flower_s"] / r["fold_s"] for r in rows)
    weft_mem = sorted((r["nodes"], r["tracemalloc_peak"]) for r in mem_rows if r["case"] == "weft" and "error" not in r)
    checks = [
        Check(
            "weft verify + store + fold >= 1.0x Flower's aggregate_arrayrecords (worst case)", f"{e2e:.2f}x", e2e >= 1.0
        ),
        Check("weft fold alone >= 2x Flower's aggregate_arrayrecords (worst case)", f"{fold:.2f}x", fold >= 2.0),
    ]
    if len(weft_mem) >= 2:
        growth = weft_mem[-1][1] / weft_mem[0][1]
        checks.append(
            Check(
                f"coordinator memory flat in N (tracemalloc, {weft_mem[0][0]} -> {weft_mem[-1][0]} updates)",
                f"x{growth:.2f}",
                growth <= 1.25,
            )
        )
    if trust_share is not None:
        checks.append(Check("trust (digests, signatures, verification) under 5% of a round (the LM task's round)",
                            f"{trust_share:.3%}", trust_share < 0.05))  # fmt: skip
    if not quick:
        ok = big is not None and "error" not in big
        checks.append(Check("16 x 1B float32 updates aggregate on this machine", "yes" if ok else "no", ok))
    return Section("\n".join(lines), tuple(checks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small models only; skips the 16 x 1B case")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        case, nodes, params, scratch = args.memory_child
        print(json.dumps(memory_child(case, int(nodes), int(params), scratch)))
        return 0
    result = section(quick=args.quick)
    print(result.markdown)
    for check in result.checks:
        print(f"- {check.target}: {check.measured} ({'met' if check.ok else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
