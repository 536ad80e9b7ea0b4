"""inline::trl: single-device SFT, DPO and distillation on TRL, run as separate processes."""

from typing import Any

from .config import TrlPostTrainingConfig


async def get_provider_impl(config: TrlPostTrainingConfig, deps: dict[Any, Any]):
    from llama_stack.distribution.datatypes import Api

    from .provider import TrlPostTrainingImpl

    return TrlPostTrainingImpl(config, deps[Api.datasetio], deps.get(Api.datasets), deps.get(Api.models))
