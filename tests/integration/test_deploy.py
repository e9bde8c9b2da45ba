"""A real deployment on loopback: one SuperLink, two SuperNodes, `flwr run`, two signed rounds, and
an egress capture proving that nothing of a partner's data folder leaves its node.

Everything a person would do by hand (docs/DEPLOY.md walks through the same commands): keys with
`weft keygen`, a manifest with `weft manifest init/add`, each partner's own `data-dir` of CSV files,
`flower-superlink` and two `flower-supernode`s bound to 127.0.0.1 on free ports, each with its own
FLWR_HOME, then `flwr run --stream` on a config-only app folder. `flwr run` exits 0 even when the run
fails, so the run's status is read back with `flwr ls --format json`, and the record the coordinator
wrote is checked: summary, an offline-verifiable signed global model, and each node's local model.

Egress: each partner's data-dir is named with a unique canary, and every CSV file in it holds the
canary as a comment line and as a row whose float32 features spell canary bytes in memory. Each
SuperNode reaches the SuperLink only through an `EgressProxy` (a loopback TCP relay; the deployment
is `--insecure`, so the bytes are plain HTTP/1.1 with protobuf bodies) that records every byte the
node sends. `find_leaks` searches those bytes, raw and as decoded HTTP requests, for the canaries
and the data-dir path; the same check is shown to catch a deliberately leaking node.

Every process started here is stopped by PID in the fixture's teardown, together with the
processes it spawned (flower-superexec, flwr-serverapp, flwr-clientapp), found through /proc; every
proxy thread is bounded in time and stopped there too.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from federation.apps import write_app
from federation.tasks import LabeledArrays, load_local
from federation.tasks import synthetic as synthetic_task
from federation.tasks.files import write_labeled_csv
from node.store import PERSONAL_FILE, load_local_model

pytestmark = [pytest.mark.integration, pytest.mark.skipif(sys.platform != "linux", reason="uses /proc")]

BIN = Path(sys.executable).parent  # weft, flwr, flower-superlink, flower-supernode live next to python
FEDERATION_ID = "weft-loopback"
NODES = 2
ROUNDS = 2
PERSONALIZE_EPOCHS = (1, 0)  # node 0 keeps a personalized model, node 1 does not
CONNECTION = "weft-test"

START_TIMEOUT_S = 60  # SuperLink port open
RUN_TIMEOUT_S = 300  # the whole `flwr run --stream`
CLI_TIMEOUT_S = 60  # short CLI calls
STOP_TIMEOUT_S = 15  # per process, after SIGTERM
POLL_S = 0.2  # how often proxy threads look at their stop flag


# ---- processes -----------------------------------------------------------------------------------------


def base_env(flwr_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # Flower spawns flower-superexec etc. by name
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (all held open together while picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"<{path}: {exc}>"


def children_of(pid: int) -> list[int]:
    """All live descendants of `pid` (via /proc; detached ones too, while their parent lives)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def signal_pid(pid: int, sig: signal.Signals) -> None:
    """Signal `pid` if it is still a Flower process (a remembered PID may have been reused since)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"flwr" in cmdline or b"flower" in cmdline:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@dataclass
class Server:
    """A long-running Flower process started in its own session, logging to a file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    spawned: set[int] = field(default_factory=set)

    def remember_children(self) -> None:
        self.spawned.update(children_of(self.proc.pid))

    def stop(self) -> None:
        """SIGTERM the process group and every descendant seen, wait, then SIGKILL what is left."""
        self.remember_children()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # pgid == pid (start_new_session=True)
            except (ProcessLookupError, PermissionError):
                self.proc.terminate()
        for pid in self.spawned:
            signal_pid(pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while any(alive(p) for p in self.spawned) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.spawned:
            if alive(pid):
                signal_pid(pid, signal.SIGKILL)


def start(name: str, cmd: list[str], flwr_home: Path, cwd: Path) -> Server:
    flwr_home.mkdir(parents=True, exist_ok=True)
    log = cwd / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=base_env(flwr_home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(name, proc, log)


def run_cli(
    cmd: list[str], flwr_home: Path, cwd: Path, timeout: float = CLI_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=base_env(flwr_home), capture_output=True, text=True, timeout=timeout, check=False
    )


def wait_for_port(port: int, server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, f"{server.name} exited early:\n{tail(server.log)}"
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.25)
    pytest.fail(f"{server.name} did not open 127.0.0.1:{port} within {timeout_s} s:\n{tail(server.log)}")


def weft(*args: str) -> None:
    """`weft ARGS` in this process: the console script's `main` (a fresh `weft` process spends ~3 s importing torch)."""
    from federation.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(args))
    assert code == 0, f"weft {' '.join(args)} (exit {code}):\n{out.getvalue()}"


# ---- egress capture ---------------------------------------------------------------------------------------


class EgressProxy:
    """A TCP relay 127.0.0.1:`port` -> 127.0.0.1:`upstream` that records every byte its clients send.

    One list of bytes per accepted connection (a node's HTTP/1.1 requests, in order). Its threads
    end at `stop()` or when `lifetime_s` has passed, whichever comes first.
    """

    def __init__(self, name: str, upstream_port: int, lifetime_s: float) -> None:
        self.name = name
        self.upstream = ("127.0.0.1", upstream_port)
        self.deadline = time.monotonic() + lifetime_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sent: list[bytearray] = []
        self._sockets: list[socket.socket] = [self._listener]
        self._threads = [threading.Thread(target=self._accept, name=f"{name}-accept", daemon=True)]
        self._threads[0].start()

    def sent(self) -> list[bytes]:
        """What clients have sent so far, one bytes object per connection."""
        with self._lock:
            return [bytes(b) for b in self._sent]

    def stop(self) -> None:
        """Close every socket and join every thread (bounded)."""
        self._stop.set()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        for thread in threads:
            thread.join(timeout=STOP_TIMEOUT_S)
        assert not any(t.is_alive() for t in threads), f"{self.name}: proxy threads still running"

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self.deadline

    def _accept(self) -> None:
        while self._running():
            try:
                if not select.select([self._listener], [], [], POLL_S)[0]:
                    continue
                client, _ = self._listener.accept()
            except (OSError, ValueError):  # closed by stop()
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            record = bytearray()
            pumps = [
                threading.Thread(target=self._pump, args=(client, upstream, record), daemon=True),
                threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True),
            ]
            with self._lock:
                self._sent.append(record)
                self._sockets += [client, upstream]
                self._threads += pumps
            for pump in pumps:
                pump.start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        try:
            while self._running():
                if not select.select([src], [], [], POLL_S)[0]:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                if record is not None:
                    with self._lock:
                        record.extend(data)
                dst.sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


