"""Fine-tune with the official openai SDK against the FSDP training service (no other client needed).

    trl-fsdp-service --api-token-file token --model-dir /models     # then:
    TRL_FSDP_URL=http://127.0.0.1:8322 TRL_FSDP_API_TOKEN=... python examples/openai_finetune.py /models/noisy_teacher

With the tiny models of scripts/build_tiny_models.py: noisy_teacher (the teacher with noise on its weights) is
right on about a third of the held-out prompts. Measured on 2 busy CPU cores: training loss 3.70 -> 0.08 and
validation loss 0.04 in 36 steps (16 s), but 24 rows are too few to learn the task: 2 of 10 held-out prompts
right after (the job files in examples/ train on 200 rows). The random `student` does not learn in LoRA's few
steps: use it only to check that jobs run.
"""

import json
import os
import sys
import time

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("TRL_FSDP_URL", "http://127.0.0.1:8322") + "/v1/openai/v1",
                api_key=os.environ["TRL_FSDP_API_TOKEN"])
train = client.files.create(file=open("examples/data/openai_chat.jsonl", "rb"), purpose="fine-tune")
job = client.fine_tuning.jobs.create(
    model=sys.argv[1], training_file=train.id, suffix="demo",
    # learning_rate_multiplier x LoRA's base 2e-4 (3e-3); 6 epochs of 24 rows at 4 a step: 36 steps
    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 6, "batch_size": 4,
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
heldout = [json.loads(line) for line in open("examples/data/reverse_heldout.jsonl")][:10]
right = 0
for row in heldout:  # prompts the job never saw, asked as the training rows ask
    answer = client.chat.completions.create(
        model=job.fine_tuned_model, max_tokens=16, temperature=0,
        messages=[{"role": "system", "content": "You reverse letters."}, {"role": "user", "content": row["input_query"]}])
    right += answer.choices[0].message.content.strip() == row["expected_answer"]
print(f"held-out exact match: {right}/{len(heldout)}; e.g. {row['input_query']!r} -> "
      f"{answer.choices[0].message.content!r}")
