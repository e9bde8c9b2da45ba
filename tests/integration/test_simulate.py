"""Real simulations: `weft simulate` end to end on Flower's Ray engine (a few seconds of training each).

Runs the CLI in a subprocess (as a user would), on the tiny synthetic task, and checks the record it
leaves: determinism, adversaries rejected with the right reason in every round, a signed model that
verifies offline, and a loud failure when the quorum is missed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from federation.config import ADVERSARY_REASONS
from protocols import load_public_key, params_digest, read_signed_model

pytestmark = pytest.mark.integration

ARGS = ["--task", "synthetic", "--nodes", "3", "--rounds", "3", "--seed", "7", "--local-epochs", "2"]
TIMEOUT_S = 300


def weft(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run `weft simulate` with the shared arguments; bounded in time."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    cmd = [sys.executable, "-m", "federation.cli", "simulate", *ARGS, "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, check=False)


def summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A clean run, the same run again (with personalization after it), and one with an adversary of each kind."""
    base = tmp_path_factory.mktemp("sim")
    outs = {"clean": base / "clean", "again": base / "again", "attacked": base / "attacked"}
    for name, out in outs.items():
        # 3 honest of 9 members: the attacked run needs a quorum below 50% of members
        extra = {"attacked": ["--adversary", "all", "--quorum", "0.3"], "again": ["--personalize-epochs", "2"]}
        proc = weft(out, *extra.get(name, []))
        assert proc.returncode == 0, f"{name} run failed:\n{proc.stderr[-3000:]}"
    return outs


def test_clean_run_writes_a_complete_record(runs: dict[str, Path]) -> None:
    out = runs["clean"]
    s = summary(out)
    assert s["status"] == "completed"
    assert (s["rounds"], s["accepted"], s["rejected"]) == (3, 9, 0)
    assert s["final_accuracy"] > 0.9  # well-separated blobs
    assert "held-out" in s["accuracy_measured_on"]
    lines = metrics(out)
    assert [line["round"] for line in lines] == [1, 2, 3]
    assert all(line["accepted"] == 3 and line["rejected"] == 0 for line in lines)
    assert lines[-1]["accuracy"] == s["final_accuracy"]
    assert lines[-1]["global_model_digest"] == s["global_model_digest"]
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every node kept its own locally trained model
    assert sorted(p.name for p in (out / "nodes").iterdir()) == ["node-000", "node-001", "node-002"]
    assert all((out / "nodes" / n / "local_model.npz").is_file() for n in ("node-000", "node-001", "node-002"))


def test_summary_records_the_resolved_config_and_the_final_and_best_rounds(runs: dict[str, Path]) -> None:
    s = summary(runs["clean"])
    config = s["config"]
    assert (config["task"], config["rounds"], config["seed"], config["local-epochs"]) == ("synthetic", 3, 7, 2)
    assert (config["nodes"], config["partition"], config["alpha"]) == (3, "dirichlet", 0.5)
    assert (config["optimizer"], config["learning-rate"], config["momentum"]) == ("sgd", 0.1, 0.9)
    assert config["exchange"] == "all" and config["adversaries"] == {}
    lines = metrics(runs["clean"])
    assert s["final"] == {"round": 3, "loss": lines[-1]["loss"], "accuracy": lines[-1]["accuracy"]}
    best = max(lines, key=lambda line: line["accuracy"])  # first of the best: ties keep the earlier round
    assert (s["best"]["round"], s["best"]["accuracy"], s["best"]["by"]) == (best["round"], best["accuracy"], "accuracy")


def test_readme_output_table_matches_the_files_a_run_writes(runs: dict[str, Path]) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("## What a simulation leaves behind") :].split("\n\n")[2]
    documented = set()
    for row in table.splitlines()[2:]:
        for name in row.split("|")[1].replace("`", "").split(","):
            documented.add(name.strip().split("/")[0])
    written = {p.name for p in runs["again"].iterdir()}
    only_sometimes = {"state"}  # written only by a server optimizer with state (--server-optimizer nesterov)
    assert written <= documented and documented - only_sometimes <= written, (documented, written)


def test_personalization_keeps_each_nodes_model_and_records_before_and_after(runs: dict[str, Path]) -> None:
    out = runs["again"]
    s = summary(out)
    rows = s["personalization"]
    assert len(rows) == 3 and s["config"]["personalize-epochs"] == 2
    for row in rows:
        assert set(row["before"]) == set(row["after"]) == {"loss", "accuracy"}, row
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(r["member"] for r in rows) == sorted(m["member_id"] for m in manifest["members"])
    assert metrics(out)[-1] == {"phase": "personalization", "nodes": rows}
    for n in ("node-000", "node-001", "node-002"):
        assert (out / "nodes" / n / "personal_model.npz").is_file()
        kept = json.loads((out / "nodes" / n / "personal_model.json").read_text())
        assert kept["personalize_epochs"] == 2 and "accuracy" in kept["validation_metrics"]


def test_final_model_is_signed_and_matches_the_summary(runs: dict[str, Path]) -> None:
    out = runs["clean"]
    model = read_signed_model(out / "global_model.npz", load_public_key(out / "keys" / "coordinator.pub"))
    assert model.envelope.round == 3
    assert params_digest(model.arrays).hex() == summary(out)["global_model_digest"]
    assert model.envelope.run_id == summary(out)["run_id"]


def test_same_seed_gives_the_same_global_model(runs: dict[str, Path]) -> None:
    assert summary(runs["clean"])["run_id"] != summary(runs["again"])["run_id"]
    assert summary(runs["clean"])["global_model_digest"] == summary(runs["again"])["global_model_digest"]


def test_every_adversary_is_rejected_with_its_reason_in_every_round(runs: dict[str, Path]) -> None:
    expected = {reason: 1 for reason in ADVERSARY_REASONS.values()}
    for line in metrics(runs["attacked"]):
        assert line["accepted"] == 3, line
        assert line["rejected_by_reason"] == expected, line
    s = summary(runs["attacked"])
    assert s["rejected_by_reason"] == {reason: 3 for reason in ADVERSARY_REASONS.values()}


def test_attacked_run_aggregates_exactly_the_honest_updates(runs: dict[str, Path]) -> None:
    # None of the bad updates touched the aggregate: the model is byte-identical to the clean run's.
    clean, attacked = summary(runs["clean"]), summary(runs["attacked"])
    assert attacked["global_model_digest"] == clean["global_model_digest"]
    assert attacked["final_accuracy"] == clean["final_accuracy"]


def test_missed_quorum_fails_loudly_and_produces_no_model(tmp_path: Path) -> None:
    out = tmp_path / "quorum"
    proc = weft(out, "--adversary", "unsigned=2", "--quorum", "1.0")
    assert proc.returncode == 1
    assert "run failed: round 1: accepted 3 update(s), quorum is 5" in proc.stderr
    assert "unsigned=2" in proc.stderr
    s = summary(out)
    assert s["status"] == "failed" and s["global_model_digest"] is None
    assert metrics(out) == [{"round": 1, "status": "failed", "error": s["error"], "manifest_version": 1}]
    assert not (out / "global" / "round-0001.npz").exists()
