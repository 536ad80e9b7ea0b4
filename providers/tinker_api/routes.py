"""The Tinker API's routes (/api/v1/...), as the official `tinker` SDK calls them. Mutating calls return a
future `{request_id, model_id}`; its result comes from `retrieve_future` (protobuf for forward_backward and
sample, JSON otherwise; a failure as `{"error", "category"}`, which the SDK raises as RequestFailedError)."""

from __future__ import annotations

import asyncio
import importlib
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from ..access import can_see
from ..errors import BadRequest, NotFound
from .types import LogprobRequest, LoraSpec, UserInputError
from .service import Gone, TinkerService

if TYPE_CHECKING:
    from .worker import BaseProcess

PROTOBUF = "application/x-protobuf"


async def protobuf_wire():
    """wire.py, imported with the first protobuf body, in a worker thread: it imports the tinker SDK, whose
    types import torch (1.7 s of CPU), which a service start without Tinker traffic does not pay."""
    return await asyncio.to_thread(importlib.import_module, f"{__package__}.wire")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the SDK adds fields (type, user_metadata, ...) as it grows


class LoraConfigBody(_Body):
    rank: int = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModel(_Body):
    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: str
    lora_config: LoraConfigBody = Field(default_factory=LoraConfigBody)
    user_metadata: dict[str, str] | None = None  # kept with the run: training_runs answers it


class CheckpointTtl(_Body):
    ttl_seconds: int | None  # None: never expires


class ModelRef(_Body):
    model_id: str


class AdamParams(_Body):
    learning_rate: float = Field(1e-4, ge=0, allow_inf_nan=False)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-12, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip_norm: float = Field(0.0, ge=0)


class OptimStep(_Body):
    model_id: str
    adam_params: AdamParams = Field(default_factory=AdamParams)


class SaveWeights(_Body):
    model_id: str
    path: str | None = None
    overwrite: bool = False
    ttl_seconds: int | None = None
    sampling_session_seq_id: int | None = None
    kind: str = "snapshot"


class LoadWeights(_Body):
    model_id: str | None = None
    session_id: str | None = None
    model_seq_id: int | None = Field(None, ge=0)
    base_model: str | None = None
    path: str
    optimizer: bool = False


class CreateSamplingSession(_Body):
    session_id: str
    sampling_session_seq_id: int = 0
    base_model: str | None = None
    model_path: str | None = None


class Chunk(_Body):
    type: str = "encoded_text"
    tokens: list[int] = Field(default_factory=list)


class Prompt(_Body):
    chunks: list[Chunk]


class SamplingParams(_Body):
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_k: int = -1
    top_p: float = Field(1.0, gt=0, le=1)


class Sample(_Body):
    sampling_session_id: str | None = None
    base_model: str | None = None
    model_path: str | None = None
    num_samples: int = Field(1, ge=1)
    prompt: Prompt
    sampling_params: SamplingParams
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = Field(0, ge=0)
    topk_sample_logprobs: int = Field(0, ge=0)
    target_prompt_logprobs: Any = None  # not served: refused by name, never ignored
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None


class FutureRef(_Body):
    request_id: str


class SessionRef(_Body):
    session_id: str


