"""The post-training API's request models: Llama Stack 0.2.12's types, extended, and the FSDP service's bodies.

Llama Stack 0.2.12 builds each route from the provider's method signature, so these models *are* the
API: they extend 0.2.12's types (everything 0.2.12 clients send stays valid) with
- `PeftFinetuningConfig` and `DistillationConfig` as extra `algorithm_config` types for
  supervised_fine_tune,
- `DPOAlignmentConfig` with defaults for what the short guide payload omits, plus `beta`/`loss_type`,
- every other method's algorithm_config, generated from the method table: the method's settings model
  (providers/training/settings.py) plus its `type` and `peft`,
- `TrainingConfig` with positive sizes and checkpoint, sequence-length and FSDP options.
Both providers and the FSDP service use them, so a request means the same thing everywhere. Each
algorithm_config model turns itself into the job's settings (`job_settings`); `providers/api/to_spec.py`
turns the whole request into a JobSpec.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, ClassVar, Literal, Protocol, Union

from llama_stack.apis.post_training import DataConfig as _DataConfig
from llama_stack.apis.post_training import (
    DatasetFormat,
    EfficiencyConfig,
    LoraFinetuningConfig,
    QATFinetuningConfig,
)
from llama_stack.apis.post_training import OptimizerConfig as _OptimizerConfig
from llama_stack.apis.post_training import TrainingConfig as _TrainingConfig
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveFloat,
    WrapValidator,
    create_model,
    field_validator,
)

from ..errors import BadRequest
from ..training.keys import KnownKeys, keys_checker
from ..training.methods import METHODS, PREFERENCE_CALL, SFT_CALL
from ..training.spec import (
    LABEL_SMOOTHING_LOSSES,
    MAX_COUNT,
    PEFT_METHODS,
    AttnImplementation,
    Count,
    DistillSpec,
    DpoSpec,
    PeftSpec,
)

log = logging.getLogger("providers.api")

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

    # The wire format's "method" is the PEFT type (`peft_type` inside, where "method" is the training method)
    model_config = ConfigDict(allow_inf_nan=False, validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)
    type: Literal["PEFT"] = "PEFT"
    peft_type: Literal[PEFT_METHODS] = Field(alias="method")  # type: ignore[valid-type]
    target_modules: list[str] | None = None
    rank: Count = 8
    alpha: PositiveFloat = 16
    dropout: float = Field(0.0, ge=0, lt=1)
    num_virtual_tokens: Count = 8
    merge_adapter: bool = False


# A request's LoRA or PEFT adapters (`peft`, distillation's `student_peft`)
AdapterConfig = Annotated[LoraFinetuningConfig | PeftFinetuningConfig | None,
                          BeforeValidator(keys_checker(LoraFinetuningConfig, PeftFinetuningConfig))]


class RequestContext(Protocol):
    """What an algorithm_config asks of the API layer while it becomes the job's settings (api/to_spec.py)."""

    check_host: bool  # whether this host must be able to run the job

    def peft(self, cfg: Any, field: str) -> PeftSpec | None: ...  # adapters, checked against the model
    def teacher(self, model: str | None, outputs_dir: str | None, kind: str) -> tuple[str, str]: ...
    def check_on_host(self, settings: BaseModel, field: str) -> None: ...  # what the settings need here


class MethodConfig(KnownKeys):
    """A method's algorithm_config: its settings model's fields, its `type`, and `peft` (adapters instead of
    the whole model; where the method has a reference, it is the base with the adapters off)."""

    model_config = FINITE
    method: ClassVar[str]  # the training method it requests (methods.py)
    peft: AdapterConfig = None

    def job_settings(self, ctx: RequestContext) -> dict[str, Any]:
        """The JobSpec parts of this algorithm_config: the method's section and `peft`."""
        info = METHODS[self.method]
        section = info.settings.model_validate(self.model_dump(include=set(info.settings.model_fields)))
        ctx.check_on_host(section, "algorithm_config")
        return {info.section: section, "peft": ctx.peft(self.peft, "algorithm_config.peft")}


class DistillationConfig(DistillSpec):
    """Knowledge distillation through supervised_fine_tune: `{"type": "distillation", ...}`; the teacher is a
    model reference or a teacher task's outputs, resolved and confined as the job's model is."""

    model_config = FINITE
    method: ClassVar[str] = "distill"
    type: Literal["distillation"] = "distillation"
    student_peft: AdapterConfig = None

    def job_settings(self, ctx: RequestContext) -> dict[str, Any]:
        teacher_model, teacher_outputs_dir = ctx.teacher(self.teacher_model, self.teacher_outputs_dir, self.kind)
        spec = DistillSpec.model_validate({**self.model_dump(include=set(DistillSpec.model_fields)),
                                           "teacher_model": teacher_model, "teacher_outputs_dir": teacher_outputs_dir})
        return {"distill": spec, "peft": ctx.peft(self.student_peft, "algorithm_config.student_peft")}


