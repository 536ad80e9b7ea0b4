"""The FSDP training service, as a user drives it: start `trl-fsdp-service`, send requests, read the
job's files. Every job here really runs torchrun with 2 processes on gloo (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch
from helpers import (
    free_port,
    is_rank_agent,
    processes_mentioning,
    stop_process_group,
    wait_for_health,
    wait_until,
)

pytestmark = pytest.mark.slow  # every test drives a trl-fsdp-service process that runs torchrun

REPO_ROOT = Path(__file__).resolve().parent.parent
ACTIVE = ("scheduled", "in_progress")


class Service:
    def __init__(self, data_dir: Path, port: int | None = None, extra: list[str] | None = None,
                 env: dict[str, str] | None = None):
        self.data_dir = data_dir
        self.runs_dir = data_dir / "runs"  # launchers.shared_dir/runs when the service has one
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"service-{self.port}.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "providers.remote_fsdp.service.app", "--port", str(self.port),
                 "--data-dir", str(data_dir), *(extra or [])],
                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        wait_for_health(self.url, timeout=120, proc=self.proc, path="/health", log_file=self.log)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=120, **kw)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=60, **kw)

    def status(self, job_uuid: str) -> dict:
        r = self.get("/v1/post-training/job/status", params={"job_uuid": job_uuid})
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_uuid: str, timeout: float = 300) -> dict:
        return wait_until(lambda: (s := self.status(job_uuid))["status"] not in ACTIVE and s, timeout,
                          interval=0.25, message=f"job {job_uuid} finished")

    def losses(self, job_uuid: str) -> list[float]:
        path = self.runs_dir / job_uuid / "metrics.jsonl"
        return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]

    def stop(self) -> None:
        stop_process_group(self.proc)


@pytest.fixture(scope="module")
def service(tmp_path_factory, toy_data):
    svc = Service(tmp_path_factory.mktemp("fsdp") / "data")
    rows = "".join(json.dumps(r) + "\n" for r in toy_data["instruct"])
    assert svc.post("/v1/datasets/toy/rows", data=rows).json()["rows"] == len(toy_data["instruct"])
    prefs = "".join(json.dumps(r) + "\n" for r in toy_data["preference"])
    assert svc.post("/v1/datasets/prefs/rows", data=prefs).json()["rows"] == len(toy_data["preference"])
    yield svc
    svc.stop()
    for pid, _ in processes_mentioning(str(svc.data_dir)):
        os.kill(pid, signal.SIGKILL)


def sft_body(job_uuid: str, model: str, nproc: int = 2, global_batch: int = 8, steps: int = 8, **tc) -> dict:
    config = {
        "n_epochs": 1,
        "max_steps_per_epoch": steps,
        "dtype": "fp32",
        "data_config": {"dataset_id": "toy", "batch_size": global_batch // nproc, "shuffle": False,
                        "data_format": "instruct"},
        "optimizer_config": {"optimizer_type": "adamw", "lr": 3e-3, "weight_decay": 0.0, "num_warmup_steps": 0},
        "torch_run_config": {"nproc_per_node": nproc},
        "fsdp_config": {"sharding_strategy": "FULL_SHARD"},
        **tc,
    }
    return {"job_uuid": job_uuid, "model": model, "training_config": config}


def two_node_body(job_uuid: str, model: str, launcher: str, steps: int = 8, epochs: int = 1) -> dict:
    """An SFT job on 2 nodes x 1 rank through a cluster launcher (the Slurm and Ray tests)."""
    body = sft_body(job_uuid, model, nproc=1, global_batch=4, steps=steps)
    body["training_config"]["torch_run_config"] = {"nproc_per_node": 1, "nnodes": 2, "launcher": launcher}
    body["training_config"]["n_epochs"] = epochs
    return body


def submit(service: Service, body: dict, route: str = "supervised-fine-tune") -> str:
    r = service.post(f"/v1/post-training/{route}", json=body)
    assert r.status_code == 200, r.text
    return body["job_uuid"]


def run_job(service: Service, body: dict, route: str = "supervised-fine-tune") -> dict:
    r = service.post(f"/v1/post-training/{route}", json=body)
    assert r.status_code == 200, r.text
    status = service.wait(body["job_uuid"])
    assert status["status"] == "completed", status["resources_allocated"].get("error")
    return status


def held_fraction(status: dict) -> list[float]:
    return [r["local_params"] / r["total_params"] for r in status["resources_allocated"]["ranks"]]


@pytest.fixture(scope="module")
def two_procs(service, tiny_models) -> dict:
    """A finished 2-process FULL_SHARD SFT job ("two-procs"), shared by the tests that read one."""
    return run_job(service, sft_body("two-procs", tiny_models["student"], nproc=2))


def test_two_fsdp_processes_match_one_process_and_shard_params(service, tiny_models, two_procs):
    one = run_job(service, sft_body("one-proc", tiny_models["student"], nproc=1))
    two = two_procs
    a, b = service.losses("one-proc"), service.losses("two-procs")
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    assert a[-1] < a[0]
    assert held_fraction(one) == [1.0]
    assert held_fraction(two) == pytest.approx([0.5, 0.5], abs=0.02)
    res = two["resources_allocated"]
    assert res["world_size"] == 2 and res["backend"] == "gloo" and res["fsdp"]["implementation"].startswith("FSDP2")
    assert all(r["peak_host_memory_mb"] > 0 for r in res["ranks"])


@pytest.mark.parametrize(
    "job_uuid, fsdp, fraction",
    [
        ("shard-grad-op", {"sharding_strategy": "SHARD_GRAD_OP"}, 0.5),
        ("hybrid-shard", {"sharding_strategy": "HYBRID_SHARD"}, 0.5),
        ("no-shard", {"sharding_strategy": "NO_SHARD"}, 1.0),
        ("mp-bf16", {"mixed_precision_policy": "bf16"}, 0.5),
        ("mp-fp16", {"mixed_precision_policy": "fp16"}, 0.5),
        ("cpu-offload", {"cpu_offload": True}, 0.5),
        ("prefetch", {"forward_prefetch": True, "backward_prefetch": None, "limit_all_gathers": False}, 0.5),
        ("backward-post", {"backward_prefetch": "BACKWARD_POST"}, 0.5),
        ("act-ckpt", {"activation_checkpointing": True}, 0.5),
    ],
)
def test_each_fsdp_option_trains(service, tiny_models, job_uuid, fsdp, fraction):
    body = sft_body(job_uuid, tiny_models["student"], steps=6)
    body["training_config"]["fsdp_config"].update(fsdp)
    status = run_job(service, body)
    losses = service.losses(job_uuid)
    assert losses[-1] < losses[0], losses
    assert held_fraction(status) == pytest.approx([fraction, fraction], abs=0.02)
    in_force = status["resources_allocated"]["fsdp"]
    for key, value in fsdp.items():
        assert in_force[key] == value
    if fsdp.get("cpu_offload"):
        assert in_force["offload_policy"] == "CPUOffloadPolicy(pin_memory=False)"


def test_consolidated_checkpoint_matches_sharded_state_and_resume_is_exact(service, tiny_models, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    full = sft_body("full-run", tiny_models["student"], steps=10, save_steps=5)
    run_job(service, full)
    ck = service.data_dir / "runs" / "full-run" / "checkpoints" / "checkpoint-10"
    model = AutoModelForCausalLM.from_pretrained(ck)
    dcp_to_torch_save(ck / "pytorch_model_fsdp_0", tmp_path / "sharded.pt")
    # The sharded (DCP) state, loaded into the untrained student, gives the consolidated model's logits.
    sharded = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    ids = torch.tensor([[1, 5, 9, 12, 40, 41]])
    assert not torch.allclose(model(ids).logits, sharded(ids).logits, atol=1e-3)  # training changed it
    sharded.load_state_dict(torch.load(tmp_path / "sharded.pt")["model"], strict=True)
    assert torch.allclose(model(ids).logits, sharded(ids).logits, atol=1e-6)
    final = AutoModelForCausalLM.from_pretrained(ck.parent / "final")
    assert torch.allclose(model(ids).logits, final(ids).logits, atol=1e-6)

    # Cancel a run after its first checkpoint, resume it: the loss curve continues exactly.
    body = sft_body("resumed-run", tiny_models["student"], steps=10, save_steps=5)
    assert service.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    run_dir = service.data_dir / "runs" / "resumed-run"
    wait_until(lambda: (run_dir / "checkpoints" / "checkpoint-5" / "model.safetensors").exists(), 300)
    assert service.post("/v1/post-training/job/cancel", json={"job_uuid": "resumed-run"}).status_code == 200
    assert service.status("resumed-run")["status"] == "cancelled"
    if (run_dir / "checkpoints" / "checkpoint-10").exists():
        pytest.skip("the job finished before it could be cancelled")
    r = service.post("/v1/post-training/job/resume", json={"job_uuid": "resumed-run"})
    assert r.status_code == 200, r.text
    assert service.wait("resumed-run")["status"] == "completed"
    expected = service.losses("full-run")
    resumed = {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if "loss" in r}
    for step in range(6, 11):
        assert resumed[step] == pytest.approx(expected[step - 1], abs=1e-5)


def test_cancel_stops_every_rank_and_the_agent(service, tiny_models):
    body = sft_body("to-cancel", tiny_models["student"], steps=25)
    body["training_config"]["n_epochs"] = 40
    assert service.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    run_dir = str(service.data_dir / "runs" / "to-cancel")
    wait_until(lambda: (service.status("to-cancel")["resources_allocated"].get("step") or 0) >= 2, 300)
    assert len(processes_mentioning(run_dir)) >= 3  # the agent and two ranks
    r = service.post("/v1/post-training/job/cancel", json={"job_uuid": "to-cancel"})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"  # the job's status, not null
    status = service.status("to-cancel")
    assert status["status"] == "cancelled" and status["completed_at"]
    assert processes_mentioning(run_dir) == []


@pytest.mark.parametrize("rank_start", ["fork", "torchrun"])
def test_ranks_die_with_their_torchrun_agent(service, tiny_models, rank_start):
    """SIGKILL only the agent (as Ray or a node loss does): torchrun starts ranks in their own sessions, and
    forked ranks (the default for one node) share the agent's, but a signal to the agent alone reaches
    neither: only each rank's PR_SET_PDEATHSIG stops them; none may be left within 2 s."""
    name = f"agent-killed-{rank_start}"
    body = sft_body(name, tiny_models["student"], steps=25)
    body["training_config"]["n_epochs"] = 40
    body["training_config"]["torch_run_config"] = {"rank_start": rank_start}
    assert service.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    run_dir = str(service.data_dir / "runs" / name)
    wait_until(lambda: (service.status(name)["resources_allocated"].get("step") or 0) >= 1, 300)
    agent = [pid for pid, cmd in processes_mentioning(run_dir) if is_rank_agent(cmd)]
    ranks = [pid for pid, cmd in processes_mentioning(run_dir) if not is_rank_agent(cmd)]
    assert len(agent) == 1 and len(ranks) == 2, processes_mentioning(run_dir)
    marker = {"fork": "providers.training.local_ranks", "torchrun": "torch.distributed.run"}[rank_start]
    assert marker in dict(processes_mentioning(run_dir))[agent[0]]
    if rank_start == "torchrun":  # the ranks' own sessions: a group kill of the agent's misses them
        assert all(os.getsid(r) != os.getsid(agent[0]) for r in ranks)
    os.kill(agent[0], signal.SIGKILL)
    wait_until(lambda: processes_mentioning(run_dir) == [], 2.0, interval=0.05, message="no rank left")
    status = service.wait(name, timeout=30)
    assert status["status"] == "failed"


