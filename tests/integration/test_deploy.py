"""A real deployment on loopback: one SuperLink, two SuperNodes, `flwr run`, two signed rounds.

Everything a person would do by hand (docs/DEPLOY.md walks through the same commands): keys with
`weft keygen`, a manifest with `weft manifest init/add`, `flower-superlink` and two
`flower-supernode`s bound to 127.0.0.1 on free ports, each with its own FLWR_HOME, then
`flwr run --stream` on a config-only app folder. `flwr run` exits 0 even when the run fails, so the
run's status is read back with `flwr ls --format json`, and the record the coordinator wrote is
checked: summary, an offline-verifiable signed global model, and each node's local model.

Every process started here is stopped by PID in the fixture's teardown, together with the
processes it spawned (flower-superexec, flwr-serverapp, flwr-clientapp), found through /proc.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from federation.apps import write_app

pytestmark = [pytest.mark.integration, pytest.mark.skipif(sys.platform != "linux", reason="uses /proc")]

BIN = Path(sys.executable).parent  # weft, flwr, flower-superlink, flower-supernode live next to python
FEDERATION_ID = "weft-loopback"
NODES = 2
ROUNDS = 2
CONNECTION = "weft-test"

START_TIMEOUT_S = 60  # SuperLink port open
RUN_TIMEOUT_S = 300  # the whole `flwr run --stream`
CLI_TIMEOUT_S = 60  # short CLI calls
STOP_TIMEOUT_S = 15  # per process, after SIGTERM


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


# ---- the deployment -------------------------------------------------------------------------------------


def toml_str(value: Path | str) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


@dataclass(frozen=True)
class Deployment:
    base: Path
    out: Path
    keys: Path
    workdirs: list[Path]
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
    try:
        # ---- SuperLink (operator); it starts up while the keys are made ---------------------------------
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
             "--coordinator-key", str(keys / "coordinator.pub"))  # fmt: skip
        for i in range(NODES):
            weft("keygen", "--out", str(keys), "--name", f"node-{i}")
            weft("manifest", "add", str(manifest), "--name", f"node-{i}", "--key", str(keys / f"node-{i}.pub"),
                 "--jurisdiction", "DE", "--max-examples", "2000")  # fmt: skip
        wait_for_port(link_port, link, START_TIMEOUT_S)

        # ---- SuperNodes (partners) -----------------------------------------------------------------------
        workdirs = [base / f"node-{i}-work" for i in range(NODES)]
        for i, workdir in enumerate(workdirs):
            node_config = " ".join(
                [
                    f"key={toml_str(keys / f'node-{i}.key')}",
                    f"coordinator-key={toml_str(keys / 'coordinator.pub')}",
                    f"federation-id={toml_str(FEDERATION_ID)}",
                    f"workdir={toml_str(workdir)}",
                    f"partition-id={i}",
                    f"num-partitions={NODES}",
                    'task="synthetic"',
                    'device="cpu"',
                ]
            )
            node = start(
                f"supernode-{i}",
                [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                 "--host", "127.0.0.1", "--port", str(node_ports[i]), "--node-config", node_config],
                base / f"flwr-home-node-{i}", base,
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
            f"total so far {time.monotonic() - t0:.1f} s",
            file=sys.stderr,
        )
        yield Deployment(base, out, keys, workdirs, run_proc, runs, run_wall_s, logs)
    finally:
        t_stop = time.monotonic()
        for server in reversed(servers):  # supernodes first, then the SuperLink
            server.stop()
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
    lines = [json.loads(line) for line in (d.out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(1, ROUNDS + 1))
    assert all(line["accepted"] == NODES and line["rejected"] == 0 for line in lines), lines


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
    for workdir in d.workdirs:
        assert (workdir / "local_model.npz").is_file(), f"{workdir}\n{d.logs}"
