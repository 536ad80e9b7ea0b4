"""The post-training API's request models, and the one function that turns a request into a JobSpec.

Llama Stack 0.2.12 builds each route from the provider's method signature, so these models *are* the
API: they extend 0.2.12's types (everything 0.2.12 clients send stays valid) with
- `PeftFinetuningConfig` and `DistillationConfig` as extra `algorithm_config` types for
  supervised_fine_tune,
- `DPOAlignmentConfig` with defaults for what the short guide payload omits, plus `beta`/`loss_type`,
- `TrainingConfig` with positive sizes and checkpoint, sequence-length and FSDP options.
Both providers and the FSDP service use them, so a request means the same thing everywhere.
"""

from __future__ import annotations

import logging
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from llama_stack.apis.post_training import DataConfig as _DataConfig
from llama_stack.apis.post_training import (
    EfficiencyConfig,
    LoraFinetuningConfig,
    QATFinetuningConfig,
)
from llama_stack.apis.post_training import OptimizerConfig as _OptimizerConfig
from llama_stack.apis.post_training import TrainingConfig as _TrainingConfig
from pydantic import BaseModel, Field, PositiveFloat, PositiveInt, field_validator

from .training.efficiency import check_4bit
from .training.efficiency import from_training_config as efficiency_spec
from .training.spec import (
    DPO_LOSS_TYPES,
    PEFT_METHODS,
    CheckpointSpec,
    DataSpec,
    DistillSpec,
    DpoSpec,
    JobSpec,
    LoggingSpec,
    OptimizerSpec,
    PeftSpec,
)

log = logging.getLogger("providers.api")


class DataConfig(_DataConfig):
    batch_size: PositiveInt


class OptimizerConfig(_OptimizerConfig):
    lr: PositiveFloat
    weight_decay: float = Field(ge=0)
    num_warmup_steps: int = Field(ge=0)


class TrainingConfig(_TrainingConfig):
    n_epochs: PositiveInt
    max_steps_per_epoch: PositiveInt = 1
    gradient_accumulation_steps: PositiveInt = 1
    max_validation_steps: PositiveInt | None = 1
    data_config: DataConfig | None = None
    optimizer_config: OptimizerConfig | None = None
    efficiency_config: EfficiencyConfig | None = None
    dtype: str | None = "bf16"
    # Extensions (ignored by nothing: each has a documented meaning)
    max_seq_len: PositiveInt = 512
    save_steps: PositiveInt | None = None
    save_total_limit: PositiveInt | None = 3
    resume_from_checkpoint: bool = True
    seed: int = 42
    fsdp_config: dict[str, Any] | None = None  # remote::trl_fsdp only
    torch_run_config: dict[str, Any] | None = None  # remote::trl_fsdp only
    # Speed and memory (providers/training/efficiency.py); a knob this host cannot run is a 400
    gradient_checkpointing: bool | None = None  # None: efficiency_config.enable_activation_checkpointing
    padding_free: bool = False
    group_by_length: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "kernels"] = "sdpa"
    load_in_4bit: bool = False
    use_liger_kernel: bool = False
    torch_compile: bool = False
    precompute_ref_log_probs: bool = False

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        aliases = {None: None, "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
                   "fp32": "fp32", "float32": "fp32"}
        if v not in aliases:
            raise ValueError(f"dtype {v!r} is not one of bf16, fp16, fp32")
        return aliases[v]


class PeftFinetuningConfig(BaseModel):
    """Any PEFT method that trains under TRL: `{"type": "PEFT", "method": "ia3", ...}`."""

    type: Literal["PEFT"] = "PEFT"
    method: Literal[PEFT_METHODS]  # type: ignore[valid-type]
    target_modules: list[str] | None = None
    rank: PositiveInt = 8
    alpha: PositiveFloat = 16
    dropout: float = Field(0.0, ge=0, lt=1)
    num_virtual_tokens: PositiveInt = 8
    merge_adapter: bool = False


class DistillationConfig(BaseModel):
    """Knowledge distillation through supervised_fine_tune: `{"type": "distillation", ...}`."""

    type: Literal["distillation"] = "distillation"
    teacher_model: str | None = None  # a live teacher, loaded beside the student
    teacher_outputs_dir: str | None = None  # or a teacher task's outputs (answers + top-k log-probs)
    method: Literal["output", "logit", "hybrid"] = "logit"
    temperature: PositiveFloat = 2.0
    alpha: float = Field(0.5, ge=0, le=1)
    kl_direction: Literal["forward", "reverse"] = "forward"
    max_new_tokens: PositiveInt = 32
    student_peft: LoraFinetuningConfig | PeftFinetuningConfig | None = None


