"""`weft coordinator start` and `weft coordinator status`: the operator's SuperLink and one run.

`weft coordinator start` checks its inputs, then:

1. starts `flower-superlink` through `coordinator/flower_launch.py` (Control and Runtime APIs local
   only) with TLS, SuperNode authentication, `--database STATE/superlink.db` and runtime
   dependency installation off, in its own process group, logging to STATE/superlink.log;
2. registers the Flower authentication key of every ACTIVE manifest member (`flwr supernode
   register`; "already in use" counts as done, since the database keeps registrations) and
   unregisters the members it registered before that are no longer active;
3. writes the config-only app folder (`federation.apps.write_app`, unless `--app-dir`) and prints
   its FAB hash, the value partners approve;
4. runs `flwr run APP weft --stream` with the user's run config plus `manifest`, `coordinator-key`
   and `out-dir = STATE/run`, then reads the real outcome with `flwr ls --run-id`;
5. stops the SuperLink and everything it spawned, and exits 0 only if the run is `finished:completed`.

STATE/state.json records the run (id, app hash, status), for `weft coordinator status`.

With `--resume` it continues the run recorded in STATE/run (its ledger.jsonl) from the last committed
round instead: the SuperLink restarts on the same STATE/superlink.db (registrations persist), a run that
Flower still lists as unfinished is stopped, and a new Flower run is started with `resume = true`; the
weft run keeps the run id its ledger started with, and the ledger gets a `resume` record. Without
`--resume`, an existing record is refused.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from federation.deploy_certs import CertFiles, check_server_cert
from federation.deploy_flwr import FlwrCli, app_hash, parse_run_config, run_config_text, stream_run
from federation.deploy_proc import (
    Child,
    Stopped,
    flower_env,
    launcher_script,
    start_child,
    stop_on_signals,
    wait_for_port,
)
from federation.errors import ConfigError

log = logging.getLogger("weft.coordinator.start")

WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1"}
"""Bind-all hosts, and the loopback address weft's own tools reach them on."""
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
STATE_FILE = "state.json"
REGISTRATIONS_FILE = "registrations.json"
FINISH_TIMEOUT_S = 120.0
"""How long to wait, after `flwr run --stream` ended, for the run's status to become final."""


@dataclass(frozen=True)
class CoordinatorStart:
    """Everything `weft coordinator start` takes (one field per flag)."""

    manifest: Path
    coordinator_key: Path
    """The coordinator's private key (signs global models; the manifest must be signed by it)."""
    state_dir: Path
    certs: Path
    """Folder with ca.crt, server.pem, server.key (`weft coordinator dev-certs`, or the operator's own)."""
    port: int = 9091
    host: str = "127.0.0.1"
    run_config: tuple[str, ...] = ()
    """KEY=VALUE run settings (RunConfig keys, personalize, federated-evaluation, run-id)."""
    app_dir: Path | None = None
    """The app folder to run; default STATE/weft-app, written by weft (config only)."""
    flower_keys: Path | None = None
    """Folder with NAME.flower.pub for members whose manifest entry has no Flower auth key."""
    run_timeout_s: float = 86400.0
    start_timeout_s: float = 120.0
    resume: bool = False
    """Continue the run recorded in STATE/run from its last committed round (after a crash or a stop)."""

    @property
    def out_dir(self) -> Path:
        """The run's record."""
        return self.state_dir / "run"

    @property
    def local_host(self) -> str:
        """The address weft's own flwr calls use to reach the SuperLink (always loopback)."""
        return WILDCARD_HOSTS.get(self.host, "127.0.0.1" if self.host == "localhost" else self.host)


@dataclass(frozen=True)
class Registration:
    """A manifest member whose Flower key the SuperLink should accept."""

    member_id: str
    name: str
    key_file: Path


# ---- checks ---------------------------------------------------------------------------------------------------


def check_coordinator(s: CoordinatorStart) -> tuple[list[Registration], CertFiles, dict[str, str]]:
    """Check every input; (registrations, certificate files, run config), or a ConfigError naming the flag."""
    from protocols import Manifest, load_signing_key

    if not 1 <= s.port <= 65535:
        raise ConfigError(f"port: {s.port} is not a port (1-65535)")
    if s.host not in (*WILDCARD_HOSTS, *LOOPBACK_HOSTS):
        raise ConfigError(
            f"host: {s.host!r}: use 127.0.0.1 (this machine only) or 0.0.0.0 / :: (all interfaces; the Control API "
            "still answers loopback clients only)"
        )
    if not s.coordinator_key.is_file():
        raise ConfigError(f"coordinator-key: {s.coordinator_key} does not exist")
    identity = load_signing_key(s.coordinator_key)
    manifest = Manifest.load(s.manifest, coordinator_key=identity.public_key)
    certs = CertFiles.in_folder(s.certs)
    check_server_cert(certs.cert)
    if s.app_dir is not None and not (s.app_dir / "pyproject.toml").is_file():
        raise ConfigError(f"app-dir: {s.app_dir} has no pyproject.toml")
    check_record(s)
    run_config = parse_run_config(s.run_config)
    if "resume" in run_config:
        raise ConfigError("run-config: resume is set by weft coordinator start; use its --resume flag")
    return registrations(manifest, s.flower_keys, s.state_dir / "flower-keys"), certs, run_config


