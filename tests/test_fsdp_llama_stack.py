"""As a user of the remote provider: start the FSDP service, start `llama stack run run_fsdp.yaml`, and
train through the unmodified llama-stack-client with 2 FSDP processes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from helpers import processes_mentioning, wait_for_job
from measures import dpo_margin, generate, load_causal
from test_fsdp_service import Service

pytestmark = pytest.mark.slow  # `llama stack run` with the FSDP service behind it, training

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stack(tmp_path_factory, llama_stack_factory, toy_data):
    root = tmp_path_factory.mktemp("fsdp-stack")
    service = Service(root / "service")
    server = llama_stack_factory(REPO_ROOT / "run_fsdp.yaml", root / "stack",
                                 env={"TRL_FSDP_URL": service.url, "TRL_FSDP_STACK_DIR": str(root / "stack")})
    client = server.client()
    for dataset_id, rows in (("toy", toy_data["instruct"]), ("prefs", toy_data["preference"])):
        client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": rows},
                                 dataset_id=dataset_id)
    yield client, service
    service.stop()
    for pid, _ in processes_mentioning(str(service.data_dir)):
        os.kill(pid, signal.SIGKILL)


def training_config(dataset_id: str, epochs: int, lr: float) -> dict:
    return {
        "n_epochs": epochs, "max_steps_per_epoch": 25, "dtype": "fp32",
        # 2 processes x 4 rows: a global batch of 8
        "data_config": {"dataset_id": dataset_id, "batch_size": 4, "shuffle": True, "data_format": "instruct"},
        "optimizer_config": {"optimizer_type": "adamw", "lr": lr, "weight_decay": 0.0, "num_warmup_steps": 0},
        "torch_run_config": {"nproc_per_node": 2},
        "fsdp_config": {"sharding_strategy": "FULL_SHARD"},
    }


def assert_sharded(status) -> None:
    res = status.resources_allocated
    assert res["world_size"] == 2 and res["fsdp"]["sharding_strategy"] == "FULL_SHARD"
    assert [round(r["local_params"] / r["total_params"], 2) for r in res["ranks"]] == [0.5, 0.5]


def test_dpo_through_llama_stack_on_two_fsdp_processes(stack, tiny_models, toy_data):
    client, service = stack
    client.post_training.preference_optimize(
        job_uuid="ls-fsdp-dpo", finetuned_model=tiny_models["student"], training_config=training_config("prefs", 2, 5e-3),
        hyperparam_search_config={}, logger_config={},
        # The full payload of 0.2.12's typed client: all four fields are Required there.
        algorithm_config={"type": "dpo", "reward_scale": 0.5, "reward_clip": 5.0, "epsilon": 0.1, "gamma": 0.99},
    )
    status = wait_for_job(client, "ls-fsdp-dpo", timeout=600)
    assert status.status == "completed", status.resources_allocated
    # reward_scale is DPO's beta through the adapter too (it once sent beta's default, which won)
    assert json.loads((service.data_dir / "runs/ls-fsdp-dpo/spec.json").read_text())["dpo"]["beta"] == 0.5
    assert_sharded(status)
    assert set(status.resources_allocated["not_applied"]) == {
        "algorithm_config.reward_clip", "algorithm_config.gamma", "algorithm_config.epsilon"}
    artifacts = client.post_training.job.artifacts(job_uuid="ls-fsdp-dpo")
    final = artifacts.checkpoints[-1]
    final = final if isinstance(final, dict) else final.model_dump()
    assert final["training_metrics"]["train_loss"] > 0
    model, tok = load_causal(final["path"])
    base = load_causal(tiny_models["student"])
    pairs = toy_data["preference"][:100]
    before, after = dpo_margin(*base, pairs), dpo_margin(model, tok, pairs)
    assert after > before + 0.5, f"margin before {before:.3f}, after {after:.3f}"
    assert generate(model, tok, pairs[0]["prompt"])[0] >= 1


def test_sft_through_llama_stack_on_two_fsdp_processes(stack, tiny_models):
    client, service = stack
    client.post_training.supervised_fine_tune(
        job_uuid="ls-fsdp-sft", model=tiny_models["student"], training_config=training_config("toy", 2, 3e-3),
        hyperparam_search_config={}, logger_config={},
    )
    status = wait_for_job(client, "ls-fsdp-sft", timeout=600)
    assert status.status == "completed", status.resources_allocated
    assert_sharded(status)
    metrics = service.data_dir / "runs" / "ls-fsdp-sft" / "metrics.jsonl"
    losses = [r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    assert len(losses) == 50 and sum(losses[-5:]) < sum(losses[:5])
    final = status.checkpoints[-1]
    model, tok = load_causal(final["path"] if isinstance(final, dict) else final.path)
    assert generate(model, tok, "reverse: a b c")[0] >= 1
    assert "ls-fsdp-sft" in {j.job_uuid for j in client.post_training.job.list()}


def test_bad_fsdp_options_are_400_through_llama_stack(stack, tiny_models):
    from llama_stack_client import BadRequestError

    client, _ = stack
    config = training_config("toy", 1, 3e-3)
    config["fsdp_config"]["sharding_strategy"] = "ZERO9"
    with pytest.raises(BadRequestError, match="sharding_strategy"):
        client.post_training.supervised_fine_tune(job_uuid="ls-bad", model=tiny_models["student"],
                                                  training_config=config, hyperparam_search_config={},
                                                  logger_config={})


def test_published_example_shape_through_llama_stack(stack, tiny_models):
    """The remote provider's published DPO example (model + finetuned_model as the result's name, a relative
    checkpoint_dir, learning_rate, no data_format) through Llama Stack's route: the checkpoints land under
    the service's data dir, named after finetuned_model."""
    import requests

    client, service = stack
    body = {
        "job_uuid": "ls-published", "model": tiny_models["student"], "finetuned_model": "student-dpo-fsdp",
        "checkpoint_dir": "./fsdp_checkpoints",
        "algorithm_config": {"type": "dpo", "reward_scale": 1.0, "reward_clip": 5.0},
        "training_config": {"n_epochs": 1, "max_steps_per_epoch": 2, "learning_rate": 5e-5,
                            "data_config": {"dataset_id": "prefs", "batch_size": 4, "shuffle": True}},
        "hyperparam_search_config": {}, "logger_config": {},
    }
    r = requests.post(f"{client.base_url}/v1/post-training/preference-optimize".replace("//v1", "/v1"),
                      json=body, timeout=120)
    assert r.status_code == 200, r.text
    status = wait_for_job(client, "ls-published", timeout=600)
    assert status.status == "completed", status.resources_allocated
    final = status.checkpoints[-1]
    path = Path(final["path"] if isinstance(final, dict) else final.path)
    assert path == service.data_dir.resolve() / "checkpoints" / "fsdp_checkpoints" / "student-dpo-fsdp" / "final"