SFTAlgorithmConfig = Annotated[
    LoraFinetuningConfig | QATFinetuningConfig | PeftFinetuningConfig | DistillationConfig,
    Field(discriminator="type"),
]


class DPOAlignmentConfig(BaseModel):
    """0.2.12's DPO config, with defaults, and the `beta`/`loss_type` of later releases.

    Mapping onto TRL's DPOTrainer:
    - reward_scale -> beta (the implicit reward is beta * log-ratio); `beta` wins when both are given.
    - epsilon -> label_smoothing (probability a preference label is flipped); only for 'robust'/'exo_pair'.
    - reward_clip, gamma: DPO has no such parameter; a value other than the default is logged and ignored.
    """

    type: Literal["dpo"] = "dpo"
    reward_scale: PositiveFloat | None = None
    reward_clip: float | None = None
    epsilon: float = Field(0.0, ge=0, lt=0.5)
    gamma: float = 0.0
    beta: PositiveFloat | None = None
    loss_type: Literal[DPO_LOSS_TYPES] | list[Literal[DPO_LOSS_TYPES]] = "sigmoid"  # type: ignore[valid-type]
    loss_weights: list[float] | None = None


def peft_spec(cfg: LoraFinetuningConfig | PeftFinetuningConfig | None) -> PeftSpec | None:
    if cfg is None:
        return None
    if isinstance(cfg, PeftFinetuningConfig):
        return PeftSpec(**cfg.model_dump(exclude={"type"}))
    targets = list(cfg.lora_attn_modules)
    if cfg.apply_lora_to_mlp:
        targets += ["gate_proj", "up_proj", "down_proj"]
    if cfg.apply_lora_to_output:
        targets += ["lm_head"]
    if cfg.quantize_base:
        check_4bit("algorithm_config.quantize_base")  # QLoRA: a 400 naming what this host lacks
    if not targets:
        raise ValueError("algorithm_config.lora_attn_modules: no modules to adapt")
    return PeftSpec(
        method="dora" if cfg.use_dora else "lora", target_modules=targets, rank=cfg.rank, alpha=cfg.alpha,
        quantize_base=bool(cfg.quantize_base),
    )


def dpo_spec(cfg: DPOAlignmentConfig) -> DpoSpec:
    if cfg.reward_clip not in (None, 0.0):
        log.warning("algorithm_config.reward_clip=%s has no meaning for DPO and is ignored", cfg.reward_clip)
    if cfg.gamma:
        log.warning("algorithm_config.gamma=%s has no meaning for DPO and is ignored", cfg.gamma)
    loss_type = [cfg.loss_type] if isinstance(cfg.loss_type, str) else list(cfg.loss_type)
    try:
        return DpoSpec(
            beta=cfg.beta or cfg.reward_scale or 0.1,
            loss_type=loss_type,
            loss_weights=cfg.loss_weights,
            label_smoothing=cfg.epsilon,
        )
    except ValueError as e:
        raise ValueError(f"algorithm_config: {e}") from None


class ProviderDefaults(BaseModel):
    """What the provider config contributes to every job."""

    data_dir: str
    dtype: str = "fp32"
    logging_steps: int = 1
    allowed_checkpoint_roots: list[str] | None = None  # None: anywhere


# A job_uuid names the job's run directory (and its checkpoint subdirectory): no path separators, and no
# leading '.', so that '.' and '..' can never point a run directory (or its clean-up) outside data_dir/runs.
# Names that become directory names (job_uuid, dataset ids, pipeline and node names): never "." or "..".
SAFE_NAME = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"
JOB_UUID = re.compile(SAFE_NAME)


def check_job_uuid(job_uuid: str) -> None:
    if not isinstance(job_uuid, str) or not JOB_UUID.match(job_uuid):
        raise ValueError(
            f"job_uuid: {job_uuid!r} must be 1-128 letters, digits, '.', '_' or '-', not starting with '.'"
        )


def check_checkpoint_dir(path: str | None, allowed_roots: list[str] | None) -> None:
    if path is None or allowed_roots is None:
        return
    resolved = Path(path).expanduser().resolve()
    roots = [Path(r).expanduser().resolve() for r in allowed_roots]
    if not any(resolved == r or r in resolved.parents for r in roots):
        raise ValueError(f"checkpoint_dir {path!r} is outside the allowed roots {[str(r) for r in roots]}")


