"""federation/cli.py: keygen, verify-model and simulate's start-up checks (no simulation is run)."""

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
KINDS = "tamper, unsigned, nonmember, replay, nan, shape, inflate"


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