def test_llama_stack_client_cli_against_the_fsdp_stack(stack, tiny_models):
    import subprocess
    import sys

    client, _ = stack
    cli = [str(Path(sys.executable).parent / "llama-stack-client"), "--endpoint", str(client.base_url).rstrip("/"),
           "post_training"]
    out = subprocess.run([*cli, "list"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ls-fsdp-sft" in out.stdout, out.stderr
    out = subprocess.run([*cli, "status", "--job-uuid", "ls-fsdp-sft"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "completed" in out.stdout, out.stderr
    out = subprocess.run([*cli, "artifacts", "--job-uuid", "ls-fsdp-sft"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "final" in out.stdout, out.stderr
    out = subprocess.run([*cli, "cancel", "--job-uuid", "ls-fsdp-sft"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr  # cancelling a finished job changes nothing
    assert client.post_training.job.status(job_uuid="ls-fsdp-sft").status == "completed"


def test_service_down_is_a_504_that_says_so(stack, llama_stack_factory, tmp_path):
    """With the training service unreachable, Llama Stack answers 504 naming the URL (not a bare 500)."""
    from helpers import free_port
    from llama_stack_client import APIStatusError

    dead = f"http://127.0.0.1:{free_port()}"
    server = llama_stack_factory(REPO_ROOT / "run_fsdp.yaml", tmp_path / "stack",
                                 env={"TRL_FSDP_URL": dead, "TRL_FSDP_STACK_DIR": str(tmp_path / "stack")})
    with pytest.raises(APIStatusError) as e:
        server.client().post_training.job.list()
    assert e.value.status_code == 504 and dead in str(e.value)
