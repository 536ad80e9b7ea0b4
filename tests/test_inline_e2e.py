"""End-to-end tests of the inline::trl post-training provider through a real `llama stack run` server.

One server serves the whole module (jobs run one at a time, max_concurrent_jobs 1); the restart test
starts its own pair of servers on a separate data directory. Every training job really trains the tiny
offline models from scripts/build_tiny_models.py, and the outcomes are checked on the saved artifacts.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import signal
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from helpers import (
    hf_cache_with,
    kill_pids,
    process_group_exists,
    processes_mentioning,
    wait_for_job,
    wait_for_step,
    wait_until,
)
from llama_stack_client import BadRequestError
from measures import (
    dpo_margin,
    generate,
    last_logits,
    load_causal,
    mean_answer_nll,
    mean_token_kl,
)

pytestmark = pytest.mark.slow

JOB_TIMEOUT = 600  # generous: the machine may be shared and 10x slower than usual


# -- request builders --------------------------------------------------------------------------------
def training_config(dataset_id="toy", steps=20, epochs=1, lr=3e-3, batch_size=8, **extra) -> dict:
    return {
        "n_epochs": epochs,
        "max_steps_per_epoch": steps,
        "dtype": "fp32",
        "data_config": {"dataset_id": dataset_id, "batch_size": batch_size, "shuffle": True, "data_format": "instruct"},
        "optimizer_config": {"optimizer_type": "adamw", "lr": lr, "weight_decay": 0.0, "num_warmup_steps": 0},
        **extra,
    }


def new_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def sft(client, job_uuid, model, tc, algorithm_config=None):
    return client.post_training.supervised_fine_tune(
        job_uuid=job_uuid, model=model, training_config=tc, hyperparam_search_config={}, logger_config={},
        algorithm_config=algorithm_config,
    )


def dpo(client, job_uuid, model, tc, algorithm_config):
    return client.post_training.preference_optimize(
        job_uuid=job_uuid, finetuned_model=model, algorithm_config=algorithm_config, training_config=tc,
        hyperparam_search_config={}, logger_config={},
    )


def run_job(client, submit, *args, expect="completed", **kw):
    """Submit, wait, check the final state; return the final status."""
    job_uuid = args[0]
    job = submit(client, *args, **kw)
    assert job.job_uuid == job_uuid
    status = wait_for_job(client, job_uuid, JOB_TIMEOUT)
    res = status.resources_allocated or {}
    assert status.status == expect, (
        f"job {job_uuid}: {status.status}, error: {res.get('error')}\n{tail(res.get('log_file'))}"
    )
    return status


def tail(path, n=30) -> str:
    if not path or not Path(path).exists():
        return ""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])


def step_losses(run_dir) -> list[float]:
    """Per-step training losses from RUN_DIR/metrics.jsonl (the records that carry 'loss')."""
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if line.strip() and "loss" in json.loads(line)]


def metric_records(run_dir) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_decreasing(losses: list[float], n: int = 5):
    assert len(losses) >= 2 * n, f"too few logged losses: {losses}"
    first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
    assert last < first, f"loss did not decrease: first {n} mean {first:.4f}, last {n} mean {last:.4f}: {losses}"


def checkpoint_dict(c) -> dict:
    return c if isinstance(c, dict) else c.model_dump()


# -- module fixtures ----------------------------------------------------------------------------------
HUB_ID = "tiny-org/tiny-student"  # the tiny student, placed in the server's Hugging Face cache


@pytest.fixture(scope="module")
def server(llama_stack_factory, run_yaml, tmp_path_factory, tiny_models):
    hf_home = hf_cache_with(tiny_models["student"], HUB_ID, tmp_path_factory.mktemp("hf_home"))
    return llama_stack_factory(run_yaml, tmp_path_factory.mktemp("inline_e2e_data"),
                               env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def client(server, toy_data):
    c = server.client()
    register = c.datasets.register
    register(purpose="post-training/messages", source={"type": "rows", "rows": toy_data["instruct"]}, dataset_id="toy")
    register(purpose="post-training/messages", source={"type": "rows", "rows": toy_data["instruct"][:32]},
             dataset_id="toy_small")
    register(purpose="post-training/messages", source={"type": "rows", "rows": toy_data["dialog"][:32]},
             dataset_id="toy_dialog")
    register(purpose="post-training/messages", source={"type": "rows", "rows": toy_data["preference"]},
             dataset_id="pref")
    register(purpose="post-training/messages", source={"type": "rows", "rows": []}, dataset_id="empty")
    register(purpose="post-training/messages", source={"type": "rows", "rows": [{"question": "q", "reply": "r"}]},
             dataset_id="wrong_format")
    return c


@pytest.fixture(scope="module")
def student(tiny_models):
    return tiny_models["student"]


@pytest.fixture(scope="module")
def base_student(student):
    return load_causal(student)


def assert_server_answers(server, client):
    assert server.alive(), server.log_tail()
    import urllib.request

    with urllib.request.urlopen(server.base_url + "/v1/health", timeout=10) as r:
        assert r.status == 200
    client.post_training.job.list()


# -- bad input ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert_model")
    (d / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100,
    }))
    return str(d)


def _with_data(tc, **data):
    return {**tc, "data_config": {**tc["data_config"], **data}}


def _with_opt(tc, **opt):
    return {**tc, "optimizer_config": {**tc["optimizer_config"], **opt}}


BAD_SFT = {
    # id: (changes to the request, words the 400 message must contain)
    "unknown_dataset": (lambda tc, m: (_with_data(tc, dataset_id="no-such-dataset"), m, None),
                        ["training_config.data_config.dataset_id", "no-such-dataset"]),
    "empty_dataset": (lambda tc, m: (_with_data(tc, dataset_id="empty"), m, None),
                      ["training_config.data_config.dataset_id", "empty"]),
    "wrong_row_format": (lambda tc, m: (_with_data(tc, dataset_id="wrong_format"), m, None),
                         ["training_config.data_config.dataset_id", "row 0", "input_query"]),
    "missing_model_dir": (lambda tc, m: (tc, "/nonexistent/model/dir", None), ["model", "/nonexistent/model/dir"]),
    "batch_size_0": (lambda tc, m: (_with_data(tc, batch_size=0), m, None), ["batch_size"]),
    "n_epochs_0": (lambda tc, m: ({**tc, "n_epochs": 0}, m, None), ["n_epochs"]),
    "negative_lr": (lambda tc, m: (_with_opt(tc, lr=-1e-3), m, None), ["lr", "greater than 0"]),
    "unknown_peft_method": (lambda tc, m: (tc, m, {"type": "PEFT", "method": "bottleneck"}), ["method", "ia3"]),
    "qat": (lambda tc, m: (tc, m, {"type": "QAT", "quantizer_name": "int8", "group_size": 32}),
            ["algorithm_config", "QAT"]),
    "save_steps_0": (lambda tc, m: ({**tc, "save_steps": 0}, m, None), ["save_steps"]),
}


@pytest.mark.parametrize("case", list(BAD_SFT))
def test_bad_sft_request_is_400_naming_the_field(server, client, student, case):
    change, words = BAD_SFT[case]
    tc, model, algo = change(training_config(steps=2), student)
    job_uuid = new_id(f"bad-{case}")
    with pytest.raises(BadRequestError) as e:
        sft(client, job_uuid, model, tc, algo)
    assert e.value.status_code == 400
    for word in words:
        assert word in str(e.value), f"{word!r} not in {e.value}"
    # Nothing was recorded or left behind, and the server still answers.
    assert job_uuid not in {j.job_uuid for j in client.post_training.job.list()}
    assert not (server.data_dir / "runs" / job_uuid).exists()
    assert_server_answers(server, client)


@pytest.mark.parametrize("job_uuid", ["..", ".", "../escape", "a/b", ".hidden", ""])
def test_job_uuid_that_is_not_a_plain_name_is_400_and_deletes_nothing(server, client, student, job_uuid):
    """A job_uuid names the run directory: '..' with a bad dataset once wiped the whole data dir."""
    def snapshot():
        runs = server.data_dir / "runs"
        return sorted(p.name for p in server.data_dir.iterdir()), sorted(runs.iterdir()) if runs.exists() else []

    before, jobs_before = snapshot(), [j.job_uuid for j in client.post_training.job.list()]
    with pytest.raises(BadRequestError) as e:
        sft(client, job_uuid, student, _with_data(training_config(steps=2), dataset_id="wrong_format"))
    assert (server.data_dir / "jobs.db").is_file()
    assert snapshot() == before
    assert "job_uuid" in str(e.value), str(e.value)
    assert [j.job_uuid for j in client.post_training.job.list()] == jobs_before
    assert_server_answers(server, client)


def test_model_that_is_not_a_causal_lm_is_400(server, client, encoder_model_dir):
    with pytest.raises(BadRequestError) as e:
        sft(client, new_id("bad-bert"), encoder_model_dir, training_config(steps=2))
    msg = str(e.value)
    assert "model" in msg and "bert" in msg and "not a causal LM" in msg, msg
    assert_server_answers(server, client)


def test_unknown_dpo_loss_type_is_400(server, client, student):
    with pytest.raises(BadRequestError) as e:
        dpo(client, new_id("bad-dpo"), student, training_config("pref", steps=2),
            {"type": "dpo", "beta": 0.1, "loss_type": "no_such_loss"})
    assert "loss_type" in str(e.value) and "sigmoid" in str(e.value), str(e.value)
    assert_server_answers(server, client)


def test_dpo_on_instruct_rows_is_400(server, client, student):
    with pytest.raises(BadRequestError) as e:
        dpo(client, new_id("bad-dpo-rows"), student, training_config("toy", steps=2), {"type": "dpo", "reward_scale": 0.1})
    assert "training_config.data_config.dataset_id" in str(e.value) and "chosen" in str(e.value), str(e.value)
    assert_server_answers(server, client)


@pytest.mark.parametrize("call", ["status", "cancel", "artifacts"])
def test_unknown_job_uuid_is_400(server, client, call):
    with pytest.raises(BadRequestError) as e:
        getattr(client.post_training.job, call)(job_uuid="no-such-job")
    assert "job_uuid" in str(e.value) and "no-such-job" in str(e.value), str(e.value)
    assert_server_answers(server, client)


def test_duplicate_job_uuid_is_400(server, client, student):
    job_uuid = new_id("dup")
    sft(client, job_uuid, student, training_config("toy_small", steps=2))
    try:
        with pytest.raises(BadRequestError) as e:
            sft(client, job_uuid, student, training_config("toy_small", steps=2))
        assert "job_uuid" in str(e.value) and "already exists" in str(e.value), str(e.value)
        assert [j.job_uuid for j in client.post_training.job.list()].count(job_uuid) == 1
    finally:
        status = wait_for_job(client, job_uuid, JOB_TIMEOUT)
    # The rejected duplicate did not disturb the first job or its run directory.
    assert status.status == "completed", status
    assert Path(status.resources_allocated["run_dir"], "checkpoints", "final", "config.json").is_file()
    assert_server_answers(server, client)


def test_corrupted_weights_job_fails_with_error(server, client, student, tmp_path):
    model = tmp_path / "corrupted"
    shutil.copytree(student, model)
    (model / "model.safetensors").write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00not a safetensors header" * 10)
    job_uuid = new_id("corrupt")
    status = run_job(client, sft, job_uuid, str(model), training_config("toy_small", steps=2), expect="failed")
    res = status.resources_allocated
    assert "safetensor" in res["error"].lower(), res  # the load error of the broken weights file
    assert status.completed_at is not None
    run_status = json.loads(Path(res["run_dir"], "status.json").read_text())
    assert run_status["state"] == "failed" and run_status["error"], run_status
    assert res["error"].startswith(run_status["error"]), (res["error"], run_status["error"])
    assert "Traceback" in Path(res["log_file"]).read_text(errors="replace")
    assert not Path(res["run_dir"], "checkpoints", "final").exists()
    assert_server_answers(server, client)


# -- supervised fine-tuning ------------------------------------------------------------------------------
def test_sft_full_trains_and_saves_a_loadable_model(client, student, base_student, toy_data):
    job_uuid = new_id("sft-full")
    status = run_job(client, sft, job_uuid, student, training_config("toy", steps=25, lr=3e-3))
    res = status.resources_allocated
    run_dir = Path(res["run_dir"])

    # Real timestamps, in order.
    assert status.scheduled_at and status.started_at and status.completed_at
    assert status.scheduled_at <= status.started_at <= status.completed_at
    assert res["step"] == res["total_steps"] == 25

    losses = step_losses(run_dir)
    assert len(losses) == 25
    assert_decreasing(losses)

    # The final checkpoint, with its metrics, in status and in artifacts.
    final = run_dir / "checkpoints" / "final"
    checkpoints = [checkpoint_dict(c) for c in status.checkpoints]
    assert [c["path"] for c in checkpoints] == [str(final)]
    metrics = checkpoints[0]["training_metrics"]
    assert metrics and math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["validation_loss"])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["validation_loss"]), rel=1e-6)
    assert metrics["train_loss"] == pytest.approx(losses[-1])
    artifacts = client.post_training.job.artifacts(job_uuid=job_uuid)
    assert [checkpoint_dict(c)["path"] for c in artifacts.checkpoints] == [str(final)]

    # It loads with the Auto classes, generates, and fits the task better than the untrained student.
    model, tok = load_causal(final)
    assert generate(model, tok, toy_data["heldout_prompts"][0]["input_query"])[0] >= 1
    heldout = toy_data["heldout_prompts"][:10]
    before, after = mean_answer_nll(*base_student, heldout), mean_answer_nll(model, tok, heldout)
    assert after < before - 0.5, (before, after)
    assert job_uuid in {j.job_uuid for j in client.post_training.job.list()}


def test_sft_lora_checkpoints_rotate_and_load_with_peft(client, student, base_student, toy_data):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job_uuid = new_id("sft-lora")
    lora = {"type": "LoRA", "lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": True,
            "apply_lora_to_output": False, "rank": 8, "alpha": 16}
    tc = training_config("toy", steps=12, lr=5e-3, save_steps=4, save_total_limit=2)
    status = run_job(client, sft, job_uuid, student, tc, algorithm_config=lora)
    ckpt_root = Path(status.resources_allocated["run_dir"]) / "checkpoints"

    # save_steps 4 over 12 steps saves 4, 8, 12; save_total_limit 2 keeps the newest two.
    on_disk = sorted(p.name for p in ckpt_root.iterdir() if p.is_dir())
    assert on_disk == ["checkpoint-12", "checkpoint-8", "final"], on_disk
    expected = [str(ckpt_root / n) for n in ("checkpoint-8", "checkpoint-12", "final")]
    artifacts = [checkpoint_dict(c) for c in client.post_training.job.artifacts(job_uuid=job_uuid).checkpoints]
    assert [c["path"] for c in artifacts] == expected
    assert [c["identifier"] for c in artifacts] == [f"{job_uuid}-step8", f"{job_uuid}-step12", f"{job_uuid}-final"]
    assert all(c["training_metrics"] for c in artifacts)

    query = toy_data["heldout_prompts"][0]["input_query"]
    base_logits = last_logits(*base_student, query)
    for path in expected:
        config = json.loads(Path(path, "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA"
        assert set(config["target_modules"]) == {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
        tok = AutoTokenizer.from_pretrained(student)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student), path).eval()
        n_new, _ = generate(model, tok, query)
        assert n_new >= 1
        assert not torch.allclose(last_logits(model, tok, query), base_logits, atol=1e-5), path
    auto = AutoPeftModelForCausalLM.from_pretrained(expected[-1]).eval()
    auto_tok = AutoTokenizer.from_pretrained(expected[-1])
    assert generate(auto, auto_tok, query)[0] >= 1


@pytest.mark.parametrize("method", ["ia3", "prefix_tuning", "prompt_tuning", "loha", "lokr"])
def test_sft_peft_method_trains_and_loads(client, student, base_student, toy_data, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job_uuid = new_id(f"peft-{method}")
    status = run_job(client, sft, job_uuid, student, training_config("toy_small", steps=4, lr=1e-2),
                     algorithm_config={"type": "PEFT", "method": method, "num_virtual_tokens": 4})
    final = Path(status.resources_allocated["run_dir"]) / "checkpoints" / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper()
    assert len(step_losses(final.parent.parent)) == 4

    tok = AutoTokenizer.from_pretrained(final)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student), str(final)).eval()
    query = toy_data["heldout_prompts"][0]["input_query"]
    assert generate(model, tok, query)[0] >= 1
    assert not torch.allclose(last_logits(model, tok, query), last_logits(*base_student, query), atol=1e-5)


# -- preference optimization ------------------------------------------------------------------------------
DPO_CONFIGS = {
    # The full payload of Llama Stack 0.2.12's typed client (all four fields Required): reward_scale is DPO's
    # beta; reward_clip, gamma, and epsilon (label smoothing, unread by the sigmoid loss) are not applied.
    "reward_scale": {"type": "dpo", "reward_scale": 0.1, "reward_clip": 5.0, "epsilon": 0.1, "gamma": 0.99},
    # Later releases' fields.
    "beta_loss_type": {"type": "dpo", "beta": 0.1, "loss_type": "ipo"},
}


@pytest.mark.parametrize("name", list(DPO_CONFIGS))
def test_dpo_widens_the_chosen_rejected_margin(client, student, base_student, toy_data, name):
    job_uuid = new_id(f"dpo-{name}")
    tc = training_config("pref", steps=25, epochs=2, lr=5e-3)
    status = run_job(client, dpo, job_uuid, student, tc, DPO_CONFIGS[name])
    run_dir = Path(status.resources_allocated["run_dir"])
    spec = json.loads((run_dir / "spec.json").read_text())["dpo"]
    cfg = DPO_CONFIGS[name]
    assert spec["beta"] == cfg.get("beta", cfg.get("reward_scale"))
    assert spec["loss_type"] == [cfg.get("loss_type", "sigmoid")]
    if "epsilon" in cfg:
        assert spec["label_smoothing"] == 0.0
        assert set(status.resources_allocated["not_applied"]) == {
            "algorithm_config.reward_clip", "algorithm_config.gamma", "algorithm_config.epsilon"}
    assert len(step_losses(run_dir)) == 50

    final = run_dir / "checkpoints" / "final"
    model, tok = load_causal(final)
    pairs = toy_data["preference"][:100]  # pairs the job trained on
    before, after = dpo_margin(*base_student, pairs), dpo_margin(model, tok, pairs)
    # Tuned: about 0.06 -> 1.5 (reward_scale) and 0.06 -> 2.4 (ipo); 0.5 leaves room for noise.
    assert after > before + 0.5, f"margin before {before:.3f}, after {after:.3f}"
    assert generate(model, tok, pairs[0]["prompt"])[0] >= 1


def test_grpo_runs_inline_through_the_typed_client(client, student):
    """GRPO (our algorithm_config type) on the inline provider, sent by llama-stack-client's
    preference_optimize: prompts from instruct rows, an exact-match grader on their expected_answer column;
    every step logs the grader's reward (learning itself: tests/test_grpo.py)."""
    job_uuid = new_id("grpo")
    grader = {"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
              "reference": "{{ item.expected_answer }}", "operation": "eq"}
    tc = training_config("toy_small", steps=2, lr=1e-4, batch_size=2)
    status = run_job(client, dpo, job_uuid, student, tc, {"type": "grpo", "graders": [grader], "num_generations": 4,
                                                          "max_completion_length": 8})
    records = [r for r in metric_records(status.resources_allocated["run_dir"]) if "loss" in r]
    assert len(records) == 2 and all("rewards/exact/mean" in r and "reward_std" in r for r in records), records
    with pytest.raises(BadRequestError, match="graders.0..reference|graders\\[0\\].reference"):
        dpo(client, new_id("grpo-bad"), student, tc,
            {"type": "grpo", "graders": [{**grader, "reference": "{{ item.answer }}"}]})


