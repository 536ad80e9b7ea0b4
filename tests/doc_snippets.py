"""The code blocks of README.md and docs/*.md that a reader would run, and what the suite does with each.

A runnable block (```bash, ```sh, ```python, or a ```yaml job file: one with a top-level `method:`) carries a
marker, an HTML comment on the line before its fence (GitHub does not show it):

    <!-- run: NAME -->                         tests/test_docs_snippets.py runs the block as written (slow tier)
    <!-- run by: tests/FILE.py::TEST, ... -->   the named tests already run what it shows
    <!-- not run: WHY -->                      the suite cannot run it (two machines, a cluster, ...)

tests/test_docs.py (fast tier) fails on a runnable block with no marker, so no snippet joins the docs unrun
and unsaid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE_LANGUAGES = {"bash", "sh", "shell", "python", "py"}
MARKER = re.compile(r"^<!--\s*(run|run by|not run):\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    marker: str | None  # "run", "run by", "not run", or None
    marker_text: str  # the snippet's name, the covering tests, or the reason

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.language in RUNNABLE_LANGUAGES or (
            self.language == "yaml" and re.search(r"^method:", self.code, re.M) is not None)


def blocks(pages: list[Path] = PAGES) -> list[Block]:
    """Every fenced code block of the pages, with the marker on the line before its fence (if any)."""
    found = []
    for page in pages:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].startswith("```"):
                start, language = i, lines[i][3:].strip()
                i += 1
                while i < len(lines) and not lines[i].startswith("```"):
                    i += 1
                m = MARKER.match(lines[start - 1].strip()) if start else None
                found.append(Block(str(page.relative_to(ROOT)), start + 1, language, "\n".join(lines[start + 1:i]),
                                   m.group(1) if m else None, m.group(2) if m else ""))
            i += 1
    return found


def covering_tests(block: Block) -> list[str]:
    """The `tests/FILE.py::TEST` ids of a `run by:` marker."""
    return [t.strip() for t in block.marker_text.split(",") if t.strip()]
