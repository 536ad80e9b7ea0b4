"""Train, serve and evaluate in one inline Llama Stack, as a user of `llama stack run run_serve.yaml` with the
unmodified llama-stack-client 0.2.12 and its typed payloads: a LoRA job through `post_training`, its final
checkpoint answered through `inference` by inline::trl_serving in the stack's own process (no second server),
beside its base, and both answers scored with `scoring` (basic::equality)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import wait_for_job
from llama_stack_client import BadRequestError
from llama_stack_client.types.algorithm_config_param import LoraFinetuningConfig
from llama_stack_client.types.post_training_supervised_fine_tune_params import (
    TrainingConfig,
    TrainingConfigDataConfig,
    TrainingConfigOptimizerConfig,
)

pytestmark = pytest.mark.slow  # `llama stack run`, training

REPO_ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH, HELDOUT = 8, 8, 12  # half examples/sft_lora.yaml's job: noisy_teacher learns the task in a few LoRA steps
GREEDY = {"strategy": {"type": "greedy"}, "max_tokens": 24}
EQUALITY = {"basic::equality": {"type": "basic", "aggregation_functions": ["accuracy"]}}


def answers(client, model_id: str, rows: list[dict]) -> list[str]:
    """Greedy answers of `model_id` to each row's input_query, through the stack's inference API."""
    return [client.inference.chat_completion(model_id=model_id, sampling_params=GREEDY,
                                             messages=[{"role": "user", "content": r["input_query"]}])
            .completion_message.content.strip() for r in rows]


def accuracy(client, rows: list[dict], generated: list[str]) -> float:
    scored = client.scoring.score(
        input_rows=[{"input_query": r["input_query"], "expected_answer": r["expected_answer"], "generated_answer": g}
                    for r, g in zip(rows, generated)],
        scoring_functions=EQUALITY,
    )
    return scored.results["basic::equality"].aggregated_results["accuracy"]["accuracy"]


def test_train_serve_and_score_in_one_inline_stack(llama_stack_factory, tiny_models, tiny_builder, tmp_path):
    client = llama_stack_factory(REPO_ROOT / "run_serve.yaml", tmp_path / "stack").client(timeout=300)
    base = tiny_models["noisy_teacher"]
    data = tiny_builder.make_toy_datasets(n_train=STEPS * BATCH, n_heldout=HELDOUT)
    client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": data["instruct"]},
                             dataset_id="reverse-train")
    client.post_training.supervised_fine_tune(
        job_uuid="inline-serve-lora", model=base, hyperparam_search_config={}, logger_config={},
        training_config=TrainingConfig(
            n_epochs=1, max_steps_per_epoch=STEPS, gradient_accumulation_steps=1, dtype="fp32",
            data_config=TrainingConfigDataConfig(dataset_id="reverse-train", batch_size=BATCH, shuffle=True,
                                                 data_format="instruct"),
            optimizer_config=TrainingConfigOptimizerConfig(optimizer_type="adamw", lr=2e-3, weight_decay=0.0,
                                                           num_warmup_steps=0)),
        algorithm_config=LoraFinetuningConfig(type="LoRA", lora_attn_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                              apply_lora_to_mlp=True, apply_lora_to_output=False, rank=8, alpha=16),
    )
    status = wait_for_job(client, "inline-serve-lora", timeout=300)
    assert status.status == "completed", status.resources_allocated
    final = client.post_training.job.artifacts(job_uuid="inline-serve-lora").checkpoints[-1]
    final = final if isinstance(final, dict) else final.model_dump()
    trained = final["identifier"]
    assert Path(final["path"], "adapter_config.json").is_file()

    # The completed job's final checkpoint is a model of the stack already; a base takes one models.register.
    registered = {m.identifier: m for m in client.models.list()}
    assert trained in registered and registered[trained].provider_id == "trl_serving", list(registered)
    client.models.register(model_id="reverse-base", provider_id="trl_serving", provider_model_id=base,
                           model_type="llm", metadata={})
    with pytest.raises(BadRequestError, match="provider_model_id"):  # not a model directory: a 400 naming it
        client.models.register(model_id="nowhere", provider_id="trl_serving", model_type="llm", metadata={},
                               provider_model_id=str(tmp_path / "no-model"))

    heldout = data["heldout_prompts"]
    after, before = answers(client, trained, heldout), answers(client, "reverse-base", heldout)
    expected = [r["expected_answer"] for r in heldout]
    right_after = sum(a == e for a, e in zip(after, expected))
    right_before = sum(b == e for b, e in zip(before, expected))
    print(f"held-out exact match: base {right_before}/{HELDOUT}, trained {right_after}/{HELDOUT}; "
          f"e.g. {heldout[0]['input_query']!r} -> base {before[0]!r}, trained {after[0]!r}")
    assert after != before and right_after >= right_before + HELDOUT // 4, (after, before)

    # streamed, and through the OpenAI-compatible route, the trained model answers as it does in one piece
    query = [{"role": "user", "content": heldout[0]["input_query"]}]
    chunks = client.inference.chat_completion(model_id=trained, messages=query, stream=True, sampling_params=GREEDY)
    assert "".join(c.event.delta.text for c in chunks if c.event.delta.type == "text").strip() == after[0]
    openai = client.chat.completions.create(model=trained, messages=query, temperature=0, max_tokens=24)
    assert openai.choices[0].message.content.strip() == after[0]
    # a raw-text completion (no chat template: this model answers it with little or nothing), whole and streamed
    whole = client.inference.completion(model_id=trained, content=heldout[0]["input_query"], sampling_params=GREEDY)
    pieces = list(client.inference.completion(model_id=trained, content=heldout[0]["input_query"], stream=True,
                                              sampling_params=GREEDY))
    assert "".join(p.delta for p in pieces) == whole.content and pieces[-1].stop_reason == whole.stop_reason

    score_after, score_before = accuracy(client, heldout, after), accuracy(client, heldout, before)
    assert (score_after, score_before) == (right_after / HELDOUT, right_before / HELDOUT)

    # llm-as-judge with a judge served in this same process (the base: it can only reverse letters, so its
    # "ratings" mean nothing): each row gets the regex's match in the judge's reply, or None when nothing matches
    judge = {"type": "llm_as_judge", "judge_model": "reverse-base", "prompt_template": "reverse: {generated_answer}",
             "judge_score_regexes": [r"^([a-z](?: [a-z])*)$"]}
    judged = [{**r, "generated_answer": a} for r, a in zip(heldout[:3], after)]
    rows = client.scoring.score(input_rows=judged,
                                scoring_functions={"llm-as-judge::base": judge}).results["llm-as-judge::base"].score_rows
    assert len(rows) == 3 and all(isinstance(row["judge_feedback"], str) for row in rows), rows
    assert [row["score"] for row in rows] == [
        m.group(1) if (m := re.search(judge["judge_score_regexes"][0], row["judge_feedback"])) else None for row in rows]
