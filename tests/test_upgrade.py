"""Upgrade: a data dir written by the previous released state of main (a `git worktree` of it, its service run
from there) opens with the current code. Every job record keeps its status, artifacts load, the queued job
runs, the pipeline and the registered node are still there; a data dir from a newer version is refused with
one line (issue 21)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from helpers import free_port, kill_pids, processes_mentioning, wait_for_health, wait_until
from test_faults import start_and_fail
from test_fsdp_service import Service
from test_security import sft

from providers.jobs.store import SCHEMA_VERSION

pytestmark = pytest.mark.slow  # two service starts, three short trainings

REPO_ROOT = Path(__file__).resolve().parent.parent
PREVIOUS = "b8d91f2"  # main before the job store had a schema version
ACTIVE = ("scheduled", "in_progress")
NODE_TOKEN = "upgrade-node-token-0123456789abcdef"


@pytest.fixture
def previous_release(tmp_path):
    """A checkout of PREVIOUS (a detached git worktree), removed at teardown."""
    tree = tmp_path / "previous"
    r = subprocess.run(["git", "worktree", "add", "--detach", str(tree), PREVIOUS], cwd=REPO_ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot check out {PREVIOUS}: {r.stderr.strip()}")
    try:
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO_ROOT, capture_output=True)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO_ROOT, capture_output=True)


def old_service(tree: Path, data: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """The previous release's service: its own code first on sys.path (cwd and PYTHONPATH), in its own group."""
    port = free_port()
    log = data.parent / "old-service.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "providers.remote_fsdp.service.app", "--port", str(port),
                                 "--data-dir", str(data), *extra], cwd=tree, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "PYTHONPATH": str(tree)})
    url = f"http://127.0.0.1:{port}"
    wait_for_health(url, timeout=120, proc=proc, path="/health", log_file=log)
    return proc, url


