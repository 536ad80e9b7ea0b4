"""The training service under attack, as a network peer would try it: each finding of the security review
(tokens, crafted archives, planted checkpoints, client-chosen rendezvous, fake nodes, duplicate-id races,
size bombs, corrupt state files) reproduced against a real service on 127.0.0.1, and refused with a 4xx
that leaves no file, process or record behind."""

from __future__ import annotations

import http.client
import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
from helpers import free_port, processes_mentioning, wait_until
from test_fsdp_service import Service

REPO_ROOT = Path(__file__).resolve().parent.parent
ACTIVE = ("scheduled", "in_progress")
API_TOKEN = "api-" + uuid.uuid4().hex
NODE_TOKEN = "node-" + uuid.uuid4().hex


class Authed(Service):
    """The service with an API token; every call of the test carries it unless told otherwise."""

    def __init__(self, data_dir: Path, **kw):
        super().__init__(data_dir, **kw)
        self.http = requests.Session()
        self.http.headers["authorization"] = f"Bearer {API_TOKEN}"

    def post(self, path: str, **kw) -> requests.Response:
        return self.http.post(self.url + path, timeout=120, **kw)

    def put(self, path: str, **kw) -> requests.Response:
        return self.http.put(self.url + path, timeout=120, **kw)

    def get(self, path: str, **kw) -> requests.Response:
        return self.http.get(self.url + path, timeout=60, **kw)


def secret_files(root: Path) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "api").write_text(API_TOKEN + "\n")
    (root / "node").write_text(NODE_TOKEN + "\n")
    return root / "api", root / "node"


def service_args(root: Path, coordinator_port: int) -> list[str]:
    api, node = secret_files(root / "secrets")
    # A coordinator that is not there: this node accepts job parts only with that host as master.
    return ["--api-token-file", str(api), "--node-token-file", str(node), "--max-archive-mb", "1",
            "--max-body-mb", "1", "--coordinator", f"http://127.0.0.1:{coordinator_port}",
            "--node-id", "worker-under-attack"]


@pytest.fixture(scope="module")
def svc(tmp_path_factory, toy_data, tiny_models):
    root = tmp_path_factory.mktemp("security")
    service = Authed(root / "data", extra=service_args(root, free_port()))
    rows = "".join(json.dumps(r) + "\n" for r in toy_data["instruct"])
    assert service.post("/v1/datasets/toy/rows", data=rows).status_code == 200
    yield service
    service.stop()
    for pid, _ in processes_mentioning(str(service.data_dir)):
        os.kill(pid, signal.SIGKILL)


def sft(job_uuid: str, model: str, steps: int = 2, **extra) -> dict:
    return {
        "job_uuid": job_uuid, "model": model,
        "training_config": {
            "n_epochs": 1, "max_steps_per_epoch": steps, "dtype": "fp32",
            "data_config": {"dataset_id": "toy", "batch_size": 4, "shuffle": False},
            "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-3, "weight_decay": 0.0, "num_warmup_steps": 0},
            "torch_run_config": {"nproc_per_node": 1},
        },
        **extra,
    }


def files_outside(data_dir: Path, since: float, roots: list[Path]) -> list[Path]:
    """Files created after `since` under `roots` but outside the data dir (what an escape would write)."""
    found = []
    for root in roots:
        for p in root.rglob("*"):
            try:
                if p.is_file() and p.stat().st_mtime >= since and data_dir not in p.parents:
                    found.append(p)
            except OSError:
                continue
    return found


