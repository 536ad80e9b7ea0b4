"""The `ray` launcher end to end: a two-node Ray cluster on this host (a head and a worker raylet, both on
127.0.0.1) runs the jobs users submit to the service: a 2-node SFT with the loss of one local node,
cancel, a killed rank, and a service restart that follows its Ray job again. About 2 minutes on 2 CPU
cores, after ~15 s of cluster start; the cluster idles at about 1.3 GB."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from helpers import free_port, processes_mentioning, wait_until
from test_fsdp_service import Service, sft_body, submit, two_node_body

pytestmark = pytest.mark.slow

SUBREAPER = "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"
# `ray start` for a node on 127.0.0.1. Ray turns a loopback --node-ip-address into the host's routable
# address; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (in the cluster's environment) keeps every Ray process on
# loopback, and these two patches let the worker's `ray start` join such a head.
RAY_START = ("import sys, ray._private.ray_constants as c, ray._private.services as s; c.ENABLE_RAY_CLUSTER = True; "
             "s.resolve_ip_for_localhost = lambda h: h; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")


class RayCluster:
    """A head and one worker node, each a `ray start` whose daemons stay in its process group; stopped
    by signalling those groups (never `ray stop`, which stops every Ray process of the user)."""

    def __init__(self, root: Path):
        # Ray's unix sockets live under the temp dir and must stay under 107 characters.
        self.temp_dir = root if len(str(root)) <= 40 else Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.own_temp_dir = self.temp_dir != root
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.groups: list[int] = []
        self.log = root / "ray-start.log"
        # The cluster's own environment: none of the service's settings, no Ray flags of the caller's.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TRL_FSDP_"))}
        self.env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        # Token authentication on, as on a cluster anyone else can reach: the service must send the token.
        self.token = secrets.token_hex(16)
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        self.headers = {"Authorization": f"Bearer {self.token}"}

    def _ray_start(self, *args: str) -> None:
        ports = (f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}")
        base = 10000 + (os.getpid() % 40) * 400 + len(self.groups) * 200  # each raylet its own worker ports
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", RAY_START, "start", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                 "--disable-usage-stats", *ports, f"--min-worker-port={base}", f"--max-worker-port={base + 199}", *args],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.groups.append(proc.pid)
        if proc.wait(timeout=120) != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{self.log.read_text()[-3000:]}")

    def start(self) -> None:
        t0 = time.monotonic()
        self._ray_start("--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
                        f"--temp-dir={self.temp_dir}")
        self._ray_start(f"--address=127.0.0.1:{self.gcs_port}", '--resources={"worker_node": 1}')
        wait_until(lambda: len(self.nodes()) == 2, 60, interval=0.5, message="two Ray nodes alive")
        self.start_s = time.monotonic() - t0

    def nodes(self) -> list[dict]:
        try:
            r = httpx.get(f"{self.address}/nodes?view=summary", headers=self.headers, timeout=10)
            return [n["raylet"] for n in r.json()["data"]["summary"] if n["raylet"]["state"] == "ALIVE"]
        except (httpx.HTTPError, ValueError, KeyError):
            return []

    def job(self, submission_id: str) -> dict:
        return httpx.get(f"{self.address}/api/jobs/{submission_id}", headers=self.headers, timeout=30).json()

    def actors(self, ray_job_id: str, class_name: str) -> list[dict]:
        r = httpx.get(f"{self.address}/api/v0/actors", params={"limit": 1000, "detail": "true"}, headers=self.headers,
                      timeout=30)
        return [a for a in r.json()["data"]["result"]["result"]
                if a["job_id"] == ray_job_id and a["class_name"] == class_name]

    def processes(self) -> list[int]:
        return [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if _pgid(pid) in self.groups]

    def rss_mb(self) -> float:
        total = 0
        for pid in self.processes():
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, IndexError, ValueError):
                continue
        return total / 2**20

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for pgid in self.groups:
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.1)
        for pid, _ in processes_mentioning(str(self.temp_dir)):
            os.kill(pid, signal.SIGKILL)
        if self.own_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _pgid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]' (ray[default]==2.60.*)")
    pytest.importorskip("ray.dashboard.optional_deps", reason="the Ray Jobs API needs ray[default]: pip install -e '.[ray]'")
    cluster = RayCluster(tmp_path_factory.mktemp("ray"))
    try:
        cluster.start()
        time.sleep(2)
        print(f"\nRay cluster: 2 nodes up in {cluster.start_s:.1f} s; {len(cluster.processes())} processes, "
              f"{cluster.rss_mb():.0f} MB RSS idle")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def ray_service(ray_cluster, tmp_path_factory, toy_data, tiny_models):
    root = tmp_path_factory.mktemp("ray-service")
    config = root / "launchers.yaml"
    config.write_text(f"launchers:\n  enabled: [local, ray]\n"
                      f"  ray: {{address: '{ray_cluster.address}', token_env: TEST_RAY_TOKEN, poll_s: 0.3}}\n")
    svc = Service(root / "data", extra=["--launchers-config", str(config), "--nproc-per-node", "1"],
                  env={"TEST_RAY_TOKEN": ray_cluster.token})
    try:
        rows = "".join(json.dumps(r) + "\n" for r in toy_data["instruct"])
        assert svc.post("/v1/datasets/toy/rows", data=rows).status_code == 200
        yield svc
    finally:
        svc.stop()
        for pid, _ in processes_mentioning(str(svc.data_dir)):  # drivers, torchruns, ranks of unfinished jobs
            os.kill(pid, signal.SIGKILL)


def ray_body(job_uuid: str, model: str, steps: int = 8, epochs: int = 1) -> dict:
    return two_node_body(job_uuid, model, "ray", steps, epochs)


def rank_envs(run_dir: str) -> dict[int, tuple[int, dict[str, str]]]:
    """{global rank: (pid, environment)} of the job's training processes (not the driver or torchrun)."""
    ranks = {}
    for pid, cmd in processes_mentioning(run_dir):
        if "providers.training.run" in cmd and "torch.distributed.run" not in cmd and "ray_launch" not in cmd:
            try:
                env = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
                ranks[int(env["RANK"])] = (pid, env)
            except (OSError, KeyError, ValueError):
                continue
    return ranks


