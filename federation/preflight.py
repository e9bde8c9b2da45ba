"""Checks the CLI runs before any work starts, so a user's mistake ends in one line, not a traceback or a hang.

Each check raises `ConfigError` whose message names the flag, the problem and the fix. None of them leaves
anything behind: a writability probe removes the temporary file and every folder it created.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import tempfile
from pathlib import Path

from federation.errors import ConfigError

RAY_CONNECT_TIMEOUT_S = 3.0
"""How long `check_ray_address` waits for a TCP connection before calling the address dead."""
RAY_DEFAULT_PORT = 6379
"""The port of a Ray head (`ray start --head`) when an address gives none."""
RAY_CLIENT_DEFAULT_PORT = 10001
"""The port of a Ray client server (`ray://host`) when an address gives none."""


def check_writable_dir(path: Path, flag: str = "out") -> None:
    """Raise `ConfigError` unless a file can be created in folder `path` (created if missing).

    Tries it: creates the missing folders and a temporary file in `path`, then removes both again, so a
    folder that did not exist before does not exist after.
    """
    created: list[Path] = []
    where = path  # what the step that failed tried to create in
    try:
        probe = path
        while not probe.exists() and probe != probe.parent:
            created.append(probe)
            probe = probe.parent
        if not probe.is_dir():
            raise ConfigError(f"{flag}: {probe} is a file, not a folder; choose another folder")
        for folder in reversed(created):
            where = folder
            folder.mkdir()
        where = path
        fd, tmp = tempfile.mkstemp(prefix=".weft-probe-", dir=path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            raise ConfigError(f"{flag}: cannot use {where} as a folder ({reason}); choose a writable folder") from None
        raise ConfigError(f"{flag}: cannot write to {where} ({reason}); choose a writable folder") from None
    finally:
        for folder in created:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()


def check_gpus(gpus_per_node: float) -> None:
    """Raise `ConfigError` if GPUs are requested per node but this machine has no CUDA GPU (imports torch)."""
    if gpus_per_node <= 0:
        return
    import torch

    if torch.cuda.device_count() == 0:
        shown = f"{gpus_per_node:g}"
        raise ConfigError(f"gpus-per-node: {shown} requested but this machine has no CUDA GPU; use --gpus-per-node 0")


def parse_ray_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address `host:port` or `ray://host:port`; None for `auto` / `local` (Ray's own).

    Raises `ConfigError` for an address that is not of that form.
    """
    text = address.strip()
    if text.lower() in ("auto", "local", ""):
        return None
    default_port = RAY_DEFAULT_PORT
    if text.lower().startswith("ray://"):
        text, default_port = text[len("ray://") :], RAY_CLIENT_DEFAULT_PORT
    elif "://" in text:
        raise ConfigError(
            f"ray-address: {address!r} is not a Ray address; give HOST:PORT or ray://HOST:PORT, or leave it out"
        )
    text = text.rstrip("/")
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            host = ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ConfigError(f"ray-address: {address!r} names no host; give HOST:PORT, e.g. 10.0.0.5:6379")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"ray-address: port {port_text!r} of {address!r} is not a port number (1-65535)")
    return host, int(port_text)


def check_ray_address(address: str | None, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Raise `ConfigError` unless something accepts a TCP connection at the Ray address (`auto`/`local` pass)."""
    if address is None:
        return
    target = parse_ray_address(address)
    if target is None:
        return
    host, port = target
    hint = "start the cluster with `ray start --head` or leave --ray-address out"
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except socket.gaierror as exc:
        raise ConfigError(f"ray-address: cannot resolve host {host!r} ({exc.strerror}); {hint}") from None
    except TimeoutError:
        raise ConfigError(
            f"ray-address: nothing answers at {host}:{port} (timed out after {timeout_s:g} s); {hint}"
        ) from None
    except OSError as exc:
        reason = (exc.strerror or type(exc).__name__).lower()
        raise ConfigError(f"ray-address: nothing answers at {host}:{port} ({reason}); {hint}") from None