@dataclass(frozen=True)
class HttpRequest:
    """One request of a connection's client-to-server bytes: its first line, header block and decoded body."""

    line: str
    head: bytes
    body: bytes


def http_requests(stream: bytes) -> Iterator[HttpRequest]:
    """The HTTP/1.1 requests in one connection's client-to-server bytes (the last may be cut short).

    Bodies are de-chunked, so a chunk boundary cannot split what `find_leaks` looks for. Anything
    that is not plain HTTP/1.1 (another protocol, an encoded body) raises ValueError: bytes that
    cannot be decoded cannot be vouched for.
    """
    pos = 0
    while pos < len(stream):
        end = stream.find(b"\r\n\r\n", pos)
        head = stream[pos:] if end < 0 else stream[pos:end]
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        if end < 0 and re.match(r"[A-Z]{1,10}( |$)", line):  # the request being sent when the capture was read
            yield HttpRequest(line, head, b"")
            return
        if not re.fullmatch(r"[A-Z]+ \S+ HTTP/1\.1", line):
            raise ValueError(f"not an HTTP/1.1 request at byte {pos}: {line[:60]!r}")
        pos = end + 4
        headers: dict[str, str] = {}
        for raw in head.split(b"\r\n")[1:]:
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if headers.get("content-encoding", "identity") != "identity":
            raise ValueError(f"{line}: content-encoding {headers['content-encoding']!r} is not decoded here")
        transfer = headers.get("transfer-encoding", "")
        if transfer == "chunked":
            body, pos = _dechunk(stream, pos)
        elif transfer:
            raise ValueError(f"{line}: transfer-encoding {transfer!r} is not decoded here")
        else:
            size = int(headers.get("content-length", "0"))
            body, pos = stream[pos : pos + size], pos + size
        yield HttpRequest(line, head, body)


