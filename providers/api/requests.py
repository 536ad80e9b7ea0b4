"""The post-training API's request models: Llama Stack 0.2.12's types, extended, and the FSDP service's bodies.

Llama Stack 0.2.12 builds each route from the provider's method signature, so these models *are* the
API: they extend 0.2.12's types (everything 0.2.12 clients send stays valid) with
- `PeftFinetuningConfig` and `DistillationConfig` as extra `algorithm_config` types for
  supervised_fine_tune,
- `DPOAlignmentConfig` with defaults for what the short guide payload omits, plus `beta`/`loss_type`,
- `TrainingConfig` with positive sizes and checkpoint, sequence-length and FSDP options.
Both providers and the FSDP service use them, so a request means the same thing everywhere.
`providers/api/to_spec.py` turns them into a JobSpec.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from llama_stack.apis.post_training import DataConfig as _DataConfig
from llama_stack.apis.post_training import (
    DatasetFormat,
    EfficiencyConfig,
    LoraFinetuningConfig,
    QATFinetuningConfig,
)
from llama_stack.apis.post_training import OptimizerConfig as _OptimizerConfig
from llama_stack.apis.post_training import TrainingConfig as _TrainingConfig
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveFloat, WrapValidator, field_validator

from ..errors import BadRequest
from ..graders import GraderList
from ..training.keys import KnownKeys, keys_checker
from ..training.spec import (
    DPO_LOSS_TYPES,
    GRPO_LOSS_TYPES,
    MAX_COUNT,
    PEFT_METHODS,
    AttnImplementation,
    Count,
    KlDirection,
    NewTokens,
)

# JSON allows 1e999 (parsed as inf) and Python's json also NaN/Infinity: refused in every request model,
# since pydantic would write them back out as null and a job spec could not be read again.
FINITE = ConfigDict(allow_inf_nan=False)


# Unknown keys are an error at every level (providers/training/keys.py): our models inherit KnownKeys; fields
# typed with Llama Stack's own models (EfficiencyConfig, LoRA, QAT) check their keys before validation.
LlamaStackEfficiency = Annotated[EfficiencyConfig, BeforeValidator(keys_checker(EfficiencyConfig))]


class DataConfig(KnownKeys, _DataConfig):
    model_config = FINITE
    batch_size: Count
    # 0.2.12 marks both required; published examples omit them. The rows' own shape decides the format
    # (preference rows for DPO), so a missing data_format changes nothing.
    shuffle: bool = True
    data_format: DatasetFormat | None = None


class OptimizerConfig(KnownKeys, _OptimizerConfig):
    model_config = FINITE
    lr: PositiveFloat
    weight_decay: float = Field(ge=0)
    num_warmup_steps: int = Field(ge=0, le=MAX_COUNT)


class TrainingConfig(KnownKeys, _TrainingConfig):
    model_config = FINITE
    n_epochs: Count
    max_steps_per_epoch: Count = 1
    gradient_accumulation_steps: Count = 1
    max_validation_steps: Count | None = 1
    data_config: DataConfig | None = None
    optimizer_config: OptimizerConfig | None = None
    efficiency_config: LlamaStackEfficiency | None = None
    # None (0.2.12 says "bf16"): a request without dtype gets the provider config's dtype, not a value
    # the typed client never sent.
    dtype: str | None = None
    # Extensions (ignored by nothing: each has a documented meaning)
    learning_rate: PositiveFloat | None = None  # AdamW at this rate when optimizer_config is absent
    max_seq_len: Count = 512
    save_steps: Count | None = None
    save_total_limit: Count | None = 3
    resume_from_checkpoint: bool = True
    seed: int = Field(42, ge=0, le=2**32 - 1)
    fsdp_config: dict[str, Any] | None = None  # remote::trl_fsdp only
    torch_run_config: dict[str, Any] | None = None  # remote::trl_fsdp only
    # priority, max_retries and per-node resources (gpus, gpu_memory_gb, cpu_cores, ram_gb): SchedulingSpec
    scheduling: dict[str, Any] | None = None
    # Speed and memory (providers/training/efficiency.py); a knob this host cannot run is a 400
    gradient_checkpointing: bool | None = None  # None: efficiency_config.enable_activation_checkpointing
    padding_free: bool = False
    group_by_length: bool = False
    attn_implementation: AttnImplementation = "sdpa"
    load_in_4bit: bool = False
    use_liger_kernel: bool = False
    torch_compile: bool = False
    precompute_ref_log_probs: bool = False
    chunked_lm_head: bool | None = None  # SFT and DPO: TRL's chunked LM head; None: with CUDA only

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        return None if v is None else normalize_dtype(v)


DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "fp32": "fp32",
                 "float32": "fp32"}


def normalize_dtype(value: str, field: str = "dtype") -> str:
    """bf16 / fp16 / fp32 (or their torch names) as the job spec's name; raises ValueError naming the field."""
    if value not in DTYPE_ALIASES:
        raise BadRequest(f"{field}: {value!r} is not one of bf16, fp16, fp32 (or bfloat16, float16, float32)")
    return DTYPE_ALIASES[value]


