"""Configuration of the remote::trl_fsdp adapter (the `config:` block in run_fsdp.yaml)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, PositiveFloat, PositiveInt


class TrlFsdpAdapterConfig(BaseModel):
    url: str = "http://127.0.0.1:8322"
    api_token: str | None = None
    timeout_s: PositiveFloat = 60.0
    retries: int = Field(3, ge=0)  # for connection errors and 5xx answers of idempotent calls
    upload_chunk_rows: PositiveInt = 10000  # datasets go to the service in chunks of this many rows
    # Defaults for every job; a request's training_config.fsdp_config / torch_run_config override them.
    fsdp_config: dict[str, Any] = Field(default_factory=dict)
    torch_run_config: dict[str, Any] = Field(default_factory=dict)
    # The stack's inference provider that answers with this service's models (run_fsdp_serve.yaml's
    # remote::vllm on the service's OpenAI endpoint): each completed job's final checkpoint is registered
    # there as a model of the stack, under the identifier its artifacts give. None: nothing is registered.
    serve_provider_id: str | None = None

    @classmethod
    def sample_run_config(cls, **kwargs: Any) -> dict[str, Any]:
        return {
            "url": "${env.TRL_FSDP_URL:http://127.0.0.1:8322}",
            "fsdp_config": {"sharding_strategy": "FULL_SHARD"},
            "torch_run_config": {"nproc_per_node": 2},
        }