def _dechunk(stream: bytes, pos: int) -> tuple[bytes, int]:
    body = bytearray()
    while True:
        end = stream.find(b"\r\n", pos)
        if end < 0:
            return bytes(body), len(stream)
        size = int(stream[pos:end].split(b";")[0], 16)
        pos = end + 2
        if size == 0:
            trailer_end = stream.find(b"\r\n\r\n", pos - 2)
            return bytes(body), len(stream) if trailer_end < 0 else trailer_end + 4
        body += stream[pos : pos + size]
        pos += size + 2


@dataclass(frozen=True)
class Leak:
    what: str
    """Which probe was found."""
    connection: int
    where: str
    """`raw bytes`, or `<request line> head|body`."""


def find_leaks(streams: Sequence[bytes], probes: Mapping[str, bytes]) -> list[Leak]:
    """Every place a probe occurs in what a node sent: each connection's raw bytes and decoded requests.

    A connection that cannot be decoded as HTTP/1.1 is itself reported (probe `undecodable`).
    """
    leaks: list[Leak] = []
    for n, stream in enumerate(streams):
        views: list[tuple[str, bytes]] = [("raw bytes", stream)]
        try:
            for request in http_requests(stream):
                views += [(f"{request.line} head", request.head), (f"{request.line} body", request.body)]
        except ValueError as exc:
            leaks.append(Leak("undecodable", n, str(exc)))
        leaks += [Leak(what, n, where) for where, data in views for what, probe in probes.items() if probe in data]
    return leaks


def assert_no_leaks(streams: Sequence[bytes], probes: Mapping[str, bytes], who: str) -> None:
    """The egress check: none of `probes` in any byte `who` sent."""
    leaks = find_leaks(streams, probes)
    assert not leaks, f"{who} sent what must stay home:\n" + "\n".join(map(str, leaks[:20]))


def request_bodies(streams: Sequence[bytes]) -> bytes:
    """Every decoded request body a node sent, concatenated (for checks that something did go through)."""
    return b"".join(request.body for stream in streams for request in http_requests(stream))


# ---- a partner's private data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Partner:
    """A partner's node: its data folder (named with its canary), its work folder, its canary row."""

    index: int
    canary: str
    data_dir: Path
    workdir: Path
    canary_row: np.ndarray
    """float32 features whose in-memory bytes spell the canary (one such row in every data file)."""

    def probes(self) -> dict[str, bytes]:
        """Byte patterns that must never leave this partner's node."""
        row32, row64 = self.canary_row.astype("<f4").tobytes(), self.canary_row.astype("<f8").tobytes()
        out = {
            "canary text": self.canary.encode(),
            "data-dir path": str(self.data_dir).encode(),
            "data-dir name": self.data_dir.name.encode(),
            "canary row as CSV text": ",".join(f"{v:.9g}" for v in self.canary_row).encode(),
            "canary row (float32)": row32,
            "canary row (float64)": row64,
        }
        for j in range(len(self.canary_row) - 1):  # any two neighbouring features, as sent in a tensor
            out[f"canary features {j}-{j + 1} (float32)"] = row32[4 * j : 4 * j + 8]
            out[f"canary features {j}-{j + 1} (float64)"] = row64[8 * j : 8 * j + 16]
        return out


