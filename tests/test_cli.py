"""`trl-post-training`, as a user runs it: the example job files in examples/, against the FSDP service
(with a token) and against `llama stack run run.yaml`; a live `watch` in a real terminal (tmux); exit
codes for completed, failed and cancelled jobs; logs, artifacts (plots), nodes and a pipeline."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from helpers import processes_mentioning, wait_until
from operator_fixtures import (
    EXAMPLES,
    REPO_ROOT,
    artifacts_dir,
    cli,
    cli_command,
    long_sft_file,
    tmux_available,
)

pytestmark = pytest.mark.slow


def test_submit_sft_lora_example_and_watch_to_completion(cli_env, ops_service):
    p = cli(cli_env, "submit", str(EXAMPLES / "sft_lora.yaml"), "--watch", "--job-uuid", "cli-sft-lora")
    lines = p.stdout.splitlines()
    assert lines[0] == "cli-sft-lora"
    # the rows go up once per content: a test of another module on this (session-wide) service may have
    # uploaded the same file first
    assert ("uploaded 200 rows" in p.stderr and "reverse_instruct-" in p.stderr) or not p.stderr.strip(), p.stderr
    steps = [line for line in lines if line.startswith("step ")]
    assert steps[-1].startswith("step 16/16") and "loss" in steps[-1] and "lr 2.00e-03" in steps[-1]
    assert "tok/s" in steps[-1] and "eta" in steps[1]
    assert lines[-1].startswith("cli-sft-lora completed: final loss")
    first, last = map(float, re.search(r"\(loss (\S+) -> (\S+)\)", lines[-1]).groups())
    assert last < first / 3, lines[-1]  # the example visibly learns (measured: 0.78 -> 0.08)

    artifacts = json.loads(cli(cli_env, "artifacts", "cli-sft-lora", "--json").stdout)
    plots = {Path(p).name for p in artifacts["plots"]}
    assert {"loss.png", "learning_rate.png", "tokens_per_s.png"} <= plots
    assert all(Path(p).stat().st_size > 1000 for p in artifacts["plots"])
    assert artifacts["checkpoints"][-1]["identifier"] == "cli-sft-lora-final"
    listed = {j["job_uuid"]: j for j in json.loads(cli(cli_env, "list", "--json").stdout)}
    assert listed["cli-sft-lora"]["status"] == "completed" and listed["cli-sft-lora"]["method"] == "sft"
    table = cli(cli_env, "list").stdout
    assert "cli-sft-lora" in table and "completed" in table and "16/16" in table

    # the same file again: its rows are already on the service (same content, same dataset id)
    again = cli(cli_env, "submit", str(EXAMPLES / "sft_lora.yaml"), "--job-uuid", "cli-sft-lora-2")
    assert "uploaded" not in again.stderr
    cli(cli_env, "cancel", "cli-sft-lora-2")
    ended = cli(cli_env, "cancel", "cli-sft-lora", check=2)  # nothing to cancel: an error, not a silent 0
    assert "cli-sft-lora has already ended (completed)" in ended.stderr


@pytest.mark.skipif(not tmux_available(), reason="tmux is not installed")
def test_watch_in_a_terminal_shows_a_live_bar_for_a_two_process_fsdp_dpo_job(cli_env, ops_service):
    job = cli(cli_env, "submit", str(EXAMPLES / "dpo_fsdp_2proc.yaml"), "--job-uuid", "cli-dpo-fsdp").stdout.strip()
    assert job == "cli-dpo-fsdp"
    # A private tmux server (-L): its own environment, no COLUMNS/LINES, so the pane's size is the terminal's.
    tmux = ["tmux", "-L", f"trl-test-{os.getpid()}"]
    env = {k: v for k, v in cli_env.items() if k not in ("COLUMNS", "LINES", "TMUX")}
    command = " ".join(shlex.quote(c) for c in [*cli_command(), "watch", job, "--interval", "0.5"])
    subprocess.run([*tmux, "new-session", "-d", "-s", "watch", "-x", "160", "-y", "12",
                    f"{command}; echo EXIT=$?; sleep 120"], check=True, cwd=REPO_ROOT, env=env)
    try:
        frames = []

        def pane() -> str:
            return subprocess.run([*tmux, "capture-pane", "-p", "-t", "watch"], capture_output=True,
                                  text=True).stdout

        def finished():
            text = pane()
            if not frames or text != frames[-1]:
                frames.append(text)
            return "EXIT=" in text and text

        final = wait_until(finished, timeout=300, interval=0.3, message="watch exited in tmux")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    live = [f for f in frames if "━" in f and "margin" in f and "EXIT=" not in f]
    (artifacts_dir() / "watch-tmux-frames.txt").write_text("\n\n---- frame ----\n".join(frames))
    assert live, f"no live progress frame with a bar and the DPO margin:\n{frames[-3:]}"
    assert "ETA" in live[-1] and "acc" in live[-1] and "loss" in live[-1] and "lr" in live[-1]
    (artifacts_dir() / "watch-tmux-live.txt").write_text(live[len(live) // 2])
    assert "EXIT=0" in final, final
    assert "8/8" in final and "cli-dpo-fsdp completed" in final

    status = ops_service.status(job)
    shares = [r["local_params"] / r["total_params"] for r in status["resources_allocated"]["ranks"]]
    assert shares == pytest.approx([0.5, 0.5], abs=0.02)  # really sharded over 2 processes
    rank1 = cli(cli_env, "logs", job, "--rank", "1", "-n", "400").stdout
    assert rank1.strip() and "rank1.log" not in rank1
    assert cli(cli_env, "logs", job, "-f").stdout  # the job is over: -f prints the tail and returns


def test_cancelled_job_makes_watch_exit_3_and_resume_continues_from_its_checkpoint(cli_env, ops_service, tmp_path):
    job_file = long_sft_file(tmp_path, "cli-cancel", steps=2000, save_steps=5)
    assert cli(cli_env, "submit", str(job_file)).stdout.strip() == "cli-cancel"
    watcher = subprocess.Popen([*cli_command(), "watch", "cli-cancel", "--interval", "0.3"], env=cli_env,
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: ops_service.step("cli-cancel") >= 7, 300, message="cli-cancel at step 7")
        assert cli(cli_env, "cancel", "cli-cancel").stdout.strip() == "cli-cancel: cancelled"
        out, err = watcher.communicate(timeout=60)
    finally:
        watcher.kill()
    assert watcher.returncode == 3, (out, err)
    assert "cli-cancel cancelled" in err
    run_dir = str(ops_service.data_dir / "runs" / "cli-cancel")
    assert processes_mentioning(run_dir) == []

    metrics = Path(run_dir) / "metrics.jsonl"
    before = len(metrics.read_text().splitlines())
    assert cli(cli_env, "resume", "cli-cancel").stdout.strip() in ("cli-cancel: scheduled", "cli-cancel: in_progress")
    new = wait_until(lambda: [json.loads(line) for line in metrics.read_text().splitlines()[before:]
                              if '"loss"' in line], 300, message="resumed job logs a step")
    assert new[0]["step"] > 5  # continued from checkpoint-5 (or later), not from step 1
    cli(cli_env, "cancel", "cli-cancel")


def test_failed_job_makes_watch_exit_1_with_the_jobs_error(cli_env, ops_service, tmp_path):
    import yaml

    spec = yaml.safe_load((EXAMPLES / "sft_lora.yaml").read_text())
    spec["dataset"] = str(EXAMPLES / "data" / "reverse_instruct.jsonl")
    spec.pop("validation_dataset")
    spec["training"]["max_seq_len"] = 4  # no answer token survives truncation: the run fails
    path = tmp_path / "fails.yaml"
    path.write_text(yaml.safe_dump(spec))
    p = cli(cli_env, "submit", str(path), "--watch", "--job-uuid", "cli-fails", check=1)
    assert "cli-fails failed" in p.stderr and "max_seq_len" in p.stderr


def test_bad_job_files_are_refused_naming_the_key(cli_env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: sft\nmodel: /m\ndataset: data.jsonl\nepochs: 3\n")
    p = cli(cli_env, "submit", str(bad), check=2)  # usage error (exit codes: providers/cli/errors.py)
    assert "epochs: unknown key 'epochs'" in p.stderr
    bad.write_text("method: ppo\nmodel: /m\ndataset: x.jsonl\n")
    assert "method: 'ppo' is not one of" in cli(cli_env, "submit", str(bad), check=2).stderr
    p = cli({**cli_env, "TRL_POST_TRAINING_TOKEN": "wrong"}, "list", check=2)  # a 4xx refusal
    assert "401" in p.stderr


def test_distillation_example_shows_hard_and_soft_loss_and_nodes(cli_env, ops_service):
    p = cli(cli_env, "submit", str(EXAMPLES / "distillation.yaml"), "--watch", "--job-uuid", "cli-distill")
    last = [line for line in p.stdout.splitlines() if line.startswith("step ")][-1]
    assert last.startswith("step 12/12") and "hard " in last and "soft " in last
    end = p.stdout.splitlines()[-1]
    first, final = map(float, re.search(r"\(loss (\S+) -> (\S+),", end).groups())
    assert final < first / 3, end  # the teacher repairs its noisy copy (measured: 0.77 -> 0.03)
    nodes = json.loads(cli(cli_env, "nodes", "--json").stdout)
    assert [n["state"] for n in nodes] == ["up"]
    assert "heartbeat age" in cli(cli_env, "nodes").stdout


def test_grpo_example_shows_its_reward_rising_per_grader(cli_env, ops_service):
    """examples/grpo.yaml on noisy_teacher (right sometimes): `watch` prints the reward and the grader's reward
    on each step, ends with reward first -> last, and the job list's last column is the reward."""
    p = cli(cli_env, "submit", str(EXAMPLES / "grpo.yaml"), "--watch", "--job-uuid", "cli-grpo", timeout=600)
    steps = [line for line in p.stdout.splitlines() if line.startswith("step ")]
    assert steps[-1].startswith("step 16/16  reward ") and "  exact " in steps[-1], steps[-1]
    rewards = [float(re.search(r"reward (\S+)", line).group(1)) for line in steps]
    assert sum(rewards[-4:]) > sum(rewards[:4]) + 0.4, rewards  # measured: 0.05, 0.17, ... 0.47, 0.38, 0.58
    assert re.search(r"cli-grpo completed: .*\(reward \S+ -> \S+, exact \S+ -> \S+\)", p.stdout), p.stdout
    assert re.search(r"cli-grpo\s.*reward \d", cli(cli_env, "list").stdout)  # tab-separated into a pipe


