"""Pieces every recipe builds the same way: model, tokenizer, precision, PEFT config, trainer arguments,
and the callback that reports progress into the run directory."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from .devices import device_type
from .efficiency import check_supported, model_kwargs, trainer_kwargs
from .loggers import logger_args
from .pause import PauseCheckpoint
from .run_files import RunFiles, utc_now, writes_status
from .spec import JobSpec, PeftSpec

log = logging.getLogger("providers.training")


def resolve_dtype(requested: str) -> tuple[str, str | None]:
    """The precision to train in, and a note when it differs from the request.

    bf16 on a CPU without native bf16 kernels falls back to fp32 (logged) instead of failing inside TRL;
    fp16 autocast is GPU-only.
    """
    if requested == "fp32":
        return "fp32", None
    if device_type() == "cuda":
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            return "fp16", "bf16 requested but this GPU has no bf16 support: training in fp16"
        return requested, None
    if requested == "bf16" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16", None
    return "fp32", f"{requested} requested but this CPU cannot train in it: training in fp32"


def load_tokenizer(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_tokenizer(student_path: str, teacher_path: str) -> None:
    """Logit distillation compares distributions token by token: both models must share one vocabulary."""
    s, t = load_tokenizer(student_path), load_tokenizer(teacher_path)
    if s.get_vocab() != t.get_vocab():
        raise ValueError(
            f"teacher tokenizer ({teacher_path}, {len(t)} tokens) differs from the student's "
            f"({student_path}, {len(s)} tokens): logit and hybrid distillation need a shared vocabulary; "
            "use method 'output' instead"
        )


def load_model(path: str, spec: JobSpec | None = None, trained: bool = True):
    """A causal LM from `path`, with the job's attention implementation; `trained` models also get the job's
    4-bit quantization (QLoRA), frozen models (references, teachers) do not."""
    # Weights stay fp32 whatever the job's dtype: bf16/fp16 run as autocast (Trainer's bf16/fp16 flags),
    # so the optimizer keeps full-precision master weights, as torchtune and TRL do by default.
    kw = {}
    if spec is not None:
        check_supported(spec.efficiency, prefix="")
        kw = model_kwargs(spec, resolve_dtype(spec.dtype)[0])
        if not trained:
            kw.pop("quantization_config", None)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)


def model_modules(path: str) -> tuple[str, dict[str, str]]:
    """A model's type and its modules (full name -> class name), built from its config on the meta device:
    no weights are read and no memory is taken, so a request can be checked against a 70B model."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config.model_type, {name: type(module).__name__ for name, module in model.named_modules() if name}


def peft_config(spec: PeftSpec, task_type: str = "CAUSAL_LM"):
    """Our PEFT settings -> a peft config object."""
    import peft

    targets = spec.target_modules
    m = spec.peft_type
    if m in ("lora", "dora"):
        return peft.LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=targets or "all-linear",
            use_dora=m == "dora",
            task_type=task_type,
        )
    if m == "ia3":
        return peft.IA3Config(target_modules=targets, task_type=task_type)
    if m == "loha":
        return peft.LoHaConfig(r=spec.rank, alpha=spec.alpha, target_modules=targets or "all-linear", task_type=task_type)
    if m == "lokr":
        return peft.LoKrConfig(r=spec.rank, alpha=spec.alpha, target_modules=targets or "all-linear", task_type=task_type)
    if m == "vera":
        return peft.VeraConfig(r=spec.rank, target_modules=targets or ["q_proj", "v_proj"], task_type=task_type)
    if m == "boft":
        return peft.BOFTConfig(boft_block_size=4, target_modules=targets or ["q_proj", "v_proj"], task_type=task_type)
    if m == "oft":
        return peft.OFTConfig(r=0, oft_block_size=4, target_modules=targets or ["q_proj", "v_proj"], task_type=task_type)
    if m == "adalora":
        return peft.AdaLoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=targets, total_step=1000, task_type=task_type)
    if m == "ln_tuning":
        return peft.LNTuningConfig(target_modules=targets, task_type=task_type)
    if m == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type=task_type)
    if m == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type=task_type)
    if m == "p_tuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type=task_type)
    raise ValueError(f"unknown PEFT method {m!r}")


