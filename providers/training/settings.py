"""Each method's settings: the one pydantic model of a method's JobSpec section.

The method table (methods.py) names each method's model here; the job spec holds it as the method's section
(spec.py), and the API's request model for the method is this model plus its `type` (and `peft`), generated in
api/requests.py. So a setting, its bounds and its doc are declared once, here. Nothing here knows about HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Self

from pydantic import ConfigDict, Field, PositiveFloat, field_validator, model_validator

from ..graders import GraderList
from .keys import KnownKeys

# Every count a request can set is bounded: a huge literal must be a 400, not an overflow inside torch.
MAX_COUNT = 2**31 - 1
Count = Annotated[int, Field(gt=0, le=MAX_COUNT)]
# Generation sizes are bounded tighter: they decide memory per request.
MAX_NEW_TOKENS = 8192
MAX_GENERATION_BATCH = 1024
NewTokens = Annotated[int, Field(gt=0, le=MAX_NEW_TOKENS)]
GenerationBatch = Annotated[int, Field(gt=0, le=MAX_GENERATION_BATCH)]

KlDirection = Literal["forward", "reverse"]  # distillation: KL(teacher || student) or KL(student || teacher)

# Every loss type TRL 1.16's DPOTrainer implements.
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
DpoLossType = Literal[DPO_LOSS_TYPES]  # type: ignore[valid-type]
# The losses whose TRL 1.16 implementation reads label_smoothing (the others ignore it).
LABEL_SMOOTHING_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")


class Strict(KnownKeys):
    """A method's settings. Its hooks let a method check what only it knows, while the request becomes a job
    (api/to_spec.py calls them on every method's section alike); the defaults do nothing."""

    # KnownKeys: an unknown key is an error naming the nearest accepted one (a typo never falls back to a default)
    # No inf/nan anywhere: pydantic would write them to spec.json as null, and the spec could not be read back.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    # whether an adapter on lm_head trains: TRL 1.16's trainers compute log-probs from `lm_head.weight` directly
    trains_lm_head_adapter: ClassVar[bool] = False

    def with_models_resolved(self, resolve: Callable[[str, str], str], field: str) -> Self:
        """A copy whose model references (other than the job's model) are `resolve(reference, field_path)`: local
        directories, resolved and confined as the job's model is. `field`: where these settings sit in the request."""
        return self

    def check_rows(self, rows_path: Path, field: str, rows_field: str, env: Mapping[str, str]) -> None:
        """Check these settings against the job's first written rows (JSONL) in a limited child process with
        `env`; ValueError naming the field (`field.setting`) and the rows (`rows_field`)."""


class DpoSpec(Strict):
    """Direct preference optimization (TRL's DPOTrainer): the policy's log-ratio to a frozen reference on the
    chosen answer against the rejected one; several losses can be combined with `loss_weights`."""

    beta: PositiveFloat = 0.1
    loss_type: list[DpoLossType] = Field(default_factory=lambda: ["sigmoid"], min_length=1)  # or one name
    loss_weights: list[float] | None = None
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_name(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> DpoSpec:
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} entries but loss_type has {len(self.loss_type)}"
            )
        if self.label_smoothing > 0 and not set(LABEL_SMOOTHING_LOSSES) & set(self.loss_type):
            raise ValueError(
                f"label_smoothing only has a meaning for loss_type {list(LABEL_SMOOTHING_LOSSES)}; "
                f"got loss_type={self.loss_type}"
            )
        return self


class KtoSpec(Strict):
    """Kahneman-Tversky optimization (TRL's KTOTrainer): each answer is desirable or undesirable on its own."""

    beta: PositiveFloat = 0.1
    desirable_weight: PositiveFloat = 1.0  # loss weight of desirable (chosen) answers
    undesirable_weight: PositiveFloat = 1.0  # loss weight of undesirable (rejected) answers


class OrpoSpec(Strict):
    """Odds-ratio preference optimization (TRL's ORPOTrainer): SFT on chosen plus beta * odds-ratio loss, no reference."""

    beta: PositiveFloat = 0.1


# TRL 1.16 GRPOTrainer's losses that run with token-level importance sampling (its default); "luspo"
# needs sequence-level sampling and is left out.
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "vespo")
GrpoLossType = Literal[GRPO_LOSS_TYPES]  # type: ignore[valid-type]