class PeftFinetuningConfig(KnownKeys):
    """Any PEFT method that trains under TRL: `{"type": "PEFT", "method": "ia3", ...}`."""

    model_config = FINITE
    type: Literal["PEFT"] = "PEFT"
    method: Literal[PEFT_METHODS]  # type: ignore[valid-type]
    target_modules: list[str] | None = None
    rank: Count = 8
    alpha: PositiveFloat = 16
    dropout: float = Field(0.0, ge=0, lt=1)
    num_virtual_tokens: Count = 8
    merge_adapter: bool = False


class DistillationConfig(KnownKeys):
    """Knowledge distillation through supervised_fine_tune: `{"type": "distillation", ...}`."""

    model_config = FINITE
    type: Literal["distillation"] = "distillation"
    teacher_model: str | None = None  # a live teacher, loaded beside the student
    teacher_outputs_dir: str | None = None  # or a teacher task's outputs (answers + top-k log-probs)
    method: Literal["output", "logit", "hybrid"] = "logit"
    temperature: PositiveFloat = 2.0
    alpha: float = Field(0.5, ge=0, le=1)
    kl_direction: KlDirection = "forward"
    max_new_tokens: NewTokens = 32
    student_peft: Annotated[LoraFinetuningConfig | PeftFinetuningConfig | None,
                            BeforeValidator(keys_checker(LoraFinetuningConfig, PeftFinetuningConfig))] = None


SFTAlgorithmConfig = Annotated[
    LoraFinetuningConfig | QATFinetuningConfig | PeftFinetuningConfig | DistillationConfig,
    Field(discriminator="type"),
    BeforeValidator(keys_checker(LoraFinetuningConfig, QATFinetuningConfig, PeftFinetuningConfig, DistillationConfig)),
]


class DPOAlignmentConfig(KnownKeys):
    """0.2.12's DPO config (its client sends all four fields), with defaults, and the `beta`/`loss_type`
    of later releases.

    Mapping onto TRL's DPOTrainer:
    - reward_scale -> beta (the implicit reward is beta * log-ratio); `beta` wins when both are given.
    - epsilon -> label_smoothing where the loss reads it (robust, exo_pair, aot, aot_unpaired); with any
      other loss it is accepted, logged, and listed in resources_allocated.not_applied.
    - reward_clip, gamma: DPO has no such parameter; accepted, logged, and listed as not applied.
    """

    model_config = FINITE
    type: Literal["dpo"] = "dpo"
    reward_scale: PositiveFloat | None = None
    reward_clip: float | None = None
    epsilon: float | None = None
    gamma: float | None = None
    beta: PositiveFloat | None = None
    loss_type: Literal[DPO_LOSS_TYPES] | list[Literal[DPO_LOSS_TYPES]] = "sigmoid"  # type: ignore[valid-type]
    loss_weights: list[float] | None = None


class KTOAlignmentConfig(KnownKeys):
    """KTO through preference_optimize: `{"type": "kto", ...}`. Paired rows are unpaired (chosen: desirable,
    rejected: undesirable)."""

    model_config = FINITE
    type: Literal["kto"] = "kto"
    beta: PositiveFloat = 0.1
    desirable_weight: PositiveFloat = 1.0
    undesirable_weight: PositiveFloat = 1.0


class ORPOAlignmentConfig(KnownKeys):
    """ORPO through preference_optimize: `{"type": "orpo", "beta": 0.1}` (paired rows, as DPO takes)."""

    model_config = FINITE
    type: Literal["orpo"] = "orpo"
    beta: PositiveFloat = 0.1


