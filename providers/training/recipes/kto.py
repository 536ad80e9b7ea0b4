"""Kahneman-Tversky optimization on TRL's KTOTrainer.

setup: tokenizer, policy, reference, datasets (paired preference rows unpaired: chosen -> desirable,
rejected -> undesirable), KTOConfig -> train -> save_final.
With PEFT the reference is the base model with its adapters disabled, and with precompute_ref_log_probs
the reference log-probs come from one pass of the policy before training: no second copy is kept.
"""

from __future__ import annotations

from trl import KTOConfig, KTOTrainer
from trl.data_utils import unpair_preference_dataset

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
from ..run_files import RunFiles
from ..spec import JobSpec


def kto_config(spec: JobSpec, num_rows: int, has_eval: bool = True) -> KTOConfig:
    kto = spec.kto
    args = trainer_args(spec, num_rows, has_eval)
    # KTO's KL term pairs each row with its neighbour in a fixed-order batch: rows are shuffled once, up front
    # (methods.py: fixed_order, so group_by_length is refused before the job starts)
    args["train_sampling_strategy"] = "sequential"
    return KTOConfig(
        **args,
        max_length=spec.data.max_seq_len,
        beta=kto.beta,
        desirable_weight=kto.desirable_weight,
        undesirable_weight=kto.undesirable_weight,
        precompute_ref_log_probs=spec.efficiency.precompute_ref_log_probs,
    )


def unpaired(path: str | None):
    """A preference file as KTO's rows: `{"prompt", "completion", "label"}`, two per pair."""
    return unpair_preference_dataset(load_dataset(path)) if path else None


def train(spec: JobSpec, files: RunFiles) -> dict:
    tokenizer = load_tokenizer(spec.model)
    model = load_model(spec.model, spec)
    ref_model = reference_model(spec)  # None: the policy (adapters off, or precomputed) is its own reference
    train_ds = unpaired(spec.data.train_file)
    if spec.data.shuffle:
        train_ds = train_ds.shuffle(seed=spec.seed)
    val_ds = unpaired(spec.data.validation_file)
    eval_ds = eval_slice(train_ds, val_ds, spec)
    train_ds = reachable_rows(train_ds, spec)
    reporter, cbs = callbacks(spec, files, tokenizer)
    trainer = KTOTrainer(
        model=model,
        ref_model=ref_model,
        args=kto_config(spec, len(train_ds)),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config(spec.peft) if spec.peft else None,
        callbacks=cbs,
    )
    return train_and_save(trainer, spec, files, reporter)
