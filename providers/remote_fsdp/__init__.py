"""remote::trl_fsdp: a Llama Stack adapter (`get_adapter_impl`) for the FSDP training service in `service/`."""

from typing import Any

from .config import TrlFsdpAdapterConfig


async def get_adapter_impl(config: TrlFsdpAdapterConfig, deps: dict[Any, Any]):
    from llama_stack.distribution.datatypes import Api

    from .adapter import TrlFsdpAdapter

    return TrlFsdpAdapter(config, deps[Api.datasetio], deps.get(Api.models))
