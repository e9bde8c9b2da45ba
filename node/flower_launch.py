"""Start Flower's SuperNode so that it runs only Flower Apps its operator approved.

`weft node start` runs this file as a script, never as `-m node.flower_launch` (that would import
the `node` package, and with it torch, into a process that only relays messages):

    python -P node/flower_launch.py supernode --approved-apps FILE -- <flower-supernode flags>
    python -P node/flower_launch.py clientapp <flwr-clientapp flags>      # via the PATH shim below

`supernode` wraps Flower's `_pull_and_store_message` (flwr 1.42.0,
`supernode/start_client_internal.py`). Before the SuperNode downloads the FAB of a run it has not
seen, the wrapper looks the run's FAB hash up in the operator's allowlist (`approved-apps.toml`,
re-read on every check, so `weft node approve` needs no restart). A hash that is not there is
refused: nothing is downloaded, stored or started, one line goes to the node's log, and the
coordinator gets Flower's `INVALID_FAB` error reply, the same path Flower's own trusted-entities
check takes. A downloaded FAB whose bytes do not hash to the approved value is refused too.

It also puts a `flwr-clientapp` shim first on PATH, so each ClientApp process starts through
`clientapp` mode: that mode checks the FAB once more where Flower unpacks it (`install_from_fab`)
and sends weft's own INFO log lines (logger `weft`, e.g. "round 3: sent update ...") to the node's
log, next to Flower's.

The wrapped functions are private to Flower, so the launcher refuses to start (exit 78, which
the supervisor does not retry) on a flwr version it was not tested with, or when a wrapped
function's signature changed. It imports nothing from weft's other packages.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import re
import shlex
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

TESTED_FLWR_VERSIONS = frozenset({"1.42.0"})
"""flwr versions whose private functions the guards below were written and tested against."""
FATAL_EXIT = 78
"""Exit status for a start-up problem that retrying cannot fix (EX_CONFIG); the supervisor gives up."""
STOPPED_EXIT = 75
"""Exit status when Flower's node loop returned by itself (EX_TEMPFAIL); the supervisor restarts it."""
APPROVED_ENV = "WEFT_APPROVED_APPS"
"""Environment variable naming the allowlist file, for the ClientApp processes."""
APPROVED_FILE = "approved-apps.toml"
"""The allowlist's file name in a node's workdir."""
REFUSED_FLAGS = ("--insecure", "--allow-runtime-dependency-installation", "--trusted-entities", "--isolation")
"""flower-supernode flags weft never passes: no TLS, code installation, Hub-only checks, other process layouts."""
PULL_PARAMS = (
    "state",
    "object_store",
    "node_config",
    "receive",
    "get_run",
    "get_fab",
    "pull_object",
    "confirm_message_received",
    "trusted_entities",
)
"""The parameters of flwr 1.42.0's `_pull_and_store_message`; anything else means the guard may not hold."""

_HASH = re.compile(r"[0-9a-f]{64}")
_log = logging.getLogger("weft.launch")


class NotApproved(Exception):
    """A run's FAB hash is not on the node's allowlist (args: the hash, the reason)."""


class LaunchError(Exception):
    """The launcher cannot start safely; the message says why."""


# ---- the allowlist --------------------------------------------------------------------------------------


def is_app_hash(text: str) -> bool:
    """Whether `text` is a FAB hash as Flower writes it: 64 lowercase hex digits (sha256)."""
    return _HASH.fullmatch(text) is not None


def read_approved(path: Path) -> frozenset[str]:
    """The FAB hashes in an allowlist file (`[[app]] sha256 = "..."`); a missing file approves nothing.

    Raises ValueError naming the file and the entry for anything malformed.
    """
    if not path.exists():
        return frozenset()
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: not a readable TOML allowlist ({exc})") from exc
    apps = doc.get("app", [])
    if not isinstance(apps, list):
        raise ValueError(f"{path}: `app` must be an array of tables ([[app]])")
    hashes = set()
    for i, entry in enumerate(apps):
        value = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(value, str) or not is_app_hash(value):
            raise ValueError(f"{path}: app[{i}].sha256 must be 64 lowercase hex digits")
        hashes.add(value)
    return frozenset(hashes)


