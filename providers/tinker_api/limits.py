"""The Tinker API's limits: what one request may cost and how long things stay in memory (pydantic only,
so the service's configuration can hold them without loading torch)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TinkerLimits(BaseModel):
    """Each bound on what one Tinker request may cost, and how long things stay in memory, declared once
    (the service's --tinker-config file sets them)."""
    model_config = ConfigDict(extra="forbid")
    max_num_samples: int = Field(64, ge=1, description="samples per asample")
    max_sample_tokens: int = Field(4096, ge=1, description="max_tokens per asample")
    max_batch_tokens: int = Field(262144, ge=1, description="input tokens per forward_backward")
    max_topk_logprobs: int = Field(20, ge=1, description="k of asample's topk_prompt_logprobs and "
                                   "topk_sample_logprobs")
    max_lora_rank: int = Field(256, ge=1)
    min_checkpoint_ttl_s: int = Field(3600, ge=1, description="the shortest ttl_seconds a saved checkpoint may "
                                      "have (the hosted service's: 1 hour)")
    max_checkpoint_ttl_s: int = Field(10 * 365 * 86400, ge=1, description="the longest ttl_seconds (10 years)")
    max_models_per_session: int = Field(8, ge=1, description="training and sampling models held at once")
    future_wait_s: float = Field(30.0, gt=0, description="how long retrieve_future holds a pending request")
    session_timeout_s: float = Field(600.0, gt=0, description="a session without heartbeat for this long ends")
    keep_futures: int = Field(10000, ge=100, description="finished results kept for retrieve_future")
    evict_after_s: float = Field(600.0, gt=0, description="a model unused this long is saved to disk and leaves "
                                 "memory (its next call restores it); a base with no model left is dropped")
