"""Knowledge distillation from a teacher into a student.

- output: the teacher answers the training prompts (greedy), the student is fine-tuned on those answers.
- logit:  the student matches the teacher's token distributions at temperature T:  T^2 * KL.
- hybrid: alpha * CE(labels) + (1 - alpha) * T^2 * KL.
KL is forward KL(teacher || student) by default, reverse KL(student || teacher) on request, over the
completion tokens only.

With a live teacher the loop is TRL's SFTTrainer with our loss step. With a teacher task's cached
outputs (`teacher_outputs_dir`) no teacher is loaded: `output` is SFT on the cached answers, and
`logit`/`hybrid` use the cached top-k log-probs, in a transformers Trainer with our collator and loss
step (TRL has no trainer for stored teacher logits). On the k cached tokens, forward KL is the
cross-entropy of the student's full-vocabulary distribution against the renormalized teacher top-k;
reverse KL renormalizes the student over the same k tokens.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments
from trl import SFTTrainer

from ..components import (
    callbacks,
    check_same_tokenizer,
    load_model,
    load_tokenizer,
    peft_config,
    train_and_save,
    trainer_args,
)
from ..data import load_dataset, read_shards, write_jsonl
from ..efficiency import padding_free
from ..run_files import RunFiles
from ..spec import DistillSpec, JobSpec, TeacherSpec
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
        self.alpha = 0.0 if distill.kind == "logit" else distill.alpha

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
        n_tokens = token_count(mask, num_items_in_batch)
        hard = hard_loss(student_logits[mask], target[mask], n_tokens, self.alpha)
        T = self.distill.temperature
        soft = T * T * distill_kl(student_logits, teacher_logits, mask, T, self.distill.kl_direction) / n_tokens
        loss = mix(self, hard, soft, self.alpha, num_items_in_batch, self._metrics[mode])
        # Padding-free batches carry no attention mask: every position is a real token.
        real = model_inputs["attention_mask"].sum() if "attention_mask" in model_inputs else labels.new_tensor(labels.numel())
        tokens = self.accelerator.gather_for_metrics(real).sum().item()
        if mode == "train":
            self._total_train_tokens += tokens
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss


def token_count(mask, num_items_in_batch):
    """The loss normalizer: answer tokens of the whole accumulated batch when the Trainer counted them
    (then the loss is already scaled for gradient accumulation), else of this micro-batch."""
    n = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return torch.as_tensor(n, device=mask.device).clamp(min=1)


def hard_loss(logits, target, n_tokens, alpha: float):
    """Cross-entropy on the labels; without gradient when it has no weight (method `logit`)."""
    with torch.set_grad_enabled(alpha > 0 and torch.is_grad_enabled()):
        return F.cross_entropy(logits, target, reduction="sum") / n_tokens


def mix(trainer, hard, soft, alpha: float, num_items_in_batch, metrics) -> torch.Tensor:
    """alpha * hard + (1 - alpha) * soft, with hard/soft logged as per-micro-batch means."""
    loss = alpha * hard + (1 - alpha) * soft
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * trainer.accelerator.num_processes  # DDP/FSDP average gradients over ranks
    scale = 1
    if num_items_in_batch is not None:
        scale = trainer.accelerator.num_processes * trainer.current_gradient_accumulation_steps
    metrics["hard_loss"].append(hard.item() * scale)
    metrics["soft_loss"].append(soft.item() * scale)
    return loss


@torch.no_grad()
def teacher_answers(spec: JobSpec, rows: list[dict]) -> list[dict]:
    """Greedy teacher answers for each row's prompt, as new prompt/completion rows (the teacher task's
    generation, without top-k log-probs)."""
    from .teacher import answer_batch

    d = spec.distill
    settings = TeacherSpec(teacher_model=d.teacher_model, top_k=None, max_new_tokens=d.max_new_tokens,
                           generation_batch_size=d.generation_batch_size)
    tokenizer = load_tokenizer(d.teacher_model)
    teacher = load_model(d.teacher_model).eval()
    out = []
    for i in range(0, len(rows), d.generation_batch_size):
        prompts = [r["prompt"] for r in rows[i : i + d.generation_batch_size]]
        out += [{"prompt": r["prompt"], "completion": r["completion"]}
                for r in answer_batch(teacher, tokenizer, prompts, settings)]
    return out


def soft_targets(topk_logprobs, temperature: float):
    """Teacher top-k log-probs -> log-probs at temperature T, renormalized over the k tokens."""
    return F.log_softmax(topk_logprobs / temperature, dim=-1)


class CachedLogitsCollator:
    """Pads teacher-task rows: input_ids, labels (answer tokens only) and, per position that predicts an
    answer token, the teacher's top-k ids and log-probs. `padding_free`: the rows are concatenated into
    one row with position_ids restarting at 0 per row (no attention mask: attention stays within each row)."""

    def __init__(self, pad_token_id: int, max_len: int, padding_free: bool = False):
        self.pad = pad_token_id
        self.max_len = max_len
        self.padding_free = padding_free

    def __call__(self, rows: list[dict]) -> dict:
        if self.padding_free:
            parts = [self.pad_rows([r]) for r in rows]
            flat = {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0] if k != "attention_mask"}
            flat["position_ids"] = torch.cat([torch.arange(p["input_ids"].shape[1]) for p in parts])[None]
            return flat
        return self.pad_rows(rows)

    def pad_rows(self, rows: list[dict]) -> dict:
        width = min(self.max_len, max(len(r["input_ids"]) for r in rows))
        k = len(rows[0]["topk_ids"][0])
        batch = {
            "input_ids": torch.full((len(rows), width), self.pad),
            "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
            "labels": torch.full((len(rows), width), -100),
            "topk_ids": torch.zeros(len(rows), width, k, dtype=torch.long),
            "topk_logprobs": torch.zeros(len(rows), width, k),
        }
        for i, r in enumerate(rows):
            ids = r["input_ids"][:width]
            n, s = len(ids), int(r["completion_start"])
            batch["input_ids"][i, :n] = ids
            batch["attention_mask"][i, :n] = 1
            # Row t holds the teacher's distribution for token t + 1: answer token j sits at s + j.
            m = max(0, min(len(r["topk_ids"]), n - s))  # 0: the prompt alone fills max_seq_len
            if m:
                batch["labels"][i, s : s + m] = ids[s : s + m]
                batch["topk_ids"][i, s - 1 : s - 1 + m] = r["topk_ids"][:m]
                batch["topk_logprobs"][i, s - 1 : s - 1 + m] = r["topk_logprobs"][:m]
        return batch


class CachedDistillationTrainer(Trainer):
    """alpha * CE + (1 - alpha) * T^2 * KL against cached teacher top-k log-probs."""

    def __init__(self, *args, distill: DistillSpec, **kw):
        super().__init__(*args, **kw)
        self.distill = distill
        self.alpha = 0.0 if distill.kind == "logit" else distill.alpha
        self.extra_metrics: dict[str, list[float]] = {"hard_loss": [], "soft_loss": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        keep = ("input_ids", "attention_mask", "position_ids")
        outputs = model(**{k: v for k, v in inputs.items() if k in keep}, use_cache=False)
        logits = outputs.logits[:, -labels.shape[1]:][:, :-1]  # prompt-learning PEFT prepends virtual tokens
        target = labels[:, 1:]
        mask = target != -100
        n_tokens = token_count(mask, num_items_in_batch)
        selected = logits[mask]  # [answer tokens, vocab], taken once
        T = self.distill.temperature
        hard = hard_loss(selected, target[mask], n_tokens, self.alpha)
        student = F.log_softmax(selected / T, dim=-1).gather(-1, inputs["topk_ids"][:, :-1][mask])
        teacher = soft_targets(inputs["topk_logprobs"][:, :-1][mask], T)
        if self.distill.kl_direction == "forward":
            kl = (teacher.exp() * (teacher - student)).sum()
        else:
            student = F.log_softmax(student, dim=-1)
            kl = (student.exp() * (student - teacher)).sum()
        soft = T * T * kl / n_tokens
        metrics = self.extra_metrics if model.training else {"hard_loss": [], "soft_loss": []}
        loss = mix(self, hard, soft, self.alpha, num_items_in_batch, metrics)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kw) -> None:
        if "loss" in logs:
            for key, values in self.extra_metrics.items():
                if values:
                    logs[key] = sum(values) / len(values)
                    values.clear()
        super().log(logs, *args, **kw)


def train_from_cached_logits(spec: JobSpec, files: RunFiles, rows: list[dict]) -> dict:
    from datasets import Dataset

    d = spec.distill
    if "topk_ids" not in rows[0]:
        raise ValueError(f"{d.teacher_outputs_dir} has answers but no top-k log-probs (teacher top_k was null): "
                         f"method {d.kind!r} needs them; use method 'output'")
    check_same_tokenizer(spec.model, d.teacher_outputs_dir)
    tokenizer = load_tokenizer(spec.model)
    model = load_model(spec.model, spec)
    if spec.peft:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if spec.efficiency.load_in_4bit:  # what TRL's trainers do for a 4-bit base: fp32 norms, input grads
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, peft_config(spec.peft))
    # Tensors once, up front: converting nested top-k lists every step would cost more than the step.
    columns = ["input_ids", "completion_start", "topk_ids", "topk_logprobs"]
    train_ds = Dataset.from_list([{k: r[k] for k in columns} for r in rows]).with_format("torch")
    reporter, cbs = callbacks(spec, files, tokenizer)
    args = TrainingArguments(**trainer_args(spec, len(train_ds), has_eval=False), remove_unused_columns=False)
    trainer = CachedDistillationTrainer(
        model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
        data_collator=CachedLogitsCollator(tokenizer.pad_token_id, spec.data.max_seq_len, padding_free(spec)),
        callbacks=cbs, distill=d,
    )
    return train_and_save(trainer, spec, files, reporter)


def train(spec: JobSpec, files: RunFiles) -> dict:
    d = spec.distill
    if d.teacher_outputs_dir:
        from datasets import Dataset

        rows = read_shards(d.teacher_outputs_dir)
        if not rows:
            raise ValueError(f"teacher_outputs_dir {d.teacher_outputs_dir} holds no teacher outputs")
        if d.kind == "output":
            return sft.train(spec, files, train_ds=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]))
        return train_from_cached_logits(spec, files, rows)
    if d.kind == "output":
        rows = load_dataset(spec.data.train_file).to_list()
        generated = teacher_answers(spec, rows)
        write_jsonl(generated, files.dir / "teacher_outputs.jsonl")
        log.info("teacher answered %d prompts -> %s", len(generated), files.dir / "teacher_outputs.jsonl")
        from datasets import Dataset

        return sft.train(spec, files, train_ds=Dataset.from_list(generated))
    check_same_tokenizer(spec.model, d.teacher_model)
    teacher = load_model(d.teacher_model, spec, trained=False)
    return sft.train(spec, files, trainer_cls=DistillationTrainer, teacher=teacher, distill=d)
