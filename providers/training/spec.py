"""The job spec: the one validated object every layer passes on.

The API layer builds a `JobSpec` from a request plus provider config, writes it to `RUN_DIR/spec.json`,
and the training entry point (`python -m providers.training.run RUN_DIR`, alone or under torchrun)
reads it back. Nothing here knows about HTTP or Llama Stack.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, create_model, model_validator

from .methods import METHOD_NAMES, METHODS, with_flag
from .settings import (  # noqa: F401 - the method sections and bounded types, re-exported for their users
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    GRPO_LOSS_TYPES,
    LABEL_SMOOTHING_LOSSES,
    MAX_COUNT,
    MAX_GENERATION_BATCH,
    MAX_NEW_TOKENS,
    Count,
    CpoSpec,
    DistillSpec,
    DpoLossType,
    DpoSpec,
    GenerationBatch,
    GrpoLossType,
    GrpoSpec,
    KlDirection,
    KtoSpec,
    NewTokens,
    OrpoSpec,
    Strict,
    TeacherSpec,
)

# Names that become directory names (job_uuid, result names, dataset ids, pipeline and node names): no path
# separators and no leading '.', so that '.' and '..' can never point a directory (or its clean-up) elsewhere.
# In Python's re, `$` also matches before a trailing newline: check with re.fullmatch (pydantic's `pattern`
# uses the Rust engine, where `$` is the end of the text; it has no `\Z`, so the pattern keeps `$`).
SAFE_NAME = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"
SAFE_NAME_RE = re.compile(SAFE_NAME)


def check_name(value: str, field: str) -> str:
    """A name that becomes a directory or file name (job_uuid, dataset_id, ...): 1-128 letters, digits, '.', '_'
    or '-', not starting with '.'; raises ValueError naming the field."""
    if not isinstance(value, str) or not SAFE_NAME_RE.fullmatch(value):
        raise ValueError(
            f"{field}: {str(value)[:200]!r} must be 1-128 letters, digits, '.', '_' or '-', not starting with '.'"
        )
    return value


Method = Literal[METHOD_NAMES]  # type: ignore[valid-type]
Dtype = Literal["fp32", "bf16", "fp16"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "kernels"]

# PEFT methods that train under TRL 1.16's trainers on a Llama model (see shared FACTS.md).
PEFT_METHODS = (
    "lora",
    "dora",
    "ia3",
    "prefix_tuning",
    "prompt_tuning",
    "p_tuning",
    "loha",
    "lokr",
    "vera",
    "boft",
    "oft",
    "adalora",
    "ln_tuning",
)
PeftMethod = Literal[PEFT_METHODS]  # type: ignore[valid-type]

class DataSpec(Strict):
    train_file: str  # JSONL of normalized rows, written by the API layer into the run dir
    validation_file: str | None = None
    batch_size: Count = 4
    shuffle: bool = True
    packed: bool = False
    train_on_input: bool = False
    max_seq_len: Count = 512


class OptimizerSpec(Strict):
    optimizer_type: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: PositiveFloat = 5e-5
    weight_decay: float = Field(0.0, ge=0)
    num_warmup_steps: int = Field(0, ge=0, le=MAX_COUNT)


class PeftSpec(Strict):
    # JSON calls the PEFT type "method" (Llama Stack's wire format, and spec.json's); `peft_type` inside, as peft does
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)
    peft_type: PeftMethod = Field("lora", alias="method")
    target_modules: list[str] | None = None  # None: the method's default for the architecture
    rank: Count = 8
    alpha: PositiveFloat = 16
    dropout: float = Field(0.0, ge=0, lt=1)
    num_virtual_tokens: Count = 8  # prompt-learning methods only
    merge_adapter: bool = False  # also save a merged full model next to the adapter
    quantize_base: bool = False  # QLoRA: the frozen base in 4-bit NF4 (same as efficiency.load_in_4bit)


class CheckpointSpec(Strict):
    output_dir: str
    save_steps: Count | None = None  # None: only the final checkpoint
    save_total_limit: Count | None = 3
    resume: bool = True  # resume from the newest checkpoint in output_dir if there is one


class FsdpSpec(Strict):
    """FSDP options in force for a torchrun job; mapped onto FSDP2 in `providers/training/fsdp.py`."""

    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD"
    mixed_precision_policy: Literal["bf16", "fp16"] | None = None
    cpu_offload: bool = False
    limit_all_gathers: bool = True
    forward_prefetch: bool = False
    backward_prefetch: Literal["BACKWARD_PRE", "BACKWARD_POST"] | None = "BACKWARD_PRE"
    activation_checkpointing: bool = False
    wrap_layer_cls: str | None = None  # None: the model's decoder layer class, found from the model
    shard_group_size: Count | None = None  # HYBRID_SHARD: ranks per shard group


def mesh_shape(fsdp: FsdpSpec, world_size: int, nproc_per_node: int) -> tuple[int, int] | None:
    """(replicate, shard) for a 2-D mesh, or None for a 1-D mesh over all ranks. Raises ValueError on a
    combination that would train wrongly or shard nothing."""
    if fsdp.sharding_strategy == "HYBRID_SHARD":
        shard = fsdp.shard_group_size or nproc_per_node
        if shard < 2:
            raise ValueError(
                "fsdp_config.sharding_strategy: HYBRID_SHARD with one process per shard group shards nothing "
                "(FSDP1 would silently skip the cross-node all-reduce); use NO_SHARD, or set nproc_per_node or "
                "shard_group_size >= 2"
            )
        if world_size % shard:
            raise ValueError(f"fsdp_config.shard_group_size: {shard} does not divide the world size {world_size}")
        return (world_size // shard, shard)
    return None


class LoggingSpec(Strict):
    logging_steps: Count = 1
    tensorboard: bool = False
    wandb_project: str | None = None
    report_to: list[str] = Field(default_factory=list)  # TRL/transformers loggers: providers/training/loggers.py
    project: str | None = None
    run_name: str | None = None


class EfficiencySpec(Strict):
    """Speed and memory knobs. Combinations are checked here; what the hardware and installed packages
    can run is checked by `providers/training/efficiency.py` (a ValueError naming the field)."""

    gradient_checkpointing: bool = False  # recompute activations in backward (use_reentrant=False)
    padding_free: bool = False  # SFT: each batch is one row of concatenated sequences with position ids
    group_by_length: bool = False  # batches of similar lengths (when not packing): less padding
    attn_implementation: AttnImplementation = "sdpa"
    load_in_4bit: bool = False  # QLoRA: frozen NF4 base through bitsandbytes; needs a PEFT method
    use_liger_kernel: bool = False  # Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear CE)
    torch_compile: bool = False
    precompute_ref_log_probs: bool = False  # DPO: one reference pass up front, no reference model after
    # SFT and DPO: TRL's chunked LM head (per-chunk log-probs, no full logits: less memory with large vocabularies)
    # or the model's own loss over full logits (half the CPU time per step). None: chunked with CUDA only.
    chunked_lm_head: bool | None = None


class ResourceRequest(Strict):
    """What each node of a task needs. The `nodes` launcher places a task only on nodes that have it (it
    waits otherwise); Slurm gets it as --gres/--cpus-per-task/--mem, Ray as the task's resources. 0: no
    request."""

    gpus: int = Field(0, ge=0, le=64)
    gpu_memory_gb: float = Field(0, ge=0, le=10_000)  # in total over the node's GPUs
    cpu_cores: int = Field(0, ge=0, le=100_000)
    ram_gb: float = Field(0, ge=0, le=1_000_000)


class SchedulingSpec(Strict):
    """Where and in which order a job runs, and how often it is tried; the training core ignores it."""

    priority: int = Field(0, ge=-100, le=100)  # higher starts first; equal priorities start in submit order
    max_retries: int = Field(0, ge=0, le=10)  # a failed run starts again, from its newest checkpoint
    # A rank that neither steps nor beats its heartbeat for this long fails the job (None: the service's
    # --progress-timeout-s, default 300); collectives time out a minute after it.
    progress_timeout_s: int | None = Field(None, ge=5, le=7 * 24 * 3600)
    resources: ResourceRequest = Field(default_factory=ResourceRequest)


# One optional section per method with settings (methods.py's `settings`), named after the method: the table
# is the only list of them.
MethodSections = create_model(
    "MethodSections", __base__=Strict, __module__=__name__,
    **{m.section: (m.settings | None, None) for m in METHODS.values() if m.section is not None},
)


class JobSpec(MethodSections):
    job_uuid: str = Field(pattern=SAFE_NAME)
    result_name: str | None = Field(None, pattern=SAFE_NAME)  # the trained model's name (default: job_uuid)
    # Request settings accepted for compatibility but without effect on this job: setting -> why.
    not_applied: dict[str, str] = Field(default_factory=dict)
    method: Method
    model: str  # local path of a causal LM with its tokenizer
    # The Hugging Face hub id (and cache snapshot commit) `model` was resolved from: saved adapters and models
    # name it as their base, so that they load on any machine, not only from this machine's cache path.
    model_id: str | None = None
    model_revision: str | None = None
    run_dir: str
    data: DataSpec
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    n_epochs: Count = 1
    max_steps_per_epoch: Count | None = None
    gradient_accumulation_steps: Count = 1
    max_validation_steps: Count | None = 1
    dtype: Dtype = "fp32"
    seed: int = Field(42, ge=0, le=2**32 - 1)
    peft: PeftSpec | None = None
    checkpoint: CheckpointSpec
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    fsdp: FsdpSpec | None = None  # set: run under torchrun with FSDP
    efficiency: EfficiencySpec = Field(default_factory=EfficiencySpec)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)

    @model_validator(mode="after")
    def _efficiency_settings(self) -> JobSpec:
        e = self.efficiency
        if self.peft is not None and self.peft.quantize_base:
            e.load_in_4bit = True
        if e.load_in_4bit and self.peft is None:
            raise ValueError("load_in_4bit (QLoRA) trains adapters on a frozen 4-bit base: it needs a LoRA/PEFT algorithm_config")
        if e.load_in_4bit and self.fsdp is not None:
            raise ValueError("load_in_4bit: 4-bit bases are not sharded by this service's FSDP; train QLoRA on one device")
        method = METHODS[self.method]
        if e.precompute_ref_log_probs and not method.precompute_ref_log_probs:
            owners = " and ".join(m.upper() for m in with_flag("precompute_ref_log_probs"))
            raise ValueError(f"precompute_ref_log_probs is a {owners} setting; this job is {self.method!r}")
        if e.padding_free and not method.padding_free:
            raise ValueError(f"padding_free: TRL 1.16 has no padding-free path for {self.method!r} "
                             f"({list(with_flag('padding_free'))} only)")
        if e.group_by_length and method.fixed_order:
            raise ValueError(f"group_by_length: {self.method!r} reads its rows in a fixed order (shuffled once)")
        if e.group_by_length and self.data.packed:
            raise ValueError("group_by_length: packed batches have no padding to save; use one of packed and group_by_length")
        if e.padding_free and self.peft is not None and self.peft.peft_type in ("prefix_tuning", "prompt_tuning", "p_tuning"):
            raise ValueError(f"padding_free: {self.peft.peft_type} prepends virtual tokens to every row; it needs padded rows")
        if e.group_by_length and not self.data.shuffle:
            raise ValueError("group_by_length reorders the rows; it cannot be combined with shuffle=false")
        return self

    @model_validator(mode="after")
    def _method_settings(self) -> JobSpec:
        """The method's own section (methods.py names it) is set: its defaults when it has defaults for
        every field, else an error."""
        section = METHODS[self.method].section
        if section is not None and getattr(self, section) is None:
            try:
                setattr(self, section, self.section_model(section)())
            except ValueError:
                raise ValueError(f"method {self.method!r} needs {section} settings") from None
        return self

    @classmethod
    def section_model(cls, section: str) -> type[BaseModel]:
        """The settings model of a method's JobSpec section (e.g. "dpo" -> DpoSpec)."""
        return METHODS[section].settings

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path or Path(self.run_dir) / "spec.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> JobSpec:
        return cls.model_validate(json.loads((Path(run_dir) / "spec.json").read_text()))