# -- distillation -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tiny_models):
    return load_causal(tiny_models["teacher"])


@pytest.fixture(scope="module")
def heldout_teacher_sequences(tiny_builder, teacher, toy_data):
    """Held-out prompts with the teacher's greedy answers (prompts the jobs never train on)."""
    queries = [r["input_query"] for r in toy_data["heldout_prompts"][:16]]
    answers = tiny_builder.greedy_answers(teacher[0], teacher[1], queries)
    return list(zip(queries, answers))


def distill_config(teacher_path, method, **kw):
    return {"type": "distillation", "teacher_model": teacher_path, "method": method, **kw}


def test_distill_logit_brings_student_closer_to_teacher(client, student, base_student, tiny_models, teacher,
                                                        heldout_teacher_sequences):
    job_uuid = new_id("distill-logit")
    status = run_job(client, sft, job_uuid, student, training_config("toy", steps=20, lr=3e-3),
                     algorithm_config=distill_config(tiny_models["teacher"], "logit", temperature=1.0))
    run_dir = Path(status.resources_allocated["run_dir"])
    assert json.loads((run_dir / "spec.json").read_text())["method"] == "distill"
    model, tok = load_causal(run_dir / "checkpoints" / "final")
    before = mean_token_kl(base_student[0], teacher[0], tok, heldout_teacher_sequences)
    after = mean_token_kl(model, teacher[0], tok, heldout_teacher_sequences)
    assert after < 0.8 * before, f"KL(teacher||student) before {before:.3f}, after {after:.3f}"


