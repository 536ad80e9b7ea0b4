"""Knowledge distillation from a teacher into a student.

- output: the teacher answers the training prompts (greedy), the student is fine-tuned on those answers.
- logit:  the student matches the teacher's token distributions at temperature T:  T^2 * KL.
- hybrid: alpha * CE(labels) + (1 - alpha) * T^2 * KL.
KL is forward KL(teacher || student) by default, reverse KL(student || teacher) on request, over the
completion tokens only. The loss step is the only code of our own; the loop is TRL's SFTTrainer.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from ..components import check_same_tokenizer, load_model, load_tokenizer
from ..data import load_dataset, write_jsonl
from ..run_files import RunFiles
from ..spec import DistillSpec, JobSpec
from . import sft

log = logging.getLogger("providers.training")


def distill_kl(student_logits, teacher_logits, mask, temperature: float, direction: str):
    """Summed per-token KL at temperature T over positions where mask is true."""
    s = F.log_softmax(student_logits[mask] / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[mask] / temperature, dim=-1)
    if direction == "forward":  # KL(teacher || student)
        return (t.exp() * (t - s)).sum()
    return (s.exp() * (s - t)).sum()  # KL(student || teacher)


class DistillationTrainer(SFTTrainer):
    """SFTTrainer with the loss step replaced by alpha * CE + (1 - alpha) * T^2 * KL."""

    def __init__(self, *args, teacher, distill: DistillSpec, **kw):
        super().__init__(*args, **kw)
        self.teacher = teacher.to(self.accelerator.device).eval().requires_grad_(False)
        self.distill = distill
        self.alpha = 0.0 if distill.method == "logit" else distill.alpha

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        keep = ("input_ids", "attention_mask", "position_ids")
        model_inputs = {k: v for k, v in inputs.items() if k in keep}
        labels = inputs["labels"]
        outputs = model(**model_inputs, use_cache=False)
        # Prompt-learning PEFT methods prepend virtual tokens to the logits: keep the real positions.
        student_logits = outputs.logits[:, -labels.shape[1]:][:, :-1]
        with torch.no_grad():
            teacher_logits = self.teacher(**model_inputs, use_cache=False).logits[:, :-1]
        target = labels[:, 1:]
        mask = target != -100
        n_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
        n_tokens = torch.as_tensor(n_tokens, device=student_logits.device).clamp(min=1)
        hard = F.cross_entropy(student_logits[mask], target[mask], reduction="sum") / n_tokens
        T = self.distill.temperature
        soft = T * T * distill_kl(student_logits, teacher_logits, mask, T, self.distill.kl_direction) / n_tokens
        loss = self.alpha * hard + (1 - self.alpha) * soft
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        scale = self.accelerator.num_processes if num_items_in_batch is not None else 1
        self._metrics[mode]["hard_loss"].append(hard.item() * scale)
        self._metrics[mode]["soft_loss"].append(soft.item() * scale)
        tokens = self.accelerator.gather_for_metrics(model_inputs["attention_mask"].sum()).sum().item()
        if mode == "train":
            self._total_train_tokens += tokens
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss


@torch.no_grad()
def teacher_answers(spec: JobSpec, rows: list[dict]) -> list[dict]:
    """Greedy teacher answers for each row's prompt, as new prompt/completion rows."""
    d = spec.distill
    tokenizer = load_tokenizer(d.teacher_model)
    tokenizer.padding_side = "left"  # generation continues from the end of every prompt
    teacher = load_model(d.teacher_model).eval()
    out = []
    for i in range(0, len(rows), d.generation_batch_size):
        batch = rows[i : i + d.generation_batch_size]
        texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = teacher.generate(**enc, max_new_tokens=d.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for r, ids in zip(batch, gen[:, enc["input_ids"].shape[1]:]):
            answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
            out.append({"prompt": r["prompt"], "completion": [{"role": "assistant", "content": answer}]})
    return out


def train(spec: JobSpec, files: RunFiles) -> dict:
    d = spec.distill
    if d.method == "output":
        rows = load_dataset(spec.data.train_file).to_list()
        generated = teacher_answers(spec, rows)
        write_jsonl(generated, files.dir / "teacher_outputs.jsonl")
        log.info("teacher answered %d prompts -> %s", len(generated), files.dir / "teacher_outputs.jsonl")
        from datasets import Dataset

        return sft.train(spec, files, train_ds=Dataset.from_list(generated))
    check_same_tokenizer(spec.model, d.teacher_model)
    teacher = load_model(d.teacher_model)
    return sft.train(spec, files, trainer_cls=DistillationTrainer, teacher=teacher, distill=d)
