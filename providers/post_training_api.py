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
from pathlib import Path, PurePath
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
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator

from .outbound import HubDownloads
from .training.efficiency import check_4bit
from .training.efficiency import from_training_config as efficiency_spec
from .training.loggers import check_report_to
from .training.spec import (
    DPO_LOSS_TYPES,
    LABEL_SMOOTHING_LOSSES,
    MAX_COUNT,
    PEFT_METHODS,
    SAFE_NAME,
    CheckpointSpec,
    Count,
    DataSpec,
    DistillSpec,
    DpoSpec,
    JobSpec,
    LoggingSpec,
    NewTokens,
    OptimizerSpec,
    PeftSpec,
    SchedulingSpec,
)

log = logging.getLogger("providers.api")

# JSON allows 1e999 (parsed as inf) and Python's json also NaN/Infinity: refused in every request model,
# since pydantic would write them back out as null and a job spec could not be read again.
FINITE = ConfigDict(allow_inf_nan=False)


class DataConfig(_DataConfig):
    model_config = FINITE
    batch_size: Count
    # 0.2.12 marks both required; published examples omit them. The rows' own shape decides the format
    # (preference rows for DPO), so a missing data_format changes nothing.
    shuffle: bool = True
    data_format: DatasetFormat | None = None


class OptimizerConfig(_OptimizerConfig):
    model_config = FINITE
    lr: PositiveFloat
    weight_decay: float = Field(ge=0)
    num_warmup_steps: int = Field(ge=0, le=MAX_COUNT)


class TrainingConfig(_TrainingConfig):
    model_config = FINITE
    n_epochs: Count
    max_steps_per_epoch: Count = 1
    gradient_accumulation_steps: Count = 1
    max_validation_steps: Count | None = 1
    data_config: DataConfig | None = None
    optimizer_config: OptimizerConfig | None = None
    efficiency_config: EfficiencyConfig | None = None
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
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "kernels"] = "sdpa"
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
        raise ValueError(f"{field}: {value!r} is not one of bf16, fp16, fp32 (or bfloat16, float16, float32)")
    return DTYPE_ALIASES[value]


class PeftFinetuningConfig(BaseModel):
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


class DistillationConfig(BaseModel):
    """Knowledge distillation through supervised_fine_tune: `{"type": "distillation", ...}`."""

    model_config = FINITE
    type: Literal["distillation"] = "distillation"
    teacher_model: str | None = None  # a live teacher, loaded beside the student
    teacher_outputs_dir: str | None = None  # or a teacher task's outputs (answers + top-k log-probs)
    method: Literal["output", "logit", "hybrid"] = "logit"
    temperature: PositiveFloat = 2.0
    alpha: float = Field(0.5, ge=0, le=1)
    kl_direction: Literal["forward", "reverse"] = "forward"
    max_new_tokens: NewTokens = 32
    student_peft: LoraFinetuningConfig | PeftFinetuningConfig | None = None


SFTAlgorithmConfig = Annotated[
    LoraFinetuningConfig | QATFinetuningConfig | PeftFinetuningConfig | DistillationConfig,
    Field(discriminator="type"),
]


class DPOAlignmentConfig(BaseModel):
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


def logging_spec(logger_config: dict[str, Any] | None, default_steps: int) -> LoggingSpec:
    """logger_config (a free-form dict in the API) as the job's logging settings; errors name the field."""
    from pydantic import ValidationError

    cfg = logger_config or {}
    if not isinstance(cfg, dict):
        raise ValueError("logger_config: must be an object")
    try:
        return LoggingSpec(
            logging_steps=cfg.get("logging_steps", default_steps),
            tensorboard=cfg.get("tensorboard", False),
            wandb_project=cfg.get("wandb_project"),
            report_to=check_report_to(cfg.get("report_to")),
            project=cfg.get("project"),
            run_name=cfg.get("run_name"),
        )
    except ValidationError as e:
        first = e.errors()[0]
        raise ValueError(f"logger_config.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


# Llama Stack's LoraFinetuningConfig names modules as torchtune does (q_proj, k_proj, v_proj, output_proj,
# apply_lora_to_mlp, apply_lora_to_output); each architecture's Hugging Face modules, as peft target names.
# peft ignores a target no module has, so every name is mapped here and then checked against the model.
_LLAMA_LIKE = {
    "q_proj": ["q_proj"], "k_proj": ["k_proj"], "v_proj": ["v_proj"], "output_proj": ["o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"], "output": ["lm_head"],
}
LORA_MODULE_NAMES: dict[str, dict[str, list[str]]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "granite", "gemma", "gemma2", "gemma3_text"), _LLAMA_LIKE),
    # Phi-3 fuses q, k and v into one projection, and gate and up into another: adapting q adapts all three.
    "phi3": {"q_proj": ["qkv_proj"], "k_proj": ["qkv_proj"], "v_proj": ["qkv_proj"], "output_proj": ["o_proj"],
             "mlp": ["gate_up_proj", "down_proj"], "output": ["lm_head"]},
    # GPT-2 fuses q, k and v (c_attn); its attention output and MLP output are both `c_proj`, told apart by parent.
    "gpt2": {"q_proj": ["c_attn"], "k_proj": ["c_attn"], "v_proj": ["c_attn"], "output_proj": ["attn.c_proj"],
             "mlp": ["mlp.c_fc", "mlp.c_proj"], "output": ["lm_head"]},
}


