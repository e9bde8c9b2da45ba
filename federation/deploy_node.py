"""`weft node start` and `weft node approve`: a partner's SuperNode, supervised, running approved apps only.

`weft node start` checks its inputs, then runs `flower-supernode` through `node/flower_launch.py`
(the approved-apps guard) with TLS, the partner's Flower authentication key and a node config built
from `NodeSettings`. It supervises that process: whenever it exits (the SuperLink refused a key that
is not registered yet, a crash, a kill) it is started again after an exponential backoff (1 s,
doubling, capped at --max-backoff-s; reset after 5 healthy minutes), each restart logged. Flower
itself keeps retrying an unreachable SuperLink, so a node started before its SuperLink waits, and
one whose SuperLink restarts reconnects without exiting.

After a crash (SIGKILL, power loss) the SuperLink refuses to re-activate the node until the old
session has missed two of Flower's 30 s heartbeats; the restarts keep trying and the node rejoins
within about a minute (measured: 53 s). A SuperNode stopped with SIGTERM closes its session and
rejoins at once.

Everything the node keeps is under its workdir: the latest local model (weft), `flwr-home/`
(Flower's state; `flwr-home/apps/` holds unpacked apps, so it stays empty while every run is
refused), `approved-apps.toml` (the allowlist, unless `--approved-apps` names another file) and
`supernode.pid`. The node's log is this command's output.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, fields, replace
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from federation.config import NodeSettings
from federation.deploy_certs import check_flower_private_key
from federation.deploy_proc import Child, Stopped, flower_env, launcher_script, start_child, stop_on_signals
from federation.errors import ConfigError

log = logging.getLogger("weft.node.supervisor")

RUNTIME_HOST = "127.0.0.1"
"""The SuperNode's own Runtime API (for its ClientApp processes) never leaves loopback."""
HEALTHY_S = 300.0
"""A SuperNode that ran this long before exiting restarts with the shortest backoff again."""
WAIT_POLL_S = 2.0
"""How often the supervisor notes the SuperNode's descendants while it runs."""
_JURISDICTION = re.compile(r"[A-Z]{2}(-[A-Z0-9]{1,3})?")


@dataclass(frozen=True)
class NodeStart:
    """Everything `weft node start` takes (one field per flag)."""

    superlink: str
    """HOST:PORT of the coordinator's SuperLink."""
    root_cert: Path
    """The CA certificate the SuperLink's certificate is checked against."""
    flower_key: Path
    """The node's Flower authentication key (OpenSSH EC private key); its public half is in the manifest."""
    key: Path
    """The partner's weft signing key (Ed25519)."""
    coordinator_key: Path
    """The coordinator's public key: the only key global models are trusted from."""
    federation_id: str
    data_dir: Path
    workdir: Path
    jurisdiction: str
    """Where the partner's data lives (ISO 3166 code, e.g. DE or DE-BY)."""
    task: str = "digits"
    approved_apps: Path | None = None
    """The operator's allowlist file; default WORKDIR/approved-apps.toml."""
    approve: tuple[str, ...] = ()
    """App hashes to add to WORKDIR/approved-apps.toml before starting."""
    runtime_port: int = 9094
    """Port of the SuperNode's own Runtime API on 127.0.0.1."""
    device: str = "auto"
    personalize_epochs: int = 0
    seed: int = 0
    model_dir: Path | None = None
    max_restarts: int = -1
    """How often a SuperNode that exited is started again (-1: always)."""
    max_backoff_s: float = 30.0
    """The longest wait before a restart."""
    manifest: Path | None = None
    """The federation's manifest as the operator published it: checked before start to be signed by the
    coordinator key, for this federation, and to list this node as an active member of its jurisdiction."""

    @property
    def allowlist(self) -> Path:
        """The allowlist file the guard reads."""
        return self.approved_apps if self.approved_apps is not None else self.workdir / launcher().APPROVED_FILE

    @property
    def flwr_home(self) -> Path:
        """Flower's own folder for this node."""
        return self.workdir / "flwr-home"


# ---- the launcher module (node/flower_launch.py owns the allowlist format) -------------------------------------


