"""No user mistake ends in a traceback: each one ends with one `weft: error: ...` line, exit code 2, nothing written.

Every test runs the CLI in-process (`federation.cli.main`) on one mistake a user can make: a broken task file,
an unwritable output folder, GPUs or a Ray cluster that are not there, a damaged manifest, key or model file,
a name the manifest would refuse later.
"""

from __future__ import annotations

import base64
import errno
import importlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

import federation.preflight
from federation.cli import main
from federation.errors import ConfigError
from federation.preflight import check_ray_address, check_writable_dir, parse_ray_address
from protocols import (
    GlobalModelEnvelope,
    Manifest,
    SigningKey,
    load_public_key,
    load_signing_key,
    params_digest,
    save_public_key,
    save_signing_key,
    sign_global_model,
    write_signed_model,
)
from protocols.errors import DecodeError, KeyFileError, ManifestDecodeError
from protocols.npz import save_npz

COORDINATOR = SigningKey.from_seed(bytes([1]) * 32)
NODE = SigningKey.from_seed(bytes([2]) * 32)
RAY_HINT = "start the cluster with `ray start --head` or leave --ray-address out"


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The single `weft: error:` line the command printed (asserting it is one line, with nothing on stdout)."""
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.endswith("\n") and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("weft: error: ") and "Traceback" not in captured.err
    return captured.err[len("weft: error: ") : -1]


# ---- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_simulation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in tmp_path, restore sys.path afterwards, and fail the test if data loading or a simulation starts."""
    import federation.simulation

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the simulation started: the mistake should have been reported before")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("simulate", "prepare", "resolve_partition"):
        monkeypatch.setattr(federation.simulation, name, must_not_run)
    return tmp_path


