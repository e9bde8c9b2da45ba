"""A real federation on loopback: `weft coordinator start` and `weft node start` as separate processes,
with TLS, SuperNode authentication, approved apps only and supervised SuperNodes.

The commands are the ones an operator and the partners type (docs/DEPLOY.md), built by
`federation.deploy.coordinator_start_argv` / `node_start_argv`, the same functions docker-compose.yml
is checked against (tests/unit/test_deploy_unit.py):

* keys with `weft keys new`, a signed manifest of four members (partners a-d, each with its Flower
  auth key) with `weft manifest init/add`, development certificates with `weft coordinator dev-certs`;
* partners a, b and c approve the app hash and start BEFORE the coordinator: each must wait for the
  SuperLink and connect once it is up and their key is registered;
* a rogue node whose Flower key no member holds starts too: Flower refuses it (HTTP 412);
* `weft coordinator start` runs 3 signed rounds of the synthetic task, each partner reading its own
  data-dir of CSV files;
* once round 1 is under way, partner d starts with an allowlist that lacks the app's hash: it refuses
  every run before anything is downloaded, so its FLWR_HOME has no `apps/` folder;
* the first partner to deliver its round-1 update has its SuperNode process terminated (SIGTERM, so
  Flower closes its session): the supervisor restarts it and it contributes again in a later round.
  (After a SIGKILL the SuperLink refuses to re-activate the node until its old session misses two
  30 s heartbeats; the supervisor keeps retrying and the node rejoins within about a minute, measured
  at 53 s, which is too slow for this test.)

Then the signed global model verifies offline, summary.json holds its accuracy, and
`weft coordinator status` shows the rounds and each member's last contribution. Every process is
started in its own session and stopped, with everything it spawned, in the fixture's teardown.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from federation.apps import write_app
from federation.deploy import CoordinatorStart, NodeStart, coordinator_start_argv, node_start_argv
from federation.deploy_flwr import app_hash
from federation.deploy_proc import Child, children_of, flower_env, start_child
from federation.tasks import synthetic as synthetic_task
from federation.tasks.files import write_labeled_csv

pytestmark = [pytest.mark.integration, pytest.mark.skipif(sys.platform != "linux", reason="uses /proc")]

BIN = Path(sys.executable).parent
FEDERATION_ID = "weft-federation-test"
PARTNERS = ("partner-a", "partner-b", "partner-c")  # approve the app, start before the coordinator
REFUSER = "partner-d"  # a member whose allowlist lacks the app: it must refuse every run
ROGUE = "rogue"  # a Flower key no member holds: the SuperLink must refuse it
ROUNDS = 3
RUN_CONFIG = (f"rounds={ROUNDS}", "task=synthetic", "local-epochs=1", "quorum=0.5", "round-timeout-s=60",
              "federated-evaluation=false")  # fmt: skip

WAIT_S = 60.0  # nodes trying to connect; a log line to appear
RUN_TIMEOUT_S = 300.0  # the whole `weft coordinator start`
POLL_S = 0.2


# ---- helpers ---------------------------------------------------------------------------------------------


def weft_prefix() -> list[str]:
    """`weft` once federation/cli.py registers the deploy commands; until then the same commands via the module."""
    probe = subprocess.run([str(BIN / "weft"), "coordinator", "--help"], capture_output=True, timeout=60, check=False)
    return [str(BIN / "weft")] if probe.returncode == 0 else [sys.executable, "-m", "federation.deploy"]


def weft_inproc(*args: str) -> str:
    """`weft ARGS` in this process (a fresh process would spend seconds importing), its output; must succeed."""
    from federation.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(args))
    assert code == 0, f"weft {' '.join(args)} (exit {code}):\n{out.getvalue()}"
    return out.getvalue()


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@dataclass
class Proc:
    """A `weft` process of the test, its log, and every process it was seen to spawn."""

    name: str
    child: Child
    log: Path
    pids: set[int] = field(default_factory=set)

    def text(self) -> str:
        return read(self.log)

    def remember(self) -> None:
        self.pids.update(children_of(self.child.pid))
        self.child.spawned.update(self.pids)


def launch(name: str, argv: list[str], base: Path) -> Proc:
    log = base / f"{name}.log"
    with log.open("wb") as out:
        child = start_child(name, argv, flower_env(base / "flwr-home-weft"), base, out)
    return Proc(name, child, log)


def wait_until(what: str, check: Any, procs: list[Proc], timeout_s: float = WAIT_S) -> Any:
    """Poll `check()` until it returns something truthy (bounded); note every process's children meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            p.remember()
        if result := check():
            return result
        time.sleep(POLL_S)
    logs = "\n".join(f"== {p.name} ==\n{p.text()[-3000:]}" for p in procs)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{logs}")


