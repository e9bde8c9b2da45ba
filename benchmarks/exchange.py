"""Exchange through a real SuperLink: weft's signed rounds against Flower's stock apps, on loopback.

Each side is a real deployment on 127.0.0.1, set up as tests/integration/test_deploy.py does (plain
`flower-superlink --insecure` with its state in an SQLite file, two `flower-supernode --insecure`, each
process with its own FLWR_HOME, `flwr run --stream`, the run's status read back with `flwr ls`):

- **weft**: the config-only app of `federation.apps.write_app`, i.e. weft's own ServerApp and ClientApp, with
  keys and a signed manifest. The task is benchmarks/exchange_task.py: a model of P float32 parameters,
  nearly all in one vector, one SGD step on 16 examples. Federated evaluation and personalization are off,
  so a round is one train message per node: the coordinator signs the global model, each node checks it,
  trains, signs its update; the coordinator verifies, stores (`store-updates`, the default), aggregates,
  signs and commits the round. Per-round time: `duration_s` of the run's `metrics.jsonl`.
- **Flower stock**: benchmarks/exchange-flower-app/, a ServerApp that sends the same arrays to both nodes
  with `grid.send_and_receive` and averages the replies with FedAvg's `aggregate_arrayrecords`, and a
  ClientApp that returns the arrays moved by 1e-3. Per-round time: from sending to the averaged model.

Both use the same transport (insecure loopback HTTP, no TLS), and a fresh ClientApp process per message
(Flower's deployment runtime). The sides run one after the other, never together. Memory: every 0.25 s,
the RSS of every process in the tree of the SuperLink, the SuperNodes and `flwr run` (the ServerApp and
ClientApp processes included) is read from /proc; the peak of the sum (shared pages counted once per
process) and each role's peak are reported. If the machine's available memory falls under 1.5 GiB, the
side is stopped and reported as such (never the OOM killer). Every process is stopped by PID, with its
descendants, in a `finally`.

Run:  .venv/bin/python -m benchmarks.exchange [--quick] [--size-mb 256 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FLOWER_APP = ROOT / "benchmarks" / "exchange-flower-app"
FIGURE = ROOT / "docs" / "figures" / "exchange.png"
RESULTS = ROOT / "benchmarks" / "results" / "exchange.json"
BIN = Path(sys.executable).parent
NODES = 2
CONNECTION = "bench"
FEDERATION_ID = "weft-exchange-bench"
START_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 60.0
SAMPLE_S = 0.25
MEM_GUARD_BYTES = int(1.5 * 2**30)
QUICK_MB = 64
FULL_MB = (256, 1000)
ROLES = ("serverapp", "clientapp", "superexec", "superlink", "supernode", "flwr-cli")


def params_of(size_mb: float) -> int:
    """float32 parameters of a model of `size_mb` MB (10^6 bytes): 1000 MB -> 250M."""
    return int(size_mb * 1e6) // 4


# ---- processes -------------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def toml_str(value: object) -> str:
    """A TOML string literal (for --run-config / --node-config)."""
    return json.dumps(str(value))


def role_of(pid: int) -> str | None:
    """Which Flower process `pid` is, from its command line."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    for needle, role in (
        ("flwr-serverapp", "serverapp"),
        ("flwr-clientapp", "clientapp"),
        ("flower-superexec", "superexec"),
        ("flower-superlink", "superlink"),
        ("flower-supernode", "supernode"),
        ("flwr run", "flwr-cli"),
        ("/flwr ", "flwr-cli"),
    ):
        if needle in cmd:
            return role
    return None


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def mem_available() -> int:
    """MemAvailable of the machine, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**62


class Sampler:
    """Samples the RSS of every process below `roots` until stopped; sets `low_memory` under the guard."""

    def __init__(self, roots: list[int]) -> None:
        from federation.deploy_proc import children_of

        self._children_of = children_of
        self.roots = roots
        self.peak_total = 0
        self.peak_by_role: dict[str, int] = {}
        self.low_memory = threading.Event()
        self.loads: list[float] = []
        self.clientapps: dict[int, list[float]] = {}  # pid -> [first seen, last seen] (monotonic s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def add_root(self, pid: int) -> None:
        """Also sample `pid` and what it spawns."""
        self.roots.append(pid)

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            pids: set[int] = set()
            for root in list(self.roots):
                pids.add(root)
                pids.update(self._children_of(root))
            total, by_role = 0, dict[str, int]()
            for pid in pids:
                rss = rss_bytes(pid)
                total += rss
                role = role_of(pid) or "other"
                if role == "clientapp" and rss:
                    now = time.monotonic()
                    self.clientapps.setdefault(pid, [now, now])[1] = now
                by_role[role] = by_role.get(role, 0) + rss
            self.peak_total = max(self.peak_total, total)
            for role, rss in by_role.items():
                self.peak_by_role[role] = max(self.peak_by_role.get(role, 0), rss)
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
            if mem_available() < MEM_GUARD_BYTES:
                self.low_memory.set()

    def stop(self) -> None:
        """End sampling (bounded)."""
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass
class Side:
    """What one side of one size measured."""

    side: str
    size_mb: float
    params: int
    rounds: list[float] = field(default_factory=list)
    run_wall_s: float = 0.0
    status: str = "not run"
    error: str = ""
    peak_total_bytes: int = 0
    peak_by_role: dict[str, int] = field(default_factory=dict)
    load: float | None = None
    """Mean 1-minute load average of the machine during the run (other jobs included)."""
    clientapp_s: float | None = None
    """Mean lifetime of a ClientApp process (one per message: receive, import, train, sign, send), as sampled."""

    @property
    def steady_s(self) -> float | None:
        """Mean round time after the first round (the first, if there is only one)."""
        rest = self.rounds[1:] or self.rounds
        return sum(rest) / len(rest) if rest else None


def weft_cli(*args: str) -> None:
    """`weft ARGS` in this process (a fresh `weft` process spends seconds importing torch)."""
    from federation.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(args))
    if code != 0:
        raise RuntimeError(f"weft {' '.join(args)} (exit {code}):\n{out.getvalue()}")


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"<{path}: {exc}>"


@contextlib.contextmanager
def deployment(base: Path, node_configs: Sequence[str | None]) -> Iterator[tuple[Path, list[Any]]]:
    """A SuperLink and one SuperNode per node config on 127.0.0.1; yields (CLI FLWR_HOME, children).

    Every process is stopped, SuperNodes first, with everything it spawned, when the block ends.
    """
    from federation.deploy_proc import flower_env, start_child, wait_for_port

    link_port, *node_ports = free_ports(1 + len(node_configs))
    cli_home = base / "home-cli"
    cli_home.mkdir(parents=True)
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    children: list[Any] = []
    logs: list[Any] = []
    try:
        home = base / "home-link"
        home.mkdir()
        logs.append((base / "superlink.log").open("wb"))
        link = start_child(
            "superlink",
            [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
             "--database", str(base / "superlink.db"), "--host", "127.0.0.1", "--port", str(link_port)],
            flower_env(home), base, logs[-1],
        )  # fmt: skip
        children.append(link)
        wait_for_port("127.0.0.1", link_port, link, START_TIMEOUT_S)
        for i, node_config in enumerate(node_configs):
            home = base / f"home-node-{i}"
            home.mkdir()
            argv = [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                    "--host", "127.0.0.1", "--port", str(node_ports[i])]  # fmt: skip
            if node_config:
                argv += ["--node-config", node_config]
            logs.append((base / f"supernode-{i}.log").open("wb"))
            children.append(start_child(f"supernode-{i}", argv, flower_env(home), base, logs[-1]))
        yield cli_home, children
    finally:
        for child in reversed(children):  # SuperNodes first
            with contextlib.suppress(Exception):
                child.stop()
        for handle in logs:
            handle.close()


def flwr_run(app: Path, run_config: str, cli_home: Path, base: Path, timeout_s: float, side: Side,
             sampler: Sampler, children: list[Any]) -> str:  # fmt: skip
    """`flwr run --stream`, bounded in time and by the memory guard; returns the run's status from `flwr ls`."""
    from federation.deploy_proc import flower_env, start_child

    env = flower_env(cli_home)
    log = base / "flwr-run.log"
    start = time.monotonic()
    with log.open("wb") as out:
        run = start_child("flwr-run", [str(BIN / "flwr"), "run", str(app), CONNECTION, "--stream",
                                       "--run-config", run_config], env, base, out)  # fmt: skip
        sampler.add_root(run.pid)
        try:
            while run.poll() is None:
                for child in children:
                    child.remember_children()
                if sampler.low_memory.is_set():
                    side.error = f"stopped: the machine's available memory fell under {MEM_GUARD_BYTES / 2**30:.1f} GiB"
                    return "stopped:low-memory"
                if time.monotonic() - start > timeout_s:
                    side.error = f"stopped: `flwr run` took over {timeout_s:.0f} s"
                    return "stopped:timeout"
                time.sleep(0.5)
        finally:
            side.run_wall_s = round(time.monotonic() - start, 2)
            run.stop()
    started = re.search(r"Successfully started run (\d+)", log.read_text(errors="replace"))
    ls = subprocess.run(
        [str(BIN / "flwr"), "ls", CONNECTION, "--format", "json"],
        cwd=base, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
    )  # fmt: skip
    try:
        runs = [r for r in json.loads(ls.stdout)["runs"] if started and r["run-id"] == started.group(1)]
    except (json.JSONDecodeError, KeyError):
        runs = []
    if not runs:
        side.error = f"no run status: {ls.stdout[-500:]} {ls.stderr[-500:]}\n{tail(log)}"
        return "unknown"
    status = str(runs[0].get("status", "unknown"))
    if status != "finished:completed":
        side.error = f"{runs[0].get('status-details', '')}\n{tail(log)}"
    return status