def approved_now(path: Path) -> frozenset[str]:
    """The allowlist as it is on disk now; an unreadable file approves nothing (fail closed)."""
    try:
        return read_approved(path)
    except ValueError as exc:
        _flwr_log(logging.ERROR, "weft: %s; approving no app until it is fixed", exc)
        return frozenset()


# ---- version and signature pins ----------------------------------------------------------------------------


def check_flwr_version() -> None:
    """Refuse a flwr version the guards were not tested with."""
    import flwr  # late: the allowlist needs no flwr

    version = getattr(flwr, "__version__", "unknown")
    if version not in TESTED_FLWR_VERSIONS:
        raise LaunchError(
            f"flwr {version} is installed, but weft's approved-apps guard is tested only with "
            f"{', '.join(sorted(TESTED_FLWR_VERSIONS))}; refusing to start the node"
        )


def check_signature(fn: Callable[..., Any], expected: Sequence[str], what: str) -> None:
    """Refuse to wrap `fn` unless its parameters are exactly `expected`."""
    params = tuple(inspect.signature(fn).parameters)
    if params != tuple(expected):
        raise LaunchError(f"{what} changed in this flwr ({params}); refusing to start the node")


# ---- the guards -------------------------------------------------------------------------------------------


def make_guarded_pull(original: Callable[..., int | None], approved_file: Path) -> Callable[..., int | None]:
    """`original` (`_pull_and_store_message`), refusing any run whose FAB hash is not approved.

    The check sits in front of `get_fab`, so a refused FAB is never downloaded, stored or run;
    the refusal is answered with Flower's INVALID_FAB error reply, which the node loop sends.
    """
    import flwr.supernode.start_client_internal as sci
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    def guarded(**kwargs: Any) -> int | None:
        seen: dict[str, Any] = {}
        receive, get_fab = kwargs["receive"], kwargs["get_fab"]

        def recording_receive() -> Any:
            got = receive()
            seen["message"] = got[0] if got else None
            return got

        def checked_get_fab(fab_hash: str, run_id: int) -> Any:
            if fab_hash not in approved_now(approved_file):
                raise NotApproved(fab_hash, f"not in {approved_file}")
            fab = get_fab(fab_hash, run_id)
            if hashlib.sha256(fab.content).hexdigest() != fab_hash:
                raise NotApproved(fab_hash, "the downloaded FAB does not have this hash")
            return fab

        try:
            return original(**{**kwargs, "receive": recording_receive, "get_fab": checked_get_fab})
        except NotApproved as exc:
            message = seen["message"]
            run_id = message.metadata.run_id
            _flwr_log(
                logging.ERROR,
                "refused run %s: app hash %s is not approved by this node's operator (%s); "
                "nothing of it was downloaded or run",
                run_id,
                exc.args[0],
                exc.args[1],
            )
            reply = Message(Error(ErrorCode.INVALID_FAB, "app not approved by this node's operator"), reply_to=message)
            sci._insert_message(reply, kwargs["state"], kwargs["object_store"])
            return int(run_id)

    return guarded


def install_pull_guard(approved_file: Path) -> None:
    """Replace Flower's `_pull_and_store_message` with the guarded one (looked up at call time)."""
    import flwr.supernode.start_client_internal as sci

    check_signature(
        sci._pull_and_store_message, PULL_PARAMS, "flwr.supernode.start_client_internal._pull_and_store_message"
    )
    source = inspect.getsource(sci.start_client_internal)
    if "_pull_and_store_message(" not in source:
        raise LaunchError("flwr's SuperNode loop no longer calls _pull_and_store_message; refusing to start the node")
    sci._pull_and_store_message = make_guarded_pull(sci._pull_and_store_message, approved_file)