def lora_targets(model_type: str, attn_modules: list[str], mlp: bool, output: bool) -> list[str]:
    """Llama Stack's LoRA module names as the model's own (peft target names), in request order, once each.

    Names outside the table (a model's own names, such as `o_proj`) pass through unchanged; `check_targets`
    then refuses any the model does not have."""
    table = LORA_MODULE_NAMES.get(model_type, _LLAMA_LIKE)
    names = [t for name in attn_modules for t in table.get(name, [name])]
    names += table["mlp"] if mlp else []
    names += table["output"] if output else []
    return list(dict.fromkeys(names))


def has_module(module_names: set[str], target: str) -> bool:
    """peft's rule: a target names a module whose full name is the target or ends with '.' + target."""
    return target in module_names or any(n.endswith("." + target) for n in module_names)


def check_targets(model_type: str, modules: dict[str, str], targets: list[str], field: str,
                  requested: list[str] | None = None) -> None:
    """Every target must name one of the model's modules; raises ValueError naming the field, the value and
    what the model has."""
    missing = [t for t in targets if not has_module(set(modules), t)]
    if not missing:
        return
    linear = sorted({name.rsplit(".", 1)[-1] for name, kind in modules.items() if kind in ("Linear", "Conv1D")})
    llama_stack_names = [k for k in LORA_MODULE_NAMES.get(model_type, _LLAMA_LIKE) if k not in ("mlp", "output")]
    asked = f" (from {requested})" if requested and requested != targets else ""
    raise ValueError(
        f"{field}: {missing}{asked} is not a module of this {model_type!r} model; accepted: Llama Stack's names "
        f"{llama_stack_names} or the model's own module names, such as {linear}"
    )


def peft_spec(cfg: LoraFinetuningConfig | PeftFinetuningConfig | None, model: str | None = None,
              field: str = "algorithm_config") -> PeftSpec | None:
    """A request's LoRA / PEFT settings as the job's PeftSpec. With `model` (a local model directory), Llama
    Stack's module names become the model's own and every target is checked against the model's modules
    (read from its config: no weights are loaded)."""
    if cfg is None:
        return None
    from .training.components import model_modules

    model_type, modules = "llama", None
    if model is not None:
        try:
            model_type, modules = model_modules(model)
        except Exception as e:  # noqa: BLE001 - a config that builds no model cannot be trained either
            raise ValueError(f"model: {model!r}: no model can be built from its config: {type(e).__name__}: "
                             f"{str(e)[:300]}") from None
    if isinstance(cfg, PeftFinetuningConfig):
        spec = PeftSpec(**cfg.model_dump(exclude={"type"}))
        if modules is not None and spec.target_modules:
            check_targets(model_type, modules, spec.target_modules, f"{field}.target_modules")
        return spec
    if cfg.quantize_base:
        check_4bit(f"{field}.quantize_base")  # QLoRA: a 400 naming what this host lacks
    attn = list(cfg.lora_attn_modules)
    if not attn and not cfg.apply_lora_to_mlp and not cfg.apply_lora_to_output:
        raise ValueError(f"{field}.lora_attn_modules: no modules to adapt (and apply_lora_to_mlp, "
                         "apply_lora_to_output are false)")
    targets = lora_targets(model_type, attn, cfg.apply_lora_to_mlp, cfg.apply_lora_to_output)
    if modules is not None:
        # The attention names on their own first, so that the error names the field holding a bad name.
        check_targets(model_type, modules, lora_targets(model_type, attn, False, False),
                      f"{field}.lora_attn_modules", attn)
        check_targets(model_type, modules, targets, f"{field}.apply_lora_to_mlp/apply_lora_to_output")
    return PeftSpec(
        method="dora" if cfg.use_dora else "lora", target_modules=targets, rank=cfg.rank, alpha=cfg.alpha,
        quantize_base=bool(cfg.quantize_base),
    )