class DPOAlignmentConfig(DpoSpec, MethodConfig):
    """DPO's settings (DpoSpec: `beta`, `loss_type`, `loss_weights`, `label_smoothing`), `peft`, and the four
    fields of 0.2.12's DPO config (its client sends them all), mapped onto TRL's DPOTrainer:

    - reward_scale -> beta (the implicit reward is beta * log-ratio); `beta` wins when both are given.
    - epsilon -> label_smoothing where the loss reads it (robust, exo_pair, aot, aot_unpaired); with any
      other loss it is accepted, logged, and listed in resources_allocated.not_applied.
    - reward_clip, gamma: DPO has no such parameter; accepted, logged, and listed as not applied.
    """

    method: ClassVar[str] = "dpo"
    type: Literal["dpo"] = "dpo"
    reward_scale: PositiveFloat | None = None
    reward_clip: float | None = None
    epsilon: float | None = None
    gamma: float | None = None

    def job_settings(self, ctx: RequestContext) -> dict[str, Any]:
        """DpoSpec, `peft`, and the 0.2.12 settings this request carried that have no effect (with why)."""
        settings = self.model_dump(include=set(DpoSpec.model_fields))
        given = self.model_fields_set
        if "beta" not in given and self.reward_scale is not None:
            settings["beta"] = self.reward_scale
        not_applied: dict[str, str] = {}
        if self.reward_clip not in (None, 0.0):
            not_applied["reward_clip"] = f"{self.reward_clip}: DPO has no reward clipping"
        if self.gamma not in (None, 0.0):
            not_applied["gamma"] = f"{self.gamma}: DPO has no discount factor"
        if self.epsilon not in (None, 0.0):
            if not set(LABEL_SMOOTHING_LOSSES) & set(self.loss_type):
                not_applied["epsilon"] = (f"{self.epsilon}: label smoothing is read only by loss_type "
                                          f"{list(LABEL_SMOOTHING_LOSSES)}, not {self.loss_type}")
            elif not 0 <= self.epsilon < 0.5:
                raise BadRequest(f"algorithm_config.epsilon: {self.epsilon} is label smoothing for loss_type "
                                 f"{self.loss_type} and must be in [0, 0.5)")
            elif "label_smoothing" not in given:
                settings["label_smoothing"] = self.epsilon
        for field, why in not_applied.items():
            log.warning("algorithm_config.%s=%s is accepted but not applied", field, why)
        spec = DpoSpec.model_validate(settings)
        ctx.check_on_host(spec, "algorithm_config")
        return {"dpo": spec, "peft": ctx.peft(self.peft, "algorithm_config.peft"),
                "not_applied": {f"algorithm_config.{k}": v for k, v in not_applied.items()}}


# Request models written out: where the wire format is not the settings model's (0.2.12's DPO fields;
# distillation's teacher references and `student_peft`) or is Llama Stack's own (sft's adapters).
WRITTEN_CONFIGS: tuple[type[BaseModel], ...] = (
    LoraFinetuningConfig, QATFinetuningConfig, PeftFinetuningConfig, DistillationConfig, DPOAlignmentConfig)


def method_config(name: str) -> type[MethodConfig]:
    """The algorithm_config model of a method from the table: its settings, `type` and `peft`
    (e.g. "kto" -> KTOAlignmentConfig)."""
    info = METHODS[name]
    (algorithm_type,) = (t for t in info.algorithm_types if t is not None)
    model = create_model(
        f"{name.upper()}AlignmentConfig", __base__=(info.settings, MethodConfig), __module__=__name__,
        __doc__=f'{info.settings.__doc__ or name}\n\nRequested as `{{"type": "{algorithm_type}", ...}}`.',
        type=(Literal[algorithm_type], algorithm_type),
    )
    model.method = name
    return model


def _algorithm_configs() -> dict[str, type[BaseModel]]:
    """Every algorithm_config `type` of the table -> its request model (written out, else generated)."""
    written = {m.model_fields["type"].default: m for m in WRITTEN_CONFIGS}
    return {t: written.get(t) or method_config(name)
            for name, m in METHODS.items() for t in m.algorithm_types if t is not None}


ALGORITHM_CONFIGS = _algorithm_configs()


def configs_of(call: str) -> dict[str, type[BaseModel]]:
    """The algorithm_config types of a Llama Stack call -> their request models, in table order."""
    return {t: ALGORITHM_CONFIGS[t] for m in METHODS.values() if m.call == call for t in m.algorithm_types
            if t is not None}


SFT_CONFIGS = tuple(configs_of(SFT_CALL).values())
SFTAlgorithmConfig = Annotated[
    Union[SFT_CONFIGS],  # noqa: UP007 - a union built from the table
    Field(discriminator="type"),
    BeforeValidator(keys_checker(*SFT_CONFIGS)),
]

# preference_optimize's algorithm_config: its `type` -> the request model of the method it selects
PREFERENCE_CONFIGS: dict[str, type[BaseModel]] = configs_of(PREFERENCE_CALL)


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
    Union[tuple(PREFERENCE_CONFIGS.values())],  # noqa: UP007 - a union built from the table
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
