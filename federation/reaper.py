"""Nothing a simulation starts outlives it (Linux).

Ray's local head is started by the `weft simulate` process itself. Its gcs_server and raylet die with
that process (Ray sets PR_SET_PDEATHSIG on them), but the raylet's own children, `ray::DashboardAgent`
and `ray::RuntimeEnvAgent`, do not: when `weft simulate` is killed (SIGKILL, or SIGTERM) they are
re-parented to init and live on for about a minute, until their own health check notices. Their
command lines are rewritten (`ray::DashboardAgent`), so the run's folder does not find them.

So the run marks what its Ray starts, and a watchdog outside it kills what is marked:

1. `Reaper.start()` draws a random token and spawns a tiny watchdog (this file run as a script, the
   standard library only) in its own session, so a Ctrl-C to the terminal's process group leaves it
   alone. Its stdin is a pipe from the simulating process.
2. While Ray starts, `Reaper.tagged()` puts `WEFT_RUN_TOKEN=<token>` into the environment, so the
   gcs_server, the raylet and what they spawn inherit it; then `report_session()` tells the watchdog
   Ray's session folder (`/tmp/ray/session_...`), into which every Ray process keeps its logs open.
   (An orphaned agent may rewrite its /proc environ, so the token alone is not enough.)
3. When the simulating process dies, however it dies, the kernel closes the pipe: the watchdog wakes
   at once, sends SIGTERM to every marked process (token in its environment, or a log open in the
   session folder while in the run's terminal session), SIGKILL to those still there after a grace
   period, and exits. On a normal end, `Reaper.close()` does the same in-process after Ray's own
   shutdown and lets the watchdog go.

A Ray cluster the run merely connected to (`--ray-address`), other runs, and the shell around
`weft simulate` are not touched. Linux only: elsewhere (no /proc) the reaper finds nothing to do.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "WEFT_RUN_TOKEN"
"""The environment variable that marks every process a simulation's Ray starts."""
GRACE_S = 3.0
"""How long tagged processes get to exit after SIGTERM before SIGKILL."""


@dataclass(frozen=True)
class Marks:
    """How a run's processes are recognised."""

    token: str
    """`WEFT_RUN_TOKEN=<token>` in the environment."""
    sessions: tuple[str, ...] = ()
    """Ray session folders: a process with a file open in one is Ray's ..."""
    sid: int | None = None
    """... if it also belongs to this terminal session (what Ray spawns inherits it; a `tail -f` elsewhere does not)."""


def marked_processes(marks: Marks, exclude: frozenset[int] = frozenset()) -> list[int]:
    """PIDs of live processes that carry `marks` (Linux /proc; elsewhere none). Never this process."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    token = f"{TOKEN_ENV}={marks.token}".encode()
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude or int(entry.name) == os.getpid():
            continue
        try:
            if token in (entry / "environ").read_bytes().split(b"\0") or _in_session(entry, marks):
                found.append(int(entry.name))
        except OSError:  # gone, a zombie, or not ours to read
            continue
    return found


def _in_session(entry: Path, marks: Marks) -> bool:
    if not marks.sessions or marks.sid is None or os.getsid(int(entry.name)) != marks.sid:
        return False
    for fd in (entry / "fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if any(target.startswith(f"{session}/") for session in marks.sessions):
            return True
    return False


def reap(marks: Marks, exclude: frozenset[int] = frozenset(), grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM every process that carries `marks`, SIGKILL what is left after `grace_s`; return whom it signalled.

    Scans again after each pass, so processes spawned during the teardown (a worker the raylet was
    starting) are caught too.
    """
    signalled: set[int] = set()
    deadline = time.monotonic() + grace_s
    while True:
        pids = marked_processes(marks, exclude)
        if not pids:
            return sorted(signalled)
        late = time.monotonic() >= deadline
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
            except OSError:
                continue
            signalled.add(pid)
        if late:
            time.sleep(0.1)
            if time.monotonic() > deadline + grace_s:  # unkillable (e.g. stuck in the kernel): give up
                return sorted(signalled)
        else:
            time.sleep(0.1)


class Reaper:
    """One simulation's watchdog: its token, and the pipe whose closing tells it to reap."""

    def __init__(self, token: str, watchdog: subprocess.Popen[bytes] | None) -> None:
        self.token = token
        self._watchdog = watchdog
        self._sessions: list[str] = []

    @classmethod
    def start(cls) -> Reaper:
        """Draw a token and spawn the watchdog (it reaps when this process dies or `close` is called)."""
        token = secrets.token_hex(16)
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        watchdog = subprocess.Popen(
            [sys.executable, "-I", __file__, token, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C to the terminal's process group must not kill it first
            close_fds=True,
        )
        return cls(token, watchdog)

    @contextmanager
    def tagged(self) -> Iterator[None]:
        """Processes spawned from this process inside the block carry the token (this process's own
        environment holds it only for the duration of the block)."""
        before = os.environ.get(TOKEN_ENV)
        os.environ[TOKEN_ENV] = self.token
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(TOKEN_ENV, None)
            else:
                os.environ[TOKEN_ENV] = before

    def report_session(self, session_dir: str) -> None:
        """Tell the watchdog the Ray session folder the run started (its processes keep their logs open there)."""
        self._sessions.append(session_dir)
        if self._watchdog is not None and self._watchdog.stdin is not None:
            try:
                self._watchdog.stdin.write(f"{session_dir}\n".encode())
                self._watchdog.stdin.flush()
            except OSError:  # the watchdog is gone; close() still reaps in-process
                pass

    def close(self, grace_s: float = GRACE_S) -> list[int]:
        """Reap what is left now (call after Ray's own shutdown) and let the watchdog exit."""
        marks = Marks(self.token, tuple(self._sessions), os.getsid(0))
        signalled = reap(marks, frozenset({os.getpid()}), grace_s)
        if self._watchdog is not None:
            watchdog, self._watchdog = self._watchdog, None
            if watchdog.stdin is not None:
                watchdog.stdin.close()
            try:
                watchdog.wait(timeout=grace_s + 5)
            except subprocess.TimeoutExpired:
                watchdog.kill()
                watchdog.wait()
        return signalled


def _watch(token: str, parent: int) -> None:
    """Collect session folders from stdin until it closes (the parent died or let go) or the parent is gone; reap."""
    sid = os.getsid(parent)
    stdin = sys.stdin.fileno()
    received = b""
    while True:
        ready, _, _ = select.select([stdin], [], [], 1.0)
        if ready:
            chunk = os.read(stdin, 4096)
            if not chunk:
                break
            received += chunk
        if os.getppid() != parent:  # re-parented: the parent died (a fallback; the pipe closes first)
            break
    sessions = tuple(line for line in received.decode(errors="replace").split("\n") if line.startswith("/"))
    reap(Marks(token, sessions, sid), frozenset({parent}) if _alive(parent) else frozenset())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


if __name__ == "__main__":  # the watchdog: python -I reaper.py TOKEN PARENT_PID
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch(sys.argv[1], int(sys.argv[2]))
