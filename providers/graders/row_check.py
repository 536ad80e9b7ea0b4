"""Graders checked on a request's first rows in a child process limited in CPU seconds and address space.

Before a GRPO job starts, every template is rendered on its first rows, so that a template naming a missing
column is a 400 naming the grader. That work grows with the client's rows and templates, so it runs in
`python -m providers.graders.row_check CPU_SECONDS MEMORY_BYTES` (limits set before it reads anything), and
the caller's thread only waits for it, without holding the GIL: no template or row stalls the service.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .models import Grader

CHECK_ROWS = 8  # the first rows every grader is rendered on
CHECK_CPU_SECONDS = 10
CHECK_MEMORY_BYTES = 1 << 30  # address space: the interpreter and its imports take about 40 MB of it
CHECK_WALL_SECONDS = 60  # the CPU limit, on a machine busy with training
OVER_MEMORY = 3  # the child's exit status when the limit on its address space stopped it


class GraderCheckOverLimit(ValueError):
    """Rendering the graders on the first rows went past CHECK_CPU_SECONDS or CHECK_MEMORY_BYTES."""


def check_rows(graders: Sequence[Grader], rows_path: Path, field: str, rows_field: str, *,
               env: Mapping[str, str] | None = None, cpu_seconds: int = CHECK_CPU_SECONDS,
               memory_bytes: int = CHECK_MEMORY_BYTES) -> None:
    """Render every template of `graders` on the first CHECK_ROWS rows of the JSONL file `rows_path` (each row
    but its `prompt` column is the template's `item`) in a limited child process. ValueError naming the grader's
    field (`field[1].reference: ...`) and the row (`row 0 of ROWS_FIELD has columns [...]`);
    GraderCheckOverLimit when the check went past its limits. `env`: the child's environment (without
    secrets)."""
    request = {"graders": [g.model_dump(mode="json") for g in graders], "rows_path": str(rows_path),
               "field": field}
    command = [sys.executable, "-m", "providers.graders.row_check", str(cpu_seconds), str(memory_bytes)]
    wall_seconds = max(CHECK_WALL_SECONDS, 3 * cpu_seconds)

    def over(what: str) -> GraderCheckOverLimit:
        return GraderCheckOverLimit(f"{field}: rendering the graders' templates on the first {CHECK_ROWS} rows of "
                                    f"{rows_field} took more than {what}; make the templates or those rows smaller")

    try:
        done = subprocess.run(command, input=json.dumps(request), capture_output=True, text=True,
                              timeout=wall_seconds, env=env)
    except subprocess.TimeoutExpired:
        raise over(f"{wall_seconds} seconds") from None
    if done.returncode == OVER_MEMORY:
        raise over(f"{memory_bytes >> 20} MB of memory")
    if done.returncode < 0:  # SIGXCPU, or SIGKILL past the hard limit
        raise over(f"{cpu_seconds} CPU seconds")
    if done.returncode != 0:
        raise RuntimeError(f"the grader check failed (exit status {done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    if result.get("error"):
        columns = ", ".join(result["columns"])[:300]
        raise ValueError(f"{result['error']} (row {result['row']} of {rows_field} has columns [{columns}])")


def _limit(cpu_seconds: int, memory_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))  # SIGXCPU, then SIGKILL
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # it writes no file


def _check(request: dict[str, Any]) -> dict[str, Any]:
    from .rewards import check_graders, parse_graders

    graders = parse_graders(request["graders"], request["field"])
    with open(request["rows_path"]) as f:
        for i, line in zip(range(CHECK_ROWS), f):
            item = {k: v for k, v in json.loads(line).items() if k != "prompt"}
            try:
                check_graders(graders, item, field=request["field"])
            except ValueError as e:
                return {"error": str(e), "row": i, "columns": sorted(map(str, item))[:100]}
    return {}


def main(argv: list[str]) -> int:
    _limit(int(argv[0]), int(argv[1]))
    try:
        result = _check(json.load(sys.stdin))
    except MemoryError:
        return OVER_MEMORY
    sys.stdout.write(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
