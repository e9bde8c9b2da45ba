"""A deployed coordinator whose SuperLink is killed mid-run resumes and ends with the uninterrupted run's model.

Two deployments on loopback, with the commands of docs/DEPLOY.md (`weft node start`, `weft coordinator start`:
TLS, SuperNode authentication, approved apps only, supervised SuperNodes), the same keys, manifest, partner
data and seeds, each with a fresh coordinator state folder and fresh node workdirs:

* the reference: an uninterrupted run of ROUNDS rounds;
* the crash: once STATE/run/ledger.jsonl commits round KILL_AFTER and the next round has stored its first
  verified update (so that round is in flight, with updates on disk but not committed; after at most
  MID_ROUND_WAIT_S), the SuperLink's process group and every process it spawned (flower-superexec, the
  ServerApp running weft's round loop) are SIGKILLed; the
  `weft coordinator start` that supervised them exits non-zero by itself. Then `weft coordinator start
  --resume` restarts the SuperLink on the same port and STATE/superlink.db and continues the run. The
  partners' SuperNodes are never touched: Flower's own retries (capped at 20 s apart) reconnect them.

The resumed run must complete with the reference's model arrays byte for byte (the run ids differ, so the
signed files differ), metrics.jsonl must hold rounds 1..ROUNDS once each, the ledger a `resume` record, and
`weft audit verify` must pass, recomputing every aggregate. quorum=1.0, so every round aggregates every
partner's update: the model depends only on the signed round models and the seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_federation import (
    FEDERATION_ID,
    POLL_S,
    Proc,
    free_ports,
    launch,
    node_settings,
    read,
    wait_until,
    weft_inproc,
    weft_prefix,
)

from federation.apps import write_app
from federation.deploy import CoordinatorStart, coordinator_start_argv, node_start_argv, register, settings_from_args
from federation.deploy_certs import write_dev_certs
from federation.deploy_coordinator import check_coordinator
from federation.deploy_flwr import app_hash
from federation.deploy_proc import children_of
from federation.errors import ConfigError
from federation.tasks import synthetic as synthetic_task
from federation.tasks.files import write_labeled_csv
from protocols import ProtocolError, load_public_key, read_signed_model
from protocols.ledger import LEDGER_FILE, read_ledger

pytestmark = [pytest.mark.integration, pytest.mark.skipif(sys.platform != "linux", reason="uses /proc")]

PARTNERS = ("partner-a", "partner-b", "partner-c")
ROUNDS = 4
KILL_AFTER = 2
RUN_CONFIG = (f"rounds={ROUNDS}", "task=synthetic", "local-epochs=1", "quorum=1.0", "round-timeout-s=120",
              "federated-evaluation=false", "seed=11")  # fmt: skip
RUN_TIMEOUT_S = 480.0  # one `weft coordinator start`: 110 s on a quiet 2-core VM, 240 s at a load average of 11
MID_ROUND_WAIT_S = 60.0  # after round KILL_AFTER committed, for the next round to store its first update
EXIT_TIMEOUT_S = 90.0  # the interrupted `weft coordinator start` noticing that its SuperLink is gone


@dataclass
class Material:
    """What both deployments share: keys, manifest, certificates, each partner's data, the app hash."""

    base: Path
    keys: Path
    manifest: Path
    app_hash: str
    member_ids: dict[str, str]


@dataclass
class Deployment:
    state: Path
    procs: dict[str, Proc]
    exits: list[int | None] = field(default_factory=list)
    """Exit status of each `weft coordinator start` (the interrupted one, then the resumed one)."""
    killed: list[str] = field(default_factory=list)
    """The command lines SIGKILLed at the crash: the SuperLink and everything it had spawned."""
    timings: dict[str, float] = field(default_factory=dict)
    marks: dict[str, int] = field(default_factory=dict)
    spooled_at_kill: int = -1
    """Updates of the interrupted round already verified and stored when the SuperLink was killed."""
    """Each partner's log length when the SuperLink was killed."""

    @property
    def run(self) -> Path:
        return self.state / "run"

    def logs(self) -> str:
        return "\n".join(f"== {name} ==\n{p.text()[-4000:]}" for name, p in self.procs.items())


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    base = tmp_path_factory.mktemp("resume")
    keys, manifest = base / "keys", base / "manifest.json"
    weft_inproc("keys", "new", "--kind", "coordinator", "--out", str(keys), "--name", "coordinator")
    weft_inproc("manifest", "init", str(manifest), "--federation-id", FEDERATION_ID,
                "--coordinator-key-file", str(keys / "coordinator.key"))  # fmt: skip
    member_ids = {}
    for name in PARTNERS:
        out = weft_inproc("keys", "new", "--kind", "node", "--out", str(keys), "--name", name)
        member_ids[name] = re.search(r"member id (\w+)", out).group(1)  # type: ignore[union-attr]
        weft_inproc("manifest", "add", str(manifest), "--coordinator-key-file", str(keys / "coordinator.key"),
                    "--name", name, "--key", str(keys / f"{name}.pub"), "--jurisdiction", "DE",
                    "--max-examples", "2000", "--flower-auth-key", str(keys / f"{name}.flower.pub"))  # fmt: skip
    write_dev_certs(base / "certs", ["coordinator.example"])  # what `weft coordinator dev-certs` writes
    pool = synthetic_task.load_data(0).train
    for name, shard in zip(PARTNERS, np.array_split(np.random.default_rng(7).permutation(len(pool)), 3), strict=True):
        write_labeled_csv(base / f"{name}-data" / "rows.csv", pool.subset(shard))
    write_app(base / "app-for-hash")
    return Material(base, keys, manifest, app_hash(base / "app-for-hash"), member_ids)