def check_model_path(path: str, field: str) -> None:
    """A local directory holding a causal LM config; the message names the field."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ValueError(f"{field}: {path!r} is not a local model directory (no config.json there)")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001 - any load failure is bad input
        raise ValueError(f"{field}: {path!r} has a config that does not load: {e}") from None
    archs = config.architectures or []
    if archs:
        # The classes the checkpoint was saved from decide: a BERT encoder ("BertModel", "BertForMaskedLM")
        # has model_type 'bert', which the causal-LM mapping also lists (BertLMHeadModel), yet it is no causal LM.
        causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        is_causal = any(a in causal_classes or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    else:
        is_causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not is_causal:
        raise ValueError(f"{field}: {path!r} is a {config.model_type!r} model ({archs}), not a causal LM")


def build_job_spec(
    *,
    job_uuid: str,
    method: str,
    model: str,
    training_config: TrainingConfig,
    run_dir: str,
    train_file: str,
    validation_file: str | None,
    defaults: ProviderDefaults,
    logger_config: dict[str, Any] | None = None,
    checkpoint_dir: str | None = None,
    peft: PeftSpec | None = None,
    dpo: DpoSpec | None = None,
    distill: DistillSpec | None = None,
    fsdp=None,
    output_dir: str | None = None,
) -> JobSpec:
    """The request, validated and resolved against provider defaults, as the job's spec."""
    tc = training_config
    dc = tc.data_config
    oc = tc.optimizer_config
    logger_config = logger_config or {}
    check_checkpoint_dir(checkpoint_dir, defaults.allowed_checkpoint_roots)
    if output_dir is None:
        output_dir = str(Path(checkpoint_dir).expanduser() / job_uuid) if checkpoint_dir else str(Path(run_dir) / "checkpoints")
    return JobSpec(
        job_uuid=job_uuid,
        method=method,
        model=str(Path(model).expanduser()),
        run_dir=run_dir,
        data=DataSpec(
            train_file=train_file,
            validation_file=validation_file,
            batch_size=dc.batch_size,
            shuffle=dc.shuffle,
            packed=bool(dc.packed),
            train_on_input=bool(dc.train_on_input),
            max_seq_len=tc.max_seq_len,
        ),
        optimizer=OptimizerSpec(
            optimizer_type=oc.optimizer_type.value, lr=oc.lr, weight_decay=oc.weight_decay,
            num_warmup_steps=oc.num_warmup_steps,
        ) if oc else OptimizerSpec(),
        n_epochs=tc.n_epochs,
        max_steps_per_epoch=tc.max_steps_per_epoch,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        max_validation_steps=tc.max_validation_steps,
        dtype=tc.dtype or defaults.dtype,
        seed=tc.seed,
        peft=peft,
        dpo=dpo,
        distill=distill,
        checkpoint=CheckpointSpec(
            output_dir=output_dir, save_steps=tc.save_steps, save_total_limit=tc.save_total_limit,
            resume=tc.resume_from_checkpoint,
        ),
        logging=LoggingSpec(
            logging_steps=int(logger_config.get("logging_steps", defaults.logging_steps)),
            tensorboard=bool(logger_config.get("tensorboard", False)),
            wandb_project=logger_config.get("wandb_project"),
        ),
        fsdp=fsdp,
        efficiency=efficiency_spec(tc),
    )


def algorithm_settings(method: str, model: str, algorithm_config: Any) -> dict[str, Any]:
    """peft / dpo / distill spec parts for a request's algorithm_config; raises ValueError naming the field."""
    if method == "dpo":
        return {"dpo": dpo_spec(algorithm_config or DPOAlignmentConfig())}
    if isinstance(algorithm_config, QATFinetuningConfig):
        raise ValueError("algorithm_config.type 'QAT': quantization-aware training is not supported by this provider")
    if isinstance(algorithm_config, DistillationConfig):
        d = algorithm_config
        if (d.teacher_model is None) == (d.teacher_outputs_dir is None):
            raise ValueError("algorithm_config: give exactly one of teacher_model and teacher_outputs_dir")
        if d.teacher_model is not None:
            field = "algorithm_config.teacher_model"
            check_model_path(d.teacher_model, field)
            teacher = str(Path(d.teacher_model).expanduser())
        else:
            field = "algorithm_config.teacher_outputs_dir"
            teacher = str(Path(d.teacher_outputs_dir).expanduser())
            if not (Path(teacher) / "teacher_task.json").exists():
                raise ValueError(f"{field}: {teacher!r} holds no teacher task outputs")
        spec = DistillSpec(
            **d.model_dump(exclude={"type", "student_peft", "teacher_model", "teacher_outputs_dir"}),
            teacher_model=teacher if d.teacher_model else None,
            teacher_outputs_dir=None if d.teacher_model else teacher,
        )
        if d.method != "output":
            from .training.components import check_same_tokenizer

            try:
                check_same_tokenizer(model, teacher)
            except ValueError as e:
                raise ValueError(f"{field}: {e}") from None
        return {"distill": spec, "peft": peft_spec(d.student_peft)}
    return {"peft": peft_spec(algorithm_config)}