def test_a_killed_forked_rank_fails_the_job_with_its_root_cause(service, tiny_models):
    """Forked ranks (one node): when rank 1 is SIGKILLed the agent stops rank 0, the job fails at once with
    the killed rank named first (torchrun's Root Cause format), and no process is left."""
    body = sft_body("rank-killed", tiny_models["student"], steps=25)
    body["training_config"]["n_epochs"] = 40
    assert service.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
    run_dir = str(service.data_dir / "runs" / "rank-killed")
    wait_until(lambda: (service.status("rank-killed")["resources_allocated"].get("step") or 0) >= 1, 300)
    rank1 = [pid for pid, cmd in processes_mentioning(run_dir) if cmd.endswith("(rank 1)")]
    assert len(rank1) == 1, processes_mentioning(run_dir)
    os.kill(rank1[0], signal.SIGKILL)
    status = service.wait("rank-killed", timeout=30)
    assert status["status"] == "failed"
    error = status["resources_allocated"]["error"]
    assert error.startswith("rank 1 died: Signal 9 (SIGKILL)"), error
    assert processes_mentioning(run_dir) == []


def test_log_endpoint_tails_rank_logs(service, two_procs):
    r = service.get("/v1/post-training/job/logs", params={"job_uuid": "two-procs", "tail": 5})
    assert r.status_code == 200 and r.json()["log_file"].endswith("rank0.log")
    r1 = service.get("/v1/post-training/job/logs", params={"job_uuid": "two-procs", "rank": 1, "tail": 5})
    assert r1.json()["log_file"].endswith("rank1.log") and r1.json()["log_lines"]
    streamed = service.get("/v1/post-training/job/logs", params={"job_uuid": "two-procs", "follow": "true"})
    assert streamed.status_code == 200 and "loss" in streamed.text  # a finished job's stream ends


