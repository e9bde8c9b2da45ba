"""Long-running Flower processes: start each in its own session, stop it with everything it spawned.

Flower's SuperLink and SuperNode spawn `flower-superexec` detached (a session of its own), which then
spawns the ServerApp / ClientApp processes. Signalling the process group does not reach those, so
`Child.stop` also signals every descendant it has seen (found through /proc on Linux) and waits,
bounded, before it kills what is left. Every wait here has a deadline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("weft.deploy")

STOP_TIMEOUT_S = 15.0
"""How long a stopped process (and what it spawned) gets after SIGTERM before SIGKILL."""
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "PYTHONUNBUFFERED": "1",
}
"""Set for every Flower process weft starts: no telemetry, no update check, no code installation."""


class Stopped(Exception):
    """SIGTERM or SIGINT arrived while a weft command was supervising processes."""


def flower_env(flwr_home: Path, extra_path: Sequence[Path] = ()) -> dict[str, str]:
    """The environment of a Flower process: no inherited FLWR_* settings, its own FLWR_HOME, this venv on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    path = [str(p) for p in extra_path] + [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    env.update(FLOWER_ENV, FLWR_HOME=str(flwr_home.resolve()), PATH=os.pathsep.join(path))
    return env


def children_of(pid: int) -> list[int]:
    """All live descendants of `pid`, detached ones included while their parent lives (Linux /proc)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    parents: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def is_alive(pid: int) -> bool:
    """Whether `pid` runs and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


@dataclass
class Child:
    """A process started in its own session (its pgid is its pid)."""

    name: str
    proc: subprocess.Popen[bytes]
    spawned: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        """The process id (and process group id)."""
        return int(self.proc.pid)

    def remember_children(self) -> None:
        """Note its current descendants, so `stop` reaches them even after it is gone."""
        self.spawned.update(children_of(self.pid))

    def poll(self) -> int | None:
        """Its exit status, or None while it runs."""
        return self.proc.poll()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the group and every descendant seen; after `timeout_s`, SIGKILL what is left."""
        self.remember_children()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)
        for pid in self.spawned:
            _signal(pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while any(is_alive(p) for p in self.spawned) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.spawned:
            if is_alive(pid):
                _signal(pid, signal.SIGKILL)


def start_child(
    name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path, output: IO[Any] | int | None = None
) -> Child:
    """Start `argv` in a new session; its output goes to `output` (default: this process's)."""
    proc = subprocess.Popen(
        list(argv), cwd=cwd, env=dict(env), stdout=output, stderr=subprocess.STDOUT if output else None,
        start_new_session=True,
    )  # fmt: skip
    return Child(name, proc)


def wait_for_port(host: str, port: int, child: Child, timeout_s: float) -> None:
    """Wait until `host:port` accepts connections; raise RuntimeError if `child` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"{child.name} exited with status {child.poll()} before listening on {host}:{port}")
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.25)
    raise RuntimeError(f"{child.name} did not listen on {host}:{port} within {timeout_s:.0f} s")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into `Stopped` while the block runs, so `finally` clauses stop children."""

    def handler(signum: int, _frame: Any) -> None:
        raise Stopped(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def launcher_script(package: str) -> Path:
    """The path of `package/flower_launch.py`, found without importing `package` (node would import torch)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"cannot find the {package} package")
    return Path(spec.origin).parent / "flower_launch.py"