# -- 1. tokens ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # starts the service's command line
def test_network_bind_without_a_token_is_refused(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "providers.remote_fsdp.service.app", "--host", "0.0.0.0", "--port", str(free_port()),
         "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode != 0 and "refusing to serve 0.0.0.0 without an API token" in out.stderr


@pytest.mark.slow
def test_requests_need_the_token_compared_as_bytes(svc):
    url = svc.url + "/v1/post-training/jobs"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"authorization": "Bearer wrong"}, timeout=10).status_code == 401
    # A non-ASCII header (any byte may arrive on the wire): a 401, not a 500.
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    conn.putrequest("GET", "/v1/post-training/jobs")
    conn.putheader("Authorization", "Bearer \xe9\xe9\xe9".encode("latin-1"))
    conn.endheaders()
    assert conn.getresponse().status == 401
    assert svc.get("/v1/post-training/jobs").status_code == 200
    # The node token is not a client token, and the client token does not make a node.
    assert requests.get(url, headers={"authorization": f"Bearer {NODE_TOKEN}"}, timeout=10).status_code == 401
    reg = {"node_id": "n1", "url": f"http://127.0.0.1:{free_port()}", "capabilities": {"cpu_cores": 2, "ram_gb": 4}}
    assert svc.post("/v1/nodes/register", json=reg).status_code == 403


@pytest.mark.slow
def test_training_processes_get_no_service_secrets(svc, tiny_models):
    r = svc.post("/v1/post-training/supervised-fine-tune", json=sft("env-check", tiny_models["student"], steps=400))
    assert r.status_code == 200, r.text
    run_dir = svc.data_dir / "runs" / "env-check"
    procs = wait_until(lambda: processes_mentioning(str(run_dir)), 120, message="training processes up")
    try:
        for pid, _ in procs:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert API_TOKEN.encode() not in environ and NODE_TOKEN.encode() not in environ
            assert b"TRL_FSDP_" not in environ
            assert b"PYTHONSAFEPATH=1" in environ
    finally:
        svc.post("/v1/post-training/job/cancel", json={"job_uuid": "env-check"})
    assert svc.status("env-check")["status"] == "cancelled"