def check_record(s: CoordinatorStart) -> None:
    """Without --resume, STATE/run must hold no record; with it, an unfinished run's ledger."""
    from protocols import ProtocolError
    from protocols.ledger import LEDGER_FILE, read_ledger

    ledger = s.out_dir / LEDGER_FILE
    if not s.resume:
        if any((s.out_dir / name).exists() for name in (LEDGER_FILE, "metrics.jsonl", "summary.json")):
            raise ConfigError(
                f"state-dir: {s.out_dir} already holds a run's record; continue it with --resume, or move it away "
                "or use another state-dir"
            )
        return
    if not ledger.is_file():
        raise ConfigError(f"resume: {s.out_dir} holds no {LEDGER_FILE}; nothing to resume (start without --resume)")
    try:
        entries = read_ledger(ledger).entries
    except ProtocolError as exc:
        raise ConfigError(f"resume: {exc}") from exc
    last = entries[-1].body if entries else {}
    if last.get("kind") == "end" and last.get("status") == "completed":
        raise ConfigError(f"resume: the run in {s.out_dir} already completed {last.get('rounds')} round(s); "
                          "nothing to resume")  # fmt: skip


def registrations(manifest: Any, key_folder: Path | None, written: Path) -> list[Registration]:
    """One Registration per ACTIVE member.

    Its key comes from the manifest (written to `written` for `flwr supernode register`), else from
    KEY_FOLDER/NAME.flower.pub.
    """
    from protocols import load_flower_auth_public_key

    out = []
    for member in manifest.members:
        if not _is_active(member):
            continue
        text = str(getattr(member, "flower_auth_key", "") or "")
        if text:
            written.mkdir(parents=True, exist_ok=True)
            path = written / f"{member.name}.flower.pub"
            path.write_text(f"{text} {member.name}\n")
        elif key_folder is not None and (key_folder / f"{member.name}.flower.pub").is_file():
            path = key_folder / f"{member.name}.flower.pub"
            load_flower_auth_public_key(path)  # a malformed key fails here, naming the file
        else:
            where = f"nor {key_folder}/{member.name}.flower.pub" if key_folder else "(or give --flower-keys DIR)"
            raise ConfigError(f"manifest: member {member.name!r} has no Flower auth key in the manifest {where}")
        out.append(Registration(member.member_id, member.name, path))
    if not out:
        raise ConfigError(f"manifest: {manifest.federation_id} has no active member")
    return out


def _is_active(member: Any) -> bool:
    status = getattr(member, "status", "active")
    return str(getattr(status, "value", status)) == "active"


# ---- start --------------------------------------------------------------------------------------------------


