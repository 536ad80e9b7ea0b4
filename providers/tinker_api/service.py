"""The Tinker API's state: sessions, training models (LoRA adapters on shared bases, each base in its own
worker process behind a BaseWorker), sampling sessions, futures and the `tinker://` checkpoints under
DATA_DIR/tinker. Everything belongs to the user whose key created it; another user's ids answer as missing
ones."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ..access import can_see, current, owner_name
from ..errors import BadRequest, ClientError, NotFound
from ..remote_fsdp.service.quota import DATA_DIR, USER, Held
from ..remote_fsdp.service.security import DiskQuota, QuotaExceeded, bytes_under
from ..state_files import load_state, save_state
from .limits import TinkerLimits
from .types import LoraSpec, UserInputError
from .worker import UNLOAD, BaseProcess, BaseWorker, FutureTable

log = logging.getLogger("providers.tinker_api")

RUN_ID = re.compile(r"[0-9a-f]{32}:train:\d{1,9}")
CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
USER_METADATA_BYTES = 4096  # a run's user_metadata as JSON: a label, not a store
KINDS = {"weights": "weights", "sampler_weights": "sampler_weights"}
LOSS_HISTORY = 500  # losses a model keeps for the dashboard's curve
EPHEMERAL_SAMPLERS = 8  # samplers of a model's own weights kept per model (the SDK makes one per RL step)


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat()


def _read_record(directory: Path) -> dict | None:
    """A checkpoint's record (tinker.json, written last: None while the checkpoint is being written)."""
    try:
        return json.loads((directory / "tinker.json").read_text())
    except (OSError, ValueError):
        return None


class Forbidden(ClientError):
    status = 403  # not 429: the SDK retries a 429 for hours


class Gone(ClientError):
    status = 410  # the SDK resubmits the original request


@dataclass
class Session:
    owner: str | None
    created: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    members: set[str] = field(default_factory=set)  # its training models' and samplers' ids


@dataclass
class ModelRecord:
    """A training model: a LoRA adapter on its base. `version` counts its optimizer steps and loads;
    `saved_version` is the version of its resident save (what an eviction or a shutdown wrote), so a model
    comes back only as it was."""
    owner: str | None
    session_id: str
    base_ref: str  # what the client named (model_name in get_info)
    base_path: str  # the local directory it resolved to (tokenizer_id: loads offline)
    lora: LoraSpec
    vocab_size: int
    max_positions: int
    version: int = 0
    saved_version: int | None = None
    steps: int = 0
    last_loss: float | None = None
    tokens: int = 0
    last_used: float = field(default_factory=time.time)
    adapter: str = ""  # its adapter's name on the base, while resident
    resident: bool = False
    model_id: str = ""
    user_metadata: dict[str, str] | None = None  # the client's, from create_model (bounded: USER_METADATA_BYTES)
    losses: list[float] = field(default_factory=list)  # the last LOSS_HISTORY forward_backward losses (memory only)

    def persisted(self) -> dict:
        return {"owner": self.owner, "session_id": self.session_id, "base_ref": self.base_ref,
                "base_path": self.base_path, "lora": asdict(self.lora), "vocab_size": self.vocab_size,
                "max_positions": self.max_positions, "version": self.version, "saved_version": self.saved_version,
                "steps": self.steps, "last_loss": self.last_loss, "tokens": self.tokens, "last_used": self.last_used,
                "user_metadata": self.user_metadata}