def canary_row(canary: str, features: int) -> np.ndarray:
    """float32 values whose little-endian bytes are 3 canary characters and then `A` (0x41): all in [8, 16).

    A value of that size is an unremarkable outlier for the synthetic task, and its bytes in a
    float32 tensor (how the node holds it) read as the canary's characters.
    """
    text = (canary.encode() * features)[: 3 * features]
    row = np.frombuffer(b"".join(text[3 * j : 3 * j + 3] + b"A" for j in range(features)), dtype="<f4").copy()
    assert np.all((row >= 8) & (row < 16)), row
    return row


def make_partner(base: Path, index: int, rows: LabeledArrays) -> Partner:
    """Write partner `index`'s data-dir: two CSV files of its rows, each with a canary comment and a canary row."""
    canary = f"WEFTCANARY{secrets.token_hex(8).upper()}"
    data_dir = base / f"partner-{index}-data-{canary}"
    row = canary_row(canary, synthetic_task.FEATURES)
    for part, idx in zip("ab", np.array_split(np.arange(len(rows)), 2), strict=True):
        shard = rows.subset(idx)
        with_canary = LabeledArrays(np.vstack([shard.features, row[None]]), np.append(shard.labels, 0))
        path = write_labeled_csv(data_dir / f"rows-{part}.csv", with_canary)
        path.write_text(f"# partner {index}'s private rows; canary {canary}\n{path.read_text()}")
    partner = Partner(index, canary, data_dir, base / f"node-{index}-work", row)
    # The node really holds the canary: its data, as the task reads it, has the canary row's bytes.
    local = load_local(synthetic_task.task, data_dir)
    held = b"".join(ds.tensors[0].numpy().tobytes() for ds in (local.train, local.val))  # type: ignore[attr-defined]
    assert row.tobytes() in held
    return partner


# ---- the deployment -------------------------------------------------------------------------------------


def toml_str(value: Path | str) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