@pytest.fixture
def readonly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder nobody may write in (mode 500).

    As root, where mode bits do not bite, creating anything in it is made to fail with EACCES the way the
    kernel would fail it for anyone else.
    """
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    if os.geteuid() == 0:
        real_mkdir, real_mkstemp = Path.mkdir, federation.preflight.tempfile.mkstemp

        def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
            if self.parent == folder:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            real_mkdir(self, *args, **kwargs)

        def mkstemp(prefix: str | None = None, dir: Path | None = None) -> tuple[int, str]:
            if dir is not None and Path(dir) == folder:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(Path(dir) / ".probe"))
            return real_mkstemp(prefix=prefix, dir=dir)

        monkeypatch.setattr(Path, "mkdir", mkdir)
        monkeypatch.setattr(federation.preflight.tempfile, "mkstemp", mkstemp)
    yield folder
    folder.chmod(0o700)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """COORDINATOR's and NODE's key pairs in tmp_path/keys."""
    folder = tmp_path / "keys"
    for name, key in (("coordinator", COORDINATOR), ("node", NODE)):
        save_signing_key(key, folder / f"{name}.key")
        save_public_key(key.public_key, folder / f"{name}.pub")
    return folder


@pytest.fixture
def manifest_path(tmp_path: Path, keys: Path) -> Path:
    """A signed manifest (version 1, no members) of federation fed-a."""
    path = tmp_path / "manifest.json"
    Manifest("fed-a", COORDINATOR.public_key, ()).save(path, COORDINATOR)
    return path


# ---- 1. a task module that does not import -------------------------------------------------------------------


def _task_module(folder: Path, text: str) -> str:
    """Write a task module with a name no other test uses; return that name."""
    name = f"weft_mistake_task_{time.monotonic_ns()}"
    (folder / f"{name}.py").write_text(text)
    importlib.invalidate_caches()
    return name


def test_task_that_raises_at_import_names_file_line_and_exception(
    no_simulation: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = _task_module(no_simulation, 'import os\n\nraise RuntimeError("no data folder\\nconfigured")\n')
    out = no_simulation / "run"
    assert main(["simulate", "--task", f"{name}:task", "--out", str(out)]) == 2
    message = one_line_error(capsys)
    assert message == (
        f"task '{name}:task': importing it raised RuntimeError in {Path.cwd() / name}.py, line 3: no data folder "
        f"configured; fix the task file (`python -c 'import {name}'` shows the traceback)"
    )
    assert not out.exists()


def test_task_with_a_syntax_error_names_file_and_line(no_simulation: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = _task_module(no_simulation, "from federation.tasks import Task\n\ntask = Task(name=\n")
    out = no_simulation / "run"
    assert main(["simulate", "--task", f"{name}:task", "--out", str(out)]) == 2
    message = one_line_error(capsys)
    assert message.startswith(f"task '{name}:task': syntax error in {Path.cwd() / name}.py, line 3: ")
    assert message.endswith("; fix that line of the task file")
    assert not out.exists()


def test_task_given_as_a_file_path_says_how_to_name_it(no_simulation: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--task", "tasks/my_task.py:task", "--out", str(no_simulation / "run")]) == 2
    assert one_line_error(capsys) == (
        "task 'tasks/my_task.py:task': 'tasks/my_task.py' is a file path; give it as an import path, "
        "e.g. 'tasks.my_task:task' (run weft from the folder that holds it)"
    )


# ---- 2. an output folder that cannot be written ----------------------------------------------------------------


def test_simulate_into_an_unwritable_folder_fails_before_any_work(
    no_simulation: Path, readonly: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = readonly / "run"
    assert main(["simulate", "--task", "synthetic", "--out", str(out)]) == 2
    assert one_line_error(capsys) == f"out: cannot write to {out} (Permission denied); choose a writable folder"
    assert not out.exists()


def test_manifest_init_into_an_unwritable_folder(
    keys: Path, readonly: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = readonly / "manifest.json"
    args = ["manifest", "init", str(path), "--federation-id", "fed-a", "--coordinator-key-file"]
    assert main([*args, str(keys / "coordinator.key")]) == 2
    assert one_line_error(capsys) == (
        f"manifest: cannot write to {readonly} (Permission denied); choose a writable folder"
    )
    assert not path.exists()


@pytest.mark.parametrize("command", [["keygen"], ["keys", "new", "--kind", "node"]], ids=["keygen", "keys-new"])
@pytest.mark.parametrize("inside", [False, True], ids=["existing", "new-subfolder"])
def test_keys_into_an_unwritable_folder(
    readonly: Path, capsys: pytest.CaptureFixture[str], command: list[str], inside: bool
) -> None:
    out = readonly / "keys" if inside else readonly
    assert main([*command, "--out", str(out), "--name", "a"]) == 2
    assert one_line_error(capsys) == f"out: cannot write to {out} (Permission denied); choose a writable folder"
    assert list(readonly.iterdir()) == []


def test_out_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match=r"^out: .*taken is a file, not a folder; choose another folder$"):
        check_writable_dir(tmp_path / "taken" / "run")


def test_writability_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    check_writable_dir(tmp_path / "a" / "b" / "c")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    check_writable_dir(tmp_path / "kept")
    assert list((tmp_path / "kept").iterdir()) == []


# ---- 3. GPUs that are not there ------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "shown"), [("1", "1"), ("0.25", "0.25")])
def test_gpus_per_node_without_cuda_fails_before_ray(
    no_simulation: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], given: str, shown: str
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    out = no_simulation / "run"
    assert main(["simulate", "--task", "synthetic", "--gpus-per-node", given, "--out", str(out)]) == 2
    assert one_line_error(capsys) == (
        f"gpus-per-node: {shown} requested but this machine has no CUDA GPU; use --gpus-per-node 0"
    )
    assert not out.exists()


# ---- 4. a Ray address where nothing answers ------------------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_ray_address_where_nothing_listens_fails_fast(
    no_simulation: Path, capsys: pytest.CaptureFixture[str], address: str
) -> None:
    out = no_simulation / "run"
    start = time.monotonic()
    assert main(["simulate", "--task", "synthetic", "--ray-address", address, "--out", str(out)]) == 2
    assert time.monotonic() - start < 30  # the connect itself: milliseconds for a refusal, 3 s at most
    assert one_line_error(capsys) == f"ray-address: nothing answers at 127.0.0.1:1 (connection refused); {RAY_HINT}"
    assert not out.exists()


def test_ray_address_whose_host_does_not_resolve(no_simulation: Path, capsys: pytest.CaptureFixture[str]) -> None:
    address = "no-such-ray-head.invalid:6379"
    assert main(["simulate", "--task", "synthetic", "--ray-address", address, "--out", "run"]) == 2
    message = one_line_error(capsys)
    assert message.startswith("ray-address: cannot resolve host 'no-such-ray-head.invalid' (")
    assert message.endswith(f"); {RAY_HINT}")


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("auto", None),
        ("local", None),
        ("10.0.0.5:6379", ("10.0.0.5", 6379)),
        ("head", ("head", 6379)),
        ("ray://head", ("head", 10001)),
        ("ray://head:10002/", ("head", 10002)),
        ("[::1]:6380", ("::1", 6380)),
    ],
)
def test_ray_addresses_are_parsed(address: str, parsed: tuple[str, int] | None) -> None:
    assert parse_ray_address(address) == parsed


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("head:http", "ray-address: port 'http' of 'head:http' is not a port number (1-65535)"),
        ("head:0", "ray-address: port '0' of 'head:0' is not a port number (1-65535)"),
        ("http://head:1", "ray-address: 'http://head:1' is not a Ray address; give HOST:PORT or ray://HOST:PORT"),
        (":6379", "ray-address: ':6379' names no host; give HOST:PORT, e.g. 10.0.0.5:6379"),
    ],
)
def test_malformed_ray_addresses(address: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        check_ray_address(address)


# ---- 5. a manifest file that is no manifest ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b'{"format": "weft-manifest/v2", "federation_id": "caf\xe9"}', "not UTF-8 text (byte 52)"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply to be a manifest"),
        (b"federation: fed-a\n", "not valid JSON (Expecting value: line 1 column 1 (char 0))"),
        (b'[{"federation_id": "fed-a"}]', "expected an object"),
    ],
    ids=["not-utf8", "nested-100000", "not-json", "json-list"],
)
def test_manifest_show_on_a_file_that_is_no_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: bytes, problem: str
) -> None:
    path = tmp_path / "manifest.json"
    path.write_bytes(data)
    with pytest.raises(ManifestDecodeError) as info:
        Manifest.load(path)
    assert isinstance(info.value, DecodeError)
    assert str(info.value).startswith(f"{path}: {problem}")
    assert main(["manifest", "show", str(path)]) == 2
    assert one_line_error(capsys).startswith(f"{path}: {problem}")


def test_manifest_show_on_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "show", str(tmp_path)]) == 2
    assert one_line_error(capsys) == f"manifest file {tmp_path} is a folder; give the manifest's JSON file"


# ---- 6. key files of another algorithm ----------------------------------------------------------------------


def _pkcs8(key: Any) -> bytes:
    return bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))


@pytest.mark.parametrize(
    ("make", "holds"),
    [
        (lambda: rsa.generate_private_key(65537, 2048), "an RSA private key"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "an EC (secp256r1) private key"),
    ],
    ids=["rsa", "ec"],
)
def test_private_key_of_another_algorithm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, holds: str
) -> None:
    path = tmp_path / "coordinator.key"
    path.write_bytes(_pkcs8(make()))
    path.chmod(0o600)
    manifest = tmp_path / "manifest.json"
    args = ["manifest", "init", str(manifest), "--federation-id", "fed-a", "--coordinator-key-file", str(path)]
    assert main(args) == 2
    assert one_line_error(capsys) == (
        f"{path} holds {holds}; weft needs an Ed25519 key (a PKCS#8 PEM private key): create one with `weft keygen`"
    )
    assert not manifest.exists()


def _spki(oid_der: bytes, key: bytes) -> bytes:
    """A SubjectPublicKeyInfo PEM with an arbitrary algorithm OID (DER-encoded OID, with tag and length)."""

    def tlv(tag: int, body: bytes) -> bytes:
        return bytes([tag, len(body)]) + body

    der = tlv(0x30, tlv(0x30, oid_der) + tlv(0x03, b"\x00" + key))
    text = base64.b64encode(der).decode()
    return f"-----BEGIN PUBLIC KEY-----\n{text}\n-----END PUBLIC KEY-----\n".encode()


def test_public_key_with_an_unknown_algorithm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "coordinator.pub"
    path.write_bytes(_spki(bytes([0x06, 0x04, 0x2A, 0x03, 0x04, 0x05]), bytes(32)))  # OID 1.2.3.4.5
    with pytest.raises(KeyFileError):
        load_public_key(path)
    assert main(["verify-model", str(tmp_path / "model.npz"), "--coordinator-key", str(path)]) == 2
    assert one_line_error(capsys) == (
        f"{path}: Unknown key type: 1.2.3.4.5; weft needs an Ed25519 key (a PEM public key): "
        "the NAME.pub that `weft keygen` writes"
    )


def test_public_key_of_another_algorithm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "coordinator.pub"
    path.write_bytes(ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    assert main(["verify-model", str(tmp_path / "model.npz"), "--coordinator-key", str(path)]) == 2
    assert one_line_error(capsys).startswith(f"{path} holds an EC (secp384r1) public key; weft needs an Ed25519 key")


@pytest.mark.parametrize(
    "line",
    ["ssh-foo AAAAB3NzaC1yc2EAAAADAQABAAABAQC", "ecdsa-sha2-nistp384 AAAA!!!", "-----BEGIN PUBLIC KEY-----"],
    ids=["unknown-prefix", "bad-base64", "pem"],
)
def test_flower_auth_key_of_an_unknown_algorithm(
    manifest_path: Path, keys: Path, capsys: pytest.CaptureFixture[str], line: str
) -> None:
    flower = keys / "node.flower.pub"
    flower.write_text(line + "\n")
    before = manifest_path.read_bytes()
    args = ["manifest", "add", str(manifest_path), "--name", "node", "--key", str(keys / "node.pub")]
    args += ["--jurisdiction", "DE", "--max-examples", "10", "--flower-auth-key", str(flower)]
    assert main([*args, "--coordinator-key-file", str(keys / "coordinator.key")]) == 2
    message = one_line_error(capsys)
    assert message.startswith(f"{flower}: not an OpenSSH public key (")
    assert message.endswith(
        "; expected one OpenSSH line 'ecdsa-sha2-nistp384 AAAA...' (NAME.flower.pub from `weft keys new --kind node`)"
    )
    assert manifest_path.read_bytes() == before


# ---- 7. a model file that is not what weft writes -------------------------------------------------------------


@pytest.fixture
def model(tmp_path: Path, keys: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A signed model file; returns (path, its entries as written)."""
    arrays = {"0.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    envelope = GlobalModelEnvelope("fed-a", "run-1", 3, params_digest(arrays), "digits", {"local_epochs": 1})
    path = tmp_path / "global_model.npz"
    write_signed_model(path, arrays, sign_global_model(COORDINATOR, envelope))
    with np.load(path) as npz:
        return path, {name: npz[name] for name in npz.files}


@pytest.mark.parametrize(
    ("entry", "value", "problem"),
    [
        ("__weft__.signature", np.zeros((8, 8)), "must be a 1-D uint8 array, got float64 of shape (8, 8)"),
        ("__weft__.signature", np.array(7, dtype=np.uint8), "must be a 1-D uint8 array, got uint8 of shape ()"),
        ("__weft__.envelope", np.zeros((2, 2), dtype=np.float32), "must be a 1-D uint8 array, got float32 of shape"),
        ("__weft__.signature", np.zeros(63, dtype=np.uint8), "holds 63 bytes, an Ed25519 signature is 64"),
    ],
    ids=["signature-float-matrix", "signature-0d", "envelope-float", "signature-short"],
)
def test_verify_model_with_a_malformed_envelope_entry(
    model: tuple[Path, dict[str, np.ndarray]],
    keys: Path,
    capsys: pytest.CaptureFixture[str],
    entry: str,
    value: np.ndarray,
    problem: str,
) -> None:
    path, entries = model
    save_npz(path, {**entries, entry: value})
    assert main(["verify-model", str(path), "--coordinator-key", str(keys / "coordinator.pub")]) == 2
    message = one_line_error(capsys)
    assert message.startswith(f"{path}: entry {entry} {problem}")
    assert message.endswith("the file was not written by weft or was damaged")


def test_verify_model_without_an_envelope(
    model: tuple[Path, dict[str, np.ndarray]], keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, entries = model
    save_npz(path, {k: v for k, v in entries.items() if k != "__weft__.signature"})
    assert main(["verify-model", str(path), "--coordinator-key", str(keys / "coordinator.pub")]) == 2
    assert one_line_error(capsys) == f"{path} carries no signed envelope"


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"not a zip file at all\n", "is not a weft model file: "), (None, "is a folder, not a model file")],
    ids=["text", "folder"],
)
def test_verify_model_on_something_that_is_no_npz(
    tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, problem: str
) -> None:
    path = tmp_path / "model.npz"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert main(["verify-model", str(path), "--coordinator-key", str(keys / "coordinator.pub")]) == 2
    assert one_line_error(capsys).startswith(f"{path} {problem}")