def dpo_spec(cfg: DPOAlignmentConfig) -> tuple[DpoSpec, dict[str, str]]:
    """The DPO settings of a request, and the 0.2.12 settings it carried that have no effect (with why)."""
    loss_type = [cfg.loss_type] if isinstance(cfg.loss_type, str) else list(cfg.loss_type)
    not_applied: dict[str, str] = {}
    if cfg.reward_clip not in (None, 0.0):
        not_applied["reward_clip"] = f"{cfg.reward_clip}: DPO has no reward clipping"
    if cfg.gamma not in (None, 0.0):
        not_applied["gamma"] = f"{cfg.gamma}: DPO has no discount factor"
    smoothing = 0.0
    if cfg.epsilon not in (None, 0.0):
        if set(LABEL_SMOOTHING_LOSSES) & set(loss_type):
            if not 0 <= cfg.epsilon < 0.5:
                raise ValueError(f"algorithm_config.epsilon: {cfg.epsilon} is label smoothing for loss_type "
                                 f"{loss_type} and must be in [0, 0.5)")
            smoothing = cfg.epsilon
        else:
            not_applied["epsilon"] = (f"{cfg.epsilon}: label smoothing is read only by loss_type "
                                      f"{list(LABEL_SMOOTHING_LOSSES)}, not {loss_type}")
    for field, why in not_applied.items():
        log.warning("algorithm_config.%s=%s is accepted but not applied", field, why)
    try:
        spec = DpoSpec(beta=cfg.beta or cfg.reward_scale or 0.1, loss_type=loss_type,
                       loss_weights=cfg.loss_weights, label_smoothing=smoothing)
    except ValueError as e:
        raise ValueError(f"algorithm_config: {e}") from None
    return spec, {f"algorithm_config.{k}": v for k, v in not_applied.items()}


class ProviderDefaults(BaseModel):
    """What the provider config contributes to every job."""

    data_dir: str
    dtype: str = "fp32"
    logging_steps: int = 1
    # Where a request's checkpoint_dir may point, besides DATA_DIR/checkpoints; None: anywhere.
    allowed_checkpoint_roots: list[str] | None = None
    # Where a request's model directories may lie (the HF cache is added); None: anywhere.
    allowed_model_roots: list[str] | None = None
    # How an operator allows another directory, for error messages ("start the service with ...").
    checkpoint_roots_hint: str = "add it to allowed_checkpoint_roots in the provider config"
    model_roots_hint: str = "add it to allowed_model_roots in the provider config"
    # Whether a hub id not in the cache may be downloaded, and up to what size: off unless the operator allows.
    hub_downloads: HubDownloads = Field(default_factory=HubDownloads)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        return normalize_dtype(v, "dtype (the provider config's default precision)")

    @property
    def checkpoints_dir(self) -> Path:
        """Where relative checkpoint_dir values land (the Llama Stack examples send ./checkpoints)."""
        return Path(self.data_dir).expanduser() / "checkpoints"


JOB_UUID = re.compile(SAFE_NAME)
# A Hugging Face hub id: "org/name" (or a bare "name"), as users write `meta-llama/Llama-3.2-1B-Instruct`.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def check_job_uuid(job_uuid: str) -> None:
    if not isinstance(job_uuid, str) or not JOB_UUID.fullmatch(job_uuid):
        raise ValueError(
            f"job_uuid: {str(job_uuid)[:200]!r} must be 1-128 letters, digits, '.', '_' or '-', not starting with '.'"
        )


