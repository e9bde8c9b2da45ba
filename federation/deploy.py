"""The `weft coordinator` and `weft node` commands: a real federation on Flower's SuperLink and SuperNodes.

    weft coordinator dev-certs --out DIR --host NAME ...     a development CA and SuperLink certificate
    weft coordinator app-hash [--app-dir DIR]                the FAB hash partners approve
    weft coordinator start --manifest M --coordinator-key K --state-dir DIR --certs DIR [--port P] ... [--resume]
    weft coordinator status --state-dir DIR
    weft node start --superlink HOST:PORT --root-cert CA --flower-key FK --key K --coordinator-key C.pub
                    --federation-id ID --data-dir D --workdir W --jurisdiction XX --task T [--approve HASH ...]
    weft node approve HASH --workdir W

Each `start` command's flags are generated from one settings dataclass (`CoordinatorStart`,
`NodeStart`), and `coordinator_start_argv` / `node_start_argv` turn settings back into the exact
command line. The integration test (tests/integration/test_federation.py) runs those commands, and
docker-compose.yml holds the commands `compose_commands()` produces (tests/unit/test_deploy_unit.py
checks it), so the three cannot drift apart. The work is done in `deploy_coordinator`,
`deploy_node`, `deploy_flwr`, `deploy_certs` and `deploy_proc`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, TypeVar

from federation.deploy_coordinator import CoordinatorStart, start_coordinator, status_lines
from federation.deploy_node import NodeStart, approve_cmd, start_node
from federation.flags import add_flags, flag, given

_S = TypeVar("_S", CoordinatorStart, NodeStart)

HELP: dict[str, str] = {
    # coordinator start
    "manifest": "coordinator start: the signed federation manifest (JSON); node start (optional): the manifest "
    "the operator published, checked before start (signed by the coordinator key, this node active)",
    "coordinator_key": "coordinator start: its private key (.key); node start: the coordinator's public key (.pub)",
    "state_dir": "the coordinator's folder: SuperLink database and log, app folder, the run's record (DIR/run)",
    "certs": "folder with ca.crt, server.pem, server.key (`weft coordinator dev-certs`, or your own)",
    "port": "the SuperLink's port (Fleet, Control and Runtime APIs share it)",
    "host": "127.0.0.1 (this machine) or 0.0.0.0 / :: (all interfaces; Control API still loopback-only)",
    "run_config": "a run setting KEY=VALUE (repeatable), e.g. rounds=3 task=synthetic quorum=1.0",
    "app_dir": "the Flower App folder to run (default: DIR/weft-app, written by weft: config only, no code)",
    "flower_keys": "folder with NAME.flower.pub for members whose manifest entry has no Flower auth key",
    "run_timeout_s": "stop waiting for the run after this many seconds",
    "start_timeout_s": "stop waiting for the SuperLink to listen after this many seconds",
    "resume": "continue the run recorded in DIR/run from its last committed round (after a crash or a stop)",
    # node start
    "superlink": "HOST:PORT of the coordinator's SuperLink",
    "root_cert": "the CA certificate that signed the SuperLink's certificate",
    "flower_key": "this node's Flower auth private key (NAME.flower.key from `weft keys new --kind node`)",
    "key": "this partner's weft signing key (NAME.key)",
    "federation_id": "the federation this node serves",
    "data_dir": "this partner's own data folder (never leaves the node)",
    "workdir": "this node's folder: local models, Flower's state, approved-apps.toml, supernode.pid",
    "jurisdiction": "where this partner's data lives (ISO 3166 code, e.g. DE)",
    "task": "built-in task or module:attr (the run's task)",
    "approved_apps": "the allowlist file of approved app hashes (default: WORKDIR/approved-apps.toml)",
    "approve": "approve this app hash before starting (repeatable; added to WORKDIR/approved-apps.toml)",
    "runtime_port": "port of the SuperNode's own Runtime API on 127.0.0.1",
    "device": "auto, cpu or cuda[:N]",
    "personalize_epochs": "local fine-tuning epochs when the run asks for personalization",
    "seed": "node-local seed",
    "model_dir": "a checkpoint folder this partner holds (task factories such as lm)",
    "max_restarts": "restart an exited SuperNode at most this often (-1: always)",
    "max_backoff_s": "the longest wait before restarting an exited SuperNode",
}
"""Help text of each settings field's flag."""