def superlink_argv(s: CoordinatorStart, certs: CertFiles) -> list[str]:
    """The SuperLink's command: coordinator/flower_launch.py, then flower-superlink's flags."""
    return [
        sys.executable, "-P", str(launcher_script("coordinator")), "superlink", "--",
        "--ssl-ca-certfile", str(certs.ca.resolve()),
        "--ssl-certfile", str(certs.cert.resolve()),
        "--ssl-keyfile", str(certs.key.resolve()),
        "--enable-supernode-auth",
        "--host", s.host, "--port", str(s.port),
        "--database", str((s.state_dir / "superlink.db").resolve()),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip


def start_coordinator(s: CoordinatorStart) -> int:
    """`weft coordinator start`: the SuperLink, the registrations, one run; 0 only if it completed."""
    regs, certs, run_values = check_coordinator(s)
    s = replace(s, state_dir=s.state_dir.resolve())
    s.state_dir.mkdir(parents=True, exist_ok=True)
    app_dir = _app_dir(s)
    fab_hash = app_hash(app_dir)
    log.info("app %s: hash %s (partners approve it: weft node approve %s)", app_dir, fab_hash, fab_hash)
    state: dict[str, Any] = {"manifest": str(s.manifest.resolve()), "app_dir": str(app_dir), "app_hash": fab_hash,
                             "out_dir": str(s.out_dir.resolve()), "port": s.port, "status": "starting"}  # fmt: skip
    if s.resume:
        state.update(_resumed_state(s.state_dir))
    _write_state(s.state_dir, state)
    link: Child | None = None
    with stop_on_signals():
        try:
            link = _start_superlink(s, certs)
            cli = FlwrCli(s.state_dir / "flwr-home-cli")
            cli.write_connection(f"{_bracket(s.local_host)}:{s.port}", certs.ca)
            _register_members(cli, regs, s.state_dir)
            if s.resume:
                _stop_unfinished(cli, state["previous_runs"])
            values = {**run_values, **_weft_run_values(s)}
            return _run(cli, app_dir, run_config_text(values), s, state, link)
        except Stopped as why:
            log.error("stopped by %s", why)
            state["status"] = f"stopped by {why}"
            return 1
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            state["status"] = f"error: {exc}"  # e.g. the SuperLink died under the run: continue it with --resume
            raise
        finally:
            _write_state(s.state_dir, state)
            if link is not None:
                link.stop()
                log.info("superlink stopped")


def _app_dir(s: CoordinatorStart) -> Path:
    if s.app_dir is not None:
        return s.app_dir.resolve()
    from federation.apps import write_app  # imports the apps (torch) only when needed

    folder = (s.state_dir / "weft-app").resolve()
    write_app(folder)
    return folder


def _start_superlink(s: CoordinatorStart, certs: CertFiles) -> Child:
    home = s.state_dir / "flwr-home-link"
    home.mkdir(parents=True, exist_ok=True)
    with (s.state_dir / "superlink.log").open("ab") as out:
        link = start_child("superlink", superlink_argv(s, certs), flower_env(home), s.state_dir, out)
    log.info("superlink starting on %s:%d (pid %d; log %s)", s.host, s.port, link.pid, s.state_dir / "superlink.log")
    try:
        wait_for_port(s.local_host, s.port, link, s.start_timeout_s)
    except RuntimeError as exc:
        tail = (s.state_dir / "superlink.log").read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{exc}: {' | '.join(tail)}") from exc
    return link


def _register_members(cli: FlwrCli, regs: list[Registration], state_dir: Path) -> None:
    """Register every active member's key; unregister members this coordinator registered before and dropped."""
    path = state_dir / REGISTRATIONS_FILE
    known: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    wanted = {r.member_id for r in regs}
    for member_id, entry in sorted(known.items()):
        if member_id not in wanted and entry.get("node_id"):
            cli.unregister(int(entry["node_id"]))
            log.info("unregistered %s (node %s): no longer an active member", entry.get("name"), entry["node_id"])
            del known[member_id]
    for r in regs:
        node_id = cli.register(r.key_file, r.name)
        if node_id is None:
            log.info("%s: Flower key already registered", r.name)
            known.setdefault(r.member_id, {"name": r.name, "node_id": None})
        else:
            log.info("%s: Flower key registered (node %d)", r.name, node_id)
            known[r.member_id] = {"name": r.name, "node_id": node_id}
    path.write_text(json.dumps(known, indent=2, sort_keys=True) + "\n")


def _weft_run_values(s: CoordinatorStart) -> dict[str, str]:
    values = {
        "manifest": json.dumps(str(s.manifest.resolve())),  # a JSON string is a TOML basic string
        "coordinator-key": json.dumps(str(s.coordinator_key.resolve())),
        "out-dir": json.dumps(str(s.out_dir.resolve())),
    }
    if s.resume:
        values["resume"] = "true"
    return values


def _resumed_state(state_dir: Path) -> dict[str, Any]:
    """state.json's resume bookkeeping: every earlier Flower run of this record, with the status it was left in."""
    path = state_dir / STATE_FILE
    try:
        previous: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        previous = {}  # a state.json is written atomically; an unreadable one is not worth failing a resume
    runs = list(previous.get("previous_runs", []))
    if previous.get("run_id") is not None:
        runs.append({"run_id": previous["run_id"], "status": previous.get("status", "unknown")})
    return {"resumed": True, "resumes": int(previous.get("resumes", 0)) + 1, "previous_runs": runs}


def _stop_unfinished(cli: FlwrCli, runs: list[dict[str, Any]]) -> None:
    """Stop earlier Flower runs of this record that the SuperLink still lists as unfinished, so their queued
    messages are not delivered to the nodes; a run the SuperLink no longer knows is skipped."""
    for entry in runs:
        if str(entry.get("status", "")).startswith("finished"):
            continue
        run_id = int(entry["run_id"])
        try:
            status = str(cli.run_status(run_id).get("status", ""))
            if not status.startswith("finished"):
                cli.stop_run(run_id)
                log.info("stopped the interrupted run %d (it was %s)", run_id, status)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            log.warning("run %d: could not check or stop it: %s", run_id, exc)


def _run(cli: FlwrCli, app_dir: Path, run_config: str, s: CoordinatorStart, state: dict[str, Any], link: Child) -> int:
    def on_start(run_id: int) -> None:
        state.update(run_id=run_id, status="running", started_at=time.time())
        _write_state(s.state_dir, state)
        link.remember_children()

    log.info("flwr run %s --run-config %s", app_dir, run_config)
    streamed = stream_run(cli, app_dir, run_config, s.run_timeout_s, sys.stdout, on_start)
    if streamed.run_id is None:
        state["status"] = "not started"
        print(f"weft: error: flwr run did not start a run (exit {streamed.returncode}); see its output above",
              file=sys.stderr)  # fmt: skip
        return 1
    if streamed.timed_out:
        log.error("run %d: no result within --run-timeout-s %.0f; stopping it", streamed.run_id, s.run_timeout_s)
        cli.stop_run(streamed.run_id)
    row = cli.wait_finished(streamed.run_id, FINISH_TIMEOUT_S)
    status, details = str(row.get("status", "unknown")), str(row.get("status-details", "") or "")
    details = "" if details == "N/A" else details
    state.update(status=status, status_details=details, fab_hash=row.get("fab-hash"), finished_at=time.time())
    if row.get("fab-hash") and row["fab-hash"] != state["app_hash"]:
        log.warning("the run's fab-hash %s differs from the app's %s", row["fab-hash"], state["app_hash"])
    if status != "finished:completed":
        print(f"weft: run {streamed.run_id} ended {status}{f': {details}' if details else ''}", file=sys.stderr)
        return 1
    print(f"weft: run {streamed.run_id} finished:completed; record in {s.out_dir}", file=sys.stderr)
    return 0


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _write_state(state_dir: Path, state: dict[str, Any]) -> None:
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    tmp.replace(state_dir / STATE_FILE)


# ---- status -----------------------------------------------------------------------------------------------------


def status_lines(state_dir: Path) -> list[str]:
    """`weft coordinator status`: the run, the round reached, each member's last contribution."""
    path = state_dir / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"state-dir: {path} does not exist (has `weft coordinator start` run with this state-dir?)")
    state = json.loads(path.read_text())
    out_dir = Path(state.get("out_dir", state_dir / "run"))
    rounds = _read_rounds(out_dir / "metrics.jsonl")
    summary = _read_json(out_dir / "summary.json")
    lines = [f"run {state.get('run_id', '-')}: {state.get('status', 'unknown')}"
             f"{f' ({state[key]})' if (key := 'status_details') in state and state[key] else ''}",
             f"app hash {state.get('app_hash', '-')}"]  # fmt: skip
    lines.append(_round_line(rounds, summary))
    lines += _member_lines(Path(state["manifest"]) if state.get("manifest") else None, rounds)
    return lines


