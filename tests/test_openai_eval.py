"""What evaluation clients send to the service's OpenAI endpoint, sent by the real clients: the `openai` SDK
(completions with text and token-id prompts, n, stop, seed, log-probs on both routes, echo with max_tokens 0,
usage in streams, and the 400s naming the field), and lm-evaluation-harness's `local-completions` and
`local-chat-completions` backends running the toy task ('reverse the letters', tests/lm_eval_tasks/) against
the tiny teacher, which knows it, and the tiny student, which does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch
from helpers import token_service

pytestmark = pytest.mark.slow  # starts a service

TOKEN = "openai-eval-test-token"
TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
QUESTION = [{"role": "user", "content": "reverse: a b c d"}]


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_models):
    models_root = str(Path(tiny_models["student"]).parent)
    with token_service(tmp_path_factory.mktemp("openai-eval"), TOKEN, models_root) as (url, _, log):
        yield {"url": url, "log": log,
               "client": openai.OpenAI(base_url=url + "/v1/openai/v1", api_key=TOKEN, max_retries=0, timeout=120)}


def reference_logprobs(model_dir: str, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, straight from transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_completions_logprobs_choices_and_usage(service, tiny_models):
    from transformers import AutoTokenizer

    client, teacher = service["client"], tiny_models["teacher"]
    tok = AutoTokenizer.from_pretrained(teacher)
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    answer_ids = tok("d c b a", add_special_tokens=False)["input_ids"]

    # a text prompt, and a batch of two token-id prompts with two choices each (greedy: all the same answer)
    r = client.completions.create(model=teacher, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == "d c b a" and r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(answer_ids))
    batch = client.completions.create(model=teacher, prompt=[ids, ids[:-1]], n=2, max_tokens=12, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3] and batch.choices[1].text == "d c b a"
    assert batch.usage.prompt_tokens == 2 * len(ids) - 1  # each prompt counted once, not once per choice
    assert client.completions.create(model=teacher, prompt=prompt, max_tokens=12, temperature=0,
                                     stop=[" b"]).choices[0].text == "d c"

    # echo + max_tokens 0: the prompt's own log-probs (lm-evaluation-harness's log-likelihood), as transformers has them
    full = ids + answer_ids
    echo = client.completions.create(model=teacher, prompt=full, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = echo.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(full) and echo.usage.completion_tokens == 0
    assert lp.token_logprobs[1:] == pytest.approx(reference_logprobs(teacher, full), abs=1e-4)
    assert echo.choices[0].text == tok.decode(full)
    assert all(max(top.values()) >= t for t, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]))
    assert all(max(top.values()) == t for t, top in zip(lp.token_logprobs[len(ids):], lp.top_logprobs[len(ids):]))

    # chat: logprobs of the answer (and of the eos that ended it), the greedy token first among the alternatives
    chat = client.chat.completions.create(model=teacher, messages=QUESTION, max_tokens=12, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(e.token for e in content[:-1]) == "d c b a" and content[-1].token == tok.eos_token
    assert [e.logprob for e in content] == pytest.approx(
        reference_logprobs(teacher, ids + answer_ids + [tok.eos_token_id])[len(ids) - 1:], abs=1e-4)
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token for e in content)

    # n sampled choices: repeatable with a seed, different from each other
    sampled = [client.chat.completions.create(model=tiny_models["student"], messages=QUESTION, max_tokens=8,
                                              temperature=1.0, n=3, seed=7) for _ in range(2)]
    texts = [[c.message.content for c in s.choices] for s in sampled]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1 and [c.index for c in sampled[0].choices] == [0, 1, 2]

    # streams: n choices by index, log-probs in the chunks, usage last
    chunks = list(client.chat.completions.create(model=teacher, messages=QUESTION, max_tokens=12, temperature=0, n=2,
                                                 logprobs=True, stream=True, stream_options={"include_usage": True}))
    by_choice = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                 for i in (0, 1)}
    assert by_choice == {0: "d c b a", 1: "d c b a"}
    streamed = [e.token for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == [e.token for e in content] * 2
    assert chunks[-1].usage.completion_tokens == 2 * len(answer_ids) and chunks[-1].usage.prompt_tokens == len(ids)
    text_chunks = list(client.completions.create(model=teacher, prompt=prompt, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in text_chunks if c.choices) == "d c b a"
    assert text_chunks[-1].usage.completion_tokens == len(answer_ids)


def test_bad_evaluation_requests_are_400s_naming_the_field(service, tiny_models):
    client, teacher = service["client"], tiny_models["teacher"]
    bad = [
        ("n", lambda: client.chat.completions.create(model=teacher, messages=QUESTION, n=17)),
        ("top_logprobs", lambda: client.chat.completions.create(model=teacher, messages=QUESTION, logprobs=True,
                                                                top_logprobs=21)),
        ("top_logprobs", lambda: client.chat.completions.create(model=teacher, messages=QUESTION, top_logprobs=2)),
        ("logprobs", lambda: client.completions.create(model=teacher, prompt="x", logprobs=21)),
        ("n", lambda: client.completions.create(model=teacher, prompt=["x"] * 9, n=2)),
        ("prompt", lambda: client.completions.create(model=teacher, prompt=[]),),
        ("prompt", lambda: client.completions.create(model=teacher, prompt=[[1, 2], [3, 10**6]])),
        ("echo", lambda: client.completions.create(model=teacher, prompt="x", echo=True, stream=True)),
        ("model", lambda: client.completions.create(model="job:no-such-job", prompt="x")),
        # every choice's tokens count against the service's per-request cap (--chat-max-tokens, 4096)
        ("n", lambda: client.chat.completions.create(model=teacher, messages=QUESTION, n=2, max_tokens=4000)),
        ("max_tokens", lambda: client.completions.create(model=teacher, prompt="x", max_tokens=5000)),
    ]
    for field, call in bad:
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert field in e.value.response.text, (field, e.value.response.text)
    assert client.completions.create(model=teacher, prompt="x", max_tokens=1).usage.total_tokens >= 1  # still serving


# lm-evaluation-harness's Python entry point, as a user scripts it: each (backend, model, task) in turn, in one
# process (its import takes most of a CLI run); prints each run's metrics as a JSON line.
LM_EVAL_SCRIPT = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

url, include_path, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
tasks = TaskManager(include_path=include_path)
for backend, model, task in runs:
    if backend == "local-completions":  # sends token ids: the model's tokenizer, loaded by the harness
        args = dict(base_url=url + "/v1/completions", tokenizer_backend="huggingface", tokenizer=model)
    else:  # sends messages: no tokenizer on the client
        args = dict(base_url=url + "/v1/chat/completions")
    out = lm_eval.simple_evaluate(model=backend, tasks=[task], task_manager=tasks, apply_chat_template=True,
                                  model_args=dict(model=model, num_concurrent=1, **args))
    print(json.dumps(out["results"][task]), flush=True)
"""