@dataclass(frozen=True)
class Deployment:
    base: Path
    out: Path
    keys: Path
    partners: list[Partner]
    egress: list[list[bytes]]
    """What each node sent to the SuperLink during the run, per connection (through its EgressProxy)."""
    run_proc: subprocess.CompletedProcess[str]
    runs: list[dict[str, Any]]
    run_wall_s: float
    logs: str


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    t0 = time.monotonic()
    base = tmp_path_factory.mktemp("deploy")
    keys, out = base / "keys", base / "out"
    manifest = base / "manifest.json"

    app = base / "weft-app"
    write_app(app)  # what `python -m federation.apps weft-app` does: a config-only app, no code in the FAB
    link_port, *node_ports = free_ports(1 + NODES)
    cli_home = base / "flwr-home-cli"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )

    servers: list[Server] = []
    proxies: list[EgressProxy] = []
    try:
        # ---- SuperLink (operator); it starts up while the keys and the partners' data are made ----------
        link = start(
            "superlink",
            [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
             "--database", str(base / "superlink.db"), "--host", "127.0.0.1", "--port", str(link_port)],
            base / "flwr-home-link", base,
        )  # fmt: skip
        servers.append(link)

        # ---- keys (operator and each partner, beforehand) and the manifest (operator) --------------------
        weft("keygen", "--out", str(keys), "--name", "coordinator")
        weft("manifest", "init", str(manifest), "--federation-id", FEDERATION_ID,
             "--coordinator-key", str(keys / "coordinator.pub"),
             "--coordinator-key-file", str(keys / "coordinator.key"))  # fmt: skip
        for i in range(NODES):
            weft("keygen", "--out", str(keys), "--name", f"node-{i}")
            weft("manifest", "add", str(manifest), "--name", f"node-{i}", "--key", str(keys / f"node-{i}.pub"),
                 "--jurisdiction", "DE", "--max-examples", "2000",
                 "--coordinator-key-file", str(keys / "coordinator.key"))  # fmt: skip

        # ---- each partner's own data: an IID half of the synthetic training pool, as CSV files -----------
        pool = synthetic_task.load_data(0).train
        shards = np.array_split(np.random.default_rng(7).permutation(len(pool)), NODES)
        partners = [make_partner(base, i, pool.subset(shard)) for i, shard in enumerate(shards)]
        wait_for_port(link_port, link, START_TIMEOUT_S)

        # ---- SuperNodes (partners), each reaching the SuperLink through its own egress proxy ------------
        for p in partners:
            proxy = EgressProxy(f"egress-{p.index}", link_port, START_TIMEOUT_S + RUN_TIMEOUT_S + 2 * CLI_TIMEOUT_S)
            proxies.append(proxy)
            node_config = " ".join(
                [
                    f"key={toml_str(keys / f'node-{p.index}.key')}",
                    f"coordinator-key={toml_str(keys / 'coordinator.pub')}",
                    f"federation-id={toml_str(FEDERATION_ID)}",
                    f"workdir={toml_str(p.workdir)}",
                    f"data-dir={toml_str(p.data_dir)}",
                    'task="synthetic"',
                    f"personalize-epochs={PERSONALIZE_EPOCHS[p.index]}",
                    'device="cpu"',
                ]
            )
            node = start(
                f"supernode-{p.index}",
                [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{proxy.port}",
                 "--host", "127.0.0.1", "--port", str(node_ports[p.index]), "--node-config", node_config],
                base / f"flwr-home-node-{p.index}", base,
            )  # fmt: skip
            servers.append(node)

        # ---- the run (operator) --------------------------------------------------------------------------
        run_config = " ".join(
            [
                f"rounds={ROUNDS}",
                'task="synthetic"',
                "local-epochs=1",
                "quorum=1.0",  # wait for, and require, both nodes in every round
                "round-timeout-s=120.0",
                "personalize=true",  # after the last round: each node's personalize-epochs, one evaluate message
                "federated-evaluation=false",  # saves an evaluate message per node and round (~10 s here)
                f"manifest={toml_str(manifest)}",
                f"coordinator-key={toml_str(keys / 'coordinator.key')}",
                f"out-dir={toml_str(out)}",
            ]
        )
        started = time.monotonic()
        run_proc = run_cli(
            [str(BIN / "flwr"), "run", str(app), CONNECTION, "--stream", "--run-config", run_config],
            cli_home, base, timeout=RUN_TIMEOUT_S,
        )  # fmt: skip
        run_wall_s = time.monotonic() - started
        egress = [proxy.sent() for proxy in proxies]
        for server in servers:
            server.remember_children()
            assert server.proc.poll() is None, f"{server.name} died during the run:\n{tail(server.log)}"

        ls = run_cli([str(BIN / "flwr"), "ls", CONNECTION, "--format", "json"], cli_home, base)
        assert ls.returncode == 0, f"flwr ls failed:\n{ls.stdout}\n{ls.stderr}"
        started_run = re.search(r"Successfully started run (\d+)", run_proc.stdout)
        runs = [r for r in json.loads(ls.stdout)["runs"] if started_run and r["run-id"] == started_run.group(1)]
        logs = "\n".join(
            [f"== flwr run (exit {run_proc.returncode}) ==\n{run_proc.stdout[-4000:]}\n{run_proc.stderr[-3000:]}"]
            + [f"== {s.name} ==\n{tail(s.log)}" for s in servers]
        )
        print(
            f"\ndeployment: set-up {started - t0:.1f} s, flwr run {run_wall_s:.1f} s, "
            f"total so far {time.monotonic() - t0:.1f} s; node->link bytes "
            f"{[sum(map(len, streams)) for streams in egress]}",
            file=sys.stderr,
        )
        yield Deployment(base, out, keys, partners, egress, run_proc, runs, run_wall_s, logs)
    finally:
        t_stop = time.monotonic()
        for server in reversed(servers):  # supernodes first, then the SuperLink
            server.stop()
        for proxy in proxies:
            proxy.stop()
        print(f"deployment: stopped in {time.monotonic() - t_stop:.1f} s", file=sys.stderr)


# ---- checks -------------------------------------------------------------------------------------------------


