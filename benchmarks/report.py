"""What every benchmark section shares: the machine line, pass/fail checks, and docs/BENCHMARKS.md blocks.

A section is a function `section(quick: bool = False)` returning either its Markdown, or a `Section`:
its Markdown plus the `Check`s it measured (a target of issue 8 and the figure that meets it or not).
`python -m benchmarks` (benchmarks/__main__.py) runs the sections and writes each one's Markdown between
its markers in docs/BENCHMARKS.md, and the checks into the summary table at the top.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
FIGURES = ROOT / "docs" / "figures"


@dataclass(frozen=True)
class Check:
    """One target and what this run measured for it."""

    target: str
    """The target, as a reader would state it ("verified aggregation >= 1.0x Flower's stock")."""
    measured: str
    """The figure measured, formatted ("1.31x")."""
    ok: bool
    """Whether the measured figure meets the target."""


@dataclass(frozen=True)
class Section:
    """A section's Markdown and the checks it measured."""

    markdown: str
    checks: tuple[Check, ...] = field(default=())


def machine() -> str:
    """One line naming the machine and the versions (torch and flwr only when importable)."""
    parts = [f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"]
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        parts.append(f"{gpu}; Python {platform.python_version()}, torch {torch.__version__}")
    except ImportError:
        parts.append(f"Python {platform.python_version()}")
    try:
        import flwr

        parts.append(f"flwr {flwr.__version__}")
    except ImportError:
        pass
    return ", ".join(parts) + f"; measured {time.strftime('%Y-%m-%d')}"


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of block `name` in docs/BENCHMARKS.md."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_block(name: str, block: str, doc: Path = DOC, after: str | None = None) -> None:
    """Replace the text between block `name`'s markers in `doc`.

    A block not yet in the document is added: after block `after` when given and present, else at the end.
    """
    begin, end = markers(name)
    text = doc.read_text()
    body = f"{begin}\n{block.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        doc.write_text(f"{head}{body}{tail}")
        return
    if after is not None and markers(after)[1] in text:
        head, tail = text.split(markers(after)[1], 1)
        doc.write_text(f"{head}{markers(after)[1]}\n\n{body}{tail}")
        return
    doc.write_text(text.rstrip() + f"\n\n{body}\n")


def read_block(name: str, doc: Path = DOC) -> str | None:
    """The text between block `name`'s markers, or None."""
    begin, end = markers(name)
    text = doc.read_text()
    if begin not in text or end not in text:
        return None
    return text.split(begin, 1)[1].split(end, 1)[0].strip()