@dataclass(frozen=True)
class Partner:
    name: str
    workdir: Path
    data_dir: Path

    @property
    def apps_dir(self) -> Path:
        return self.workdir / "flwr-home" / "apps"


@dataclass
class Federation:
    base: Path
    keys: Path
    state: Path
    coordinator_exit: int | None
    coordinator_wall_s: float
    procs: dict[str, Proc]
    partners: dict[str, Partner]
    killed: str = ""
    killed_after_round: int = 0
    member_ids: dict[str, str] = field(default_factory=dict)

    def log(self, name: str) -> str:
        return self.procs[name].text()

    def logs(self) -> str:
        return "\n".join(f"== {name} ==\n{p.text()[-4000:]}" for name, p in self.procs.items())

    def rounds(self) -> list[dict[str, Any]]:
        path = self.state / "run" / "metrics.jsonl"
        return [json.loads(line) for line in read(path).splitlines() if line.strip()]


def node_settings(name: str, base: Path, link_port: int, runtime_port: int, **extra: Any) -> tuple[NodeStart, Partner]:
    keys = base / "keys"
    partner = Partner(name, base / f"{name}-work", base / f"{name}-data")
    settings = NodeStart(
        superlink=f"127.0.0.1:{link_port}",
        root_cert=base / "certs" / "ca.crt",
        flower_key=keys / f"{name}.flower.key",
        key=keys / f"{name}.key",
        coordinator_key=keys / "coordinator.pub",
        federation_id=FEDERATION_ID,
        data_dir=partner.data_dir,
        workdir=partner.workdir,
        jurisdiction="DE",
        task="synthetic",
        runtime_port=runtime_port,
        device="cpu",
        max_backoff_s=4.0,
        **extra,
    )
    return settings, partner


def sent_rounds(log: str) -> list[int]:
    """Rounds for which a node logged `round N: sent update` (node/app.py, logger weft.node)."""
    return [int(n) for n in re.findall(r"round (\d+): sent update", log)]


def delivered_round(log: str) -> int:
    """The first round whose update the SuperNode has pushed ("Sent successfully" after "sent update"), or 0."""
    match = re.search(r"round (\d+): sent update.*?Sent successfully", log, re.S)
    return int(match.group(1)) if match else 0


