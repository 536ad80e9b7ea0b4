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
    kill_pids,
    process_group_exists,
    processes_mentioning,
    wait_for_job,
    wait_for_step,
    wait_until,
)
from llama_stack_client import BadRequestError

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


# -- model evaluation in this process ----------------------------------------------------------------
def load_causal(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def chat_prompt(tok, query: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": query}], tokenize=False, add_generation_prompt=True)


def encode_pair(tok, query: str, answer: str) -> tuple[list[int], list[int]]:
    """Prompt ids (chat template, generation prompt) and completion ids (answer + eos)."""
    prompt = tok(chat_prompt(tok, query), add_special_tokens=False)["input_ids"]
    completion = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
    return prompt, completion


@torch.no_grad()
def completion_logits(model, tok, query, answer) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict the completion tokens, and those tokens."""
    prompt, completion = encode_pair(tok, query, answer)
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) + len(completion) - 1], torch.tensor(completion)


def completion_logp(model, tok, query, answer) -> float:
    logits, target = completion_logits(model, tok, query, answer)
    return torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum().item()


def mean_answer_nll(model, tok, rows) -> float:
    total, n = 0.0, 0
    for r in rows:
        logits, target = completion_logits(model, tok, r["input_query"], r["expected_answer"])
        total -= torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum().item()
        n += len(target)
    return total / n


def dpo_margin(model, tok, pairs) -> float:
    """Mean over pairs of log p(chosen + eos | prompt) - log p(rejected + eos | prompt)."""
    return sum(
        completion_logp(model, tok, p["prompt"], p["chosen"]) - completion_logp(model, tok, p["prompt"], p["rejected"])
        for p in pairs
    ) / len(pairs)


def mean_token_kl(student, teacher, tok, sequences) -> float:
    """Mean over completion tokens of KL(teacher || student) at temperature 1."""
    total, n = 0.0, 0
    for query, answer in sequences:
        s_logits, _ = completion_logits(student, tok, query, answer)
        t_logits, _ = completion_logits(teacher, tok, query, answer)
        s, t = torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)
        total += (t.exp() * (t - s)).sum().item()
        n += s.shape[0]
    return total / n


@torch.no_grad()
def generate(model, tok, query: str, max_new_tokens: int = 8) -> tuple[int, str]:
    """Greedy generation from a chat prompt: (number of new tokens, decoded text)."""
    enc = tok(chat_prompt(tok, query), return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1] :]
    return len(new), tok.decode(new, skip_special_tokens=True)


@torch.no_grad()
def last_logits(model, tok, query: str) -> torch.Tensor:
    enc = tok(chat_prompt(tok, query), return_tensors="pt", add_special_tokens=False)
    return model(**enc).logits[0, -1].float()


# -- module fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(llama_stack_factory, run_yaml, tmp_path_factory, tiny_models):
    return llama_stack_factory(run_yaml, tmp_path_factory.mktemp("inline_e2e_data"))


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
    assert res["error"] and len(res["error"]) > 10, res
    assert status.completed_at is not None
    run_status = json.loads(Path(res["run_dir"], "status.json").read_text())
    assert run_status["state"] == "failed" and run_status["error"], run_status
    assert res["error"].startswith(run_status["error"]), (res["error"], run_status["error"])
    assert "Traceback" in Path(res["log_file"]).read_text(errors="replace")
    assert not Path(res["run_dir"], "checkpoints", "final").exists()
    assert_server_answers(server, client)