def run_weft(base: Path, side: Side, rounds: int, run_timeout_s: float, round_timeout_s: float) -> None:
    """weft's own apps, with keys, a signed manifest and the exchange task of `side.params` parameters."""
    from federation.apps import write_app

    keys, manifest, out = base / "keys", base / "manifest.json", base / "out"
    app = write_app(base / "weft-app").parent
    weft_cli("keygen", "--out", str(keys), "--name", "coordinator")
    coordinator_key = str(keys / "coordinator.key")
    weft_cli("manifest", "init", str(manifest), "--federation-id", FEDERATION_ID,
             "--coordinator-key", str(keys / "coordinator.pub"), "--coordinator-key-file", coordinator_key)  # fmt: skip
    task = f"benchmarks.exchange_task:task_{side.params}"
    configs = []
    for i in range(NODES):
        weft_cli("keygen", "--out", str(keys), "--name", f"node-{i}")
        weft_cli("manifest", "add", str(manifest), "--name", f"node-{i}", "--key", str(keys / f"node-{i}.pub"),
                 "--jurisdiction", "DE", "--max-examples", "2000",
                 "--coordinator-key-file", coordinator_key)  # fmt: skip
        (base / f"data-{i}").mkdir()
        configs.append(" ".join([
            f"key={toml_str(keys / f'node-{i}.key')}", f"coordinator-key={toml_str(keys / 'coordinator.pub')}",
            f"federation-id={toml_str(FEDERATION_ID)}", f"workdir={toml_str(base / f'work-{i}')}",
            f"data-dir={toml_str(base / f'data-{i}')}", f"task={toml_str(task)}", 'device="cpu"',
        ]))  # fmt: skip
    run_config = " ".join([
        f"rounds={rounds}", f"task={toml_str(task)}", "quorum=1.0", f"round-timeout-s={round_timeout_s:.1f}",
        "federated-evaluation=false", "personalize=false", f"manifest={toml_str(manifest)}",
        f"coordinator-key={toml_str(keys / 'coordinator.key')}", f"out-dir={toml_str(out)}",
    ])  # fmt: skip
    measured_run(base, configs, app, run_config, run_timeout_s, side)
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        side.rounds = [float(line["duration_s"]) for line in lines if line.get("duration_s") is not None]


