"""Findings 1, 4 and 5 of the third security review (the graders), each as an attack that must fail:

 1  a grader template `{{ item.x | round(100000000, 'floor') }}` froze the whole service (Jinja's round builds
    the int 10**precision while the graders are checked on the first rows, holding the GIL for minutes);
 4  a score_model grader's `model` was never confined: a directory refused as the job's model was loaded
    as a grader's;
 5  rouge_l's LCS table is the product of both sides' token counts: 12 KB a side took 1.3 GB per sample.

1 and 4 are sent over HTTP to a real service (and through the openai SDK); 5 runs the reward function as TRL
calls it, in a process limited to 256 MB more address space than its imports take. Every test here failed
against the code before these fixes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from helpers import token_service

TOKEN = "graders-" + uuid.uuid4().hex
ROWS = [{"prompt": f"reverse: {w}", "x": 1.5, "answer": w[::-1]} for w in ("ab", "cd", "ef", "gh")]
EXACT = {"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
         "reference": "{{ item.answer }}", "operation": "eq"}
FREEZE = "{{ item.x | round(100000000, 'floor') }}"  # the reported template


def fake_model(path: Path) -> str:
    """A directory that passes the request layer's model checks (a causal LM config), without weights."""
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("graders_security")
    models = root / "models"
    policy = fake_model(models / "policy")
    outside = fake_model(root / "outside" / "judge")  # a model directory outside the allowed roots
    with token_service(root, TOKEN, str(models), "--nproc-per-node", "1") as (url, data, log):
        headers = {"Authorization": f"Bearer {TOKEN}"}
        rows = "".join(json.dumps(r) + "\n" for r in ROWS)
        r = httpx.post(f"{url}/v1/datasets/prompts/rows", content=rows, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        yield {"url": url, "headers": headers, "policy": policy, "outside": outside, "log": log}


def grpo(service, grader: dict, model: str | None = None, timeout: float = 60) -> httpx.Response:
    job = "g-" + uuid.uuid4().hex[:8]
    body = {"job_uuid": job, "finetuned_model": f"{job}-model", "model": model or service["policy"],
            "algorithm_config": {"type": "grpo", "graders": [grader], "num_generations": 2,
                                 "max_completion_length": 8},
            "training_config": {"n_epochs": 1, "max_steps_per_epoch": 1, "dtype": "fp32",
                                "data_config": {"dataset_id": "prompts", "batch_size": 1},
                                "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-4, "weight_decay": 0.0,
                                                     "num_warmup_steps": 0}}}
    return httpx.post(f"{service['url']}/v1/post-training/preference-optimize", json=body,
                      headers=service["headers"], timeout=timeout)


def health_answers_while(service, attack) -> object:
    """Run `attack()` in a thread; /health must answer within a second, again and again, until it returns
    (or for 5 s). Returns what the attack returned."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", _catch(attack)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while thread.is_alive() and time.monotonic() < deadline:
        r = httpx.get(f"{service['url']}/health", timeout=1.0)  # a frozen service: ReadTimeout, the test fails
        assert r.status_code == 200
        time.sleep(0.2)
    thread.join(timeout=30)
    assert not thread.is_alive(), "the attack request is still being handled"
    return result["r"]


def _catch(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - handed to the test, which asserts on it
        return e


# -- finding 1 ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_rounding_template_neither_freezes_the_service_nor_is_accepted(service):
    r = health_answers_while(service, lambda: grpo(service, {**EXACT, "input": FREEZE}, timeout=20))
    assert isinstance(r, httpx.Response), r
    assert r.status_code == 400, r.text
    assert "graders" in r.text and "input" in r.text and "precision" in r.text and "0 to 17" in r.text


@pytest.mark.slow
def test_the_openai_reinforcement_method_refuses_it_too(service):
    client = openai.OpenAI(base_url=service["url"] + "/v1/openai/v1", api_key=TOKEN, max_retries=0, timeout=20)
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}], "x": r["x"], "answer": r["answer"]}
            for r in ROWS]
    f = client.files.create(file=("rl.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()),
                            purpose="fine-tune")

    def attack():
        return client.fine_tuning.jobs.create(
            model=service["policy"], training_file=f.id,
            method={"type": "reinforcement", "reinforcement": {"grader": {**EXACT, "reference": FREEZE}}})

    err = health_answers_while(service, attack)
    assert isinstance(err, openai.BadRequestError), err
    assert "method.reinforcement.grader.reference" in str(err) and "precision" in str(err)


# -- finding 4 ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_grader_model_outside_the_allowed_roots_is_refused_as_a_job_model_is(service):
    job = grpo(service, EXACT, model=service["outside"])
    assert job.status_code == 400 and "outside the allowed directories" in job.text, job.text
    judge = {"type": "score_model", "name": "judge", "model": service["outside"],
             "input": [{"role": "user", "content": "Score {{ sample.output_text }} from 0 to 1."}]}
    r = grpo(service, judge)
    assert r.status_code == 400, r.text
    assert "algorithm_config.graders[0].model" in r.text and "outside the allowed directories" in r.text
    # No oracle: a path that holds no model gets the same answer as one that does.
    missing = grpo(service, {**judge, "model": str(Path(service["outside"]).parent / "nothing-here")})
    assert missing.status_code == 400 and "outside the allowed directories" in missing.text, missing.text
    assert "config.json" not in missing.text and "config.json" not in r.text


# -- finding 5 ---------------------------------------------------------------------------------------------
ROUGE_IN_LIMITED_PROCESS = textwrap.dedent("""
    import resource, sys
    from providers.graders import parse_graders, reward_functions
    from rouge_score import rouge_scorer  # noqa: F401 - imported before the limit
    reward = reward_functions(parse_graders([{"type": "text_similarity", "name": "sim", "evaluation_metric": "rouge_l",
                                              "input": "{{ item.long }}", "reference": "{{ item.long }}"}]))[0]
    reward(["p"], ["warm-up"], long=["a b"])
    size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + (256 << 20),) * 2)
    long = "a " * 6000  # 12 KB a side: 6,000 x 6,000 cells in rouge-score's LCS table
    print(reward(["p", "p"], ["x", "y"], long=[long, long]), reward.errors, reward.last_error)
""")


@pytest.mark.slow
def test_rouge_l_on_long_columns_fits_a_small_memory_limit():
    done = subprocess.run([sys.executable, "-c", ROUGE_IN_LIMITED_PROCESS], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[:3] == ["[1.0,", "1.0]", "0"], done.stdout  # graded, not a MemoryError scored 0
