"""The OpenAI chat-completions API over local checkpoints: request/response models and a FastAPI router.

    POST /chat/completions   (mounted at /v1/openai/v1 and /v1 by the service)
    GET  /models

`model` is resolved by the caller's `resolve(model) -> directory` (a base model directory, `job:<uuid>`,
a pipeline output, ...). Generation runs in a worker thread; streaming answers are server-sent events
in OpenAI's chunk format, ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter
from jinja2 import TemplateError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .engine import Completion, ModelCache, generate, generate_stream

MAX_TOKENS_LIMIT = 4096
MAX_MESSAGES = 256
MAX_CONTENT_CHARS = 200_000


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type", "text") == "text")
        return self.content or ""


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=1000)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=1)  # one choice per request: a CPU box runs one generation at a time anyway
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(len(s) > 256 for s in stops):
            raise ValueError("at most 4 stop sequences of at most 256 characters")
        return stops

    @field_validator("messages")
    @classmethod
    def _size(cls, v):
        if sum(len(m.text()) for m in v) > MAX_CONTENT_CHARS:
            raise ValueError(f"messages: more than {MAX_CONTENT_CHARS} characters")
        return v

    def token_limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256

    def chat(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def chat_router(resolve: Callable[[str], str], cache: ModelCache, list_models: Callable[[], list[str]]) -> APIRouter:
    """`resolve(model)` turns a request's model into a local directory (raising ValueError for bad ones)."""
    r = APIRouter()

    @r.get("/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "local"}
                                            for m in list_models()]}

    @r.post("/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest):
        try:
            path = await asyncio.to_thread(resolve, req.model)
            loaded = await asyncio.to_thread(cache.get, path)
        except ValueError as e:  # OpenAI's error shape, so OpenAI clients show the reason
            return JSONResponse(status_code=400, headers={"x-should-retry": "false"}, content={
                "error": {"message": str(e), "type": "invalid_request_error", "param": "model", "code": None}})
        args = (loaded, req.chat(), req.token_limit(), req.temperature, req.top_p, req.stop, req.seed)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            try:
                c = await asyncio.to_thread(generate, *args)
            except TemplateError as e:  # messages the model's chat template refuses (roles, order)
                return JSONResponse(status_code=400, headers={"x-should-retry": "false"}, content={
                    "error": {"message": f"messages: the model's chat template refused them: {e}",
                              "type": "invalid_request_error", "param": "messages", "code": None}})
            return {
                "id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason, "logprobs": None}],
                "usage": _usage(c),
            }
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(args, cid, created, req.model, include_usage), media_type="text/event-stream")

    return r


async def _sse(args: tuple, cid: str, created: int, model: str, include_usage: bool):
    """Run the generator in a thread; forward its deltas as chat.completion.chunk events."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def produce():
        try:
            for item in generate_stream(*args):
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except Exception as e:  # noqa: BLE001 - reported in the stream, the status line is already sent
            loop.call_soon_threadsafe(queue.put_nowait, e)
        loop.call_soon_threadsafe(queue.put_nowait, done)

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if usage is not None:
            body["choices"], body["usage"] = [], usage
        return f"data: {json.dumps(body)}\n\n"

    worker = asyncio.get_running_loop().run_in_executor(None, produce)
    yield chunk({"role": "assistant", "content": ""})
    while True:
        item = await queue.get()
        if item is done:
            break
        if isinstance(item, Exception):
            yield f"data: {json.dumps({'error': {'message': f'{type(item).__name__}: {item}'}})}\n\n"
            break
        if isinstance(item, Completion):
            yield chunk({}, item.finish_reason)
            if include_usage:
                yield chunk({}, usage=_usage(item))
        elif item:
            yield chunk({"content": item})
    await worker
    yield "data: [DONE]\n\n"