# ---- the federation -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    t0 = time.monotonic()
    base = tmp_path_factory.mktemp("federation")
    keys, state = base / "keys", base / "coordinator"
    weft = weft_prefix()
    procs: dict[str, Proc] = {}
    try:
        # ---- keys, signed manifest, development certificates (operator and partners, beforehand) --------
        weft_inproc("keys", "new", "--kind", "coordinator", "--out", str(keys), "--name", "coordinator")
        manifest = base / "manifest.json"
        weft_inproc("manifest", "init", str(manifest), "--federation-id", FEDERATION_ID,
                    "--coordinator-key-file", str(keys / "coordinator.key"))  # fmt: skip
        member_ids = {}
        for name in (*PARTNERS, REFUSER, ROGUE):
            out = weft_inproc("keys", "new", "--kind", "node", "--out", str(keys), "--name", name)
            member_ids[name] = re.search(r"member id (\w+)", out).group(1)  # type: ignore[union-attr]
            if name != ROGUE:
                weft_inproc("manifest", "add", str(manifest), "--coordinator-key-file", str(keys / "coordinator.key"),
                            "--name", name, "--key", str(keys / f"{name}.pub"), "--jurisdiction", "DE",
                            "--max-examples", "2000",
                            "--flower-auth-key", str(keys / f"{name}.flower.pub"))  # fmt: skip
        dev_certs = subprocess.run([*weft, "coordinator", "dev-certs", "--out", str(base / "certs"),
                                    "--host", "coordinator.example"], capture_output=True, text=True, timeout=60,
                                   check=False)  # fmt: skip
        assert dev_certs.returncode == 0, dev_certs.stderr

        # ---- each partner's own data, and the app hash partners approve --------------------------------
        pool = synthetic_task.load_data(0).train
        shards = np.array_split(np.random.default_rng(7).permutation(len(pool)), len(PARTNERS) + 1)
        for name, shard in zip((*PARTNERS, REFUSER), shards, strict=True):
            write_labeled_csv(base / f"{name}-data" / "rows.csv", pool.subset(shard))
        (base / f"{ROGUE}-data").mkdir()
        write_app(base / "app-for-hash")
        expected_hash = app_hash(base / "app-for-hash")

        link_port, *node_ports = free_ports(6)
        partners: dict[str, Partner] = {}

        # ---- partners a-c (approving the app) and the rogue start BEFORE the SuperLink --------------------
        for i, name in enumerate(PARTNERS):
            settings, partners[name] = node_settings(  # each partner also checks the published manifest
                name, base, link_port, node_ports[i], approve=(expected_hash,), manifest=manifest
            )
            procs[name] = launch(name, [*weft, *node_start_argv(settings)[1:]], base)
        rogue, partners[ROGUE] = node_settings(ROGUE, base, link_port, node_ports[3], max_restarts=0)
        procs[ROGUE] = launch(ROGUE, [*weft, *node_start_argv(rogue)[1:]], base)
        nodes = [procs[n] for n in (*PARTNERS, ROGUE)]
        wait_until("every SuperNode to try the SuperLink that is not there yet",
                   lambda: all("Connection attempt failed" in p.text() for p in nodes), nodes)  # fmt: skip

        # ---- the coordinator: SuperLink, registrations, the run ----------------------------------------------
        coordinator = CoordinatorStart(
            manifest=manifest, coordinator_key=keys / "coordinator.key", state_dir=state, certs=base / "certs",
            port=link_port, run_config=RUN_CONFIG, run_timeout_s=RUN_TIMEOUT_S,
        )  # fmt: skip
        started = time.monotonic()
        procs["coordinator"] = launch("coordinator", [*weft, *coordinator_start_argv(coordinator)[1:]], base)
        fed = Federation(base, keys, state, None, 0.0, procs, partners, member_ids=member_ids)
        _drive(fed, weft, link_port, node_ports[4])
        fed.coordinator_wall_s = time.monotonic() - started
        fed.coordinator_exit = procs["coordinator"].child.poll()
        print(f"\nfederation: set-up {started - t0:.1f} s, coordinator start {fed.coordinator_wall_s:.1f} s",
              file=sys.stderr)  # fmt: skip
        yield fed
    finally:
        t_stop = time.monotonic()
        for p in reversed(list(procs.values())):  # the latest first; the coordinator before the nodes
            p.remember()
        for p in reversed(list(procs.values())):
            p.child.stop()
        print(f"federation: stopped in {time.monotonic() - t_stop:.1f} s", file=sys.stderr)


def _drive(fed: Federation, weft: list[str], link_port: int, refuser_port: int) -> None:
    """While the run goes on: start the refusing partner once round 1 is under way, terminate a SuperNode
    after it delivered an update before the last round, and wait (bounded) for `weft coordinator start`."""
    coordinator = fed.procs["coordinator"]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while coordinator.child.poll() is None and time.monotonic() < deadline:
        for p in fed.procs.values():
            p.remember()
        logs = {name: fed.log(name) for name in PARTNERS}
        if REFUSER not in fed.procs and any(sent_rounds(text) for text in logs.values()):
            allowlist = fed.base / "other-approved-apps.toml"
            allowlist.write_text(f'[[app]]\nsha256 = "{hashlib.sha256(b"some other app").hexdigest()}"\n')
            settings, fed.partners[REFUSER] = node_settings(REFUSER, fed.base, link_port, refuser_port,
                                                            approved_apps=allowlist)  # fmt: skip
            fed.procs[REFUSER] = launch(REFUSER, [*weft, *node_start_argv(settings)[1:]], fed.base)
        if not fed.killed:
            done = {name: delivered_round(text) for name, text in logs.items()}
            victim = next((name for name, rnd in done.items() if 0 < rnd < ROUNDS), "")
            if victim:
                pid = int((fed.partners[victim].workdir / "supernode.pid").read_text())
                os.kill(pid, signal.SIGTERM)  # the SuperNode, not its supervisor
                fed.killed, fed.killed_after_round = victim, done[victim]
        time.sleep(POLL_S)


# ---- checks ---------------------------------------------------------------------------------------------------