def _round_line(rounds: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    done = [r for r in rounds if "round" in r and r.get("status") != "failed"]
    total = summary.get("config", {}).get("rounds") or summary.get("rounds")
    reached = done[-1]["round"] if done else 0
    acc = done[-1].get("accuracy") if done else None
    line = f"round reached: {reached}{f' of {total}' if total else ''}"
    line += f", accuracy {acc:.4f}" if isinstance(acc, int | float) else ""
    if summary:
        line += f"; summary: {summary.get('status')}"
        if summary.get("error"):
            line += f" ({summary['error']})"
    return line


def _member_lines(manifest_path: Path | None, rounds: list[dict[str, Any]]) -> list[str]:
    last: dict[str, tuple[int, dict[str, Any]]] = {}
    for r in rounds:
        for c in r.get("contributions", []):
            last[c["member"]] = (int(r["round"]), c)
    members = _manifest_members(manifest_path)
    lines = ["member: last contribution"]
    for member_id, (name, status) in sorted(members.items(), key=lambda kv: kv[1][0]):
        seen = last.pop(member_id, None)
        what = (f"round {seen[0]}, {seen[1]['num_examples']} examples, update {seen[1]['update_digest'][:16]}"
                if seen else "none")  # fmt: skip
        lines.append(f"  {name} ({status}, {member_id[:12]}): {what}")
    for member_id, (rnd, c) in sorted(last.items()):
        lines.append(f"  {member_id[:12]}: round {rnd}, {c['num_examples']} examples")
    return lines


def _manifest_members(path: Path | None) -> dict[str, tuple[str, str]]:
    if path is None or not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    return {m["member_id"]: (m.get("name", "?"), m.get("status", "active")) for m in doc.get("members", [])}


def _read_rounds(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
