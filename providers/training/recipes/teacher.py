"""A teacher task: the teacher answers every prompt (greedy), and optionally stores its top-k
log-probabilities for each answer token, so students can distill without a teacher in memory.

Output (spec.checkpoint.output_dir): JSONL shards `shard-00000.jsonl`, ... with one row per prompt
    {"prompt": [msgs], "completion": [assistant msg],          # readable, and SFT-ready for `output`
     "input_ids": [...], "completion_start": s,                 # prompt + answer tokens (answer ends in eos)
     "topk_ids": [[k ids] per answer token], "topk_logprobs": [[k] ...]}   # when top_k is set
plus the teacher's tokenizer (students check theirs is the same) and `teacher_task.json` (a summary).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..components import load_model, load_tokenizer
from ..data import read_jsonl
from ..run_files import RunFiles, utc_now
from ..spec import JobSpec, TeacherSpec


def answer_batch(teacher, tokenizer, prompts: list[list[dict]], t: TeacherSpec) -> list[dict]:
    """Greedy answers for a batch of prompts, with top-k log-probs of each answer token."""
    prompt_ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
                  for p in prompts]
    width = max(map(len, prompt_ids))
    pad = tokenizer.pad_token_id
    # Left padding: generation continues from the end of every prompt.
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    generated = teacher.generate(input_ids=ids, attention_mask=mask, max_new_tokens=t.max_new_tokens,
                                 do_sample=False, pad_token_id=pad)[:, width:].tolist()
    rows = []
    for prompt, p_ids, gen in zip(prompts, prompt_ids, generated):
        answer = gen[: gen.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in gen else gen
        answer = [tok for tok in answer if tok != pad] or [tokenizer.eos_token_id]
        rows.append({
            "prompt": prompt,
            "completion": [{"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True).strip()}],
            "input_ids": p_ids + answer,
            "completion_start": len(p_ids),
        })
    if t.top_k:
        add_topk(teacher, rows, t.top_k, pad)
    return rows


def add_topk(teacher, rows: list[dict], k: int, pad: int) -> None:
    """Teacher top-k log-probs at the positions that predict each answer token (right-padded forward)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    logprobs = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    for i, r in enumerate(rows):
        s, n = r["completion_start"], len(r["input_ids"])
        top = logprobs[i, s - 1 : n - 1].topk(k, dim=-1)
        r["topk_ids"] = top.indices.tolist()
        r["topk_logprobs"] = [[round(v, 5) for v in row] for row in top.values.tolist()]


@torch.no_grad()
def train(spec: JobSpec, files: RunFiles) -> dict:
    t = spec.teacher
    out = Path(spec.checkpoint.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(t.teacher_model)
    teacher = load_model(t.teacher_model).eval()
    prompts = [r["prompt"] for r in read_jsonl(spec.data.train_file)]
    files.update_status(state="in_progress", training_started_at=utc_now(), total_steps=len(prompts), step=0)
    shard, shard_file, done = 0, None, 0
    for i in range(0, len(prompts), t.generation_batch_size):
        for row in answer_batch(teacher, tokenizer, prompts[i : i + t.generation_batch_size], t):
            if done % t.shard_rows == 0:
                if shard_file:
                    shard_file.close()
                shard_file = open(out / f"shard-{shard:05d}.jsonl", "w")
                shard += 1
            shard_file.write(json.dumps(row) + "\n")
            done += 1
        files.update_status(step=done)
        files.append_metrics({"step": done, "answered": done})
    if shard_file:
        shard_file.close()
    tokenizer.save_pretrained(str(out))
    summary = {"teacher_model": t.teacher_model, "rows": done, "shards": shard, "top_k": t.top_k,
               "max_new_tokens": t.max_new_tokens}
    (out / "teacher_task.json").write_text(json.dumps(summary, indent=2))
    files.add_checkpoint({"identifier": f"{spec.job_uuid}-teacher-outputs", "created_at": utc_now(), "epoch": 0,
                          "post_training_job_id": spec.job_uuid, "path": str(out), "training_metrics": None})
    return {"teacher_outputs_dir": str(out), **summary}
