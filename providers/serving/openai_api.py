"""The OpenAI chat-completions API over local checkpoints: request/response models and a FastAPI router.

    POST /chat/completions   (mounted at /v1/openai/v1 and /v1 by the service)
    GET  /models, GET /models/{id}

`model` is resolved by the caller's `resolve(model) -> directory` (a base model directory, `job:<uuid>`,
a pipeline output, ...). Loading and generation run on the chat API's own threads (`ChatLimits`: a few
workers, a bounded queue, 429 beyond it, and a cap on max_tokens), never on the threads the rest of the
service uses, so long generations cannot delay job control, log tails or uploads. Streaming answers are
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter
from jinja2 import TemplateError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import BadRequest
from .engine import Completion, ModelCache, generate, generate_stream

MAX_TOKENS_LIMIT = 1 << 20  # the request model's own bound; ChatLimits.max_tokens is the operator's
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
            raise BadRequest("at most 4 stop sequences of at most 256 characters")
        return stops

    @field_validator("messages")
    @classmethod
    def _size(cls, v):
        if sum(len(m.text()) for m in v) > MAX_CONTENT_CHARS:
            raise BadRequest(f"messages: more than {MAX_CONTENT_CHARS} characters")
        return v

    def asked_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def token_limit(self) -> int:
        return self.asked_tokens() or 256

    def chat(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


@dataclass(frozen=True)
class ChatLimits:
    """How much of the machine the chat API may take: `workers` generations at once, `queue` more waiting
    (beyond: 429), and at most `max_tokens` new tokens per request (beyond: 400)."""

    workers: int = 2
    queue: int = 16
    max_tokens: int = 4096


def _openai_error(status: int, message: str, type_: str, param: str | None, code: str | None = None) -> JSONResponse:
    # OpenAI's error shape, so OpenAI clients show the reason.
    return JSONResponse(status_code=status, headers={"x-should-retry": "false"}, content={
        "error": {"message": message, "type": type_, "param": param, "code": code}})


class GenerationPool:
    """The chat API's threads: admits at most workers + queue requests at a time, counting each from
    admission until its generation has ended (or its stream was closed)."""

    def __init__(self, limits: ChatLimits):
        self.limits = limits
        self.executor = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="chat")
        # Resolving and loading on threads of their own: a waiting request's model is ready (and its
        # stream open) while generations hold the workers.
        self.loader = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="chat-load")
        self._admitted = 0
        self._lock = threading.Lock()

    def admit(self) -> bool:
        with self._lock:
            if self._admitted >= self.limits.workers + self.limits.queue:
                return False
            self._admitted += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._admitted -= 1

    def run_last(self, fn, *args) -> Future:
        """Run an admitted request's last step; the request leaves the pool when that step has ended (not
        when its caller stops waiting: a generation runs on after its client has gone)."""
        future = self.executor.submit(fn, *args)
        future.add_done_callback(lambda _: self.leave())
        return future

    def busy_error(self) -> JSONResponse:
        return _openai_error(429, f"the chat API is busy: {self.limits.workers} generations are running and "
                             f"{self.limits.queue} are waiting (the service's --chat-workers and --chat-queue); "
                             "try again later", "requests", None, "rate_limit_exceeded")


def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def chat_router(resolve: Callable[[str], str], cache: ModelCache, list_models: Callable[[], list[str]],
                limits: ChatLimits | None = None) -> APIRouter:
    """`resolve(model)` turns a request's model into a local directory (raising ValueError for bad ones)."""
    r = APIRouter()
    pool = GenerationPool(limits or ChatLimits())

    @r.get("/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "local"}
                                            for m in list_models()]}

    @r.get("/models/{model_id:path}", response_model=None)
    def model(model_id: str):
        if model_id not in list_models():
            return _openai_error(404, f"model: {model_id[:200]!r} is not listed here (GET /models lists what is)",
                                 "invalid_request_error", "model", "model_not_found")
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "local"}

    @r.post("/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest):
        wanted = min(req.token_limit(), pool.limits.max_tokens) if req.asked_tokens() is None else req.token_limit()
        if wanted > pool.limits.max_tokens:
            field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            return _openai_error(400, f"{field}: {wanted} is more than this service allows ({pool.limits.max_tokens}, "
                                 "its --chat-max-tokens); ask for fewer", "invalid_request_error", field)
        if not pool.admit():
            return pool.busy_error()
        loop = asyncio.get_running_loop()
        handed_off = False  # once the last step runs, it leaves the pool when it ends
        try:
            try:
                # resolve in the request's context: it checks that the model is the requesting user's
                path = await loop.run_in_executor(pool.loader, contextvars.copy_context().run, resolve, req.model)
                loaded = await loop.run_in_executor(pool.loader, cache.get, path)
            except ValueError as e:
                return _openai_error(400, str(e), "invalid_request_error", "model")
            args = (loaded, req.chat(), wanted, req.temperature, req.top_p, req.stop, req.seed)
            cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            if not req.stream:
                handed_off = True
                try:
                    c = await asyncio.wrap_future(pool.run_last(generate, *args))
                except TemplateError as e:  # messages the model's chat template refuses (roles, order)
                    return _openai_error(400, f"messages: the model's chat template refused them: {e}",
                                         "invalid_request_error", "messages")
                return {
                    "id": cid, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                 "finish_reason": c.finish_reason, "logprobs": None}],
                    "usage": _usage(c),
                }
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            handed_off = True
            stream = _Stream(pool, args)
            return StreamingResponse(_sse(stream, cid, created, req.model, include_usage),
                                     media_type="text/event-stream")
        finally:
            if not handed_off:
                pool.leave()

    return r


class _Stream:
    """One streamed generation, started on the pool at once (so it always ends and leaves the pool, even
    if the response is never sent); `stop` ends it at its next token."""

    done = object()

    def __init__(self, pool: GenerationPool, args: tuple):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stop = threading.Event()
        self.worker = asyncio.wrap_future(pool.run_last(self._produce, args))

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _produce(self, args: tuple) -> None:
        try:
            for item in generate_stream(*args):
                self._put(item)
                if self.stop.is_set():
                    break
        except Exception as e:  # noqa: BLE001 - reported in the stream, the status line is already sent
            self._put(e)
        finally:
            self._put(self.done)


async def _sse(stream: _Stream, cid: str, created: int, model: str, include_usage: bool):
    """Forward the generation's deltas as chat.completion.chunk events. A closed stream (the client went
    away) stops the generation at its next token."""

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if usage is not None:
            body["choices"], body["usage"] = [], usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            item = await stream.queue.get()
            if item is stream.done:
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
        await stream.worker
        yield "data: [DONE]\n\n"
    finally:
        stream.stop.set()