def test_flwr_run_finishes_completed(deployment: Deployment) -> None:
    d = deployment
    assert d.run_proc.returncode == 0, d.logs
    assert len(d.runs) == 1, f"{d.runs}\n{d.logs}"
    run = d.runs[0]
    assert run["status"] == "finished:completed", f"{run}\n{d.logs}"


def test_summary_records_two_rounds_of_both_nodes(deployment: Deployment) -> None:
    d = deployment
    summary_file = d.out / "summary.json"
    assert summary_file.is_file(), d.logs
    s = json.loads(summary_file.read_text())
    assert s["status"] == "completed", f"{s}\n{d.logs}"
    assert (s["rounds"], s["accepted"], s["rejected"]) == (ROUNDS, ROUNDS * NODES, 0), f"{s}\n{d.logs}"
    assert s["federation_id"] == FEDERATION_ID
    # the resolved config: what the operator set, weft's defaults for the keys left "" (not set)
    keys = ("task", "rounds", "local-epochs", "learning-rate", "personalize", "federated-evaluation")
    assert {k: s["config"][k] for k in keys} == {
        "task": "synthetic", "rounds": ROUNDS, "local-epochs": 1, "learning-rate": 0.1, "personalize": True,
        "federated-evaluation": False,
    }  # fmt: skip
    lines = [json.loads(line) for line in (d.out / "metrics.jsonl").read_text().splitlines()]
    rounds = [line for line in lines if "round" in line]
    assert [line["round"] for line in rounds] == list(range(1, ROUNDS + 1))
    assert all(line["accepted"] == NODES and line["rejected"] == 0 for line in rounds), lines


