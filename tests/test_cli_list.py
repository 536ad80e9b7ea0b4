"""`trl-post-training list` in a pipe: one job a line, tab-separated, nothing cut. In a narrow terminal: the
status and the numbers stay whole (issue 20: the status column was cut at 80 columns); a long job name folds,
the error gets what room is left. `artifacts` keeps whole checkpoint names in both."""

from __future__ import annotations

import io
import types

import pytest

JOBS = [
    {"job_uuid": "reverse-sft-lora-2-with-a-long-name", "status": "in_progress", "method": "sft", "step": 12,
     "total_steps": 40, "world_size": 2, "last_loss": 1.234, "error": None},
    {"job_uuid": "j2", "status": "cancelled", "method": "dpo", "step": 4, "total_steps": 40, "world_size": 1,
     "error": "RuntimeError: rank 1 died: Signal 9 (SIGKILL) while saving checkpoint-4"},
    {"job_uuid": "g", "status": "completed", "method": "grpo", "step": 8, "total_steps": 8, "world_size": 1,
     "last_loss": 4.959e-7, "last": {"reward": 0.625, "rewards/exact/mean": 0.625}, "error": None},
]


def listing(width: int | None, monkeypatch) -> str:
    """The listing on a terminal `width` columns wide; None: into a pipe."""
    from rich.console import Console

    import providers.cli.app as cli

    out = io.StringIO()
    terminal = {"width": width, "force_terminal": True, "color_system": None} if width else {"force_terminal": False}
    monkeypatch.setattr(cli, "console", Console(file=out, **terminal))
    backend = types.SimpleNamespace(jobs=lambda: JOBS)
    monkeypatch.setattr(cli, "_ctx", lambda ctx: types.SimpleNamespace(backend=backend))
    cli.list_jobs(None, False)
    return out.getvalue()


@pytest.mark.parametrize("width", [80, 100, 160])
def test_status_and_numbers_stay_whole(width, monkeypatch):
    text = listing(width, monkeypatch)
    assert max(len(line) for line in text.splitlines()) <= width
    for whole in ("in_progress", "cancelled", "12/40", "4/40", "1.234"):
        assert whole in text, (whole, text)


def test_a_wide_terminal_shows_the_error(monkeypatch):
    assert "RuntimeError: rank 1 died" in listing(160, monkeypatch)


def test_a_pipe_gets_one_whole_job_per_line_tab_separated(monkeypatch):
    lines = listing(None, monkeypatch).splitlines()
    assert lines[0].split("\t")[:2] == ["job", "status"] and len(lines) == 1 + len(JOBS)
    first, second = (line.split("\t") for line in lines[1:3])
    assert first[:4] == ["reverse-sft-lora-2-with-a-long-name", "in_progress", "sft", "12/40"]
    assert second[-1] == JOBS[1]["error"]


ARTIFACTS = {"checkpoints": [{"identifier": "reverse-sft-lora-2-with-a-long-name-step-40", "step": 40,
                              "training_metrics": {"train_loss": 0.5},
                              "path": "/srv/trl/runs/reverse-sft-lora-2-with-a-long-name/checkpoint-40"}], "plots": []}


@pytest.mark.parametrize("width", [None, 80])
def test_artifacts_keep_whole_names(width, monkeypatch):
    from rich.console import Console

    import providers.cli.app as cli

    out = io.StringIO()
    terminal = {"width": width, "force_terminal": True, "color_system": None} if width else {"force_terminal": False}
    monkeypatch.setattr(cli, "console", Console(file=out, **terminal))
    backend = types.SimpleNamespace(artifacts=lambda job: ARTIFACTS)
    monkeypatch.setattr(cli, "_ctx", lambda ctx: types.SimpleNamespace(backend=backend))
    cli.artifacts(None, "j", False)
    text = out.getvalue() if width is None else "".join(  # a folded cell: its pieces, joined
        line.split("│")[1].strip() if "│" in line else "" for line in out.getvalue().splitlines())
    assert "reverse-sft-lora-2-with-a-long-name-step-40" in text, out.getvalue()
    assert "…" not in out.getvalue()


def test_the_last_column_shows_each_methods_headline(monkeypatch):
    text = listing(160, monkeypatch)
    assert "reward 0.625" in text and "4.959e-07" not in text  # GRPO: its reward, not a ~0 loss
    assert "1.234" in text  # a job without headline figures: its last loss