def start_long_job(svc: Service, job_uuid: str, model: str) -> str:
    """Submit a 1000-step 2-node job and return its run dir once both ranks are training."""
    submit(svc, ray_body(job_uuid, model, steps=25, epochs=40))
    run_dir = str(svc.data_dir / "runs" / job_uuid)
    wait_until(lambda: len(rank_envs(run_dir)) == 2 and (svc.status(job_uuid)["resources_allocated"].get("step") or 0) >= 1,
               300, message="both ranks training")
    return run_dir


def test_two_ray_nodes_train_like_one_local_node(ray_cluster, ray_service, tiny_models):
    svc = ray_service
    t0 = time.monotonic()
    submit(svc, ray_body("ray-2n", tiny_models["student"]))
    two = svc.wait("ray-2n", timeout=300)
    ray_s = time.monotonic() - t0
    assert two["status"] == "completed", two["resources_allocated"].get("error")
    t0 = time.monotonic()
    submit(svc, sft_body("local-1n", tiny_models["student"], nproc=2, global_batch=8))  # the same world: 2 ranks x 4 rows
    assert svc.wait("local-1n", timeout=300)["status"] == "completed"
    local_s = time.monotonic() - t0
    res = two["resources_allocated"]
    assert res["launcher"] == "ray" and res["external_id"].startswith("trl-ray-2n-") and res["world_size"] == 2
    assert [(r["rank"], r["local_rank"]) for r in res["ranks"]] == [(0, 0), (1, 0)]
    assert all(r["local_params"] * 2 == r["total_params"] for r in res["ranks"])
    ray_losses, local_losses = svc.losses("ray-2n"), svc.losses("local-1n")
    assert len(ray_losses) == 8 and ray_losses == local_losses  # bit for bit: the same ranks, the same batches
    assert ray_losses[-1] < ray_losses[0]
    print(f"\n2 Ray nodes: submit -> completed {ray_s:.1f} s; 1 local node (2 ranks): {local_s:.1f} s; "
          f"final loss {ray_losses[-1]!r} both")
    assert httpx.get(f"{ray_cluster.address}/api/jobs/", timeout=10).status_code == 401  # the service sent the token
    # On the cluster: the driver ran on the head; one actor (one torchrun) on each node.
    job = ray_cluster.job(res["external_id"])
    assert job["status"] == "SUCCEEDED" and job["metadata"]["job_uuid"] == "ray-2n"
    head = next(n["nodeId"] for n in ray_cluster.nodes() if n["isHeadNode"])
    assert job["driver_node_id"] == head
    runners = ray_cluster.actors(job["job_id"], "NodeRunner")
    assert len({a["node_id"] for a in runners}) == 2, runners
    env_vars = job["runtime_env"]["env_vars"]
    assert env_vars["TRL_SHARED_RUN_DIR"] == "1" and not [k for k in env_vars if k.startswith(("TRL_FSDP_", "RAY_"))]
    logs = (svc.data_dir / "runs" / "ray-2n" / "logs")
    assert (logs / "rank0.log").exists() and (logs / "rank1.log").exists() and (logs / "train.log").exists()
    assert json.loads((logs.parent / "ray_job.json").read_text())["submission_id"] == res["external_id"]


