"""Odds-ratio preference optimization on TRL's ORPOTrainer (trl.experimental.orpo in TRL 1.16).

setup: tokenizer, policy, datasets (paired preference rows, as DPO takes), ORPOConfig -> train -> save_final.
ORPO has no reference model: the loss is the chosen answers' NLL plus beta times the log-odds-ratio term.
"""

from __future__ import annotations

from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from ..components import (
    callbacks,
    eval_slice,
    load_model,
    load_tokenizer,
    peft_config,
    reachable_rows,
    train_and_save,
    trainer_args,
)
from ..data import load_dataset
from ..run_files import RunFiles
from ..spec import JobSpec


def orpo_config(spec: JobSpec, num_rows: int, has_eval: bool = True) -> ORPOConfig:
    return ORPOConfig(
        **trainer_args(spec, num_rows, has_eval),
        max_length=spec.data.max_seq_len,
        beta=spec.orpo.beta,
    )


def train(spec: JobSpec, files: RunFiles) -> dict:
    tokenizer = load_tokenizer(spec.model)
    model = load_model(spec.model, spec)
    train_ds = load_dataset(spec.data.train_file)
    val_ds = load_dataset(spec.data.validation_file) if spec.data.validation_file else None
    eval_ds = eval_slice(train_ds, val_ds, spec)
    train_ds = reachable_rows(train_ds, spec)
    reporter, cbs = callbacks(spec, files, tokenizer)
    trainer = ORPOTrainer(
        model=model,
        args=orpo_config(spec, len(train_ds)),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config(spec.peft) if spec.peft else None,
        callbacks=cbs,
    )
    return train_and_save(trainer, spec, files, reporter)