def test_the_run_completed(federation: Federation) -> None:
    f = federation
    assert f.coordinator_exit == 0, f.logs()
    assert "finished:completed" in f.log("coordinator"), f.logs()
    state = json.loads((f.state / "state.json").read_text())
    assert state["status"] == "finished:completed", state
    summary = json.loads((f.state / "run" / "summary.json").read_text())
    assert (summary["status"], summary["rounds"], summary["federation_id"]) == ("completed", ROUNDS, FEDERATION_ID)
    assert summary["final_accuracy"] >= 0.8, summary  # the synthetic task's held-out split


def test_the_signed_global_model_verifies(federation: Federation) -> None:
    f = federation
    out = weft_inproc("verify-model", str(f.state / "run" / "global_model.npz"),
                      "--coordinator-key", str(f.keys / "coordinator.pub"))  # fmt: skip
    assert f"federation {FEDERATION_ID}" in out and f"round {ROUNDS}" in out, out


def test_every_approving_partner_trained_and_logged_it(federation: Federation) -> None:
    f = federation
    contributed = {c["member"] for r in f.rounds() for c in r.get("contributions", [])}
    assert contributed == {f.member_ids[n] for n in PARTNERS}, f.rounds()
    for name in PARTNERS:
        assert sent_rounds(f.log(name)), f"{name} logged no `round N: sent update` line:\n{f.log(name)[-3000:]}"


def test_nodes_started_before_the_superlink_waited_and_connected(federation: Federation) -> None:
    f = federation
    for name in PARTNERS:
        log = f.log(name)
        first_try, connected = log.find("Connection attempt failed"), log.find("SuperNode ID:")
        assert 0 <= first_try < connected, f"{name}:\n{log[-3000:]}"


def test_the_superlink_serves_tls_and_authenticates_nodes(federation: Federation) -> None:
    link_log = read(federation.state / "superlink.log")
    assert re.search(r"Uvicorn running on https://127\.0\.0\.1:\d+", link_log), link_log[-3000:]
    assert "No SuperNode found with the given public key" in link_log, link_log[-3000:]  # the rogue's key
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in link_log


def test_a_node_whose_key_is_not_registered_is_refused(federation: Federation) -> None:
    f = federation
    log = f.log(ROGUE)
    assert "[code: 2004] Failed to activate SuperNode" in log, log[-3000:]
    assert "SuperNode ID:" not in log and not sent_rounds(log), log[-3000:]
    assert f.procs[ROGUE].child.poll() == 1, log[-3000:]  # --max-restarts 0: the supervisor gave up


def test_an_unapproved_app_never_runs_at_a_partner(federation: Federation) -> None:
    f = federation
    assert REFUSER in f.procs, f"{REFUSER} was never started\n{f.logs()}"
    log = f.log(REFUSER)
    assert re.search(r"refused run \d+: app hash [0-9a-f]{64} is not approved", log), log[-3000:]
    assert not f.partners[REFUSER].apps_dir.exists() or not any(f.partners[REFUSER].apps_dir.iterdir())
    assert not sent_rounds(log)
    rejected = [r for rnd in f.rounds() for r in rnd.get("rejections", [])]
    assert any("app not approved" in r["detail"] for r in rejected), rejected


def test_a_killed_node_is_restarted_and_contributes_again(federation: Federation) -> None:
    f = federation
    assert f.killed, f"no SuperNode delivered a round-1 or -2 update in time\n{f.logs()}"
    log = f.log(f.killed)
    assert re.search(r"supernode exited with status -?\d+; restart 1", log), log[-3000:]
    later = [
        r["round"]
        for r in f.rounds()
        if r.get("round", 0) > f.killed_after_round
        and f.member_ids[f.killed] in {c["member"] for c in r.get("contributions", [])}
    ]
    assert later, f"{f.killed} (killed after round {f.killed_after_round}) never contributed again: {f.rounds()}"


def test_status_shows_the_rounds_and_each_members_last_contribution(federation: Federation) -> None:
    f = federation
    proc = subprocess.run([*weft_prefix(), "coordinator", "status", "--state-dir", str(f.state)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "finished:completed" in proc.stdout and f"round reached: {ROUNDS} of {ROUNDS}" in proc.stdout, proc.stdout
    for name in PARTNERS:
        assert re.search(rf"{name} \(active, \w+\): round \d+", proc.stdout), proc.stdout
    assert re.search(rf"{REFUSER} \(active, \w+\): none", proc.stdout), proc.stdout
