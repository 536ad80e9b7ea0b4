"""Fine-tune with the official openai SDK against the FSDP training service (no other client needed).

    trl-fsdp-service --api-token-file token --model-dir /models     # then:
    TRL_FSDP_URL=http://127.0.0.1:8322 TRL_FSDP_API_TOKEN=... python examples/openai_finetune.py /models/noisy_teacher

It prints the held-out exact match before and after. With the tiny models of scripts/build_tiny_models.py,
noisy_teacher (the teacher with noise on its weights) answers none of the 10 held-out prompts right in this
chat format; measured on 2 busy CPU cores: training loss 4.3-4.9 -> 0.06 and validation loss 0.03 in 100 steps
on the 200 rows of examples/data/openai_chat.jsonl (20 s of training, 40 s in all), then 10 of 10 right.
The random `student` does not learn in LoRA's few steps: use it only to check that jobs run.
"""

import json
import os
import sys
import time

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("TRL_FSDP_URL", "http://127.0.0.1:8322") + "/v1/openai/v1",
                api_key=os.environ["TRL_FSDP_API_TOKEN"])
heldout = [json.loads(line) for line in open("examples/data/reverse_heldout.jsonl")][:10]


def exact_match(model: str) -> tuple[int, str]:
    """How many held-out prompts (never in the training file) `model` answers right, asked as the rows ask,
    and its answer to the last one."""
    right = 0
    for row in heldout:
        answer = client.chat.completions.create(
            model=model, max_tokens=16, temperature=0,
            messages=[{"role": "system", "content": "You reverse letters."},
                      {"role": "user", "content": row["input_query"]}])
        right += answer.choices[0].message.content.strip() == row["expected_answer"]
    return right, answer.choices[0].message.content


before, before_example = exact_match(sys.argv[1])
train = client.files.create(file=open("examples/data/openai_chat.jsonl", "rb"), purpose="fine-tune")
job = client.fine_tuning.jobs.create(
    model=sys.argv[1], training_file=train.id, suffix="demo",
    # learning_rate_multiplier x LoRA's base 2e-4 (3e-3); 2 epochs of 200 rows at 4 a step: 100 steps
    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4,
                                                                     "learning_rate_multiplier": 15}}},
    extra_body={"trl": {"finetuning": "lora", "training_config": {"dtype": "fp32"}}},
)
seen = set()
while True:
    job = client.fine_tuning.jobs.retrieve(job.id)
    for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data):  # newest first: reverse
        if event.id not in seen:
            seen.add(event.id)
            print(event.created_at, event.level, event.message)
    if job.status in ("succeeded", "failed", "cancelled"):
        break
    time.sleep(2)
print(job.status, job.fine_tuned_model, job.error)
for checkpoint in client.fine_tuning.jobs.checkpoints.list(job.id):
    print(checkpoint.step_number, checkpoint.metrics.train_loss, checkpoint.fine_tuned_model_checkpoint)
after, after_example = exact_match(job.fine_tuned_model)
print(f"held-out exact match: {before}/{len(heldout)} -> {after}/{len(heldout)}; e.g. {heldout[-1]['input_query']!r}: "
      f"{before_example!r} before, {after_example!r} after")
