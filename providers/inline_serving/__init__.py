"""inline::trl_serving: Llama Stack's inference API answered in the stack's own process by this package's serving
engine (providers/serving/engine.py), with base models, full fine-tunes and PEFT adapters."""

from typing import Any

from .config import TrlServingConfig


async def get_provider_impl(config: TrlServingConfig, deps: dict[Any, Any]):
    from .provider import TrlServingImpl

    return TrlServingImpl(config)