def test_cancel_on_ray_leaves_no_process(ray_cluster, ray_service, tiny_models):
    svc = ray_service
    run_dir = start_long_job(svc, "ray-cancel", tiny_models["student"])
    ranks = rank_envs(run_dir)
    for _, env in ranks.values():  # what the ranks got: the shared-dir marker; nothing of the service's
        assert env["TRL_SHARED_RUN_DIR"] == "1" and SUBREAPER not in env and "TEST_RAY_TOKEN" not in env
        assert not [k for k in env if k.startswith("TRL_FSDP_")]
    job_id = svc.status("ray-cancel")["resources_allocated"]["external_id"]
    t0 = time.monotonic()
    assert svc.post("/v1/post-training/job/cancel", json={"job_uuid": "ray-cancel"}).status_code == 200
    cancel_s = time.monotonic() - t0
    assert svc.status("ray-cancel")["status"] == "cancelled"
    wait_until(lambda: processes_mentioning(run_dir) == [], 5.0, interval=0.1, message="no process of the job")
    print(f"\ncancel: answered in {cancel_s:.1f} s, no process left {time.monotonic() - t0:.1f} s after the request")
    assert ray_cluster.job(job_id)["status"] == "STOPPED"
    assert json.loads((Path(run_dir) / "status.json").read_text())["state"] == "cancelled"


def test_killed_rank_fails_the_ray_job_with_the_reason(ray_cluster, ray_service, tiny_models):
    svc = ray_service
    run_dir = start_long_job(svc, "ray-kill", tiny_models["student"])
    job_id = svc.status("ray-kill")["resources_allocated"]["external_id"]
    os.kill(rank_envs(run_dir)[1][0], signal.SIGKILL)
    t0 = time.monotonic()
    status = svc.wait("ray-kill", timeout=10)
    failed_s = time.monotonic() - t0
    assert status["status"] == "failed"
    error = status["resources_allocated"]["error"]
    assert error.startswith("rank 1 died: Signal 9 (SIGKILL)"), error  # the root cause, not the peer's gloo error
    wait_until(lambda: processes_mentioning(run_dir) == [], 10, message="no process of the failed job")
    print(f"\nkilled rank: job failed {failed_s:.1f} s after the kill, no process left after "
          f"{time.monotonic() - t0:.1f} s")
    ray_job = ray_cluster.job(job_id)
    assert ray_job["status"] == "FAILED" and ray_job["driver_exit_code"] != 0


def test_restarted_service_follows_its_ray_job_again(ray_cluster, ray_service, tiny_models):
    svc = ray_service
    submit(svc, ray_body("ray-restart", tiny_models["student"], steps=25, epochs=20))
    wait_until(lambda: (svc.status("ray-restart")["resources_allocated"].get("step") or 0) >= 1, 300, message="training")
    job_id = svc.status("ray-restart")["resources_allocated"]["external_id"]
    os.kill(svc.proc.pid, signal.SIGKILL)  # the service dies; the Ray job does not depend on it
    svc.proc.wait()
    t0 = time.monotonic()
    assert ray_cluster.job(job_id)["status"] == "RUNNING"
    config = next(a for a in svc.proc.args if a.endswith("launchers.yaml"))
    again = Service(svc.data_dir, port=svc.port, extra=["--launchers-config", config, "--nproc-per-node", "1"],
                    env={"TEST_RAY_TOKEN": ray_cluster.token})
    svc.proc = again.proc  # the fixture stops the new one
    back_s = time.monotonic() - t0
    status = again.wait("ray-restart", timeout=300)
    assert status["status"] == "completed", status["resources_allocated"].get("error")
    assert status["resources_allocated"]["external_id"] == job_id  # the same Ray job, followed again
    assert status["resources_allocated"].get("attempts", 1) == 1
    assert len(again.losses("ray-restart")) == 500
    print(f"\nrestart: service back in {back_s:.1f} s, job completed {time.monotonic() - t0:.1f} s after the kill")