def test_distill_hybrid_logs_hard_and_soft_losses(client, student, tiny_models):
    job_uuid = new_id("distill-hybrid")
    status = run_job(client, sft, job_uuid, student, training_config("toy", steps=15, lr=3e-3),
                     algorithm_config=distill_config(tiny_models["teacher"], "hybrid", alpha=0.5))
    records = [r for r in metric_records(status.resources_allocated["run_dir"]) if "loss" in r]
    assert len(records) == 15
    for r in records:
        # loss = alpha * hard + (1 - alpha) * soft, step by step
        assert r["hard_loss"] > 0 and r["soft_loss"] > 0
        assert r["loss"] == pytest.approx(0.5 * r["hard_loss"] + 0.5 * r["soft_loss"], rel=1e-3)
    assert_decreasing([r["loss"] for r in records])


def test_distill_output_trains_on_teacher_answers(client, student, tiny_models, toy_data):
    job_uuid = new_id("distill-output")
    status = run_job(client, sft, job_uuid, student, training_config("toy_small", steps=4, lr=3e-3),
                     algorithm_config=distill_config(tiny_models["teacher"], "output", max_new_tokens=12))
    run_dir = Path(status.resources_allocated["run_dir"])
    outputs = [json.loads(line) for line in (run_dir / "teacher_outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == 32
    # They really are the teacher's answers: the pretrained teacher reverses the letters.
    expected = {r["input_query"]: r["expected_answer"] for r in toy_data["instruct"][:32]}
    correct = sum(o["completion"][0]["content"] == expected[o["prompt"][0]["content"]] for o in outputs)
    assert correct >= 16, f"only {correct}/32 teacher answers are right: {outputs[:3]}"
    assert (run_dir / "checkpoints" / "final" / "config.json").is_file()
    assert len(step_losses(run_dir)) == 4


def test_distill_logit_with_other_tokenizer_teacher_is_400(server, client, student, tiny_models):
    with pytest.raises(BadRequestError) as e:
        sft(client, new_id("distill-tok"), student, training_config("toy_small", steps=2),
            algorithm_config=distill_config(tiny_models["other_tokenizer_student"], "logit"))
    assert "algorithm_config.teacher_model" in str(e.value) and "tokenizer" in str(e.value), str(e.value)
    assert_server_answers(server, client)


def test_distill_output_with_other_tokenizer_teacher_is_accepted(client, student, tiny_models):
    job_uuid = new_id("distill-output-tok")
    status = run_job(client, sft, job_uuid, student, training_config("toy_small", steps=2, lr=3e-3),
                     algorithm_config=distill_config(tiny_models["other_tokenizer_student"], "output",
                                                     max_new_tokens=4))
    run_dir = Path(status.resources_allocated["run_dir"])
    assert len((run_dir / "teacher_outputs.jsonl").read_text().splitlines()) == 32
    assert (run_dir / "checkpoints" / "final" / "config.json").is_file()


# -- job lifecycle -------------------------------------------------------------------------------------
LONG = dict(steps=25, epochs=400)  # 10,000 steps: far longer than any test waits; these jobs get cancelled


def run_status_file(run_dir) -> dict:
    return json.loads(Path(run_dir, "status.json").read_text())


def stored_pid(data_dir, job_uuid) -> int | None:
    """The pid the job store recorded for the job (read-only look at the provider's SQLite store)."""
    db = sqlite3.connect(f"file:{Path(data_dir, 'jobs.db')}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT pid FROM jobs WHERE job_uuid = ?", [job_uuid]).fetchone()
    finally:
        db.close()
    return row[0] if row else None


def assert_no_process_left(pid: int, run_dir) -> None:
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the job's process group (its leader's pid) is gone
    leftovers = processes_mentioning(str(run_dir))
    kill_pids([p for p, _ in leftovers])  # never leave them running, even when the check fails
    assert not leftovers, f"processes of {run_dir} survived: {leftovers}"


def test_queue_runs_one_job_at_a_time(server, client, student):
    first, second = new_id("queue-first"), new_id("queue-second")
    sft(client, first, student, training_config("toy", **LONG))
    sft(client, second, student, training_config("toy_small", steps=2))
    try:
        assert client.post_training.job.status(job_uuid=second).status == "scheduled"
        # Still waiting while the first one is really training.
        running = wait_for_step(client, first, min_step=2)
        assert running.status == "in_progress"
        s2 = client.post_training.job.status(job_uuid=second)
        assert s2.status == "scheduled" and s2.started_at is None, s2
        assert not Path(s2.resources_allocated["run_dir"], "logs", "train.log").exists()
        listed = [j.job_uuid for j in client.post_training.job.list()]
        assert listed.index(first) < listed.index(second)
    finally:
        client.post_training.job.cancel(job_uuid=first)
    # The freed slot goes to the queued job, which then runs to completion.
    s1 = client.post_training.job.status(job_uuid=first)
    assert s1.status == "cancelled"
    s2 = wait_for_job(client, second, JOB_TIMEOUT)
    assert s2.status == "completed", s2.resources_allocated.get("error")
    assert s2.started_at >= s1.completed_at


def test_cancel_stops_the_job_and_all_its_processes(server, client, student):
    job_uuid = new_id("cancel")
    sft(client, job_uuid, student, training_config("toy", **LONG))
    try:
        running = wait_for_step(client, job_uuid, min_step=1)
        run_dir = running.resources_allocated["run_dir"]
        pid = run_status_file(run_dir)["pid"]
        assert pid == stored_pid(server.data_dir, job_uuid)  # the training process leads its process group
        assert process_group_exists(pid)
        assert processes_mentioning(run_dir), "the training process should be running before the cancel"
    finally:
        client.post_training.job.cancel(job_uuid=job_uuid)

    status = client.post_training.job.status(job_uuid=job_uuid)
    assert status.status == "cancelled", status
    assert status.completed_at is not None and status.started_at <= status.completed_at
    assert run_status_file(run_dir)["state"] == "cancelled"
    assert_no_process_left(pid, run_dir)
    assert not Path(run_dir, "checkpoints", "final").exists()
    # Cancelling a finished job changes nothing.
    client.post_training.job.cancel(job_uuid=job_uuid)
    assert client.post_training.job.status(job_uuid=job_uuid).status == "cancelled"
    assert_server_answers(server, client)


# -- restart ---------------------------------------------------------------------------------------------
PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper(on: bool) -> bool:
    """Make this process adopt orphaned descendants, so that a training process orphaned by a killed
    server is reaped here (this machine's init does not reap zombies, and a zombie still answers
    os.killpg(pgid, 0))."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_when_dead(pid: int, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return  # not (or no longer) our child
        if done:
            return
        time.sleep(0.05)


def test_restart_keeps_finished_jobs_and_fails_the_running_one(llama_stack_factory, run_yaml, tmp_path_factory,
                                                               student, toy_data):
    data_dir = tmp_path_factory.mktemp("restart_data")
    first = llama_stack_factory(run_yaml, data_dir)
    c1 = first.client()
    c1.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": toy_data["instruct"][:32]},
                         dataset_id="toy_small")
    done_job, running_job, queued_job = new_id("done"), new_id("running"), new_id("queued")
    run_job(c1, sft, done_job, student, training_config("toy_small", steps=2))
    artifacts_before = [checkpoint_dict(c) for c in c1.post_training.job.artifacts(job_uuid=done_job).checkpoints]
    assert artifacts_before

    sft(c1, running_job, student, training_config("toy_small", steps=4, epochs=2500))
    sft(c1, queued_job, student, training_config("toy_small", steps=2))
    running = wait_for_step(c1, running_job, min_step=1)
    run_dir = running.resources_allocated["run_dir"]
    pid = run_status_file(run_dir)["pid"]

    assert set_child_subreaper(True), "prctl(PR_SET_CHILD_SUBREAPER) failed"
    stop_reaper = threading.Event()
    reaper = threading.Thread(target=reap_when_dead, args=(pid, stop_reaper), daemon=True)
    try:
        os.killpg(first.pgid, signal.SIGKILL)  # the server dies without any chance to clean up
        first.proc.wait(timeout=30)
        time.sleep(0.5)
        # The training process runs in its own session: it outlives the server.
        assert process_group_exists(pid) and processes_mentioning(run_dir)
        reaper.start()

        second = llama_stack_factory(run_yaml, data_dir)
        c2 = second.client()
        listed = [j.job_uuid for j in c2.post_training.job.list()]
        assert listed[:3] == [done_job, running_job, queued_job], listed

        done = c2.post_training.job.status(job_uuid=done_job)
        assert done.status == "completed"
        artifacts_after = [checkpoint_dict(c) for c in c2.post_training.job.artifacts(job_uuid=done_job).checkpoints]
        assert [a["path"] for a in artifacts_after] == [a["path"] for a in artifacts_before]
        assert all(Path(a["path"], "config.json").is_file() for a in artifacts_after)

        failed = c2.post_training.job.status(job_uuid=running_job)
        assert failed.status == "failed", failed
        assert "restart" in failed.resources_allocated["error"], failed.resources_allocated
        assert failed.completed_at is not None
        assert run_status_file(run_dir)["state"] == "failed"
        wait_until(lambda: not process_group_exists(pid), timeout=30, message=f"process group {pid} gone")
        assert_no_process_left(pid, run_dir)

        # The job that was still queued survives the restart and runs on the new server.
        queued = wait_for_job(c2, queued_job, JOB_TIMEOUT)
        assert queued.status == "completed", queued.resources_allocated.get("error")
    finally:
        stop_reaper.set()
        set_child_subreaper(False)
        kill_pids([p for p, _ in processes_mentioning(run_dir)])


def test_restart_leaves_a_reused_pid_alone(llama_stack_factory, run_yaml, tmp_path_factory):
    """A job recorded as running when the server (and machine) went down: by the next start its pid may
    belong to an unrelated process group, which the recovery must not signal."""
    import subprocess

    from providers.jobs.store import JobRecord, JobStore

    data_dir = tmp_path_factory.mktemp("stale_pid_data")
    run_dir = data_dir / "runs" / "stale-job"
    run_dir.mkdir(parents=True)
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        store = JobStore(data_dir / "jobs.db")
        store.create(JobRecord(job_uuid="stale-job", method="sft", run_dir=str(run_dir), status="in_progress",
                               scheduled_at="2026-01-01T00:00:00+00:00", started_at="2026-01-01T00:00:01+00:00",
                               pid=bystander.pid))
        del store
        server = llama_stack_factory(run_yaml, data_dir)
        status = server.client().post_training.job.status(job_uuid="stale-job")
        assert status.status == "failed" and "restart" in status.resources_allocated["error"], status
        assert bystander.poll() is None, "the recovery signalled a process group that was not the job's"
    finally:
        bystander.kill()
        bystander.wait()


# -- real clients, published request shapes, hostile input ---------------------------------------------------
def raw_post(server, route: str, body: dict | str):
    """POST as any HTTP client would (a str body is sent as is: JSON that Python's encoder would not write)."""
    import requests

    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{server.base_url}/v1/post-training/{route}", data=data,
                         headers={"content-type": "application/json"}, timeout=120)


def test_dpo_epsilon_is_label_smoothing_where_the_loss_reads_it(client, student):
    job_uuid = new_id("dpo-robust")
    cfg = {"type": "dpo", "reward_scale": 0.1, "reward_clip": 0.0, "epsilon": 0.1, "gamma": 0.0, "loss_type": "robust"}
    status = run_job(client, dpo, job_uuid, student, training_config("pref", steps=2), cfg)
    spec = json.loads((Path(status.resources_allocated["run_dir"]) / "spec.json").read_text())
    assert spec["dpo"]["label_smoothing"] == 0.1 and spec["dpo"]["loss_type"] == ["robust"]
    assert "not_applied" not in status.resources_allocated


def test_published_example_shape_trains_model_and_names_the_result(server, client, student):
    """The remote provider's published DPO example: `model` is the base, `finetuned_model` the result's name,
    a relative checkpoint_dir, a top-level learning_rate, no data_format, no epsilon/gamma."""
    job_uuid = new_id("published")
    body = {
        "job_uuid": job_uuid, "model": student, "finetuned_model": "tiny-student-dpo",
        "checkpoint_dir": "./fsdp_checkpoints",
        "algorithm_config": {"type": "dpo", "reward_scale": 1.0, "reward_clip": 5.0},
        "training_config": {"n_epochs": 1, "max_steps_per_epoch": 3, "learning_rate": 5e-5,
                            "data_config": {"dataset_id": "pref", "batch_size": 4, "shuffle": True}},
        "hyperparam_search_config": {}, "logger_config": {},
    }
    r = raw_post(server, "preference-optimize", body)
    assert r.status_code == 200, r.text
    status = wait_for_job(client, job_uuid, JOB_TIMEOUT)
    assert status.status == "completed", status.resources_allocated.get("error")
    final = Path(checkpoint_dict(client.post_training.job.artifacts(job_uuid=job_uuid).checkpoints[-1])["path"])
    assert final == server.data_dir / "checkpoints" / "fsdp_checkpoints" / "tiny-student-dpo" / "final"
    assert status.resources_allocated["result_name"] == "tiny-student-dpo"
    spec = json.loads((Path(status.resources_allocated["run_dir"]) / "spec.json").read_text())
    assert spec["optimizer"]["lr"] == 5e-5 and spec["model"] == student
    load_causal(final)


def test_hub_model_id_resolves_through_the_offline_cache(server, client):
    job_uuid = new_id("hub-id")
    status = run_job(client, sft, job_uuid, HUB_ID, training_config(steps=2))
    assert status.resources_allocated["model"].endswith("snapshots/" + "0" * 40)
    with pytest.raises(BadRequestError) as e:
        sft(client, new_id("hub-missing"), "tiny-org/not-in-cache", training_config(steps=2))
    message = str(e.value)
    assert "model" in message and "not in the Hugging Face cache" in message and "HF_HUB_OFFLINE" in message


@pytest.mark.parametrize("literal", ["1e999", "-1e999", "NaN", "Infinity"])
def test_non_finite_numbers_are_400_and_the_queue_keeps_working(server, client, student, literal):
    job_uuid = new_id("nonfinite")
    body = {"job_uuid": job_uuid, "model": student, "training_config": training_config(steps=2, lr=0.125),
            "hyperparam_search_config": {}, "logger_config": {}}
    r = raw_post(server, "supervised-fine-tune", json.dumps(body).replace("0.125", literal))
    assert r.status_code == 400, r.text
    assert "lr" in r.text and "finite" in r.text
    r = raw_post(server, "supervised-fine-tune", json.dumps(body).replace('"max_steps_per_epoch": 2', '"max_steps_per_epoch": ' + "9" * 40))
    assert r.status_code == 400 and "max_steps_per_epoch" in r.text, r.text
    assert not (server.data_dir / "runs" / job_uuid).exists()
    assert job_uuid not in {j.job_uuid for j in client.post_training.job.list()}


@pytest.mark.parametrize("checkpoint_dir", ["../outside", "ckpts/../../outside", "/tmp/../etc/x"])
def test_checkpoint_dir_with_parent_references_is_400(server, client, student, checkpoint_dir):
    job_uuid = new_id("dotdot")
    with pytest.raises(BadRequestError) as e:
        client.post_training.supervised_fine_tune(
            job_uuid=job_uuid, model=student, training_config=training_config(steps=2), hyperparam_search_config={},
            logger_config={}, checkpoint_dir=checkpoint_dir)
    assert "checkpoint_dir" in str(e.value) and ".." in str(e.value)
    assert not (server.data_dir / "runs" / job_uuid).exists()


def test_llama_stack_client_cli_drives_jobs(server, client, student):
    """`llama-stack-client post_training list / status / artifacts / cancel`, the 0.2.12 CLI, unmodified."""
    import subprocess
    import sys

    cli = [str(Path(sys.executable).parent / "llama-stack-client"), "--endpoint", server.base_url, "post_training"]

    def run(*args):
        out = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    done = new_id("cli-done")
    run_job(client, sft, done, student, training_config(steps=2))
    assert done in run("list")
    assert "completed" in run("status", "--job-uuid", done)
    assert "final" in run("artifacts", "--job-uuid", done)
    long = new_id("cli-cancel")
    sft(client, long, student, training_config(steps=2000, epochs=50))
    run("cancel", "--job-uuid", long)
    assert wait_for_job(client, long, 60).status == "cancelled"
    assert "cancelled" in run("status", "--job-uuid", long)
