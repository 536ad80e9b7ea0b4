"""KTO, ORPO and CPO as a user asks for them: preference-optimize with `algorithm_config.type` "kto" / "orpo" / "cpo",
through the FSDP service (a real `trl-fsdp-service` process, torchrun on gloo) and the inline provider (a
real `llama stack run`). Each trains the tiny student a few steps on paired preference rows and checks the
objective moved the right way on the saved model."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from helpers import processes_mentioning, wait_for_job
from measures import dpo_margin, load_causal
from test_fsdp_service import Service

pytestmark = pytest.mark.slow

PAIRS = 64  # the rows every job trains on (and the margin is measured on)


@pytest.fixture(scope="module")
def service(tmp_path_factory, toy_data, tiny_models):
    svc = Service(tmp_path_factory.mktemp("preference_methods") / "data")
    prefs = "".join(json.dumps(r) + "\n" for r in toy_data["preference"][:PAIRS])
    assert svc.post("/v1/datasets/prefs/rows", data=prefs).json()["rows"] == PAIRS
    yield svc
    svc.stop()
    for pid, _ in processes_mentioning(str(svc.data_dir)):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def base_margin(tiny_models, toy_data):
    return dpo_margin(*load_causal(tiny_models["student"]), toy_data["preference"][:PAIRS])


def preference_body(job_uuid: str, model: str, algorithm_config: dict, steps: int = 16) -> dict:
    """One epoch of PAIRS rows at batch 4 is 16 steps (32 for KTO, whose rows are unpaired)."""
    return {
        "job_uuid": job_uuid, "finetuned_model": f"{job_uuid}-model", "model": model,
        "algorithm_config": algorithm_config,
        "training_config": {
            "n_epochs": 1, "max_steps_per_epoch": steps, "dtype": "fp32", "max_seq_len": 64,
            "data_config": {"dataset_id": "prefs", "batch_size": 4, "shuffle": True},
            "optimizer_config": {"optimizer_type": "adamw", "lr": 5e-3, "weight_decay": 0.0, "num_warmup_steps": 0},
            "torch_run_config": {"nproc_per_node": 1},
        },
    }


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run(service: Service, body: dict) -> tuple[dict, Path]:
    r = service.post("/v1/post-training/preference-optimize", json=body)
    assert r.status_code == 200, r.text
    status = service.wait(body["job_uuid"], timeout=900)
    assert status["status"] == "completed", status["resources_allocated"].get("error")
    artifacts = service.get("/v1/post-training/job/artifacts", params={"job_uuid": body["job_uuid"]}).json()
    final = Path(artifacts["checkpoints"][-1]["path"])
    assert (final / "config.json").is_file()
    return status, final


def test_kto_raises_chosen_over_rejected(service, tiny_models, toy_data, base_margin):
    cfg = {"type": "kto", "beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    status, final = run(service, preference_body("kto-job", tiny_models["student"], cfg, steps=32))
    assert status["resources_allocated"]["method"] == "kto"  # from algorithm_config.type, not the route
    run_dir = service.runs_dir / "kto-job"
    spec = json.loads((run_dir / "spec.json").read_text())
    assert spec["method"] == "kto" and spec["kto"] == {k: v for k, v in cfg.items() if k != "type"}
    assert spec["dpo"] is None
    records = metrics(run_dir)
    assert len([r for r in records if "loss" in r]) == 32  # 64 pairs unpaired: 128 rows at batch 4
    assert any("rewards/chosen" in r and "kl" in r for r in records)  # KTO's own metrics: TRL's KTOTrainer ran
    after = dpo_margin(*load_causal(final), toy_data["preference"][:PAIRS])
    # Tuned: about 0.07 -> 0.65 in 32 steps; 0.25 leaves room for noise.
    assert after > base_margin + 0.25, f"log p(chosen) - log p(rejected): before {base_margin:.3f}, after {after:.3f}"


def test_orpo_grows_the_log_odds_of_chosen_over_rejected(service, tiny_models, toy_data, base_margin):
    status, final = run(service, preference_body("orpo-job", tiny_models["student"], {"type": "orpo", "beta": 1.0}))
    assert status["resources_allocated"]["method"] == "orpo"
    run_dir = service.runs_dir / "orpo-job"
    assert json.loads((run_dir / "spec.json").read_text())["orpo"] == {"beta": 1.0}
    records = metrics(run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 16 and sum(losses[-4:]) < sum(losses[:4]), losses  # NLL + beta * odds-ratio loss
    assert any("log_odds_ratio" in r for r in records)  # ORPO's own metrics: TRL's ORPOTrainer ran
    after = dpo_margin(*load_causal(final), toy_data["preference"][:PAIRS])
    # Tuned: about 0.07 -> 1.26 in 16 steps; 0.5 leaves room for noise.
    assert after > base_margin + 0.5, f"log p(chosen) - log p(rejected): before {base_margin:.3f}, after {after:.3f}"


def test_kto_through_the_inline_provider(llama_stack_factory, run_yaml, tmp_path_factory, tiny_models, toy_data,
                                        base_margin):
    server = llama_stack_factory(run_yaml, tmp_path_factory.mktemp("inline_kto"))
    client = server.client()
    client.datasets.register(purpose="post-training/messages", dataset_id="prefs",
                             source={"type": "rows", "rows": toy_data["preference"][:PAIRS]})
    tc = preference_body("x", "m", {}, steps=32)["training_config"]
    del tc["torch_run_config"]
    client.post_training.preference_optimize(
        job_uuid="inline-kto", finetuned_model=tiny_models["student"], training_config=tc,
        algorithm_config={"type": "kto", "beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
        hyperparam_search_config={}, logger_config={},
    )
    status = wait_for_job(client, "inline-kto", 900)
    assert status.status == "completed", status.resources_allocated
    assert status.resources_allocated["method"] == "kto"
    final = Path(client.post_training.job.artifacts(job_uuid="inline-kto").checkpoints[-1]["path"])
    after = dpo_margin(*load_causal(final), toy_data["preference"][:PAIRS])
    assert after > base_margin + 0.25, f"log p(chosen) - log p(rejected): before {base_margin:.3f}, after {after:.3f}"


def test_cpo_simpo_grows_the_reward_margin(service, tiny_models, toy_data, base_margin):
    """CPO with SimPO's loss (length-normalized log-probs, a target margin, no reference), added by CONTRIBUTING.md's
    checklist: its settings in training/settings.py, one table line, one recipe."""
    cfg = {"type": "cpo", "loss_type": "simpo", "beta": 10.0, "simpo_gamma": 1.0, "cpo_alpha": 0.0}  # SimPO exactly
    status, final = run(service, preference_body("cpo-job", tiny_models["student"], cfg))
    assert status["resources_allocated"]["method"] == "cpo"
    run_dir = service.runs_dir / "cpo-job"
    assert json.loads((run_dir / "spec.json").read_text())["cpo"] == {**{k: v for k, v in cfg.items() if k != "type"},
                                                                       "label_smoothing": 0.0}
    # CPO's own metrics (TRL's CPOTrainer ran); each batch's margin is noisy at this rate, the saved model's is not
    assert len([r for r in metrics(run_dir) if "rewards/margins" in r and "nll_loss" in r]) == 16
    after = dpo_margin(*load_causal(final), toy_data["preference"][:PAIRS])
    # Tuned: about 0.07 -> 1.04 in 16 steps; 0.5 leaves room for noise.
    assert after > base_margin + 0.5, f"log p(chosen) - log p(rejected): before {base_margin:.3f}, after {after:.3f}"