def _coordinator(m: Material, state: Path, port: int, resume: bool = False) -> CoordinatorStart:
    return CoordinatorStart(
        manifest=m.manifest, coordinator_key=m.keys / "coordinator.key", state_dir=state, certs=m.base / "certs",
        port=port, run_config=RUN_CONFIG, run_timeout_s=RUN_TIMEOUT_S, resume=resume,
    )  # fmt: skip


# ---- what `--resume` checks before it starts anything (fast; no process is started) ------------------------


def test_resume_is_a_switch_that_round_trips_through_the_command_line(material: Material) -> None:
    settings = _coordinator(material, material.base / "state-argv", 9091, resume=True)
    argv = coordinator_start_argv(settings)
    assert argv[-1] == "--resume" and argv.count("--resume") == 1, argv
    parser = argparse.ArgumentParser(prog="weft")
    register(parser.add_subparsers(required=True))
    assert settings_from_args(CoordinatorStart, parser.parse_args(argv[1:])) == settings
    assert "--resume" not in coordinator_start_argv(replace(settings, resume=False))


def test_resume_needs_a_ledger_and_a_new_run_refuses_one(material: Material) -> None:
    state = material.base / "state-checks"
    fresh = _coordinator(material, state, 9091)
    check_coordinator(fresh)  # nothing there yet: a new run may start
    with pytest.raises(ConfigError, match=r"^resume: .* holds no ledger\.jsonl; nothing to resume"):
        check_coordinator(replace(fresh, resume=True))
    (state / "run").mkdir(parents=True)
    (state / "run" / LEDGER_FILE).write_bytes(b"")  # only a ledger (a run killed before its first round)
    with pytest.raises(ConfigError, match=r"already holds a run's record; continue it with --resume"):
        check_coordinator(fresh)
    with pytest.raises(ConfigError, match="run-config: resume is set by weft coordinator start"):
        check_coordinator(replace(fresh, resume=True, run_config=(*RUN_CONFIG, "resume=true")))


def committed(run: Path) -> int:
    """The last round the ledger committed (0: none yet, or no ledger)."""
    path = run / LEDGER_FILE
    if not path.is_file():
        return 0
    try:
        entries = read_ledger(path).entries
    except ProtocolError:
        return 0
    return max((int(e.body["round"]) for e in entries if e.kind == "round"), default=0)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def kill_superlink(coordinator: Proc) -> list[str]:
    """SIGKILL the SuperLink that `coordinator` started: its process group and every process it spawned
    (flower-superexec and the ServerApp run in sessions of their own). Returns what was killed."""
    links = [pid for pid in children_of(coordinator.child.pid)
             if "superlink" in cmdline(pid) and any(a.endswith("flower_launch.py") for a in cmdline(pid))]  # fmt: skip
    assert len(links) == 1, f"expected one SuperLink under {coordinator.child.pid}, found {links}"
    tree = children_of(links[0])
    killed = [" ".join(cmdline(pid))[:200] for pid in [links[0], *tree]]
    os.killpg(links[0], signal.SIGKILL)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    coordinator.pids.update(tree)  # so the teardown looks at them again
    return killed


REJOINED = re.compile(r"Connection successful after|Ignoring reply message|Receiving: ")
"""A SuperNode's first contact with the restarted SuperLink: a retry that got through, a push of the interrupted
run's reply that the SuperLink refused (that run is stopped), or a message of the resumed run."""


