"""The OpenAI chat-completions and completions APIs over local checkpoints: request/response models and a
FastAPI router.

    POST /chat/completions, POST /completions   (mounted at /v1/openai/v1 and /v1 by the service)
    GET  /models, GET /models/{id}

What evaluation clients (lm-evaluation-harness, the `openai` SDK) send is answered: `n` choices, `stop`,
`seed`, `max_tokens`, log-probs (chat: `logprobs` + `top_logprobs`; completions: `logprobs: k`, and `echo`
for the prompt's own log-probs, `max_tokens: 0` included), prompts as text or token ids, and `usage` in
streams (`stream_options.include_usage`). A request's choices (n x prompts) run one after another on one
worker, so one request never takes more than one of the pool's generations.

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

from ..errors import BadRequest, ClientError
from .engine import (
    Completion,
    Delta,
    LoadedModel,
    ModelCache,
    TokenLogprob,
    generate_ids_stream,
    prompt_ids,
    text_prompt_ids,
)

MAX_TOKENS_LIMIT = 1 << 20  # the request model's own bound; ChatLimits.max_tokens is the operator's
MAX_MESSAGES = 256
MAX_CONTENT_CHARS = 200_000  # a request's text: messages, or all prompts together
MAX_PROMPT_TOKENS = 65_536  # a completions request's token-id prompts, all together
MAX_CHOICES = 16  # n x prompts in one request (they run one after another on the request's worker)
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's own bound)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type", "text") == "text")
        return self.content or ""


class _GenerationRequest(BaseModel):
    """What both routes take: the model, sampling, choices, stop strings, streaming."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=1000)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
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

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def choice_seed(self, j: int) -> int | None:
        """Choice j's seed: repeatable choices that differ from each other."""
        return None if self.seed is None else (self.seed + j) % 2**63


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

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


Prompt = str | list[int]


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0, le=MAX_TOKENS_LIMIT)  # OpenAI's default; 0 with echo: the prompt's log-probs
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        prompts = [v] if isinstance(v, str) or (v and isinstance(v[0], int)) else v
        if not prompts or len(prompts) > MAX_CHOICES:
            raise BadRequest(f"from 1 to {MAX_CHOICES} prompts (text or token ids)")
        if any(not p for p in prompts):
            raise BadRequest("an empty prompt")
        if sum(len(p) for p in prompts if isinstance(p, str)) > MAX_CONTENT_CHARS:
            raise BadRequest(f"more than {MAX_CONTENT_CHARS} characters")
        if sum(len(p) for p in prompts if isinstance(p, list)) > MAX_PROMPT_TOKENS:
            raise BadRequest(f"more than {MAX_PROMPT_TOKENS} token ids")
        return prompts

    def prompts(self) -> list[Prompt]:
        return self.prompt  # a list after validation

    def token_limit(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens


@dataclass(frozen=True)
class ChatLimits:
    """How much of the machine the chat API may take: `workers` generations at once, `queue` more waiting
    (beyond: 429), and at most `max_tokens` new tokens per request, all its choices together (beyond: 400)."""

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


def _usage(completions: list[Completion], n: int) -> dict[str, int]:
    """Each prompt counted once (its first choice's), every choice's new tokens."""
    prompt = sum(c.prompt_tokens for c in completions[::n])
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def _chat_token(entry: TokenLogprob) -> dict[str, Any]:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.token.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in entry.top]}


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    return None if entries is None else {"content": [_chat_token(e) for e in entries], "refusal": None}


def _text_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The completions API's log-probs: parallel lists; `offset`: where the first token's text starts."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.logprob is None else dict(e.top) for e in entries], "text_offset": offsets}


