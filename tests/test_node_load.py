"""A node's load is the jobs running on it, while they run: `/v1/nodes` (the dashboard's nodes page),
Prometheus `trl_node_load` and placement all read it (issue 20, item 4: it stayed 0 with two jobs running)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from helpers import free_port, stop_process_group, wait_for_health, wait_until
from operator_fixtures import REPO_ROOT, TOKEN, cli, long_sft_file

pytestmark = pytest.mark.slow


def node_load(http: httpx.Client) -> tuple[int, float]:
    """(the local node's load on /v1/nodes, trl_node_load in /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    nodes = http.get("/v1/nodes").json()
    nodes = nodes.get("data", nodes) if isinstance(nodes, dict) else nodes
    assert len(nodes) == 1, nodes
    metric = [s.value for f in text_string_to_metric_families(http.get("/metrics").text) for s in f.samples
              if s.name == "trl_node_load"]
    assert len(metric) == 1
    return nodes[0]["load"], metric[0]


def test_node_load_counts_the_jobs_running_here(tmp_path, tiny_models):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "service.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "providers.remote_fsdp.service.app", "--port", str(port), "--data-dir",
             str(tmp_path / "data"), "--api-token", TOKEN, "--nproc-per-node", "1", "--max-concurrent-jobs", "2"],
            cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"TRL_POST_TRAINING_URL": url, "TRL_POST_TRAINING_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1",
           "TRL_MODELS_DIR": str(REPO_ROOT)}
    import os

    env = {**os.environ, **env}
    try:
        wait_for_health(url, timeout=120, proc=proc, path="/health", log_file=log)
        http = httpx.Client(base_url=url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=60)
        assert node_load(http) == (0, 0.0)
        jobs = ("load-a", "load-b")
        for job in jobs:
            spec = long_sft_file(tmp_path, job, steps=3000)
            spec.write_text(spec.read_text().replace("${TRL_MODELS_DIR}/student", tiny_models["student"]))
            cli(env, "submit", str(spec))

        def both_running():
            statuses = [http.get("/v1/post-training/job/status", params={"job_uuid": j}).json() for j in jobs]
            return all(s["status"] == "in_progress" and (s["resources_allocated"].get("step") or 0) >= 1
                       for s in statuses)

        wait_until(both_running, 300, interval=0.5, message="both jobs training")
        assert node_load(http) == (2, 2.0)
        cli(env, "cancel", "load-a")
        wait_until(lambda: node_load(http)[0] == 1, 60, message="load 1 after one cancel")
        assert node_load(http) == (1, 1.0)
        cli(env, "cancel", "load-b")
        wait_until(lambda: node_load(http) == (0, 0.0), 60, message="load 0 after both ended")
    finally:
        stop_process_group(proc)
