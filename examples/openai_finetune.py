"""Fine-tune with the official openai SDK against the FSDP training service (no other client needed).

    trl-fsdp-service --api-token-file token --model-dir /models     # then:
    TRL_FSDP_URL=http://127.0.0.1:8322 TRL_FSDP_API_TOKEN=... python examples/openai_finetune.py /models/student
"""

import os
import sys
import time

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("TRL_FSDP_URL", "http://127.0.0.1:8322") + "/v1/openai/v1",
                api_key=os.environ["TRL_FSDP_API_TOKEN"])
train = client.files.create(file=open("examples/data/openai_chat.jsonl", "rb"), purpose="fine-tune")
job = client.fine_tuning.jobs.create(
    model=sys.argv[1], training_file=train.id, suffix="demo",
    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}}},
    extra_body={"trl": {"finetuning": "lora", "training_config": {"max_steps_per_epoch": 10, "dtype": "fp32"}}},
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
answer = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=16,
                                        messages=[{"role": "user", "content": "reverse: a b c"}])
print(answer.choices[0].message.content)
