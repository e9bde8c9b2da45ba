"""Start Flower's SuperLink with its Control and Runtime APIs reachable from loopback only.

`weft coordinator start` runs this file as a script (`python -P coordinator/flower_launch.py
superlink -- <flower-superlink flags>`). Flower 1.42 serves Fleet, Control and Runtime on one
HTTP port, and the OSS Control API has no authentication: whoever reaches the port could start
runs, register SuperNode keys or stop runs. The launcher wraps `flwr.superlink.main._get_middleware`
(read by `create_app` when the server is built) and puts a pure-ASGI guard outermost: a client
whose address is not loopback may reach only the Fleet routes (which node authentication
protects) and `/health`; everything else gets 403. The ServerApp's SuperExec, `flwr run`, `flwr ls`
and `flwr supernode register` all connect over loopback, so they keep working; a remote operator
uses an SSH tunnel.

It pins what it wraps: a flwr version it was not tested with, a changed `_get_middleware`, or a
`create_app` that no longer reads it, and it refuses to start (exit 78). It also drops the
environment switches that would open Flower's legacy gRPC Control/Fleet servers on other ports.
It imports nothing from weft's other packages.
"""

from __future__ import annotations

import inspect
import ipaddress
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, NoReturn

TESTED_FLWR_VERSIONS = frozenset({"1.42.0"})
"""flwr versions whose private `_get_middleware` / `create_app` the guard was written and tested against."""
FATAL_EXIT = 78
"""Exit status for a start-up problem that retrying cannot fix (EX_CONFIG)."""
REFUSED_FLAGS = ("--insecure", "--isolation")
"""flower-superlink flags weft never passes: no TLS, another process layout."""
DROPPED_ENV = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API", "FLWR_OIDC_ENABLED")
"""Environment switches that would start unguarded gRPC servers (or an auth plugin weft does not ship)."""

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class LaunchError(Exception):
    """The launcher cannot start safely; the message says why."""


def fleet_paths() -> frozenset[str]:
    """The HTTP paths a remote SuperNode needs: Flower's Fleet routes and `/health`."""
    from flwr.superlink.routers.fleet.router import router

    paths = frozenset(str(getattr(route, "path", "")) for route in router.routes)
    if "/v1/fleet/pull-messages" not in paths:
        raise LaunchError("flwr's Fleet routes changed; refusing to start the SuperLink")
    return paths | {"/health"}


def is_loopback(host: str) -> bool:
    """Whether a client address is loopback (127.0.0.0/8, ::1 or an IPv4-mapped loopback)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


class LocalOnlyExceptFleet:
    """ASGI middleware: requests from a non-loopback client reach only `allowed` paths; others get 403."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope.get("path") not in self.allowed:
            client = scope.get("client") or ("", 0)
            if not is_loopback(str(client[0])):
                await self._forbid(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _forbid(scope: Scope, receive: Receive, send: Send) -> None:
        from starlette.responses import PlainTextResponse

        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = "weft: the SuperLink's Control and Runtime APIs are local only\n"
        await PlainTextResponse(body, status_code=403)(scope, receive, send)


def check_flwr() -> None:
    """Refuse a flwr whose version, `_get_middleware` or `create_app` differ from what was tested."""
    import flwr
    import flwr.superlink.main as slmain

    version = getattr(flwr, "__version__", "unknown")
    if version not in TESTED_FLWR_VERSIONS:
        raise LaunchError(
            f"flwr {version} is installed, but weft's local-only Control API guard is tested only with "
            f"{', '.join(sorted(TESTED_FLWR_VERSIONS))}; refusing to start the SuperLink"
        )
    if tuple(inspect.signature(slmain._get_middleware).parameters):
        raise LaunchError("flwr.superlink.main._get_middleware changed; refusing to start the SuperLink")
    if "middleware=_get_middleware()" not in inspect.getsource(slmain.create_app):
        raise LaunchError("flwr's create_app no longer reads _get_middleware(); refusing to start the SuperLink")


def install_guard() -> None:
    """Make every SuperLink app built from now on start with `LocalOnlyExceptFleet`."""
    import flwr.superlink.main as slmain
    from starlette.middleware import Middleware

    check_flwr()
    allowed = fleet_paths()
    original = slmain._get_middleware

    def guarded_middleware() -> list[Middleware]:
        return [Middleware(LocalOnlyExceptFleet, allowed=allowed), *original()]

    slmain._get_middleware = guarded_middleware


def run_superlink(flower_args: list[str]) -> NoReturn:
    """Install the guard, clean the environment, then run `flower-superlink` with `flower_args`."""
    refused = [a for a in flower_args if a.split("=", 1)[0] in REFUSED_FLAGS]
    if refused:
        raise LaunchError(f"refusing flower-superlink flag(s) {', '.join(refused)}")
    for name in DROPPED_ENV:
        os.environ.pop(name, None)
    install_guard()
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *flower_args]
    flower_superlink()
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    """Entry point (as a script): `superlink -- FLAGS...`, the flags passed through to Flower untouched."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if args[:2] != ["superlink", "--"]:
            raise LaunchError("usage: flower_launch.py superlink -- FLOWER_SUPERLINK_FLAGS...")
        run_superlink(args[2:])
    except LaunchError as exc:
        print(f"weft: error: {exc}", file=sys.stderr)
        sys.exit(FATAL_EXIT)


if __name__ == "__main__":
    main()