def check_path_text(value: str, field: str) -> None:
    """A path from a request: no NUL, no '..' component (a request never climbs out of a directory)."""
    if "\x00" in value:
        raise ValueError(f"{field}: contains a NUL character")
    if len(value) > 4096:
        raise ValueError(f"{field}: longer than 4096 characters")
    parts = PurePath(value).parts
    if ".." in parts:
        raise ValueError(f"{field}: {value!r} has a '..' component; name the directory without parent references")
    if any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in parts):
        raise ValueError(f"{field}: a path component is longer than 255 bytes")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field}: not valid UTF-8 text") from None


def is_within(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def confine(path: Path, roots: list[str] | None, field: str, value: str, hint: str) -> Path:
    """`path` with symlinks resolved, which must lie under one of `roots` (None: anywhere)."""
    resolved = path.expanduser().resolve()
    if roots is None:
        return resolved
    allowed = [Path(r).expanduser().resolve() for r in roots]
    if not is_within(resolved, allowed):
        raise ValueError(f"{field}: {value!r} is outside the allowed directories {[str(r) for r in allowed]}; "
                         f"to allow it, {hint}")
    return resolved


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_snapshot(repo_id: str, field: str, policy: HubDownloads) -> Path:
    """A hub model's snapshot directory from the Hugging Face cache. Downloaded only when the operator allows
    it (`policy.allow_download`, HF_HUB_OFFLINE unset) and the repository's files in total fit
    `policy.max_download_gb`, checked before anything is downloaded."""
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))  # the cache only: no network
    except Exception:  # noqa: BLE001 - not cached (or an unusable name): a download may still be allowed
        pass
    if constants.HF_HUB_OFFLINE or not policy.allow_download:
        why = ("HF_HUB_OFFLINE=1 forbids downloading it" if constants.HF_HUB_OFFLINE else
               "this service downloads no models (its operator allows it with hub_downloads.allow_download)")
        raise ValueError(
            f"{field}: {repo_id!r} is not a local directory and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); {why}. Download it on a machine with network access "
            f"(`hf download {repo_id}`) into that cache, or give a local directory")
    cap = int(policy.max_download_gb * 1e9)
    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
        sizes = [s.size for s in info.siblings or []]
        if any(size is None for size in sizes):
            raise ValueError(f"{field}: the Hub does not say how large {repo_id!r} is; it is not downloaded")
        if sum(sizes) > cap:
            raise ValueError(f"{field}: {repo_id!r} is {sum(sizes) / 1e9:.2f} GB, over this service's download "
                             f"limit of {policy.max_download_gb} GB (hub_downloads.max_download_gb)")
        # The revision whose sizes were checked, not whatever the branch points to a moment later.
        return Path(snapshot_download(repo_id, revision=info.sha))
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - unknown repo, gated, no network: all bad input here
        raise ValueError(f"{field}: {repo_id!r} is not a local directory and could not be fetched from the "
                         f"Hugging Face Hub: {type(e).__name__}: {str(e)[:300]}") from None


def resolve_model(ref: str, field: str, defaults: ProviderDefaults) -> str:
    """A request's model (a local directory, or a hub id resolved through the Hugging Face cache) as a
    local causal-LM directory inside the allowed model roots; errors name the field."""
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"{field}: required (a model directory or a Hugging Face model id)")
    check_path_text(ref, field)
    local = Path(ref).expanduser()
    is_path = ref.startswith(("/", "./", "~")) or not HUB_ID.fullmatch(ref)
    path = local if is_path or local.is_dir() else hub_snapshot(ref, field, defaults.hub_downloads)
    roots = None
    if defaults.allowed_model_roots is not None:
        roots = [*defaults.allowed_model_roots, str(hf_cache_dir())]
    path = confine(path, roots, field, ref, defaults.model_roots_hint)  # before any existence check
    check_model_path(str(path), field)
    return str(path)


def hub_origin(ref: str, path: str) -> tuple[str | None, str | None]:
    """(hub id, snapshot commit) when a request's model `ref` was a hub id that resolved to its snapshot in the
    Hugging Face cache (`.../models--ORG--NAME/snapshots/COMMIT`); (None, None) for a local directory."""
    snapshot = Path(path)
    if (HUB_ID.fullmatch(ref) and snapshot.parent.name == "snapshots"
            and snapshot.parent.parent.name == "models--" + ref.replace("/", "--")):
        return ref, snapshot.name
    return None, None