@dataclass
class SamplerRecord:
    """A sampling session: the base (no adapter), a training model's adapter (`model_id`: live, or as of a
    `snapshot`), or a tinker:// checkpoint's adapter (`model_path`, loaded on the base when used)."""
    owner: str | None
    session_id: str
    base_ref: str
    base_path: str
    vocab_size: int
    max_positions: int
    model_id: str | None = None
    model_path: str | None = None
    snapshot: str | None = None  # the key of its weights' snapshot in its base's process (ephemeral), once taken
    live: bool = False  # sample the training model's weights as they are when the request runs
    adapter: str = ""  # a model_path sampler's adapter name on the base, while resident
    resident: bool = False
    last_used: float = field(default_factory=time.time)

    def persisted(self) -> dict | None:
        """Its record on disk; None for an ephemeral snapshot sampler (its weights were only in memory)."""
        if self.snapshot is not None or (self.model_id and not self.live):
            return None
        return {k: getattr(self, k) for k in ("owner", "session_id", "base_ref", "base_path", "vocab_size",
                                              "max_positions", "model_id", "model_path", "live")}


class TinkerService:
    """Sessions, models and samplers of the Tinker API, and where their requests run: one BaseWorker per
    base model, shared by every model on it, each running its base in a worker process of its own (started
    with `child_env()`, the environment of the service's jobs). Records live in DATA_DIR/tinker/state, so a
    restarted service knows every session and model; a model idle for `evict_after_s` (and every model at
    shutdown) is saved to DATA_DIR/tinker/resident and leaves memory, and its next request restores it, as
    after its base's process died."""

    def __init__(self, data_dir: Path, resolve_model, limits: TinkerLimits | None = None,
                 disk_quota: DiskQuota | None = None, child_env: Callable[[], dict[str, str]] | None = None,
                 model_dirs: list[str] | None = None):
        self.dir = data_dir / "tinker"
        self.root = data_dir / "tinker" / "runs"
        self.state_dir = data_dir / "tinker" / "state"
        self.resident_dir = data_dir / "tinker" / "resident"
        self.resolve_model = resolve_model
        self.model_dirs = model_dirs or []  # the operator's --model-dir: get_server_capabilities lists them
        self.limits = limits or TinkerLimits()
        self.disk_quota = disk_quota  # what saves claim before writing (the users' max_data_gb and --max-data-gb)
        if child_env is None:
            from ..jobs.child_env import child_env
        self.child_env = child_env
        self.futures = FutureTable(self.limits.keep_futures)
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, ModelRecord] = {}
        self.samplers: dict[str, SamplerRecord] = {}
        self.bases: dict[str, BaseWorker] = {}
        self.counts = {"requests": 0, "train_tokens": 0, "sampled_tokens": 0}
        for kind in ("sessions", "models", "samplers"):
            (self.state_dir / kind).mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._adapter_names = itertools.count()
        self._stop = threading.Event()
        self._load_records()
        self._expiring: dict[Path, float] = {}  # checkpoint dir -> when it expires (saves with ttl_seconds)
        for meta_file in self.root.glob("*/*/*/tinker.json"):
            self.saved_checkpoint(meta_file.parent, _read_record(meta_file.parent) or {})
        self._janitor = threading.Thread(target=self._maintain, name="tinker-janitor", daemon=True)
        self._janitor.start()

    # -- records on disk -----------------------------------------------------------------------------------
    def _record_path(self, kind: str, rid: str) -> Path:
        return self.state_dir / kind / f"{rid.replace(':', '-')}.json"

    def _save(self, kind: str, rid: str, value: dict | None) -> None:
        if value is not None:
            save_state(self._record_path(kind, rid), {"id": rid, **value})

    def _load_records(self) -> None:
        """Every session, model and sampler of the service's earlier runs: known again, none in memory."""
        for path in sorted(self.state_dir.glob("sessions/*.json")):
            rec = load_state(path, None)
            if rec:
                self.sessions[rec["id"]] = Session(rec["owner"], rec["created"])
        for path in sorted(self.state_dir.glob("models/*.json")):
            rec = load_state(path, None)
            if rec and rec.get("session_id") in self.sessions:
                rid = rec.pop("id")
                self.models[rid] = ModelRecord(**{**rec, "lora": LoraSpec(**rec["lora"]), "model_id": rid})
                self.sessions[rec["session_id"]].members.add(rid)
        for path in sorted(self.state_dir.glob("samplers/*.json")):
            rec = load_state(path, None)
            if rec and rec.get("session_id") in self.sessions:
                rid = rec.pop("id")
                self.samplers[rid] = SamplerRecord(**rec)
                self.sessions[rec["session_id"]].members.add(rid)

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
            s = self.sessions[sid] = Session(owner_name())
        self._save("sessions", sid, {"owner": s.owner, "created": s.created})
        return sid

    def session(self, sid: str) -> Session:
        s = self.sessions.get(sid)
        if s is None or not can_see(s.owner):
            raise NotFound(f"session_id: unknown session {sid!r} (ended, timed out, or never created)")
        s.last_seen = time.monotonic()
        return s

    def end_session(self, sid: str) -> None:
        """The session's models and samplers leave memory and the records; their tinker:// checkpoints stay."""
        with self._lock:
            s = self.sessions.pop(sid, None)
            if s is None:
                return
            gone = [(rid, self.models.pop(rid, None) or self.samplers.pop(rid, None)) for rid in s.members]
        for rid, rec in gone:
            if rec is not None and rec.resident:
                self.bases[rec.base_path].submit(None, lambda host, name=rec.adapter: host.remove(name))
            if isinstance(rec, SamplerRecord):
                self._drop_snapshot(rec)
            kind = "models" if isinstance(rec, ModelRecord) else "samplers"
            self._record_path(kind, rid).unlink(missing_ok=True)
            shutil.rmtree(self.resident_dir / rid.replace(":", "-"), ignore_errors=True)
        self._record_path("sessions", sid).unlink(missing_ok=True)

    def end_idle_sessions(self) -> None:
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if now - s.last_seen > self.limits.session_timeout_s:
                self.end_session(sid)

    def list_sessions(self) -> list[str]:
        """The caller's sessions, oldest first."""
        return [sid for sid, s in sorted(self.sessions.items(), key=lambda kv: kv[1].created) if can_see(s.owner)]

    def sessions_view(self) -> list[dict]:
        """The caller's sessions (an admin's: everyone's) for the dashboard and the CLI, newest first."""
        now = time.monotonic()
        out = []
        for sid, s in sorted(self.sessions.items(), key=lambda kv: -kv[1].created):
            if not can_see(s.owner):
                continue
            models = [{"model_id": rid, "base_model": m.base_ref, "lora_rank": m.lora.rank, "steps": m.steps,
                       "last_loss": m.last_loss, "tokens": m.tokens, "resident": m.resident,
                       "idle_s": round(time.time() - m.last_used, 1), "losses": m.losses}
                      for rid, m in sorted(self.models.items()) if rid in s.members]
            samplers = [{"sampler_id": rid, "base_model": r.base_ref, "model_id": r.model_id,
                         "model_path": r.model_path} for rid, r in self.samplers.items() if rid in s.members]
            out.append({"session_id": sid, "owner": s.owner, "created": _iso(s.created),
                        "idle_s": round(now - s.last_seen, 1), "models": models, "samplers": samplers})
        return out

    def get_session(self, sid: str) -> dict:
        s = self.session(sid)
        return {"training_run_ids": sorted(r for r in s.members if r in self.models),
                "sampler_ids": sorted(r for r in s.members if r in self.samplers), "user_metadata": None}

    def gauges(self) -> dict[str, tuple[str, float]]:
        """/metrics' figures of the Tinker API: name -> (help, value)."""
        return {"trl_tinker_sessions": ("Open Tinker API sessions", len(self.sessions)),
                "trl_tinker_models": ("Training models known (in memory or saved)", len(self.models)),
                "trl_tinker_models_resident": ("Training models in memory",
                                               sum(m.resident for m in list(self.models.values()))),
                "trl_tinker_bases_loaded": ("Base models in memory (each shared by its models)",
                                            sum(w.host is not None for w in list(self.bases.values()))),
                "trl_tinker_requests_queued": ("Requests waiting for their base",
                                               sum(w.queue.qsize() for w in list(self.bases.values()))),
                "trl_tinker_futures_pending": ("Requests not yet answered", self.futures.pending()),
                "trl_tinker_requests_total": ("Requests run on a model", self.counts["requests"]),
                "trl_tinker_train_tokens_total": ("Tokens through forward_backward", self.counts["train_tokens"]),
                "trl_tinker_sampled_tokens_total": ("Tokens sampled", self.counts["sampled_tokens"])}

    # -- where requests run --------------------------------------------------------------------------------
    def _worker(self, base_path: str) -> BaseWorker:
        with self._lock:
            worker = self.bases.get(base_path)
            if worker is None:
                worker = self.bases[base_path] = BaseWorker(base_path, self._start_process, self._lost)
            return worker

    def _start_process(self, base_path: str) -> BaseProcess:
        return BaseProcess(base_path, self.dir, self.child_env())

    def _lost(self, base_path: str) -> None:
        """A base's process died: none of its models and samplers is in memory any more (its thread)."""
        for rec in [*self.models.values(), *self.samplers.values()]:
            if rec.base_path == base_path:
                rec.resident, rec.adapter = False, ""

    def _drop_snapshot(self, sampler: SamplerRecord) -> None:
        """A forgotten sampler's weights snapshot leaves its base's process."""
        if sampler.snapshot is not None and sampler.base_path in self.bases:
            self.bases[sampler.base_path].submit(None, lambda host, key=sampler.snapshot: host.drop_snapshot(key))

    def run_on(self, rec: ModelRecord | SamplerRecord, work: Callable[[BaseProcess, str | None], Any],
               kind: str = "json") -> str:
        """Queue `work(base, adapter_name)` for a model or sampler on its base's worker, with the model (or
        the checkpoint) restored there first if it is not in memory; the request id of its future."""
        rid, fut = self.futures.create(owner_name(), kind)

        def run(host: BaseProcess) -> Any:
            name = self._ensure(host, rec)
            self.counts["requests"] += 1
            return work(host, name)

        self._worker(rec.base_path).submit(fut, run)
        return rid

    def _ensure(self, host: BaseProcess, rec: ModelRecord | SamplerRecord) -> str | None:
        """The adapter `rec` runs with, in memory (its base's thread). A model comes back from its resident
        save, or fresh if it never stepped; one that stepped since its last save (the service was killed, or
        its base's process died) cannot, and says so."""
        rec.last_used = time.time()
        if isinstance(rec, SamplerRecord) and rec.model_id is not None:
            model = self.models.get(rec.model_id)
            if model is None:
                raise UserInputError(f"sampling_session_id: its model {rec.model_id} has ended")
            return self._ensure(host, model)
        if isinstance(rec, SamplerRecord) and rec.model_path is None:
            return None  # the base itself
        if rec.resident and rec.adapter in host.adapters:
            return rec.adapter
        name = f"a{next(self._adapter_names)}"
        if isinstance(rec, SamplerRecord):
            try:
                directory, _ = self.checkpoint(rec.model_path, "model_path", owner=rec.owner)
            except NotFound:
                raise UserInputError(f"model_path: {rec.model_path} is gone (deleted, or past its ttl_seconds)") \
                    from None
            host.add(name, None, directory)
        else:
            model_id = rec.model_id
            saved = self.resident_dir / model_id.replace(":", "-")
            if rec.saved_version is not None and rec.saved_version == rec.version:
                host.add(name, rec.lora, saved, with_optimizer=True, version=rec.version)
            elif rec.version == 0:
                host.add(name, rec.lora)
            else:
                raise UserInputError(
                    f"model_id: {model_id} lost its weights when the service (or its base's worker process) "
                    "stopped without saving them "
                    f"({rec.version - (rec.saved_version or 0)} optimizer steps or loads since its last save); "
                    "load_weights from your last checkpoint (create_training_client_from_state)")
        rec.adapter, rec.resident = name, True
        return name

    def _maintain(self) -> None:
        """Every few seconds: end sessions without heartbeat, save and evict idle models, drop idle bases,
        delete expired checkpoints."""
        period = max(0.5, min(30.0, self.limits.evict_after_s / 4))
        while not self._stop.wait(period):
            try:
                self.end_idle_sessions()
                self.evict_idle(self.limits.evict_after_s)
                self.expire_checkpoints()
            except Exception:  # noqa: BLE001 - the janitor must outlive one bad round
                log.exception("tinker janitor")

    def evict_idle(self, idle_s: float) -> None:
        """Save (to DATA_DIR/tinker/resident) and drop every model unused for `idle_s`, except one holding
        gradients not yet stepped; then end the processes of bases left without a model and unused as long
        (their memory returns to the system)."""
        cutoff = time.time() - idle_s
        for model_id, rec in list(self.models.items()):
            if rec.resident and rec.last_used <= cutoff:
                self._submit_evict(model_id, rec)
        for sampler_id, rec in list(self.samplers.items()):
            if rec.resident and rec.last_used <= cutoff:
                self.bases[rec.base_path].submit(None, lambda host, r=rec: self._drop(host, r))
        for worker in list(self.bases.values()):
            if time.monotonic() - worker.last_used >= idle_s:
                worker.submit(None, UNLOAD)

    def _submit_evict(self, model_id: str, rec: ModelRecord) -> None:
        def evict(host: BaseProcess) -> None:
            if not rec.resident or rec.adapter not in host.adapters or host.has_gradients(rec.adapter):
                return
            saved = self.resident_dir / model_id.replace(":", "-")
            host.save(rec.adapter, saved, with_optimizer=True, meta={"model_id": model_id, "version": rec.version})
            rec.saved_version = rec.version
            self._save("models", model_id, rec.persisted())
            self._drop(host, rec)

        self.bases[rec.base_path].submit(None, evict)

    @staticmethod
    def _drop(host: BaseProcess, rec: ModelRecord | SamplerRecord) -> None:
        host.remove(rec.adapter)
        rec.resident, rec.adapter = False, ""

    def shutdown(self) -> None:
        """Every resident model saved (a restarted service restores them), then the workers and their
        processes stop (each worker's thread runs its queued saves first)."""
        self._stop.set()
        self.evict_idle(0.0)
        for worker in list(self.bases.values()):
            worker.stop(wait_s=120)

    # -- models --------------------------------------------------------------------------------------------
    def _add_member(self, s: Session, rid: str) -> None:
        """A training model or a sampler of its own (base or checkpoint) joins the session, within its limit
        (a model's ephemeral samplers do not count: _add_ephemeral bounds them)."""
        held = [m for m in s.members if m in self.models or (m in self.samplers and self.samplers[m].model_id is None)]
        if len(held) >= self.limits.max_models_per_session:
            raise Forbidden(f"session: already holds {len(held)} models and samplers "
                            f"(at most {self.limits.max_models_per_session})")
        s.members.add(rid)

    def _add_ephemeral(self, s: Session, rid: str, sampler: SamplerRecord) -> None:
        """A model's sampler of its current or snapshot weights (one per RL step in the cookbook's loops): the
        newest EPHEMERAL_SAMPLERS of each model are kept, older ones (and their snapshots) are forgotten."""
        mine = [m for m in s.members if m in self.samplers and self.samplers[m].model_id == sampler.model_id]
        for old in sorted(mine, key=lambda m: self.samplers[m].last_used)[:max(0, len(mine) - EPHEMERAL_SAMPLERS + 1)]:
            s.members.discard(old)
            self._drop_snapshot(self.samplers.pop(old))
            self._record_path("samplers", old).unlink(missing_ok=True)
        s.members.add(rid)
        self.samplers[rid] = sampler

    def new_model(self, sid: str, model_seq_id: int, base_ref: str, lora: LoraSpec,
                  user_metadata: dict[str, str] | None = None) -> ModelRecord:
        s = self.session(sid)
        if user_metadata is not None and len(json.dumps(user_metadata)) > USER_METADATA_BYTES:
            raise BadRequest(f"user_metadata: {len(json.dumps(user_metadata))} bytes as JSON, over this "
                             f"service's limit of {USER_METADATA_BYTES}")
        model_id = f"{sid}:train:{model_seq_id}"
        if model_id in self.models:
            raise BadRequest(f"model_seq_id: {model_seq_id} is already a model of this session")
        if not 1 <= lora.rank <= self.limits.max_lora_rank:
            raise BadRequest(f"lora_config.rank: {lora.rank} is outside 1..{self.limits.max_lora_rank}")
        base_path, vocab, positions = self._base(base_ref)
        with self._lock:
            self._add_member(s, model_id)
            rec = self.models[model_id] = ModelRecord(owner_name(), sid, base_ref, base_path, lora, vocab, positions,
                                                      model_id=model_id, user_metadata=user_metadata)
        self._save("models", model_id, rec.persisted())
        return rec

    def stepped(self, rec: ModelRecord, loss: float | None = None, tokens: int = 0, step: bool = False,
                loaded: bool = False) -> None:
        """What a request did to a model (its base's thread): counted, and the record kept on disk when its
        weights changed."""
        rec.tokens += tokens
        self.counts["train_tokens"] += tokens
        if loss is not None:
            rec.last_loss = loss
            rec.losses = [*rec.losses[-(LOSS_HISTORY - 1):], loss]
        if step or loaded:
            rec.version += 1
            rec.steps += step
            self._save("models", rec.model_id, rec.persisted())

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
        s = self.session(rec.session_id)
        sampler_id = f"samp-{uuid.uuid4().hex}"
        sampler = SamplerRecord(rec.owner, rec.session_id, rec.base_ref, rec.base_path, rec.vocab_size,
                                rec.max_positions, model_id=rec.model_id, live=live)
        with self._lock:
            self._add_ephemeral(s, sampler_id, sampler)
        self._save("samplers", sampler_id, sampler.persisted())
        return sampler_id, sampler

    def new_sampler(self, sid: str, base_ref: str | None, model_path: str | None) -> str:
        s = self.session(sid)
        sampler_id = f"samp-{uuid.uuid4().hex}"
        if model_path:
            _, meta = self.checkpoint(model_path, "model_path")
            base_ref = meta["base_model"]
        elif not base_ref:
            raise BadRequest("model_path or base_model: one is required")
        base_path, vocab, positions = self._base(base_ref)
        sampler = SamplerRecord(owner_name(), sid, base_ref, base_path, vocab, positions, model_path=model_path,
                                live=True)
        with self._lock:
            self._add_member(s, sampler_id)
            self.samplers[sampler_id] = sampler
        self._save("samplers", sampler_id, sampler.persisted())
        return sampler_id

    # -- tinker:// checkpoints -----------------------------------------------------------------------------
    def checkpoint_dir(self, model_id: str, kind: str, name: str | None) -> tuple[Path, str]:
        """Where a model's checkpoint NAME goes, and its tinker:// path (a name of our own when none)."""
        name = name or f"ckpt-{uuid.uuid4().hex[:12]}"
        if not CHECKPOINT_NAME.fullmatch(name):
            raise BadRequest(f"path: {name!r} is not a checkpoint name (letters, digits, '.', '_', '-'; "
                             "at most 128; no '/')")
        return self.root / model_id.replace(":", "-") / kind / name, f"tinker://{model_id}/{kind}/{name}"

    def checkpoint(self, path: str, field_name: str = "path", owner: str | None | bool = False) -> tuple[Path, dict]:
        """A tinker:// path's directory and its record, if it exists and the caller (or `owner`, when given:
        a worker thread has no caller) may read it."""
        parts = path.removeprefix("tinker://").split("/") if path.startswith("tinker://") else []
        if len(parts) != 3 or not RUN_ID.fullmatch(parts[0]) or parts[1] not in KINDS \
                or not CHECKPOINT_NAME.fullmatch(parts[2]):
            raise BadRequest(f"{field_name}: {path!r} is not a tinker://RUN/weights/NAME or "
                             "tinker://RUN/sampler_weights/NAME path of this service")
        directory = self.root / parts[0].replace(":", "-") / parts[1] / parts[2]
        meta = _read_record(directory)
        if meta is not None and self._expire(directory, meta):
            meta = None
        visible = can_see(meta.get("owner")) if meta is not None and owner is False else \
            meta is not None and (owner is None or meta.get("owner") == owner)
        if not visible:
            raise NotFound(f"{field_name}: no checkpoint {path!r}")
        return directory, meta

    # -- training runs (the REST client's listing): a run is a model id; its record outlives the session --
    def _run_checkpoints(self, run_dir: Path) -> list[dict]:
        """A run directory's checkpoints the caller may read, oldest first, as the SDK's Checkpoint."""
        found = []
        for kind in KINDS:
            for directory in sorted((run_dir / kind).glob("*")):
                meta = _read_record(directory)
                if meta is None or not can_see(meta.get("owner")) or self._expire(directory, meta):
                    continue
                expires = meta.get("expires")
                found.append({"checkpoint_id": f"{kind}/{directory.name}",
                              "checkpoint_type": "training" if kind == "weights" else "sampler",
                              "time": _iso(meta["created"]), "tinker_path": f"tinker://{meta['model_id']}/{kind}/"
                              f"{directory.name}", "size_bytes": sum(f.stat().st_size for f in directory.iterdir()),
                              "public": False, "expires_at": _iso(expires) if expires else None, "_meta": meta})
        return sorted(found, key=lambda c: c["time"])

    def _training_run(self, run_id: str, checkpoints: list[dict]) -> dict | None:
        rec = self.models.get(run_id)
        if rec is not None and can_see(rec.owner):
            owner, base, rank, last = rec.owner, rec.base_ref, rec.lora.rank, rec.last_used
            user_metadata = rec.user_metadata
        elif checkpoints:
            meta = checkpoints[-1]["_meta"]
            owner, base, rank, last = meta["owner"], meta["base_model"], meta["lora"]["rank"], meta["created"]
            user_metadata = meta.get("user_metadata")
        else:
            return None
        public = [{k: v for k, v in c.items() if k != "_meta"} for c in checkpoints]
        latest = {t: next((c for c in reversed(public) if c["checkpoint_type"] == t), None)
                  for t in ("training", "sampler")}
        return {"training_run_id": run_id, "base_model": base, "model_owner": owner or "", "is_lora": True,
                "lora_rank": rank, "corrupted": False, "last_request_time": _iso(last),
                "last_checkpoint": latest["training"], "last_sampler_checkpoint": latest["sampler"],
                "user_metadata": user_metadata}

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

    def checkpoint_meta(self, rec: ModelRecord, ttl_seconds: int | None = None) -> dict:
        """A checkpoint's record (tinker.json); with `ttl_seconds`, when it expires."""
        meta = {"owner": rec.owner, "model_id": rec.model_id, "base_model": rec.base_ref,
                "lora": rec.lora.__dict__, "created": time.time(), "user_metadata": rec.user_metadata}
        if ttl_seconds is not None:
            meta["expires"] = meta["created"] + self._checked_ttl(ttl_seconds)
        return meta

    def _checked_ttl(self, ttl_seconds: int) -> int:
        """A ttl_seconds within the service's bounds (the save's and set_checkpoint_ttl's alike)."""
        low, high = self.limits.min_checkpoint_ttl_s, self.limits.max_checkpoint_ttl_s
        if not low <= ttl_seconds <= high:
            raise BadRequest(f"ttl_seconds: {ttl_seconds} is outside {low}..{high} (None: never expires)")
        return ttl_seconds

    def set_checkpoint_ttl(self, run_id: str, checkpoint_id: str, ttl_seconds: int | None) -> None:
        """The REST client's set_checkpoint_ttl: the caller's own checkpoint KIND/NAME now expires
        `ttl_seconds` from now (None: never); another user's answers as a missing one."""
        directory, meta = self.checkpoint(f"tinker://{run_id}/{checkpoint_id}", "checkpoint_id")
        meta.pop("expires", None)
        if ttl_seconds is not None:
            meta["expires"] = time.time() + self._checked_ttl(ttl_seconds)
        partial = directory / "tinker.json.partial"
        partial.write_text(json.dumps(meta))
        partial.replace(directory / "tinker.json")  # whole or not at all: a reader never sees half a record
        self.saved_checkpoint(directory, meta)

    def base_models(self) -> list[str]:
        """The base models this service can load: those under its --model-dir folders."""
        from ..cluster.nodes import models_on_disk

        return models_on_disk(self.model_dirs)

    # -- expiry and deletion -------------------------------------------------------------------------------
    def saved_checkpoint(self, directory: Path, meta: dict) -> None:
        """A checkpoint written (or found at start-up): the sweep knows when it expires, if ever."""
        with self._lock:
            if meta.get("expires"):
                self._expiring[directory] = meta["expires"]
            else:
                self._expiring.pop(directory, None)

    def _expire(self, directory: Path, meta: dict) -> bool:
        """Whether the checkpoint is past its expiry; if so it is deleted now."""
        if not meta.get("expires") or meta["expires"] > time.time():
            return False
        shutil.rmtree(directory, ignore_errors=True)
        with self._lock:
            self._expiring.pop(directory, None)
        return True

    def expire_checkpoints(self) -> None:
        """Delete every checkpoint past its expiry (the janitor's sweep)."""
        now = time.time()
        with self._lock:
            due = [d for d, when in self._expiring.items() if when <= now]
        for directory in due:
            meta = _read_record(directory) or {}  # overwritten since without a ttl: it stays
            if not self._expire(directory, meta):
                self.saved_checkpoint(directory, meta)

    def delete_checkpoint(self, run_id: str, checkpoint_id: str) -> None:
        """The REST client's delete_checkpoint: the caller's own checkpoint KIND/NAME of run `run_id`."""
        directory, _ = self.checkpoint(f"tinker://{run_id}/{checkpoint_id}", "checkpoint_id")
        shutil.rmtree(directory)
        with self._lock:
            self._expiring.pop(directory, None)

    # -- disk quota ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def disk_claim(self, owner: str | None, nbytes: int, directory: Path, what: str) -> Iterator[None]:
        """Claim what a save into `directory` adds (less what it replaces there) from `owner`'s quota before
        writing; past the quota the request fails naming it (nothing written)."""
        nbytes = max(0, nbytes - bytes_under(directory))
        if self.disk_quota is None or not nbytes:
            yield
            return
        try:
            self.disk_quota.reserve(nbytes, what, owner)
        except QuotaExceeded as e:
            raise UserInputError(str(e)) from None
        try:
            yield
        finally:
            self.disk_quota.release(nbytes, owner)

    def held_by_users(self) -> Iterator[Held]:
        """What users hold here (quota.UserQuotas' source): each checkpoint by its owner, each resident save
        (an evicted model's) by its model's owner; both count against --max-data-gb too (DATA_DIR/tinker is
        not one of the data dir quota's own dirs)."""
        for meta_file in self.root.glob("*/*/*/tinker.json"):
            meta = _read_record(meta_file.parent)
            if meta is not None:
                # a rewritten checkpoint is created anew: its size is read again
                yield meta.get("owner"), meta_file.parent, USER | DATA_DIR, meta.get("created")
        for model_id, rec in list(self.models.items()):
            saved = self.resident_dir / model_id.replace(":", "-")
            if rec.saved_version is not None:
                yield rec.owner, saved, USER | DATA_DIR, rec.saved_version
