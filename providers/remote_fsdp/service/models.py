"""Request bodies of the FSDP training service: Llama Stack's, plus inline rows and multi-node parts."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ...post_training_api import FINITE, DPOAlignmentConfig, SFTAlgorithmConfig, TrainingConfig


class SupervisedFineTuneRequest(BaseModel):
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


class PreferenceOptimizeRequest(BaseModel):
    """0.2.12's body, plus `model` and `checkpoint_dir` as published examples send them (with `model`,
    `finetuned_model` names the result instead of being the model to train)."""

    model_config = FINITE
    job_uuid: str
    finetuned_model: str
    model: str | None = None
    algorithm_config: DPOAlignmentConfig = Field(default_factory=DPOAlignmentConfig)
    training_config: TrainingConfig
    hyperparam_search_config: dict[str, Any] = Field(default_factory=dict)
    logger_config: dict[str, Any] = Field(default_factory=dict)
    checkpoint_dir: str | None = None
    rows: list[dict[str, Any]] | None = None
    validation_rows: list[dict[str, Any]] | None = None
    part_of: str | None = None


class JobRef(BaseModel):
    job_uuid: str