def test_a_data_dir_of_the_previous_release_opens_with_every_record_and_the_queued_job_runs(
        tmp_path, previous_release, tiny_models, toy_data):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "data"
    data.parent.mkdir(exist_ok=True)
    models = tmp_path / "models"
    gone = models / "student-copy"  # a model that disappears before its job starts: that job fails by itself
    shutil.copytree(tiny_models["student"], gone)
    (tmp_path / "node-token").write_text(NODE_TOKEN)
    extra = ["--allowed-model-root", str(models), "--allowed-model-root", str(Path(tiny_models["student"]).parent),
             "--node-token-file", str(tmp_path / "node-token")]
    proc, url = old_service(previous_release, data, extra)
    post = lambda path, **kw: requests.post(url + path, timeout=120, **kw)  # noqa: E731
    get = lambda path, **kw: requests.get(url + path, timeout=60, **kw)  # noqa: E731
    try:
        rows = "".join(json.dumps(r) + "\n" for r in toy_data["instruct"])
        assert post("/v1/datasets/toy/rows", data=rows).status_code == 200
        assert post("/v1/post-training/supervised-fine-tune", json=sft("done", tiny_models["student"])).status_code == 200
        assert post("/v1/post-training/supervised-fine-tune", json=sft("fails", str(gone))).status_code == 200
        shutil.rmtree(gone)
        wait_until(lambda: all(get("/v1/post-training/job/status", params={"job_uuid": j}).json()["status"]
                               not in ACTIVE for j in ("done", "fails")), 240, interval=0.3, message="two jobs ended")
        blocker = sft("blocker", tiny_models["student"], steps=50)
        blocker["training_config"]["n_epochs"] = 50
        assert post("/v1/post-training/supervised-fine-tune", json=blocker).status_code == 200
        for job in ("queued", "cancel-me"):  # behind the blocker (one job at a time)
            assert post("/v1/post-training/supervised-fine-tune", json=sft(job, tiny_models["student"])).status_code == 200
        assert post("/v1/post-training/job/cancel", json={"job_uuid": "cancel-me"}).status_code == 200
        pipeline = {"pipeline_id": "pipe", "rows": [{"input_query": r["input_query"]} for r in toy_data["instruct"][:8]],
                    "teacher": {"model": tiny_models["teacher"], "top_k": 4, "max_new_tokens": 4},
                    "students": [{"name": "s1", "model": tiny_models["student"], "method": "logit",
                                  "n_epochs": 1, "max_steps_per_epoch": 1}]}
        r = post("/v1/pipelines/teacher-student", json=pipeline)
        assert r.status_code == 200, r.text
        assert post("/v1/pipelines/pipe/cancel").status_code in (200, 204)
        r = post("/v1/nodes/register", headers={"x-node-token": NODE_TOKEN}, json={
            "node_id": "old-node", "url": "http://127.0.0.1:9", "capabilities": {"cpu_cores": 2, "ram_gb": 4}})
        assert r.status_code == 200, r.text
        wait_until(lambda: get("/v1/post-training/job/status", params={"job_uuid": "blocker"}).json()["status"]
                   == "in_progress", 120, message="the blocker running")
        before = {j["job_uuid"]: j["status"] for j in get("/v1/post-training/jobs").json()["data"]}
        pipelines = {p["pipeline_id"]: p["state"] for p in get("/v1/pipelines").json()["data"]}
        artifacts = get("/v1/post-training/job/artifacts", params={"job_uuid": "done"}).json()
    finally:
        # The old release stops the way a machine does (its queued job would start as a SIGTERM stops the
        # running one: that release's shutdown bug), and the running job's ranks with it.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        kill_pids([pid for pid, _ in processes_mentioning(str(data))])
    print(f"\nprevious release wrote: jobs {before}, pipelines {pipelines}")
    assert before == {"done": "completed", "fails": "failed", "blocker": "in_progress", "queued": "scheduled",
                      "cancel-me": "cancelled", "pipe-teacher": "cancelled"}  # pipe-teacher: the pipeline's task
    assert pipelines == {"pipe": "cancelled"}
    db = sqlite3.connect(data / "jobs.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0  # the previous release had no schema version
    db.close()

    svc = Service(data, extra=extra)
    try:
        after = {j["job_uuid"]: j["status"] for j in svc.get("/v1/post-training/jobs").json()["data"]}
        assert set(after) == set(before)
        for job, status in before.items():
            if job == "blocker":  # its service died under it: failed, saying so, and nothing of it left
                blocker = svc.status("blocker")
                assert blocker["status"] == "failed" and "restarted" in blocker["resources_allocated"]["error"]
            elif job != "queued":
                assert after[job] == status, (job, after[job], status)
        assert svc.status("fails")["resources_allocated"]["error"]
        assert {p["pipeline_id"]: p["state"] for p in svc.get("/v1/pipelines").json()["data"]} == pipelines
        assert "old-node" in {n["node_id"] for n in svc.get("/v1/nodes").json()["data"]}
        assert svc.wait("queued", timeout=240)["status"] == "completed"
        new_artifacts = svc.get("/v1/post-training/job/artifacts", params={"job_uuid": "done"}).json()
        assert new_artifacts == artifacts and artifacts["checkpoints"]
        for job in ("done", "queued"):
            for c in svc.get("/v1/post-training/job/artifacts", params={"job_uuid": job}).json()["checkpoints"]:
                AutoModelForCausalLM.from_pretrained(c["path"])
    finally:
        svc.stop()
        kill_pids([pid for pid, _ in processes_mentioning(str(data))])
    db = sqlite3.connect(data / "jobs.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION

    # A data dir a newer version wrote: one line, non-zero exit, nothing changed.
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    code, out = start_and_fail(data)
    last = out.strip().splitlines()[-1]
    print(f"data dir of a newer version: exit {code}: {last}")
    assert code != 0 and "Traceback" not in out, out
    assert "cannot start" in last and "newer version" in last and str(data) in last, out