def measured_run(
    base: Path, configs: list[str | None], app: Path, run_config: str, run_timeout_s: float, side: Side
) -> None:
    """Start the deployment, `flwr run` the app on it, and record the run's status, memory and load in `side`."""
    with deployment(base, configs) as (cli_home, children):
        sampler = Sampler([c.pid for c in children])
        try:
            side.status = flwr_run(app, run_config, cli_home, base, run_timeout_s, side, sampler, children)
        finally:
            sampler.stop()
            side.peak_total_bytes, side.peak_by_role = sampler.peak_total, dict(sampler.peak_by_role)
            side.load = round(sum(sampler.loads) / len(sampler.loads), 1) if sampler.loads else None
            spans = [last - first for first, last in sampler.clientapps.values()]
            side.clientapp_s = round(sum(spans) / len(spans), 1) if spans else None


def run_flower(base: Path, side: Side, rounds: int, run_timeout_s: float, round_timeout_s: float) -> None:
    """Flower's stock apps (benchmarks/exchange-flower-app/), the same arrays, no signing or storage."""
    out = base / "out"
    run_config = " ".join([
        f"params={side.params}", f"rounds={rounds}", f"nodes={NODES}", f"round-timeout-s={round_timeout_s:.1f}",
        f"out-dir={toml_str(out)}",
    ])  # fmt: skip
    measured_run(base, [None] * NODES, FLOWER_APP, run_config, run_timeout_s, side)
    doc = out / "rounds.json"
    if doc.exists():
        side.rounds = [float(x) for x in json.loads(doc.read_text())["rounds"]]


