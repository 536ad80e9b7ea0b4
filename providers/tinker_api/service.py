"""The Tinker API's state: sessions, resident models (each a ModelWorker), sampling sessions, futures and
the `tinker://` checkpoints under DATA_DIR/tinker. Everything belongs to the user whose key created it;
another user's ids answer as missing ones."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..access import can_see, current, owner_name
from ..errors import BadRequest, ClientError, NotFound
from .model import LoraSpec, TinkerModel
from .worker import FutureTable, ModelWorker

RUN_ID = re.compile(r"[0-9a-f]{32}:train:\d{1,9}")
CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
KINDS = {"weights": "weights", "sampler_weights": "sampler_weights"}


class TinkerLimits(BaseModel):
    """Each bound on what one Tinker request may cost, declared once."""
    model_config = ConfigDict(extra="forbid")
    max_num_samples: int = Field(64, ge=1, description="samples per asample")
    max_sample_tokens: int = Field(4096, ge=1, description="max_tokens per asample")
    max_batch_tokens: int = Field(262144, ge=1, description="input tokens per forward_backward")
    max_lora_rank: int = Field(256, ge=1)
    max_models_per_session: int = Field(8, ge=1, description="training and sampling models held at once")
    future_wait_s: float = Field(30.0, gt=0, description="how long retrieve_future holds a pending request")
    session_timeout_s: float = Field(600.0, gt=0, description="a session without heartbeat for this long ends")
    keep_futures: int = Field(10000, ge=100, description="finished results kept for retrieve_future")


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat()


class Forbidden(ClientError):
    status = 403  # not 429: the SDK retries a 429 for hours


@dataclass
class Session:
    owner: str | None
    last_seen: float = field(default_factory=time.monotonic)
    workers: dict[str, ModelWorker] = field(default_factory=dict)  # model or sampler id -> its worker


@dataclass
class ModelRecord:
    owner: str | None
    session_id: str
    base_ref: str  # what the client named (model_name in get_info)
    base_path: str  # the local directory it resolved to (tokenizer_id: loads offline)
    lora: LoraSpec
    vocab_size: int
    max_positions: int
    worker: ModelWorker


@dataclass
class SamplerRecord:
    owner: str | None
    base_ref: str
    base_path: str
    vocab_size: int
    max_positions: int
    worker: ModelWorker
    model_path: str | None = None
    snapshot: object = None  # an AdapterSnapshot (ephemeral, set in the worker's queue order) or None
    live: bool = False  # sample the training model's weights as they are when the request runs


class TinkerService:
    def __init__(self, data_dir: Path, resolve_model, limits: TinkerLimits | None = None):
        self.root = data_dir / "tinker" / "runs"
        self.resolve_model = resolve_model
        self.limits = limits or TinkerLimits()
        self.futures = FutureTable(self.limits.keep_futures)
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, ModelRecord] = {}
        self.samplers: dict[str, SamplerRecord] = {}
        self._lock = threading.Lock()

    # -- sessions ------------------------------------------------------------------------------------------
    def create_session(self) -> str:
        self.end_idle_sessions()
        user = current()
        limit = user.limits.max_sessions if user is not None else None
        with self._lock:
            if limit is not None and sum(s.owner == user.name for s in self.sessions.values()) >= limit:
                raise Forbidden(f"max_sessions: user {user.name!r} already has {limit} open Tinker sessions "
                                "(its limit in --api-keys-file); close one (or let it time out) first")
            sid = uuid.uuid4().hex
            self.sessions[sid] = Session(owner_name())
        return sid

    def session(self, sid: str) -> Session:
        s = self.sessions.get(sid)
        if s is None or not can_see(s.owner):
            raise NotFound(f"session_id: unknown session {sid!r} (ended, timed out, or never created)")
        s.last_seen = time.monotonic()
        return s

    def end_session(self, sid: str) -> None:
        with self._lock:
            s = self.sessions.pop(sid, None)
        if s is None:
            return
        for wid, worker in s.workers.items():
            worker.stop()
            self.models.pop(wid, None)
            self.samplers.pop(wid, None)

    def end_idle_sessions(self) -> None:
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if now - s.last_seen > self.limits.session_timeout_s:
                self.end_session(sid)

    def gauges(self) -> dict[str, tuple[str, float]]:
        """/metrics' figures of the Tinker API: name -> (help, value)."""
        workers = [w for s in list(self.sessions.values()) for w in list(s.workers.values())]
        return {"trl_tinker_sessions": ("Open Tinker API sessions", len(self.sessions)),
                "trl_tinker_models_resident": ("Models and samplers loaded in memory",
                                               sum(w.model is not None for w in workers)),
                "trl_tinker_requests_queued": ("Requests waiting for their model", sum(w.queue.qsize() for w in workers)),
                "trl_tinker_futures_pending": ("Requests not yet answered", self.futures.pending())}

    def shutdown(self) -> None:
        for sid in list(self.sessions):
            self.end_session(sid)

    def _add_worker(self, s: Session, wid: str, build) -> ModelWorker:
        if len(s.workers) >= self.limits.max_models_per_session:
            raise Forbidden(f"session: already holds {len(s.workers)} models and samplers "
                            f"(at most {self.limits.max_models_per_session})")
        s.workers[wid] = worker = ModelWorker(wid, build)
        return worker

    # -- models --------------------------------------------------------------------------------------------
    def new_model(self, sid: str, model_seq_id: int, base_ref: str, lora: LoraSpec) -> ModelRecord:
        s = self.session(sid)
        model_id = f"{sid}:train:{model_seq_id}"
        if model_id in self.models:
            raise BadRequest(f"model_seq_id: {model_seq_id} is already a model of this session")
        if not 1 <= lora.rank <= self.limits.max_lora_rank:
            raise BadRequest(f"lora_config.rank: {lora.rank} is outside 1..{self.limits.max_lora_rank}")
        base_path, vocab, positions = self._base(base_ref)
        worker = self._add_worker(s, model_id, lambda: TinkerModel(base_path, lora))
        rec = ModelRecord(owner_name(), sid, base_ref, base_path, lora, vocab, positions, worker)
        self.models[model_id] = rec
        return rec

    def _base(self, base_ref: str) -> tuple[str, int, int]:
        from transformers import AutoConfig

        path = self.resolve_model(base_ref, "base_model")
        config = AutoConfig.from_pretrained(path)
        text = getattr(config, "text_config", None) or config
        return path, int(text.vocab_size), int(getattr(text, "max_position_embeddings", None) or 1 << 20)

    def model(self, model_id: str) -> ModelRecord:
        rec = self.models.get(model_id)
        if rec is None or not can_see(rec.owner):
            raise NotFound(f"model_id: unknown model {model_id!r}")
        self.session(rec.session_id)
        return rec

    def sampler(self, sampler_id: str) -> SamplerRecord:
        rec = self.samplers.get(sampler_id)
        if rec is None or not can_see(rec.owner):
            raise NotFound(f"sampling_session_id: unknown sampling session {sampler_id!r}")
        return rec

    def sampler_of_model(self, rec: ModelRecord, live: bool) -> tuple[str, SamplerRecord]:
        sampler_id = f"samp-{uuid.uuid4().hex}"
        sampler = SamplerRecord(rec.owner, rec.base_ref, rec.base_path, rec.vocab_size, rec.max_positions,
                                rec.worker, live=live)
        self.samplers[sampler_id] = sampler
        return sampler_id, sampler

    def new_sampler(self, sid: str, base_ref: str | None, model_path: str | None) -> str:
        s = self.session(sid)
        sampler_id = f"samp-{uuid.uuid4().hex}"
        if model_path:
            directory, meta = self.checkpoint(model_path, "model_path")
            base_ref = meta["base_model"]
            lora = LoraSpec(**meta["lora"])
            base_path, vocab, positions = self._base(base_ref)

            def build():
                m = TinkerModel(base_path, lora)
                m.load(directory, with_optimizer=False)
                return m
        elif base_ref:
            base_path, vocab, positions = self._base(base_ref)
            lora = None

            def build():
                return TinkerModel(base_path, None)
        else:
            raise BadRequest("model_path or base_model: one is required")
        worker = self._add_worker(s, sampler_id, build)
        self.samplers[sampler_id] = SamplerRecord(owner_name(), base_ref, base_path, vocab, positions, worker,
                                                  model_path=model_path, live=True)
        return sampler_id

    # -- tinker:// checkpoints -----------------------------------------------------------------------------
    def checkpoint_dir(self, model_id: str, kind: str, name: str | None) -> tuple[Path, str]:
        """Where a model's checkpoint NAME goes, and its tinker:// path (a name of our own when none)."""
        name = name or f"ckpt-{uuid.uuid4().hex[:12]}"
        if not CHECKPOINT_NAME.fullmatch(name):
            raise BadRequest(f"path: {name!r} is not a checkpoint name (letters, digits, '.', '_', '-'; "
                             "at most 128; no '/')")
        return self.root / model_id.replace(":", "-") / kind / name, f"tinker://{model_id}/{kind}/{name}"

    def checkpoint(self, path: str, field_name: str = "path") -> tuple[Path, dict]:
        """A tinker:// path's directory and its record, if it exists and the caller may read it."""
        parts = path.removeprefix("tinker://").split("/") if path.startswith("tinker://") else []
        if len(parts) != 3 or not RUN_ID.fullmatch(parts[0]) or parts[1] not in KINDS \
                or not CHECKPOINT_NAME.fullmatch(parts[2]):
            raise BadRequest(f"{field_name}: {path!r} is not a tinker://RUN/weights/NAME or "
                             "tinker://RUN/sampler_weights/NAME path of this service")
        directory = self.root / parts[0].replace(":", "-") / parts[1] / parts[2]
        try:
            meta = json.loads((directory / "tinker.json").read_text())
        except (OSError, ValueError):
            meta = None
        if meta is None or not can_see(meta.get("owner")):
            raise NotFound(f"{field_name}: no checkpoint {path!r}")
        return directory, meta

    # -- training runs (the REST client's listing): a run is a model id; its record outlives the session --
    def _run_checkpoints(self, run_dir: Path) -> list[dict]:
        """A run directory's checkpoints the caller may read, oldest first, as the SDK's Checkpoint."""
        found = []
        for kind in KINDS:
            for directory in sorted((run_dir / kind).glob("*")):
                try:
                    meta = json.loads((directory / "tinker.json").read_text())
                except (OSError, ValueError):
                    continue
                if not can_see(meta.get("owner")):
                    continue
                found.append({"checkpoint_id": f"{kind}/{directory.name}",
                              "checkpoint_type": "training" if kind == "weights" else "sampler",
                              "time": _iso(meta["created"]), "tinker_path": f"tinker://{meta['model_id']}/{kind}/"
                              f"{directory.name}", "size_bytes": sum(f.stat().st_size for f in directory.iterdir()),
                              "public": False, "_meta": meta})
        return sorted(found, key=lambda c: c["time"])

    def _training_run(self, run_id: str, checkpoints: list[dict]) -> dict | None:
        rec = self.models.get(run_id)
        if rec is not None and can_see(rec.owner):
            owner, base, rank = rec.owner, rec.base_ref, rec.lora.rank
            last = time.time() - (time.monotonic() - rec.worker.last_used)
        elif checkpoints:
            meta = checkpoints[-1]["_meta"]
            owner, base, rank, last = meta["owner"], meta["base_model"], meta["lora"]["rank"], meta["created"]
        else:
            return None
        public = [{k: v for k, v in c.items() if k != "_meta"} for c in checkpoints]
        latest = {t: next((c for c in reversed(public) if c["checkpoint_type"] == t), None)
                  for t in ("training", "sampler")}
        return {"training_run_id": run_id, "base_model": base, "model_owner": owner or "", "is_lora": True,
                "lora_rank": rank, "corrupted": False, "last_request_time": _iso(last),
                "last_checkpoint": latest["training"], "last_sampler_checkpoint": latest["sampler"]}

    def training_runs(self) -> list[dict]:
        """The caller's runs (its resident models, and every model that saved a checkpoint), newest first."""
        ids = {d.name.replace("-train-", ":train:") for d in self.root.glob("*-train-*")} | set(self.models)
        runs = [self.training_run(i, missing_ok=True) for i in ids if RUN_ID.fullmatch(i)]
        return sorted((r for r in runs if r), key=lambda r: r["last_request_time"], reverse=True)

    def training_run(self, run_id: str, missing_ok: bool = False) -> dict | None:
        run = None
        if RUN_ID.fullmatch(run_id):
            run = self._training_run(run_id, self._run_checkpoints(self.root / run_id.replace(":", "-")))
        if run is None and not missing_ok:
            raise NotFound(f"training_run_id: unknown training run {run_id!r}")
        return run

    def checkpoints(self, run_id: str) -> list[dict]:
        self.training_run(run_id)  # an unknown (or another user's) run is a 404, not an empty list
        return [{k: v for k, v in c.items() if k != "_meta"}
                for c in self._run_checkpoints(self.root / run_id.replace(":", "-"))]

    def checkpoint_meta(self, rec: ModelRecord, model_id: str) -> dict:
        return {"owner": rec.owner, "model_id": model_id, "base_model": rec.base_ref,
                "lora": rec.lora.__dict__, "created": time.time()}
