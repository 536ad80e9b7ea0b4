"""Supervised fine-tuning (full or PEFT) on TRL's SFTTrainer.

setup: tokenizer, model, datasets, SFTConfig -> train -> save_final.
"""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

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


def sft_config(spec: JobSpec, num_rows: int, has_eval: bool = True) -> SFTConfig:
    return SFTConfig(
        **trainer_args(spec, num_rows, has_eval),
        max_length=spec.data.max_seq_len,
        packing=spec.data.packed,
        # Rows are prompt/completion messages: completion-only loss is "do not train on the input".
        completion_only_loss=not spec.data.train_on_input,
    )


def datasets(spec: JobSpec):
    train_ds = load_dataset(spec.data.train_file)
    val_ds = load_dataset(spec.data.validation_file) if spec.data.validation_file else None
    return train_ds, eval_slice(train_ds, val_ds, spec)


def train(spec: JobSpec, files: RunFiles, train_ds=None, trainer_cls=SFTTrainer, **trainer_kw) -> dict:
    """Run SFT. `train_ds` and `trainer_cls` let the distillation recipe reuse this setup."""
    tokenizer = load_tokenizer(spec.model)
    model = load_model(spec.model)
    default_train, eval_ds = datasets(spec)
    train_ds = default_train if train_ds is None else train_ds
    reporter, cbs = callbacks(spec, files, tokenizer)
    trainer = trainer_cls(
        model=model,
        args=sft_config(spec, len(train_ds)),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config(spec.peft) if spec.peft else None,
        callbacks=cbs,
        **trainer_kw,
    )
    if len(trainer.train_dataset) == 0:
        raise ValueError(f"no training row keeps an answer token within max_seq_len={spec.data.max_seq_len}")
    prepare(trainer, spec).train(resume_from_checkpoint=latest_checkpoint(spec.checkpoint.output_dir) if spec.checkpoint.resume else None)
    return save_final(trainer, spec, files, reporter)