def test_verify_model_on_a_missing_file(tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.npz"
    assert main(["verify-model", str(path), "--coordinator-key", str(keys / "coordinator.pub")]) == 2
    assert one_line_error(capsys) == (f"model file {path} does not exist; give the global_model.npz a weft run wrote")


# ---- 8. names the manifest would refuse on every later load ------------------------------------------------------


def test_manifest_add_with_an_empty_name_writes_nothing(
    manifest_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = manifest_path.read_bytes()
    args = ["manifest", "add", str(manifest_path), "--name", "", "--key", str(keys / "node.pub")]
    args += ["--jurisdiction", "DE", "--max-examples", "10", "--coordinator-key-file", str(keys / "coordinator.key")]
    assert main(args) == 2
    assert one_line_error(capsys) == (
        "name: '' is not a valid name (1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit)"
    )
    assert manifest_path.read_bytes() == before
    assert sorted(p.name for p in manifest_path.parent.iterdir()) == ["keys", "manifest.json"]


def test_manifest_init_with_a_bad_federation_id_writes_nothing(
    tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "new" / "manifest.json"
    args = ["manifest", "init", str(path), "--federation-id", "bad id!"]
    assert main([*args, "--coordinator-key-file", str(keys / "coordinator.key")]) == 2
    assert one_line_error(capsys) == (
        "federation_id: 'bad id!' is not a valid federation id "
        "(1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit)"
    )
    assert not path.exists() and not path.parent.exists()


# ---- 9. what reaches main ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (PermissionError(errno.EACCES, "Permission denied", "/srv/x"), "/srv/x: Permission denied; check its "
         "permissions or choose another path"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/srv/y"), "/srv/y: No such file or "
         "directory; check the path"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/srv"), "/srv: Is a directory; give a file, not a folder"),
        (b"\xff".decode, "a file given is not UTF-8 text (invalid start byte at byte 0); check the paths passed to "
         "this command"),
    ],
    ids=["permission", "not-found", "is-a-directory", "unicode"],
)  # fmt: skip
def test_os_and_unicode_errors_about_user_files_are_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], error: Any, message: str
) -> None:
    def command(args: object) -> int:
        if callable(error):
            error()
        raise error

    monkeypatch.setattr("federation.cli._verify_model", command)
    assert main(["verify-model", "m.npz", "--coordinator-key", "c.pub"]) == 2
    assert one_line_error(capsys) == message


def test_an_internal_bug_still_surfaces(monkeypatch: pytest.MonkeyPatch) -> None:
    def command(args: object) -> int:
        raise KeyError("a bug, not a user's mistake")

    monkeypatch.setattr("federation.cli._verify_model", command)
    with pytest.raises(KeyError):
        main(["verify-model", "m.npz", "--coordinator-key", "c.pub"])


def test_a_multi_line_message_is_printed_on_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def command(args: object) -> int:
        raise ConfigError("first line\n  second line\n")

    monkeypatch.setattr("federation.cli._verify_model", command)
    assert main(["verify-model", "m.npz", "--coordinator-key", "c.pub"]) == 2
    assert one_line_error(capsys) == "first line second line"


def test_key_file_that_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(KeyFileError, match="is a folder; give the key file itself"):
        load_signing_key(tmp_path)
    assert main(["verify-model", "m.npz", "--coordinator-key", str(tmp_path)]) == 2
    assert one_line_error(capsys) == f"public key file {tmp_path} is a folder; give the key file itself"