@cache
def launcher() -> ModuleType:
    """node/flower_launch.py as a module, loaded from its file.

    `import node.flower_launch` would import the `node` package, and with it torch (3 s, 250 MB),
    into the supervisor, which needs only the allowlist functions.
    """
    path = launcher_script("node")
    spec = importlib.util.spec_from_file_location("weft_node_flower_launch", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def approve(app_hash: str, allowlist: Path, note: str = "") -> bool:
    """Add `app_hash` to the allowlist file; False if it was there already."""
    import tomli_w

    lowered = app_hash.strip().lower()
    if not launcher().is_app_hash(lowered):
        raise ConfigError(f"app hash: {app_hash!r} is not a sha256 (64 hex digits; see `weft coordinator app-hash`)")
    try:
        known = launcher().read_approved(allowlist)
    except ValueError as exc:
        raise ConfigError(f"approved-apps: {exc}") from exc
    if lowered in known:
        return False
    doc: dict[str, Any] = {"app": []}
    if allowlist.exists():
        import tomllib

        doc = tomllib.loads(allowlist.read_text())
    now = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    doc.setdefault("app", []).append({"sha256": lowered, "approved_at": now, "note": note})
    allowlist.parent.mkdir(parents=True, exist_ok=True)
    tmp = allowlist.with_name(allowlist.name + ".tmp")
    tmp.write_text(
        "# Flower App (FAB) hashes this node's operator approved: `weft node approve HASH`.\n" + tomli_w.dumps(doc)
    )
    os.replace(tmp, allowlist)
    return True


# ---- checks and the SuperNode's command ----------------------------------------------------------------------


def parse_superlink(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT) -> (host, port); a ConfigError naming `superlink` otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"superlink: expected HOST:PORT with a port in 1-65535, got {text!r}")
    return host, int(port)


def check_node(s: NodeStart) -> NodeSettings:
    """Check every input `weft node start` can check before Flower starts; the node's typed settings."""
    parse_superlink(s.superlink)
    if not 1 <= s.runtime_port <= 65535:
        raise ConfigError(f"runtime-port: {s.runtime_port} is not a port (1-65535)")
    for name, path in (("root-cert", s.root_cert), ("key", s.key), ("coordinator-key", s.coordinator_key)):
        if not path.is_file():
            raise ConfigError(f"{name}: {path} does not exist")
    check_flower_private_key(s.flower_key)
    if not s.data_dir.is_dir():
        raise ConfigError(f"data-dir: {s.data_dir} is not a folder")
    if not _JURISDICTION.fullmatch(s.jurisdiction):
        raise ConfigError(f"jurisdiction: expected an ISO 3166 code such as DE or DE-BY, got {s.jurisdiction!r}")
    if s.approved_apps is not None and s.approve:
        raise ConfigError("approve: give either --approved-apps FILE or --approve HASH, not both")
    if s.approved_apps is not None and not s.approved_apps.is_file():
        raise ConfigError(f"approved-apps: {s.approved_apps} does not exist")
    if s.max_backoff_s < 1:
        raise ConfigError("max-backoff-s: must be >= 1")
    if s.manifest is not None:
        check_membership(s)
    return NodeSettings.from_node_config(node_config_values(s))


def check_membership(s: NodeStart) -> None:
    """The published manifest is the coordinator's, for this federation, and lists this node as active.

    A manifest signed by any other key is refused (protocols.Manifest.load with the trusted key), so a
    partner never joins a federation whose membership its coordinator did not sign.
    """
    from protocols import Manifest, ManifestError, load_public_key, load_signing_key

    assert s.manifest is not None
    if not s.manifest.is_file():
        raise ConfigError(f"manifest: {s.manifest} does not exist")
    try:
        manifest = Manifest.load(s.manifest, coordinator_key=load_public_key(s.coordinator_key))
    except ManifestError as exc:
        raise ConfigError(f"manifest: {exc}") from exc
    if manifest.federation_id != s.federation_id:
        raise ConfigError(f"manifest: it is for federation {manifest.federation_id!r}, not {s.federation_id!r}")
    me = manifest.get(load_signing_key(s.key).member_id)
    if me is None:
        raise ConfigError(f"manifest: this node's key ({s.key}) is not a member of version {manifest.version}")
    if not me.active:
        raise ConfigError(f"manifest: member {me.name!r} is {me.status.value} in version {manifest.version}")
    if me.jurisdiction != s.jurisdiction:
        raise ConfigError(
            f"jurisdiction: the manifest records {me.name!r} in {me.jurisdiction}, this node says {s.jurisdiction}"
        )
    log.info("manifest version %d signed by the coordinator lists %s (%s) as active", manifest.version, me.name,
             me.jurisdiction)  # fmt: skip


