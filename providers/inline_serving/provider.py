"""The inline::trl_serving provider: Llama Stack 0.2.12's inference API over providers/serving's engine, in the
stack's own process (no second server).

A model of the stack names a local checkpoint as its provider_resource_id: a model directory, a Hugging Face
id in the cache, or a PEFT adapter directory (applied over its base). inline::trl registers each completed
job's final checkpoint so; `models.register(provider_model_id=PATH)` adds others (a base to compare with).
Requests are validated by the service's OpenAI request models (one place for the bounds); loading and
generation run on `workers` threads of their own, so the event loop and post-training calls never wait on them.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from concurrent.futures import ThreadPoolExecutor

from jinja2 import TemplateError
from llama_stack.apis.common.content_types import TextDelta
from llama_stack.apis.inference import (
    ChatCompletionResponse,
    ChatCompletionResponseEvent,
    ChatCompletionResponseEventType,
    ChatCompletionResponseStreamChunk,
    CompletionMessage,
    CompletionResponse,
    CompletionResponseStreamChunk,
    InferenceProvider,
    LogProbConfig,
    OpenAIAssistantMessageParam,
    OpenAIChatCompletion,
    OpenAIChoice,
    SamplingParams,
    StopReason,
    TokenLogProbs,
    ToolChoice,
)
from llama_stack.apis.models import Model, ModelType
from llama_stack.providers.utils.inference.prompt_adapter import interleaved_content_as_str

from ..api.paths import ProviderDefaults, check_path_text, confine, resolve_model
from ..errors import BadRequest
from ..serving.engine import (
    Completion,
    Delta,
    LoadedModel,
    ModelCache,
    TokenLogprob,
    adapter_base,
    generate_ids,
    generate_ids_stream,
    is_adapter,
    prompt_ids,
    text_prompt_ids,
)
from ..serving.openai_api import ChatCompletionRequest, CompletionRequest, GenerationStream, chat_logprobs
from .config import TrlServingConfig

STOP_REASONS = {"stop": StopReason.end_of_turn, "length": StopReason.out_of_tokens}
NAME = "inline::trl_serving"


def token_logprobs(entries: list[TokenLogprob] | None) -> list[TokenLogProbs] | None:
    """The engine's log-probs as Llama Stack's: each token's own and its top alternatives."""
    return None if entries is None else [TokenLogProbs(logprobs_by_token={e.token: e.logprob, **dict(e.top)})
                                         for e in entries]


