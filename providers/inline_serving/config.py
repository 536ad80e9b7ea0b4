"""Configuration of the inline::trl_serving provider (the inference `config:` block in run_serve.yaml)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, PositiveInt


class TrlServingConfig(BaseModel):
    # Models kept loaded (least recently used first out); a base and each adapter count one (adapters share
    # their base's one loaded copy: docs/serving.md, "Adapters and their base in the service's memory").
    served_models: PositiveInt = 2
    # Generations (and model loads) at once, each on its own thread; more requests wait their turn.
    workers: PositiveInt = 1
    # New tokens when a request names none (sampling_params.max_tokens 0), and the most one request may ask for.
    default_max_tokens: PositiveInt = 256
    max_tokens: PositiveInt = 4096
    # Where registered models (a model directory, a PEFT adapter, an adapter's base) may lie, besides the
    # Hugging Face cache; null: anywhere. With roots, add inline::trl's data_dir so its checkpoints serve.
    allowed_model_roots: list[str] | None = None

    @classmethod
    def sample_run_config(cls, **kwargs: Any) -> dict[str, Any]:
        return {"served_models": 2, "workers": 1}
