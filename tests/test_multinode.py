"""Multi-node FSDP jobs from one API call: two services, a coordinator and a worker that registered
with it, as two hosts in two network namespaces joined by a veth pair (GLOO_SOCKET_IFNAME set, as on
real machines). Where namespaces cannot be created, the two services share loopback instead, and the
test output says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from helpers import free_port, processes_mentioning, stop_process_group, unused_subnets, wait_until

pytestmark = pytest.mark.slow  # two services in network namespaces, training

REPO_ROOT = Path(__file__).resolve().parent.parent
ACTIVE = ("scheduled", "in_progress")
# The services bind a network address, so they need an API token (clients) and a node token (joining);
# this session carries the client's.
API_TOKEN = "test-api-token-" + uuid.uuid4().hex
NODE_TOKEN = "test-node-token-" + uuid.uuid4().hex
HTTP = requests.Session()
HTTP.headers["authorization"] = f"Bearer {API_TOKEN}"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class Network:
    """Hosts A and B: in namespaces (10.231.C.1/.2 on a veth pair; the test reaches A through a second
    veth, 10.231.T.2, with C and T two subnets no other network here routes), or both on 127.0.0.1."""

    def __init__(self, namespaces: bool = True):
        self.tag = uuid.uuid4().hex[:6]
        self.namespaces: list[str] = []
        try:
            if not namespaces:
                raise PermissionError("not asked for")
            self._create()
            self.kind = "network namespaces"
        except (subprocess.CalledProcessError, FileNotFoundError, PermissionError) as e:
            self.destroy()
            self.kind = f"loopback (namespaces unavailable: {e})"
            self.a_addr = self.b_addr = self.test_addr_of_a = "127.0.0.1"
            self.ifname = {"a": None, "b": None}

    def _create(self) -> None:
        a, b = f"trla{self.tag}", f"trlb{self.tag}"
        for ns in (a, b):
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        va, vb, vt, vh = f"va{self.tag}", f"vb{self.tag}", f"vt{self.tag}", f"vh{self.tag}"
        cluster, test = unused_subnets(2, 0, 100)  # 10.231.0-99: test_security_rendezvous takes 100-249
        sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        sh("ip", "link", "set", va, "netns", a)
        sh("ip", "link", "set", vb, "netns", b)
        sh("ip", "-n", a, "addr", "add", f"10.231.{cluster}.1/24", "dev", va)
        sh("ip", "-n", b, "addr", "add", f"10.231.{cluster}.2/24", "dev", vb)
        sh("ip", "-n", a, "link", "set", va, "up")
        sh("ip", "-n", b, "link", "set", vb, "up")
        # The test (root namespace) talks HTTP to host A over a second link.
        sh("ip", "link", "add", vh, "type", "veth", "peer", "name", vt)
        sh("ip", "link", "set", vt, "netns", a)
        sh("ip", "addr", "add", f"10.231.{test}.1/24", "dev", vh)
        sh("ip", "-n", a, "addr", "add", f"10.231.{test}.2/24", "dev", vt)
        sh("ip", "link", "set", vh, "up")
        sh("ip", "-n", a, "link", "set", vt, "up")
        self.host_veth = vh
        self.a_addr, self.b_addr = f"10.231.{cluster}.1", f"10.231.{cluster}.2"
        self.test_addr_of_a = f"10.231.{test}.2"
        self.ifname = {"a": va, "b": vb}

    def prefix(self, host: str) -> list[str]:
        if not self.namespaces:
            return []
        return ["ip", "netns", "exec", self.namespaces[0 if host == "a" else 1]]

    def destroy(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if getattr(self, "host_veth", None):
            subprocess.run(["ip", "link", "del", self.host_veth], capture_output=True)
        self.namespaces = []


def start_service(net: Network, host: str, port: int, data_dir: Path, coordinator: str | None,
                  extra: list[str] | None = None) -> subprocess.Popen:
    addr = net.a_addr if host == "a" else net.b_addr
    secrets = data_dir.parent / "secrets"
    secrets.mkdir(mode=0o700, exist_ok=True)
    (secrets / "api-token").write_text(API_TOKEN)
    (secrets / "node-token").write_text(NODE_TOKEN)
    argv = [*net.prefix(host), sys.executable, "-m", "providers.remote_fsdp.service.app", "--host",
            "0.0.0.0" if net.namespaces else "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
            "--node-id", f"node-{host}", "--advertise-url", f"http://{addr}:{port}", "--address", addr,
            "--down-after-s", "4", "--api-token-file", str(secrets / "api-token"),
            "--node-token-file", str(secrets / "node-token")]
    if net.ifname[host]:
        argv += ["--gloo-socket-ifname", net.ifname[host]]
    if coordinator:
        argv += ["--coordinator", coordinator]
    argv += extra or []
    log = open(data_dir.parent / f"service-{host}.log", "ab")
    return subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@contextmanager
def two_services(root: Path, net: Network, toy_data, port_a: int, port_b: int):
    """A coordinator (host A) and a worker registered with it (host B), with the `toy` dataset uploaded and
    ROOT/shared as a checkpoint root both allow (storage every node mounts); both stopped, and every process
    naming their data dirs killed, on exit."""
    dirs = {h: root / h / "data" for h in "ab"}
    for d in dirs.values():
        d.parent.mkdir(parents=True)
    shared = ["--allowed-checkpoint-root", str(root / "shared")]
    coordinator = f"http://{net.a_addr}:{port_a}"
    procs = {"a": start_service(net, "a", port_a, dirs["a"], None, shared)}
    url = f"http://{net.test_addr_of_a}:{port_a}"
    try:
        wait_until(lambda: _ok(url + "/health"), 120, message="coordinator up")
        procs["b"] = start_service(net, "b", port_b, dirs["b"], coordinator, shared)
        wait_until(lambda: len([n for n in HTTP.get(url + "/v1/nodes", timeout=5).json()["data"]
                                if n["state"] == "up"]) == 2, 120, message="worker registered")
        rows = "".join(json.dumps(r) + "\n" for r in toy_data["instruct"])
        assert HTTP.post(url + "/v1/datasets/toy/rows", data=rows, timeout=30).status_code == 200
        yield {"url": url, "net": net, "procs": procs, "dirs": dirs, "shared": root / "shared"}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                stop_process_group(proc)
        for d in dirs.values():
            for pid, _ in processes_mentioning(str(d)):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, toy_data):
    net = Network()
    print(f"\nmulti-node test hosts: {net.kind}")
    try:
        with two_services(tmp_path_factory.mktemp("cluster"), net, toy_data, 18422, 18423) as c:
            yield c
    finally:
        net.destroy()


@pytest.fixture(scope="module")
def loopback_cluster(tmp_path_factory, toy_data):
    """Two services on 127.0.0.1 (free ports): no fixed addresses, so it runs beside other clusters."""
    net = Network(namespaces=False)
    with two_services(tmp_path_factory.mktemp("loopback-cluster"), net, toy_data, free_port(), free_port()) as c:
        yield c


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def body(job_uuid: str, model: str, nnodes: int, nproc: int, steps: int = 8, epochs: int = 1,
         rdzv_backend: str = "static") -> dict:
    return {
        "job_uuid": job_uuid,
        "model": model,
        "training_config": {
            "n_epochs": epochs, "max_steps_per_epoch": steps, "dtype": "fp32",
            "data_config": {"dataset_id": "toy", "batch_size": 8 // (nnodes * nproc), "shuffle": False,
                            "data_format": "instruct"},
            "optimizer_config": {"optimizer_type": "adamw", "lr": 3e-3, "weight_decay": 0.0, "num_warmup_steps": 0},
            "fsdp_config": {"sharding_strategy": "FULL_SHARD"},
            "torch_run_config": {"nproc_per_node": nproc, "nnodes": nnodes, "rdzv_timeout_s": 30,
                                 "rdzv_backend": rdzv_backend},
        },
    }


def status(url: str, job_uuid: str) -> dict:
    return HTTP.get(url + "/v1/post-training/job/status", params={"job_uuid": job_uuid}, timeout=10).json()


def wait_done(url: str, job_uuid: str, timeout: float = 300) -> dict:
    return wait_until(lambda: (s := status(url, job_uuid))["status"] not in ACTIVE and s, timeout, interval=0.5,
                      message=f"{job_uuid} finished")


def losses(data_dir: Path, job_uuid: str) -> list[float]:
    path = data_dir / "runs" / job_uuid / "metrics.jsonl"
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def test_two_node_job_matches_one_node(cluster, tiny_models):
    """The static rendezvous, node 0's store on its cluster address (c10d is refused: test_security_rendezvous)."""
    url, dirs = cluster["url"], cluster["dirs"]
    r = HTTP.post(url + "/v1/post-training/supervised-fine-tune",
                      json=body("two-nodes", tiny_models["student"], nnodes=2, nproc=1),
                      timeout=60)
    assert r.status_code == 200, r.text
    two = wait_done(url, "two-nodes")
    assert two["status"] == "completed", two["resources_allocated"].get("error")
    nodes = two["resources_allocated"]["nodes"]
    assert [n["node_id"] for n in nodes] == ["node-a", "node-b"] and [n["node_rank"] for n in nodes] == [0, 1]
    wait_until(lambda: status(url, "two-nodes")["resources_allocated"]["nodes"][1].get("status") == "completed", 60)
    ranks = status(url, "two-nodes")["resources_allocated"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(abs(r["local_params"] / r["total_params"] - 0.5) < 0.02 for r in ranks)

    r = HTTP.post(url + "/v1/post-training/supervised-fine-tune",
                      json=body("one-node", tiny_models["student"], nnodes=1, nproc=2), timeout=60)
    assert wait_done(url, "one-node")["status"] == "completed"
    a, b = losses(dirs["a"], "two-nodes"), losses(dirs["a"], "one-node")
    assert len(a) == len(b) == 8 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)


