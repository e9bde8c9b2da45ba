"""`weft audit verify DIR`: the offline audit of a run's record (protocols.audit), as a command.

Imports neither flwr nor torch, so a partner's auditor can run it on a bare Python with numpy and
cryptography. Exit 0: every check passed; 1: something is wrong (each problem printed on its own line,
naming the round and what is wrong); 2: a usage mistake (no such folder, a bad key file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add `weft audit verify` to the CLI."""
    audit = sub.add_parser("audit", help="check a run's record offline (no trust in the operator)")
    actions = audit.add_subparsers(required=True, metavar="ACTION")
    verify = actions.add_parser(
        "verify",
        help="check the ledger's chain and signatures, every contribution, and recompute every aggregate",
    )
    verify.add_argument("run_dir", help="a run's folder (a simulation's --out, or a coordinator's run folder)")
    verify.add_argument("--coordinator-key", help="the coordinator public key (.pub) the ledger must be signed by")
    verify.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    from federation.errors import ConfigError
    from protocols import load_public_key
    from protocols.audit import verify_run

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} is not a folder; give a run's output folder")
    key = load_public_key(Path(args.coordinator_key)) if args.coordinator_key else None

    def shown(round_: int) -> None:  # the audit of a long run takes a while: say where it is
        if sys.stderr.isatty():
            print(f"\rweft audit verify: round {round_} checked", end="", file=sys.stderr, flush=True)

    verdict = verify_run(run_dir, key, progress=shown)
    if sys.stderr.isatty() and verdict.rounds:
        print(file=sys.stderr)
    for note in verdict.notes:
        print(f"note: {note}", file=sys.stderr)
    if verdict.ok:
        print(
            f"OK: {run_dir}: ledger intact and signed; {verdict.rounds} round(s), {verdict.contributions} "
            f"contribution(s) verified; {verdict.recomputed} aggregate(s) recomputed bit for bit; "
            f"run status: {verdict.status}"
        )
        return 0
    for problem in verdict.problems:
        print(f"FAIL: {problem}")
    print(f"weft audit verify: {len(verdict.problems)} problem(s) in {run_dir}", file=sys.stderr)
    return 1