def test_later_llama_stack_route_shapes(service, two_procs):
    assert service.get("/v1alpha/post-training/jobs/two-procs/status").json()["status"] == "completed"
    assert service.get("/v1alpha/post-training/job/status", params={"job_uuid": "two-procs"}).status_code == 200
    artifacts = service.get("/v1alpha/post-training/jobs/two-procs/artifacts").json()
    assert artifacts["checkpoints"][-1]["path"].endswith("final")
    assert "two-procs" in {j["job_uuid"] for j in service.get("/v1alpha/post-training/jobs").json()["data"]}
    assert service.get("/openapi.json").status_code == 200


@pytest.mark.parametrize(
    "mutate, status_code, needle",
    [
        (lambda b: "{not json", 400, "json"),
        (lambda b: {k: v for k, v in b.items() if k != "model"}, 400, "model"),
        (lambda b: b["training_config"]["data_config"].update(dataset_id="nope") or b, 400, "dataset_id"),
        (lambda b: b["training_config"]["torch_run_config"].update(nproc_per_node=0) or b, 400, "nproc_per_node"),
        (lambda b: b["training_config"]["fsdp_config"].update(sharding_strategy="ZERO9") or b, 400,
         "sharding_strategy"),
        (lambda b: b["training_config"]["torch_run_config"].update(nproc_per_node=1, nnodes=2) or
         b["training_config"]["fsdp_config"].update(sharding_strategy="HYBRID_SHARD") or b, 400, "HYBRID_SHARD"),
        (lambda b: b.update(checkpoint_dir="/etc/evil") or b, 400, "checkpoint_dir"),
        (lambda b: b["training_config"]["data_config"].update(batch_size=0) or b, 400, "batch_size"),
        (lambda b: b.update(model="/no/such/model") or b, 400, "model"),
        (lambda b: b.update(job_uuid="two-procs") or b, 409, "two-procs"),
        (lambda b: b.update(job_uuid="..") or b, 400, "job_uuid"),
        (lambda b: b.update(algorithm_config={"type": "LoRA", "lora_attn_modules": ["q_proj"], "apply_lora_to_mlp": False,
                                              "apply_lora_to_output": True, "rank": 4, "alpha": 8}) or b, 400, "lm_head"),
        (lambda b: b["training_config"].update(scheduling={"resources": {"gpus": 8}}) or b, 400,
         "scheduling.resources: this host cannot hold the job: 0 GPUs (needs 8)"),
        (lambda b: b["training_config"].update(scheduling={"priority": 1000}) or b, 400, "scheduling.priority"),
        (lambda b: b["training_config"].update(scheduling={"max_retries": -1}) or b, 400, "scheduling.max_retries"),
        (lambda b: b["training_config"]["torch_run_config"].update(launcher="slurm") or b, 400, "not enabled"),
        (lambda b: b["training_config"]["torch_run_config"].update(launcher="pbs") or b, 400, "launcher"),
    ],
)
def test_bad_requests_get_4xx_naming_the_field(service, tiny_models, two_procs, mutate, status_code, needle):
    body = mutate(sft_body("bad-request", tiny_models["student"]))
    if isinstance(body, str):
        r = service.post("/v1/post-training/supervised-fine-tune", data=body,
                         headers={"content-type": "application/json"})
    else:
        r = service.post("/v1/post-training/supervised-fine-tune", json=body)
    assert r.status_code == status_code, r.text
    assert needle.lower() in r.text.lower()
    assert service.get("/health").status_code == 200
    assert service.get("/v1/post-training/job/status", params={"job_uuid": "bad-request"}).status_code == 404