class GRPOAlignmentConfig(KnownKeys):
    """GRPO through preference_optimize: `{"type": "grpo", "graders": [...], ...}`, this project's extension
    (Llama Stack has no reinforcement call). Rows are prompts; their other columns are the graders' `item`."""

    model_config = FINITE
    type: Literal["grpo"] = "grpo"
    graders: GraderList
    num_generations: int = Field(8, ge=2, le=256)
    max_completion_length: NewTokens = 64
    temperature: PositiveFloat = 1.0
    beta: float = Field(0.0, ge=0)
    loss_type: Literal[GRPO_LOSS_TYPES] = "dapo"  # type: ignore[valid-type]
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epsilon: float = Field(0.2, gt=0, lt=1)
    num_iterations: int = Field(1, ge=1, le=64)
    use_vllm: bool = False
    row_keyed_sampling: bool = False
    # Train adapters instead of the whole model; with beta > 0 the reference is the base, adapters disabled
    peft: Annotated[LoraFinetuningConfig | PeftFinetuningConfig | None,
                    BeforeValidator(keys_checker(LoraFinetuningConfig, PeftFinetuningConfig))] = None


# preference_optimize's algorithm_config: its `type` -> the request model of the method it selects
PREFERENCE_CONFIGS: dict[str, type[BaseModel]] = {
    "dpo": DPOAlignmentConfig,
    "kto": KTOAlignmentConfig,
    "orpo": ORPOAlignmentConfig,
    "grpo": GRPOAlignmentConfig,
}


def _preference_config(value: Any, handler: Any) -> BaseModel:
    """Validate with the model `type` names (0.2.12 clients send DPO's config without one), so that an error
    names `algorithm_config.FIELD` as 0.2.12's single DPO model did."""
    if isinstance(value, tuple(PREFERENCE_CONFIGS.values())):
        return value
    if not isinstance(value, dict):  # the error 0.2.12's DPO model gave
        return DPOAlignmentConfig.model_validate(value)
    kind = value.get("type") or "dpo"
    if kind not in PREFERENCE_CONFIGS:
        raise BadRequest(f"type: {str(kind)[:100]!r} is not a preference_optimize method; accepted: "
                         f"{list(PREFERENCE_CONFIGS)}")
    return PREFERENCE_CONFIGS[kind].model_validate(value)


PreferenceAlgorithmConfig = Annotated[
    DPOAlignmentConfig | KTOAlignmentConfig | ORPOAlignmentConfig | GRPOAlignmentConfig,
    WrapValidator(_preference_config),
]


class SupervisedFineTuneRequest(KnownKeys):
    """The FSDP service's supervised-fine-tune body: 0.2.12's, plus inline rows and multi-node parts."""

    model_config = FINITE
    job_uuid: str
    training_config: TrainingConfig
    hyperparam_search_config: dict[str, Any] = Field(default_factory=dict)
    logger_config: dict[str, Any] = Field(default_factory=dict)
    model: str
    checkpoint_dir: str | None = None
    algorithm_config: SFTAlgorithmConfig | None = None
    rows: list[dict[str, Any]] | None = None  # inline rows instead of an uploaded dataset
    validation_rows: list[dict[str, Any]] | None = None
    part_of: str | None = None  # set by a coordinator: this node's part of a multi-node job


class PreferenceOptimizeRequest(KnownKeys):
    """0.2.12's body, plus `model` and `checkpoint_dir` as published examples send them (with `model`,
    `finetuned_model` names the result instead of being the model to train)."""

    model_config = FINITE
    job_uuid: str
    finetuned_model: str
    model: str | None = None
    algorithm_config: PreferenceAlgorithmConfig = Field(default_factory=DPOAlignmentConfig)
    training_config: TrainingConfig
    hyperparam_search_config: dict[str, Any] = Field(default_factory=dict)
    logger_config: dict[str, Any] = Field(default_factory=dict)
    checkpoint_dir: str | None = None
    rows: list[dict[str, Any]] | None = None
    validation_rows: list[dict[str, Any]] | None = None
    part_of: str | None = None


class JobRef(KnownKeys):
    job_uuid: str