# -- 2. archives ---------------------------------------------------------------------------------------------
def tar_bytes(entries: list[tarfile.TarInfo], contents: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info in entries:
            data = (contents or {}).get(info.name)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


MANIFEST = {"teacher_task.json": b'{"rows": 1}'}  # a valid teacher-outputs manifest: the extractor itself decides


def crafted_archives(outside: Path) -> dict[str, bytes]:
    """Archives that would write outside their directory; each carries a valid manifest, so only the
    extractor's own checks can refuse it."""
    planted = dict(MANIFEST)
    manifest = member("teacher_task.json")
    return {
        "symlink_out": tar_bytes([manifest, member("link", tarfile.SYMTYPE, str(outside)), member("link/pwned")],
                                 {**planted, "link/pwned": b"x"}),
        "hardlink_out": tar_bytes([manifest, member("hl", tarfile.LNKTYPE, str(outside / "f"))], planted),
        "absolute": tar_bytes([manifest, member(str(outside / "abs"))], {**planted, str(outside / "abs"): b"x"}),
        "dotdot": tar_bytes([manifest, member("../../../escape")], {**planted, "../../../escape": b"x"}),
        "device": tar_bytes([manifest, member("dev", tarfile.CHRTYPE)], planted),
        # The CVE-2025-4517 family: a chain of links that resolves outside only after extraction.
        "link_chain": tar_bytes([manifest, member("a", tarfile.SYMTYPE, "."), member("a/b", tarfile.SYMTYPE, "../.."),
                                 member("a/b/escaped")], {**planted, "a/b/escaped": b"x"}),
    }


@pytest.mark.slow
def test_crafted_archives_are_refused_and_write_nothing(svc, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    started = time.time()
    node = {"x-node-token": NODE_TOKEN}
    for name, archive in crafted_archives(outside).items():
        outputs_id = f"evil-{name.replace('_', '-')}"
        r = svc.put(f"/v1/teacher-outputs/{outputs_id}", data=archive, headers=node)
        assert r.status_code == 400 and "teacher_task.json" not in r.text, (name, r.text)  # the extractor refused
        assert not (svc.data_dir / "uploaded_teacher_outputs" / outputs_id).exists(), name
        assert not (svc.data_dir / "runs" / outputs_id).exists(), name
    assert list(outside.iterdir()) == []
    # Where the crafted names point: the directory above the data dir (../../..), this test's directory.
    written = files_outside(svc.data_dir, started, [tmp_path, svc.data_dir.parent])
    assert [p for p in written if p != svc.log] == []
    leftovers = [p.name for p in (svc.data_dir / "uploaded_teacher_outputs").iterdir()]
    assert leftovers == [], leftovers  # no temp or half-extracted directories
    # Without the node token, nobody gets as far as an archive.
    assert svc.put("/v1/teacher-outputs/x", data=b"").status_code == 403


@pytest.mark.slow
def test_a_planted_module_stays_data_in_its_own_directory(svc, tiny_models, tmp_path):
    """Plain files are accepted, but only ever land in the upload's own new directory: a `torch/__init__.py`
    named like a job never reaches that job's run directory or anything a job imports."""
    marker = tmp_path / "pwned"
    module = f"open({str(marker)!r}, 'w')".encode()
    archive = tar_bytes([member("teacher_task.json"), member("torch/__init__.py"), member("providers/__init__.py")],
                        {**MANIFEST, "torch/__init__.py": module, "providers/__init__.py": module})
    r = svc.put("/v1/teacher-outputs/planted-module", data=archive, headers={"x-node-token": NODE_TOKEN})
    assert r.status_code == 200, r.text
    landed = svc.data_dir / "uploaded_teacher_outputs" / "planted-module"
    assert (landed / "torch" / "__init__.py").read_bytes() == module
    # A job of the same name starts in its own run dir, with the working directory never on sys.path.
    r = svc.post("/v1/post-training/supervised-fine-tune", json=sft("planted-module", tiny_models["student"], steps=1))
    assert r.status_code == 200, r.text
    assert svc.wait("planted-module")["status"] == "completed"
    assert not (svc.data_dir / "runs" / "planted-module" / "torch").exists()
    assert not marker.exists()


@pytest.mark.slow
def test_a_size_bomb_is_refused_while_the_service_stays_responsive(svc):
    bomb = io.BytesIO()
    with tarfile.open(fileobj=bomb, mode="w:gz") as tar:
        info = tarfile.TarInfo("teacher_task.json")
        info.size = 64 << 20  # 64 MB of zeros: about 64 KB compressed; the limit here is 1 MB
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    results, latencies = [], []

    def upload(i):
        results.append(svc.put(f"/v1/teacher-outputs/bomb-{i}", data=bomb.getvalue(),
                               headers={"x-node-token": NODE_TOKEN}).status_code)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        t0 = time.monotonic()
        assert requests.get(svc.url + "/health", timeout=10).status_code == 200
        latencies.append(time.monotonic() - t0)
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert results == [400] * 4
    print(f"\n/health during 4 concurrent archive bombs: max {max(latencies or [0]) * 1000:.0f} ms")
    assert not [p for p in (svc.data_dir / "uploaded_teacher_outputs").iterdir() if "bomb" in p.name]
    # A JSON body over the body limit (1 MB here) is refused before it is read.
    r = svc.post("/v1/post-training/supervised-fine-tune", data=b"{" + b" " * (2 << 20) + b"}",
                 headers={"content-type": "application/json"})
    assert r.status_code == 413


# -- 3. planted checkpoints ------------------------------------------------------------------------------------
class Payload:
    """Unpickling this writes a marker file: proof that a checkpoint was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant_checkpoint(directory: Path, marker: Path) -> None:
    ck = directory / "checkpoint-1"
    (ck / "pytorch_model_fsdp_0").mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 1, "log_history": []}))
    (ck / "pytorch_model_fsdp_0" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    (ck / "rng_state.pth").write_bytes(pickle.dumps(Payload(marker)))


@pytest.mark.slow
def test_checkpoint_dir_cannot_point_at_uploads_or_other_directories(svc, tiny_models):
    for target in (svc.data_dir / "datasets", svc.data_dir / "uploaded_teacher_outputs",
                   svc.data_dir / "pipelines", svc.data_dir, Path("/tmp")):
        r = svc.post("/v1/post-training/supervised-fine-tune",
                     json=sft("planted-1", tiny_models["student"], checkpoint_dir=str(target)))
        assert r.status_code == 400 and "checkpoint_dir" in r.text and "--allowed-checkpoint-root" in r.text, r.text
    assert not (svc.data_dir / "runs" / "planted-1").exists()


@pytest.mark.slow
def test_a_job_never_resumes_from_checkpoints_it_did_not_write(svc, tiny_models, tmp_path):
    marker = tmp_path / "unpickled"
    # A new job never starts in a directory that already holds files.
    existing = svc.data_dir / "checkpoints" / "shared" / "planted-2"
    plant_checkpoint(existing, marker)
    r = svc.post("/v1/post-training/supervised-fine-tune",
                 json=sft("planted-2", tiny_models["student"], checkpoint_dir="shared"))
    assert r.status_code == 400 and "already exists" in r.text, r.text
    # A job's own output dir, with a checkpoint planted after it stopped: resume refuses to load it.
    r = svc.post("/v1/post-training/supervised-fine-tune",
                 json=sft("planted-3", tiny_models["student"], steps=400, checkpoint_dir="mine"))
    assert r.status_code == 200, r.text
    wait_until(lambda: svc.status("planted-3")["status"] == "in_progress", 120)
    svc.post("/v1/post-training/job/cancel", json={"job_uuid": "planted-3"})
    plant_checkpoint(svc.data_dir / "checkpoints" / "mine" / "planted-3", marker)
    r = svc.post("/v1/post-training/job/resume", json={"job_uuid": "planted-3"})
    assert r.status_code == 200, r.text
    # The planted checkpoint is set aside, unread; the job trains from its own state (none: step 0).
    wait_until(lambda: (svc.status("planted-3")["resources_allocated"].get("step") or 0) >= 1, 120)
    svc.post("/v1/post-training/job/cancel", json={"job_uuid": "planted-3"})
    out = svc.data_dir / "checkpoints" / "mine" / "planted-3"
    assert not (out / "checkpoint-1").exists() and list(out.glob("unrecorded-checkpoint-1-*"))
    assert not marker.exists()


# -- 4. rendezvous placement comes only from a coordinator ----------------------------------------------------
@pytest.mark.slow
def test_clients_cannot_choose_the_rendezvous(svc, tiny_models):
    """Each placement key alone is refused (sent together, one refusal would hide the others), and so is
    torch's c10d rendezvous, from a client and from a coordinator's part alike; nothing connects anywhere."""
    hostile = socket.socket()
    hostile.bind(("127.0.0.1", 0))
    hostile.listen(16)
    hostile.settimeout(0.2)
    port = hostile.getsockname()[1]
    placement = {"node_rank": 1, "master_addr": "127.0.0.2", "master_port": port, "local_addr": "127.0.0.2"}
    for n, (key, value) in enumerate(placement.items()):
        body = sft(f"rdzv-{n}", tiny_models["student"])
        body["training_config"]["torch_run_config"] = {"nproc_per_node": 1, "nnodes": 2, key: value}
        r = svc.post("/v1/post-training/supervised-fine-tune", json=body)
        assert r.status_code == 400 and "set by the coordinator" in r.text and key in r.text, (key, r.text)
    c10d = sft("rdzv-c10d", tiny_models["student"])
    c10d["training_config"]["torch_run_config"] = {"nproc_per_node": 1, "rdzv_backend": "c10d"}
    r = svc.post("/v1/post-training/supervised-fine-tune", json=c10d)
    assert r.status_code == 400 and "torch_run_config.rdzv_backend" in r.text and "'c10d'" in r.text, r.text
    r = svc.post("/v1/post-training/supervised-fine-tune", json={**sft("rdzv-part", tiny_models["student"]),
                                                                 "part_of": "http://127.0.0.2:1"})
    assert r.status_code == 400 and "part_of" in r.text, r.text
    # The parts route wants the node token, then a master that is this node's coordinator, then no c10d.
    part = sft("rdzv-trusted", tiny_models["student"])
    part["training_config"]["torch_run_config"] = {"nproc_per_node": 1, "nnodes": 2, "node_rank": 1,
                                                   "master_addr": "127.0.0.2", "master_port": port}
    assert svc.post("/v1/post-training/parts/supervised-fine-tune", json=part).status_code == 403
    r = svc.post("/v1/post-training/parts/supervised-fine-tune", json=part, headers={"x-node-token": NODE_TOKEN})
    assert r.status_code == 400 and "master_addr" in r.text, r.text
    part["training_config"]["torch_run_config"].update(master_addr="127.0.0.1", rdzv_backend="c10d")
    r = svc.post("/v1/post-training/parts/supervised-fine-tune", json=part, headers={"x-node-token": NODE_TOKEN})
    assert r.status_code == 400 and "rdzv_backend" in r.text, r.text
    time.sleep(1)
    with pytest.raises(TimeoutError):  # nothing ever connected to the hostile store
        hostile.accept()
    hostile.close()
    for job in [f"rdzv-{n}" for n in range(len(placement))] + ["rdzv-c10d", "rdzv-part", "rdzv-trusted"]:
        assert not (svc.data_dir / "runs" / job).exists()


# -- 5. nodes ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fake_and_hijacking_nodes_are_refused(svc):
    node = {"x-node-token": NODE_TOKEN}
    own = f"http://127.0.0.1:{free_port()}"
    caps = {"cpu_cores": 2, "ram_gb": 4}
    bad = [
        {"node_id": "huge", "url": own, "capabilities": {**caps, "gpus": [{"name": "H100", "memory_gb": 1e9}]}},
        {"node_id": "inf", "url": own, "capabilities": {**caps, "ram_gb": "Infinity"}},
        {"node_id": "elsewhere", "url": "http://10.9.9.9:8322", "capabilities": caps},  # not the caller's address
        {"node_id": "creds", "url": f"http://user:pw@127.0.0.1:{free_port()}", "capabilities": caps},
        {"node_id": "../x", "url": own, "capabilities": caps},
    ]
    for reg in bad:
        r = svc.post("/v1/nodes/register", json=reg, headers=node)
        assert r.status_code == 400, (reg["node_id"], r.text)
    r = svc.post("/v1/nodes/register", json={"node_id": "honest", "url": own, "capabilities": caps}, headers=node)
    assert r.status_code == 200, r.text
    assert svc.post("/v1/nodes/honest/heartbeat", json={"load": -5}, headers=node).status_code == 400
    assert svc.post("/v1/nodes/honest/heartbeat", json={"load": 0}, headers=node).status_code == 200
    # Another machine (another URL) cannot take over a name that is up.
    other = f"http://127.0.0.1:{free_port()}"
    r = svc.post("/v1/nodes/register", json={"node_id": "honest", "url": other, "capabilities": caps}, headers=node)
    assert r.status_code == 409, r.text
    nodes = {n["node_id"]: n for n in svc.get("/v1/nodes").json()["data"]}
    assert nodes["honest"]["url"] == own and "huge" not in nodes and "elsewhere" not in nodes


# -- 6. duplicate job ids ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_concurrent_duplicate_submissions_one_wins_and_nothing_breaks(svc, tiny_models):
    body = sft("race", tiny_models["student"])
    codes = []
    barrier = threading.Barrier(4)

    def submit():
        barrier.wait()
        codes.append(svc.post("/v1/post-training/supervised-fine-tune", json=body).status_code)

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200, 409, 409, 409], codes
    assert (svc.data_dir / "runs" / "race" / "spec.json").exists()
    assert svc.wait("race")["status"] == "completed"
    r = svc.post("/v1/post-training/supervised-fine-tune", json=sft("after-race", tiny_models["student"]))
    assert r.status_code == 200 and svc.wait("after-race")["status"] == "completed"


# -- 7. model paths ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_model_paths_outside_the_allowed_roots_reveal_nothing(svc):
    answers = set()
    for path in ("/etc", "/no/such/dir", "/root"):
        r = svc.post("/v1/post-training/supervised-fine-tune", json=sft("outside-model", path))
        assert r.status_code == 400
        answers.add(r.json()["detail"].replace(repr(path), "PATH"))
    assert len(answers) == 1 and "outside the allowed directories" in answers.pop()


# -- 8. state files and the audit trail --------------------------------------------------------------------------------
@pytest.mark.slow  # starts the service, trains
def test_corrupt_state_files_are_set_aside_and_the_service_starts(tmp_path, tiny_models):
    data = tmp_path / "data"
    (data / "pipelines" / "broken").mkdir(parents=True)
    (data / "nodes.json").write_text('[{"node_id": "half')
    (data / "pipelines" / "broken" / "pipeline.json").write_text("{")
    (data / "runs" / "orphan").mkdir(parents=True)  # a submission cut short: no record
    (data / "jobs.db").write_bytes(b"this is not a database" * 100)
    svc = Authed(data, extra=service_args(tmp_path, free_port()))
    try:
        assert svc.get("/v1/nodes").status_code == 200
        assert svc.get("/v1/pipelines").json()["data"] == []
        assert svc.get("/v1/post-training/jobs").json()["data"] == []
        assert list(data.glob("nodes.json.corrupt-*")) and list(data.glob("jobs.db.corrupt-*"))
        assert not (data / "runs" / "orphan").exists()
        r = svc.post("/v1/datasets/toy/rows", data='{"input_query": "q", "expected_answer": "a"}\n' * 8)
        assert r.status_code == 200
        assert svc.post("/v1/post-training/supervised-fine-tune", json=sft("after-corruption", tiny_models["student"],
                                                                           steps=1)).status_code == 200
        assert svc.wait("after-corruption")["status"] == "completed"
        log = (data / "logs" / "service.log").read_text() + svc.log.read_text()
        assert "POST /v1/post-training/supervised-fine-tune -> 200" in log  # the audit trail, in the data dir
        assert API_TOKEN not in log and NODE_TOKEN not in log
    finally:
        svc.stop()


# -- 9. every route family needs its credential ------------------------------------------------------------------
PUBLIC = {"/health", "/docs", "/openapi.json", "/dashboard/api/info"}  # hold no data
NODE_ROUTES = ("/v1/post-training/parts/", "/v1/nodes/register", "/v1/teacher-outputs/")
NOT_IN_SCHEMA = [("get", "/metrics"), ("get", "/dashboard/api/jobs"), ("post", "/v1/openai/v1/chat/completions")]


@pytest.mark.slow
def test_every_route_needs_its_credential(svc):
    """Every route of the OpenAPI (post-training, datasets, nodes, pipelines, chat, enhancement, validation,
    export, workflows, dashboard API) and the routes outside it (/metrics) answers 401/403 without the
    right credential, before it looks at the request."""
    spec = svc.get("/openapi.json").json()
    calls = [(m, p) for p, ops in spec["paths"].items() for m in ops if p not in PUBLIC] + NOT_IN_SCHEMA
    families = {p.split("/")[2] if p.startswith("/v1") else p.split("/")[1] for _, p in calls}
    assert {"post-training", "datasets", "nodes", "pipelines", "openai", "chat", "data-enhancement", "validations",
            "exports", "workflows", "dashboard", "metrics"} <= families, families
    wrong = []
    for method, path in calls:
        url = svc.url + path.replace("{", "").replace("}", "")  # {job_uuid} -> job_uuid: any name will do
        node_route = path.startswith(NODE_ROUTES) or path.endswith("/heartbeat")
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Bearer {NODE_TOKEN}"}):
            code = requests.request(method, url, headers=headers, json={}, timeout=30).status_code
            if code not in ((403,) if node_route else (401,)):
                wrong.append((method, path, headers.get("authorization", "-")[:12], code))
        if node_route:  # the clients' token never makes a node
            code = svc.http.request(method, url, json={}, timeout=30).status_code
            if code != 403:
                wrong.append((method, path, "api token", code))
    assert not wrong, wrong
    assert requests.get(svc.url + "/health", timeout=10).status_code == 200


# -- 10. model paths in every route that loads a model ---------------------------------------------------------------
def outputs_with_adapter(base: str) -> bytes:
    """Teacher outputs (a compromised node may push any) holding an adapter whose base lies outside."""
    config = json.dumps({"peft_type": "LORA", "base_model_name_or_path": base, "r": 2,
                         "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}).encode()
    return tar_bytes([member("teacher_task.json"), member("adapter/adapter_config.json"),
                      member("adapter/adapter_model.safetensors")],
                     {**MANIFEST, "adapter/adapter_config.json": config, "adapter/adapter_model.safetensors": b"x"})


@pytest.mark.slow
def test_every_route_that_loads_a_model_confines_its_path(svc, tmp_path):
    secret = tmp_path / "private-model"  # a real model directory outside the allowed roots
    secret.mkdir()
    (secret / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    prompts = [{"input_query": "reverse: a b", "expected_answer": "b a"}]
    attempts = {
        "chat": lambda m: svc.post("/v1/openai/v1/chat/completions",
                                   json={"model": m, "messages": [{"role": "user", "content": "hi"}]}),
        "validation model": lambda m: svc.post("/v1/validations",
                                               json={"validation_id": "conf-v", "model": m, "prompts": prompts}),
        "validation base": lambda m: svc.post("/v1/validations", json={
            "validation_id": "conf-vb", "model": "job:none", "base_model": m, "prompts": prompts}),
        "export": lambda m: svc.post("/v1/exports", json={"export_id": "conf-e", "model": m, "formats": ["merged"]}),
        "merge": lambda m: svc.post("/v1/adapters/merge", json={"adapter": m, "output_name": "conf-m"}),
    }
    for what, attempt in attempts.items():
        answers = set()
        for path in (str(secret), "/no/such/model", "/etc"):
            r = attempt(path)
            assert r.status_code in (400, 404), (what, path, r.status_code, r.text)
            answers.add(r.text.replace(json.dumps(path)[1:-1], "PATH").replace(repr(path), "PATH"))
        assert len(answers) == 1, (what, answers)  # the same answer whether the path exists or not
    # An adapter inside the data dir whose base lies outside: refused for its base, by every route.
    r = svc.put("/v1/teacher-outputs/adapter-outside", data=outputs_with_adapter(str(secret)),
                headers={"x-node-token": NODE_TOKEN})
    assert r.status_code == 200, r.text
    adapter = str(svc.data_dir / "uploaded_teacher_outputs" / "adapter-outside" / "adapter")
    for what in ("chat", "validation model", "export"):
        r = attempts[what](adapter)
        assert r.status_code == 400 and "base_model_name_or_path" in r.text, (what, r.text)
    for kind, task in (("validations", "conf-v"), ("exports", "conf-e")):
        assert svc.get(f"/v1/{kind}/{task}").status_code == 404


# -- 11. bind addresses and bodies ----------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "0", "", "10.1.2.3", "::ffff:127.0.0.1", "127.1", "[::1]",
                                  socket.gethostname(), "example.invalid"])
def test_every_non_loopback_bind_form_needs_a_token(host):
    from providers.remote_fsdp.service.app import check_exposure
    from providers.remote_fsdp.service.config import ServiceConfig

    with pytest.raises(SystemExit, match="without an API token"):
        check_exposure(ServiceConfig(host=host))
    check_exposure(ServiceConfig(host=host, api_token="t" * 32))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_binds_need_no_token(host):
    from providers.remote_fsdp.service.app import check_exposure
    from providers.remote_fsdp.service.config import ServiceConfig

    check_exposure(ServiceConfig(host=host))


@pytest.mark.slow
def test_a_chunked_body_over_the_cap_is_refused(svc):
    """No Content-Length to refuse up front: the body is counted as it streams in (1 MB cap here)."""
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=60)
    conn.putrequest("POST", "/v1/post-training/supervised-fine-tune")
    conn.putheader("Authorization", f"Bearer {API_TOKEN}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b"{" + b" " * (64 << 10)
    try:
        for _ in range(48):  # 3 MB
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may stop reading once it has answered
    assert conn.getresponse().status == 413
    assert svc.get("/v1/post-training/jobs").status_code == 200