def chat_router(resolve: Callable[[str], str], cache: ModelCache, list_models: Callable[[], list[str]],
                limits: ChatLimits | None = None) -> APIRouter:
    """`resolve(model)` turns a request's model into a local directory (raising ValueError for bad ones)."""
    r = APIRouter()
    pool = GenerationPool(limits or ChatLimits())

    def too_many_tokens(per_choice: int, choices: int, field: str) -> JSONResponse | None:
        if per_choice * choices <= pool.limits.max_tokens:
            return None
        asked = f"{field}: {per_choice}" if choices == 1 else f"n x prompts x {field}: {choices} x {per_choice}"
        return _openai_error(400, f"{asked} is more than this service allows ({pool.limits.max_tokens} new tokens "
                             "per request, its --chat-max-tokens); ask for fewer", "invalid_request_error",
                             field if choices == 1 else "n")

    async def admitted(req: _GenerationRequest, field: str, respond: Callable[[LoadedModel, Callable], Any]):
        """Admit the request to the pool, resolve its model (in the request's context: the check that the model
        is the requesting user's), load it, and `respond(loaded, run_last)`; client errors in OpenAI's shape."""
        if not pool.admit():
            return pool.busy_error()
        loop = asyncio.get_running_loop()
        handed_off = False  # once the last step runs, it leaves the pool when it ends

        def run_last(fn, *args) -> Future:
            nonlocal handed_off
            handed_off = True
            return pool.run_last(fn, *args)

        try:
            try:
                path = await loop.run_in_executor(pool.loader, contextvars.copy_context().run, resolve, req.model)
                loaded = await loop.run_in_executor(pool.loader, cache.get, path)
            except ValueError as e:
                return _openai_error(400, str(e), "invalid_request_error", "model")
            return await respond(loaded, run_last)
        except ClientError as e:
            return _openai_error(e.status, str(e), "invalid_request_error", field)
        except TemplateError as e:  # messages the model's chat template refuses (roles, order)
            return _openai_error(400, f"messages: the model's chat template refused them: {e}",
                                 "invalid_request_error", "messages")
        finally:
            if not handed_off:
                pool.leave()

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
        field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        asked = req.asked_tokens()
        wanted = asked if asked is not None else min(req.token_limit(), max(1, pool.limits.max_tokens // req.n))
        if refused := too_many_tokens(wanted, req.n, field):
            return refused
        if req.top_logprobs is not None and not req.logprobs:
            return _openai_error(400, "top_logprobs: needs logprobs: true", "invalid_request_error", "top_logprobs")
        top = (req.top_logprobs or 0) if req.logprobs else None
        messages = req.chat()

        def runs(loaded: LoadedModel) -> list[Callable[[], Any]]:
            return [lambda j=j: generate_ids_stream(loaded, prompt_ids(loaded, messages), wanted, req.temperature,
                                                    req.top_p, req.stop, req.choice_seed(j), top)
                    for j in range(req.n)]

        async def respond(loaded: LoadedModel, run_last: Callable[..., Future]):
            cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            if req.stream:
                chunk = _chat_chunker(cid, created, req.model)
                return StreamingResponse(_sse(GenerationStream(run_last, runs(loaded)), chunk, req.n, req.include_usage()),
                                         media_type="text/event-stream")
            completions = await asyncio.wrap_future(run_last(_run_all, runs(loaded)))
            return {
                "id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": j, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason, "logprobs": chat_logprobs(c.logprobs)}
                            for j, c in enumerate(completions)],
                "usage": _usage(completions, req.n),
            }

        return await admitted(req, "logprobs", respond)

    @r.post("/completions", response_model=None)
    async def completions(req: CompletionRequest):
        prompts = req.prompts()
        wanted = req.token_limit()
        if refused := too_many_tokens(wanted, req.n * len(prompts), "max_tokens"):
            return refused
        if req.n * len(prompts) > MAX_CHOICES:
            return _openai_error(400, f"n: {req.n} choices for each of {len(prompts)} prompts is more than "
                                 f"{MAX_CHOICES} in one request; ask for fewer", "invalid_request_error", "n")
        if req.echo and req.stream:
            return _openai_error(400, "echo: not with stream (ask without one of them)", "invalid_request_error", "echo")

        def prompt_tokens(loaded: LoadedModel, prompt: Prompt) -> list[int]:
            if isinstance(prompt, str):
                ids = text_prompt_ids(loaded, prompt)
                if not ids:
                    raise BadRequest("prompt: no tokens in it")
                return ids
            vocab = loaded.model.get_input_embeddings().num_embeddings
            if bad := next((t for t in prompt if not 0 <= t < vocab), None):
                raise BadRequest(f"prompt: token id {bad} is outside this model's vocabulary (0..{vocab - 1})")
            return prompt

        def runs(loaded: LoadedModel) -> list[Callable[[], Any]]:
            tokens = [prompt_tokens(loaded, p) for p in prompts]  # bad ids are a 400 before any generation
            echo_logprobs = req.echo and req.logprobs is not None
            return [lambda ids=ids, j=j: generate_ids_stream(loaded, ids, wanted, req.temperature, req.top_p,
                                                             req.stop, req.choice_seed(j), req.logprobs, echo_logprobs)
                    for ids in tokens for j in range(req.n)]

        def echoed(loaded: LoadedModel, prompt: Prompt) -> str:
            return prompt if isinstance(prompt, str) else loaded.tokenizer.decode(prompt)

        async def respond(loaded: LoadedModel, run_last: Callable[..., Future]):
            cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
            jobs = runs(loaded)
            if req.stream:
                chunk = _text_chunker(cid, created, req.model)
                return StreamingResponse(_sse(GenerationStream(run_last, jobs), chunk, req.n, req.include_usage()),
                                         media_type="text/event-stream")
            done = await asyncio.wrap_future(run_last(_run_all, jobs))
            choices = []
            for i, c in enumerate(done):
                prefix = echoed(loaded, prompts[i // req.n]) if req.echo else ""
                logprobs = None
                if req.logprobs is not None:
                    entries = (c.prompt_logprobs or []) + (c.logprobs or [])
                    logprobs = _text_logprobs(entries, 0 if req.echo else len(echoed(loaded, prompts[i // req.n])))
                choices.append({"index": i, "text": prefix + c.text, "finish_reason": c.finish_reason,
                                "logprobs": logprobs})
            return {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": choices, "usage": _usage(done, req.n)}

        return await admitted(req, "prompt", respond)

    return r


def _run_all(runs: list[Callable[[], Any]]) -> list[Completion]:
    """Each choice's generation in turn (on one pool worker): their Completions."""
    completions = []
    for run in runs:
        *_, last = run()
        completions.append(last)
    return completions


class GenerationStream:
    """A request's streamed generations (its choices, one after another), started on the pool at once (so they
    always end and leave the pool, even if the response is never sent); `stop` ends them at the next token.
    Items on the queue: (choice index, a Delta or the choice's Completion), an Exception, or `done`."""

    done = object()

    def __init__(self, run_last: Callable[..., Future], runs: list[Callable[[], Any]]):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stop = threading.Event()
        self.worker = asyncio.wrap_future(run_last(self._produce, runs))

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _produce(self, runs: list[Callable[[], Any]]) -> None:
        try:
            for index, run in enumerate(runs):
                for item in run():
                    if isinstance(item, str) and not isinstance(item, Delta):  # a prompt-tuning adapter's whole text
                        item = Delta(item)
                    self._put((index, item))
                    if self.stop.is_set():
                        return
        except Exception as e:  # noqa: BLE001 - reported in the stream, the status line is already sent
            self._put(e)
        finally:
            self._put(self.done)


Chunker = Callable[[int, Delta | None, Completion | None], dict[str, Any]]


def _chat_chunker(cid: str, created: int, model: str) -> Chunker:
    """chat.completion.chunk bodies: a delta (None: the choice's opening role), or a choice's end."""

    def chunk(index: int, piece: Delta | None, end: Completion | None) -> dict[str, Any]:
        if end is not None:
            choice = {"index": index, "delta": {}, "finish_reason": end.finish_reason, "logprobs": None}
        elif piece is None:
            choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                      "logprobs": None}
        else:
            choice = {"index": index, "delta": {"content": str(piece)}, "finish_reason": None,
                      "logprobs": chat_logprobs(piece.logprobs) if piece.logprobs else None}
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}

    return chunk


def _text_chunker(cid: str, created: int, model: str) -> Chunker:
    """text_completion chunk bodies (the completions API streams no opening chunk)."""
    offsets: dict[int, int] = {}

    def chunk(index: int, piece: Delta | None, end: Completion | None) -> dict[str, Any] | None:
        if piece is None and end is None:
            return None
        text = "" if piece is None else str(piece)
        logprobs = None
        if piece is not None and piece.logprobs:
            logprobs = _text_logprobs(piece.logprobs, offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + sum(len(e.token) for e in piece.logprobs)
        choice = {"index": index, "text": text, "logprobs": logprobs,
                  "finish_reason": None if end is None else end.finish_reason}
        return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}

    return chunk


async def _sse(stream: GenerationStream, chunk: Chunker, n: int, include_usage: bool):
    """Forward the generations as server-sent events (`chunk` shapes them), then the usage of all choices when
    asked, then [DONE]. A closed stream (the client went away) stops the generation at its next token."""

    def event(body: dict[str, Any] | None) -> str:
        return "" if body is None else f"data: {json.dumps(body)}\n\n"

    completions: list[Completion] = []
    started: set[int] = set()
    try:
        while True:
            item = await stream.queue.get()
            if item is stream.done:
                break
            if isinstance(item, Exception):
                yield f"data: {json.dumps({'error': {'message': f'{type(item).__name__}: {item}'}})}\n\n"
                break
            index, value = item
            if index not in started:
                started.add(index)
                if opening := event(chunk(index, None, None)):
                    yield opening
            if isinstance(value, Completion):
                completions.append(value)
                yield event(chunk(index, None, value))
            elif value or value.logprobs:
                yield event(chunk(index, value, None))
        await stream.worker
        if include_usage and completions:
            last = chunk(0, None, completions[-1])
            last["choices"], last["usage"] = [], _usage(completions, n)
            yield event(last)
        yield "data: [DONE]\n\n"
    finally:
        stream.stop.set()
