"""Record a benchmark's figures in BENCHMARKS.md: each benchmark owns one section between markers, replaced
whole on every run, so benchmarks can run in any order and never overwrite each other.

>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "B.md"
>>> write_section("ingest", "| a | b |", path=p)
>>> write_section("ingest", "| c | d |", path=p)
>>> "| c | d |" in p.read_text() and "| a | b |" not in p.read_text()
True
"""

from __future__ import annotations

import platform
import re
from datetime import datetime, timezone
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nFigures measured by the commands in `bench/`; each section says the command, the "
          "machine and when it ran. Re-run a command to replace its section.\n")


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def write_section(name: str, body: str, command: str = "", path: Path = BENCHMARKS) -> None:
    """Replace (or add) the section ``name`` with ``body`` (Markdown)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = f"_Command: `{command}`; {machine()}; {stamp}._\n\n" if command else ""
    section = f"{start}\n## {name}\n\n{meta}{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