def measure(size_mb: float, rounds: int, keep: bool = False) -> list[Side]:
    """Flower stock, then weft, at `size_mb`: each in a fresh deployment and scratch folder, removed after."""
    round_timeout_s = 120.0 + 1.0 * size_mb
    run_timeout_s = 180.0 + rounds * round_timeout_s
    sides = []
    for name, runner in (("flower", run_flower), ("weft", run_weft)):
        side = Side(name, size_mb, params_of(size_mb))
        base = Path(tempfile.mkdtemp(prefix=f"weft-exchange-{name}-"))
        t0 = time.monotonic()
        try:
            runner(base, side, rounds, run_timeout_s, round_timeout_s)
        except Exception as exc:  # a failed side is reported, not hidden
            side.status, side.error = "error", f"{type(exc).__name__}: {exc}"
        finally:
            if keep or side.status != "finished:completed":  # keep the logs for a look; drop the big files
                side.error += f"\n(logs kept in {base})" if side.error else ""
                for big in [*base.glob("superlink.db*"), base / "out", *base.glob("work-*")]:
                    if big.is_dir():
                        shutil.rmtree(big, ignore_errors=True)
                    elif big.exists():
                        big.unlink()
            else:
                shutil.rmtree(base, ignore_errors=True)
        print(
            f"[exchange] {name} {size_mb:g} MB: {side.status}, rounds {side.rounds} s, flwr run {side.run_wall_s} s, "
            f"peak RSS {side.peak_total_bytes / 2**30:.2f} GiB, load {side.load} ({time.monotonic() - t0:.0f} s)"
            + (f"\n  {side.error.strip()[:2000]}" if side.error else ""),
            file=sys.stderr,
            flush=True,
        )
        sides.append(side)
    return sides


# ---- report ----------------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}" if n else "n/a"


def _s(x: float | None) -> str:
    return f"{x:.1f}" if x is not None else "n/a"


def _machine() -> str:
    try:
        from benchmarks.report import machine

        return machine()
    except Exception:  # the shared report helper is optional here
        return f"{os.cpu_count()}-core machine; measured {time.strftime('%Y-%m-%d')}"


