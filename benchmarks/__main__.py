"""Run weft's performance benchmarks and write their results into docs/BENCHMARKS.md.

    .venv/bin/python -m benchmarks                 # every section (the full run takes long: see the doc)
    .venv/bin/python -m benchmarks --quick         # small sizes: a few minutes, for a first look
    .venv/bin/python -m benchmarks --only aggregation scale

Each section runs in its own process (so one section's memory peak never counts against the next) and
measures weft against a baseline run side by side in that same process: Flower's stock aggregation and
simulation, memcpy and bare hashing, plain FedAvg in float32. Its Markdown goes between its markers in
docs/BENCHMARKS.md; the targets it checked go into the summary table at the top of that file, each marked
with the date and machine of the run that measured it. Sections not run keep their last results.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from benchmarks.report import ROOT, Check, Section, machine, write_block

SECTIONS: dict[str, str] = {
    "aggregation": "Aggregation, coordinator memory and the cost of trust",
    "wire_bytes": "Bytes on the wire",
    "convergence": "Convergence by server optimizer and payload (non-IID)",
    "scale": "Scale: sampled simulations of 100 to 5,000 nodes",
    "exchange": "Exchange through a real SuperLink",
}
"""Section module (benchmarks/<name>.py) -> its title, in the order they appear in the document."""

CHECKS = ROOT / "benchmarks" / "results" / "perf_checks.json"


def run_child(name: str, quick: bool, out: Path) -> None:
    """In a child process: run one section and write its Markdown and checks as JSON to `out`."""
    module = importlib.import_module(f"benchmarks.{name}")
    run = getattr(module, "benchmark_section", module.section)  # a module may run less here than its own CLI
    result = run(quick=quick)
    section = result if isinstance(result, Section) else Section(str(result))
    if section.markdown.lstrip().startswith("## "):  # the runner writes each section's heading itself
        section = Section(section.markdown.lstrip().split("\n", 1)[1], section.checks)
    out.write_text(json.dumps({"markdown": section.markdown, "checks": [asdict(c) for c in section.checks]}))


def run_section(name: str, quick: bool) -> tuple[str, list[Check], float]:
    """Run section `name` in a fresh process; a failure becomes a plain statement in its Markdown."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"weft-bench-{name}-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks", "--child", name, "--result", str(out)]
        if quick:
            cmd.append("--quick")
        code = subprocess.call(cmd, cwd=ROOT)
        took = time.monotonic() - started
        if code != 0 or not out.exists():
            failed = Check(f"section {name} runs", f"failed (exit {code})", False)
            return f"**This section failed in the last run (exit code {code}); see its output.**", [failed], took
        data = json.loads(out.read_text())
    return data["markdown"], [Check(**c) for c in data["checks"]], took


def summary(checks: dict[str, dict[str, object]]) -> str:
    """The summary table: every target checked, by the run of each section that measured it."""
    lines = [
        "| target | measured | met | section (run) |",
        "|---|---|---|---|",
    ]
    for name in SECTIONS:
        entry = checks.get(name)
        if not entry:
            continue
        for c in entry["checks"]:  # type: ignore[attr-defined]
            met = "yes" if c["ok"] else "**no**"
            lines.append(f"| {c['target']} | {c['measured']} | {met} | {name} ({entry['when']}) |")
    if len(lines) == 2:
        lines.append("| (no section has run yet) | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    parser.add_argument("--quick", action="store_true", help="small sizes: a first look in a few minutes")
    parser.add_argument("--no-doc", action="store_true", help="print the Markdown instead of writing the doc")
    parser.add_argument("--child", choices=list(SECTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        try:
            run_child(args.child, args.quick, args.result)
        except Exception:
            traceback.print_exc()
            return 1
        return 0

    checks: dict[str, dict[str, object]] = json.loads(CHECKS.read_text()) if CHECKS.exists() else {}
    here = machine()
    total = time.monotonic()
    previous = "perf:summary"
    for name in args.only or list(SECTIONS):
        print(f"== {name}: {SECTIONS[name]}", flush=True)
        markdown, measured, took = run_section(name, args.quick)
        mode = " --quick" if args.quick else ""
        block = (
            f"## {SECTIONS[name]}\n\n{markdown.strip()}\n\n"
            f"Run with `.venv/bin/python -m benchmarks --only {name}{mode}` on {here}; the section took {took:.0f} s."
        )
        checks[name] = {"when": time.strftime("%Y-%m-%d") + (", quick" if args.quick else ""),
                        "checks": [asdict(c) for c in measured]}  # fmt: skip
        for c in measured:
            print(f"   {'ok ' if c.ok else 'NO '} {c.target}: {c.measured}", flush=True)
        if args.no_doc:
            print(block)
        else:
            write_block(f"perf:{name}", block, after=previous)
        previous = f"perf:{name}"
    CHECKS.parent.mkdir(parents=True, exist_ok=True)
    CHECKS.write_text(json.dumps(checks, indent=2, sort_keys=True) + "\n")
    table = summary(checks)
    if args.no_doc:
        print(table)
    else:
        write_block(
            "perf:summary",
            "## Performance targets (issue 8): the summary\n\n"
            "Written by `.venv/bin/python -m benchmarks`; each row comes from the last run of its section "
            "(sections below).\n\n" + table,
        )
    print(f"done in {time.monotonic() - total:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