def install_unpack_guard(approved_file: Path) -> None:
    """In a ClientApp process: refuse to unpack a FAB whose sha256 is not approved (a second check)."""
    import flwr.supernode.runtime.run_clientapp as rc

    original = rc.install_from_fab
    check_signature(original, ("fab_file", "install_dir", "skip_prompt"), "flwr.cli.install.install_from_fab")

    def checked_install(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        digest = hashlib.sha256(fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()).hexdigest()
        if digest not in approved_now(approved_file):
            _flwr_log(logging.ERROR, "refused to unpack app hash %s: not approved by this node's operator", digest)
            raise SystemExit(FATAL_EXIT)
        return original(fab_file, *args, **kwargs)

    rc.install_from_fab = checked_install


# ---- processes -----------------------------------------------------------------------------------------------


def write_clientapp_shim(folder: Path) -> Path:
    """`folder/flwr-clientapp`: starts Flower's ClientApp through this launcher's `clientapp` mode."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "flwr-clientapp"
    command = " ".join(shlex.quote(part) for part in (sys.executable, "-P", str(Path(__file__).resolve()), "clientapp"))
    shim.write_text(f'#!/bin/sh\n# written by weft (node/flower_launch.py)\nexec {command} "$@"\n')
    shim.chmod(0o755)
    return shim


def configure_weft_logging() -> None:
    """Send weft's INFO lines (logger `weft`, e.g. `weft.node`) to stderr, i.e. the node's log."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)-8s %(name)s: %(message)s"))
    weft = logging.getLogger("weft")
    weft.addHandler(handler)
    weft.setLevel(logging.INFO)
    weft.propagate = False


def _flwr_log(level: int, msg: str, *args: Any) -> None:
    """Log through Flower's logger, so the line sits in the node's log with Flower's own."""
    from flwr.supercore import log

    log(level, msg, *args)


def _exit_now(code: int) -> NoReturn:
    """Flush and leave at once: a SuperNode whose loop ended must not linger on its API thread."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def run_supernode(approved_file: Path, flower_args: list[str]) -> NoReturn:
    """Install the guard, put the ClientApp shim first on PATH, then run `flower-supernode`."""
    refused = [a for a in flower_args if a.split("=", 1)[0] in REFUSED_FLAGS]
    if refused:
        raise LaunchError(f"refusing flower-supernode flag(s) {', '.join(refused)}")
    check_flwr_version()
    install_pull_guard(approved_file)
    os.environ[APPROVED_ENV] = str(approved_file)
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    shim_dir = write_clientapp_shim(home / "weft-bin").parent
    os.environ["PATH"] = os.pathsep.join([str(shim_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    code = STOPPED_EXIT
    try:
        flower_supernode()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    _exit_now(code)


def run_clientapp(clientapp_args: list[str]) -> NoReturn:
    """Flower's `flwr-clientapp`, with weft's log lines on and the FAB checked before it is unpacked."""
    configure_weft_logging()
    approved = os.environ.get(APPROVED_ENV)
    if not approved:
        raise LaunchError(f"{APPROVED_ENV} is not set; a ClientApp starts only under `weft node start`")
    check_flwr_version()
    install_unpack_guard(Path(approved))
    from flwr.supernode.cli import flwr_clientapp

    sys.argv = ["flwr-clientapp", *clientapp_args]
    flwr_clientapp()
    sys.exit(0)


USAGE = (
    "usage: flower_launch.py supernode --approved-apps FILE -- FLOWER_SUPERNODE_FLAGS...\n"
    "       flower_launch.py clientapp FLWR_CLIENTAPP_FLAGS..."
)


def parse_supernode_args(args: list[str]) -> tuple[Path, list[str]]:
    """`--approved-apps FILE -- FLAGS...` -> (the allowlist file, flower-supernode's flags)."""
    if len(args) < 3 or args[0] != "--approved-apps" or args[2] != "--":
        raise LaunchError(f"expected --approved-apps FILE -- FLAGS...\n{USAGE}")
    return Path(args[1]).resolve(), args[3:]


def main(argv: list[str] | None = None) -> None:
    """Entry point (as a script): MODE, then the mode's arguments, passed through to Flower untouched."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if args[:1] == ["supernode"]:
            run_supernode(*parse_supernode_args(args[1:]))
        if args[:1] == ["clientapp"]:
            run_clientapp(args[1:])
        raise LaunchError(f"unknown mode {args[:1]}\n{USAGE}")
    except LaunchError as exc:
        print(f"weft: error: {exc}", file=sys.stderr)
        _exit_now(FATAL_EXIT)


if __name__ == "__main__":
    main()