def watch_rejoin(d: Deployment, link_port: int) -> None:
    """Note (bounded) when the restarted SuperLink listens and when each partner is first in touch with it."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    up, seen = 0.0, dict[str, float]()
    while len(seen) < len(PARTNERS) and d.procs["resumed"].child.poll() is None and time.monotonic() < deadline:
        now = time.monotonic()
        if not up:
            with socket.socket() as sock:
                sock.settimeout(1.0)
                up = now if sock.connect_ex(("127.0.0.1", link_port)) == 0 else 0.0
        for name in PARTNERS:
            if name not in seen and REJOINED.search(d.procs[name].text()[d.marks[name] :]):
                seen[name] = now
        time.sleep(POLL_S)
    if up:
        d.timings.update({f"{name}_rejoined_s": t - up for name, t in seen.items()})


def wait_exit(proc: Proc, procs: list[Proc], timeout_s: float) -> int | None:
    """`proc`'s exit status once it exits (bounded); None if it still ran at the deadline."""
    deadline = time.monotonic() + timeout_s
    while proc.child.poll() is None and time.monotonic() < deadline:
        for p in procs:
            p.remember()
        time.sleep(POLL_S)
    return proc.child.poll()


def deploy(m: Material, tag: str, crash: bool, ports: list[int]) -> Deployment:
    """One deployment: the partners' supervised SuperNodes, then `weft coordinator start` (and, with `crash`,
    the SuperLink killed after round KILL_AFTER and `weft coordinator start --resume`). Every process started
    here is stopped, with everything it spawned, before this returns."""
    weft = weft_prefix()
    link_port, *node_ports = ports
    d = Deployment(m.base / f"{tag}-coordinator", {})
    t0 = time.monotonic()
    try:
        for i, name in enumerate(PARTNERS):
            settings, _ = node_settings(name, m.base, link_port, node_ports[i], approve=(m.app_hash,))
            settings = replace(settings, workdir=m.base / f"{tag}-{name}-work")
            d.procs[name] = launch(f"{tag}-{name}", [*weft, *node_start_argv(settings)[1:]], m.base)
        argv = coordinator_start_argv(_coordinator(m, d.state, link_port))
        last = d.procs["coordinator"] = launch(f"{tag}-coordinator", [*weft, *argv[1:]], m.base)
        if crash:
            wait_until(f"the ledger to commit round {KILL_AFTER}", lambda: committed(d.run) >= KILL_AFTER,
                       list(d.procs.values()), RUN_TIMEOUT_S)  # fmt: skip
            # ... and, better, once the next round is under way: an update of it verified and stored
            spool = d.run / "rounds" / f"{KILL_AFTER + 1:04d}"
            deadline = time.monotonic() + MID_ROUND_WAIT_S
            while time.monotonic() < deadline and not any(spool.rglob("*.update")):
                time.sleep(POLL_S)
            d.timings["killed_at_s"] = time.monotonic() - t0
            d.spooled_at_kill = len(list(spool.rglob("*.update")))
            d.marks = {name: len(d.procs[name].text()) for name in PARTNERS}
            d.killed = kill_superlink(last)
            d.exits.append(wait_exit(last, list(d.procs.values()), EXIT_TIMEOUT_S))
            last.child.stop()  # a no-op once it exited by itself
            d.timings["interrupted_exit_s"] = time.monotonic() - t0 - d.timings["killed_at_s"]
            argv = coordinator_start_argv(_coordinator(m, d.state, link_port, resume=True))
            last = d.procs["resumed"] = launch(f"{tag}-coordinator-resumed", [*weft, *argv[1:]], m.base)
            d.timings["resumed_at_s"] = time.monotonic() - t0
            watch_rejoin(d, link_port)
        d.exits.append(wait_exit(last, list(d.procs.values()), RUN_TIMEOUT_S))
        d.timings["done_s"] = time.monotonic() - t0
        return d
    finally:
        t_stop = time.monotonic()
        for p in reversed(list(d.procs.values())):  # the coordinator first, then the nodes
            p.remember()
        for p in reversed(list(d.procs.values())):
            p.child.stop()
        d.timings["teardown_s"] = time.monotonic() - t_stop
        spooled = f"; {d.spooled_at_kill} update(s) of round {KILL_AFTER + 1} stored at the kill" if crash else ""
        print(f"\n{tag}: {json.dumps({k: round(v, 1) for k, v in d.timings.items()})}{spooled}", file=sys.stderr)