def check_output_layer_adapter(settings: dict[str, Any]) -> None:
    """TRL 1.16's trainers compute log-probs from `lm_head.weight` directly, so an adapter on the LM head
    would never train: refuse it, except for distillation from cached logits (a plain Trainer)."""
    peft, distill = settings.get("peft"), settings.get("distill")
    if peft is None or "lm_head" not in (peft.target_modules or []):
        return
    if distill is not None and distill.teacher_outputs_dir and distill.method != "output":
        return
    raise ValueError(
        "algorithm_config.apply_lora_to_output / target_modules: an adapter on lm_head is not trained by "
        "TRL's trainers (they read lm_head.weight directly); leave lm_head out, or train it fully"
    )


def method_of(algorithm_config: Any) -> str:
    return "distill" if isinstance(algorithm_config, DistillationConfig) else "sft"


async def fetch_rows(datasetio: Any, dataset_id: str, field: str) -> list[dict[str, Any]]:
    """All rows of a registered dataset through Llama Stack's datasetio; errors name the field."""
    try:
        page = await datasetio.iterrows(dataset_id=dataset_id, limit=-1)
    except Exception as e:  # noqa: BLE001 - the datasetio router raises several types for unknown ids
        raise ValueError(f"{field}: dataset {dataset_id!r} cannot be read: {e}") from None
    if not page.data:
        raise ValueError(f"{field}: dataset {dataset_id!r} is empty")
    return page.data


def write_rows(rows: Any, path: Path, kind: str, field: str) -> int:
    """Normalize and write rows as JSONL; raises ValueError naming the field (bad row or empty)."""
    from .training.data import DataFormatError, normalize_rows, write_jsonl

    try:
        n = write_jsonl(normalize_rows(rows, kind), path)
    except DataFormatError as e:
        raise ValueError(f"{field}: {e}") from None
    if n == 0:
        raise ValueError(f"{field}: the dataset has no rows")
    return n


def data_config_of(training_config: TrainingConfig) -> DataConfig:
    if training_config.data_config is None:
        raise ValueError("training_config.data_config: required (dataset_id, batch_size, shuffle, data_format)")
    return training_config.data_config


@contextmanager
def new_run_dir(run_dir: Path):
    """Creating a job's run directory: if the block fails, remove the directory, but only if this block
    created it (a bad request must never delete another job's files)."""
    existed = run_dir.exists()
    try:
        yield run_dir
    except BaseException:
        if not existed:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def prepare_job(
    *,
    job_uuid: str,
    method: str,
    model: str,
    training_config: TrainingConfig,
    algorithm_config: Any,
    logger_config: dict[str, Any] | None,
    checkpoint_dir: str | None,
    defaults: ProviderDefaults,
    train_rows: Any,
    validation_rows: Any | None,
    fsdp=None,
    output_dir: str | None = None,
) -> JobSpec:
    """Validate a request, write its rows into a new run directory, and return the job's spec."""
    check_job_uuid(job_uuid)
    data_config_of(training_config)
    check_model_path(model, "model" if method != "dpo" else "finetuned_model")
    settings = algorithm_settings(method, str(Path(model).expanduser()), algorithm_config)
    check_output_layer_adapter(settings)
    run_dir = Path(defaults.data_dir).expanduser() / "runs" / job_uuid
    run_dir.mkdir(parents=True, exist_ok=True)
    kind = "preference" if method == "dpo" else "completion"
    write_rows(train_rows, run_dir / "train.jsonl", kind, "training_config.data_config.dataset_id")
    validation_file = None
    if validation_rows is not None:
        validation_file = str(run_dir / "validation.jsonl")
        write_rows(validation_rows, Path(validation_file), kind, "training_config.data_config.validation_dataset_id")
    return build_job_spec(
        job_uuid=job_uuid,
        method=method,
        model=model,
        training_config=training_config,
        run_dir=str(run_dir),
        train_file=str(run_dir / "train.jsonl"),
        validation_file=validation_file,
        defaults=defaults,
        logger_config=logger_config,
        checkpoint_dir=checkpoint_dir,
        fsdp=fsdp,
        output_dir=output_dir,
        **settings,
    )
