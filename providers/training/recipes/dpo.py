"""Direct preference optimization on TRL's DPOTrainer.

setup: tokenizer, policy, reference, datasets, DPOConfig -> train -> save_final.
With PEFT the reference is the base model with its adapters disabled, and with precompute_ref_log_probs
the reference log-probs come from one pass of the policy before training: no second copy is loaded.
"""

from __future__ import annotations

from trl import DPOConfig, DPOTrainer

from ..components import (
    callbacks,
    eval_slice,
    latest_checkpoint,
    load_model,
    load_tokenizer,
    peft_config,
    prepare,
    save_final,
    trainer_args,
)
from ..data import load_dataset
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


def train(spec: JobSpec, files: RunFiles) -> dict:
    tokenizer = load_tokenizer(spec.model)
    model = load_model(spec.model, spec)
    # The reference is the initial policy: with PEFT the base with adapters disabled; with precomputed
    # log-probs the policy itself, in one pass before training; otherwise a frozen copy.
    shared_reference = spec.peft is not None or spec.efficiency.precompute_ref_log_probs
    ref_model = None if shared_reference else load_model(spec.model, spec, trained=False)
    train_ds = load_dataset(spec.data.train_file)
    val_ds = load_dataset(spec.data.validation_file) if spec.data.validation_file else None
    reporter, cbs = callbacks(spec, files, tokenizer)
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=dpo_config(spec, len(train_ds)),
        train_dataset=train_ds,
        eval_dataset=eval_slice(train_ds, val_ds, spec),
        processing_class=tokenizer,
        peft_config=peft_config(spec.peft) if spec.peft else None,
        callbacks=cbs,
    )
    prepare(trainer, spec).train(resume_from_checkpoint=latest_checkpoint(spec.checkpoint.output_dir) if spec.checkpoint.resume else None)
    return save_final(trainer, spec, files, reporter)
