"""`trl-post-training list` in a narrow terminal: the status and the numbers stay whole (issue 20: the
status column was cut at 80 columns); a long job name folds, the error gets what room is left."""

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


def listing(width: int, monkeypatch) -> str:
    from rich.console import Console

    import providers.cli.app as cli

    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(width=width, file=out))
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


def test_the_last_column_shows_each_methods_headline(monkeypatch):
    text = listing(160, monkeypatch)
    assert "reward 0.625" in text and "4.959e-07" not in text  # GRPO: its reward, not a ~0 loss
    assert "1.234" in text  # a job without headline figures: its last loss
