"""`trl-post-training logs` shows a job's log as readable lines: the Trainer's dict lines as `key value` pairs,
without accelerate's INFO lines or transformers' checkpoint-ordering warning (lines of a real rank log)."""

from __future__ import annotations

import types

import pytest

RANK_LOG = [
    "2026-12-07 17:39:08,883 INFO providers.training: rank 0/2 joined (gloo)",
    "{'loss': '6.675', 'grad_norm': '0.839', 'learning_rate': '0.001', 'epoch': '0.5'}",
    "2026-12-07 18:35:23,634 INFO accelerate.accelerator: [RANK 0] The used dataset had no length, returning "
    "gathered tensors. You should drop the remainder yourself.",
    "[transformers] mtime may not be reliable on this filesystem, falling back to numerical ordering",
    "{'eval_loss': '6.678', 'epoch': '2'}",
    "RuntimeError: {'not': 'a trainer line'}",
]
SHOWN = ["2026-12-07 17:39:08,883 INFO providers.training: rank 0/2 joined (gloo)",
         "loss 6.675  grad_norm 0.839  learning_rate 0.001  epoch 0.5", "eval_loss 6.678  epoch 2",
         "RuntimeError: {'not': 'a trainer line'}"]


@pytest.mark.parametrize("follow", [False, True])
def test_logs_are_readable_lines(follow, monkeypatch, capsys):
    import providers.cli.app as cli

    text = "\n".join(RANK_LOG) + "\n"
    chunks = [text[i:i + 37] for i in range(0, len(text), 37)]  # chunks end inside lines, as a stream's do
    backend = types.SimpleNamespace(logs=lambda job, tail, rank: RANK_LOG,
                                    follow_logs=lambda job, tail, rank: iter(chunks))
    monkeypatch.setattr(cli, "_ctx", lambda ctx: types.SimpleNamespace(backend=backend))
    cli.logs(None, "j", follow, None, 100)
    assert capsys.readouterr().out.splitlines() == SHOWN
