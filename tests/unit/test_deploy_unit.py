"""Unit tests of the deployment commands (federation/deploy*.py) and the two Flower launchers.

No Flower process is started here: the guards are exercised against Flower's real objects in
memory (the SuperLink's FastAPI app through Starlette's TestClient; the SuperNode's pull step with
stand-in Fleet calls). tests/integration/test_federation.py runs the real processes.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from coordinator import flower_launch as coord_launch
from federation import deploy
from federation.deploy_certs import check_flower_private_key, check_server_cert, write_dev_certs, write_flower_auth_key
from federation.deploy_coordinator import CoordinatorStart, check_coordinator, status_lines
from federation.deploy_flwr import parse_run_config, run_config_text
from federation.deploy_node import NodeStart, approve, check_node, node_config_values, parse_superlink
from federation.errors import ConfigError
from node import flower_launch as node_launch

ROOT = Path(__file__).resolve().parents[2]
HASH = hashlib.sha256(b"an app").hexdigest()


# ---- settings <-> command lines, and docker-compose.yml ------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="weft")
    deploy.register(parser.add_subparsers(required=True))
    return parser.parse_args(argv[1:])


def _node(tmp: Path, **extra: Any) -> NodeStart:
    return NodeStart(
        superlink="127.0.0.1:9091", root_cert=tmp / "ca.crt", flower_key=tmp / "n.flower.key", key=tmp / "n.key",
        coordinator_key=tmp / "c.pub", federation_id="fed", data_dir=tmp / "data", workdir=tmp / "work",
        jurisdiction="DE", **extra,
    )  # fmt: skip


def test_the_start_commands_give_back_their_settings(tmp_path: Path) -> None:
    coordinator = CoordinatorStart(
        manifest=tmp_path / "m.json", coordinator_key=tmp_path / "c.key", state_dir=tmp_path / "s",
        certs=tmp_path / "certs", port=19091, run_config=("rounds=3", "task=synthetic"), run_timeout_s=30.0,
    )  # fmt: skip
    node = _node(tmp_path, task="synthetic", approve=(HASH, HASH[::-1]), runtime_port=9100, max_restarts=0)
    assert (
        deploy.settings_from_args(CoordinatorStart, _parse(deploy.coordinator_start_argv(coordinator))) == coordinator
    )
    assert deploy.settings_from_args(NodeStart, _parse(deploy.node_start_argv(node))) == node


def test_docker_compose_runs_exactly_the_commands_the_test_uses() -> None:
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    expected = deploy.compose_commands()
    assert sorted(services) == sorted(expected)
    for name, command in expected.items():
        assert services[name]["entrypoint"] == ["weft"], name
        assert services[name]["command"] == command, f"docker-compose.yml's {name} drifted from compose_commands()"
        _parse(["weft", *command])  # and the commands parse


def test_each_compose_partner_has_its_own_keys_data_and_jurisdiction() -> None:
    commands = deploy.compose_commands()
    partners = [c for name, c in commands.items() if name.startswith("partner-")]
    flags = [dict(zip(c[2::2], c[3::2], strict=False)) for c in partners]
    assert len({f["--flower-key"] for f in flags}) == len({f["--key"] for f in flags}) == len(partners) == 3
    assert {f["--jurisdiction"] for f in flags} == {"DE", "FR", "NL"}


# ---- the run config -----------------------------------------------------------------------------------------


def test_run_config_values_are_toml_and_bare_words_become_strings() -> None:
    values = parse_run_config(["rounds=3", "task=synthetic", 'optimizer="adam"', "personalize=true", "quorum=0.5"])
    assert values == {"rounds": "3", "task": '"synthetic"', "optimizer": '"adam"', "personalize": "true",
                      "quorum": "0.5"}  # fmt: skip
    assert run_config_text(values).split()[0] == "optimizer=" + '"adam"'


@pytest.mark.parametrize(
    ("item", "problem"),
    [("rounds", "KEY=VALUE"), ("colour=red", "unknown key"), ("manifest=/x", "set by weft"), ("out-dir=/x", "set by")],
)
def test_bad_run_config_items_name_the_key(item: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_run_config([item])


def test_a_repeated_run_config_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="given twice"):
        parse_run_config(["rounds=1", "rounds=2"])


# ---- certificates and keys --------------------------------------------------------------------------------------


def test_dev_certs_name_loopback_and_the_hosts_and_keep_keys_private(tmp_path: Path) -> None:
    files = write_dev_certs(tmp_path / "certs", ["coordinator.example", "10.0.0.7"])
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "coordinator.example"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.0.0.7"}
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.issuer == ca.subject
    for key in (files.key, tmp_path / "certs" / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    check_server_cert(files.cert)
    with pytest.raises(FileExistsError):
        write_dev_certs(tmp_path / "certs", [])


def test_a_server_cert_without_loopback_is_refused(tmp_path: Path) -> None:
    ca = write_dev_certs(tmp_path / "certs", []).ca  # a CA certificate names no 127.0.0.1
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1"):
        check_server_cert(ca)


def test_flower_auth_keys_are_openssh_ec(tmp_path: Path) -> None:
    private, public = write_flower_auth_key(tmp_path, "node-1")
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    check_flower_private_key(private)
    (tmp_path / "pem.key").write_bytes((ROOT / "pyproject.toml").read_bytes())
    with pytest.raises(ConfigError, match="flower-key"):
        check_flower_private_key(tmp_path / "pem.key")


# ---- user mistakes: one line naming the flag, exit code 2 ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ok"), [("host:9091", True), ("[::1]:9091", True), ("host", False), ("host:0", False), ("h:99999", False)]
)
def test_superlink_address(text: str, ok: bool) -> None:
    if ok:
        assert parse_superlink(text)[1] == 9091
    else:
        with pytest.raises(ConfigError, match="superlink"):
            parse_superlink(text)


def test_node_start_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"root-cert: .*ca.crt does not exist"):
        check_node(_node(tmp_path))


def _node_files(tmp_path: Path) -> NodeStart:
    for name in ("ca.crt", "n.key", "c.pub"):
        (tmp_path / name).write_text("x")
    write_flower_auth_key(tmp_path, "n")
    (tmp_path / "data").mkdir()
    return _node(tmp_path)


def test_node_config_comes_from_node_settings(tmp_path: Path) -> None:
    settings = check_node(_node_files(tmp_path))
    assert settings.data_dir == (tmp_path / "data").resolve() and settings.federation_id == "fed"
    assert "runtime-port" not in node_config_values(_node(tmp_path))


def test_node_start_refuses_a_bad_jurisdiction_and_both_allowlist_flags(tmp_path: Path) -> None:
    from dataclasses import replace

    s = _node_files(tmp_path)
    with pytest.raises(ConfigError, match="jurisdiction"):
        check_node(replace(s, jurisdiction="Germany"))
    with pytest.raises(ConfigError, match="not both"):
        check_node(replace(s, approved_apps=tmp_path / "ca.crt", approve=(HASH,)))


def test_cli_mistakes_end_with_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = deploy.main(["node", "start", *deploy.node_start_argv(_node(tmp_path))[3:]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("weft: error: root-cert:"), err
    with pytest.raises(SystemExit) as exc:  # argparse: a port that is not a number
        deploy.main(["coordinator", "start", "--manifest", "m", "--coordinator-key", "k", "--state-dir", "s",
                     "--certs", "c", "--port", "http"])  # fmt: skip
    assert exc.value.code == 2


def test_coordinator_start_checks_host_and_files(tmp_path: Path) -> None:
    base = CoordinatorStart(tmp_path / "m.json", tmp_path / "c.key", tmp_path / "s", tmp_path / "certs")
    from dataclasses import replace

    with pytest.raises(ConfigError, match="host"):
        check_coordinator(replace(base, host="10.0.0.1"))
    with pytest.raises(ConfigError, match="port"):
        check_coordinator(replace(base, port=70000))
    with pytest.raises(ConfigError, match="coordinator-key"):
        check_coordinator(base)


# ---- the allowlist ---------------------------------------------------------------------------------------------


def test_approve_adds_a_hash_once_and_the_launcher_reads_it(tmp_path: Path) -> None:
    allowlist = tmp_path / "approved-apps.toml"
    assert node_launch.read_approved(allowlist) == frozenset()
    assert approve(HASH.upper(), allowlist) is True
    assert approve(HASH, allowlist) is False
    assert node_launch.read_approved(allowlist) == {HASH}
    with pytest.raises(ConfigError, match="app hash"):
        approve("abc", allowlist)


def test_a_malformed_allowlist_approves_nothing(tmp_path: Path) -> None:
    allowlist = tmp_path / "approved-apps.toml"
    allowlist.write_text('[[app]]\nsha256 = "not-a-hash"\n')
    with pytest.raises(ValueError, match=r"app\[0\].sha256"):
        node_launch.read_approved(allowlist)
    assert node_launch.approved_now(allowlist) == frozenset()


# ---- the SuperNode guard ----------------------------------------------------------------------------------------


class _Fab:
    def __init__(self, content: bytes) -> None:
        self.content = content


def _pull(approved: Path, fab_hash: str, content: bytes, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run the guarded pull step against stand-ins for Flower's Fleet calls; what happened."""
    import flwr.supernode.start_client_internal as sci
    from flwr.app import Message, Metadata, RecordDict

    seen: dict[str, Any] = {"downloaded": 0, "inserted": []}
    metadata = Metadata(run_id=42, message_id="m-1", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")  # fmt: skip
    message = Message(RecordDict(), metadata=metadata)  # type: ignore[call-overload]  # as a SuperNode receives it

    def original(**kw: Any) -> int:  # Flower's order: receive, get_run, then get_fab, then store
        msg, _tree = kw["receive"]()
        kw["get_fab"](fab_hash, msg.metadata.run_id)
        seen["stored"] = True
        return int(msg.metadata.run_id)

    def get_fab(h: str, run_id: int) -> _Fab:
        seen["downloaded"] += 1
        return _Fab(content)

    monkeypatch.setattr(sci, "_insert_message", lambda reply, state, store: seen["inserted"].append(reply))
    guarded = node_launch.make_guarded_pull(original, approved)
    seen["result"] = guarded(state=None, object_store=None, node_config={}, receive=lambda: (message, None),
                             get_run=None, get_fab=get_fab, pull_object=None, confirm_message_received=None,
                             trusted_entities=None)  # fmt: skip
    return seen


def test_an_unapproved_app_is_refused_before_its_fab_is_downloaded(tmp_path: Path, monkeypatch: Any) -> None:
    seen = _pull(tmp_path / "none.toml", HASH, b"an app", monkeypatch)
    assert seen["downloaded"] == 0 and "stored" not in seen and seen["result"] == 42
    (reply,) = seen["inserted"]
    assert reply.has_error() and reply.error.code == 7  # Flower's INVALID_FAB


def test_an_approved_app_is_downloaded_and_its_bytes_checked(tmp_path: Path, monkeypatch: Any) -> None:
    allowlist = tmp_path / "approved-apps.toml"
    approve(HASH, allowlist)
    seen = _pull(allowlist, HASH, b"an app", monkeypatch)
    assert seen["downloaded"] == 1 and seen["stored"] and not seen["inserted"]
    tampered = _pull(allowlist, HASH, b"another app", monkeypatch)
    assert "stored" not in tampered and len(tampered["inserted"]) == 1


def test_the_guard_fits_the_installed_flower() -> None:
    import flwr.supernode.start_client_internal as sci

    node_launch.check_flwr_version()
    node_launch.check_signature(sci._pull_and_store_message, node_launch.PULL_PARAMS, "pull")
    with pytest.raises(node_launch.LaunchError, match="changed"):
        node_launch.check_signature(lambda state, receive: None, node_launch.PULL_PARAMS, "pull")


def test_the_launchers_refuse_an_untested_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr

    monkeypatch.setattr(flwr, "__version__", "9.9.9", raising=False)
    with pytest.raises(node_launch.LaunchError, match=r"9\.9\.9"):
        node_launch.check_flwr_version()
    with pytest.raises(coord_launch.LaunchError, match=r"9\.9\.9"):
        coord_launch.check_flwr()


@pytest.mark.parametrize("flag", ["--insecure", "--allow-runtime-dependency-installation", "--isolation=process"])
def test_the_node_launcher_refuses_unsafe_flags(tmp_path: Path, flag: str) -> None:
    with pytest.raises(node_launch.LaunchError, match="refusing"):
        node_launch.run_supernode(tmp_path / "a.toml", ["--superlink", "x:1", flag])


def test_the_node_launcher_parses_its_own_flags_only(tmp_path: Path) -> None:
    path, rest = node_launch.parse_supernode_args(["--approved-apps", "a.toml", "--", "--runtime-api-address", "x"])
    assert path.name == "a.toml" and rest == ["--runtime-api-address", "x"]
    with pytest.raises(node_launch.LaunchError):
        node_launch.parse_supernode_args(["--superlink", "x:1"])


# ---- the SuperLink guard ------------------------------------------------------------------------------------------


def test_control_and_runtime_apis_answer_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.superlink.main as slmain
    from starlette.testclient import TestClient

    monkeypatch.setattr(slmain, "_get_middleware", slmain._get_middleware)  # restored after the test
    coord_launch.install_guard()
    app = slmain.create_app()
    remote, local = TestClient(app, client=("10.1.2.3", 5555)), TestClient(app, client=("127.0.0.1", 5555))
    for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/get-run"):
        assert remote.post(path).status_code == 403, path
        assert local.post(path).status_code != 403, path
    assert remote.get("/docs").status_code == 403 and local.get("/docs").status_code == 200
    assert remote.get("/health").status_code == 200
    assert remote.post("/v1/fleet/pull-messages").status_code != 403  # Fleet: node authentication decides


@pytest.mark.parametrize(("host", "local"), [("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
                                             ("10.0.0.1", False), ("testclient", False), ("", False)])  # fmt: skip
def test_loopback_addresses(host: str, local: bool) -> None:
    assert coord_launch.is_loopback(host) is local
    if local and host:
        assert ipaddress.ip_address(host)


# ---- status ------------------------------------------------------------------------------------------------------


def test_status_reads_the_record(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    manifest = tmp_path / "m.json"
    members = [
        {"member_id": "aa11", "name": "partner-a", "status": "active"},
        {"member_id": "bb22", "name": "partner-b", "status": "suspended"},
    ]
    manifest.write_text(json.dumps({"members": members}))
    (tmp_path / "state.json").write_text(json.dumps({"run_id": 7, "status": "finished:completed", "app_hash": HASH,
                                                     "manifest": str(manifest), "out_dir": str(run)}))  # fmt: skip
    rounds = [{"round": r, "accuracy": 0.5 + r / 10, "contributions": [
        {"member": "aa11", "num_examples": 96, "update_digest": f"{r}" * 64}]} for r in (1, 2)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    (run / "summary.json").write_text(json.dumps({"status": "completed", "rounds": 2}))
    text = "\n".join(status_lines(tmp_path))
    assert "run 7: finished:completed" in text and "round reached: 2 of 2, accuracy 0.7000" in text, text
    assert "partner-a (active, aa11): round 2, 96 examples" in text and "partner-b (suspended, bb22): none" in text
    with pytest.raises(ConfigError, match="state-dir"):
        status_lines(tmp_path / "nothing")


# ---- a node checks the published manifest before it starts -------------------------------------------------------


def _membership(tmp: Path, signer_seed: int = 1, status: str | None = None, jurisdiction: str = "DE") -> NodeStart:
    """A node (key seed 2) whose manifest (federation 'fed') is signed by the key of `signer_seed`."""
    from protocols import Manifest, Member, SigningKey, save_public_key, save_signing_key

    coordinator, node = SigningKey.from_seed(bytes([1]) * 32), SigningKey.from_seed(bytes([2]) * 32)
    signer = SigningKey.from_seed(bytes([signer_seed]) * 32)
    save_public_key(coordinator.public_key, tmp / "c.pub")
    save_signing_key(node, tmp / "n.key")
    manifest = Manifest("fed", signer.public_key, (Member("partner-a", node.public_key, jurisdiction, 100),))
    if status is not None:
        manifest = manifest.with_status("partner-a", status)
    manifest.save(tmp / "manifest.json", signer)
    return _node(tmp, manifest=tmp / "manifest.json")


def test_membership_accepts_the_coordinators_manifest_listing_this_node(tmp_path: Path) -> None:
    from federation.deploy_node import check_membership

    check_membership(_membership(tmp_path))  # no error


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"signer_seed": 9}, "manifest: "),
        ({"status": "suspended"}, "manifest: member 'partner-a' is suspended in version 2"),
        ({"jurisdiction": "FR"}, "jurisdiction: the manifest records 'partner-a' in FR, this node says DE"),
    ],
    ids=["other-signer", "suspended", "jurisdiction"],
)
def test_membership_refuses_a_manifest_the_node_cannot_trust(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    from federation.deploy_node import check_membership

    node = _membership(tmp_path, **changes)
    with pytest.raises(ConfigError) as exc_info:
        check_membership(node)
    assert str(exc_info.value).startswith(message), str(exc_info.value)


def test_membership_refuses_a_manifest_of_another_federation(tmp_path: Path) -> None:
    from dataclasses import replace

    from federation.deploy_node import check_membership

    node = replace(_membership(tmp_path), federation_id="other-fed")
    with pytest.raises(ConfigError, match="manifest: it is for federation 'fed', not 'other-fed'"):
        check_membership(node)
