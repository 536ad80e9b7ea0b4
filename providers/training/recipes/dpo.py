"""Direct preference optimization on TRL's DPOTrainer.

setup: tokenizer, policy, reference, datasets, DPOConfig -> train -> save_final.
With PEFT the reference is the base model with its adapters disabled, and with precompute_ref_log_probs
the reference log-probs come from one pass of the policy before training: no second copy is loaded.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from ..components import (
    callbacks,
    eval_slice,
    load_model,
    load_tokenizer,
    peft_config,
    reachable_rows,
    reference_model,
    train_and_save,
    trainer_args,
)
from ..data import load_dataset
from ..efficiency import chunked_lm_head
from ..run_files import RunFiles
from ..spec import JobSpec


def dpo_config(spec: JobSpec, num_rows: int, has_eval: bool = True) -> DPOConfig:
    dpo = spec.dpo
    return DPOConfig(
        **trainer_args(spec, num_rows, has_eval),
        max_length=spec.data.max_seq_len,
        beta=dpo.beta,
        loss_type=list(dpo.loss_type),
        loss_weights=dpo.loss_weights,
        label_smoothing=dpo.label_smoothing,
        precompute_ref_log_probs=spec.efficiency.precompute_ref_log_probs,
    )


def add_logits_lm_head(model, outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """Answer DPOTrainer's `model(..., labels=, fused_lm_head=True)` from the model's full logits.

    TRL's own head scores the LM head in chunks (never holding [tokens x vocab] logits) and recomputes them
    in backward; on a CPU that costs about as much as the rest of a small model's step. Here: the model's
    forward, one cross-entropy per position for the log-probs (the only output with a gradient), and the
    metrics (`entropy`, `mean_logits`, `is_top1`, WPO's `log_sum_sq_probs`) without gradient, over the
    completion positions only. Same fields as TRL's FusedCausalLMOutput, same values (tested)."""
    model_forward = type(model).forward.__get__(model)  # the model's own forward, not TRL's patched one

    @functools.wraps(type(model).forward)
    def logits_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                       **kwargs):
        if not fused_lm_head:  # generation and anything else: the model as it was
            given = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return model_forward(*args, **kwargs, **{k: v for k, v in given.items() if v is not None})
        kwargs["use_cache"] = False
        out = model_forward(*args, **kwargs)
        logits = out.logits.float()
        if shift_labels is None:  # position t predicts token t+1; the last position predicts nothing
            labels = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), -100)], dim=1)
        else:
            labels = shift_labels
        mask = labels != -100
        vocab = logits.size(-1)
        log_probs = -F.cross_entropy(logits.view(-1, vocab), labels.clamp(min=0).view(-1), reduction="none")
        log_probs = log_probs.view(mask.shape).masked_fill(~mask, 0)
        fields = {"log_probs": log_probs}
        with torch.no_grad():
            fields.update(_completion_metrics(logits, labels, mask, outputs))
        if shift_labels is None:  # drop the last position, as TRL's head returns [batch, seq - 1]
            fields = {k: v[:, :-1] for k, v in fields.items()}
            mask = mask[:, :-1]
        loss = -fields["log_probs"].sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None
                                             else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=getattr(out, "aux_loss", None), **fields)

    model.forward = types.MethodType(logits_forward, model)


def _completion_metrics(logits, labels, mask, outputs: tuple[str, ...]) -> dict:
    """TRL's per-token metric fields at the completion positions (zeros elsewhere), a few hundred rows of
    [vocab] at a time so no second full-size tensor is allocated."""
    wanted = [f for f in ("entropy", "log_sum_sq_probs", "mean_logits") if f in outputs]
    fields = {f: logits.new_zeros(mask.shape) for f in wanted}
    if "is_top1" in outputs:
        fields["is_top1"] = (logits.argmax(-1) == labels) & mask
    if not wanted:
        return fields
    rows = logits[mask]
    parts = {f: [] for f in wanted}
    for chunk in rows.split(512):
        log_p = chunk.log_softmax(-1)
        if "entropy" in parts:
            parts["entropy"].append(-(log_p.exp() * log_p).sum(-1))
        if "log_sum_sq_probs" in parts:
            parts["log_sum_sq_probs"].append((2 * log_p).logsumexp(-1))
        if "mean_logits" in parts:
            parts["mean_logits"].append(chunk.mean(-1))
    for f in wanted:
        fields[f][mask] = torch.cat(parts[f]) if parts[f] else rows.new_zeros(0)
    return fields


class LogitsDPOTrainer(DPOTrainer):
    """DPOTrainer with `add_logits_lm_head` in place of TRL's chunked LM head on the policy and the reference
    (the reference log-probs of `precompute_ref_log_probs` are computed in __init__, still chunked: a
    forward without gradient, where the chunks cost little)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
        if self.use_weighting:
            outputs += ("log_sum_sq_probs",)
        add_logits_lm_head(self.model.get_base_model() if is_peft_model(self.model) else self.model, outputs)
        if self.ref_model is not None:
            add_logits_lm_head(self.ref_model)


def train(spec: JobSpec, files: RunFiles) -> dict:
    tokenizer = load_tokenizer(spec.model)
    model = load_model(spec.model, spec)
    ref_model = reference_model(spec)  # None: the policy (adapters off, or precomputed) is its own reference
    train_ds = load_dataset(spec.data.train_file)
    val_ds = load_dataset(spec.data.validation_file) if spec.data.validation_file else None
    eval_ds = eval_slice(train_ds, val_ds, spec)
    train_ds = reachable_rows(train_ds, spec)
    reporter, cbs = callbacks(spec, files, tokenizer)
    trainer_cls = DPOTrainer if chunked_lm_head(spec) else LogitsDPOTrainer
    trainer = trainer_cls(
        model=model,
        ref_model=ref_model,
        args=dpo_config(spec, len(train_ds)),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config(spec.peft) if spec.peft else None,
        callbacks=cbs,
    )
    return train_and_save(trainer, spec, files, reporter)
