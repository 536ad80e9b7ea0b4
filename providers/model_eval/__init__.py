"""inline::model_eval — Llama Stack 0.2.12's `eval` API (run_eval, evaluate_rows, job results) for model
candidates, in a stack without agents.

0.2.12's inline::meta-reference eval lists `agents` among its api_dependencies (`providers/registry/eval.py`), and
`distribution/resolver.py`'s `instantiate_providers` looks every one of them up (`impls[a]`): without an
agents provider the stack does not start, and inline::meta-reference agents needs safety, vector_io,
vector_dbs, tool_runtime and tool_groups. Its implementation (`MetaReferenceEvalImpl`) uses the agents API only
for an `agent` candidate, so this provider is that implementation with no agents API: a `model` candidate is
answered through `inference` and scored through `scoring` as meta-reference does.
"""

from typing import Any

from llama_stack.distribution.datatypes import Api
from llama_stack.providers.inline.eval.meta_reference.config import MetaReferenceEvalConfig
from llama_stack.providers.inline.eval.meta_reference.eval import MetaReferenceEvalImpl

from ..errors import BadRequest


class ModelEvalImpl(MetaReferenceEvalImpl):
    """meta-reference's eval with no agents API: an `agent` candidate is a 400."""

    async def _run_agent_generation(self, input_rows: list[dict[str, Any]], benchmark_config: Any) -> list:
        raise BadRequest("benchmark_config.eval_candidate.type: 'agent' needs the agents API, which this stack "
                         "does not run (inline::model_eval); use a 'model' candidate")


async def get_provider_impl(config: MetaReferenceEvalConfig, deps: dict[Api, Any]) -> ModelEvalImpl:
    impl = ModelEvalImpl(config, deps[Api.datasetio], deps[Api.datasets], deps[Api.scoring], deps[Api.inference],
                         agents_api=None)
    await impl.initialize()
    return impl