def node_config_values(s: NodeStart) -> dict[str, Any]:
    """The SuperNode's node config: NodeSettings' keys (absolute paths)."""
    values: dict[str, Any] = {
        "key": s.key.resolve(),
        "coordinator-key": s.coordinator_key.resolve(),
        "federation-id": s.federation_id,
        "workdir": s.workdir.resolve(),
        "data-dir": s.data_dir.resolve(),
        "task": s.task,
        "model-dir": s.model_dir.resolve() if s.model_dir else "",
        "personalize-epochs": s.personalize_epochs,
        "seed": s.seed,
        "device": s.device,
        "jurisdiction": s.jurisdiction,
    }
    known = {f.name.replace("_", "-") for f in fields(NodeSettings)}
    return {k: v for k, v in values.items() if k in known and v != ""}


def node_config_text(values: dict[str, Any]) -> str:
    """Flower's `--node-config` string: TOML `key=value` pairs (strings and paths quoted)."""
    import json

    def value(v: Any) -> str:
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else json.dumps(str(v))

    return " ".join(f"{k}={value(v)}" for k, v in values.items())


def supernode_argv(s: NodeStart) -> list[str]:
    """The SuperNode's command: node/flower_launch.py with the allowlist, then flower-supernode's flags."""
    return [
        sys.executable, "-P", str(launcher_script("node")), "supernode", "--approved-apps", str(s.allowlist.resolve()),
        "--",
        "--root-certificates", str(s.root_cert.resolve()),
        "--superlink", s.superlink,
        "--auth-supernode-private-key", str(s.flower_key.resolve()),
        "--host", RUNTIME_HOST, "--port", str(s.runtime_port),
        "--node-config", node_config_text(node_config_values(s)),
    ]  # fmt: skip


# ---- the supervisor -----------------------------------------------------------------------------------------


def start_node(s: NodeStart) -> int:
    """`weft node start`: check, approve what was given, then run the SuperNode until stopped."""
    check_node(s)
    s = replace(s, workdir=s.workdir.resolve(), approved_apps=s.approved_apps.resolve() if s.approved_apps else None)
    s.workdir.mkdir(parents=True, exist_ok=True)
    s.flwr_home.mkdir(parents=True, exist_ok=True)
    for app_hash in s.approve:
        if approve(app_hash, s.allowlist, note="weft node start --approve"):
            log.info("approved app %s (%s)", app_hash, s.allowlist)
    approved = launcher().read_approved(s.allowlist)
    log.info(
        "node for federation %s (jurisdiction %s) -> SuperLink %s; %d approved app(s) in %s",
        s.federation_id, s.jurisdiction, s.superlink, len(approved), s.allowlist,
    )  # fmt: skip
    if not approved:
        log.warning("no app is approved yet: every run will be refused (add one with `weft node approve HASH`)")
    return supervise(s, supernode_argv(s))


def supervise(s: NodeStart, argv: list[str]) -> int:
    """Run `argv` and start it again whenever it exits (bounded backoff); 0 when stopped by a signal."""
    env = flower_env(s.flwr_home)
    backoff, restarts = 1.0, 0
    child: Child | None = None
    with stop_on_signals():
        try:
            while True:
                started = time.monotonic()
                child = start_child("supernode", argv, env, cwd=s.workdir)
                (s.workdir / "supernode.pid").write_text(f"{child.pid}\n")
                log.info("supernode started (pid %d)", child.pid)
                code = _wait(child)
                child.stop()
                child = None
                if code == launcher().FATAL_EXIT:
                    log.error("supernode cannot start (see the line above); not restarting")
                    return 2
                if 0 <= s.max_restarts <= restarts:
                    log.error("supernode exited with status %d; giving up after %d restart(s)", code, restarts)
                    return 1
                backoff = 1.0 if time.monotonic() - started > HEALTHY_S else backoff
                restarts += 1
                log.warning("supernode exited with status %d; restart %d in %.0f s", code, restarts, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, s.max_backoff_s)
        except Stopped as why:
            log.info("stopping the supernode (%s)", why)
            return 0
        finally:
            if child is not None:
                child.stop()


def _wait(child: Child) -> int:
    """Wait for `child` to exit, noting its descendants as it runs (so `stop` reaches detached ones)."""
    while (code := child.poll()) is None:
        child.remember_children()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout=WAIT_POLL_S)
    return int(code)


def approve_cmd(app_hash: str, workdir: Path | None, allowlist: Path | None) -> int:
    """`weft node approve HASH`: add to the node's allowlist (the running SuperNode reads it at the next run)."""
    if (workdir is None) == (allowlist is None):
        raise ConfigError("approve: give exactly one of --workdir W or --approved-apps FILE")
    path = allowlist if allowlist is not None else Path(str(workdir)) / launcher().APPROVED_FILE
    added = approve(app_hash, path)
    print(f"{'approved' if added else 'already approved'}: {app_hash.strip().lower()} ({path})")
    return 0