def test_llama_stack_server_is_detected_and_drives_the_inline_provider(llama_stack_factory, tmp_path, cli_env):
    server = llama_stack_factory(data_dir=tmp_path / "stack")
    env = {**cli_env, "TRL_POST_TRAINING_URL": server.base_url}
    env.pop("TRL_POST_TRAINING_TOKEN")
    p = cli(env, "submit", str(EXAMPLES / "dpo.yaml"), "--watch", "--job-uuid", "stack-dpo")
    steps = [line for line in p.stdout.splitlines() if line.startswith("step ")]
    assert steps and steps[-1].startswith("step 10/10") and "margin" in steps[-1] and "acc" in steps[-1]
    assert "stack-dpo completed" in p.stdout
    assert any(Path(x).name == "loss.png" for x in json.loads(cli(env, "artifacts", "stack-dpo", "--json").stdout)["plots"])
    assert "resume" in cli(env, "resume", "stack-dpo", check=2).stderr  # not on this server: usage
    assert cli(env, "logs", "stack-dpo", "-n", "5").stdout.strip()


def test_logger_config_reaches_trls_offline_loggers(cli_env, ops_service, tmp_path, monkeypatch):
    import yaml

    pytest.importorskip("mlflow", reason="mlflow(-skinny) is not installed")
    pytest.importorskip("trackio", reason="trackio is not installed")
    spec = yaml.safe_load((EXAMPLES / "sft_lora.yaml").read_text())
    spec["dataset"] = str(EXAMPLES / "data" / "reverse_instruct.jsonl")
    spec.pop("validation_dataset")
    spec["training"].update(max_steps_per_epoch=4)
    spec["training"].pop("save_steps")
    spec["logger"] = {"report_to": ["tensorboard", "mlflow", "trackio"], "project": "ops-test", "run_name": "run-a"}
    path = tmp_path / "loggers.yaml"
    path.write_text(yaml.safe_dump(spec))
    cli(cli_env, "submit", str(path), "--watch", "--job-uuid", "cli-loggers")
    run_dir = ops_service.data_dir / "runs" / "cli-loggers"
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the job's process set for itself

    mlflow = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    experiment = mlflow.get_experiment_by_name("ops-test")
    # transformers' MLflow callback ends its run with training; the final evaluation opens a second one
    (run,) = [r for r in mlflow.search_runs([experiment.experiment_id]) if r.info.run_name == "run-a"]
    assert len(mlflow.get_metric_history(run.info.run_id, "loss")) == 4
    assert any(p.is_file() for p in (run_dir / "trackio").rglob("*"))

    spec["logger"] = {"report_to": ["neptune"]}  # not installed on the training host: refused up front
    path.write_text(yaml.safe_dump(spec))
    p = cli(cli_env, "submit", str(path), "--job-uuid", "cli-loggers-2", check=2)  # a 4xx refusal
    assert "logger_config.report_to: 'neptune' needs the 'neptune' package" in p.stderr
