"""`watch`'s plain lines and a finished job's summary (providers/cli/watch.py), from metrics records as
metrics.jsonl holds them. Pure functions: fast."""

from __future__ import annotations

from providers.cli.watch import StepLines, duration_text, summary_lines


def train(step, t, loss=1.0, **kw):
    return {"time": t, "step": step, "epoch": 0.1, "loss": loss, "learning_rate": 1e-3, **kw}


def test_validation_loss_only_at_the_steps_where_it_was_measured():
    lines = StepLines(total=4)
    records = [train(1, 100.0), train(2, 101.0), {"time": 101.5, "step": 2, "eval_loss": 0.5},
               train(3, 102.0), train(4, 103.0), {"time": 104, "step": 4, "train_loss": 0.9},
               {"time": 104, "step": 4, "eval_loss": 0.25}, {"time": 104, "step": 4, "eval_loss": 0.25}]
    out = [x for x in map(lines.line, records) if x]
    assert out[0] == "step 1/4  loss 1.0000  lr 1.00e-03"  # no val, no ETA: nothing measured, no rate yet
    assert out[2] == "eval at step 2/4  val 0.5000"
    assert [x for x in out if "val" in x] == ["eval at step 2/4  val 0.5000", "eval at step 4/4  val 0.2500"]
    assert not any("val" in x for x in out if x.startswith("step "))
    assert len(out) == 6  # the run's summary record and the repeated final evaluation print nothing


def test_no_eta_before_a_rate_and_none_without_a_total():
    lines = StepLines(total=10)
    assert "eta" not in lines.line(train(1, 100.0))
    assert lines.line(train(2, 102.0)).endswith("eta 0:16")  # 2 s a step, 8 steps left
    unknown = StepLines(total=None)
    assert all("eta" not in unknown.line(train(s, 100.0 + s)) for s in (1, 2, 3))
    assert unknown.line(train(4, 110.0)).startswith("step 4/?")


def test_a_replay_does_not_borrow_the_future_rate():
    lines = StepLines(total=100)
    # the first two steps took 10 s each; later ones 1 s: step 2's ETA comes from steps 1-2 only
    assert lines.line(train(1, 0.0)) and lines.line(train(2, 10.0)).endswith("eta 16:20")  # 98 x 10 s
    later = [lines.line(train(s, 10.0 + (s - 2))) for s in range(3, 40)]
    assert later[-1].endswith("eta 1:01")  # the last 20 steps' rate: 1 s a step, 61 left


def test_summary_of_a_finished_job():
    status = {"job_uuid": "j", "status": "completed", "started_at": "2026-12-03T10:00:00+00:00",
              "completed_at": "2026-12-03T10:01:05+00:00",
              "checkpoints": [{"path": "/runs/j/checkpoint-2"}, {"path": "/runs/j/final"}],
              "resources_allocated": {"step": 4, "total_steps": 4, "final_train_loss": 0.75}}
    records = [train(1, 1.0), train(2, 2.0), {"step": 2, "eval_loss": 0.5}, {"step": 4, "eval_loss": 0.4}]
    assert summary_lines("j", status, records) == [
        "j: completed", "  steps        4/4", "  loss         1.0000 -> 1.0000  (first -> last logged step)",
        "  train loss   0.7500", "  val loss     0.4000 (step 4, 2 evaluation(s))",
        "  duration     1:05", "  checkpoint   /runs/j/final"]
    no_eval = summary_lines("j", {**status, "checkpoints": []}, records[:2])
    assert "  val loss     - (never measured)" in no_eval and not any("checkpoint" in x for x in no_eval)
    assert duration_text(3725) == "1:02:05"


def test_grpo_shows_its_reward_and_each_graders_and_dpo_its_margin_first():
    grpo = StepLines(total=4, method="grpo")
    records = [train(1, 1.0, loss=0.0, reward=0.25, **{"rewards/exact/mean": 0.25, "rewards/exact/std": 0.4}),
               train(2, 2.0, loss=0.0, reward=0.625, **{"rewards/exact/mean": 0.625})]
    assert grpo.line(records[0]) == "step 1/4  reward 0.250  exact 0.250  loss 0.0000  lr 1.00e-03"
    status = {"status": "completed", "resources_allocated": {"method": "grpo", "step": 2, "total_steps": 2}}
    summary = summary_lines("g", status, records)
    assert summary[2:4] == ["  reward       0.250 -> 0.625  (first -> last logged step)", "  exact        0.250 -> 0.625"]
    dpo = StepLines(total=4, method="dpo")
    line = dpo.line(train(1, 1.0, loss=0.69, **{"rewards/margins": 0.01, "rewards/accuracies": 0.5}))
    assert line == "step 1/4  margin 0.010  acc 0.50  loss 0.6900  lr 1.00e-03"
