"""The adapter workflow on the training service, as a user runs it: the real `openai` client against the
service's chat API, data enhancement (student -> rule judge -> teacher hint -> retry) with the tiny
student and the tiny teacher served by the service, cancel and resume, retries on 429, and the one-call
enhance -> train -> validate -> export pipeline through the Python client.

The toy task ('reverse the letters') is one the teacher gets right and the random student does not, so
enhancement must raise the share of correct answers in the training data, and the trained model must
beat its base on the held-out prompts."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import openai
import pytest
from helpers import token_service

from providers.remote_fsdp.client import TrainingServiceClient

pytestmark = pytest.mark.slow  # trains

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "workflow-test-token"


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_models):
    models_root = str(Path(tiny_models["student"]).parent)
    with token_service(tmp_path_factory.mktemp("workflow"), TOKEN, models_root) as (url, data, log):
        yield {"client": TrainingServiceClient(url, api_token=TOKEN), "url": url, "data": data, "log": log}


def chat_client(service) -> openai.OpenAI:
    return openai.OpenAI(base_url=service["url"] + "/v1/openai/v1", api_key=TOKEN, max_retries=0, timeout=120)


def roles(tiny_models, **extra) -> dict:
    """Student and teacher served by the service; the teacher's hint prompt is the question itself (the
    tiny teacher knows nothing but the task), the judge an exact match against the reference answer."""
    return {"student": {"model": tiny_models["student"], "max_tokens": 12},
            "teacher": {"model": tiny_models["teacher"], "max_tokens": 12},
            "judge": {"type": "rule", "mode": "exact"}, "hint_template": "{question}", **extra}


def test_openai_client_chat_stream_stop_and_limits(service, tiny_models):
    from transformers import AutoTokenizer

    client = chat_client(service)
    messages = [{"role": "user", "content": "reverse: a b c"}]
    r = client.chat.completions.create(model=tiny_models["teacher"], messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == "c b a" and r.choices[0].finish_reason == "stop"
    tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(tok("c b a", add_special_tokens=False)["input_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=tiny_models["teacher"], messages=messages, max_tokens=12,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "c b a" and len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    stopped = client.chat.completions.create(model=tiny_models["teacher"], messages=messages, max_tokens=12,
                                             temperature=0, stop=[" b"])
    assert stopped.choices[0].message.content == "c" and stopped.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model=tiny_models["teacher"], messages=messages, max_tokens=2, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    sampled = [client.chat.completions.create(model=tiny_models["student"], messages=messages, max_tokens=6,
                                              temperature=1.0, seed=s).choices[0].message.content for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling repeatable

    # the plain /v1/chat/completions path serves the same API; every route needs the token
    raw = service["client"]._call("POST", "/v1/chat/completions", json={
        "model": tiny_models["teacher"], "messages": messages, "max_tokens": 12, "temperature": 0})
    assert raw["choices"][0]["message"]["content"] == "c b a"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=service["url"] + "/v1/openai/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=tiny_models["teacher"], messages=messages, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="no job"):
        client.chat.completions.create(model="job:no-such-job", messages=messages, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="outside"):
        client.chat.completions.create(model="/etc", messages=messages, max_tokens=4)
    assert {m.id for m in client.models.list().data} >= {tiny_models["teacher"], tiny_models["student"]}


def test_enhancement_formats_report_cancel_and_resume(service, tiny_models, toy_data):
    svc = service["client"]
    base = toy_data["instruct"][:24]
    rows = [{"messages": [{"role": "user", "content": r["input_query"]}, {"role": "assistant", "content": r["expected_answer"]}],
             "metadata": {"source": "qa", "id": i}} for i, r in enumerate(base[:12])]
    rows += [{"input_query": r["input_query"], "expected_answer": r["expected_answer"]} for r in base[12:]]
    rows.append({"messages": [{"role": "user", "content": "reverse: q r s"}]})  # no reference answer
    state = svc.enhance_data("e1", roles(tiny_models, max_iterations=2, concurrency=2), rows=rows, wait=False)
    assert svc.cancel_task("enhancements", "e1")["state"] == "cancelled"
    partial = [json.loads(line) for line in (service["data"] / "workflows/enhancements/e1/results.jsonl").open()] \
        if (service["data"] / "workflows/enhancements/e1/results.jsonl").exists() else []
    assert len(partial) < len(rows)
    svc.resume_enhancement("e1")
    state = svc.wait_task("enhancements", "e1", interval_s=0.5)
    assert state["state"] == "completed", state
    assert state["progress"]["enhance"]["resumed_from"] == len({r["index"] for r in partial if not r.get("error")})

    d = service["data"] / "workflows/enhancements/e1"
    results = [json.loads(line) for line in (d / "results.jsonl").open()]
    assert sorted(r["index"] for r in results) == list(range(len(rows)))  # every row once, none twice
    report = json.loads((d / "enhancement_report.json").read_text())
    assert report["rows_dropped"] == {"no reference answer": 1} and report["rows_kept"] == len(rows) - 1
    # the teacher is right and the student is not: enhancement raises the share of correct answers
    share = report["training_data_correct_share"]
    assert share["before"] < 0.2 and share["after"] == 1.0, share
    assert report["hints_used"] == (len(rows) - 1) - report["accuracy_by_iteration"][0]["correct"]
    assert [a["iteration"] for a in report["accuracy_by_iteration"]] == [1, 2]

    sft = [json.loads(line) for line in (d / "enhanced_dataset.jsonl").open()]
    first = sft[0]
    assert first["metadata"]["source"] == "qa" and first["metadata"]["enhancement"]["correct"] is True
    answer = first["messages"][-1]["content"]
    # the default format: the accepted answer only (the tiny models return no reasoning), no rejected attempt
    assert answer == base[0]["expected_answer"] and report["solved"]["teacher_only"] > 0
    prefs = [json.loads(line) for line in (d / "preferences.jsonl").open()]
    assert len(prefs) == report["preference_pairs"] > 0
    assert prefs[0]["chosen"][0]["content"] == base[0]["expected_answer"] != prefs[0]["rejected"][0]["content"]
    # both files are rows our trainers take
    from providers.training.data import normalize_rows

    assert len(list(normalize_rows(sft, "completion"))) == len(sft)
    assert len(list(normalize_rows(prefs, "preference"))) == len(prefs)
    files = {f["path"] for f in svc.task_artifacts("enhancements", "e1")["files"]}
    assert {"results.jsonl", "enhanced_dataset.jsonl", "preferences.jsonl", "enhancement_report.json"} <= files


class FlakyProxy(http.server.BaseHTTPRequestHandler):
    """Answers the first `failures` requests with 429 (Retry-After: 0), then forwards to the service."""

    failures, seen, target = 2, 0, ""

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["content-length"]))
        FlakyProxy.seen += 1
        if FlakyProxy.seen <= FlakyProxy.failures:
            self.send_response(429)
            self.send_header("retry-after", "0")
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "slow down"}}')
            return
        req = urllib.request.Request(FlakyProxy.target + self.path, data=body, method="POST",
                                     headers={"content-type": "application/json", "authorization": self.headers["authorization"]})
        with urllib.request.urlopen(req) as r:
            data = r.read()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_enhancement_retries_429_with_backoff(service, tiny_models, toy_data, tmp_path):
    import asyncio

    from providers.enhance import EnhanceConfig, enhance_rows
    from providers.outbound import Endpoint

    FlakyProxy.target = service["url"]  # the service also serves /v1/chat/completions
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        cfg = roles(tiny_models, max_iterations=1, concurrency=1)
        cfg["student"] = {**cfg["student"], "endpoint": "flaky", "backoff_s": 0.01}
        os.environ["WORKFLOW_TEST_KEY"] = TOKEN
        # whoever runs the loop declares the endpoints (on the service: its --outbound-config)
        endpoints = {"flaky": Endpoint(base_url=f"http://127.0.0.1:{proxy.server_port}/v1", api_key_env="WORKFLOW_TEST_KEY")}
        report = asyncio.run(enhance_rows(toy_data["instruct"][:3], EnhanceConfig.model_validate(cfg), tmp_path,
                                          endpoints=endpoints, local_base_url=service["url"] + "/v1/openai/v1",
                                          local_api_key=TOKEN))
    finally:
        proxy.shutdown()
    assert report["requests"]["student"]["retries"] == 2 and report["requests"]["student"]["failures"] == 0
    assert report["rows_processed"] == 3 and not report["errors"]


def test_one_call_enhance_train_validate_export(service, tiny_models, toy_data):
    import gguf

    svc = service["client"]
    heldout = toy_data["heldout_prompts"]
    request = {
        "workflow_id": "w1",
        "rows": toy_data["instruct"][:120],
        "enhance": roles(tiny_models, max_iterations=2, concurrency=4, thinking_format="final-only"),
        # Full SFT: on a random tiny model only the LM head can make the answers peaked (README, pipelines)
        "train": {"method": "sft", "n_epochs": 12, "batch_size": 8, "lr": 4e-3, "max_seq_len": 64},
        "validate": {"prompts": heldout, "max_new_tokens": 12, "match": "exact"},
        "export": {"formats": ["merged", "gguf", "hub"], "gguf_dtype": "f16", "name": "reverse-student",
                   "hub": {"repo": "reverse-student"}},
    }
    seen = []
    state = svc.run_workflow(request, callback=seen.append, interval_s=1.0)
    assert state["state"] == "completed", (state, Path(service["log"]).read_text()[-3000:])
    assert len(seen) >= 3  # progress was visible while it ran

    d = service["data"] / "workflows/workflows/w1"
    results = json.loads((d / "pipeline_results.json").read_text())
    assert [(k, v["status"]) for k, v in results["steps"].items()] == [
        ("enhance", "completed"), ("train", "completed"), ("validate", "completed"), ("export", "completed")]
    assert all(v["elapsed_s"] >= 0 and v["outputs"] for v in results["steps"].values())

    share = results["steps"]["enhance"]["outputs"]["training_data_correct_share"]
    assert share["before"] < 0.2 and share["after"] == 1.0

    report = json.loads((d / "validate/validation.json").read_text())
    s = report["summary"]
    print(f"\nworkflow: correct share of training answers {share['before']:.0%} -> {share['after']:.0%}; "
          f"held-out exact match {s['base_pass_rate']:.0%} (base) -> {s['pass_rate']:.0%} (trained), "
          f"perplexity {s['base_perplexity']:.1f} -> {s['perplexity']:.2f}; "
          f"{report['performance']['tokens_per_s']} tokens/s, peak RSS {report['performance']['peak_rss_mb']} MB; "
          f"steps: {({k: v['elapsed_s'] for k, v in results['steps'].items()})}")
    assert report["files"]["passed"] and report["inference"]["passed"]
    assert s["perplexity"] < 0.1 * s["base_perplexity"]
    assert s["pass_rate"] >= s["base_pass_rate"] and s["changed_share"] > 0.5
    assert len(report["prompts"]) == len(heldout) and all("base_response" in p for p in report["prompts"])
    # The verdict: the default bar (50%) and a significant gain over the base, with the evidence stated
    v = report["verdict"]
    print(f"verdict: {v['reason']}")
    assert v["n"] == len(heldout) and v["min_pass_rate"] == 0.5 and v["pass_rate_ci95"] and v["p_value"] is not None
    assert v["meets_bar"] == (s["pass_rate"] >= 0.5) and v["significant"] == (v["p_value"] < 0.05)
    assert report["passed"] == (v["meets_bar"] and v["significant"])
    assert results["steps"]["validate"]["outputs"]["passed"] == report["passed"]
    md = (d / "validate/validation.md").read_text()
    assert "| held-out perplexity |" in md and "## Verdict" in md and f"sample: {len(heldout)} prompts" in md

    export = json.loads((d / "export/export.json").read_text())
    reader = gguf.GGUFReader(export["gguf"]["path"])
    assert reader.fields["general.architecture"].contents() == "llama" and len(reader.tensors) == 2 * 9 + 3
    assert Path(export["gguf"]["modelfile"]).read_text().startswith("FROM ./reverse-student-f16.gguf")
    assert export["hub"]["dry_run"] and "correct_share_after: 1.0" in (d / "export/hub/README.md").read_text()
    # no outbound config: no Hub token, so a dry run that says why, into the placeholder namespace
    assert export["hub"]["repo_id"] == "local/reverse-student" and "no Hub token" in export["hub"]["dry_run_reason"]

    # the trained model right away, by its job and by the workflow's name
    client = chat_client(service)
    for model in ("job:w1-train", "workflow:w1"):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": heldout[0]["input_query"]}],
                                           max_tokens=12, temperature=0)
        assert r.choices[0].message.content == report["prompts"][0]["response"]


def test_validation_and_export_routes_alone(service, tiny_models, toy_data):
    svc = service["client"]
    v = svc.validate_model("v1", "job:w1-train", toy_data["heldout_prompts"][:5], base_model=tiny_models["student"],
                           max_new_tokens=12, match="exact", interval_s=0.5)
    # five prompts show a gain only when all five flip (p = 1/32); the toy training answers few: not passed
    assert v["state"] == "completed" and v["outputs"]["passed"] is False
    assert v["outputs"]["verdict"]["n"] == 5 and v["outputs"]["verdict"]["p_value"] is not None
    md = svc.download("validations", "v1", "validation.md").decode()
    assert md.startswith("# Validation of") and "## Prompts" in md and "McNemar p =" in md
    # the teacher (it solves the task) against the random student: 5 of 5 vs 0 of 5, p = 1/32: passed
    t = svc.validate_model("v1-teacher", tiny_models["teacher"], toy_data["heldout_prompts"][:5],
                           base_model=tiny_models["student"], max_new_tokens=12, match="exact", interval_s=0.5)
    tv = t["outputs"]["verdict"]
    assert t["outputs"]["passed"] is True, tv
    assert (tv["wins"], tv["losses"], tv["n"]) == (5, 0, 5) and tv["p_value"] == pytest.approx(1 / 32)
    x = svc.export_model("x1", "job:w1-train", ["gguf"], gguf_dtype="bf16", interval_s=0.5)
    assert x["state"] == "completed" and x["outputs"]["gguf"]["dtype"] == "bf16"
    with pytest.raises(RuntimeError, match="400.*no job"):
        svc.validate_model("v2", "job:nope", [{"input_query": "reverse: a"}])
    with pytest.raises(RuntimeError, match="400"):
        svc.export_model("../x", "job:w1-train", ["gguf"])
    with pytest.raises(RuntimeError, match="404"):
        svc.task("validations", "nope")


def test_workflow_dpo_on_the_preference_pairs(service, tiny_models, toy_data):
    """train.method dpo: the corrected answers chosen over the first wrong attempts; steps alone skipped."""
    svc = service["client"]
    state = svc.run_workflow({
        "workflow_id": "w-dpo", "rows": toy_data["instruct"][:12],
        "enhance": roles(tiny_models, max_iterations=1, concurrency=4),
        "train": {"method": "dpo", "n_epochs": 1, "max_steps_per_epoch": 3, "batch_size": 4, "lr": 1e-3,
                  "dpo": {"beta": 0.1}},
    }, interval_s=1.0)
    assert state["state"] == "completed", state
    results = json.loads((service["data"] / "workflows/workflows/w-dpo/pipeline_results.json").read_text())
    assert {k: v["status"] for k, v in results["steps"].items()} == {
        "enhance": "completed", "train": "completed", "validate": "skipped", "export": "skipped"}
    job = svc.status("w-dpo-train")
    assert job["status"] == "completed" and job["resources_allocated"]["method"] == "dpo"
    assert results["steps"]["train"]["outputs"]["rows"] == results["steps"]["enhance"]["outputs"]["preference_pairs"] > 0


def test_cli_chat_and_local_enhance(service, tiny_models, toy_data, tmp_path):
    """`trl-post-training chat` against the service, and `enhance --local` (the loop in the CLI's process,
    roles served by the service)."""
    env = {**os.environ, "TRL_POST_TRAINING_URL": service["url"], "TRL_POST_TRAINING_TOKEN": TOKEN}
    cli = [sys.executable, "-m", "providers.cli"]
    out = subprocess.run([*cli, "chat", tiny_models["teacher"], "reverse: a b c", "--max-tokens", "8"], env=env,
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "c b a", out.stderr[-2000:]

    (tmp_path / "config.json").write_text(json.dumps(roles(tiny_models, max_iterations=1)))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_data["instruct"][:3]))
    out = subprocess.run([*cli, "enhance", str(tmp_path / "config.json"), "--rows", str(tmp_path / "rows.jsonl"),
                          "--local", "--out", str(tmp_path / "enhanced"),
                          "--local-url", service["url"] + "/v1/openai/v1", "--local-key-env", "TRL_POST_TRAINING_TOKEN"],
                         env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "enhanced" / "enhancement_report.json").read_text())
    assert report["rows_processed"] == 3 and report["training_data_correct_share"]["after"] == 1.0


def test_bad_workflow_requests_are_400s_naming_the_field(service, tiny_models):
    svc = service["client"]
    bad_model = {**roles(tiny_models), "student": {"model": "job:missing"}}
    with pytest.raises(RuntimeError, match="400.*config.student.model"):
        svc.enhance_data("bad1", bad_model, rows=[{"input_query": "reverse: a", "expected_answer": "a"}], wait=False)
    secret = {**roles(tiny_models), "teacher": {"model": "m", "base_url": "http://127.0.0.1:9/v1",
                                                 "api_key_env": "TRL_FSDP_API_TOKEN"}}
    with pytest.raises(RuntimeError, match="400.*config.teacher.base_url.*declares none"):
        svc.enhance_data("bad2", secret, rows=[{"input_query": "q", "expected_answer": "a"}], wait=False)
    with pytest.raises(RuntimeError, match="400.*config.teacher.endpoint: 'vllm'"):
        svc.enhance_data("bad2", {**roles(tiny_models), "teacher": {"model": "m", "endpoint": "vllm"}},
                         rows=[{"input_query": "q", "expected_answer": "a"}], wait=False)
    with pytest.raises(RuntimeError, match="400.*max_iterations"):
        svc.enhance_data("bad3", {**roles(tiny_models), "max_iterations": 0}, rows=[{"input_query": "q"}], wait=False)
    with pytest.raises(RuntimeError, match="400.*train.peft"):
        svc.run_workflow({"workflow_id": "bad4", "rows": [{"input_query": "q", "expected_answer": "a"}],
                          "enhance": roles(tiny_models), "train": {"method": "dpo", "peft": {"method": "lora"}}},
                         wait=False)
    with pytest.raises(RuntimeError, match="400.*token_env"):
        svc.export_model("bad5", "job:w1-train", ["hub"], wait=False, hub={"repo": "x", "token_env": "TRL_FSDP_API_TOKEN"})
    with pytest.raises(RuntimeError, match="400.*hub.namespace"):
        svc.export_model("bad6", "job:w1-train", ["hub"], wait=False, hub={"repo": "x", "namespace": "me"})