def checkpoint_output_dir(checkpoint_dir: str | None, result_name: str, defaults: ProviderDefaults) -> str | None:
    """Where a new job writes its checkpoints: CHECKPOINT_DIR/RESULT_NAME (None: inside its run dir).

    A relative checkpoint_dir is taken under DATA_DIR/checkpoints, never the server's working directory.
    The directory must be new: a job resumes only from checkpoints it wrote itself."""
    if checkpoint_dir is None:
        return None
    if not isinstance(checkpoint_dir, str) or not checkpoint_dir:
        raise ValueError("checkpoint_dir: must be a non-empty path")
    check_path_text(checkpoint_dir, "checkpoint_dir")
    base = Path(checkpoint_dir).expanduser()
    if not base.is_absolute():
        base = defaults.checkpoints_dir / base
    roots = None
    if defaults.allowed_checkpoint_roots is not None:
        roots = [str(defaults.checkpoints_dir), *defaults.allowed_checkpoint_roots]
    out = confine(base, roots, "checkpoint_dir", checkpoint_dir, defaults.checkpoint_roots_hint) / result_name
    if out.exists():
        raise ValueError(f"checkpoint_dir: {str(out)!r} already exists; a new job writes a new directory "
                         "(choose another checkpoint_dir or result name)")
    return str(out)


def result_name_of(finetuned_model: str, field: str = "finetuned_model") -> str:
    """The name a trained model is given (artifacts, checkpoint directory): `org/name` becomes `org--name`."""
    name = finetuned_model.replace("/", "--")
    if not JOB_UUID.fullmatch(name):
        raise ValueError(f"{field}: {finetuned_model[:200]!r} names the trained model, so it must be 1-128 letters, "
                         "digits, '.', '_', '-' or '/'")
    return name


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
    model_id: str | None = None,
    model_revision: str | None = None,
    train_file: str,
    validation_file: str | None,
    defaults: ProviderDefaults,
    logger_config: dict[str, Any] | None = None,
    output_dir: str | None = None,
    result_name: str | None = None,
    peft: PeftSpec | None = None,
    dpo: DpoSpec | None = None,
    distill: DistillSpec | None = None,
    not_applied: dict[str, str] | None = None,
    fsdp=None,
    check_host: bool = True,
) -> JobSpec:
    """The request, validated and resolved against provider defaults, as the job's spec. `check_host`:
    refuse knobs this host cannot run (False when the job runs on other hosts, which check them at load)."""
    tc = training_config
    dc = tc.data_config
    oc = tc.optimizer_config
    if oc is not None:
        optimizer = OptimizerSpec(optimizer_type=oc.optimizer_type.value, lr=oc.lr, weight_decay=oc.weight_decay,
                                  num_warmup_steps=oc.num_warmup_steps)
    elif tc.learning_rate is not None:
        optimizer = OptimizerSpec(lr=tc.learning_rate)
    else:
        optimizer = OptimizerSpec()
    return JobSpec(
        job_uuid=job_uuid,
        result_name=result_name,
        not_applied=not_applied or {},
        method=method,
        model=model,
        model_id=model_id,
        model_revision=model_revision,
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
        optimizer=optimizer,
        n_epochs=tc.n_epochs,
        max_steps_per_epoch=tc.max_steps_per_epoch,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        max_validation_steps=tc.max_validation_steps,
        # A request without dtype takes the provider config's (TrainingConfig.dtype defaults to None).
        dtype=tc.dtype or defaults.dtype,
        seed=tc.seed,
        peft=peft,
        dpo=dpo,
        distill=distill,
        checkpoint=CheckpointSpec(
            output_dir=output_dir or str(Path(run_dir) / "checkpoints"), save_steps=tc.save_steps,
            save_total_limit=tc.save_total_limit, resume=tc.resume_from_checkpoint,
        ),
        logging=logging_spec(logger_config, defaults.logging_steps),
        fsdp=fsdp,
        efficiency=efficiency_spec(tc, check_host=check_host),
        scheduling=scheduling_spec(tc),
    )


def scheduling_spec(tc: TrainingConfig) -> SchedulingSpec:
    """training_config.scheduling as a SchedulingSpec; raises ValueError naming the field."""
    if tc.scheduling is not None and not isinstance(tc.scheduling, dict):
        raise ValueError("training_config.scheduling: must be an object")
    try:
        return SchedulingSpec.model_validate(tc.scheduling or {})
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"training_config.scheduling{'.' + loc if loc else ''}: {first['msg']}") from None


