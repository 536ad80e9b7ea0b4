"""Resource requests, priorities and retries on the training service's `nodes` launcher.

A real coordinator service, with worker nodes that this test process plays (they register and send
heartbeats like a worker, and answer the routes a coordinator calls, recording what they are sent and
running nothing): which nodes a job lands on, a job that waits for a node that fits (across a restart of
the coordinator), priorities, requests no node can meet, pipeline tasks that wait; and one real job that
fails once and is retried from its checkpoint."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from helpers import free_port, is_rank_agent, processes_mentioning, stop_process_group, wait_for_health, wait_until

from providers.remote_fsdp.service.nodes import (
    Capabilities,
    Gpu,
    Heartbeat,
    Node,
    NodeRegistry,
    Registration,
    misfit,
)
from providers.remote_fsdp.service.security import NODE_TOKEN_HEADER
from providers.training.spec import ResourceRequest

REPO_ROOT = Path(__file__).resolve().parent.parent
ACTIVE = ("scheduled", "in_progress")
NODE_TOKEN = "test-node-token-" + uuid.uuid4().hex


# -- the placement rule itself ---------------------------------------------------------------------
def test_fitting_nodes_are_the_ones_with_every_requested_resource(tmp_path):
    local = Node(node_id="coord", url="http://127.0.0.1:1", capabilities=Capabilities(cpu_cores=8, ram_gb=32))
    registry = NodeRegistry(tmp_path / "nodes.json", local, down_after_s=60)
    registry.answering()  # the service answers (its nodes are judged from now)
    for node_id, gpus, cores, ram in (("one-small-gpu", [8], 16, 64), ("two-big-gpus", [24, 24], 32, 128),
                                      ("cpu-box", [], 64, 256)):
        caps = Capabilities(cpu_cores=cores, ram_gb=ram, gpus=[Gpu(name="g", memory_gb=m) for m in gpus])
        registry.register(Registration(node_id=node_id, url=f"http://127.0.0.1:{cores}", capabilities=caps))

    def fitting(**request) -> list[str]:
        return [n.node_id for n in registry.fitting(ResourceRequest(**request))]

    assert fitting() == ["coord", "one-small-gpu", "two-big-gpus", "cpu-box"]  # no request: every live node
    assert fitting(gpus=1) == ["one-small-gpu", "two-big-gpus"]
    assert fitting(gpus=1, gpu_memory_gb=16) == ["two-big-gpus"]
    assert fitting(gpu_memory_gb=48) == ["two-big-gpus"]  # GPU memory counts over the node's GPUs
    assert fitting(cpu_cores=20, ram_gb=100) == ["two-big-gpus", "cpu-box"]
    assert fitting(ram_gb=1000) == []
    registry.heartbeat("two-big-gpus", Heartbeat(load=3))
    assert fitting(cpu_cores=20) == ["cpu-box", "two-big-gpus"]  # least loaded first
    assert misfit(registry.get("one-small-gpu").capabilities, ResourceRequest(gpus=2, gpu_memory_gb=16)) == \
        "1 GPUs (needs 2), 8 GB GPU memory (needs 16)"
    registry.down_after_s = 0  # every worker misses its heartbeats: down, but still registered
    assert fitting(gpus=1) == []
    assert [n.node_id for n in registry.fitting(ResourceRequest(gpus=1), live_only=False)] == \
        ["one-small-gpu", "two-big-gpus"]
    assert registry.largest() == "2 GPUs, 48 GB GPU memory, 64 CPU cores, 256 GB RAM"


# -- a coordinator and the workers this test plays -------------------------------------------------
class Coordinator:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        secret = self.data_dir.parent / "node-token"
        secret.write_text(NODE_TOKEN)
        with open(self.data_dir.parent / "coordinator.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "providers.remote_fsdp.service.app", "--port", str(self.port), "--data-dir",
                 str(self.data_dir), "--node-id", "coord", "--node-token-file", str(secret), "--down-after-s", "2",
                 "--max-concurrent-jobs", "1"],
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_for_health(self.url, timeout=120, proc=self.proc, path="/health",
                        log_file=self.data_dir.parent / "coordinator.log")

    def stop(self) -> None:
        stop_process_group(self.proc)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=60, **kw)

    def status(self, job_uuid: str) -> dict:
        r = requests.get(self.url + "/v1/post-training/job/status", params={"job_uuid": job_uuid}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def states(self) -> dict[str, str]:
        return {n["node_id"]: n["state"] for n in requests.get(self.url + "/v1/nodes", timeout=10).json()["data"]}

    def ram_gb(self) -> float:
        nodes = requests.get(self.url + "/v1/nodes", timeout=10).json()["data"]
        return next(n["capabilities"]["ram_gb"] for n in nodes if n["node_id"] == "coord")


class Worker:
    """A worker node played by this test: registers, sends heartbeats while `up`, and answers the routes a
    coordinator calls (parts, datasets, student tasks, status, cancel) by recording what it is sent."""

    def __init__(self, coordinator: Coordinator, node_id: str, ram_gb: float):
        self.coordinator, self.node_id, self.ram_gb = coordinator, node_id, ram_gb
        self.received: list[tuple[str, dict]] = []  # (path, JSON body) of every POST, in order
        self.jobs: dict[str, str] = {}  # job_uuid -> status
        self.beating = threading.Event()
        self.closed = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        threading.Thread(target=self._beat, daemon=True).start()

    def register(self) -> None:
        caps = {"cpu_cores": 2, "ram_gb": self.ram_gb, "gpus": [], "models": [], "address": "127.0.0.1"}
        r = requests.post(self.coordinator.url + "/v1/nodes/register", headers={NODE_TOKEN_HEADER: NODE_TOKEN},
                          json={"node_id": self.node_id, "url": self.url, "capabilities": caps}, timeout=10)
        assert r.status_code == 200, r.text

    def up(self) -> None:
        self.beating.set()
        wait_until(lambda: self.coordinator.states().get(self.node_id) == "up", 30, message=f"{self.node_id} up")

    def down(self) -> None:
        self.beating.clear()
        wait_until(lambda: self.coordinator.states().get(self.node_id) == "down", 30,
                   message=f"{self.node_id} down")

    def _beat(self) -> None:
        while not self.closed.wait(0.3):
            if self.beating.is_set():
                try:
                    requests.post(f"{self.coordinator.url}/v1/nodes/{self.node_id}/heartbeat", json={"load": 0},
                                  headers={NODE_TOKEN_HEADER: NODE_TOKEN}, timeout=5)
                except requests.RequestException:
                    pass  # the coordinator restarts

    def forget(self) -> None:
        """Forget what earlier tests sent."""
        self.received.clear()
        self.jobs.clear()

    def paths(self, prefix: str) -> list[tuple[str, dict]]:
        return [(p, b) for p, b in self.received if p.startswith(prefix)]

    def close(self) -> None:
        self.closed.set()
        self.server.shutdown()

    def _handler(self):
        worker = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("transfer-encoding", ""):
                    data = b""
                    while size := int(self.rfile.readline().strip(), 16):
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return data
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def _answer(self, code: int, value) -> None:
                data = json.dumps(value).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):  # teacher outputs for remote students
                self._body()
                self._answer(200, {})

            def do_POST(self):
                raw = self._body()
                path = urlsplit(self.path).path
                body = json.loads(raw) if raw and not path.startswith("/v1/datasets/") else {}
                worker.received.append((path, body))
                if path.startswith("/v1/post-training/parts/"):
                    worker.jobs[body["job_uuid"]] = "in_progress"
                    return self._answer(200, {"job_uuid": body["job_uuid"]})
                if path == "/v1/teacher-tasks":
                    worker.jobs[body["job_uuid"]] = "in_progress"
                    return self._answer(200, {"job_uuid": body["job_uuid"], "teacher_outputs_dir": "/nowhere"})
                if path == "/v1/student-tasks":
                    uuids = [f"{body['prefix']}-student-{s['name']}" for s in body["students"]]
                    worker.jobs.update(dict.fromkeys(uuids, "in_progress"))
                    return self._answer(200, {"job_uuids": uuids})
                if path == "/v1/post-training/job/cancel":
                    worker.jobs[body["job_uuid"]] = "cancelled"
                return self._answer(200, {})

            def do_GET(self):
                job_uuid = parse_qs(urlsplit(self.path).query).get("job_uuid", [""])[0]
                if job_uuid not in worker.jobs:
                    return self._answer(404, {"detail": f"job_uuid: unknown job_uuid {job_uuid!r}"})
                self._answer(200, {"job_uuid": job_uuid, "status": worker.jobs[job_uuid], "resources_allocated": {}})

        return Handler


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_models):
    data = tmp_path_factory.mktemp("placement") / "data"
    coordinator = Coordinator(data)
    coordinator.start()
    ram = coordinator.ram_gb()
    # Node 0 of a job is the coordinator: requests of `ram` fit it, and "big" (2x), never "small" (half).
    workers = {"small": Worker(coordinator, "small", ram / 2), "big": Worker(coordinator, "big", ram * 2)}
    for w in workers.values():  # small registers first: with no request, it would be taken first
        w.register()
        w.up()
    yield coordinator, workers, ram
    for w in workers.values():
        w.close()
    coordinator.stop()
    for pid, _ in processes_mentioning(str(data)):
        os.kill(pid, signal.SIGKILL)


def two_node_job(job_uuid: str, model: str, rows: list[dict], **scheduling) -> dict:
    return {
        "job_uuid": job_uuid, "model": model, "rows": rows,
        "training_config": {
            "n_epochs": 1, "max_steps_per_epoch": 2, "dtype": "fp32",
            "data_config": {"dataset_id": "inline", "batch_size": 2, "shuffle": False, "data_format": "instruct"},
            "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-3, "weight_decay": 0.0, "num_warmup_steps": 0},
            "torch_run_config": {"nproc_per_node": 1, "nnodes": 2, "rdzv_timeout_s": 20},
            "scheduling": scheduling,
        },
    }


def placed_on(coordinator: Coordinator, job_uuid: str) -> list[str]:
    return [n["node_id"] for n in coordinator.status(job_uuid)["resources_allocated"].get("nodes", [])]


def cancel(coordinator: Coordinator, *job_uuids: str) -> None:
    for job_uuid in job_uuids:
        assert coordinator.post("/v1/post-training/job/cancel", json={"job_uuid": job_uuid}).status_code == 200
        assert coordinator.status(job_uuid)["status"] not in ACTIVE


# -- multi-node jobs -------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_job_goes_only_to_nodes_that_have_its_resources(cluster, tiny_models, toy_data):
    coordinator, workers, ram = cluster
    rows = toy_data["instruct"][:8]
    body = two_node_job("fits", tiny_models["student"], rows, resources={"ram_gb": ram})
    r = coordinator.post("/v1/post-training/supervised-fine-tune", json=body)
    assert r.status_code == 200 and r.json() == {"job_uuid": "fits"}, r.text
    assert placed_on(coordinator, "fits") == ["coord", "big"]  # "small" is as idle, but has too little RAM
    (path, part), = workers["big"].paths("/v1/post-training/parts/")
    assert path.endswith("/supervised-fine-tune") and part["job_uuid"] == "fits"
    assert part["training_config"]["torch_run_config"]["node_rank"] == 1
    assert part["training_config"]["torch_run_config"].get("launcher", "local") == "local"
    assert part["training_config"]["scheduling"]["resources"]["ram_gb"] == ram  # its spec carries it
    assert workers["small"].paths("/v1/post-training/parts/") == []
    cancel(coordinator, "fits")


@pytest.mark.slow
def test_requests_no_registered_node_can_meet_are_refused(cluster, tiny_models, toy_data):
    coordinator, _, ram = cluster
    rows = toy_data["instruct"][:8]
    for job_uuid, resources, says in (
        ("too-big", {"ram_gb": ram * 100}, "coordinator (coord), which has"),
        ("no-such-gpu", {"gpu_memory_gb": 9999}, "0 GB GPU memory (needs 9999)"),
    ):
        r = coordinator.post("/v1/post-training/supervised-fine-tune",
                             json=two_node_job(job_uuid, tiny_models["student"], rows, resources=resources))
        assert r.status_code == 400 and "training_config.scheduling.resources" in r.text and says in r.text, r.text
        assert "the most any registered node has" in r.text
    three = two_node_job("three-nodes", tiny_models["student"], rows, resources={"ram_gb": ram})
    three["training_config"]["torch_run_config"]["nnodes"] = 3  # only coord and big have that much RAM
    r = coordinator.post("/v1/post-training/supervised-fine-tune", json=three)
    assert r.status_code == 400 and "3 nodes with >= " in r.text and "2 registered" in r.text, r.text
    bad = two_node_job("bad-field", tiny_models["student"], rows, resources={"gpus": -1})
    r = coordinator.post("/v1/post-training/supervised-fine-tune", json=bad)
    assert r.status_code == 400 and "training_config.scheduling.resources.gpus" in r.text, r.text
    for job_uuid in ("too-big", "no-such-gpu", "three-nodes", "bad-field"):
        assert requests.get(coordinator.url + "/v1/post-training/job/status", params={"job_uuid": job_uuid},
                            timeout=10).status_code == 404


@pytest.mark.slow
def test_a_job_waits_for_a_node_that_fits_across_a_restart_and_higher_priority_is_placed_first(
        cluster, tiny_models, toy_data):
    coordinator, workers, ram = cluster
    big = workers["big"]
    big.down()
    big.forget()
    rows = toy_data["instruct"][:8]
    submitted = {}
    for job_uuid, priority in (("low", 0), ("high", 50), ("given-up", 90)):
        body = two_node_job(job_uuid, tiny_models["student"], rows, priority=priority, resources={"ram_gb": ram})
        submitted[job_uuid] = coordinator.post("/v1/post-training/supervised-fine-tune", json=body)
    assert all(r.status_code == 200 for r in submitted.values()), [r.text for r in submitted.values()]
    waiting = coordinator.status("low")
    assert waiting["status"] == "scheduled"
    assert waiting["resources_allocated"]["waiting_for"] == f"waiting for 2 nodes with >= {ram:g} GB RAM (1 fits now)"
    assert (coordinator.data_dir / "pending_jobs" / "low.json").exists()
    again = coordinator.post("/v1/post-training/supervised-fine-tune",
                             json=two_node_job("low", tiny_models["student"], rows, resources={"ram_gb": ram}))
    assert again.status_code == 409, again.text
    cancel(coordinator, "given-up")
    assert coordinator.status("given-up")["status"] == "cancelled"

    coordinator.stop()  # waiting jobs are kept on disk
    coordinator.start()
    assert coordinator.status("high")["status"] == "scheduled"
    assert coordinator.status("given-up")["status"] == "cancelled"
    assert big.paths("/v1/post-training/parts/") == []

    big.up()  # the node that fits is back: both jobs are placed, the higher priority first
    wait_until(lambda: all(placed_on(coordinator, j) == ["coord", "big"] for j in ("low", "high")), 30,
               message="both waiting jobs placed")
    assert [b["job_uuid"] for _, b in big.paths("/v1/post-training/parts/")] == ["high", "low"]
    status = coordinator.status("low")
    assert status["resources_allocated"]["waited_since"] and status["resources_allocated"]["placed_at"]
    assert not (coordinator.data_dir / "pending_jobs" / "low.json").exists()
    cancel(coordinator, "high", "low")
    wait_until(lambda: big.jobs == {"high": "cancelled", "low": "cancelled"}, 30, message="parts cancelled")


# -- pipelines -------------------------------------------------------------------------------------
def pipeline(pipeline_id: str, tiny_models, toy_data, students: list[dict], **teacher) -> dict:
    return {"pipeline_id": pipeline_id, "rows": [{"input_query": r["input_query"]} for r in toy_data["instruct"][:4]],
            "teacher": {"model": tiny_models["teacher"], "top_k": 4, "max_new_tokens": 4, **teacher},
            "students": [{"model": tiny_models["student"], "max_steps_per_epoch": 2, **s} for s in students]}


@pytest.mark.slow
def test_a_pipeline_task_no_registered_node_can_take_is_refused(cluster, tiny_models, toy_data):
    coordinator, _, ram = cluster
    too_big = {"resources": {"ram_gb": ram * 100}}
    r = coordinator.post("/v1/pipelines/teacher-student", json=pipeline(
        "refused", tiny_models, toy_data, [{"name": "a"}, {"name": "b", "scheduling": too_big}]))
    assert r.status_code == 400 and "students[1].scheduling.resources" in r.text, r.text
    assert "the most any registered node has" in r.text
    r = coordinator.post("/v1/pipelines/teacher-student", json=pipeline(
        "refused", tiny_models, toy_data, [{"name": "a"}], scheduling=too_big))
    assert r.status_code == 400 and "teacher.scheduling.resources" in r.text, r.text
    r = coordinator.post("/v1/pipelines/teacher-student", json=pipeline(
        "refused", tiny_models, toy_data, [{"name": "a", "scheduling": {"max_retries": 11}}]))
    assert r.status_code == 400 and "max_retries" in r.text, r.text
    assert requests.get(coordinator.url + "/v1/pipelines/refused", timeout=10).status_code == 404


@pytest.mark.slow
def test_a_pipeline_teacher_waits_for_a_node_that_fits(cluster, tiny_models, toy_data):
    coordinator, workers, ram = cluster
    big = workers["big"]
    big.down()
    big.forget()
    r = coordinator.post("/v1/pipelines/teacher-student", json=pipeline(
        "teacher-waits", tiny_models, toy_data, [{"name": "a"}],
        scheduling={"max_retries": 1, "resources": {"ram_gb": ram * 2}}))
    assert r.status_code == 200, r.text
    teacher = requests.get(coordinator.url + "/v1/pipelines/teacher-waits", timeout=10).json()["teacher"]
    assert teacher["status"] == "scheduled" and teacher["node_id"] is None
    assert teacher["waiting_for"] == (f"waiting for a live node with >= {ram * 2:g} GB RAM that has "
                                      f"{tiny_models['teacher']!r} (none is up; big could take it)")
    big.up()
    wait_until(lambda: big.paths("/v1/teacher-tasks"), 30, message="teacher task sent to big")
    (_, sent), = big.paths("/v1/teacher-tasks")
    assert sent["job_uuid"] == "teacher-waits-teacher" and sent["teacher"]["scheduling"]["max_retries"] == 1
    teacher = requests.get(coordinator.url + "/v1/pipelines/teacher-waits", timeout=10).json()["teacher"]
    assert teacher["node_id"] == "big" and "waiting_for" not in teacher
    assert coordinator.post("/v1/pipelines/teacher-waits/cancel").status_code == 200
    wait_until(lambda: big.jobs == {"teacher-waits-teacher": "cancelled"}, 30, message="teacher task cancelled")


@pytest.mark.slow
def test_pipeline_students_wait_for_a_node_that_fits_and_start_by_priority(cluster, tiny_models, toy_data):
    coordinator, workers, ram = cluster
    big = workers["big"]
    big.down()
    big.forget()
    on_big = {"resources": {"ram_gb": ram * 2}}  # only "big" has this much
    r = coordinator.post("/v1/pipelines/teacher-student", json=pipeline(
        "waits", tiny_models, toy_data,
        [{"name": "later", "scheduling": on_big}, {"name": "first", "scheduling": {**on_big, "priority": 10,
                                                                                    "max_retries": 2}}],
        scheduling={"priority": 5}))
    assert r.status_code == 200, r.text

    def students_waiting():
        state = requests.get(coordinator.url + "/v1/pipelines/waits", timeout=10).json()
        assert state["state"] in ACTIVE, state
        return all("waiting_for" in s for s in state["students"]) and state

    state = wait_until(students_waiting, 180, interval=0.5, message="students waiting (after the teacher task)")
    assert state["teacher"]["status"] == "completed" and state["teacher"]["node_id"] == "coord"
    assert [s["status"] for s in state["students"]] == ["scheduled", "scheduled"]
    assert state["students"][0]["waiting_for"] == (f"waiting for a live node with >= {ram * 2:g} GB RAM that has "
                                                   f"{tiny_models['student']!r} (none is up; big could take it)")
    teacher_spec = json.loads((coordinator.data_dir / "runs" / "waits-teacher" / "spec.json").read_text())
    assert teacher_spec["scheduling"]["priority"] == 5

    big.up()
    wait_until(lambda: len(big.paths("/v1/student-tasks")) == 2, 60, message="students sent to big")
    sent = [b["students"][0] for _, b in big.paths("/v1/student-tasks")]
    assert [s["name"] for s in sent] == ["first", "later"]
    assert sent[0]["scheduling"] == {"priority": 10, "max_retries": 2, "progress_timeout_s": None, "resources": {
        "gpus": 0, "gpu_memory_gb": 0, "cpu_cores": 0, "ram_gb": ram * 2}}
    state = requests.get(coordinator.url + "/v1/pipelines/waits", timeout=10).json()
    assert [s.get("node_id") for s in state["students"]] == ["big", "big"]
    assert not any("waiting_for" in s for s in state["students"])
    assert coordinator.post("/v1/pipelines/waits/cancel").status_code == 200
    wait_until(lambda: set(big.jobs.values()) == {"cancelled"}, 30, message="students cancelled")


# -- retries ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_failed_run_is_retried_from_its_checkpoint(cluster, tiny_models, toy_data):
    coordinator = cluster[0]
    body = two_node_job("retried", tiny_models["student"], toy_data["instruct"][:64], max_retries=1)
    tc = body["training_config"]
    tc.update(max_steps_per_epoch=24, save_steps=4)
    tc["torch_run_config"] = {"nproc_per_node": 1}
    assert coordinator.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    run_dir = coordinator.data_dir / "runs" / "retried"
    wait_until(lambda: coordinator.status("retried")["checkpoints"], 180, interval=0.1, message="first checkpoint")
    ranks = [pid for pid, cmd in processes_mentioning(str(run_dir))
             if "providers.training.run" in cmd and not is_rank_agent(cmd)]
    assert ranks, processes_mentioning(str(run_dir))
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)  # the machine loses the process: the run fails
    final = wait_until(lambda: (s := coordinator.status("retried"))["status"] not in ACTIVE and s, 300, interval=0.5,
                       message="retried job finished")
    res = final["resources_allocated"]
    assert final["status"] == "completed", res.get("error")
    assert res["attempts"] == 2 and len(res["retries"]) == 1 and res["retries"][0]["error"], res
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps.count(1) == 1 and max(steps) == 24, steps  # the second run went on from a checkpoint
    resumed_at = next((b for a, b in itertools.pairwise(steps) if b <= a), None)  # steps after it, logged again
    assert resumed_at is None or (resumed_at - 1) % 4 == 0, steps
