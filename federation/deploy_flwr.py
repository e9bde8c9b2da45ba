"""The operator's calls to Flower's `flwr` CLI: connection, SuperNode registration, run, status.

Every call runs `flwr` from this virtualenv with the coordinator's own FLWR_HOME (never `~/.flwr`)
and a time limit. `flwr` prints JSON with `"success": false` and still exits 0 on many failures, and
`flwr run` exits 0 when the run failed, so results are read from the JSON, and a run's outcome
from `flwr ls --run-id`.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

from federation.config import DeploymentSettings, RunConfig
from federation.deploy_proc import flower_env
from federation.errors import ConfigError

CONNECTION = "weft"
"""The name of the SuperLink connection in the coordinator's CLI config."""
CLI_TIMEOUT_S = 120.0
"""Time limit of one short `flwr` call (a cold `flwr` start alone takes 1-2 s)."""
SET_BY_WEFT = ("manifest", "coordinator-key", "out-dir")
"""Run-config keys `weft coordinator start` sets itself from its flags."""
ALREADY_REGISTERED = "[code: 23]"
"""Flower's ApiErrorCode 23, "Public key already in use": the key is registered already."""

_RUN_ID = re.compile(r"Successfully started run (\d+)")


def flwr_bin() -> Path:
    """The `flwr` console script next to this Python."""
    return Path(sys.executable).parent / "flwr"


@dataclass(frozen=True)
class FlwrCli:
    """`flwr` with the coordinator's own FLWR_HOME holding one connection, `weft`."""

    home: Path

    def write_connection(self, address: str, root_cert: Path) -> None:
        """The connection to the SuperLink: TLS verified against `root_cert` (an absolute path, as flwr needs)."""
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f"address = {json.dumps(address)}\nroot-certificates = {json.dumps(str(root_cert.resolve()))}\n"
        )

    def call(self, *args: str, timeout_s: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run `flwr ARGS` and return what it printed."""
        return subprocess.run(
            [str(flwr_bin()), *args], env=flower_env(self.home), capture_output=True, text=True,
            timeout=timeout_s, check=False,
        )  # fmt: skip

    def call_json(self, *args: str, timeout_s: float = CLI_TIMEOUT_S) -> dict[str, Any]:
        """`flwr ARGS --format json`, parsed; RuntimeError with flwr's own message when it did not succeed."""
        proc = self.call(*args, "--format", "json", timeout_s=timeout_s)
        try:
            doc = json.loads(proc.stdout)
        except json.JSONDecodeError:
            doc = {"success": False, "error-message": (proc.stderr or proc.stdout).strip()[-500:]}
        if not isinstance(doc, dict) or not doc.get("success"):
            message = str(doc.get("error-message", doc)) if isinstance(doc, dict) else str(doc)
            raise RuntimeError(f"flwr {args[0]} {args[1] if len(args) > 1 else ''}: {_one_line(message)}")
        return doc

    def register(self, public_key: Path, name: str) -> int | None:
        """Register a SuperNode key; the new node id, or None when the key was registered before."""
        try:
            doc = self.call_json("supernode", "register", str(public_key), CONNECTION, "--name", name)
        except RuntimeError as exc:
            if ALREADY_REGISTERED in str(exc):
                return None
            raise
        return int(doc["node-id"])

    def unregister(self, node_id: int) -> None:
        """Revoke a SuperNode (its key can no longer connect)."""
        self.call_json("supernode", "unregister", str(node_id), CONNECTION)

    def stop_run(self, run_id: int) -> None:
        """Ask the SuperLink to stop a run (`flwr stop`)."""
        self.call_json("stop", str(run_id), CONNECTION)

    def run_status(self, run_id: int) -> dict[str, Any]:
        """The run's row of `flwr ls --run-id` (status, status-details, fab-hash, ...)."""
        doc = self.call_json("ls", CONNECTION, "--run-id", str(run_id))
        runs = doc.get("runs") or []
        if not runs:
            raise RuntimeError(f"flwr ls: no run {run_id}")
        return dict(runs[0])

    def wait_finished(self, run_id: int, timeout_s: float, poll_s: float = 2.0) -> dict[str, Any]:
        """Poll `run_status` until the status starts with `finished` (bounded); the last row seen."""
        deadline = time.monotonic() + timeout_s
        row = self.run_status(run_id)
        while not str(row.get("status", "")).startswith("finished") and time.monotonic() < deadline:
            time.sleep(poll_s)
            row = self.run_status(run_id)
        return row


@dataclass(frozen=True)
class StreamedRun:
    """What `flwr run --stream` left: its exit status, the run id it printed (None if none), whether it timed out."""

    returncode: int
    run_id: int | None
    timed_out: bool = False


def stream_run(
    cli: FlwrCli, app_dir: Path, run_config: str, timeout_s: float, out: IO[str], on_start: Callable[[int], None]
) -> StreamedRun:
    """`flwr run APP weft --stream --run-config ...`, echoing its output to `out`; bounded by `timeout_s`.

    `on_start(run_id)` is called as soon as the run id is printed.
    """
    proc = subprocess.Popen(
        [str(flwr_bin()), "run", str(app_dir), CONNECTION, "--stream", "--run-config", run_config],
        env=flower_env(cli.home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )  # fmt: skip
    found: list[int] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            out.flush()
            match = _RUN_ID.search(line)
            if match and not found:
                found.append(int(match.group(1)))
                on_start(found[0])

    reader = threading.Thread(target=pump, name="flwr-run-output", daemon=True)
    reader.start()
    timed_out = False
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.terminate()
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        reader.join(timeout=10)
    return StreamedRun(code, found[0] if found else None, timed_out)


# ---- the run config ------------------------------------------------------------------------------------------


def user_run_keys() -> frozenset[str]:
    """Run-config keys an operator may set: every RunConfig key and the optional deployment keys."""
    run = {f.name.replace("_", "-") for f in fields(RunConfig)}
    deployment = {f.name.replace("_", "-") for f in fields(DeploymentSettings)}
    return frozenset((run | deployment) - set(SET_BY_WEFT))


def parse_run_config(items: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` items as {key: TOML value text}; a VALUE that is not a TOML value is taken as a string.

    So `task=synthetic`, `task="synthetic"`, `rounds=3` and `personalize=true` all work. An unknown
    key, a key weft sets itself, or a repeated key is a ConfigError naming it.
    """
    allowed, out = user_run_keys(), {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"run-config: expected KEY=VALUE, got {item!r}")
        if key in SET_BY_WEFT:
            raise ConfigError(f"run-config: {key} is set by weft coordinator start (from its own flags)")
        if key not in allowed:
            raise ConfigError(f"run-config: unknown key {key!r} (see `weft simulate --help` for the run keys)")
        if key in out:
            raise ConfigError(f"run-config: {key} given twice")
        out[key] = toml_value(value.strip())
    return out


def toml_value(text: str) -> str:
    """`text` if it is a TOML value (number, boolean, quoted string), else `text` as a TOML string."""
    try:
        tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return json.dumps(text)  # a JSON string is a valid TOML basic string
    return text


def run_config_text(values: Mapping[str, str]) -> str:
    """The `--run-config` argument: `key=value` pairs separated by spaces, in a stable order."""
    return " ".join(f"{key}={value}" for key, value in sorted(values.items()))


# ---- the app ----------------------------------------------------------------------------------------------------


def app_hash(app_dir: Path) -> str:
    """The FAB hash of an app folder: what `flwr run` sends and every SuperNode sees (sha256, hex)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(app_dir)).hexdigest()


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Using SuperLink")]
    return " ".join(lines)[:400]