def plot(sides: Sequence[Side], path: Path) -> bool:
    """Per-round time and peak RSS, weft against Flower stock, per size; False if nothing to plot."""
    done = [s for s in sides if s.rounds]
    if not done:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({s.size_mb for s in done})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    for k, name in enumerate(("flower", "weft")):
        by = {s.size_mb: s for s in done if s.side == name}
        xs = [i + (k - 0.5) * width for i in range(len(sizes))]
        label = "Flower stock" if name == "flower" else "weft"
        ax1.bar(xs, [by[m].steady_s or 0 if m in by else 0 for m in sizes], width, label=label)
        ax2.bar(xs, [by[m].peak_total_bytes / 2**30 if m in by else 0 for m in sizes], width, label=label)
    for ax, title in ((ax1, "steady-state round (s)"), (ax2, "peak RSS, all processes (GiB)")):
        ax.set_xticks(range(len(sizes)), [f"{m:g} MB" for m in sizes])
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"One round through a real SuperLink, {NODES} SuperNodes on loopback")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(sides: Sequence[Side], rounds: int, command: str, wall_s: float, figure: bool) -> str:
    """The section: what was run, how to reproduce it, the table and the ratios."""
    lines = [
        f"A model of P float32 parameters sent to {NODES} SuperNodes and their updates collected, {rounds} rounds, "
        "through a real `flower-superlink` (state in an SQLite file) and two `flower-supernode`s on 127.0.0.1, "
        "`--insecure` on both sides (no TLS), started as in tests/integration/test_deploy.py; each side in a fresh "
        "deployment, one after the other. **weft**: its own ServerApp/ClientApp (`federation.apps`), signed "
        "manifest, task benchmarks/exchange_task.py (nearly all parameters in one vector, one SGD step on 16 "
        "examples), federated evaluation and personalization off, updates stored (default): the difference is "
        "signing, verification, storage, weft's aggregation and a torch model on each node. **Flower stock**: "
        "benchmarks/exchange-flower-app/ (`grid.send_and_receive`, FedAvg's `aggregate_arrayrecords`; the "
        "ClientApp adds 1e-3 to the arrays). Round time: weft's `metrics.jsonl` `duration_s` (send to committed "
        "round), Flower's from send to averaged model. Steady state: the mean of rounds 2 and later. Peak RSS: "
        "the sum over every process of the SuperLink's, SuperNodes' and `flwr run`'s trees, sampled every "
        f"{SAMPLE_S} s from /proc (pages shared between processes count once per process); ServerApp, ClientApps "
        "and SuperLink: the peak of that role's processes together. Load avg: the machine's mean 1-minute load "
        "during the run, other jobs included (on 2 cores, anything above 2 means waiting for a CPU). ClientApp life: "
        "how long one ClientApp process lived, on average (Flower starts one per message: it receives the model "
        "from its SuperNode, trains, signs for weft, and sends the reply); the rest of a round is transfer through "
        "the SuperLink and the ServerApp's own work.",
        "",
        f"Machine: {_machine()}. Reproduce: `{command}` (took {wall_s / 60:.1f} min).",
        "",
        "| size | side | status | round times (s) | steady round (s) | `flwr run` (s) | peak RSS all (GiB) "
        "| ServerApp | ClientApps | SuperLink | ClientApp life (s) | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sides:
        role = s.peak_by_role
        lines.append(
            f"| {s.size_mb:g} MB ({s.params / 1e6:g}M) | {'weft' if s.side == 'weft' else 'Flower stock'} "
            f"| {s.status} | {', '.join(f'{x:.1f}' for x in s.rounds) or 'n/a'} | {_s(s.steady_s)} "
            f"| {s.run_wall_s:.1f} "
            f"| {_gib(s.peak_total_bytes)} | {_gib(role.get('serverapp', 0))} | {_gib(role.get('clientapp', 0))} "
            f"| {_gib(role.get('superlink', 0))} | {_s(s.clientapp_s)} | {s.load if s.load is not None else 'n/a'} |"
        )
    lines += ["", "| size | steady round, weft / Flower | peak RSS, weft / Flower |", "|---|---|---|"]
    for size in sorted({s.size_mb for s in sides}):
        pair = {s.side: s for s in sides if s.size_mb == size}
        w, f = pair.get("weft"), pair.get("flower")
        time_ratio = mem_ratio = "n/a"
        if w and f and w.steady_s and f.steady_s and w.status == f.status == "finished:completed":
            time_ratio = f"{w.steady_s / f.steady_s:.2f}x"
            if w.peak_total_bytes and f.peak_total_bytes:
                mem_ratio = f"{w.peak_total_bytes / f.peak_total_bytes:.2f}x"
        lines.append(f"| {size:g} MB | {time_ratio} | {mem_ratio} |")
    errors = [f"- {s.side} {s.size_mb:g} MB: {s.error.strip().splitlines()[0]}" for s in sides if s.error.strip()]
    if errors:
        lines += ["", "Problems:", *errors]
    if figure:
        lines += ["", "![Exchange through a real SuperLink: round time and peak memory](figures/exchange.png)"]
    return "\n".join(lines) + "\n"


def run(sizes: Sequence[float], rounds: int, quick: bool, command: str, keep: bool = False) -> str:
    """Measure every size, write the results (and, unless quick, the figure); return the Markdown."""
    t0 = time.monotonic()
    sides: list[Side] = []
    for size in sizes:
        sides += measure(size, rounds, keep)
    wall_s = time.monotonic() - t0
    figure = False
    if not quick:
        figure = plot(sides, FIGURE)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            json.dumps(
                {
                    "rounds": rounds,
                    "wall_s": round(wall_s, 1),
                    "command": command,
                    "sides": [{**asdict(s), "steady_s": s.steady_s} for s in sides],
                },
                indent=1,
            )
        )
    return markdown(sides, rounds, command, wall_s, figure)


def section(quick: bool = False) -> str:
    """The benchmark's Markdown: 64 MB and 3 rounds when quick (about 3 minutes), else 256 MB and 1000 MB (1 GB)."""
    if quick:
        return run([QUICK_MB], 3, True, ".venv/bin/python -m benchmarks.exchange --quick")
    return run(list(FULL_MB), 3, False, ".venv/bin/python -m benchmarks.exchange")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_MB} MB, no figure or results file")
    parser.add_argument(
        "--size-mb", type=float, nargs="+", help=f"model sizes in MB (default {' '.join(map(str, FULL_MB))})"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (>= 2 for a steady state)")
    parser.add_argument("--keep", action="store_true", help="keep each side's logs in its scratch folder")
    args = parser.parse_args(argv)
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    sizes = args.size_mb or ([QUICK_MB] if args.quick else list(FULL_MB))
    command = " ".join([".venv/bin/python -m benchmarks.exchange", *(argv if argv is not None else sys.argv[1:])])
    print(run(sizes, args.rounds, args.quick, command.strip(), args.keep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
