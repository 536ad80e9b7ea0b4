"""The docs' `<!-- run: NAME -->` blocks (tests/doc_snippets.py), run as written, as a reader would paste them,
against one training service for the module; each must show on what it prints that it learned the toy task.

Only the placeholders a reader replaces are replaced (docs/testing.md says so): the service's default address
`http://127.0.0.1:8322` by the module's, a `tml-...` key by its user's key, model paths `models/NAME` or
`/models/NAME` by the tiny models of scripts/build_tiny_models.py. A block runs in a fresh folder holding the
files it opens (`token`, its `train.jsonl`). Blocks that other tests already run say so in their marker and
are not run here twice.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from doc_snippets import blocks
from helpers import users_service

pytestmark = pytest.mark.slow

KEY = "tml-docs-0123456789abcdef"
DOC_URL = "http://127.0.0.1:8322"


@dataclass(frozen=True)
class Snippet:
    """What a block needs in its folder (file name -> rows of toy_data as JSON lines), and the check of what it
    printed (raises AssertionError; returns the line that shows learning, for the report)."""
    check: Callable[[str], str]
    files: dict[str, Callable[[dict], list[dict]]] = field(default_factory=dict)


def tinker_quickstart(out: str) -> str:
    losses = [float(m.group(1)) for m in re.finditer(r"^\d+ (\S+)$", out, re.M)]
    assert len(losses) == 20 and losses[-1] < losses[0] / 3, out  # measured: 26.7 -> 0.8
    assert out.splitlines()[-1] == "True", out  # the memorised completion comes back from the sampler
    return f"loss:sum {losses[0]:.1f} -> {losses[-1]:.2f} in 20 steps; sampler gives the completion back: True"


def openai_dpo(out: str) -> str:
    losses = {int(step): float(loss) for step, loss in re.findall(r"^Step (\d+)/\d+: training loss=(\S+)$", out, re.M)}
    assert len(losses) >= 8, out
    steps = sorted(losses)
    first, last = losses[steps[0]], sum(losses[s] for s in steps[-3:]) / 3
    assert last < first - 0.2, out  # from log 2 = 0.693 (policy = reference); measured: last 3 mean 0.29
    assert re.search(r"^\d+ ft:\S+:ckpt-step-\d+$", out, re.M), out  # a servable checkpoint per save
    return f"DPO loss {first:.3f} -> {last:.3f} (mean of the last 3 of {len(steps)} steps)"


def preference_rows(toy_data: dict) -> list[dict]:
    return [{"input": {"messages": [{"role": "user", "content": r["prompt"]}]},
             "preferred_output": [{"role": "assistant", "content": r["chosen"]}],
             "non_preferred_output": [{"role": "assistant", "content": r["rejected"]}]}
            for r in toy_data["preference"][:64]]


SNIPPETS = {
    "tinker-quickstart": Snippet(tinker_quickstart),
    "openai-dpo": Snippet(openai_dpo, {"train.jsonl": preference_rows}),
}


def as_run(code: str, url: str, models_root: str) -> str:
    """The block with the reader's placeholders filled in: address, key, model paths."""
    code = code.replace(DOC_URL, url).replace('"tml-..."', json.dumps(KEY))
    return re.sub(r"(?<![\w./-])/?models/(?=\w)", models_root + "/", code)  # not .../v1/models/ID


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_models):
    models_root = str(Path(tiny_models["student"]).parent)
    with users_service(tmp_path_factory.mktemp("docs"), {"reader": ("member", KEY, {})}, models_root) as started:
        yield started


RUN_BLOCKS = [b for b in blocks() if b.marker == "run"]


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.marker_text for b in RUN_BLOCKS])
def test_the_docs_snippet_runs_as_written_and_learns(block, service, tiny_models, toy_data, tmp_path):
    url, _, log = service
    snippet = SNIPPETS[block.marker_text]
    (tmp_path / "token").write_text(KEY)
    for name, rows in snippet.files.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows(toy_data)))
    code = as_run(block.code, url, str(Path(tiny_models["student"]).parent))
    command = [sys.executable, "-c", code] if block.language in ("python", "py") else ["bash", "-euo", "pipefail",
                                                                                        "-c", code]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{block.where}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{log.read_text()[-2000:]}"
    print(f"\n{block.where} ({block.marker_text}): {snippet.check(run.stdout)}")
