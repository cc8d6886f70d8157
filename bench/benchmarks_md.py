"""Writing a benchmark's section into BENCHMARKS.md, shared by the bench scripts."""

from __future__ import annotations

import platform
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(text: str, begin: str, end: str, anchor: str | None = None, path: Path = BENCHMARKS) -> None:
    """Replace the block between ``begin`` and ``end`` with ``text`` (which carries both markers);
    without such a block, put ``text`` after ``anchor`` (or at the end of the file)."""
    doc = path.read_text(encoding="utf-8")
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + text + doc[doc.index(end) + len(end) :]
    elif anchor is not None and anchor in doc:
        doc = doc.replace(anchor, anchor + "\n\n" + text, 1)
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(doc, encoding="utf-8")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
