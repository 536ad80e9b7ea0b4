"""Trained checkpoints as models of the Llama Stack: what both post-training providers (inline::trl and
remote::trl_fsdp_with_models) do when they see a job completed.

Llama Stack 0.2.12 asks inference providers for no model list: a model is answerable only once the stack's
registry holds it (docs/serving.md), so the post-training provider registers each completed job's final
checkpoint there, under the identifier its artifacts give, answered by the inference provider `provider_id`.
"""

from __future__ import annotations

from typing import Any

from .errors import BadRequest


class StackModels:
    """The stack's `models` API (None in a stack without inference) and the inference provider that answers
    with this package's checkpoints (None: nothing is registered)."""

    def __init__(self, models: Any, provider_id: str | None) -> None:
        self.models = models
        self.provider_id = provider_id

    @property
    def enabled(self) -> bool:
        return self.models is not None and self.provider_id is not None

    async def has(self, identifier: str) -> bool:
        try:
            await self.models.get_model(identifier)  # 0.2.12: a ValueError when there is none
        except ValueError:
            return False
        return True

    async def register_final(self, job_uuid: str, checkpoints: list[dict[str, Any]], provider_model_id: str) -> None:
        """A completed job's final checkpoint as a model of the stack (its artifacts' identifier), answered by
        `provider_id` as `provider_model_id`; once (a registered identifier is left as it is)."""
        if not self.enabled or not checkpoints:
            return
        identifier = checkpoints[-1]["identifier"]
        if await self.has(identifier):
            return
        from llama_stack.apis.models import ModelType

        try:
            await self.models.register_model(model_id=identifier, provider_model_id=provider_model_id,
                                             provider_id=self.provider_id, model_type=ModelType.llm,
                                             metadata={"post_training_job": job_uuid})
        except ValueError as e:  # e.g. registered meanwhile by another request: the model is there either way
            if not await self.has(identifier):
                raise BadRequest(f"job {job_uuid}: its final checkpoint could not be registered as model "
                                 f"{identifier!r} with {self.provider_id}: {e}") from None