class TrlServingImpl(InferenceProvider):
    model_store: Any = None  # the stack's models routing table sets it: identifier -> Model

    def __init__(self, config: TrlServingConfig) -> None:
        self.config = config
        self.cache = ModelCache(config.served_models)
        self.executor = ThreadPoolExecutor(config.workers, thread_name_prefix="trl-serving")
        self.defaults = ProviderDefaults(data_dir="", allowed_model_roots=config.allowed_model_roots,
                                         model_roots_hint=f"add it to allowed_model_roots in {NAME}'s config")

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- models ----------------------------------------------------------------------------------------
    async def register_model(self, model: Model) -> Model:
        if model.model_type != ModelType.llm:
            raise BadRequest(f"model_type: {model.model_type.value!r}; {NAME} serves causal LMs ('llm') only")
        await self._run(self.model_dir, model.provider_resource_id, "provider_model_id")
        return model

    async def unregister_model(self, model_id: str) -> None:
        pass

    def model_dir(self, ref: str, field: str) -> str:
        """A model's checkpoint directory: a PEFT adapter inside the allowed roots whose base passes the checks a
        model does, or what resolve_model accepts (a model directory, a Hugging Face id in the cache)."""
        check_path_text(ref, field)
        if is_adapter(Path(ref).expanduser()):  # outside the roots, refused with resolve_model's own words
            path = confine(Path(ref), self.defaults.allowed_model_roots, field, ref, self.defaults.model_roots_hint)
            resolve_model(adapter_base(path), f"{field} (the adapter's base_model_name_or_path)", self.defaults)
            return str(path)
        return resolve_model(ref, field, self.defaults)

    async def _loaded(self, model_id: str) -> LoadedModel:
        model = await self.model_store.get_model(model_id)
        return await self._run(lambda: self.cache.get(self.model_dir(model.provider_resource_id, "model_id")))

    # -- requests --------------------------------------------------------------------------------------
    def _sampling(self, params: SamplingParams | None) -> dict[str, Any]:
        """Llama Stack's SamplingParams as the OpenAI request fields the engine takes (temperature 0: greedy)."""
        params = params or SamplingParams()
        strategy = params.strategy
        if strategy.type == "top_k":
            raise BadRequest(f"sampling_params.strategy: top_k sampling is not supported by {NAME}; use greedy or "
                             "top_p")
        if params.repetition_penalty not in (None, 1.0):
            raise BadRequest(f"sampling_params.repetition_penalty: {params.repetition_penalty} is not supported by "
                             f"{NAME} (1.0 only)")
        temperature, top_p = (0.0, 1.0) if strategy.type == "greedy" else (strategy.temperature or 1.0,
                                                                             strategy.top_p or 1.0)
        return {"temperature": temperature, "top_p": top_p, "stop": params.stop,
                "max_tokens": params.max_tokens or None}  # 0.2.12's default 0: the provider's default

    def _tokens(self, asked: int | None, field: str, choices: int = 1) -> int:
        tokens = asked or self.config.default_max_tokens
        if tokens * choices > self.config.max_tokens:
            asked_for = f"{tokens}" if choices == 1 else f"{choices} choices x {tokens}"
            raise BadRequest(f"{field}: {asked_for} new tokens is more than {NAME} allows per request "
                             f"({self.config.max_tokens}, its max_tokens config); ask for fewer")
        return tokens

    @staticmethod
    def _chat_ids(loaded: LoadedModel, messages: list[dict[str, str]]) -> list[int]:
        try:
            return prompt_ids(loaded, messages)
        except TemplateError as e:  # roles or an order the model's chat template refuses
            raise BadRequest(f"messages: the model's chat template refused them: {e}") from None

    async def _stream(self, generation: Callable[[], Any]) -> AsyncIterator[Delta | Completion]:
        """One generation's text pieces, then its Completion; a client that goes away stops it at its next token."""
        stream = GenerationStream(self.executor.submit, [generation])
        try:
            while (item := await stream.queue.get()) is not stream.done:
                if isinstance(item, Exception):
                    raise item
                yield item[1]
            await stream.worker
        finally:
            stream.stop.set()

    # -- Llama Stack's inference ---------------------------------------------------------------------
    async def chat_completion(
        self,
        model_id: str,
        messages: list,
        sampling_params: SamplingParams | None = None,
        response_format: Any = None,
        tools: list | None = None,
        tool_choice: ToolChoice | None = ToolChoice.auto,
        tool_prompt_format: Any = None,
        stream: bool | None = False,
        logprobs: LogProbConfig | None = None,
        tool_config: Any = None,
    ) -> ChatCompletionResponse | AsyncIterator[ChatCompletionResponseStreamChunk]:
        if tools:
            raise BadRequest(f"tools: {NAME} answers with text only; ask without tools")
        if response_format is not None:
            raise BadRequest(f"response_format: not supported by {NAME}; ask without it")
        chat = [{"role": m.role, "content": interleaved_content_as_str(m.content)} for m in messages]
        req = ChatCompletionRequest(model=model_id, messages=chat, **self._sampling(sampling_params))
        tokens = self._tokens(req.asked_tokens(), "sampling_params.max_tokens")
        top = None if logprobs is None else logprobs.top_k or 0
        loaded = await self._loaded(model_id)
        ids = await self._run(self._chat_ids, loaded, req.chat())

        args = (loaded, ids, tokens, req.temperature, req.top_p, req.stop, None, top)
        if stream:
            return self._chat_chunks(lambda: generate_ids_stream(*args))
        done = await self._run(generate_ids, *args)
        return ChatCompletionResponse(
            completion_message=CompletionMessage(content=done.text, stop_reason=STOP_REASONS[done.finish_reason]),
            logprobs=token_logprobs(done.logprobs))

    async def _chat_chunks(self, generation: Callable[[], Any]) -> AsyncIterator[ChatCompletionResponseStreamChunk]:
        def chunk(event_type, text: str = "", **kw) -> ChatCompletionResponseStreamChunk:
            return ChatCompletionResponseStreamChunk(
                event=ChatCompletionResponseEvent(event_type=event_type, delta=TextDelta(text=text), **kw))

        yield chunk(ChatCompletionResponseEventType.start)
        async for item in self._stream(generation):
            if isinstance(item, Completion):
                yield chunk(ChatCompletionResponseEventType.complete, stop_reason=STOP_REASONS[item.finish_reason])
            else:
                logprobs = token_logprobs(list(item.logprobs)) if item.logprobs else None
                yield chunk(ChatCompletionResponseEventType.progress, str(item), logprobs=logprobs)

    async def completion(
        self,
        model_id: str,
        content: Any,
        sampling_params: SamplingParams | None = None,
        response_format: Any = None,
        stream: bool | None = False,
        logprobs: LogProbConfig | None = None,
    ) -> CompletionResponse | AsyncIterator[CompletionResponseStreamChunk]:
        if response_format is not None:
            raise BadRequest(f"response_format: not supported by {NAME}; ask without it")
        sampling = self._sampling(sampling_params)
        tokens = self._tokens(sampling.pop("max_tokens"), "sampling_params.max_tokens")
        req = CompletionRequest(model=model_id, prompt=interleaved_content_as_str(content), **sampling)
        top = None if logprobs is None else logprobs.top_k or 0
        loaded = await self._loaded(model_id)
        ids = await self._run(text_prompt_ids, loaded, req.prompts()[0])
        if not ids:
            raise BadRequest("content: no tokens in it")

        args = (loaded, ids, tokens, req.temperature, req.top_p, req.stop, None, top)
        if stream:
            return self._completion_chunks(lambda: generate_ids_stream(*args))
        done = await self._run(generate_ids, *args)
        return CompletionResponse(content=done.text, stop_reason=STOP_REASONS[done.finish_reason],
                                  logprobs=token_logprobs(done.logprobs))

    async def _completion_chunks(self, generation: Callable[[], Any]) -> AsyncIterator[CompletionResponseStreamChunk]:
        async for item in self._stream(generation):
            if isinstance(item, Completion):
                yield CompletionResponseStreamChunk(delta="", stop_reason=STOP_REASONS[item.finish_reason])
            else:
                logprobs = token_logprobs(list(item.logprobs)) if item.logprobs else None
                yield CompletionResponseStreamChunk(delta=str(item), logprobs=logprobs)

    async def openai_chat_completion(
        self,
        model: str,
        messages: list,
        frequency_penalty: float | None = None,
        function_call: Any = None,
        functions: list | None = None,
        logit_bias: dict[str, float] | None = None,
        logprobs: bool | None = None,
        max_completion_tokens: int | None = None,
        max_tokens: int | None = None,
        n: int | None = None,
        parallel_tool_calls: bool | None = None,
        presence_penalty: float | None = None,
        response_format: Any = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        stream: bool | None = None,
        stream_options: dict[str, Any] | None = None,
        temperature: float | None = None,
        tool_choice: Any = None,
        tools: list | None = None,
        top_logprobs: int | None = None,
        top_p: float | None = None,
        user: str | None = None,
    ) -> OpenAIChatCompletion:
        if stream:
            raise BadRequest(f"stream: {NAME} answers /v1/openai/v1/chat/completions in one piece; ask without "
                             "stream, or stream with inference.chat_completion")
        if tools or functions:
            raise BadRequest(f"tools: {NAME} answers with text only; ask without tools")
        if response_format is not None and getattr(response_format, "type", "text") != "text":
            raise BadRequest(f"response_format: only type 'text' is supported by {NAME}")
        asked = {"model": model, "messages": [m.model_dump() for m in messages], "logprobs": logprobs,
                 "max_completion_tokens": max_completion_tokens, "max_tokens": max_tokens, "n": n, "seed": seed,
                 "stop": stop, "temperature": temperature, "top_logprobs": top_logprobs, "top_p": top_p}
        req = ChatCompletionRequest(**{k: v for k, v in asked.items() if v is not None})
        field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        tokens = self._tokens(req.asked_tokens(), field, req.n)
        if req.top_logprobs is not None and not req.logprobs:
            raise BadRequest("top_logprobs: needs logprobs: true")
        top = (req.top_logprobs or 0) if req.logprobs else None
        loaded = await self._loaded(model)
        ids = await self._run(self._chat_ids, loaded, req.chat())
        done = await self._run(lambda: [generate_ids(loaded, ids, tokens, req.temperature, req.top_p, req.stop,
                                                     req.choice_seed(j), top) for j in range(req.n)])
        return OpenAIChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model,
            choices=[OpenAIChoice(index=j, message=OpenAIAssistantMessageParam(content=c.text),
                                  finish_reason=c.finish_reason, logprobs=chat_logprobs(c.logprobs))
                     for j, c in enumerate(done)])

    async def openai_completion(self, model: str, prompt: Any, best_of: int | None = None, echo: bool | None = None,
                                frequency_penalty: float | None = None, logit_bias: dict | None = None,
                                logprobs: bool | None = None, max_tokens: int | None = None, n: int | None = None,
                                presence_penalty: float | None = None, seed: int | None = None, stop: Any = None,
                                stream: bool | None = None, stream_options: dict | None = None,
                                temperature: float | None = None, top_p: float | None = None, user: str | None = None,
                                guided_choice: list[str] | None = None, prompt_logprobs: int | None = None,
                                suffix: str | None = None):
        raise NotImplementedError(f"{NAME} answers inference.completion, not /v1/openai/v1/completions (the FSDP "
                                  "service's OpenAI endpoint does: docs/serving.md)")

    async def embeddings(self, model_id: str, contents: list, text_truncation: Any = None,
                         output_dimension: int | None = None, task_type: Any = None):
        raise NotImplementedError(f"{NAME} serves causal LMs: no embeddings")

    async def openai_embeddings(self, model: str, input: Any, encoding_format: str | None = "float",
                                dimensions: int | None = None, user: str | None = None):
        raise NotImplementedError(f"{NAME} serves causal LMs: no embeddings")