def run_lm_eval(service, runs: list[tuple[str, str, str]], tmp_path: Path) -> list[dict]:
    """Each (backend, model directory, task)'s metrics, from lm-evaluation-harness run against the service."""
    env = {**os.environ, "OPENAI_API_KEY": TOKEN, "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", LM_EVAL_SCRIPT, service["url"], str(TASKS), json.dumps(runs)],
                          cwd=TASKS, env=env, capture_output=True, text=True, timeout=600, check=False)  # data's path
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_lm_eval_harness_backends_on_the_toy_task(service, tiny_models, tmp_path):
    missing = "lm-evaluation-harness with its API backends is not installed (pip install -c constraints.txt 'lm_eval[api]')"
    pytest.importorskip("lm_eval", reason=missing)
    pytest.importorskip("tenacity", reason=missing)  # the [api] extra
    teacher, student = tiny_models["teacher"], tiny_models["student"]
    completions, chat, chat_student, choice = run_lm_eval(service, [
        ("local-completions", teacher, "reverse_letters"),
        ("local-chat-completions", teacher, "reverse_letters"),
        ("local-chat-completions", student, "reverse_letters"),
        ("local-completions", teacher, "reverse_letters_choice"),  # log-likelihood: echo + logprobs
    ], tmp_path)
    assert completions["exact_match,none"] == chat["exact_match,none"] == 1.0, (completions, chat)
    assert chat_student["exact_match,none"] == 0.0, chat_student  # the eval tells a model that knows the task
    assert choice["acc,none"] == 1.0, choice  # the teacher picks the right reversal among three
