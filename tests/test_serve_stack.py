"""Train, serve and evaluate in one Llama Stack, as a user of `llama stack run run_fsdp_serve.yaml` with the
unmodified llama-stack-client 0.2.12: register a dataset, train a job through `post_training` (full
fine-tuning, then LoRA), make its final checkpoint a model of the stack, answer held-out prompts through
`inference` with it and with its base, score both answers with `scoring` (basic::equality, llm-as-judge with
a tiny local judge) and run the `eval` API's benchmark on it."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import llama_stack_client
import pytest
from helpers import processes_mentioning, wait_for_job
from test_fsdp_service import Service

pytestmark = pytest.mark.slow  # the FSDP service and `llama stack run`, training

REPO_ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH = 200, 32  # one epoch over fresh rows (100 steps: 1 of 20 right, 160: 4)
HELDOUT = 20
EQUALITY = {"basic::equality": {"type": "basic", "aggregation_functions": ["accuracy"]}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, llama_stack_factory, tiny_models, tiny_builder):
    root = tmp_path_factory.mktemp("serve-stack")
    # --model-dir: the service lists the tiny models, so the judge can be registered before any job uses it
    service = Service(root / "service", extra=["--model-dir", str(Path(tiny_models["teacher"]).parent)])
    server = llama_stack_factory(REPO_ROOT / "run_fsdp_serve.yaml", root / "stack",
                                 env={"TRL_FSDP_URL": service.url, "TRL_FSDP_STACK_DIR": str(root / "stack")})
    yield server.client(timeout=300), tiny_builder.make_toy_datasets(n_train=STEPS * BATCH, n_heldout=HELDOUT)
    service.stop()
    for pid, _ in processes_mentioning(str(service.data_dir)):
        os.kill(pid, signal.SIGKILL)


def answers(client, model_id: str, rows: list[dict]) -> list[str]:
    """Greedy answers of `model_id` to each row's input_query, through the stack's inference API."""
    out = []
    for row in rows:
        r = client.inference.chat_completion(
            model_id=model_id, messages=[{"role": "user", "content": row["input_query"]}],
            sampling_params={"strategy": {"type": "greedy"}, "max_tokens": 24, "repetition_penalty": 1.0},
        )
        out.append(r.completion_message.content.strip())
    return out


def accuracy(client, rows: list[dict], generated: list[str]) -> float:
    scored = client.scoring.score(
        input_rows=[{"input_query": r["input_query"], "expected_answer": r["expected_answer"], "generated_answer": g}
                    for r, g in zip(rows, generated)],
        scoring_functions=EQUALITY,
    )
    result = scored.results["basic::equality"]
    assert [row["score"] for row in result.score_rows] == [float(g == r["expected_answer"])
                                                           for r, g in zip(rows, generated)]
    return result.aggregated_results["accuracy"]["accuracy"]


def test_train_serve_and_score_in_one_stack(stack, tiny_models):
    client, data = stack
    student = tiny_models["demo_student"]
    client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": data["instruct"]},
                             dataset_id="reverse-train")
    client.post_training.supervised_fine_tune(
        job_uuid="serve-sft", model=student, hyperparam_search_config={}, logger_config={},
        training_config={
            "n_epochs": 1, "max_steps_per_epoch": STEPS, "dtype": "fp32",
            "data_config": {"dataset_id": "reverse-train", "batch_size": BATCH, "shuffle": True,
                            "data_format": "instruct"},
            "optimizer_config": {"optimizer_type": "adamw", "lr": 3e-3, "weight_decay": 0.0, "num_warmup_steps": 10},
            "torch_run_config": {"nproc_per_node": 1},  # two shared cores: one process trains fastest
        },
        # full fine-tuning: LoRA (rank 16, attention and MLP, lr 1e-2, 150 x 32 rows) left the random
        # demo_student's loss at 6.0 (from 6.7), answering nothing right; full fine-tuning learns the task
        algorithm_config=None,
    )
    status = wait_for_job(client, "serve-sft", timeout=900)
    assert status.status == "completed", status.resources_allocated
    final = client.post_training.job.artifacts(job_uuid="serve-sft").checkpoints[-1]
    final = final if isinstance(final, dict) else final.model_dump()
    trained = final["identifier"]
    assert trained == "serve-sft-final" and Path(final["path"], "config.json").is_file()

    # The completed job's final checkpoint is a model of the stack already (the adapter registers it with
    # serve_provider_id when it sees the job completed); a base model takes one models.register call.
    registered = {m.identifier: m for m in client.models.list()}
    assert trained in registered and registered[trained].provider_id == "trl_fsdp_serving", list(registered)
    client.models.register(model_id="reverse-base", provider_id="trl_fsdp_serving", provider_model_id=student,
                           model_type="llm", metadata={})
    assert {trained, "reverse-base"} <= {m.identifier for m in client.models.list()}

    heldout = data["heldout_prompts"]
    after, before = answers(client, trained, heldout), answers(client, "reverse-base", heldout)
    expected = [r["expected_answer"] for r in heldout]
    right_after = sum(a == e for a, e in zip(after, expected))
    right_before = sum(b == e for b, e in zip(before, expected))
    print(f"held-out exact match: base {right_before}/{HELDOUT}, trained {right_after}/{HELDOUT}; "
          f"e.g. {heldout[0]['input_query']!r} -> base {before[0]!r}, trained {after[0]!r}")
    assert sum(a != b for a, b in zip(after, before)) >= HELDOUT // 2, (after, before)
    assert right_after > right_before, (after, before)
    # which letters each answer has (Jaccard of the letter sets, mean over the prompts): 200 steps teach the
    # letters well before their order (4 of 20 answers exact); the base answers noise
    def overlap(answers_: list[str]) -> float:
        return sum(len(set(a.split()) & set(e.split())) / len(set(a.split()) | set(e.split()))
                   for a, e in zip(answers_, expected)) / HELDOUT

    assert overlap(after) >= 0.4 and overlap(after) > overlap(before) + 0.3, (overlap(after), overlap(before))

    # streamed, the trained model answers as it does in one piece
    chunks = client.inference.chat_completion(
        model_id=trained, messages=[{"role": "user", "content": heldout[0]["input_query"]}], stream=True,
        sampling_params={"strategy": {"type": "greedy"}, "max_tokens": 24, "repetition_penalty": 1.0})
    streamed = "".join(c.event.delta.text for c in chunks if c.event.delta.type == "text")
    assert streamed.strip() == after[0]

    score_after, score_before = accuracy(client, heldout, after), accuracy(client, heldout, before)
    assert score_after == right_after / HELDOUT and score_before == right_before / HELDOUT
    assert score_after > score_before


LORA_STEPS, LORA_BATCH = 8, 8  # examples/sft_lora.yaml's settings, half its steps (16: 7 -> 20 of 20 right)
JUDGED = 5  # rows the judges and the benchmark answer: the flow, not a measurement
JUDGE_REGEX = r"Score:\s*([0-5])"
JUDGE = {"type": "llm_as_judge", "judge_model": "judge", "judge_score_regexes": [JUDGE_REGEX],
         "aggregation_functions": ["categorical_count"],
         "prompt_template": "Question: {input_query}\nExpected answer: {expected_answer}\nGenerated answer: "
                            "{generated_answer}\nRate the generated answer from 0 (wrong) to 5 (right). Reply \"Score: N\"."}
# What the tiny `teacher` can do as a judge: reverse the generated answer (the query's letters when it is right).
TINY_JUDGE = {**JUDGE, "prompt_template": "reverse: {generated_answer}", "judge_score_regexes": [r"^([a-z](?: [a-z])*)$"]}


def test_lora_job_is_served_judged_and_evaluated_in_the_same_stack(stack, tiny_models):
    client, data = stack
    base = tiny_models["noisy_teacher"]  # the tiny teacher with noise on its weights: right about a third of the time
    client.datasets.register(purpose="post-training/messages", dataset_id="reverse-lora",
                             source={"type": "rows", "rows": data["instruct"][: LORA_STEPS * LORA_BATCH]})
    client.post_training.supervised_fine_tune(
        job_uuid="serve-lora", model=base, hyperparam_search_config={}, logger_config={},
        training_config={
            "n_epochs": 1, "max_steps_per_epoch": LORA_STEPS, "dtype": "fp32",
            "data_config": {"dataset_id": "reverse-lora", "batch_size": LORA_BATCH, "shuffle": True,
                            "data_format": "instruct"},
            "optimizer_config": {"optimizer_type": "adamw", "lr": 2e-3, "weight_decay": 0.0, "num_warmup_steps": 0},
            "torch_run_config": {"nproc_per_node": 1},
        },
        algorithm_config={"type": "LoRA", "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                          "apply_lora_to_mlp": True, "apply_lora_to_output": False, "rank": 8, "alpha": 16},
    )
    status = wait_for_job(client, "serve-lora", timeout=900)
    assert status.status == "completed", status.resources_allocated
    final = client.post_training.job.artifacts(job_uuid="serve-lora").checkpoints[-1]
    final = final if isinstance(final, dict) else final.model_dump()
    trained = final["identifier"]
    assert trained == "serve-lora-final" and Path(final["path"], "adapter_config.json").is_file()
    assert trained in {m.identifier for m in client.models.list()}  # no registration of ours
    client.models.register(model_id="lora-base", provider_id="trl_fsdp_serving", provider_model_id=base,
                           model_type="llm", metadata={})

    heldout = data["heldout_prompts"]
    after, before = answers(client, trained, heldout), answers(client, "lora-base", heldout)
    right_after = sum(a == r["expected_answer"] for a, r in zip(after, heldout))
    right_before = sum(b == r["expected_answer"] for b, r in zip(before, heldout))
    print(f"LoRA held-out exact match: base {right_before}/{HELDOUT}, trained {right_after}/{HELDOUT}")
    assert after != before and right_after >= right_before + HELDOUT // 4, (after, before)
    assert accuracy(client, heldout, after) == right_after / HELDOUT > accuracy(client, heldout, before)

    # llm-as-judge with the operator's judge: a model of the stack (one models.register) and a scoring function
    # naming it (one scoring_functions.register, docs/serving.md). A tiny judge's ratings mean nothing, so what
    # holds is the flow: each row is rated (the regex's match in the judge's reply) or says why not (None).
    client.models.register(model_id="judge", provider_id="trl_fsdp_serving", provider_model_id=tiny_models["teacher"],
                           model_type="llm", metadata={})
    client.scoring_functions.register(scoring_fn_id="llm-as-judge::judge", provider_id="llm-as-judge",
                                      description="the operator's judge", return_type={"type": "number"}, params=JUDGE)
    judged = [{"input_query": r["input_query"], "expected_answer": r["expected_answer"], "generated_answer": a}
              for r, a in zip(heldout[:JUDGED], after)]
    scored = client.scoring.score(input_rows=judged, scoring_functions={
        "llm-as-judge::judge": None, "llm-as-judge::base": TINY_JUDGE}).results
    for fn, regex in (("llm-as-judge::judge", JUDGE_REGEX), ("llm-as-judge::base", TINY_JUDGE["judge_score_regexes"][0])):
        rows = scored[fn].score_rows
        assert len(rows) == JUDGED and all(isinstance(row["judge_feedback"], str) for row in rows), rows
        # a row's score is what the regex found in the judge's reply, None (the row's failure) when nothing
        assert [row["score"] for row in rows] == [m.group(1) if (m := re.search(regex, row["judge_feedback"])) else None
                                                 for row in rows]
        assert sum(scored[fn].aggregated_results["categorical_count"]["categorical_count"].values()) == JUDGED
    rated = [row["score"] for row in scored["llm-as-judge::base"].score_rows]
    assert any(rated), rated  # the tiny teacher reverses letters: its replies match the regex
    print(f"tiny judge: {sum(s is not None for s in rated)}/{JUDGED} rows rated, e.g. {rated[:3]}")

    # the eval API (inline::model_eval): a benchmark over the held-out rows, answered by the trained model
    client.datasets.register(purpose="eval/messages-answer", dataset_id="reverse-heldout", source={"type": "rows", "rows": [
        {"chat_completion_input": json.dumps([{"role": "user", "content": r["input_query"]}]), **r} for r in heldout]})
    client.benchmarks.register(benchmark_id="reverse", dataset_id="reverse-heldout",
                               scoring_functions=["basic::equality"])
    greedy = {"strategy": {"type": "greedy"}, "max_tokens": 24, "repetition_penalty": 1.0}
    job = client.eval.run_eval(benchmark_id="reverse", benchmark_config={
        "eval_candidate": {"type": "model", "model": trained, "sampling_params": greedy}, "scoring_params": {},
        "num_examples": JUDGED})
    result = client.eval.jobs.retrieve(job.job_id, benchmark_id="reverse")
    assert [g["generated_answer"].strip() for g in result.generations] == after[:JUDGED]
    right = sum(a == r["expected_answer"] for a, r in zip(after, heldout[:JUDGED]))
    assert result.scores["basic::equality"].aggregated_results["accuracy"]["accuracy"] == right / JUDGED
    with pytest.raises(llama_stack_client.BadRequestError, match="eval_candidate.type"):
        client.eval.run_eval(benchmark_id="reverse", benchmark_config={"scoring_params": {}, "eval_candidate": {
            "type": "agent", "config": {"model": trained, "instructions": "answer"}}})
