"""The `slurm` launcher: the batch script it writes (golden file), how Slurm's states become ours, and,
end to end, a real two-node Slurm cluster on this host (tests/slurm_cluster.py) running jobs that users
submit to the service: a 2-node SFT with the loss of one node, cancel, a killed rank, and a service
restart that follows its Slurm job again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import processes_mentioning, wait_until
from slurm_cluster import SlurmCluster, missing_commands
from test_fsdp_service import Service, sft_body, submit, two_node_body

from providers.launchers.base import (
    ACTIVE_STATUS,
    CANCELLED,
    FAILED,
    PENDING,
    REQUEUED,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    UNKNOWN,
    LaunchRequest,
    LaunchState,
    final_state,
)
from providers.launchers.slurm import SlurmConfig
from providers.launchers.torchrun import TorchRunOptions
from providers.launchers.slurm import failed_node, nice_of, parse_scontrol, render_sbatch, state_of
from providers.training.spec import SchedulingSpec

GOLDEN = Path(__file__).parent / "golden"
ACTIVE_STATES = ("scheduled", "in_progress")


# -- always on: what is sent to Slurm, and what its answers mean ------------------------------------------
def test_batch_script_matches_golden_file():
    opts = TorchRunOptions(nnodes=2, nproc_per_node=4, rdzv_timeout_s=90, launcher="slurm")
    scheduling = SchedulingSpec(priority=30, resources={"gpus": 4, "cpu_cores": 16, "ram_gb": 64.5})
    cfg = SlurmConfig(partition="gpu", account="ml", time_limit="24:00:00", extra_sbatch=["--exclusive"])
    script = render_sbatch("sft-7", "/mnt/shared dir/runs/sft-7", opts, scheduling, cfg, "/opt/venv/bin/python")
    expected = (GOLDEN / "slurm_2node.sbatch").read_text()
    assert script == expected, "rendered script changed; if intended, update tests/golden/slurm_2node.sbatch"
    # The script really parses as bash, and the node command keeps the path with a space in one word.
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_batch_script_defaults_ask_for_nothing_special():
    script = render_sbatch("j", "/d/runs/j", TorchRunOptions(nnodes=1, nproc_per_node=1), SchedulingSpec(),
                           SlurmConfig(), "/usr/bin/python3")
    assert "--gres" not in script and "--mem" not in script and "--partition" not in script
    assert "#SBATCH --nice=0" in script and "#SBATCH --cpus-per-task=1" in script


@pytest.mark.parametrize("config, nice_by_priority", [
    # defaults: priority 0 runs at nice 0 like every other user's job; only a lower priority is nicer
    ({}, {0: 0, 30: 0, 100: 0, -1: 1, -100: 100}),
    # the operator orders the service's own jobs below nice_base, down to 0
    ({"nice_base": 100, "min_nice": 0}, {0: 100, 30: 70, 100: 0, -100: 200}),
    # a Slurm operator account may let higher priorities go below 0
    ({"min_nice": -50}, {0: 0, 30: -30, 100: -50, -20: 20}),
])
def test_priority_maps_to_nice(config, nice_by_priority):
    cfg = SlurmConfig(**config)
    assert {p: nice_of(p, cfg) for p in nice_by_priority} == nice_by_priority
    script = render_sbatch("j", "/d/runs/j", TorchRunOptions(), SchedulingSpec(priority=30), cfg, "/usr/bin/python3")
    assert f"#SBATCH --nice={nice_by_priority[30]}\n" in script


def test_min_nice_above_nice_base_is_refused():
    with pytest.raises(ValueError, match="min_nice: 10 is above nice_base"):
        SlurmConfig(nice_base=0, min_nice=10)


SRUN_AGENT_KILLED = """=== run 1 (slurm) at 2026-12-03T10:00:00 ===
Traceback (most recent call last):
RuntimeError: [../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41234
srun: error: vm2: task 1: Killed
srun: Terminating StepId=17.0
srun: error: vm1: task 0: Exited with exit code 1
"""
SRUN_PEER_FIRST = """=== run 1 (slurm) at 2026-12-03T10:00:00 ===
srun: error: vm1: task 0: Exited with exit code 1
srun: error: vm2: task 1: Exited with exit code 1
"""


def test_a_failed_node_is_named_with_its_node_rank_and_ranks():
    assert failed_node(SRUN_AGENT_KILLED, 1) == "node vm2 (node rank 1, rank 1): Killed"
    assert failed_node(SRUN_AGENT_KILLED, 4) == "node vm2 (node rank 1, ranks 4-7): Killed"
    # a peer's task ended first, but torchrun saw rank 1 die: its node is the one named
    assert failed_node(SRUN_PEER_FIRST, 1, dead_rank=1) == "node vm2 (node rank 1, rank 1): Exited with exit code 1"
    assert failed_node("srun: error: Node failure on vm2\n", 1) == "node vm2 failed"
    assert failed_node("=== run 1\nsrun: error: vm2: task 1: Killed\n=== run 2 (slurm)\nok\n", 1) is None  # an older run's
    state, error = final_state(LaunchState(FAILED, "FAILED", "NonZeroExitCode", 1, failed_node(SRUN_AGENT_KILLED, 1)),
                               {"state": "failed", "error": "rank 0: RuntimeError: gloo Connection closed by peer"},
                               False, None, "slurm")
    assert (state, error) == ("failed", "slurm: node vm2 (node rank 1, rank 1): Killed; "
                                        "rank 0: RuntimeError: gloo Connection closed by peer")
    assert final_state(LaunchState(FAILED, "FAILED", "NonZeroExitCode", 1, "node vm2 (node rank 1, rank 1): Killed"),
                       {"state": "in_progress"}, False, None, "slurm") == (
        "failed", "slurm: node vm2 (node rank 1, rank 1): Killed; NonZeroExitCode")


@pytest.mark.parametrize("scontrol, expected", [
    ("JobId=5 JobState=PENDING Reason=Resources ExitCode=0:0", (PENDING, "PENDING", "Resources", 0)),
    ("JobId=5 JobState=RUNNING Reason=None ExitCode=0:0", (RUNNING, "RUNNING", None, 0)),
    ("JobId=5 JobState=COMPLETING Reason=None ExitCode=0:0", (RUNNING, "COMPLETING", None, 0)),
    ("JobId=5 JobState=COMPLETED Reason=None ExitCode=0:0", (SUCCEEDED, "COMPLETED", None, 0)),
    ("JobId=5 JobState=CANCELLED Reason=None ExitCode=0:15", (CANCELLED, "CANCELLED", None, 143)),
    ("JobId=5 JobState=FAILED Reason=NonZeroExitCode ExitCode=1:0", (FAILED, "FAILED", "NonZeroExitCode", 1)),
    ("JobId=5 JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15",
     (FAILED, "TIMEOUT", "the job reached its Slurm time limit (TimeLimit)", 143)),
    ("JobId=5 JobState=NODE_FAIL Reason=None ExitCode=0:0", (FAILED, "NODE_FAIL", "a node of the job failed", 0)),
    ("JobId=5 JobState=OUT_OF_MEMORY Reason=OutOfMemory ExitCode=0:125",
     (FAILED, "OUT_OF_MEMORY", "a node ran out of memory (OutOfMemory)", 253)),
    ("JobId=5 JobState=PREEMPTED Reason=None ExitCode=0:0", (FAILED, "PREEMPTED", "Slurm preempted the job", 0)),
    # suspended or put back in the queue: active, not a failure (the job keeps its retries)
    ("JobId=5 JobState=SUSPENDED Reason=None ExitCode=0:0", (SUSPENDED, "SUSPENDED", "Slurm suspended the job", 0)),
    ("JobId=5 JobState=STOPPED Reason=None ExitCode=0:0",
     (SUSPENDED, "STOPPED", "Slurm stopped the job's processes (SIGSTOP)", 0)),
    ("JobId=5 JobState=REQUEUED Reason=None ExitCode=0:0",
     (REQUEUED, "REQUEUED", "Slurm put the job back in its queue", 0)),
    ("JobId=5 JobState=PENDING Reason=BeginTime Restarts=1 ExitCode=0:0",
     (REQUEUED, "PENDING", "Slurm put the job back in its queue (restart 1) (BeginTime)", 0)),
])
def test_slurm_states_map_to_launcher_states(scontrol, expected):
    f = parse_scontrol(scontrol)
    s = state_of(f["JobState"], f["Reason"], f["ExitCode"], int(f.get("Restarts", 0)))
    assert (s.state, s.detail, s.reason, s.exit_code) == expected
    assert not s.final or s.state in (SUCCEEDED, FAILED, CANCELLED)
    if s.state in (SUSPENDED, REQUEUED):  # the job waits as `scheduled`; final_state is never asked
        assert ACTIVE_STATUS[s.state] == "scheduled"
        with pytest.raises(ValueError, match="is active"):
            final_state(s, {"state": "in_progress"}, False, None, "slurm")


def test_submit_maps_the_run_dir_to_the_nodes_mount_and_asks_for_no_requeue(tmp_path):
    """A shared dir mounted at /mnt/trl on the nodes: sbatch gets the run dir, its log and the map as the nodes
    see them; the script asks Slurm never to requeue (the JobManager retries); logs() reads the job's output."""
    from providers.launchers.slurm import SlurmLauncher
    from providers.training.path_map import PathMap
    from providers.training.run_files import RunFiles

    files = RunFiles(tmp_path / "runs" / "Job_1")
    files.logs.mkdir(parents=True)
    files.log.write_text("x" * 100 + "srun: error: vm2: task 1: Killed\n")
    calls = []

    def fake_run(argv, **kw):
        calls.append((argv, kw.get("env")))
        return subprocess.CompletedProcess(argv, 0, "42;cluster\n", "")

    launcher = SlurmLauncher(SlurmConfig(), "/usr/bin/python3", runner=fake_run, paths=PathMap({str(tmp_path): "/mnt/trl"}))
    request = LaunchRequest(job_uuid="Job_1", files=files, scheduling=SchedulingSpec(), env={"PYTHONSAFEPATH": "1"},
                            nnodes=2, nproc_per_node=1)
    assert launcher.submit(request) == "42"
    argv, env = calls[0]
    assert argv[:4] == ["sbatch", "--parsable", "--chdir=/mnt/trl/runs/Job_1", "--output=/mnt/trl/runs/Job_1/logs/train.log"]
    assert json.loads(env["TRL_PATH_MAP"]) == {str(tmp_path): "/mnt/trl"} and env["PYTHONSAFEPATH"] == "1"
    script = (files.dir / "slurm.sbatch").read_text()
    assert "#SBATCH --no-requeue\n" in script and "#SBATCH --job-name=trl-job-1-" in script  # a DNS-1123 name
    assert "providers.training.run /mnt/trl/runs/Job_1" in script and str(tmp_path) not in script
    assert launcher.logs("42", files, limit_bytes=33) == "srun: error: vm2: task 1: Killed\n"


@pytest.mark.parametrize("launch, status, cancelled, expected", [
    (LaunchState(SUCCEEDED), {"state": "completed"}, False, ("completed", None)),
    # trap 2 of the study: a scheduler's success is not the trainer's
    (LaunchState(SUCCEEDED), {"state": "in_progress"}, False,
     ("failed", "the launcher (slurm) said success, the trainer did not: its status is in_progress")),
    (LaunchState(SUCCEEDED), {}, False, ("failed", "the launcher (slurm) said success, the trainer did not: its status is missing")),
    (LaunchState(FAILED, "TIMEOUT", "the job reached its Slurm time limit"), {"state": "in_progress"}, False,
     ("failed", "slurm: the job reached its Slurm time limit")),
    (LaunchState(FAILED, "FAILED", exit_code=1), {"state": "failed", "error": "RuntimeError: gloo (rank 1)"}, False,
     ("failed", "RuntimeError: gloo (rank 1)")),
    (LaunchState(CANCELLED, "CANCELLED"), {"state": "in_progress"}, True, ("cancelled", None)),
    (LaunchState(CANCELLED, "CANCELLED"), {"state": "in_progress"}, False,
     ("cancelled", "cancelled outside this service (slurm: CANCELLED)")),
    (LaunchState(UNKNOWN, reason="Invalid job id"), {"state": "completed"}, False, ("completed", None)),
    (LaunchState(UNKNOWN, reason="Invalid job id"), {"state": "in_progress"}, False,
     ("failed", "slurm no longer knows the job (Invalid job id); its trainer status is in_progress")),
])
def test_final_state_joins_launcher_and_trainer(launch, status, cancelled, expected):
    assert final_state(launch, status, cancelled, None, "slurm") == expected


# -- end to end on a two-node Slurm cluster on this host ------------------------------------------------
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if missing_commands():
        script = Path(__file__).resolve().parent.parent / "scripts" / "install-slurm.sh"
        p = subprocess.run([str(script)], capture_output=True, text=True, timeout=900)
        if missing_commands():
            pytest.skip(f"Slurm is not installed here ({missing_commands()} missing) and scripts/install-slurm.sh "
                        f"could not install it (exit {p.returncode}): {p.stderr.strip()[-300:]}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def slurm_service(slurm, tmp_path_factory, toy_data):
    root = tmp_path_factory.mktemp("slurm-service")
    config = root / "launchers.yaml"
    # Run dirs in a shared dir apart from the service's data dir, as on a cluster with an NFS mount
    config.write_text(f"launchers:\n  enabled: [local, nodes, slurm]\n  shared_dir: {root / 'shared'}\n"
                      "  slurm: {partition: debug, poll_s: 0.3, nice_base: 100, min_nice: 0}\n")
    svc = Service(root / "data", extra=["--launchers-config", str(config)], env={"SLURM_CONF": str(slurm.conf)})
    svc.runs_dir = root / "shared" / "runs"
    rows = "".join(json.dumps(r) + "\n" for r in toy_data["instruct"])
    assert svc.post("/v1/datasets/toy/rows", data=rows).status_code == 200
    yield svc
    svc.stop()
    for pid, _ in processes_mentioning(str(svc.data_dir.parent)):  # the data dir and the shared dir
        os.kill(pid, signal.SIGKILL)


def slurm_body(job_uuid: str, model: str, steps: int = 8, epochs: int = 1) -> dict:
    return two_node_body(job_uuid, model, "slurm", steps, epochs)


def rank_pids(run_dir: str) -> dict[int, int]:
    """{global rank: pid} of the job's training processes (the ranks, not torchrun or srun)."""
    ranks = {}
    for pid, cmd in processes_mentioning(run_dir):
        if "providers.training.run" in cmd and "torch.distributed.run" not in cmd and "srun" not in cmd:
            try:
                env = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
                ranks[int(env["RANK"])] = pid
            except (OSError, KeyError, ValueError):
                continue
    return ranks


def start_long_job(svc: Service, job_uuid: str, model: str) -> str:
    """Submit a 1000-step 2-node job and return its run dir once both ranks are training."""
    submit(svc, slurm_body(job_uuid, model, steps=25, epochs=40))
    run_dir = str(svc.runs_dir / job_uuid)
    wait_until(lambda: len(rank_pids(run_dir)) == 2 and (svc.status(job_uuid)["resources_allocated"].get("step") or 0) >= 1,
               300, message="both ranks training")
    return run_dir


def slurm_state(slurm: SlurmCluster, job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=slurm.env, capture_output=True, text=True).stdout
    return parse_scontrol(out).get("JobState", "")


@pytest.mark.slow
def test_two_node_sft_on_slurm_matches_one_node(slurm, slurm_service, tiny_models):
    svc = slurm_service
    submit(svc, slurm_body("slurm-2n", tiny_models["student"]))
    one = sft_body("local-1n", tiny_models["student"], nproc=2, global_batch=8)  # the same world: 2 ranks x 4 rows
    submit(svc, one)
    two = svc.wait("slurm-2n", timeout=300)
    assert two["status"] == "completed", (two["resources_allocated"].get("error"), slurm.logs())
    res = two["resources_allocated"]
    assert res["launcher"] == "slurm" and res["external_id"].isdigit()
    assert slurm_state(slurm, res["external_id"]) == "COMPLETED"
    assert len(res["ranks"]) == 2 and res["world_size"] == 2
    # one rank per node: global ranks 0 and 1, each its node's local rank 0, each holding half the parameters
    assert [(r["rank"], r["local_rank"]) for r in res["ranks"]] == [(0, 0), (1, 0)]
    assert all(r["local_params"] * 2 == r["total_params"] for r in res["ranks"])
    assert svc.wait("local-1n", timeout=300)["status"] == "completed"
    slurm_losses, local_losses = svc.losses("slurm-2n"), svc.losses("local-1n")
    assert len(slurm_losses) == 8 and slurm_losses == pytest.approx(local_losses, abs=1e-5)
    assert slurm_losses[-1] < slurm_losses[0]
    # The batch script and its log sit in the run dir; Slurm wrote torchrun's output there.
    run_dir = svc.runs_dir / "slurm-2n"
    assert (run_dir / "slurm.sbatch").exists() and (run_dir / "logs" / "rank1.log").exists()


@pytest.mark.slow
def test_cancel_on_slurm_leaves_no_process(slurm, slurm_service, tiny_models):
    svc = slurm_service
    run_dir = start_long_job(svc, "slurm-cancel", tiny_models["student"])
    job_id = svc.status("slurm-cancel")["resources_allocated"]["external_id"]
    t0 = time.monotonic()
    r = svc.post("/v1/post-training/job/cancel", json={"job_uuid": "slurm-cancel"})
    assert r.status_code == 200
    answer = r.json()  # the job's status, as /job/status gives it (it was null)
    assert answer["job_uuid"] == "slurm-cancel" and answer["status"] == "cancelled", answer
    assert answer["resources_allocated"]["launcher"] == "slurm"
    assert svc.status("slurm-cancel")["status"] == "cancelled"
    again = svc.post("/v1/post-training/jobs/slurm-cancel/cancel")  # the later releases' path shape
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    wait_until(lambda: processes_mentioning(run_dir) == [], 5.0, interval=0.1, message="no process of the job")
    assert time.monotonic() - t0 < 5.0 + 15  # the cancel call itself returns once the record says cancelled
    assert slurm_state(slurm, job_id) == "CANCELLED"
    status_file = json.loads((Path(run_dir) / "status.json").read_text())
    assert status_file["state"] == "cancelled"  # Slurm left it in_progress; the service wrote the end


@pytest.mark.slow
def test_killed_rank_fails_the_slurm_job_with_the_reason(slurm, slurm_service, tiny_models):
    svc = slurm_service
    run_dir = start_long_job(svc, "slurm-kill", tiny_models["student"])
    os.kill(rank_pids(run_dir)[1], signal.SIGKILL)  # rank 1 runs on the second node, vm2
    t0 = time.monotonic()
    status = svc.wait("slurm-kill", timeout=10)
    assert time.monotonic() - t0 < 10
    assert status["status"] == "failed"
    error = status["resources_allocated"]["error"]
    # the node and rank first, then torchrun's root cause (not a peer's gloo error)
    assert error.startswith("slurm: node vm2 (node rank 1, rank 1): "), error
    assert "; rank 1 died: Signal 9 (SIGKILL)" in error, error
    wait_until(lambda: processes_mentioning(run_dir) == [], 10, message="no process of the failed job")


@pytest.mark.slow
def test_a_node_whose_agent_dies_with_its_rank_is_named(slurm, slurm_service, tiny_models):
    """The second node's torchrun agent and its rank die together (the node's processes gone): no root cause
    is printed, the peer fails with a gloo error; the job's error names the node and its rank first."""
    svc = slurm_service
    run_dir = start_long_job(svc, "slurm-agent-dies", tiny_models["student"])
    agents = [pid for pid, cmd in processes_mentioning(run_dir) if "torch.distributed.run" in cmd
              and "SLURM_NODEID=1" in Path(f"/proc/{pid}/environ").read_text().replace("\0", " ")]
    assert len(agents) == 1, processes_mentioning(run_dir)
    for pid in (agents[0], rank_pids(run_dir)[1]):
        os.kill(pid, signal.SIGKILL)
    status = svc.wait("slurm-agent-dies", timeout=30)
    assert status["status"] == "failed"
    error = status["resources_allocated"]["error"]
    assert error.startswith("slurm: node vm2 (node rank 1, rank 1): "), error
    wait_until(lambda: processes_mentioning(run_dir) == [], 10, message="no process of the failed job")


@pytest.mark.slow
def test_restarted_service_follows_its_slurm_job_again(slurm, slurm_service, tiny_models, tmp_path):
    svc = slurm_service
    submit(svc, slurm_body("slurm-restart", tiny_models["student"], steps=25, epochs=2))
    wait_until(lambda: svc.status("slurm-restart")["status"] == "in_progress", 300, message="job running")
    job_id = svc.status("slurm-restart")["resources_allocated"]["external_id"]
    os.kill(svc.proc.pid, signal.SIGKILL)  # the service dies; the Slurm job does not depend on it
    svc.proc.wait()
    assert slurm_state(slurm, job_id) in ("RUNNING", "COMPLETING", "COMPLETED")
    config = next(a for a in svc.proc.args if a.endswith("launchers.yaml"))
    again = Service(svc.data_dir, extra=["--launchers-config", config], env={"SLURM_CONF": str(slurm.conf)})
    again.runs_dir = svc.runs_dir
    svc.proc, svc.port, svc.url = again.proc, again.port, again.url  # the module's other tests use the new one
    status = again.wait("slurm-restart", timeout=300)
    assert status["status"] == "completed", status["resources_allocated"].get("error")
    assert status["resources_allocated"]["external_id"] == job_id  # the same Slurm job, followed again
    assert len(again.losses("slurm-restart")) == 50


@pytest.mark.slow
def test_a_request_slurm_cannot_place_fails_alone_with_slurms_reason(slurm, slurm_service, tiny_models):
    """A GPU request on a cluster without GPUs: sbatch refuses it; the job fails saying so and the
    service goes on taking jobs."""
    svc = slurm_service
    body = slurm_body("slurm-no-gpu", tiny_models["student"])
    body["training_config"]["scheduling"] = {"resources": {"gpus": 1}, "priority": 10}
    submit(svc, body)
    status = svc.wait("slurm-no-gpu", timeout=60)
    assert status["status"] == "failed"
    error = status["resources_allocated"]["error"]
    assert "sbatch refused the job" in error and "gres" in error.lower(), error
    assert "#SBATCH --gres=gpu:1" in (svc.runs_dir / "slurm-no-gpu" / "slurm.sbatch").read_text()
    assert "#SBATCH --nice=90" in (svc.runs_dir / "slurm-no-gpu" / "slurm.sbatch").read_text()
    r = svc.post("/v1/post-training/supervised-fine-tune",
                 json={**slurm_body("slurm-bad-launcher", tiny_models["student"]),
                       "training_config": {**body["training_config"], "torch_run_config": {"launcher": "ray"}}})
    assert r.status_code == 400 and "launcher" in r.text and "not enabled" in r.text


@pytest.mark.slow
def test_pipeline_teacher_and_student_run_through_slurm(slurm, slurm_service, tiny_models, toy_data):
    """A teacher-student pipeline whose teacher and one student go to Slurm and the other student runs on
    the service's own host: all three complete and the students' outputs load."""
    svc = slurm_service
    prompts = [{"input_query": r["input_query"]} for r in toy_data["instruct"][:16]]
    body = {"pipeline_id": "slurm-pipe", "rows": prompts,
            "teacher": {"model": tiny_models["teacher"], "top_k": 4, "max_new_tokens": 8, "launcher": "slurm"},
            "students": [
                {"name": "on-slurm", "model": tiny_models["student"], "max_steps_per_epoch": 3, "launcher": "slurm",
                 "scheduling": {"priority": 5}},
                {"name": "here", "model": tiny_models["student"], "max_steps_per_epoch": 3},
            ]}
    r = svc.post("/v1/pipelines/teacher-student", json=body)
    assert r.status_code == 200, r.text
    state = wait_until(lambda: (s := svc.get("/v1/pipelines/slurm-pipe").json())["state"] not in ACTIVE_STATES and s,
                       300, interval=0.5, message="pipeline finished")
    assert state["state"] == "completed", state
    jobs = {j: svc.status(j)["resources_allocated"] for j in
            ("slurm-pipe-teacher", "slurm-pipe-student-on-slurm", "slurm-pipe-student-here")}
    assert [jobs[j]["launcher"] for j in jobs] == ["slurm", "slurm", "local"]
    assert all(slurm_state(slurm, jobs[j]["external_id"]) == "COMPLETED" for j in list(jobs)[:2])
    for student in state["students"]:
        assert (Path(student["output"]) / "config.json").exists()
    bad = {**body, "pipeline_id": "ray-pipe", "teacher": {**body["teacher"], "launcher": "ray"}}
    r = svc.post("/v1/pipelines/teacher-student", json=bad)
    assert r.status_code == 400 and "teacher.launcher" in r.text, r.text


def test_a_silent_slurm_is_not_a_verdict(tmp_path):
    """While slurmctld does not answer (a restart), a job keeps its last state; only Slurm saying it does
    not know the job makes it unknown (then the trainer's status.json decides)."""
    from providers.launchers.slurm import SlurmLauncher

    answers = iter([
        (0, "JobId=7 JobState=RUNNING Reason=None ExitCode=0:0", ""),
        (1, "", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"),
        (1, "", "slurm_load_jobs error: Invalid job id specified"),
        (1, "", "sacct: error: Slurm accounting storage is disabled"),  # asked only where sacct is installed
    ])

    def fake_run(argv, **kw):
        code, out, err = next(answers)
        return subprocess.CompletedProcess(argv, code, out, err)

    launcher = SlurmLauncher(SlurmConfig(), "/usr/bin/python3", runner=fake_run)
    files = None  # poll does not read the run dir
    assert launcher.poll("7", files).state == RUNNING
    silent = launcher.poll("7", files)
    assert silent.state == RUNNING and not silent.final and "Unable to contact" in silent.reason
    forgotten = launcher.poll("7", files)
    assert forgotten.state == UNKNOWN and "Invalid job id" in forgotten.reason


@pytest.mark.slow
def test_llama_stack_client_trains_on_slurm(slurm, slurm_service, llama_stack_factory, tiny_models, toy_data, tmp_path):
    """A user of `llama stack run run_fsdp.yaml` sends DPO with the typed client's full payload, asking for
    Slurm, two nodes and a priority: it runs as a Slurm job and the preference margin grows."""
    from helpers import wait_for_job
    from measures import dpo_margin, load_causal

    server = llama_stack_factory(Path(__file__).resolve().parent.parent / "run_fsdp.yaml", tmp_path / "stack",
                                 env={"TRL_FSDP_URL": slurm_service.url, "TRL_FSDP_STACK_DIR": str(tmp_path / "stack")})
    client = server.client()
    client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": toy_data["preference"]},
                             dataset_id="prefs")
    client.post_training.preference_optimize(
        job_uuid="ls-slurm-dpo", finetuned_model=tiny_models["student"], hyperparam_search_config={}, logger_config={},
        algorithm_config={"type": "dpo", "reward_scale": 0.1, "reward_clip": 5.0, "epsilon": 0.1, "gamma": 0.99},
        training_config={
            "n_epochs": 2, "max_steps_per_epoch": 25, "dtype": "fp32",
            "data_config": {"dataset_id": "prefs", "batch_size": 4, "shuffle": True, "data_format": "instruct"},
            "optimizer_config": {"optimizer_type": "adamw", "lr": 5e-3, "weight_decay": 0.0, "num_warmup_steps": 0},
            "torch_run_config": {"nproc_per_node": 1, "nnodes": 2, "launcher": "slurm"},
            "scheduling": {"priority": 20, "max_retries": 1},
        },
    )
    status = wait_for_job(client, "ls-slurm-dpo", timeout=600)
    res = status.resources_allocated
    assert status.status == "completed", res
    assert res["launcher"] == "slurm" and slurm_state(slurm, res["external_id"]) == "COMPLETED"
    assert [(r["rank"], r["local_rank"]) for r in res["ranks"]] == [(0, 0), (1, 0)]
    assert "#SBATCH --nice=80" in (slurm_service.runs_dir / "ls-slurm-dpo" / "slurm.sbatch").read_text()
    final = client.post_training.job.artifacts(job_uuid="ls-slurm-dpo").checkpoints[-1]
    final = final if isinstance(final, dict) else final.model_dump()
    pairs = toy_data["preference"][:100]
    before, after = dpo_margin(*load_causal(tiny_models["student"]), pairs), dpo_margin(*load_causal(final["path"]), pairs)
    assert after > before + 0.5, f"margin before {before:.3f}, after {after:.3f}"


@pytest.mark.slow
def test_a_job_slurm_holds_pending_is_scheduled_with_slurms_reason(slurm, slurm_service, tiny_models):
    """While Slurm cannot start a job (its partition is down) the job is `scheduled` with Slurm's reason;
    when the partition comes back it runs and completes."""
    svc = slurm_service

    def partition(state: str) -> None:
        subprocess.run(["scontrol", "update", "PartitionName=debug", f"State={state}"], env=slurm.env, check=True)

    partition("DOWN")
    try:
        submit(svc, slurm_body("slurm-pending", tiny_models["student"]))
        res = wait_until(lambda: (r := svc.status("slurm-pending")["resources_allocated"]).get("launcher_state") and r,
                         60, message="the launcher's state in the job's status")
        status = svc.status("slurm-pending")
        assert status["status"] == "scheduled" and status["started_at"] is None
        assert res["launcher_state"] == "PENDING" and res["launcher_reason"] == "PartitionDown", res
    finally:
        partition("UP")
    done = svc.wait("slurm-pending", timeout=300)
    assert done["status"] == "completed" and done["started_at"], done["resources_allocated"].get("error")
    assert "launcher_reason" not in done["resources_allocated"]