# ---- settings <-> flags ------------------------------------------------------------------------------------------


def add_settings_flags(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """One flag per field of `cls` (federation/flags.py), with this module's help texts."""
    add_flags(parser, cls, help_texts=HELP, metavars={"run_config": "KEY=VALUE", "approve": "HASH"})


def settings_from_args(cls: type[_S], args: argparse.Namespace) -> _S:
    """The settings the parsed flags give (a flag not given takes the field's default)."""
    return cls(**given(args, cls))


def settings_argv(settings: CoordinatorStart | NodeStart) -> list[str]:
    """The flags that give `settings` back: required fields, then every field that differs from its default."""
    argv: list[str] = []
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.default is not MISSING and value == f.default:
            continue
        if isinstance(value, bool):  # a switch (federation/flags.py): --name, or --no-name for a True default
            argv.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
            continue
        for item in value if isinstance(value, tuple) else (value,):
            argv += [flag(f.name), str(item)]
    return argv


def coordinator_start_argv(settings: CoordinatorStart) -> list[str]:
    """The exact `weft coordinator start ...` command for `settings`."""
    return ["weft", "coordinator", "start", *settings_argv(settings)]


def node_start_argv(settings: NodeStart) -> list[str]:
    """The exact `weft node start ...` command for `settings`."""
    return ["weft", "node", "start", *settings_argv(settings)]


# ---- docker-compose.yml ------------------------------------------------------------------------------------------

COMPOSE_FEDERATION_ID = "weft-demo"
COMPOSE_PARTNERS = {"partner-a": "DE", "partner-b": "FR", "partner-c": "NL"}
"""The compose file's partners and their jurisdictions."""
COMPOSE_RUN_CONFIG = ("rounds=5", "task=digits", "local-epochs=1", "quorum=1.0", "round-timeout-s=600.0")


def compose_commands() -> dict[str, list[str]]:
    """Each docker-compose.yml service's `command` (the image's entrypoint is `weft`)."""
    coordinator = CoordinatorStart(
        manifest=Path("/keys/manifest.json"),
        coordinator_key=Path("/keys/coordinator.key"),
        state_dir=Path("/state"),
        certs=Path("/certs"),
        host="0.0.0.0",  # inside its container; the Control API still answers loopback only
        run_config=COMPOSE_RUN_CONFIG,
    )
    out = {"coordinator": coordinator_start_argv(coordinator)[1:]}
    for name, jurisdiction in COMPOSE_PARTNERS.items():
        node = NodeStart(
            superlink=f"coordinator:{coordinator.port}",
            root_cert=Path("/keys/ca.crt"),
            flower_key=Path(f"/keys/{name}.flower.key"),
            key=Path(f"/keys/{name}.key"),
            coordinator_key=Path("/keys/coordinator.pub"),
            federation_id=COMPOSE_FEDERATION_ID,
            data_dir=Path("/private"),
            workdir=Path("/data/work"),
            jurisdiction=jurisdiction,
            task="digits",
            approved_apps=Path("/keys/approved-apps.toml"),
            device="cpu",
        )
        out[name] = node_start_argv(node)[1:]
    return out


# ---- the commands ------------------------------------------------------------------------------------------------


def _configure_logging() -> None:
    """weft's INFO lines (supervision, registration, restarts) on stderr, with a timestamp."""
    weft = logging.getLogger("weft")
    if not any(getattr(h, "_weft_deploy", False) for h in weft.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._weft_deploy = True  # type: ignore[attr-defined]
        weft.addHandler(handler)
    weft.setLevel(logging.INFO)


def _runtime_failures(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A failure that is not the user's (a process that would not start, a flwr call that failed) ends with
    one line and exit code 1; user mistakes (ConfigError and the like) reach weft's main, which exits 2."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except FileExistsError:
            raise
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"weft: error: {exc}", file=sys.stderr)
            return 1

    return wrapper


@_runtime_failures
def _coordinator_start(args: argparse.Namespace) -> int:
    _configure_logging()
    return start_coordinator(settings_from_args(CoordinatorStart, args))


def _coordinator_status(args: argparse.Namespace) -> int:
    print("\n".join(status_lines(Path(args.state_dir))))
    return 0


def _coordinator_dev_certs(args: argparse.Namespace) -> int:
    from federation.deploy_certs import write_dev_certs

    files = write_dev_certs(Path(args.out), list(args.host or []))
    print(f"development CA {files.ca} and server certificate {files.cert} (key {files.key}, mode 600)")
    print(f"partners need only {files.ca}; ca.key stays with the operator (or is deleted)")
    return 0


def _coordinator_app_hash(args: argparse.Namespace) -> int:
    import tempfile

    from federation.deploy_flwr import app_hash

    if args.app_dir:
        print(app_hash(Path(args.app_dir)))
        return 0
    from federation.apps import write_app

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "weft-app"
        write_app(folder)
        print(app_hash(folder))
    return 0


@_runtime_failures
def _node_start(args: argparse.Namespace) -> int:
    _configure_logging()
    return start_node(settings_from_args(NodeStart, args))


def _node_approve(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else None
    allowlist = Path(args.approved_apps) if args.approved_apps else None
    return approve_cmd(args.hash, workdir, allowlist)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `coordinator` and `node` command groups to weft's subparsers."""
    coord = sub.add_parser("coordinator", help="run the operator's SuperLink and a run (TLS, node auth)")
    coord_sub = coord.add_subparsers(required=True, metavar="ACTION")
    cs = coord_sub.add_parser("start", help="start the SuperLink, register members' Flower keys, run, report")
    add_settings_flags(cs, CoordinatorStart)
    cs.set_defaults(func=_coordinator_start)
    st = coord_sub.add_parser("status", help="the run, the round reached and each member's last contribution")
    st.add_argument("--state-dir", required=True, help="the folder given to `weft coordinator start`")
    st.set_defaults(func=_coordinator_status)
    dc = coord_sub.add_parser("dev-certs", help="a development CA and SuperLink certificate (not for production)")
    dc.add_argument("--out", required=True, help="folder for ca.crt, ca.key, server.pem, server.key")
    dc.add_argument("--host", action="append", help="a name or IP partners dial (repeatable); loopback is added")
    dc.set_defaults(func=_coordinator_dev_certs)
    ah = coord_sub.add_parser("app-hash", help="the FAB hash of weft's config-only app (what partners approve)")
    ah.add_argument("--app-dir", help="an app folder (default: the one `coordinator start` writes)")
    ah.set_defaults(func=_coordinator_app_hash)

    node = sub.add_parser("node", help="run a partner's SuperNode (TLS, node auth, approved apps only)")
    node_sub = node.add_subparsers(required=True, metavar="ACTION")
    ns = node_sub.add_parser("start", help="run the SuperNode, supervised (restarted with backoff when it exits)")
    add_settings_flags(ns, NodeStart)
    ns.set_defaults(func=_node_start)
    na = node_sub.add_parser("approve", help="approve an app hash for this node")
    na.add_argument("hash", metavar="HASH", help="the app's FAB hash (`weft coordinator app-hash`)")
    na.add_argument("--workdir", help="the node's workdir (its approved-apps.toml)")
    na.add_argument("--approved-apps", help="or: an allowlist file")
    na.set_defaults(func=_node_approve)


def main(argv: list[str] | None = None) -> int:
    """`python -m federation.deploy coordinator|node ...`: these commands alone, until federation/cli.py calls
    `register`; user mistakes end with one line and exit code 2, as in `weft`."""
    parser = argparse.ArgumentParser(prog="weft")
    register(parser.add_subparsers(required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    from federation.errors import ConfigError, TaskError
    from protocols import ProtocolError

    try:
        return int(args.func(args))
    except (ConfigError, TaskError, FileExistsError, ProtocolError) as exc:
        print(f"weft: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
