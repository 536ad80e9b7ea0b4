"""Launchers answer for themselves (providers/launchers): the registry names every launcher and the names the
service accepts come from it; what a launcher cannot honour and where capabilities are checked are its own
answers. A job a scheduler runs elsewhere is not refused for this host's hardware (a CPU-only login node
takes a GPU job meant for GPU nodes); the same job run here is refused with the field named."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from providers.launchers import LAUNCHERS, NAME_PATTERN, build_launchers, launcher_class, runs_elsewhere
from providers.launchers.torchrun import TorchRunOptions
from providers.remote_fsdp.service.config import LaunchersConfig, ServiceConfig
from providers.training.spec import JobSpec, SchedulingSpec


def test_every_registered_launcher_answers_the_protocol():
    for name in LAUNCHERS:
        cls = launcher_class(name)
        assert cls.name == name
        assert isinstance(cls.runs_elsewhere, bool)
        assert callable(cls.check) and callable(cls.unhonoured)
    assert [n for n in LAUNCHERS if runs_elsewhere(n)] == ["slurm", "ray"]
    assert not runs_elsewhere(None)


def test_accepted_names_come_from_the_registry():
    assert NAME_PATTERN == "^(local|nodes|slurm|ray)$"
    with pytest.raises(ValidationError, match="'local', 'nodes', 'slurm' or 'ray'"):
        LaunchersConfig(enabled=["local", "k8s"])
    with pytest.raises(ValidationError, match=r"\^\(local\|nodes\|slurm\|ray\)\$"):
        TorchRunOptions(launcher="k8s")
    # Only launchers built from the config come from build_launchers: local (JobManager) and nodes (app) do not.
    built = build_launchers(ServiceConfig(launchers=LaunchersConfig(enabled=["local", "nodes", "ray"])))
    assert list(built) == ["ray"] and built["ray"].name == "ray"


@pytest.mark.parametrize("job_uuid, name", [
    ("sft-7", "trl-sft-7"),  # already a DNS-1123 label: unchanged
    ("SFT_run.2", "trl-sft-run-2-" + __import__("hashlib").sha256(b"SFT_run.2").hexdigest()[:8]),
    ("sft-run-2", "trl-sft-run-2"),  # the name SFT_run.2 would have had without its digest: theirs differ
])
def test_job_ids_become_dns_names(job_uuid, name):
    import re

    from providers.launchers.base import dns_name

    assert dns_name(job_uuid) == name
    long = dns_name("x" * 200)
    for n in (name, long, dns_name("Ünïcode…"), dns_name("-_-")):
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", n) and len(n) <= 63, n
    assert dns_name("a" * 200) != dns_name("a" * 201)


def test_launcher_sections_are_validated_by_their_launcher():
    """Each launcher's section of the config is its own model's (imported when configured or enabled); an
    unknown section or a bad value is named with its path."""
    cfg = LaunchersConfig(enabled=["local", "slurm"], slurm={"partition": "gpu"}, path_map={"/srv/trl": "/mnt/trl"})
    assert cfg.section("slurm").partition == "gpu" and cfg.section("ray").address == "http://127.0.0.1:8265"
    with pytest.raises(ValidationError, match="launchers.k8s: unknown key; launcher sections: slurm, ray"):
        LaunchersConfig(k8s={})
    with pytest.raises(ValidationError, match="launchers.ray.poll_s: Input should be greater than 0"):
        LaunchersConfig(ray={"poll_s": 0})
    with pytest.raises(ValidationError, match="launchers.path_map: 'trl' -> '/mnt/trl': both sides must be absolute"):
        LaunchersConfig(path_map={"trl": "/mnt/trl"})


def test_local_logs_are_the_jobs_log(tmp_path):
    from providers.launchers.local import LocalLauncher
    from providers.training.run_files import RunFiles

    files = RunFiles(tmp_path)
    assert LocalLauncher().logs("1", files) == ""  # nothing written yet
    files.logs.mkdir()
    files.log.write_text("step 1\nstep 2\n")
    assert LocalLauncher().logs("1", files, limit_bytes=7) == "step 2\n"


def test_what_each_launcher_cannot_honour():
    spec = JobSpec.model_construct(scheduling=SchedulingSpec(priority=5, resources={"gpu_memory_gb": 40}))
    unhonoured = {name: launcher_class(name).unhonoured(None, spec) for name in LAUNCHERS}
    assert unhonoured["local"] == {} and unhonoured["nodes"] == {}
    assert set(unhonoured["slurm"]) == {"scheduling.resources.gpu_memory_gb"}
    assert unhonoured["ray"] == {
        "scheduling.priority": "Ray has no job priority",
        "scheduling.resources.gpu_memory_gb": "ray has no request for GPU memory (name a node feature or custom "
                                              "resource in the launcher's config)",
    }


class FakeRayJobs:
    """A stand-in for a cluster's Ray Jobs REST API: jobs stay PENDING until stopped."""

    def __init__(self):
        self.submitted: list[dict] = []
        self.stopped: set[str] = set()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/api/jobs/":
            body = json.loads(request.content)
            self.submitted.append(body)
            return httpx.Response(200, json={"submission_id": body["submission_id"]})
        job_id = request.url.path.split("/")[3]
        if request.url.path.endswith("/stop"):
            self.stopped.add(job_id)
            return httpx.Response(200, json={"stopped": True})
        return httpx.Response(200, json={"status": "STOPPED" if job_id in self.stopped else "PENDING"})