def tinker_router(svc: TinkerService) -> APIRouter:
    r = APIRouter()
    limits = svc.limits

    def submit(rec, work, kind: str = "json", model_id: str | None = None) -> dict[str, Any]:
        """`work(base, adapter)` queued on the model's (or sampler's) base; the SDK's future."""
        return {"request_id": svc.run_on(rec, work, kind), "model_id": model_id}

    @r.post("/client/config")
    async def client_config() -> dict:
        return {}  # the defaults: no JWT, no zstd, 1024-datum chunks

    @r.post("/create_session")
    async def create_session() -> dict:
        return {"type": "create_session", "session_id": svc.create_session()}

    @r.post("/session_heartbeat")
    async def heartbeat(body: SessionRef) -> dict:
        svc.session(body.session_id)
        return {"type": "session_heartbeat"}

    @r.post("/sessions/{session_id}/finish")
    async def finish(session_id: str) -> dict:
        svc.session(session_id)
        svc.end_session(session_id)
        return {}

    @r.get("/sessions")
    async def list_sessions(limit: int = Query(20, ge=1, le=1000), offset: int = Query(0, ge=0)) -> dict:
        return {"sessions": svc.list_sessions()[offset:offset + limit]}

    @r.get("/sessions/{session_id}")
    async def get_session(session_id: str) -> dict:
        return svc.get_session(session_id)

    @r.get("/session_overview")  # this service's own: the dashboard's and the CLI's view of the sessions
    async def session_overview() -> dict:
        return {"sessions": svc.sessions_view()}

    @r.post("/telemetry")
    async def telemetry() -> dict:
        return {"status": "accepted"}  # the SDK's own telemetry: not kept

    @r.get("/get_server_capabilities")
    async def server_capabilities() -> dict:
        return {"supported_models": [{"model_name": m, "trainable": True, "sampleable": True}
                                     for m in await asyncio.to_thread(svc.base_models)]}

    @r.post("/create_model")
    async def create_model(body: CreateModel) -> dict:
        lora = LoraSpec(**body.lora_config.model_dump())
        rec = await asyncio.to_thread(svc.new_model, body.session_id, body.model_seq_id, body.base_model, lora,
                                      body.user_metadata)
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        return submit(rec, lambda base, name: {"model_id": model_id, "type": "create_model"}, model_id=model_id)

    @r.post("/get_info")
    async def get_info(body: ModelRef) -> dict:
        rec = svc.model(body.model_id)
        return {"type": "get_info", "model_id": body.model_id, "is_lora": True, "lora_rank": rec.lora.rank,
                "model_data": {"model_name": rec.base_ref, "tokenizer_id": rec.base_path}}

    @r.post("/forward_backward")
    async def forward_backward(request: Request) -> dict:
        if PROTOBUF not in request.headers.get("content-type", "") or request.headers.get("content-encoding"):
            raise BadRequest(f"body: send a tinker_public.ForwardBackwardRequest as {PROTOBUF}, uncompressed "
                             "(client/config does not enable zstd)")
        body = await request.body()
        wire = await protobuf_wire()
        try:
            msg = wire.parse_forward_backward(body)
            model_id = msg.model_id
            rec = svc.model(model_id)
            loss_fn, config, forward_only, data = wire.decode_forward_backward(msg, rec.vocab_size,
                                                                          limits.max_batch_tokens)
        except wire.WireError as e:
            raise BadRequest(str(e)) from None
        longest = max(len(d.tokens) for d in data)
        if longest > rec.max_positions:
            raise BadRequest(f"data: a datum of {longest} tokens is longer than the model's context "
                             f"({rec.max_positions})")
        loss = loss_fn if loss_fn in ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro") \
            else "cross_entropy"  # forward_only with another name: the logprobs are what the client wants

        tokens = sum(len(d.tokens) for d in data)

        def work(base: BaseProcess, name: str) -> bytes:
            output, metrics = base.forward_backward(name, body, loss, forward_only)  # the body, as it came
            svc.stepped(rec, loss=metrics["loss:sum"], tokens=tokens)
            return output

        return submit(rec, work, "proto", model_id)

    @r.post("/optim_step")
    async def optim_step(body: OptimStep) -> dict:
        rec = svc.model(body.model_id)
        p = body.adam_params

        def work(base: BaseProcess, name: str) -> dict:
            metrics = base.optim_step(name, **p.model_dump())
            svc.stepped(rec, step=True)
            return {"type": "optim_step", "metrics": metrics}

        return submit(rec, work, model_id=body.model_id)

    def save(rec, body: SaveWeights, kind: str, answer: str, with_optimizer: bool) -> dict:
        """A model's weights (and optimizer state) saved as tinker://RUN/KIND/NAME by its worker, in its order;
        named weights are not replaced unless `overwrite`, sampler weights always are."""
        directory, path = svc.checkpoint_dir(body.model_id, kind, body.path)
        if with_optimizer and directory.exists() and not body.overwrite:
            raise BadRequest(f"path: {path} exists (overwrite: true replaces it)")
        meta = svc.checkpoint_meta(rec, body.ttl_seconds)

        def work(base: BaseProcess, name: str) -> dict:
            with svc.disk_claim(rec.owner, base.save_bytes(name, with_optimizer), directory, f"path: {path}"):
                base.save(name, directory, with_optimizer=with_optimizer, meta=meta)
            svc.saved_checkpoint(directory, meta)
            return {"type": answer, "path": path}

        return submit(rec, work, model_id=body.model_id)

    @r.post("/save_weights")
    async def save_weights(body: SaveWeights) -> dict:
        rec = svc.model(body.model_id)
        return save(rec, body, "weights", "save_weights", with_optimizer=True)

    @r.post("/save_weights_for_sampler")
    async def save_weights_for_sampler(body: SaveWeights) -> dict:
        rec = svc.model(body.model_id)
        if body.path is None and body.sampling_session_seq_id is not None:  # ephemeral: no file at all
            if body.kind not in ("snapshot", "inflight"):
                raise BadRequest(f"kind: {body.kind!r} is not 'snapshot' or 'inflight'")
            sampler_id, sampler = svc.sampler_of_model(rec, live=body.kind == "inflight")

            def take(base: BaseProcess, name: str) -> dict:
                if body.kind == "snapshot":
                    base.snapshot(name, sampler_id)
                    sampler.snapshot = sampler_id
                return {"type": "save_weights_for_sampler", "sampling_session_id": sampler_id}

            return submit(rec, take, model_id=body.model_id)
        return save(rec, body, "sampler_weights", "save_weights_for_sampler", with_optimizer=False)

    @r.post("/load_weights")
    async def load_weights(body: LoadWeights) -> dict:
        directory, meta = svc.checkpoint(body.path)
        if body.model_id is not None:
            rec = svc.model(body.model_id)
            model_id = body.model_id
        else:
            if body.session_id is None or body.model_seq_id is None:
                raise BadRequest("model_id, or session_id and model_seq_id: required")
            lora = LoraSpec(**meta["lora"])
            rec = await asyncio.to_thread(svc.new_model, body.session_id, body.model_seq_id,
                                          body.base_model or meta["base_model"], lora)
            model_id = f"{body.session_id}:train:{body.model_seq_id}"

        def work(base: BaseProcess, name: str) -> dict:
            base.load(name, directory, with_optimizer=body.optimizer)
            svc.stepped(rec, loaded=True)
            return {"type": "load_weights", "path": body.path, "model_id": model_id}

        return submit(rec, work, model_id=model_id)

    @r.post("/weights_info")
    async def weights_info(body: dict[str, Any] = Body(...)) -> dict:  # not JSON, not an object: a 400
        _, meta = svc.checkpoint(str(body.get("tinker_path", ""))[:2000], "tinker_path")
        return {"base_model": meta["base_model"], "is_lora": True, "lora_rank": meta["lora"]["rank"],
                **{k: meta["lora"][k] for k in ("train_unembed", "train_mlp", "train_attn")}}

    @r.get("/training_runs")
    async def training_runs(limit: int = Query(20, ge=1, le=1000), offset: int = Query(0, ge=0)) -> dict:
        runs = await asyncio.to_thread(svc.training_runs)  # reads the checkpoints' records on disk
        return {"training_runs": runs[offset:offset + limit],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)}}

    @r.get("/training_runs/{run_id}")
    async def training_run(run_id: str) -> dict:
        return await asyncio.to_thread(svc.training_run, run_id)

    @r.get("/training_runs/{run_id}/checkpoints")
    async def checkpoints(run_id: str) -> dict:
        return {"checkpoints": await asyncio.to_thread(svc.checkpoints, run_id)}

    @r.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")  # checkpoint_id: KIND/NAME
    async def delete_checkpoint(run_id: str, checkpoint_id: str) -> dict:
        await asyncio.to_thread(svc.delete_checkpoint, run_id, checkpoint_id)
        return {}

    @r.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl")  # checkpoint_id: KIND/NAME
    async def set_checkpoint_ttl(run_id: str, checkpoint_id: str, body: CheckpointTtl) -> dict:
        await asyncio.to_thread(svc.set_checkpoint_ttl, run_id, checkpoint_id, body.ttl_seconds)
        return {}

    @r.post("/create_sampling_session")
    async def create_sampling_session(body: CreateSamplingSession) -> dict:
        sampler_id = await asyncio.to_thread(svc.new_sampler, body.session_id, body.base_model, body.model_path)
        return {"type": "create_sampling_session", "sampling_session_id": sampler_id}

    @r.get("/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str) -> dict:
        rec = svc.sampler(sampler_id)
        return {"sampler_id": sampler_id, "base_model": rec.base_ref, "model_path": rec.model_path}

    @r.post("/asample")
    async def asample(body: Sample) -> dict:
        if body.sampling_session_id is None:
            raise BadRequest("sampling_session_id: required (create_sampling_session, or "
                             "save_weights_and_get_sampling_client)")
        rec = svc.sampler(body.sampling_session_id)
        params = body.sampling_params
        if body.num_samples > limits.max_num_samples:
            raise BadRequest(f"num_samples: {body.num_samples} is over this service's limit of "
                             f"{limits.max_num_samples}")
        max_tokens = params.max_tokens or 256
        if max_tokens > limits.max_sample_tokens:
            raise BadRequest(f"sampling_params.max_tokens: {max_tokens} is over this service's limit of "
                             f"{limits.max_sample_tokens}")
        prompt = [t for c in body.prompt.chunks for t in c.tokens]
        if any(c.type != "encoded_text" for c in body.prompt.chunks):
            raise BadRequest("prompt.chunks: only encoded_text chunks (token ids) are supported")
        if not prompt:
            raise BadRequest("prompt: no tokens")
        bad = [t for t in prompt if not 0 <= t < rec.vocab_size]
        if bad:
            raise BadRequest(f"prompt: token id {bad[0]} is outside the vocabulary (0..{rec.vocab_size - 1})")
        if len(prompt) + max_tokens > rec.max_positions:
            raise BadRequest(f"sampling_params.max_tokens: the prompt's {len(prompt)} tokens plus {max_tokens} "
                             f"are over the model's context ({rec.max_positions})")
        for name in ("topk_prompt_logprobs", "topk_sample_logprobs"):
            if getattr(body, name) > limits.max_topk_logprobs:
                raise BadRequest(f"{name}: {getattr(body, name)} is over this service's limit of "
                                 f"{limits.max_topk_logprobs}")
        # Not served here (the hosted service's prefix-cache and alt-token features): refused by name.
        if body.target_prompt_logprobs is not None:
            raise BadRequest("target_prompt_logprobs: not supported by this service (prompt_logprobs and "
                             "topk_prompt_logprobs are)")
        if body.prompt_alt_tokens_k:
            raise BadRequest("prompt_alt_tokens_k: not supported by this service (must be 0)")
        if body.prompt_logprobs_last_n is not None:
            raise BadRequest("prompt_logprobs_last_n: not supported by this service (prompt_logprobs scores "
                             "the whole prompt)")
        want = LogprobRequest(bool(body.prompt_logprobs), body.topk_prompt_logprobs, body.topk_sample_logprobs)
        stop = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])

        def work(base: BaseProcess, name: str | None) -> bytes:
            output, sampled = base.sample(name, None if rec.live else rec.snapshot, want, prompt=prompt,
                                          num_samples=body.num_samples, max_tokens=max_tokens,
                                          temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                          seed=params.seed, stop=stop)
            svc.counts["sampled_tokens"] += sampled
            return output

        out = submit(rec, work, "proto")
        out["sample_sequence_ids"] = [f"{out['request_id']}:{i}" for i in range(body.num_samples)]
        return out

    @r.post("/retrieve_future")
    async def retrieve_future(body: FutureRef):
        fut = svc.futures.get(body.request_id)
        if fut is None and svc.futures.from_before_restart(body.request_id):
            raise Gone(f"request_id: {body.request_id[:80]!r} was made before the service restarted; "
                       "send the request again")
        if fut is None or not can_see(fut.owner):
            raise NotFound(f"request_id: unknown request {body.request_id!r}")
        deadline, wait = time.monotonic() + limits.future_wait_s, 0.002
        while not fut.done.is_set():
            if time.monotonic() > deadline:
                return {"type": "try_again", "request_id": body.request_id, "queue_state": "active"}
            await asyncio.sleep(wait)
            wait = min(wait * 2, 0.05)
        if fut.error is not None:
            return {"error": fut.error, "category": fut.category}
        if fut.kind == "proto":
            return Response(content=fut.result, media_type=PROTOBUF)
        return fut.result

    return r


__all__ = ["tinker_router", "UserInputError"]
