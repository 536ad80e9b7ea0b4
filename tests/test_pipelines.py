"""Teacher-student pipelines on the training service: one call, a teacher task, two students with
different PEFT methods trained from cached teacher logits, a merge; and the same steps one by one
through the Python client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, processes_mentioning, stop_process_group, wait_for_health

from providers.remote_fsdp.client import TrainingServiceClient

pytestmark = pytest.mark.slow  # a service process running teacher and student jobs

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    data = tmp_path_factory.mktemp("pipelines") / "data"
    port = free_port()
    log = data.parent / "service.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "providers.remote_fsdp.service.app", "--port", str(port), "--data-dir", str(data),
             "--max-concurrent-jobs", "2"],
            cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    wait_for_health(f"http://127.0.0.1:{port}", timeout=120, proc=proc, path="/health", log_file=log)
    yield TrainingServiceClient(f"http://127.0.0.1:{port}"), data
    stop_process_group(proc)
    for pid, _ in processes_mentioning(str(data)):
        os.kill(pid, signal.SIGKILL)


def teacher_sequences(teacher_outputs: Path, limit: int = 32) -> list[list[int]]:
    rows = [json.loads(line) for shard in sorted(teacher_outputs.glob("shard-*.jsonl")) for line in open(shard)]
    return [(r["input_ids"], r["completion_start"]) for r in rows[:limit]]


@torch.no_grad()
def kl_to_teacher(student, teacher, sequences) -> float:
    """Mean per-token KL(teacher || student) on the answer tokens of the teacher's own answers."""
    total, n = 0.0, 0
    for ids, start in sequences:
        x = torch.tensor([ids])
        t = torch.log_softmax(teacher(x).logits[0, start - 1 : -1], -1)
        s = torch.log_softmax(student(x).logits[0, -len(ids):][start - 1 : -1], -1)
        total += (t.exp() * (t - s)).sum().item()
        n += len(ids) - start
    return total / n


def load_student(path: str | Path):
    from peft import AutoPeftModelForCausalLM

    return AutoPeftModelForCausalLM.from_pretrained(str(path)).eval()


def test_pipeline_two_students_distill_and_merge(service, tiny_models, toy_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client, data = service
    prompts = [{"input_query": r["input_query"]} for r in toy_data["instruct"][:96]]
    # The output layer is adapted too: a random tiny model's LM head is what limits how peaked its
    # distributions can get, and LoRA on the other layers alone barely moves the KL.
    students = [
        {"name": "lora-logit", "model": tiny_models["student"], "method": "logit",
         "peft": {"type": "LoRA", "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                  "apply_lora_to_mlp": True, "apply_lora_to_output": True, "rank": 16, "alpha": 32},
         "n_epochs": 4, "max_steps_per_epoch": 12, "lr": 1e-2},
        {"name": "lora-hybrid", "model": tiny_models["student"], "method": "hybrid",
         "peft": {"type": "PEFT", "method": "lora", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj", "lm_head"],
                  "rank": 16, "alpha": 32},
         "n_epochs": 4, "max_steps_per_epoch": 12, "lr": 1e-2},
    ]
    seen = []
    state = client.run_pipeline(
        {"pipeline_id": "p1", "rows": prompts, "teacher": {"model": tiny_models["teacher"], "top_k": 16,
                                                           "max_new_tokens": 12},
         "students": students, "merge": {"method": "linear"}},
        callback=seen.append, interval_s=0.5,
    )
    assert state["state"] == "completed", state
    assert len(seen) >= 3  # progress was visible while it ran
    out = Path(state["output_dir"])
    shards = sorted((out / "teacher_outputs").glob("shard-*.jsonl"))
    row = json.loads(shards[0].open().readline())
    assert row["prompt"] and row["completion"] and len(row["topk_ids"][0]) == 16

    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_models["student"]).eval()
    sequences = teacher_sequences(out / "teacher_outputs")
    before = kl_to_teacher(base, teacher, sequences)
    for s in state["students"]:
        assert s["status"] == "completed"
        after = kl_to_teacher(load_student(s["output"]), teacher, sequences)
        assert after < 0.9 * before, (s["name"], before, after)

    merged = load_student(out / "merged")
    assert json.loads((out / "merged" / "merge.json").read_text())["peft_type"] == "LORA"
    tok = AutoTokenizer.from_pretrained(out / "merged")
    text = tok.apply_chat_template([{"role": "user", "content": "reverse: a b c"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    generated = merged.generate(**ids, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]


def test_steps_one_by_one_with_the_client(service, tiny_models, toy_data):
    client, data = service
    prompts = [{"input_query": r["input_query"]} for r in toy_data["instruct"][:48]]
    teacher = client.create_teacher_task("t2", teacher_model=tiny_models["teacher"], rows=prompts, top_k=8,
                                         max_new_tokens=12)
    assert client.monitor_tasks([teacher])[teacher]["status"] == "completed"
    jobs = client.create_student_tasks("t2", [
        {"name": "ia3-output", "model": tiny_models["student"], "method": "output",
         "peft": {"type": "PEFT", "method": "ia3"}, "max_steps_per_epoch": 4},
        {"name": "prefix-logit", "model": tiny_models["student"], "method": "logit",
         "peft": {"type": "PEFT", "method": "prefix_tuning"}, "max_steps_per_epoch": 4},
    ])
    final = client.monitor_tasks(jobs)
    assert all(s["status"] == "completed" for s in final.values()), final
    with pytest.raises(RuntimeError, match="peft_type"):  # IA3 and prefix tuning cannot be combined
        client.aggregate_student_outputs(jobs, output_name="mixed")


def test_pipeline_merge_of_unlike_students_is_refused(service, tiny_models):
    client, _ = service
    with pytest.raises(RuntimeError, match="400.*merge"):
        client.run_pipeline({
            "pipeline_id": "p-bad", "rows": [{"input_query": "reverse: a b"}],
            "teacher": {"model": tiny_models["teacher"]},
            "students": [{"name": "a", "model": tiny_models["student"], "peft": {"type": "PEFT", "method": "ia3"}},
                         {"name": "b", "model": tiny_models["student"], "peft": {"type": "PEFT", "method": "lora"}}],
            "merge": {"method": "linear"},
        })


def test_a_cancelled_pipeline_starts_nothing_more_and_stays_cancelled(service, tiny_models, toy_data):
    """Cancel while the teacher runs: the teacher task stops, no student is ever started, and the running
    pipeline thread does not overwrite `cancelled` when it notices."""
    import time

    import requests

    client, _ = service
    pipeline_id = client._call("POST", "/v1/pipelines/teacher-student", json={
        "pipeline_id": "p-cancel", "rows": [{"input_query": r["input_query"]} for r in toy_data["instruct"][:200]],
        "teacher": {"model": tiny_models["teacher"], "top_k": 8, "max_new_tokens": 32, "generation_batch_size": 1},
        "students": [{"name": n, "model": tiny_models["student"], "max_steps_per_epoch": 4} for n in ("a", "b")],
    })["pipeline_id"]
    client._call("POST", f"/v1/pipelines/{pipeline_id}/cancel")
    time.sleep(3)  # the pipeline thread polls every 0.5 s: give it time to notice
    state = client._call("GET", f"/v1/pipelines/{pipeline_id}")
    assert state["state"] == "cancelled", state
    assert state["teacher"]["status"] == "cancelled"
    for student in ("a", "b"):
        r = requests.get(f"{client.base_url}/v1/post-training/job/status",
                         params={"job_uuid": f"{pipeline_id}-student-{student}"}, timeout=10)
        assert r.status_code == 404, r.text  # never started