def test_unknown_job_is_404_and_bad_upload_is_400(service):
    for path in ("/v1/post-training/job/status", "/v1/post-training/job/artifacts"):
        r = service.get(path, params={"job_uuid": "nope"})
        assert r.status_code == 404 and "nope" in r.text
    r = service.post("/v1/post-training/job/cancel", json={"job_uuid": "nope"})
    assert r.status_code == 404
    r = service.post("/v1/datasets/broken/rows", data='{"a": 1}\nnot json\n')
    assert r.status_code == 400 and "line 2" in r.text


def test_100k_preference_rows_stream_through(service, tiny_models, toy_data):
    prefs = toy_data["preference"]
    chunk = "".join(json.dumps(prefs[i % len(prefs)]) + "\n" for i in range(50_000))
    for append in ("false", "true"):  # two chunks of 50k rows
        r = service.post("/v1/datasets/big/rows", params={"append": append}, data=chunk.encode())
        assert r.status_code == 200, r.text
    assert r.json()["rows"] == 50_000
    assert sum(1 for _ in open(service.data_dir / "datasets" / "big.jsonl")) == 100_000
    body = sft_body("big-dpo", tiny_models["student"], steps=2)
    body["training_config"]["data_config"]["dataset_id"] = "big"
    body["finetuned_model"] = body.pop("model")
    body["algorithm_config"] = {"type": "dpo", "reward_scale": 1.0, "reward_clip": 5.0}
    status = run_job(service, body, route="preference-optimize")
    train = service.data_dir / "runs" / "big-dpo" / "train.jsonl"
    assert sum(1 for _ in open(train)) == 100_000
    assert status["resources_allocated"]["step"] == 2


def test_restart_marks_running_job_failed_and_keeps_records(tmp_path, tiny_models, toy_data):
    svc = Service(tmp_path / "data")
    try:
        svc.post("/v1/datasets/toy/rows", data="".join(json.dumps(r) + "\n" for r in toy_data["instruct"]))
        body = sft_body("survivor", tiny_models["student"], steps=25)
        body["training_config"]["n_epochs"] = 40
        assert svc.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
        wait_until(lambda: (svc.status("survivor")["resources_allocated"].get("step") or 0) >= 1, 300)
        os.kill(svc.proc.pid, signal.SIGKILL)  # the service dies; torchrun lives on in its own session
        svc.proc.wait()
        run_dir = str(tmp_path / "data" / "runs" / "survivor")
        assert processes_mentioning(run_dir)
        svc = Service(tmp_path / "data", port=svc.port)
        status = svc.status("survivor")
        assert status["status"] == "failed" and "restarted" in status["resources_allocated"]["error"]
        assert processes_mentioning(run_dir) == []
        assert [j["job_uuid"] for j in svc.get("/v1/post-training/jobs").json()["data"]] == ["survivor"]
    finally:
        svc.stop()