@pytest.fixture(scope="module")
def runs(material: Material) -> Iterator[tuple[Deployment, Deployment]]:
    """The reference and the crashed deployment, side by side (each with its own ports and folders)."""
    t0 = time.monotonic()
    ports = free_ports(2 * (1 + len(PARTNERS)))
    with ThreadPoolExecutor(2) as pool:
        ref_future = pool.submit(deploy, material, "reference", False, ports[: 1 + len(PARTNERS)])
        crash_future = pool.submit(deploy, material, "crash", True, ports[1 + len(PARTNERS) :])
        reference, crashed = ref_future.result(), crash_future.result()
    print(f"resume test: both deployments in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    yield reference, crashed


# ---- checks ---------------------------------------------------------------------------------------------------


def _summary(d: Deployment) -> dict[str, Any]:
    return dict(json.loads(read(d.run / "summary.json") or "{}"))


def test_the_reference_run_completes(runs: tuple[Deployment, Deployment]) -> None:
    reference, _ = runs
    assert reference.exits == [0], reference.logs()
    assert (_summary(reference).get("status"), _summary(reference).get("rounds")) == ("completed", ROUNDS)


def test_the_killed_run_resumes_and_completes(runs: tuple[Deployment, Deployment]) -> None:
    _, crashed = runs
    assert any("flwr-serverapp" in what for what in crashed.killed), crashed.killed  # the round loop died too
    interrupted, resumed = crashed.exits
    assert interrupted != 0 and resumed == 0, f"exits {crashed.exits}\n{crashed.logs()}"
    assert (_summary(crashed).get("status"), _summary(crashed).get("rounds")) == ("completed", ROUNDS)
    state = json.loads((crashed.state / "state.json").read_text())
    assert state["status"] == "finished:completed" and state["resumed"] is True, state
    assert [r["run_id"] for r in state["previous_runs"]] != [state["run_id"]], state  # a new Flower run


def test_the_resumed_model_is_the_uninterrupted_runs_byte_for_byte(runs: tuple[Deployment, Deployment]) -> None:
    reference, crashed = runs
    key = load_public_key(reference.state.parent / "keys" / "coordinator.pub")
    want = read_signed_model(reference.run / "global_model.npz", key)
    got = read_signed_model(crashed.run / "global_model.npz", key)
    assert (got.envelope.round, want.envelope.round) == (ROUNDS, ROUNDS)
    assert got.envelope.run_id != want.envelope.run_id  # two runs: compare the arrays, not the files
    assert sorted(got.arrays) == sorted(want.arrays)
    for name, array in want.arrays.items():
        mine = np.asarray(got.arrays[name])
        assert (mine.dtype, mine.shape) == (array.dtype, array.shape), name
        assert mine.tobytes() == np.asarray(array).tobytes(), f"{name} differs after the resume"
    assert got.envelope.model_digest == want.envelope.model_digest


def test_metrics_hold_every_round_once(runs: tuple[Deployment, Deployment]) -> None:
    for d in runs:
        rounds = [json.loads(line) for line in read(d.run / "metrics.jsonl").splitlines() if line.strip()]
        assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1)), rounds
        assert all(len(r.get("contributions", [])) == len(PARTNERS) for r in rounds), rounds


def test_the_ledger_records_the_resume(runs: tuple[Deployment, Deployment]) -> None:
    _, crashed = runs
    entries = read_ledger(crashed.run / LEDGER_FILE).entries
    resumes = [e.body for e in entries if e.kind == "resume"]
    assert len(resumes) == 1 and KILL_AFTER <= resumes[0]["after_round"] < ROUNDS, resumes
    assert len({e.body.get("run_id") for e in entries} - {None}) <= 1  # the resumed run kept its run id
    assert [int(e.body["round"]) for e in entries if e.kind == "round"] == list(range(1, ROUNDS + 1))


@pytest.mark.parametrize("which", ["reference", "crash"])
def test_weft_audit_verify_recomputes_every_aggregate(runs: tuple[Deployment, Deployment], which: str) -> None:
    d = runs[0] if which == "reference" else runs[1]
    proc = subprocess.run([*weft_prefix(), "audit", "verify", str(d.run), "--coordinator-key",
                           str(d.state.parent / "keys" / "coordinator.pub")],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{ROUNDS} aggregate(s) recomputed bit for bit" in proc.stdout, proc.stdout


def test_the_partners_reconnected_by_themselves(runs: tuple[Deployment, Deployment]) -> None:
    """Flower's own retries found the restarted SuperLink; the supervisor never had to restart a SuperNode."""
    _, crashed = runs
    for name in PARTNERS:
        log = crashed.procs[name].text()[crashed.marks[name] :]
        assert "Connection attempt failed" in log and REJOINED.search(log), f"{name}:\n{log[-3000:]}"
        assert f"round {KILL_AFTER + 1}: sent update" in log, f"{name}:\n{log[-3000:]}"
        assert "supernode exited" not in log, f"{name}:\n{log[-3000:]}"


def test_a_completed_run_cannot_be_resumed(runs: tuple[Deployment, Deployment], material: Material) -> None:
    _, crashed = runs
    again = _coordinator(material, crashed.state, 9091, resume=True)
    with pytest.raises(ConfigError, match=rf"already completed {ROUNDS} round\(s\); nothing to resume"):
        check_coordinator(again)