def algorithm_settings(method: str, model: str, algorithm_config: Any, defaults: ProviderDefaults) -> dict[str, Any]:
    """peft / dpo / distill spec parts (and not-applied settings) for a request's algorithm_config; raises
    ValueError naming the field."""
    if method == "dpo":
        dpo, not_applied = dpo_spec(algorithm_config or DPOAlignmentConfig())
        return {"dpo": dpo, "not_applied": not_applied}
    if isinstance(algorithm_config, QATFinetuningConfig):
        raise ValueError("algorithm_config.type 'QAT': quantization-aware training is not supported by this provider")
    if isinstance(algorithm_config, DistillationConfig):
        d = algorithm_config
        if (d.teacher_model is None) == (d.teacher_outputs_dir is None):
            raise ValueError("algorithm_config: give exactly one of teacher_model and teacher_outputs_dir")
        if d.teacher_model is not None:
            field = "algorithm_config.teacher_model"
            teacher = resolve_model(d.teacher_model, field, defaults)
        else:
            field = "algorithm_config.teacher_outputs_dir"
            check_path_text(d.teacher_outputs_dir, field)
            roots = None
            if defaults.allowed_model_roots is not None:  # a server that confines paths: outputs of its own tasks
                roots = [defaults.data_dir, *defaults.allowed_model_roots]
            teacher = str(confine(Path(d.teacher_outputs_dir), roots, field, d.teacher_outputs_dir,
                                  defaults.model_roots_hint))
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
        return {"distill": spec, "peft": peft_spec(d.student_peft, model, "algorithm_config.student_peft")}
    return {"peft": peft_spec(algorithm_config, model)}


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


def preference_target(finetuned_model: str, model: str | None) -> tuple[str, str | None]:
    """(model to train, result name) of a preference_optimize call. In 0.2.12, `finetuned_model` is the
    model to train. Published examples send `model` (the base) and `finetuned_model` (the result's name):
    with `model` given, it is trained and `finetuned_model` names the result."""
    if model:
        return model, result_name_of(finetuned_model)
    return finetuned_model, None


async def fetch_rows(datasetio: Any, dataset_id: str, field: str) -> list[dict[str, Any]]:
    """All rows of a registered dataset through Llama Stack's datasetio; errors name the field."""
    try:
        page = await datasetio.iterrows(dataset_id=dataset_id, limit=-1)
    except Exception as e:  # noqa: BLE001 - the datasetio router raises several types for unknown ids
        raise ValueError(f"{field}: dataset {str(dataset_id)[:200]!r} cannot be read: {e}") from None
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
        raise ValueError("training_config.data_config: required (dataset_id, batch_size)")
    return training_config.data_config


def prepare_job(
    *,
    job_uuid: str,
    run_dir: Path,
    method: str,
    model: str,
    training_config: TrainingConfig,
    algorithm_config: Any,
    logger_config: dict[str, Any] | None,
    checkpoint_dir: str | None,
    defaults: ProviderDefaults,
    train_rows: Any,
    validation_rows: Any | None,
    result_name: str | None = None,
    fsdp=None,
    output_dir: str | None = None,
    check_host: bool = True,
) -> JobSpec:
    """Validate a request, write its rows into its (new, reserved) run directory, and return its spec.
    `check_host`: as in build_job_spec."""
    data_config_of(training_config)
    ref = model
    model = resolve_model(ref, "model" if method != "dpo" or result_name else "finetuned_model", defaults)
    model_id, model_revision = hub_origin(ref, model)
    settings = algorithm_settings(method, model, algorithm_config, defaults)
    check_output_layer_adapter(settings)
    if output_dir is None:
        output_dir = checkpoint_output_dir(checkpoint_dir, result_name or job_uuid, defaults)
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
        model_id=model_id,
        model_revision=model_revision,
        training_config=training_config,
        run_dir=str(run_dir),
        train_file=str(run_dir / "train.jsonl"),
        validation_file=validation_file,
        defaults=defaults,
        logger_config=logger_config,
        output_dir=output_dir,
        result_name=result_name,
        fsdp=fsdp,
        check_host=check_host,
        **settings,
    )
