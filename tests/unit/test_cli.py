"""federation/cli.py: keys, manifest edits, verify-model and simulate's start-up checks (no simulation is run)."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import numpy as np
import pytest

import federation.simulation
from federation.cli import main
from federation.config import RunConfig
from protocols import (
    GlobalModelEnvelope,
    SigningKey,
    load_public_key,
    load_signing_key,
    params_digest,
    save_public_key,
    sign_global_model,
    write_signed_model,
)

COORDINATOR = SigningKey.from_seed(bytes([1]) * 32)
OTHER = SigningKey.from_seed(bytes([7]) * 32)
KINDS = "tamper, unsigned, nonmember, replay, nan, shape, inflate, signflip, scale, die"


# ---- keygen --------------------------------------------------------------------------------------------------


def test_keygen_writes_key_pair_and_prints_member_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys"
    assert main(["keygen", "--out", str(out), "--name", "a"]) == 0
    key_path, pub_path = out / "a.key", out / "a.pub"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = load_signing_key(key_path)
    assert load_public_key(pub_path) == key.public_key
    captured = capsys.readouterr()
    assert captured.out == f"member id {key.member_id}: {key_path} (private, mode 600), {pub_path}\n"
    assert captured.err == ""


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["keygen", "--out", str(tmp_path), "--name", "a"]
    assert main(args) == 0
    first_key = (tmp_path / "a.key").read_bytes()
    first_pub = (tmp_path / "a.pub").read_bytes()
    capsys.readouterr()

    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"weft: error: {tmp_path / 'a.key'} already exists; refusing to overwrite a key\n"
    assert "Traceback" not in captured.err
    assert (tmp_path / "a.key").read_bytes() == first_key
    assert (tmp_path / "a.pub").read_bytes() == first_pub


# ---- verify-model --------------------------------------------------------------------------------------------


@pytest.fixture
def signed_model(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """A global model signed by COORDINATOR, and COORDINATOR's public key file."""
    arrays = {"0.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "0.bias": np.zeros(2, dtype=np.float32)}
    digest = params_digest(arrays)
    envelope = GlobalModelEnvelope(
        federation_id="fed-a",
        run_id="run-1",
        round=3,
        model_digest=digest,
        task="digits",
        config=RunConfig().train_config(),
    )
    model_path = tmp_path / "global_model.npz"
    write_signed_model(model_path, arrays, sign_global_model(COORDINATOR, envelope))
    key_path = tmp_path / "coordinator.pub"
    save_public_key(COORDINATOR.public_key, key_path)
    return model_path, key_path, digest


def test_verify_model_ok(signed_model: tuple[Path, Path, bytes], capsys: pytest.CaptureFixture[str]) -> None:
    model_path, key_path, digest = signed_model
    assert main(["verify-model", str(model_path), "--coordinator-key", str(key_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == (
        f"OK: signed by the coordinator; federation fed-a, run run-1, round 3, task digits, digest {digest.hex()}\n"
    )
    assert captured.err == ""


def test_verify_model_wrong_key(
    signed_model: tuple[Path, Path, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_path, _, _ = signed_model
    other_key = tmp_path / "other.pub"
    save_public_key(OTHER.public_key, other_key)
    assert main(["verify-model", str(model_path), "--coordinator-key", str(other_key)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"weft: error: signature does not verify for member {OTHER.member_id}\n"


def test_verify_model_missing_key_file(
    signed_model: tuple[Path, Path, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_path, _, _ = signed_model
    missing = tmp_path / "nobody.pub"
    assert main(["verify-model", str(model_path), "--coordinator-key", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"weft: error: public key file {missing} does not exist; create one with `weft keygen`\n")


def test_verify_model_tampered_array(
    signed_model: tuple[Path, Path, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_path, key_path, _ = signed_model
    with np.load(model_path) as npz:
        entries = {name: npz[name] for name in npz.files}
    entries["0.bias"] = entries["0.bias"] + 1
    tampered = tmp_path / "tampered.npz"
    np.savez(tampered, **entries)
    assert main(["verify-model", str(tampered), "--coordinator-key", str(key_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"weft: error: {tampered}: arrays do not match the signed model digest\n"


# ---- simulate: bad input fails before anything starts ----------------------------------------------------------


@pytest.fixture
def no_simulation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in tmp_path, restore sys.path afterwards, and fail the test if a simulation would start."""

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("simulate() was called: the error should have been reported before Ray starts")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(federation.simulation, "simulate", must_not_run)
    monkeypatch.setattr(federation.simulation, "prepare", must_not_run)
    return tmp_path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--task", "nope"],
            "task 'nope' is neither a built-in (digits, lm, synthetic) "
            "nor an import path of the form 'package.module:attribute'",
        ),
        (["--adversary", "bogus=1"], f"adversary: unknown kind 'bogus'; choose from {KINDS}"),
        (["--adversary", "tamper"], "adversary: expected kind=count, got 'tamper'"),
        (["--nodes", "0"], "nodes: must be >= 1"),
        (["--alpha", "0"], "alpha: must be > 0"),
        (["--quorum", "1.5"], "quorum: must be in (0, 1]"),
        (["--rounds", "0"], "rounds: must be >= 1"),
        (["--cpus-per-node", "0"], "cpus-per-node: must be > 0"),
    ],
)
def test_simulate_rejects_bad_input_before_starting(
    no_simulation: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    out = no_simulation / "x"
    assert main(["simulate", "--out", str(out), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"weft: error: {message}\n"
    assert not out.exists()


def test_simulate_missing_task_module_names_it(no_simulation: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--task", "no_such_module_xyz:task", "--out", str(no_simulation / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("weft: error: task 'no_such_module_xyz:task': cannot import module 'no_such_module_xyz'")
    assert "Traceback" not in err


def test_keygen_refuses_to_overwrite_an_existing_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.pub").write_text("someone else's key")
    assert main(["keygen", "--out", str(tmp_path), "--name", "a"]) == 2
    assert "a.pub already exists" in capsys.readouterr().err
    assert (tmp_path / "a.pub").read_text() == "someone else's key"
    assert not (tmp_path / "a.key").exists()


# ---- keys new ----------------------------------------------------------------------------------------------------


def test_keys_new_node_writes_weft_and_flower_key_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from argparse import Namespace

    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    from protocols import flower_auth_public_key, load_flower_auth_public_key

    out = tmp_path / "keys"
    assert main(["keys", "new", "--kind", "node", "--out", str(out), "--name", "hospital-a"]) == 0
    key_path, pub_path = out / "hospital-a.key", out / "hospital-a.pub"
    fkey_path, fpub_path = out / "hospital-a.flower.key", out / "hospital-a.flower.pub"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (key_path, pub_path, fkey_path, fpub_path))
    assert stat.S_IMODE(key_path.stat().st_mode) == stat.S_IMODE(fkey_path.stat().st_mode) == 0o600
    key = load_signing_key(key_path)
    assert load_public_key(pub_path) == key.public_key
    # the Flower auth pair: ECDSA P-384, OpenSSH formats, as `ssh-keygen -t ecdsa -b 384` writes them
    assert fkey_path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    private = load_ssh_private_key(fkey_path.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    line = fpub_path.read_text()
    assert line.startswith("ecdsa-sha2-nistp384 AAAA") and line.endswith(" hospital-a\n")
    assert load_ssh_public_key(line.encode()).public_numbers() == private.public_key().public_numbers()
    assert load_flower_auth_public_key(fpub_path) == flower_auth_public_key(line) == line.rsplit(" ", 1)[0]
    # ...and Flower 1.42's own loaders accept them (flower-supernode and `flwr supernode register`)
    loaded = _try_setup_client_authentication(
        Namespace(auth_supernode_private_key=str(fkey_path), auth_supernode_public_key=None)
    )
    assert loaded is not None and loaded[1].public_numbers() == private.public_key().public_numbers()
    assert len(try_load_public_key(fpub_path)) > 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"member id {key.member_id}: {key_path} (private, mode 600), {pub_path}",
        f"Flower auth key (ECDSA P-384, OpenSSH): {fkey_path} (private, mode 600; flower-supernode "
        f"--auth-supernode-private-key), {fpub_path} (flwr supernode register; weft manifest add --flower-auth-key)",
    ]
    assert captured.err == ""


def test_keys_new_coordinator_writes_the_ed25519_pair_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new", "--kind", "coordinator", "--out", str(tmp_path), "--name", "coordinator"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coordinator.key", "coordinator.pub"]
    key = load_signing_key(tmp_path / "coordinator.key")
    key_path, pub_path = tmp_path / "coordinator.key", tmp_path / "coordinator.pub"
    assert capsys.readouterr().out == f"member id {key.member_id}: {key_path} (private, mode 600), {pub_path}\n"


def test_keygen_is_an_alias_of_keys_new(tmp_path: Path) -> None:
    assert main(["keygen", "--kind", "node", "--out", str(tmp_path), "--name", "n"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.flower.key", "n.flower.pub", "n.key", "n.pub"]


def test_keys_new_writes_nothing_if_any_file_exists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "n.flower.pub").write_text("someone else's key")
    assert main(["keys", "new", "--kind", "node", "--out", str(tmp_path), "--name", "n"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"weft: error: {tmp_path / 'n.flower.pub'} already exists; refusing to overwrite a key\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.flower.pub"]


@pytest.mark.parametrize("name", ["", "../elsewhere", "a b"])
def test_keys_new_refuses_a_bad_name(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    assert main(["keys", "new", "--kind", "coordinator", "--out", str(tmp_path), "--name", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"weft: error: name: {name!r} is not a valid file name stem") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_keys_new_requires_a_kind(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["keys", "new", "--out", str(tmp_path), "--name", "n"])
    assert info.value.code == 2
    assert "--kind" in capsys.readouterr().err


# ---- manifest ------------------------------------------------------------------------------------------------------


@pytest.fixture
def fed_dir(tmp_path: Path) -> Path:
    """keys/coordinator.{key,pub}, keys/a.* (node, with Flower auth keys), keys/b.{key,pub}, keys/other.*"""
    keys = tmp_path / "keys"
    for kind, name in (("coordinator", "coordinator"), ("node", "a"), ("coordinator", "b"), ("coordinator", "other")):
        assert main(["keys", "new", "--kind", kind, "--out", str(keys), "--name", name]) == 0
    return tmp_path


def _weft(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_manifest_every_edit_writes_the_next_signed_version(fed_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from protocols import Manifest, Status, load_flower_auth_public_key

    keys, path = fed_dir / "keys", fed_dir / "manifest.json"
    signer = ["--coordinator-key-file", str(keys / "coordinator.key")]
    coordinator = load_signing_key(keys / "coordinator.key")
    a, b = load_public_key(keys / "a.pub"), load_public_key(keys / "b.pub")

    def version() -> int:
        return Manifest.load(path, coordinator_key=coordinator.public_key).version

    code, out, err = _weft(capsys, "manifest", "init", str(path), "--federation-id", "fed-x",
                           "--coordinator-key", str(keys / "coordinator.pub"), *signer)  # fmt: skip
    assert (code, err, version()) == (0, "", 1)
    assert out == (
        f"created {path} (version 1) for federation fed-x, signed by coordinator {coordinator.member_id} "
        "(no members yet: add them with `weft manifest add`)\n"
    )
    code, out, _ = _weft(capsys, "manifest", "add", str(path), "--name", "a", "--key", str(keys / "a.pub"),
                         "--jurisdiction", "DE", "--max-examples", "100",
                         "--flower-auth-key", str(keys / "a.flower.pub"), *signer)  # fmt: skip
    assert (code, version()) == (0, 2)
    assert out == f"added a (member id {a.member_id}, DE) to {path}: version 2\n"
    code, _, _ = _weft(capsys, "manifest", "add", str(path), "--name", "b", "--key", str(keys / "b.pub"),
                       "--jurisdiction", "FR", "--max-examples", "50", *signer)  # fmt: skip
    assert (code, version()) == (0, 3)
    code, out, _ = _weft(capsys, "manifest", "suspend", str(path), "--member", "a", *signer)
    assert (code, version()) == (0, 4)
    assert out == f"a (member id {a.member_id}) is now suspended in {path}: version 4\n"
    code, out, _ = _weft(capsys, "manifest", "reinstate", str(path), "--member", a.member_id, *signer)
    assert (code, version()) == (0, 5)
    assert out == f"a (member id {a.member_id}) is now active in {path}: version 5\n"
    code, out, _ = _weft(capsys, "manifest", "revoke", str(path), "--member", "b", *signer)
    assert (code, version()) == (0, 6)
    assert out == f"b (member id {b.member_id}) is now revoked in {path}: version 6\n"

    manifest = Manifest.load(path, coordinator_key=coordinator.public_key)
    assert {m.name: m.status for m in manifest} == {"a": Status.ACTIVE, "b": Status.REVOKED}
    assert manifest.get(a.member_id).flower_auth_key == load_flower_auth_public_key(keys / "a.flower.pub")  # type: ignore[union-attr]
    assert manifest.get(b.member_id).flower_auth_key == ""  # type: ignore[union-attr]
    assert sorted(p.name for p in fed_dir.iterdir()) == ["keys", "manifest.json"]  # no temporary file left

    # revocation is final: one line, exit code 2, the file unchanged
    before = path.read_text()
    code, out, err = _weft(capsys, "manifest", "reinstate", str(path), "--member", "b", *signer)
    assert (code, out, err) == (2, "", "weft: error: member: 'b' is revoked; revocation is final\n")
    assert path.read_text() == before

    code, out, err = _weft(capsys, "manifest", "show", str(path), "--coordinator-key", str(keys / "coordinator.pub"))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == (
        f"{path}: federation fed-x, version 6, coordinator {coordinator.member_id}; "
        "signature verified under the given coordinator key"
    )
    assert sorted(lines[1:]) == sorted(
        [
            f"  {a.member_id}  a  DE  active  max-examples 100  flower-auth yes",
            f"  {b.member_id}  b  FR  revoked  max-examples 50  flower-auth no",
        ]
    )


@pytest.fixture
def manifest_path(fed_dir: Path) -> Path:
    keys, path = fed_dir / "keys", fed_dir / "manifest.json"
    assert main(["manifest", "init", str(path), "--federation-id", "fed-x",
                 "--coordinator-key-file", str(keys / "coordinator.key")]) == 0  # fmt: skip
    assert main(["manifest", "add", str(path), "--name", "a", "--key", str(keys / "a.pub"), "--jurisdiction", "DE",
                 "--max-examples", "100", "--coordinator-key-file", str(keys / "coordinator.key")]) == 0  # fmt: skip
    return path


def _add(path: Path, keys: Path, **changes: str) -> list[str]:
    args = {"--name": "b", "--key": str(keys / "b.pub"), "--jurisdiction": "FR", "--max-examples": "10",
            "--coordinator-key-file": str(keys / "coordinator.key"), **changes}  # fmt: skip
    return ["manifest", "add", str(path), *[x for pair in args.items() for x in pair]]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"--name": ""}, "name: '' is not a valid name (1-128 characters of A-Z a-z 0-9 . _ -, starting with"),
        ({"--name": "a"}, "members: name 'a' is used by two members"),
        ({"--jurisdiction": "D E"}, "jurisdiction: 'D E' is not a valid jurisdiction"),
        ({"--max-examples": "0"}, "max_examples: must be an integer from 1 to 2^53 - 1, got 0"),
        ({"--key": "KEYS/a.pub"}, "key: member {a} is already in the manifest (as 'a')"),
        ({"--key": "KEYS/nobody.pub"}, "public key file KEYS/nobody.pub does not exist; create one with `weft keygen`"),
        ({"--key": "KEYS/weak.pub"}, "KEYS/weak.pub: refused Ed25519 public key 01000000"),
        ({"--flower-auth-key": "KEYS/b.pub"}, "KEYS/b.pub: not an OpenSSH public key"),
        ({"--coordinator-key-file": "KEYS/other.key"}, "{manifest}: signed by coordinator key {coordinator}, not by"),
        ({"--coordinator-key-file": "KEYS/a.flower.key"}, "KEYS/a.flower.key is not an unencrypted PEM private key"),
    ],
    ids=[
        "empty-name",
        "taken-name",
        "jurisdiction",
        "max-examples",
        "member-twice",
        "missing-key",
        "weak-key",
        "flower-key-not-openssh",
        "other-coordinator",
        "flower-key-as-coordinator",
    ],
)
def test_manifest_add_errors_are_one_line_and_write_nothing(
    manifest_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, str], message: str
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    keys = manifest_path.parent / "keys"
    weak = Ed25519PublicKey.from_public_bytes(bytes.fromhex("01" + "00" * 31))
    (keys / "weak.pub").write_bytes(weak.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    names = {
        "manifest": str(manifest_path),
        "a": load_public_key(keys / "a.pub").member_id,
        "coordinator": load_signing_key(keys / "coordinator.key").member_id,
    }
    changes = {k: v.replace("KEYS", str(keys)) for k, v in changes.items()}
    before = manifest_path.read_text()
    code, out, err = _weft(capsys, *_add(manifest_path, keys, **changes))
    assert (code, out) == (2, "")
    assert err.startswith("weft: error: " + message.replace("KEYS", str(keys)).format(**names)), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert manifest_path.read_text() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--federation-id", "bad id!"], "federation_id: 'bad id!' is not a valid federation id (1-128 characters"),
        (["--federation-id", ""], "federation_id: '' is not a valid federation id"),
        (
            ["--federation-id", "f", "--coordinator-key", "KEYS/other.pub"],
            "coordinator-key: KEYS/other.pub is not the public half of KEYS/coordinator.key",
        ),
    ],
)
def test_manifest_init_errors_are_one_line_and_write_nothing(
    fed_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    keys, path = fed_dir / "keys", fed_dir / "manifest.json"
    args = [a.replace("KEYS", str(keys)) for a in args]
    code, out, err = _weft(
        capsys, "manifest", "init", str(path), *args, "--coordinator-key-file", str(keys / "coordinator.key")
    )
    assert (code, out) == (2, "")
    assert err.startswith("weft: error: " + message.replace("KEYS", str(keys))) and err.count("\n") == 1
    assert not path.exists()


def test_manifest_init_refuses_an_existing_file(manifest_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = manifest_path.parent / "keys"
    code, _, err = _weft(capsys, "manifest", "init", str(manifest_path), "--federation-id", "f",
                         "--coordinator-key-file", str(keys / "coordinator.key"))  # fmt: skip
    assert (code, err) == (2, f"weft: error: {manifest_path} already exists\n")


@pytest.mark.parametrize(
    ("action", "member", "message"),
    [
        ("suspend", "nobody", "member: no member named 'nobody' or with that id in this manifest"),
        ("reinstate", "a", "member: 'a' is already active"),
    ],
)
def test_manifest_status_errors(
    manifest_path: Path, capsys: pytest.CaptureFixture[str], action: str, member: str, message: str
) -> None:
    keys = manifest_path.parent / "keys"
    before = manifest_path.read_text()
    code, out, err = _weft(capsys, "manifest", action, str(manifest_path), "--member", member,
                           "--coordinator-key-file", str(keys / "coordinator.key"))  # fmt: skip
    assert (code, out, err) == (2, "", f"weft: error: {message}\n")
    assert manifest_path.read_text() == before


def test_manifest_edit_of_a_tampered_file_is_refused(manifest_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = manifest_path.parent / "keys"
    manifest_path.write_text(manifest_path.read_text().replace('"max_examples": 100', '"max_examples": 100000'))
    code, _, err = _weft(capsys, "manifest", "suspend", str(manifest_path), "--member", "a",
                         "--coordinator-key-file", str(keys / "coordinator.key"))  # fmt: skip
    assert code == 2
    assert err.startswith(f"weft: error: {manifest_path}: signature: does not verify") and err.count("\n") == 1


def test_manifest_edit_of_a_v1_file_says_how_to_migrate(fed_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys, path = fed_dir / "keys", fed_dir / "manifest.json"
    coordinator = load_public_key(keys / "coordinator.pub").hex()
    path.write_text(f'{{"format": "weft-manifest/v1", "federation_id": "f", "coordinator": {{"public_key": '
                    f'"{coordinator}"}}, "members": []}}')  # fmt: skip
    code, _, err = _weft(capsys, *_add(path, keys))
    assert code == 2
    assert err == (
        f"weft: error: {path}: format 'weft-manifest/v1' is no longer supported (v1 manifests were never signed); "
        "re-create it with `weft manifest init` and `weft manifest add` (docs/PROTOCOL.md, section 7)\n"
    )


def test_manifest_show_pins_the_coordinator_key(manifest_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = manifest_path.parent / "keys"
    code, out, _ = _weft(capsys, "manifest", "show", str(manifest_path))
    assert code == 0 and "signature verified under its own coordinator key" in out
    code, out, err = _weft(capsys, "manifest", "show", str(manifest_path), "--coordinator-key", str(keys / "b.pub"))
    assert (code, out) == (2, "")
    assert "not by the trusted coordinator key" in err and err.count("\n") == 1