def test_pipeline_students_run_on_both_nodes(cluster, tiny_models, toy_data):
    from test_pipelines import kl_to_teacher, load_student, teacher_sequences
    from transformers import AutoModelForCausalLM

    from providers.remote_fsdp.client import TrainingServiceClient

    client = TrainingServiceClient(cluster["url"], api_token=API_TOKEN)
    lora = {"type": "LoRA", "lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": True,
            "apply_lora_to_output": True, "rank": 16, "alpha": 32}
    students = [{"name": n, "model": tiny_models["student"], "method": m, "peft": lora, "n_epochs": 4,
                 "max_steps_per_epoch": 8, "lr": 1e-2} for n, m in (("s1", "logit"), ("s2", "hybrid"))]
    state = client.run_pipeline({
        "pipeline_id": "spread", "rows": [{"input_query": r["input_query"]} for r in toy_data["instruct"][:64]],
        "teacher": {"model": tiny_models["teacher"], "top_k": 16, "max_new_tokens": 12},
        "students": students, "merge": {"method": "linear"},
    }, interval_s=0.5, timeout_s=600)
    assert state["state"] == "completed", state
    assert state["teacher"]["node_id"] == "node-a"  # equal RAM and no GPU: the coordinator keeps it
    assert {s["node_id"] for s in state["students"]} == {"node-a", "node-b"}
    out = Path(state["output_dir"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_models["student"]).eval()
    sequences = teacher_sequences(out / "teacher_outputs")
    before = kl_to_teacher(base, teacher, sequences)
    for s in state["students"]:  # the remote student's adapter came back into the pipeline's layout
        assert kl_to_teacher(load_student(s["output"]), teacher, sequences) < 0.9 * before
    assert (out / "merged" / "adapter_model.safetensors").exists()


def test_a_dead_node_fails_the_job_and_leaves_nothing_running(cluster, tiny_models):
    url, dirs, procs = cluster["url"], cluster["dirs"], cluster["procs"]
    job = body("node-dies", tiny_models["student"], nnodes=2, nproc=1, steps=25, epochs=200)
    assert HTTP.post(url + "/v1/post-training/supervised-fine-tune", json=job, timeout=60).status_code == 200
    wait_until(lambda: (status(url, "node-dies")["resources_allocated"].get("step") or 0) >= 2, 300,
               message="both nodes training")
    # Node B dies: its service and its ranks, as when a machine goes away.
    os.killpg(procs["b"].pid, signal.SIGKILL)
    for pid, _ in processes_mentioning(str(dirs["b"])):
        os.kill(pid, signal.SIGKILL)
    final = wait_done(url, "node-dies", timeout=120)
    assert final["status"] == "failed"
    assert "node-b" in final["resources_allocated"]["error"]
    wait_until(lambda: processes_mentioning(str(dirs["a"] / "runs" / "node-dies")) == [], 30,
               message="no rank left on node A")
    assert processes_mentioning(str(dirs["b"] / "runs")) == []
    # Without heartbeats, node B is marked down (after --down-after-s 4) and gets no new work.
    wait_until(lambda: {n["node_id"]: n["state"] for n in HTTP.get(url + "/v1/nodes", timeout=5).json()["data"]}
               == {"node-a": "up", "node-b": "down"}, 30, message="node-b marked down")
    r = HTTP.post(url + "/v1/post-training/supervised-fine-tune",
                      json=body("no-second-node", tiny_models["student"], nnodes=2, nproc=1), timeout=60)
    assert r.status_code == 400 and "nnodes" in r.text


@pytest.mark.slow
def test_a_cancelled_two_node_job_resumes_on_both_nodes_from_its_checkpoint(loopback_cluster, tiny_models):
    """`/job/resume` on the coordinator resumes every part (node B's through its own resume route); the
    resumed run continues from the newest checkpoint and both parts complete, with nothing left running.
    The checkpoints are in a directory both nodes mount: each node holds only its ranks' shards, and the
    sharded checkpoint's index is written by global rank 0, so node-local checkpoint dirs cannot resume."""
    url, dirs = loopback_cluster["url"], loopback_cluster["dirs"]
    job_uuid = "resume-2n"
    job = body(job_uuid, tiny_models["student"], nnodes=2, nproc=1, steps=8, epochs=5)
    job["training_config"]["save_steps"] = 4
    job["checkpoint_dir"] = str(loopback_cluster["shared"])
    assert HTTP.post(url + "/v1/post-training/supervised-fine-tune", json=job, timeout=60).status_code == 200
    checkpoints = loopback_cluster["shared"] / job_uuid
    wait_until(lambda: list(checkpoints.glob("checkpoint-*/model.safetensors")), 300, message="a checkpoint")
    assert HTTP.post(url + "/v1/post-training/job/cancel", json={"job_uuid": job_uuid}, timeout=60).status_code == 200
    cancelled = status(url, job_uuid)
    assert cancelled["status"] == "cancelled"
    part_b = dirs["b"] / "runs" / job_uuid / "status.json"  # node B's own record of its part
    wait_until(lambda: json.loads(part_b.read_text())["state"] == "cancelled", 60, message="node B's part cancelled")
    for d in dirs.values():
        wait_until(lambda d=d: processes_mentioning(str(d / "runs" / job_uuid)) == [], 30, message="ranks stopped")
    newest = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*/model.safetensors"))
    if newest >= 40:
        pytest.skip("the job finished before it could be cancelled")
    metrics = dirs["a"] / "runs" / job_uuid / "metrics.jsonl"
    logged_before = len(metrics.read_text().splitlines())

    r = HTTP.post(url + "/v1/post-training/job/resume", json={"job_uuid": job_uuid}, timeout=60)
    assert r.status_code == 200, r.text
    final = wait_done(url, job_uuid, timeout=600)
    assert final["status"] == "completed", final["resources_allocated"].get("error")
    wait_until(lambda: status(url, job_uuid)["resources_allocated"]["nodes"][1].get("status") == "completed", 60,
               message="node B's part completed")
    # The resumed run starts after the checkpoint (exact resume), not at step 1; the logs show both runs.
    resumed = [json.loads(line) for line in metrics.read_text().splitlines()[logged_before:]]
    steps = [m["step"] for m in resumed if "loss" in m]
    assert steps[0] == newest + 1 and steps[-1] == 40, steps
    for d in dirs.values():
        log = (d / "runs" / job_uuid / "logs" / "train.log").read_text()
        assert "=== run 2 " in log, log[-2000:]
        assert processes_mentioning(str(d / "runs" / job_uuid)) == []