@pytest.fixture
def ray_service(tmp_path, tiny_models, monkeypatch):
    """The service's job core (no HTTP, no training): `local` and a `ray` launcher talking to FakeRayJobs."""
    from providers.remote_fsdp.service.jobs import FsdpJobService

    monkeypatch.setenv("TRL_JOB_ZYGOTE", "0")  # nothing here starts a local process
    models = str(Path(tiny_models["student"]).parent)
    config = ServiceConfig(data_dir=str(tmp_path / "data"), allowed_model_roots=[models], launchers=LaunchersConfig(
        enabled=["local", "ray"], ray={"address": "http://ray.test", "token_env": None, "poll_s": 0.05}))
    service = FsdpJobService(config)
    api = FakeRayJobs()
    service.jobs.launchers["ray"].http = httpx.Client(base_url="http://ray.test", transport=httpx.MockTransport(api))
    service.fake_ray = api
    yield service
    for job in service.jobs.store.list():
        if job.status in ("scheduled", "in_progress"):
            service.jobs.cancel(job.job_uuid)
    service.jobs.shutdown()


def gpu_job(job_uuid: str, model: str, launcher: str, **knob) -> dict:
    return {"job_uuid": job_uuid, "model": model, "rows": [{"prompt": "abc", "completion": "cba"}] * 4,
            "training_config": {
                "n_epochs": 1, "max_steps_per_epoch": 2, "dtype": "fp32",
                "data_config": {"dataset_id": "inline", "batch_size": 2, "shuffle": False, "data_format": "instruct"},
                "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-3, "weight_decay": 0.0, "num_warmup_steps": 0},
                "torch_run_config": {"nproc_per_node": 1, "launcher": launcher}, **knob}}


@pytest.mark.parametrize("knob, field", [({"use_liger_kernel": True}, "training_config.use_liger_kernel"),
                                         ({"attn_implementation": "flash_attention_2"},
                                          "training_config.attn_implementation")])
def test_a_gpu_knob_is_checked_where_the_job_runs(ray_service, tiny_models, knob, field):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU: the local job would be accepted too")
    model = tiny_models["student"]
    # Run here: this host has no GPU, so the service refuses it (a 400) naming the field.
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ray_service.submit_request("supervised-fine-tune", gpu_job("gpu-here", model, "local", **knob))
    assert not ray_service.jobs.store.exists("gpu-here")
    # Run by Ray on its GPU nodes: accepted and handed to Ray; the node checks the knob when the job loads.
    assert ray_service.submit_request("supervised-fine-tune", gpu_job("gpu-ray", model, "ray", **knob)) == {
        "job_uuid": "gpu-ray"}
    job = ray_service.jobs.store.get("gpu-ray")
    assert job.launcher == "ray" and job.status == "scheduled"
    assert [b["metadata"]["job_uuid"] for b in ray_service.fake_ray.submitted] == ["gpu-ray"]
    spec = json.loads((ray_service.runs_dir / "gpu-ray" / "spec.json").read_text())
    assert {k: spec["efficiency"][k] for k in knob} == knob


def test_the_mesh_is_checked_for_every_launcher(ray_service, tiny_models):
    body = gpu_job("bad-mesh", tiny_models["student"], "ray")
    body["training_config"]["fsdp_config"] = {"sharding_strategy": "HYBRID_SHARD"}  # one rank per shard group
    with pytest.raises(ValueError, match="fsdp_config.sharding_strategy: HYBRID_SHARD with one process"):
        ray_service.submit_request("supervised-fine-tune", body)
    assert ray_service.fake_ray.submitted == []


def test_a_job_reads_and_records_paths_through_the_path_map(tmp_path, monkeypatch):
    """The service wrote spec.json with its paths (/srv/...); the job's hosts mount that volume at /mnt/...:
    with TRL_PATH_MAP the trainer reads every path as it sees it and records checkpoints as the service does."""
    from providers.training.path_map import PathMap, load_spec
    from providers.training.run_files import RunFiles
    from providers.training.spec import CheckpointSpec, DataSpec

    host = tmp_path / "srv"
    run_dir = host / "runs" / "j1"
    JobSpec(job_uuid="j1", method="sft", model=str(host / "models" / "m"), run_dir=str(run_dir),
            data=DataSpec(train_file=str(run_dir / "train.jsonl")),
            checkpoint=CheckpointSpec(output_dir=str(run_dir / "checkpoints"))).save()
    monkeypatch.setenv(*next(iter(PathMap({str(host): "/mnt/shared"}).env().items())))
    spec = load_spec(run_dir)
    assert (spec.model, spec.run_dir, spec.data.train_file, spec.checkpoint.output_dir) == (
        "/mnt/shared/models/m", "/mnt/shared/runs/j1", "/mnt/shared/runs/j1/train.jsonl", "/mnt/shared/runs/j1/checkpoints")
    files = RunFiles(run_dir)
    files.add_checkpoint({"path": "/mnt/shared/runs/j1/checkpoints/checkpoint-2", "step": 2})
    files.add_checkpoint({"path": "/mnt/shared/runs/j1/checkpoints/checkpoint-4", "step": 4},
                         keep={"/mnt/shared/runs/j1/checkpoints/checkpoint-4"})
    assert files.read_status()["checkpoints"] == [{"path": str(run_dir / "checkpoints" / "checkpoint-4"), "step": 4}]
    monkeypatch.delenv("TRL_PATH_MAP")
    assert load_spec(run_dir).model == str(host / "models" / "m")  # no map: the paths as written