class GrpoSpec(Strict):
    """Group relative policy optimization (TRL's GRPOTrainer): `num_generations` sampled answers per prompt,
    scored by the graders; each answer's advantage is its reward against its group's."""

    graders: GraderList
    num_generations: Annotated[int, Field(ge=2, le=256)] = 8
    max_completion_length: NewTokens = 64
    temperature: PositiveFloat = 1.0
    beta: float = Field(0.0, ge=0)  # KL to the reference; 0: no reference model at all
    loss_type: GrpoLossType = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epsilon: float = Field(0.2, gt=0, lt=1)  # clipping of the policy ratio
    num_iterations: Annotated[int, Field(ge=1, le=64)] = 1  # updates per generated batch
    use_vllm: bool = False  # GPU only, with vllm installed (colocated with the trainer)
    # Samples drawn as a function of (seed, step, prompt, place in group): the same on 1 rank or N, at the cost
    # of one small generator per row and token (recipes/grpo.py RowKeyedSampler); not with vLLM
    row_keyed_sampling: bool = False

    @model_validator(mode="after")
    def _check(self) -> GrpoSpec:
        if self.use_vllm and self.row_keyed_sampling:
            raise ValueError("row_keyed_sampling: vLLM samples with its own generator; use one of the two")
        return self

    def with_models_resolved(self, resolve: Callable[[str, str], str], field: str) -> GrpoSpec:
        """The score_model graders' models resolved (errors name `FIELD.graders[0].model`)."""
        from ..graders import resolve_models

        return self.model_copy(update={"graders": resolve_models(self.graders, resolve, f"{field}.graders")})

    def check_rows(self, rows_path: Path, field: str, rows_field: str, env: Mapping[str, str]) -> None:
        """The graders rendered on the first rows (their columns but `prompt` are the graders' `item`), limited in
        CPU seconds and memory (graders.row_check): a template naming a column the rows lack, or one that takes
        too long on them, is refused naming the grader, before anything starts."""
        from ..graders.row_check import check_rows

        check_rows(self.graders, rows_path, f"{field}.graders", rows_field, env=env)


class TeacherSpec(Strict):
    """A teacher task: answers for every prompt, optionally with top-k log-probs per answer token."""

    teacher_model: str
    top_k: Annotated[int, Field(gt=0, le=1000)] | None = 20  # None: answers only (enough for the output method)
    max_new_tokens: NewTokens = 32
    generation_batch_size: GenerationBatch = 16
    shard_rows: Count = 1000  # rows per JSONL shard


class DistillSpec(Strict):
    """Knowledge distillation: the student learns from a teacher's answers (`output`), its per-token
    distributions (`logit`), or both (`hybrid`)."""

    # JSON and Python call the kind "method" (the wire format); `kind` inside, where "method" is the training method
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)
    kind: Literal["output", "logit", "hybrid"] = Field("logit", alias="method")
    teacher_model: str | None = None  # path of a live teacher; None with teacher_outputs_dir
    teacher_outputs_dir: str | None = None  # a teacher task's shards: no teacher in memory while training
    temperature: PositiveFloat = 2.0
    alpha: float = Field(0.5, ge=0, le=1)  # hybrid: alpha * CE + (1 - alpha) * T^2 * KL
    kl_direction: KlDirection = "forward"
    max_new_tokens: NewTokens = 32  # output method: teacher generation length
    generation_batch_size: GenerationBatch = 16

    @property
    def trains_lm_head_adapter(self) -> bool:  # type: ignore[override]
        """From cached logits the student trains in a plain Trainer, which does train an adapter on lm_head."""
        return bool(self.teacher_outputs_dir) and self.kind != "output"

    @model_validator(mode="after")
    def _check(self) -> DistillSpec:
        if (self.teacher_model is None) == (self.teacher_outputs_dir is None):
            raise ValueError("distillation needs exactly one of teacher_model (a path) and teacher_outputs_dir")
        return self


# TRL 1.16 CPOTrainer's losses ("alphapo" is "simpo" with cpo_alpha 0, set by CPOConfig itself).
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
CpoLossType = Literal[CPO_LOSS_TYPES]  # type: ignore[valid-type]


class CpoSpec(Strict):
    """Contrastive preference optimization (TRL's CPOTrainer): a DPO-style loss on the policy alone (no
    reference) plus cpo_alpha * NLL of the chosen answers; loss_type "simpo" is SimPO (length-normalized
    log-probs and a target margin simpo_gamma; with cpo_alpha 0, SimPO exactly)."""

    beta: PositiveFloat = 0.1
    loss_type: CpoLossType = "sigmoid"
    cpo_alpha: float = Field(1.0, ge=0)  # weight of the NLL of the chosen answers (0: none)
    simpo_gamma: float = Field(0.5, ge=0)  # SimPO's target reward margin (loss_type "simpo" only)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # the sigmoid loss's conservative smoothing
