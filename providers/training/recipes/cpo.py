"""Contrastive preference optimization on TRL's CPOTrainer (trl.experimental.cpo in TRL 1.16); with
loss_type "simpo", SimPO.

setup: tokenizer, policy, datasets (paired preference rows, as DPO takes), CPOConfig -> train -> save_final.
CPO has no reference model: the loss is a preference loss on the policy's own log-probs (length-normalized
for SimPO) plus cpo_alpha times the chosen answers' NLL.
"""

from __future__ import annotations

from trl.experimental.cpo import CPOConfig, CPOTrainer

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


def cpo_config(spec: JobSpec, num_rows: int, has_eval: bool = True) -> CPOConfig:
    cpo = spec.cpo
    return CPOConfig(
        **trainer_args(spec, num_rows, has_eval),
        max_length=spec.data.max_seq_len,
        beta=cpo.beta,
        loss_type=cpo.loss_type,
        cpo_alpha=cpo.cpo_alpha,
        simpo_gamma=cpo.simpo_gamma,
        label_smoothing=cpo.label_smoothing,
    )


def train(spec: JobSpec, files: RunFiles) -> dict:
    tokenizer = load_tokenizer(spec.model)
    model = load_model(spec.model, spec)
    train_ds = load_dataset(spec.data.train_file)
    val_ds = load_dataset(spec.data.validation_file) if spec.data.validation_file else None
    eval_ds = eval_slice(train_ds, val_ds, spec)
    train_ds = reachable_rows(train_ds, spec)
    reporter, cbs = callbacks(spec, files, tokenizer)
    trainer = CPOTrainer(
        model=model,
        args=cpo_config(spec, len(train_ds)),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config(spec.peft) if spec.peft else None,
        callbacks=cbs,
    )
    return train_and_save(trainer, spec, files, reporter)
