"""The method table: every training method this project runs, in one explicit registry.

Everything that depends on the method reads it from here: the JobSpec's `method` literal and which section
holds its settings (spec.py), the recipe `run.py` imports, the kind of rows the API writes, which
algorithm_config `type` selects it on which Llama Stack call (api/to_spec.py), which knobs apply to it
(efficiency checks), whether its output is a model to chat with, validate or export, and the CLI's choices.

Add a method: its settings model in settings.py, its recipe in recipes/, and one line here (CONTRIBUTING.md).
The JobSpec section, the request model and its place in the request unions, the CLI's choices, the zygote's
preloads and the tests' expectations are derived from this table.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from .settings import CpoSpec, DistillSpec, DpoSpec, GrpoSpec, KtoSpec, OrpoSpec, TeacherSpec

# graded_prompt: a prompt plus the row's other columns, which GRPO's graders read as `item`
RowKind = Literal["completion", "preference", "prompt", "graded_prompt"]
SFT_CALL = "supervised_fine_tune"
PREFERENCE_CALL = "preference_optimize"


@dataclass(frozen=True)
class MethodInfo:
    name: str
    recipe: str  # module in providers/training/recipes/ with `train(spec, files) -> dict`
    rows: RowKind  # what providers/training/data.normalize_rows makes of the job's rows
    # Its settings model (settings.py): the JobSpec section named after the method, and the request's fields
    # (None: no settings beyond `peft`)
    settings: type[BaseModel] | None
    call: str | None  # the Llama Stack post-training call that requests it (None: not requestable there)
    # The algorithm_config `type`s that select it on that call; None: a request without algorithm_config.
    algorithm_types: tuple[str | None, ...] = ()
    servable: bool = True  # its output is a model: chat, validation and export take it
    padding_free: bool = False  # TRL has a padding-free path for it (SFTConfig padding_free)
    precompute_ref_log_probs: bool = False  # its trainer can precompute the reference log-probs
    chunked_lm_head: bool = False  # its recipe chooses TRL's chunked LM head or full logits
    reference: bool = False  # it trains against a frozen reference policy
    fixed_order: bool = False  # its trainer reads rows in a fixed order (shuffled once): no group_by_length
    # The metrics (keys its trainer logs; `*` matches a grader's name) that say whether it learns: what `watch`,
    # the job list and the summaries show first
    headline: tuple[str, ...] = ("loss",)

    @property
    def section(self) -> str | None:
        """The JobSpec field holding its settings: the method's name (None: it has no settings model)."""
        return self.name if self.settings is not None else None


# TRL's preference trainers log the implicit reward's margin (chosen - rejected) and how often chosen wins
PREFERENCE_HEADLINE = ("rewards/margins", "rewards/accuracies")

METHODS: dict[str, MethodInfo] = {m.name: m for m in (
    MethodInfo("sft", "sft", "completion", None, SFT_CALL, (None, "LoRA", "QAT", "PEFT"),
               padding_free=True, chunked_lm_head=True),
    MethodInfo("dpo", "dpo", "preference", DpoSpec, PREFERENCE_CALL, (None, "dpo"),
               precompute_ref_log_probs=True, chunked_lm_head=True, reference=True,
               headline=PREFERENCE_HEADLINE),
    MethodInfo("kto", "kto", "preference", KtoSpec, PREFERENCE_CALL, ("kto",),
               precompute_ref_log_probs=True, reference=True, fixed_order=True,
               headline=PREFERENCE_HEADLINE),
    MethodInfo("orpo", "orpo", "preference", OrpoSpec, PREFERENCE_CALL, ("orpo",), headline=PREFERENCE_HEADLINE),
    MethodInfo("cpo", "cpo", "preference", CpoSpec, PREFERENCE_CALL, ("cpo",), headline=PREFERENCE_HEADLINE),
    # GRPO's algorithm_config type "grpo" is this project's extension of preference_optimize (Llama Stack has
    # no RL call); its reference (beta > 0) is the base with adapters off under PEFT, else a frozen copy.
    MethodInfo("grpo", "grpo", "graded_prompt", GrpoSpec, PREFERENCE_CALL, ("grpo",),
               headline=("reward", "rewards/*/mean")),
    MethodInfo("distill", "distill", "completion", DistillSpec, SFT_CALL, ("distillation",), padding_free=True,
               headline=("loss", "hard_loss", "soft_loss")),
    MethodInfo("teacher", "teacher", "prompt", TeacherSpec, None, servable=False),
)}

METHOD_NAMES = tuple(METHODS)
SERVABLE = tuple(name for name, m in METHODS.items() if m.servable)


def with_flag(flag: str) -> tuple[str, ...]:
    """The methods whose `flag` (a MethodInfo capability, e.g. "padding_free") is set."""
    return tuple(name for name, m in METHODS.items() if getattr(m, flag))


def headline_metrics(method: str | None, record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record that are the method's headline, in the method's order (a pattern such as
    rewards/*/mean: every grader the record has); an unknown method's headline is the loss."""
    patterns = METHODS[method].headline if method in METHODS else ("loss",)
    found: dict[str, float] = {}
    for pattern in patterns:
        for key in sorted(k for k in record if fnmatch.fnmatchcase(k, pattern)):
            if isinstance(record[key], (int, float)) and not isinstance(record[key], bool):
                found.setdefault(key, record[key])
    return found


def method_for(call: str, algorithm_type: str | None) -> str:
    """The method a Llama Stack call with an algorithm_config of this `type` (None: none, or no type) asks for;
    raises ValueError naming algorithm_config.type and what the call accepts."""
    for name, m in METHODS.items():
        if m.call == call and algorithm_type in m.algorithm_types:
            return name
    accepted = [t for m in METHODS.values() if m.call == call for t in m.algorithm_types if t is not None]
    raise ValueError(f"algorithm_config.type: {algorithm_type!r} is not a method of {call}; accepted: {accepted}")


def recipe_module(method: str) -> str:
    """The import path of a method's recipe."""
    return f"{__package__}.recipes.{METHODS[method].recipe}"