def test_global_model_verifies_offline(deployment: Deployment) -> None:
    d = deployment
    proc = run_cli(
        [str(BIN / "weft"), "verify-model", str(d.out / "global_model.npz"),
         "--coordinator-key", str(d.keys / "coordinator.pub")],
        d.base / "flwr-home-cli", d.base,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{d.logs}"
    assert f"federation {FEDERATION_ID}" in proc.stdout and f"round {ROUNDS}" in proc.stdout, proc.stdout


def test_each_node_kept_its_local_model(deployment: Deployment) -> None:
    d = deployment
    for p in d.partners:
        assert (p.workdir / "local_model.npz").is_file(), f"{p.workdir}\n{d.logs}"
        # personalize-epochs from the node config: only a partner that asked for it keeps a personal model
        assert (p.workdir / PERSONAL_FILE).is_file() == (PERSONALIZE_EPOCHS[p.index] > 0), f"{p.workdir}\n{d.logs}"
    personal = json.loads((d.out / "summary.json").read_text()).get("personalization")
    assert personal is not None and len(personal) == NODES, f"{personal}\n{d.logs}"
    assert sorted(bool(row["after"]) for row in personal) == sorted(e > 0 for e in PERSONALIZE_EPOCHS), personal


def test_updates_went_through_the_egress_proxies(deployment: Deployment) -> None:
    # The capture is not vacuous: every array of each node's last update is in what its proxy saw.
    d = deployment
    for p, streams in zip(d.partners, d.egress, strict=True):
        bodies = request_bodies(streams)
        assert len(bodies) > 10_000, f"node {p.index} sent only {len(bodies)} body bytes\n{d.logs}"
        for name, array in load_local_model(p.workdir).items():
            assert array.tobytes() in bodies, f"node {p.index}: its update's {name!r} did not go through the proxy"


def test_nothing_of_a_data_dir_leaves_its_node(deployment: Deployment) -> None:
    d = deployment
    probes = {f"partner {p.index} {what}": probe for p in d.partners for what, probe in p.probes().items()}
    for p, streams in zip(d.partners, d.egress, strict=True):
        assert streams, f"node {p.index} sent nothing through its proxy\n{d.logs}"
        assert_no_leaks(streams, probes, f"node {p.index}")


def test_the_egress_check_catches_a_leaking_node(tmp_path: Path) -> None:
    """The same proxy and check, over a node that puts a data row, the canary and its data-dir into a reply.

    The reply is built with the node's own `train_reply` (its metric name carries the canary, an
    extra array carries a raw data row) plus a record naming the data-dir, and pushed object by
    object with Flower's own Fleet HTTP client, as a SuperNode does; a second request sends the
    canary split across two HTTP chunks.
    """
    from flwr.app import ConfigRecord
    from flwr.proto.message_pb2 import PushObjectResponse
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_push_object_fn_protobuf
    from flwr.supernode.fleet_http_client import FleetHttpClient

    from node.egress import train_reply
    from protocols import SignedBlob

    pool = synthetic_task.load_data(0).train
    partner = make_partner(tmp_path, 0, pool.subset(np.arange(20)))
    row = partner.canary_row
    leaky = train_reply(
        {"0.weight": np.zeros((16, 8), np.float32), "sample": row[None]},
        SignedBlob(b"{}", b"signature"),
        20,
        {"train_loss": 0.5, f"train_{partner.canary}": 1.0},
    )
    leaky["debug"] = ConfigRecord({"read-from": str(partner.data_dir / "rows-a.csv")})

    stored = PushObjectResponse(stored=True).SerializeToString()

    class FleetStub(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            if self.headers.get("Transfer-Encoding", "") == "chunked":
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    self.rfile.read(size + 2)
                self.rfile.readline()
            else:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Type", "application/protobuf")
            self.send_header("Content-Length", str(len(stored)))
            self.end_headers()
            self.wfile.write(stored)

        def log_message(self, *args: Any) -> None:
            pass

    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FleetStub)
    stub.daemon_threads = True
    serving = threading.Thread(target=stub.serve_forever, kwargs={"poll_interval": POLL_S}, daemon=True)
    serving.start()
    proxy = EgressProxy("egress-leaky", int(stub.server_address[1]), lifetime_s=60)
    try:
        with FleetHttpClient.from_server_address(f"127.0.0.1:{proxy.port}", True, None, []) as client:
            push = make_push_object_fn_protobuf(client.PushObject, Node(node_id=1), 1, "session")
            for object_id, obj in get_all_nested_objects(leaky).items():
                push(object_id, obj.deflate())
        text = f"leaked {partner.canary}".encode()
        cut = text.index(b"CANARY") + 3  # the chunk boundary splits the canary
        chunked = httpx.post(f"http://127.0.0.1:{proxy.port}/leak", content=iter([text[:cut], text[cut:]]), timeout=10)
        assert chunked.status_code == 200
        streams = proxy.sent()
    finally:
        proxy.stop()
        stub.shutdown()
        stub.server_close()
        serving.join(timeout=STOP_TIMEOUT_S)

    found = {(leak.what, leak.where.rsplit(" ", 1)[-1]) for leak in find_leaks(streams, partner.probes())}
    for expected in ("canary text", "canary row (float32)", "canary features 2-3 (float32)", "data-dir path"):
        assert (expected, "body") in found, f"{expected} not reported; found {sorted(found)}"
    # the chunked request's canary is found only once its body is de-chunked, not in the raw bytes
    chunked_leaks = [leak for leak in find_leaks(streams, partner.probes()) if "/leak" in leak.where]
    assert [(leak.what, leak.where) for leak in chunked_leaks if leak.what == "canary text"] == [
        ("canary text", "POST /leak HTTP/1.1 body")
    ], chunked_leaks
    with pytest.raises(AssertionError, match="leaky node sent what must stay home"):
        assert_no_leaks(streams, partner.probes(), "leaky node")


def test_traffic_the_check_cannot_decode_is_reported() -> None:
    # The check vouches only for bytes it can read: another protocol or an encoded body is a finding.
    http2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(9)
    gzipped = b"POST /v1/fleet/push-object HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc"
    for stream in (http2, gzipped):
        assert [leak.what for leak in find_leaks([stream], {"canary": b"WEFTCANARY"})] == ["undecodable"]
