"""`trl-post-training` as a daily user meets it when something is wrong, through the real CLI process
against the real service: every command prints a service error as one line (status, request, field:
reason) with no traceback, and exits with the code of the outcome (providers/cli/errors.py):
0 ok / accepted, 1 failed, 2 usage error or a 4xx refusal, 3 cancelled, 4 not found.
Also `watch` on a finished job: a summary, or the whole history with --replay."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from helpers import wait_until
from operator_fixtures import (
    EXAMPLES,
    REPO_ROOT,
    cli,
    cli_command,
    long_sft_file,
)

pytestmark = pytest.mark.slow


def one_line_error(p: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The process exited with `code` and said why in exactly one line on stderr (no traceback)."""
    assert p.returncode == code, f"exit {p.returncode}, wanted {code}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip() and not x.startswith("uploaded ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_models) -> dict[str, str]:
    """Request files: each valid in shape, each refused by the service for one reason."""
    d = tmp_path_factory.mktemp("cli-errors")
    student, teacher = tiny_models["student"], tiny_models["teacher"]
    sft = yaml.safe_load((EXAMPLES / "sft_lora.yaml").read_text())
    sft.pop("validation_dataset")
    sft.pop("logger")
    sft["dataset"] = str(EXAMPLES / "data" / "reverse_instruct.jsonl")
    out = {}

    def write(name: str, data) -> None:
        (d / name).write_text(yaml.safe_dump(data))
        out[name] = str(d / name)

    write("outside_model.yaml", {**sft, "model": "/etc"})
    write("unknown_dataset.yaml", {**sft, "dataset": {"id": "no-such-dataset"}})
    write("unknown_key.yaml", {**sft, "epochs": 3})
    roles = {"student": {"model": student, "max_tokens": 8}, "teacher": {"model": teacher, "max_tokens": 8},
             "judge": {"type": "rule", "mode": "exact"}, "max_iterations": 1}
    write("enhance.yaml", roles)
    write("enhance_unknown_job.yaml", {**roles, "student": {"model": "job:no-such-job"}})
    rows = [{"input_query": "reverse: a b", "expected_answer": "b a"}]
    write("workflow_dpo_peft.yaml", {"workflow_id": "bad-wf", "rows": rows, "enhance": roles,
                                     "train": {"method": "dpo", "peft": {"method": "lora"}}})
    write("workflow_unknown_dataset.yaml", {"workflow_id": "bad-wf2", "dataset_id": "no-such-dataset",
                                            "enhance": roles})
    write("workflow_ok.yaml", {"workflow_id": "cli-accepted", "rows": rows, "enhance": roles,
                               "train": {"method": "sft", "n_epochs": 1, "max_steps_per_epoch": 1, "batch_size": 1}})
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["rows.jsonl"] = str(d / "rows.jsonl")
    heldout = [json.loads(x) for x in (EXAMPLES / "data" / "reverse_heldout.jsonl").read_text().splitlines()[:6]]
    (d / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    out["heldout.jsonl"] = str(d / "heldout.jsonl")
    pipe = yaml.safe_load((EXAMPLES / "pipeline_teacher_students.yaml").read_text())
    pipe["dataset"] = str(EXAMPLES / "data" / "reverse_prompts.parquet")
    write("pipeline_unknown_model.yaml", {**pipe, "teacher": {**pipe["teacher"], "model": "job:no-such-job"}})
    return out


# Commands that name a job (or pipeline) that does not exist: 4, "HTTP 404 Not Found", the id.
@pytest.mark.parametrize("args", [
    ["status", "no-such-job"], ["watch", "no-such-job"], ["watch", "no-such-job", "--replay"],
    ["logs", "no-such-job"], ["logs", "no-such-job", "-f"], ["cancel", "no-such-job"], ["resume", "no-such-job"],
    ["resume", "no-such-job", "--watch"], ["artifacts", "no-such-job"], ["pipeline", "status", "no-such-job"],
    ["pipeline", "status", "no-such-job", "--watch"],
], ids=" ".join)
def test_an_unknown_id_exits_4_with_one_line(cli_env, args):
    one_line_error(cli(cli_env, *args, check=None), 4, "HTTP 404 Not Found", "no-such-job")


# The service refuses the request (4xx): 2, one line with the status, the request and the field.
REFUSED = {
    "submit: model outside the allowed roots": (["submit", "{outside_model.yaml}"], "HTTP 400", "model: '/etc' is outside"),
    "submit: unknown dataset id": (["submit", "{unknown_dataset.yaml}"], "HTTP 400",
                                   "training_config.data_config.dataset_id: no dataset 'no-such-dataset'"),
    "workflow: dpo with peft": (["workflow", "{workflow_dpo_peft.yaml}"], "HTTP 400 Bad Request (POST /v1/workflows)",
                                "train.peft"),
    "workflow: unknown dataset id": (["workflow", "{workflow_unknown_dataset.yaml}"], "HTTP 400",
                                     "dataset_id: no dataset 'no-such-dataset'"),
    "enhance: unknown job as student": (["enhance", "{enhance_unknown_job.yaml}", "--rows", "{rows.jsonl}"],
                                        "HTTP 400 Bad Request (POST /v1/data-enhancement)",
                                        "config.student.model: no job 'no-such-job'"),
    "enhance: unknown dataset id": (["enhance", "{enhance.yaml}", "--dataset-id", "no-such-dataset", "--id", "e-x"],
                                    "HTTP 400", "dataset_id: no dataset 'no-such-dataset'"),
    "validate: unknown job": (["validate", "job:no-such-job", "--prompts", "{rows.jsonl}"],
                              "HTTP 400 Bad Request (POST /v1/validations)", "model: no job 'no-such-job'"),
    "export: unknown job": (["export", "job:no-such-job"], "HTTP 400 Bad Request (POST /v1/exports)",
                            "model: no job 'no-such-job'"),
    "export: bad id": (["export", "job:no-such-job", "--id", "../x"], "HTTP 400", "export_id: String should match"),
    "chat: unknown job": (["chat", "job:no-such-job", "hi"], "HTTP 400", "model: no job 'no-such-job'"),
    "pipeline run: bad id": (["pipeline", "run", str(EXAMPLES / "pipeline_teacher_students.yaml"), "--pipeline-id",
                              "../bad"], "HTTP 400", "pipeline_id: String should match"),
    "pipeline run: unknown teacher": (["pipeline", "run", "{pipeline_unknown_model.yaml}"], "HTTP 400", "teacher"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_request_exits_2_with_one_line(cli_env, files, case):
    args, *needles = REFUSED[case]
    args = [files[a[1:-1]] if a.startswith("{") else a for a in args]
    one_line_error(cli(cli_env, *args, check=None), 2, *needles)


@pytest.mark.parametrize("args", [
    ["list"], ["nodes"], ["status", "x"], ["watch", "x"], ["logs", "x"], ["cancel", "x"], ["resume", "x"],
    ["artifacts", "x"], ["pipeline", "status", "x"], ["submit", str(EXAMPLES / "sft_lora.yaml")],
    ["validate", "job:x", "--prompts", str(EXAMPLES / "data" / "reverse_heldout.jsonl")], ["export", "job:x"],
    ["chat", "job:x", "hi"],
], ids=" ".join)
def test_a_wrong_token_exits_2_with_one_line(cli_env, args):
    one_line_error(cli({**cli_env, "TRL_POST_TRAINING_TOKEN": "wrong"}, *args, check=None), 2,
                   "HTTP 401 Unauthorized", "wrong API key")


def test_usage_errors_exit_2_and_an_unreachable_server_exits_1(cli_env, files):
    one_line_error(cli(cli_env, "submit", files["unknown_key.yaml"], check=None), 2, "epochs: unknown key 'epochs'")
    one_line_error(cli(cli_env, "submit", "/nonexistent/job.yaml", check=None), 2, "/nonexistent/job.yaml")
    p = cli(cli_env, "status", check=None)  # click's own usage error
    assert p.returncode == 2 and "Missing argument" in p.stderr and "Traceback" not in p.stderr
    one_line_error(cli({**cli_env, "TRL_POST_TRAINING_URL": "http://127.0.0.1:9"}, "status", "x", check=None), 1,
                   "no post-training server at http://127.0.0.1:9")
    one_line_error(cli({**cli_env, "TRL_POST_TRAINING_URL": "http://127.0.0.1:9"}, "validate", "job:x", "--prompts",
                       files["rows.jsonl"], check=None), 1, "cannot reach the server")
    assert "Exit codes: 0 ok / accepted, 1 failed" in cli(cli_env, "--help").stdout
    assert "4 not found" in cli(cli_env, "watch", "--help").stdout


def test_workflow_no_wait_exits_0_when_accepted(cli_env, ops_service, files):
    p = cli(cli_env, "workflow", files["workflow_ok.yaml"], "--no-wait", check=0)
    assert json.loads(p.stdout)["state"] in ("scheduled", "in_progress")
    ops_service.http.post("/v1/workflows/cli-accepted/cancel").raise_for_status()
    wait_until(lambda: ops_service.http.get("/v1/workflows/cli-accepted").json()["state"] == "cancelled", 120,
               message="workflow cancelled")
    one_line_error(cli(cli_env, "workflow", files["workflow_ok.yaml"], "--no-wait", check=None), 2,
                   "HTTP 409 Conflict", "'cli-accepted' already exists")


def test_validate_zero_against_zero_exits_1(cli_env, tiny_models, files):
    """The random student against itself: 0% vs 0% on the held-out prompts is never a pass."""
    p = cli(cli_env, "validate", tiny_models["student"], "--base", tiny_models["student"], "--prompts",
            files["heldout.jsonl"], "--id", "cli-zero", "--match", "exact", "--max-new-tokens", "8", check=1)
    state = json.loads(p.stdout)
    assert state["state"] == "completed" and state["outputs"]["passed"] is False
    v = state["outputs"]["verdict"]
    assert (v["n"], v["pass_rate"], v["base_pass_rate"], v["p_value"]) == (6, 0.0, 0.0, 1.0)


def test_watch_on_a_finished_job_prints_a_summary_and_replay_prints_every_step(cli_env, ops_service):
    job = "cli-summary"
    live = cli(cli_env, "submit", str(EXAMPLES / "sft_lora.yaml"), "--watch", "--job-uuid", job).stdout.splitlines()
    steps = [x for x in live if x.startswith("step ")]
    evals = [x for x in live if x.startswith("eval at step ")]
    assert len(steps) == 16 and evals  # sft_lora.yaml evaluates every save (8 steps) on its validation set
    assert not any(" val " in x for x in steps)  # the validation loss only where it was measured
    assert "eta" not in steps[0] and "eta" in steps[1]  # an ETA once two steps give a rate

    summary = cli(cli_env, "watch", job, "--plain").stdout.splitlines()
    assert len(summary) <= 8 and not any(x.startswith("step ") for x in summary), summary
    text = "\n".join(summary)
    assert summary[0] == f"{job}: completed" and "steps        16/16" in text and "train loss" in text
    assert "val loss" in text and "(step 16" in text and "duration" in text
    assert summary[2].startswith("  loss         ") and "(first -> last logged step)" in summary[2]  # its headline
    assert f"checkpoint   {ops_service.data_dir / 'runs' / job}" in text
    assert summary[-1].startswith(f"{job} completed: final loss")

    replay = cli(cli_env, "watch", job, "--plain", "--replay").stdout.splitlines()
    # the same lines as live (the ETA may differ where the live watch did not know the total yet)
    assert [x.split("  eta")[0] for x in replay if x.startswith("step ")] == [x.split("  eta")[0] for x in steps]
    assert [x for x in replay if x.startswith("eval at")] == evals


def test_watch_on_a_cancelled_job_summarises_and_exits_3(cli_env, ops_service, tmp_path):
    path = long_sft_file(tmp_path, "cli-cancelled-summary", steps=2000)
    assert cli(cli_env, "submit", str(path)).stdout.strip() == "cli-cancelled-summary"
    wait_until(lambda: ops_service.step("cli-cancelled-summary") >= 2, 300, message="two steps")
    assert cli(cli_env, "cancel", "cli-cancelled-summary").stdout.strip() == "cli-cancelled-summary: cancelled"
    p = cli(cli_env, "watch", "cli-cancelled-summary", check=3)
    assert p.stdout.splitlines()[0] == "cli-cancelled-summary: cancelled" and "cli-cancelled-summary cancelled" in p.stderr