def total_steps(spec: JobSpec, num_rows: int) -> int:
    """Optimizer steps: n_epochs x min(max_steps_per_epoch, steps in one pass over the data)."""
    per_epoch = max(1, math.ceil(num_rows / (spec.data.batch_size * spec.gradient_accumulation_steps)))
    if spec.max_steps_per_epoch is not None:
        per_epoch = min(per_epoch, spec.max_steps_per_epoch)
    return spec.n_epochs * per_epoch


def reachable_rows(dataset, spec: JobSpec):
    """The training rows the run's steps reach. With max_steps_per_epoch on a dataset bigger than its steps
    take, only total_steps x the global batch of rows (a seeded random subset when shuffling; the first rows
    otherwise, or for a method that shuffled them once itself), so the trainer tokenizes only those: a 2-step
    DPO job on 100k rows tokenized all of them first, 78 s on each rank of the tiny model. The same rows on a
    resume (same seed and file); the trainer's sampler still shuffles them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    reach = total_steps(spec, len(dataset)) * spec.data.batch_size * spec.gradient_accumulation_steps * world
    if spec.max_steps_per_epoch is None or reach >= len(dataset):
        return dataset
    from .methods import METHODS

    if spec.data.shuffle and not METHODS[spec.method].fixed_order:
        return dataset.select(sorted(random.Random(spec.seed).sample(range(len(dataset)), reach)))
    return dataset.select(range(reach))


def trainer_args(spec: JobSpec, num_rows: int, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments fields shared by SFTConfig and DPOConfig, from the spec."""
    precision, note = resolve_dtype(spec.dtype)
    if note:
        log.warning(note)
    ck = spec.checkpoint
    steps = total_steps(spec, num_rows)
    # Fused AdamW (one kernel for all parameters, CPU and CUDA): 7x faster optimizer steps than the loop
    # version on CPU at 25M parameters. FSDP keeps the loop version (sharded DTensor parameters).
    adamw = "adamw_torch_fused" if spec.fsdp is None else "adamw_torch"
    optim = {"adamw": adamw, "adam": adamw, "sgd": "sgd"}[spec.optimizer.optimizer_type]
    # Without save_steps only the final model is saved (by `save_final`), not a resumable checkpoint.
    save_steps = ck.save_steps or steps
    fsdp = {}
    if spec.fsdp is not None:
        from .fsdp import fsdp_trainer_args

        fsdp = fsdp_trainer_args(spec)
    return dict(
        **fsdp,
        output_dir=ck.output_dir,
        max_steps=steps,
        per_device_train_batch_size=spec.data.batch_size,
        per_device_eval_batch_size=spec.data.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.optimizer.lr,
        weight_decay=spec.optimizer.weight_decay,
        # "adam" is AdamW with the same weight decay: with weight_decay=0 the two are the same update.
        optim=optim,
        warmup_steps=spec.optimizer.num_warmup_steps,
        lr_scheduler_type="linear" if spec.optimizer.num_warmup_steps else "constant",
        # TRL defaults to bf16=True: wrong or slow on a CPU.
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device_type() == "cpu",
        train_sampling_strategy=("group_by_length" if spec.efficiency.group_by_length
                                 else "random" if spec.data.shuffle else "sequential"),
        # TRL defaults to gradient checkpointing: off unless the job asks, then non-reentrant (efficiency.py).
        **trainer_kwargs(spec),
        seed=spec.seed,
        logging_steps=spec.logging.logging_steps,
        **logger_args(spec.logging, spec.job_uuid, spec.run_dir),  # report_to, run_name, project
        save_strategy="steps" if ck.save_steps else "no",
        save_steps=save_steps,
        save_total_limit=ck.save_total_limit,
        eval_strategy="steps" if has_eval and ck.save_steps else "no",
        eval_steps=save_steps,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def latest_checkpoint(output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None


class RunReporter(TrainerCallback):
    """Writes progress into the run directory: metrics.jsonl per log, status.json totals and checkpoints."""

    def __init__(self, files: RunFiles, spec: JobSpec):
        self.files = files
        self.spec = spec
        self.is_main = writes_status()
        self.last_train_loss: float | None = None
        self.last_eval_loss: float | None = None
        self._last_tokens: tuple[float, float] | None = None  # (time, tokens seen) at the previous log
        self._last_status_write = float("-inf")

    def on_train_begin(self, args, state, control, **kw):
        if self.is_main:
            self.files.update_status(state="in_progress", training_started_at=utc_now(), total_steps=state.max_steps)

    def on_log(self, args, state, control, logs=None, **kw):
        if not self.is_main or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        if "loss" in logs:
            self.last_train_loss = float(logs["loss"])
        if "eval_loss" in logs:
            self.last_eval_loss = float(logs["eval_loss"])
        if "num_tokens" in logs:  # cumulative count logged by TRL's trainers
            now, seen = time.perf_counter(), float(logs["num_tokens"])
            if self._last_tokens and now > self._last_tokens[0]:
                record["tokens_per_s"] = (seen - self._last_tokens[1]) / (now - self._last_tokens[0])
            self._last_tokens = (now, seen)
        self.files.append_metrics(record)
        # status.json is rewritten atomically (temp file + rename, ~1 ms): at most once a second, so
        # progress reporting stays under 1% of a tiny model's step time. metrics.jsonl has every step.
        now = time.monotonic()
        if now - self._last_status_write >= 1.0:
            self.files.update_status(step=state.global_step, last_loss=self.last_train_loss)
            self._last_status_write = now

    def on_train_end(self, args, state, control, **kw):
        if self.is_main:
            self.files.update_status(step=state.global_step, last_loss=self.last_train_loss)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if metrics and "eval_loss" in metrics:
            self.last_eval_loss = float(metrics["eval_loss"])

    def on_save(self, args, state, control, **kw):
        # Every run dir records the checkpoint its node's ranks wrote (each node of a `nodes` job keeps its own),
        # so a resumed run finds it on every node instead of setting it aside as unrecorded.
        if not self.is_main:
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero:  # the consolidated model is written by global rank 0
            record_model_origin(path, self.spec)
        self.files.add_checkpoint(
            checkpoint_record(self.spec, str(path), state, self.last_train_loss, self.last_eval_loss),
            keep={str(p) for p in Path(args.output_dir).glob("checkpoint-*")} | {str(path)},
        )


def checkpoint_record(spec: JobSpec, path: str, state, train_loss: float | None, eval_loss: float | None) -> dict:
    """A checkpoint in Llama Stack's `Checkpoint` shape."""
    # Without a validation set, validation_loss is the eval-mode loss on a training slice (see recipes).
    val = train_loss if eval_loss is None else eval_loss
    metrics = None
    if train_loss is not None and val is not None:
        metrics = {
            "epoch": int(math.ceil(state.epoch or 0)),
            "train_loss": train_loss,
            "validation_loss": val,
            "perplexity": math.exp(min(val, 50.0)),
        }
    return {
        "identifier": f"{spec.job_uuid}-step{state.global_step}",
        "created_at": utc_now(),
        "epoch": int(math.ceil(state.epoch or 0)),
        "step": state.global_step,
        "post_training_job_id": spec.job_uuid,
        "path": path,
        "training_metrics": metrics,
    }


def eval_slice(train_ds, eval_ds, spec: JobSpec):
    """The evaluation set: the validation rows, else a fixed slice of the training rows, capped at
    max_validation_steps batches."""
    ds = eval_ds if eval_ds is not None else train_ds
    if spec.max_validation_steps is not None:
        ds = ds.select(range(min(len(ds), spec.max_validation_steps * spec.data.batch_size)))
    return ds


def callbacks(spec: JobSpec, files: RunFiles, tokenizer) -> tuple[RunReporter, list]:
    """The reporter, plus FSDP's callback (first, so a recorded checkpoint already has its HF model), and the
    pause checkpoint (last: it holds the run once the others have recorded the checkpoint)."""
    reporter = RunReporter(files, spec)
    if spec.fsdp is None:
        return reporter, [reporter, PauseCheckpoint(files)]
    from .fsdp import FsdpCallback

    return reporter, [FsdpCallback(spec, files.ranks, tokenizer), reporter, PauseCheckpoint(files)]


def prepare(trainer, spec: JobSpec):
    """Last settings before training: FSDP policies must be on the plugin before the model is wrapped."""
    if spec.fsdp is not None:
        from .fsdp import configure_plugin

        configure_plugin(trainer, spec)
    return trainer


def train_and_save(trainer, spec: JobSpec, files: RunFiles, reporter: RunReporter) -> dict[str, Any]:
    """Every recipe's last step: train (from the newest checkpoint when the job resumes), then save_final."""
    resume = latest_checkpoint(spec.checkpoint.output_dir) if spec.checkpoint.resume else None
    prepare(trainer, spec).train(resume_from_checkpoint=resume)
    return save_final(trainer, spec, files, reporter)


def reference_model(spec: JobSpec):
    """A preference method's frozen reference, or None when the policy is its own reference: with PEFT the
    base with its adapters disabled; with precomputed log-probs the policy itself, in one pass up front."""
    if spec.peft is not None or spec.efficiency.precompute_ref_log_probs:
        return None
    return load_model(spec.model, spec, trained=False)


def save_final(trainer, spec: JobSpec, files: RunFiles, reporter: RunReporter) -> dict[str, Any]:
    """Evaluate, save the final model (and merged model for PEFT on request), record it as a checkpoint."""
    metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    if "eval_loss" in metrics:
        reporter.last_eval_loss = float(metrics["eval_loss"])
    final_dir = Path(spec.checkpoint.output_dir) / "final"
    if spec.fsdp is not None:
        from .fsdp import save_consolidated

        save_consolidated(trainer.model, final_dir, trainer.processing_class)
    else:
        trainer.save_model(str(final_dir))
        trainer.processing_class.save_pretrained(str(final_dir))
    if trainer.accelerator.is_main_process:
        record_model_origin(final_dir, spec)
        if spec.peft is not None and spec.peft.merge_adapter:
            save_merged(final_dir, base=spec.model)
            record_model_origin(final_dir / "merged", spec)
        record = checkpoint_record(spec, str(final_dir), trainer.state, reporter.last_train_loss, reporter.last_eval_loss)
        record["identifier"] = f"{spec.job_uuid}-final"
        files.add_checkpoint(record)
    return {"final_checkpoint": str(final_dir), "final_train_loss": reporter.last_train_loss,
            "final_validation_loss": reporter.last_eval_loss}


def record_model_origin(directory: Path, spec: JobSpec) -> None:
    """Name the hub model a job trained from (id and revision, as Hugging Face does), not this machine's cache
    path, as the base of a saved adapter or model: adapter_config.json, config.json's `_name_or_path` and
    the model card. The run's spec.json keeps the local path."""
    if spec.model_id is None or not directory.is_dir():
        return
    adapter = directory / "adapter_config.json"
    if adapter.exists():
        config = json.loads(adapter.read_text())
        config["base_model_name_or_path"] = spec.model_id
        config["revision"] = spec.model_revision
        adapter.write_text(json.dumps(config, indent=2, sort_keys=True))
    model_config = directory / "config.json"
    if model_config.exists():
        config = json.loads(model_config.read_text())
        if "_name_or_path" in config:
            config["_name_or_path"] = spec.model_id
            model_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = directory / "README.md"
    if card.exists():  # peft's card: `base_model: PATH` and a `base_model:adapter:PATH` tag
        card.write_text(card.read_text().replace(spec.model, spec.model_id))


def save_merged(adapter_dir: Path, base: str | None = None, dest: Path | None = None) -> None:
    """Base model + adapter from disk, merged into one full model with its tokenizer at `dest` (default
    adapter_dir/merged): the one adapter merge (end of training, export, `ft:` continuations). `base`: the
    base model's local directory (default: the adapter's base_model_name_or_path and revision)."""
    from peft import AutoPeftModelForCausalLM, PeftModel

    if base is None:
        merged = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir)).merge_and_unload()
    else:
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()
    dest = Path(dest or Path(adapter_dir) / "merged")
    merged.save_pretrained(str(dest))
    has_tokenizer = (Path(adapter_dir) / "tokenizer_config.json").is_file() or base is None
    load_tokenizer(str(adapter_dir) if has_tokenizer else base).save_pretrained(str(dest))
