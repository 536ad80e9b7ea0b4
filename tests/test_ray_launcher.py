"""The `ray` launcher without a cluster: the Ray job request it sends (golden file), what it passes to the
ranks, how Ray's job states become ours (and the job's, joined with status.json), and its HTTP calls
against a stand-in for the Ray Jobs API."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import httpx
import pytest

from providers.launchers.base import CANCELLED, FAILED, PENDING, RUNNING, SUCCEEDED, UNKNOWN, LaunchRequest, final_state
from providers.launchers.ray import RayConfig
from providers.launchers.torchrun import TorchRunOptions
from providers.launchers import ray as ray_launcher
from providers.launchers.ray import RayLauncher, render_job_request, runtime_env_vars, state_of
from providers.training.run_files import RunFiles
from providers.training.spec import JobSpec, SchedulingSpec

GOLDEN = Path(__file__).parent / "golden"
SUBREAPER = "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"
# The job environment a service hands its launchers: its own, secrets and settings included, as a server's
# environment may be (the JobManager already drops TRL_FSDP_*; the launcher must not rely on it).
SERVICE_ENV = {
    "PATH": "/usr/bin", "HOME": "/home/svc", "PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1",
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": "/mnt/shared/hf", "HF_TOKEN": "hf_secret",
    "TRANSFORMERS_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "eth1", "TRL_FSDP_API_TOKEN": "svc-secret",
    "TRL_FSDP_LAUNCHERS_CONFIG": "/etc/trl/launchers.yaml", "RAY_AUTH_TOKEN": "ray-secret", SUBREAPER: "1",
    "RAY_ADDRESS": "http://head:8265", "WANDB_API_KEY": "wandb-secret", "AWS_SECRET_ACCESS_KEY": "aws",
}


def two_node_request() -> dict:
    opts = TorchRunOptions(nnodes=2, nproc_per_node=4, rdzv_timeout_s=90, launcher="ray")
    scheduling = SchedulingSpec(priority=30, resources={"gpus": 4, "gpu_memory_gb": 320, "cpu_cores": 16, "ram_gb": 64.5})
    return render_job_request("sft-7", "/mnt/shared dir/runs/sft-7", opts, scheduling, RayConfig(),
                              "/opt/venv/bin/python", SERVICE_ENV, suffix="a1")


def test_job_request_matches_golden_file():
    body = two_node_request()
    expected = json.loads((GOLDEN / "ray_job_2node.json").read_text())
    assert body == expected, "rendered request changed; if intended, update tests/golden/ray_job_2node.json"
    # The entry point is one shell word per argument: the run dir with a space stays whole.
    argv = shlex.split(body["entrypoint"])
    assert argv[:4] == ["/opt/venv/bin/python", "-m", "providers.remote_fsdp.ray_launch", "/mnt/shared dir/runs/sft-7"]


def test_default_request_asks_for_one_cpu_per_node_and_pins_the_driver_to_the_head():
    body = render_job_request("j", "/d/runs/j", TorchRunOptions(nnodes=1, nproc_per_node=1), SchedulingSpec(),
                              RayConfig(), "/usr/bin/python3", {})
    assert shlex.split(body["entrypoint"])[4:] == ["--nnodes", "1", "--nproc-per-node", "1", "--cpus", "1", "--gpus",
                                                   "0", "--rdzv-timeout-s", "60"]
    assert body["entrypoint_resources"] == {"node:__internal_head__": 0.001}
    assert body["runtime_env"] == {"env_vars": {"TRL_SHARED_RUN_DIR": "1"}}
    assert body["metadata"] == {"job_uuid": "j", "service": "trl-fsdp"}  # priority 0: nothing to say
    # every submission of a job (retries, resumes) gets its own id
    again = render_job_request("j", "/d/runs/j", TorchRunOptions(nnodes=1, nproc_per_node=1), SchedulingSpec(),
                               RayConfig(), "/usr/bin/python3", {})
    assert body["submission_id"].startswith("trl-j-") and body["submission_id"] != again["submission_id"]


def test_no_secret_no_service_setting_and_no_ray_flag_reaches_the_ranks():
    passed = runtime_env_vars(SERVICE_ENV)
    assert not [k for k in passed if k.startswith(("TRL_FSDP_", "RAY_"))]
    assert SUBREAPER not in passed  # the study's trap: it makes Ray report failed jobs as SUCCEEDED
    assert not {"HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "PATH", "HOME"} & set(passed)
    assert passed == {"GLOO_SOCKET_IFNAME": "eth1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": "/mnt/shared/hf",
                      "HF_HUB_OFFLINE": "1", "PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1",
                      "TRANSFORMERS_OFFLINE": "1", "TRL_SHARED_RUN_DIR": "1"}
    assert two_node_request()["runtime_env"]["env_vars"] == passed


FAILED_MESSAGE = ("Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
                  + "".join(f"log line {i}\n" for i in range(100)) + "node 1 (10.0.0.2) failed: torchrun exited with code 1\n"
                  "exit code 1\n")


@pytest.mark.parametrize("details, expected", [
    ({"status": "PENDING", "message": "Job has not started yet. It may be waiting for resources."},
     (PENDING, "PENDING", "Job has not started yet. It may be waiting for resources.", None)),
    ({"status": "RUNNING", "message": "Job is currently running."}, (RUNNING, "RUNNING", None, None)),
    ({"status": "SUCCEEDED", "message": "Job finished successfully.", "driver_exit_code": 0},
     (SUCCEEDED, "SUCCEEDED", None, 0)),
    ({"status": "STOPPED", "message": "Job was intentionally stopped."},
     (CANCELLED, "STOPPED", "Job was intentionally stopped.", None)),
    ({"status": "FAILED", "message": FAILED_MESSAGE, "error_type": "JOB_ENTRYPOINT_COMMAND_ERROR", "driver_exit_code": 1},
     (FAILED, "FAILED", ("Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
                         "log line 96\nlog line 97\nlog line 98\nlog line 99\n"
                         "node 1 (10.0.0.2) failed: torchrun exited with code 1\nexit code 1"), 1)),
    ({"status": "FAILED", "message": "", "error_type": "JOB_SUPERVISOR_ACTOR_UNSCHEDULABLE"},
     (FAILED, "FAILED", "JOB_SUPERVISOR_ACTOR_UNSCHEDULABLE", None)),
    ({"status": "SOMETHING_NEW"}, (RUNNING, "SOMETHING_NEW", None, None)),  # a later Ray's new active state
    ({}, (UNKNOWN, None, None, None)),
])
def test_ray_states_map_to_launcher_states(details, expected):
    s = state_of(details)
    assert (s.state, s.detail, s.reason, s.exit_code) == expected


@pytest.mark.parametrize("details, status, cancelled, expected", [
    ({"status": "SUCCEEDED", "driver_exit_code": 0}, {"state": "completed"}, False, ("completed", None)),
    # trap 2 of the study: with the subreaper flag Ray reports a failed job SUCCEEDED; the trainer decides
    ({"status": "SUCCEEDED", "driver_exit_code": 0}, {"state": "in_progress"}, False,
     ("failed", "the launcher (ray) said success, the trainer did not: its status is in_progress")),
    ({"status": "SUCCEEDED"}, {"state": "failed", "error": "RuntimeError: gloo (rank 1)"}, False,
     ("failed", "the launcher (ray) said success, the trainer did not: its status is failed (RuntimeError: gloo (rank 1))")),
    ({"status": "FAILED", "message": "Job entrypoint command failed with exit code 1", "driver_exit_code": 1},
     {"state": "failed", "error": "rank 1 died: Signal 9 (SIGKILL)"}, False, ("failed", "rank 1 died: Signal 9 (SIGKILL)")),
    ({"status": "FAILED", "message": "Job entrypoint command failed with exit code 1", "driver_exit_code": 1},
     {"state": "in_progress"}, False, ("failed", "ray: Job entrypoint command failed with exit code 1")),
    ({"status": "STOPPED", "message": "Job was intentionally stopped."}, {"state": "in_progress"}, True, ("cancelled", None)),
    ({"status": "STOPPED", "message": "Job was intentionally stopped."}, {"state": "in_progress"}, False,
     ("cancelled", "cancelled outside this service (ray: Job was intentionally stopped.)")),
])
def test_final_state_joins_ray_and_the_trainer(details, status, cancelled, expected):
    assert final_state(state_of(details), status, cancelled, None, "ray") == expected


# -- the HTTP calls, against a stand-in Jobs API ---------------------------------------------------------
class FakeJobsApi:
    """Answers like Ray's dashboard: POST /api/jobs/, GET /api/jobs/{id}, POST /api/jobs/{id}/stop, and
    GET /api/jobs/{id}/logs once `logs` is set."""

    def __init__(self):
        self.requests: list[httpx.Request] = []
        self.jobs: dict[str, dict] = {}
        self.down = False
        self.logs: str | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        if request.method == "POST" and path == "/api/jobs/":
            body = json.loads(request.content)
            self.jobs[body["submission_id"]] = {"status": "PENDING", "message": "Job has not started yet."}
            return httpx.Response(200, json={"job_id": body["submission_id"], "submission_id": body["submission_id"]})
        if path.endswith("/logs"):
            return httpx.Response(200, json={"logs": self.logs}) if self.logs is not None else httpx.Response(404)
        job_id = path.removeprefix("/api/jobs/").removesuffix("/stop")
        if job_id not in self.jobs:
            return httpx.Response(404, text=f"Job {job_id} does not exist")
        if path.endswith("/stop"):
            self.jobs[job_id] = {"status": "STOPPED", "message": "Job was intentionally stopped."}
            return httpx.Response(200, json={"stopped": True})
        return httpx.Response(200, json={"submission_id": job_id, **self.jobs[job_id]})


@pytest.fixture
def job(tmp_path) -> tuple[JobSpec, RunFiles]:
    files = RunFiles(tmp_path / "runs" / "job-1")
    files.logs.mkdir(parents=True)
    (files.dir / "torchrun.json").write_text(TorchRunOptions(nnodes=2, nproc_per_node=1, launcher="ray").model_dump_json())
    return JobSpec.model_construct(job_uuid="job-1", scheduling=SchedulingSpec(priority=3)), files


def test_launcher_submits_polls_and_stops_through_the_jobs_api(job, monkeypatch):
    spec, run_files = job
    api = FakeJobsApi()
    monkeypatch.setenv("TEST_RAY_TOKEN", "tok-123")
    launcher = RayLauncher(RayConfig(address="http://head:8265/", token_env="TEST_RAY_TOKEN"), "/opt/venv/bin/python",
                           transport=httpx.MockTransport(api))
    job_id = launcher.submit(LaunchRequest.of(spec, run_files, ["ignored"], SERVICE_ENV))
    sent = json.loads(api.requests[0].content)
    assert job_id == sent["submission_id"] and job_id.startswith("trl-job-1-")
    assert api.requests[0].headers["authorization"] == "Bearer tok-123"
    assert sent["metadata"]["priority"] == "3 (not applied: Ray has no job priority)"
    assert "ray-secret" not in api.requests[0].content.decode()  # the token goes in the header only
    assert json.loads((run_files.dir / "ray_job.json").read_text()) == sent  # kept with the job's files
    assert launcher.poll(job_id, run_files).state == PENDING
    api.jobs[job_id] = {"status": "RUNNING", "message": "Job is currently running."}
    assert launcher.poll(job_id, run_files).state == RUNNING
    launcher.cancel(job_id)
    assert api.requests[-1].method == "POST" and api.requests[-1].url.path == f"/api/jobs/{job_id}/stop"
    assert launcher.poll(job_id, run_files).state == CANCELLED
    # A job Ray does not know is unknown: the trainer's status.json decides; it is still followed after a restart.
    gone = launcher.poll("trl-job-1-gone", run_files)
    assert gone.state == UNKNOWN and "404" in gone.reason
    assert launcher.alive("trl-job-1-gone", run_files)


def test_unreachable_api_keeps_the_last_state_then_gives_up(job, monkeypatch):
    spec, run_files = job
    api = FakeJobsApi()
    launcher = RayLauncher(RayConfig(token_env=None), "/usr/bin/python3", transport=httpx.MockTransport(api))
    job_id = launcher.submit(LaunchRequest.of(spec, run_files, [], {}))
    api.jobs[job_id] = {"status": "RUNNING"}
    assert launcher.poll(job_id, run_files).state == RUNNING
    assert "authorization" not in api.requests[0].headers
    api.down = True
    blip = launcher.poll(job_id, run_files)
    assert blip.state == RUNNING and "unreachable" in blip.reason  # a head restarting is not the job's end
    monkeypatch.setattr(launcher.last_known, "give_up_s", 0.0)
    gone = launcher.poll(job_id, run_files)
    assert gone.state == UNKNOWN and "unreachable" in gone.reason
    api.down = False
    assert launcher.poll(job_id, run_files).state == RUNNING


def test_the_nodes_mount_and_the_driver_log(job):
    """A shared dir the Ray nodes mount elsewhere: the driver gets the run dir as they see it and the ranks the
    map (TRL_PATH_MAP); logs() is the driver's log from the Jobs API, else the job's log in the run dir."""
    from providers.training.path_map import PathMap

    spec, run_files = job
    api = FakeJobsApi()
    host_root = str(run_files.dir.parent.parent)
    launcher = RayLauncher(RayConfig(token_env=None), "/usr/bin/python3", transport=httpx.MockTransport(api),
                           paths=PathMap({host_root: "/mnt/shared"}))
    job_id = launcher.submit(LaunchRequest.of(spec, run_files, [], {}))
    sent = json.loads(api.requests[0].content)
    assert "/mnt/shared/runs/job-1 " in sent["entrypoint"] and host_root not in sent["entrypoint"]
    assert json.loads(sent["runtime_env"]["env_vars"]["TRL_PATH_MAP"]) == {host_root: "/mnt/shared"}
    run_files.log.write_text("from the run dir\n")
    assert launcher.logs(job_id, run_files) == "from the run dir\n"  # the fake API has no logs route: 404
    api.logs = "driver: placement group ready\n"
    assert launcher.logs(job_id, run_files) == "driver: placement group ready\n"


def test_refused_submission_names_rays_answer(job):
    spec, run_files = job
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, text="Job with submission_id trl-job-1-x already exists")

    launcher = RayLauncher(RayConfig(), "/usr/bin/python3", transport=httpx.MockTransport(refuse))
    with pytest.raises(ray_launcher.RayError, match="Ray refused the job \\(HTTP 400\\): Job with submission_id"):
        launcher.submit(LaunchRequest.of(spec, run_files, [], {}))


def test_cluster_side_torchrun_command():
    """The command each node's actor runs: the static rendezvous with the actor's index as node rank, the
    store on node 0's address (bound there only), no restarts."""
    ray_launch = pytest.importorskip("providers.remote_fsdp.ray_launch", reason="ray is not installed (pip install -e '.[ray]')")
    args = ray_launch.argparse.Namespace(nnodes=2, nproc_per_node=4, run_dir="/mnt/s/runs/j", rdzv_timeout_s=90)
    argv = ray_launch.torchrun_argv(args, 1, "10.0.0.1:29400")
    assert argv[1:] == ["-m", "providers.training.bound_store", "-m", "torch.distributed.run", "--nnodes=2",
                        "--nproc_per_node=4", "--rdzv_id=j-29400", "--rdzv_backend=static-bound",
                        "--rdzv_endpoint=10.0.0.1:29400", "--rdzv_conf=rank=1,timeout=90", "--max_restarts=0",
                        "-m", "providers.training.run", "/mnt/s/runs/j"]
    assert "--rdzv_conf=rank=0,timeout=90" in ray_launch.torchrun_argv(args, 0, "10.0.0.1:29400")
