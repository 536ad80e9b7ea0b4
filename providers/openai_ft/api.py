"""The OpenAI files and fine-tuning API's logic (its routes: routes.py), on the service's one request path.

A job is validated here (files, model, hyperparameters, the `trl` extension), its file's rows are converted
to the service's normalized rows and stored as the service dataset `FTJOB_ID-train`, and a typed
SupervisedFineTuneRequest / PreferenceOptimizeRequest named FTJOB_ID goes through
`FsdpJobService.submit_job`, as a post-training request does: the same checks, launchers, job store and
checkpoints, so Llama Stack's API, the CLI and the dashboard show the job under its `ftjob-...` id.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import re
import secrets
import shutil
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import access
from ..api.multipart import read_multipart
from ..api.requests import LoraFinetuningConfig, PreferenceOptimizeRequest, SupervisedFineTuneRequest
from ..errors import BadRequest, ClientError, NotFound, client_errors, first_validation_error
from ..jobs.store import ACTIVE, UnknownJobError
from ..state_files import load_state
from ..remote_fsdp.service.jobs import FsdpJobService
from ..remote_fsdp.service.quota import USER, bytes_under, quotas_of
from ..remote_fsdp.service.security import DiskQuota, QuotaExceeded, temp_path
from ..graders import openai_method_to_graders
from ..training.run_files import RunFiles
from .formats import (
    KINDS,
    MAX_LINE_BYTES,
    choose_hyperparameters,
    iter_rows,
    openai_status,
    service_row,
    validate_jsonl,
)
from .continuation import merge_in_child, merged_bytes
from .errors import ApiError, openai_errors
from .store import FtState, link_model_files

ORG = "local"  # the `<org>` of ft: ids and organization_id: this service has no organisations
SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")
STARTED = "Fine-tuning job started"
PAUSE_WAIT_S = 120  # how long pause waits for a running job's checkpoint before it stops the job anyway
OWN_FIELDS = {"n_epochs", "data_config", "optimizer_config", "seed", "learning_rate"}  # set by hyperparameters


def epoch(ts: str | None) -> int | None:
    """An ISO timestamp of the job store as Unix seconds."""
    seconds = iso_seconds(ts)
    return None if seconds is None else int(seconds)


def iso_seconds(ts: str | None) -> float | None:
    """An ISO timestamp of the job store as Unix seconds with their fraction (to order events)."""
    if not ts:
        return None
    try:
        return datetime.fromisoformat(str(ts).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page: the items after the one whose id is `after`, at most `limit`."""
    if after:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


# -- request models ---------------------------------------------------------------------------------------
class TrlOptions(BaseModel):
    """The `trl` key of a job request (the SDK's `extra_body={"trl": {...}}`): what OpenAI's API has no field
    for. `finetuning`: lora (default) or full (supervised; dpo trains the full model); `lora`: the LoRA
    settings (Llama Stack's LoraFinetuningConfig fields); `training_config`: any training_config field of the
    post-training API (max_steps_per_epoch, max_seq_len, save_steps, dtype, fsdp_config, torch_run_config with
    its launcher, scheduling, the speed knobs) except those the hyperparameters set."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    finetuning: Literal["lora", "full"] | None = None
    lora: dict[str, Any] | None = None
    training_config: dict[str, Any] = Field(default_factory=dict)
    # reinforcement: the grpo algorithm_config settings OpenAI has no field for (max_completion_length,
    # temperature, beta, loss_type, scale_rewards, epsilon, num_iterations, row_keyed_sampling)
    grpo: dict[str, Any] | None = None


class JobCreate(BaseModel):
    """The body of POST /fine_tuning/jobs, as the openai SDK sends it, plus `trl`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(min_length=1, max_length=1000)
    training_file: str = Field(max_length=200)
    validation_file: str | None = Field(None, max_length=200)
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    hyperparameters: dict[str, Any] | None = None
    method: dict[str, Any] | None = None
    integrations: list[dict[str, Any]] | None = None
    trl: TrlOptions = Field(default_factory=TrlOptions)


# -- the API ----------------------------------------------------------------------------------------------
class OpenAIFineTuning:
    """Files and fine-tuning jobs over one FsdpJobService."""

    def __init__(self, service: FsdpJobService):
        self.service = service
        self.state = FtState(service.data_dir)
        self.models_lock = threading.Lock()  # one continuation model made at a time (a merge loads a model)
        self.fresh_models: set[str] = set()  # continuation models made for a job not submitted yet
        self.file_owners: dict[str, str | None] = {}  # file id -> its owner, for the quotas
        quotas = quotas_of(service)
        if quotas is not None:  # what users hold here: their files, and the models made from their jobs
            quotas.sources.append(self.held_by_users)

    # files
    def file_object(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {k: meta.get(k) for k in ("id", "bytes", "created_at", "filename", "purpose", "status",
                                          "status_details", "expires_at")} | {"object": "file"}

    async def upload(self, request: Request) -> dict[str, Any]:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        dest = self.state.blob(file_id)
        tmp = temp_path(dest.parent, file_id)
        try:
            self.state.check_room()  # before the body is read
            with DiskQuota.of(self.service.config).reservation(f"file {file_id}") as quota:
                quota.expect(_declared_length(request))
                form = await read_multipart(request, "file", tmp, quota)
                purpose = form.fields.get("purpose")
                if purpose != "fine-tune":
                    raise ApiError(400, f"purpose: {str(purpose)[:50]!r} is not accepted here; this service "
                                        "takes purpose=fine-tune (JSONL training and validation files)", "purpose")
                info = await asyncio.to_thread(validate_jsonl, tmp)
                meta = {"id": file_id, "bytes": tmp.stat().st_size, "created_at": int(time.time()),
                        "filename": form.filename, "purpose": "fine-tune", "status": "processed",
                        "status_details": None, "expires_at": None, "kind": info["kind"], "rows": info["rows"]}
                with self.state.lock:  # uploads ending at once: the one past the cap is refused
                    self.state.check_room()
                    tmp.replace(dest)
                    self.state.put_file(meta)
        finally:
            tmp.unlink(missing_ok=True)
        return self.file_object(meta)

    def result_file(self, job_id: str, text: str, owner: str | None) -> str:
        """Store a job's results CSV as a file (purpose fine-tune-results) of the job's owner; its id."""
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.state.blob(file_id).write_text(text)
        self.state.put_file({"id": file_id, "bytes": len(text.encode()), "created_at": int(time.time()),
                             "filename": f"{job_id}-results.csv", "purpose": "fine-tune-results",
                             "status": "processed", "status_details": None, "expires_at": None, "kind": "results",
                             "owner": owner})
        return file_id

    def delete_file(self, file_id: str) -> dict[str, Any]:
        self.state.get_file(file_id)
        for rec in self.state.list_jobs():
            if file_id in (rec["training_file"], rec.get("validation_file")) and self._core_status(rec) in ACTIVE:
                raise ApiError(409, f"file_id: {file_id} is the data of {rec['id']}, which is still running; "
                                    "cancel it first", "file_id")
        self.state.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # jobs
    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            req = JobCreate.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            raise ApiError(400, first_validation_error(e), ".".join(map(str, first["loc"])) or None) from None
        rl: dict[str, Any] = {}
        if isinstance(req.method, dict) and req.method.get("type") == "reinforcement":
            method_type, given, rl = self._reinforcement(req)
        else:
            method_type, given = self._method(req)
        if req.integrations:
            raise ApiError(400, "integrations: not supported by this service (use trl.training_config's "
                                "logger settings)", "integrations")
        train = self._file(req.training_file, "training_file", method_type)
        val = self._file(req.validation_file, "validation_file", method_type) if req.validation_file else None
        if req.suffix is not None and not SUFFIX.fullmatch(req.suffix):
            raise ApiError(400, f"suffix: {req.suffix[:80]!r} is not 1 to 64 letters, digits, '-' or '_'", "suffix")
        meta = req.metadata or {}
        if len(meta) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in meta.items()):
            raise ApiError(400, "metadata: at most 16 keys of at most 64 characters, values of at most 512",
                           "metadata")
        trl = req.trl
        if method_type == "dpo" and (trl.finetuning == "lora" or trl.lora):
            raise ApiError(400, "trl.finetuning: dpo trains the full model on this service (no LoRA)", "trl.finetuning")
        finetuning = "full" if method_type == "dpo" else (trl.finetuning or "lora")
        clash = sorted(OWN_FIELDS & set(trl.training_config))
        if clash:
            raise ApiError(400, f"trl.training_config: {clash} are set by hyperparameters and seed, not here",
                           "trl.training_config")
        with openai_errors("hyperparameters"):
            hp = choose_hyperparameters(given, method_type, train["rows"], finetuning)
        model = self.base_model(req.model)
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        job_id = f"ftjob-{uuid.uuid4().hex[:24]}"
        base_name = re.sub(r"[^A-Za-z0-9._-]", "-", req.model.split(":")[1] if req.model.startswith("ft:")
                           else req.model.rstrip("/").rsplit("/", 1)[-1])[:64] or "model"
        now = time.time()
        rec = {
            "id": job_id, "created_at": int(now), "t": now, "model": req.model, "base_model": model,
            "training_file": req.training_file, "validation_file": req.validation_file, "suffix": req.suffix,
            "seed": seed, "metadata": req.metadata, "method": method_type, "given": given, "hyperparameters": hp,
            "finetuning": finetuning, "trl": trl.model_dump(), "paused": False, "result_files": [], **rl,
            "fine_tuned_model": f"ft:{base_name}:{ORG}:{req.suffix or ''}:{job_id}",
            "submitted": False, "error": None,
            "events": [{"created_at": int(time.time()), "level": "info",
                        "message": f"Created fine-tuning job: {job_id}"},
                       {"created_at": int(time.time()), "level": "info",
                        "message": f"Validating training file: {req.training_file}"
                                   + (f" and validation file: {req.validation_file}" if val else "")}],
        }
        if rl.get("not_applied"):
            rec["events"].append({"created_at": int(time.time()), "level": "warn", "message":
                                  f"Accepted, not applied by this service: {rl['not_applied']}"})
        self.state.put_job(rec)
        try:
            self._submit(rec, train, val)
        except BaseException:
            self.state.jobs_dir.joinpath(f"{job_id}.json").unlink(missing_ok=True)
            for name in ("train", "validation"):
                self.service.dataset_path(f"{job_id}-{name}").unlink(missing_ok=True)
            raise
        return self.job_object(self.state.get_job(job_id))

    def _reinforcement(self, req: JobCreate) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """A `method.type: reinforcement` job: OpenAI's grader becomes the grpo method's graders; n_epochs,
        batch_size (prompts a step) and learning_rate_multiplier as for the other methods; compute_multiplier
        scales the answers sampled per prompt (8 at 1.0). Returns (method, given, the job record's grpo part)."""
        if req.hyperparameters:
            raise ApiError(400, "hyperparameters: the legacy field is for supervised jobs; use "
                                "method.reinforcement.hyperparameters", "hyperparameters")
        try:
            graders, hp = openai_method_to_graders(req.method)
        except ValueError as e:
            raise ApiError(400, str(e), str(e).split(":", 1)[0]) from None
        given = {k: hp[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier") if hp[k] is not None}
        compute = hp["compute_multiplier"]
        generations = 8 if compute is None else max(2, min(64, round(8 * compute)))
        # No evaluation pass or reasoning budget in this recipe: accepted, reported, not applied.
        ignored = {k: hp[k] for k in ("eval_interval", "eval_samples", "reasoning_effort") if hp[k] is not None}
        clash = sorted({"type", "graders", "num_generations", "peft"} & set(req.trl.grpo or {}))
        if clash:
            raise ApiError(400, f"trl.grpo: {clash} come from method.reinforcement and trl.finetuning/lora, not "
                                "here", "trl.grpo")
        return "reinforcement", given, {
            "graders": [g.model_dump(mode="json") for g in graders], "num_generations": generations,
            "reinforcement_hyperparameters": {
                "compute_multiplier": "auto" if compute is None else compute,
                **{k: "auto" if hp[k] is None else hp[k] for k in ("eval_interval", "eval_samples")},
                "reasoning_effort": hp["reasoning_effort"] or "default"},
            "not_applied": ignored}

    def _method(self, req: JobCreate) -> tuple[str, dict[str, Any]]:
        method = req.method or {"type": "supervised"}
        kind = method.get("type")
        if kind not in ("supervised", "dpo"):
            raise ApiError(400, f"method.type: {str(kind)[:50]!r} is not one of 'supervised', 'dpo'", "method.type")
        unknown = sorted(set(method) - {"type", kind})
        if unknown:
            raise ApiError(400, f"method: {unknown} do not belong to method.type {kind!r}", "method")
        section = method.get(kind) or {}
        if not isinstance(section, dict) or not isinstance(section.get("hyperparameters", {}), dict):
            raise ApiError(400, f"method.{kind}.hyperparameters: must be an object", f"method.{kind}")
        given = dict(section.get("hyperparameters") or {})
        if req.hyperparameters:
            if given:
                raise ApiError(400, "hyperparameters: give them in method.{type}.hyperparameters or in the legacy "
                                    "hyperparameters, not both", "hyperparameters")
            if kind != "supervised":
                raise ApiError(400, "hyperparameters: the legacy field is for supervised jobs; use "
                                    f"method.{kind}.hyperparameters", "hyperparameters")
            given = dict(req.hyperparameters)
        return kind, given

    def _file(self, file_id: str, field: str, method: str) -> dict[str, Any]:
        try:
            meta = self.state.get_file(file_id, field)
        except NotFound as e:
            raise ApiError(400, str(e), field, "invalid_file") from None
        if meta.get("kind") not in KINDS or KINDS[meta["kind"]] != method:
            want = {"supervised": "chat rows ({\"messages\": [... an assistant answer]})",
                    "dpo": "preference rows ({\"input\", \"preferred_output\", \"non_preferred_output\"})",
                    "reinforcement": "prompt rows ({\"messages\": [... no assistant message], other fields})"}[method]
            raise ApiError(400, f"{field}: {file_id} holds {meta.get('kind')} rows; a {method} job takes {want}",
                           field, "invalid_file")
        return meta

    def base_model(self, model: str) -> str:
        """The directory to train: a model the operator allows, or the model an earlier job trained (`ft:`, a
        checkpoint id), found from that job's records, never from a path the client gives."""
        with openai_errors("model"):
            with client_errors():
                if model.startswith("ft:"):
                    model = self.continuation_model(model)
                return self.service.resolve_model(model, "model")

    def continuation_model(self, ref: str) -> str:
        """An `ft:` model or checkpoint id as a full model directory under DATA_DIR/openai_ft/models (an allowed
        model root): a full model's files hard-linked (copied across file systems), an adapter merged into
        its job's base model in a child process with limits (continuation.merge_in_child). Its bytes are
        claimed from the quotas first (the data dir's and the source job's owner's: 507 past either). Made
        once per id; later jobs reuse it; one this request made is removed if its job is not submitted."""
        rec, src, step = self._ft_source(ref, "model")
        dest = self.state.models_dir / f"{rec['id']}-{'final' if step is None else f'step-{step}'}"
        with self.models_lock:
            if dest.is_dir():
                self.fresh_models.discard(str(dest))  # another job's base now: it stays
                return str(dest)
            tmp = temp_path(dest.parent, dest.name)
            adapter = (src / "adapter_config.json").is_file()
            size = merged_bytes(Path(rec["base_model"])) if adapter else bytes_under(src)
            try:
                with access.acting_for(rec.get("owner")), \
                        DiskQuota.of(self.service.config).reservation(f"model: {ref[:200]}") as claim:
                    claim.expect(size)
                    if adapter:
                        merge_log = dest.parent / f".{dest.name}.merge.log"
                        merge_in_child(src, rec["base_model"], tmp, merge_log)
                        merge_log.unlink()  # kept only when the merge fails
                    else:
                        link_model_files(src, tmp)
                    tmp.rename(dest)
            except QuotaExceeded as e:
                raise ApiError(507, str(e), "model", "quota_exceeded") from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self.fresh_models.add(str(dest))
        return str(dest)

    def _drop_fresh_model(self, model: str) -> None:
        """Remove a continuation model this request made when its job was not submitted (nobody else uses it)."""
        with self.models_lock:
            if model in self.fresh_models:
                self.fresh_models.discard(model)
                shutil.rmtree(model, ignore_errors=True)

    def held_by_users(self):
        """What users hold here (quota.UserQuotas' source): each file by its owner, each continuation model by
        the owner of the job it was made from. A file's owner is read once (records never change hands)."""
        for path in self.state.files_dir.glob("file-*.json"):
            file_id = path.stem
            if file_id not in self.file_owners:
                meta = load_state(path, None)
                if meta is None:
                    continue
                self.file_owners[file_id] = meta.get("owner")
            yield self.file_owners[file_id], self.state.blob(file_id), USER, file_id  # a file never changes
        for d in self.state.models_dir.iterdir():
            if d.name.startswith("."):
                continue
            try:
                with access.acting_as(None):
                    owner = self.state.get_job(d.name[:len("ftjob-") + 24]).get("owner")  # FTJOB_ID-final|step-N
            except NotFound:
                owner = None
            yield owner, d, USER, d.name

    def _submit(self, rec: dict[str, Any], train: dict[str, Any], val: dict[str, Any] | None) -> None:
        """Submit the job: its files' rows converted into the service datasets FTJOB_ID-train/-validation (each
        line claimed from the quotas before it is written), which the job copies into its run dir (claimed
        by submit_job); the dataset copies are removed once the job holds its own (a job spanning nodes
        sends them when it is placed: they stay, counted). On any failure, nothing is left behind: the
        datasets (create_job), and a continuation model this request made."""
        try:
            self._submit_rows(rec, train, val)
        except (QuotaExceeded, ApiError) as e:
            self._drop_fresh_model(rec["base_model"])
            if isinstance(e, ApiError) and e.status != 507:
                raise
            raise ApiError(507, str(e), "training_file", "quota_exceeded") from None  # the copies of training_file
        except BaseException:
            self._drop_fresh_model(rec["base_model"])
            raise
        with self.models_lock:
            self.fresh_models.discard(rec["base_model"])
        nodes = self.service.nodes
        if nodes is None or not (nodes.is_waiting(rec["id"]) or nodes.is_distributed(rec["id"])):
            for name in ("train", "validation"):
                self.service.dataset_path(f"{rec['id']}-{name}").unlink(missing_ok=True)

    def _submit_rows(self, rec: dict[str, Any], train: dict[str, Any], val: dict[str, Any] | None) -> None:
        job_id, hp, trl = rec["id"], rec["hyperparameters"], rec["trl"]
        datasets = {}
        with openai_errors(), DiskQuota.of(self.service.config).reservation(f"job {job_id}: its rows") as claim:
            for name, meta in (("train", train), ("validation", val)):
                if meta is None:
                    continue
                dataset_id = f"{job_id}-{name}"
                path = self.service.dataset_path(dataset_id)
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "w") as out:
                    for n, row in iter_rows(self.state.blob(meta["id"]), MAX_LINE_BYTES):
                        line = json.dumps(service_row(row, meta["kind"], n)) + "\n"
                        claim.add(len(line.encode()))
                        out.write(line)
                datasets[name] = dataset_id
        rows, bs = train["rows"], hp["batch_size"]
        tc = {"n_epochs": hp["n_epochs"], "max_steps_per_epoch": max(1, math.ceil(rows / bs)), "seed": rec["seed"],
              "data_config": {"dataset_id": datasets["train"], "batch_size": bs, "shuffle": True},
              "optimizer_config": {"optimizer_type": "adamw", "lr": hp["learning_rate"], "weight_decay": 0.0,
                                   "num_warmup_steps": 0},
              **trl["training_config"]}
        if "validation" in datasets:
            tc["data_config"]["validation_dataset_id"] = datasets["validation"]
        lora = None
        if rec["finetuning"] == "lora":
            lora = {"type": "LoRA", "lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": False,
                    "apply_lora_to_output": False, "rank": 8, "alpha": 16, **(trl["lora"] or {})}
        with openai_errors("trl"):
            if rec["method"] == "reinforcement":
                algorithm = {"type": "grpo", "graders": rec["graders"], "num_generations": rec["num_generations"],
                             **(trl.get("grpo") or {})}
                if lora:
                    algorithm["peft"] = lora
                req = PreferenceOptimizeRequest(
                    job_uuid=job_id, finetuned_model=job_id, model=rec["base_model"], training_config=tc,
                    algorithm_config=algorithm)
                route = "preference-optimize"
            elif rec["method"] == "dpo":
                req = PreferenceOptimizeRequest(
                    job_uuid=job_id, finetuned_model=job_id, model=rec["base_model"], training_config=tc,
                    algorithm_config={"type": "dpo", "beta": hp["beta"]})
                route = "preference-optimize"
            else:
                req = SupervisedFineTuneRequest(job_uuid=job_id, model=rec["base_model"], training_config=tc,
                                                algorithm_config=LoraFinetuningConfig(**lora) if lora else None)
                route = "supervised-fine-tune"
            # The event first: an idle service starts the job at once, and its start must come after this
            self.state.add_event(job_id, "Files validated, moving job to queued state")
            try:
                self.service.submit_job(route, req)
            except ClientError as e:  # the grader's fields by the names this API's request gave them
                grader = "algorithm_config.graders[0]"
                if rec["method"] != "reinforcement" or not str(e).startswith(grader):
                    raise
                raise ApiError(e.status, "method.reinforcement.grader" + str(e)[len(grader):],
                               "method.reinforcement.grader") from None
        with self.state.lock:
            rec = self.state.get_job(job_id)
            rec["submitted"] = True
            self.state.put_job(rec)

    def _view(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        if not rec.get("submitted"):
            return None
        try:
            return self.service.job_view(rec["id"])
        except UnknownJobError:
            return None

    def _core_status(self, rec: dict[str, Any]) -> str | None:
        view = self._view(rec)
        return view["status"] if view else None

    def job_object(self, rec: dict[str, Any], view: dict[str, Any] | None = None) -> dict[str, Any]:
        view = view if view is not None else self._view(rec)
        core = view["status"] if view else None
        status = openai_status(core, rec.get("paused", False))
        res = view["resources_allocated"] if view else {}
        metrics = RunFiles(res["run_dir"]).read_metrics() if res.get("run_dir") else []
        tokens = next((int(m["num_tokens"]) for m in reversed(metrics) if "num_tokens" in m), None)
        error = None
        if status == "failed":
            error = {"code": "training_failed", "message": str(res.get("error") or "training failed (see events)"),
                     "param": None}
        estimated = None
        started = epoch(view.get("started_at")) if view else None
        if status == "running" and started and res.get("step") and res.get("total_steps"):
            estimated = int(started + (time.time() - started) * res["total_steps"] / max(1, res["step"]))
        if status == "succeeded" and not rec.get("result_files"):
            rec = self._write_results(rec, metrics)
        hp = rec["hyperparameters"]
        shown = {k: hp[k] for k in ("batch_size", "learning_rate_multiplier", "n_epochs")}
        method_hp = shown | ({"beta": hp["beta"]} if rec["method"] == "dpo" else {})
        method = {"type": rec["method"], rec["method"]: {"hyperparameters": method_hp}}
        if rec["method"] == "reinforcement":
            method_hp.update({k: v for k, v in rec["reinforcement_hyperparameters"].items() if k not in method_hp})
            method["reinforcement"]["grader"] = rec["graders"][0]
        return {
            "id": rec["id"], "object": "fine_tuning.job", "created_at": rec["created_at"],
            "model": rec["model"], "organization_id": ORG, "status": status, "error": error,
            "fine_tuned_model": rec["fine_tuned_model"] if status == "succeeded" else None,
            "finished_at": epoch(view.get("completed_at")) if view and core not in ACTIVE else None,
            "hyperparameters": shown, "method": method,
            "result_files": rec.get("result_files", []), "seed": rec["seed"],
            "trained_tokens": tokens if status == "succeeded" else None,
            "training_file": rec["training_file"], "validation_file": rec.get("validation_file"),
            "estimated_finish": estimated, "integrations": [], "metadata": rec.get("metadata"),
            "user_provided_suffix": rec.get("suffix"),
            # what this service adds: what "auto" chose, the extension, the job in the service's own terms
            "trl": {"auto_chosen": {k: v for k, v in hp.items() if rec["given"].get(k, "auto") in ("auto", None)},
                    "learning_rate": hp["learning_rate"], "finetuning": rec["finetuning"],
                    "base_model": rec["base_model"],
                    "job_uuid": rec["id"], "step": res.get("step"), "total_steps": res.get("total_steps"),
                    **({"num_generations": rec["num_generations"], "not_applied": rec["not_applied"]}
                       if rec["method"] == "reinforcement" else {}),
                    **{k: v for k, v in rec["trl"].items() if v}},
        }

    def _write_results(self, rec: dict[str, Any], metrics: list[dict[str, Any]]) -> dict[str, Any]:
        """The step metrics as OpenAI's results CSV, stored once as a file (purpose fine-tune-results)."""
        with self.state.lock:
            rec = self.state.get_job(rec["id"])
            if rec.get("result_files"):
                return rec
            out = io.StringIO()
            w = csv.writer(out, lineterminator="\n")
            w.writerow(["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy",
                        "train_mean_token_accuracy", "full_valid_loss", "full_valid_mean_token_accuracy"])
            for m in metrics:
                if "loss" in m:
                    acc = m.get("mean_token_accuracy", "")
                    w.writerow([m["step"], m["loss"], acc, m.get("eval_loss", ""), "", acc, "", ""])
            rec["result_files"] = [self.result_file(rec["id"], out.getvalue(), rec.get("owner"))]
            self.state.put_job(rec)
            return rec

    def events(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        """The job's events, oldest first: creation and validation, start, one metrics event per logged step
        (at the time it was logged), pause and resume, the end (an error event when it failed). Each has
        created_at (Unix seconds), level, type (message or metrics) and data (the metrics; {} for messages)."""
        view = self._view(rec)
        out = [(e.get("t", e["created_at"]), e["level"], "message", e["message"], {}) for e in rec.get("events", [])]
        if view:
            res = view["resources_allocated"]
            started = iso_seconds(view.get("started_at")) or rec["created_at"]
            if view.get("started_at") and (started, STARTED) not in {(e[0], e[3]) for e in out}:
                out.append((started, "info", "message", STARTED, {}))
            total = res.get("total_steps")
            for m in RunFiles(res["run_dir"]).read_metrics() if res.get("run_dir") else []:
                logged = m.get("time", started)
                if "loss" in m:
                    data = {"step": m["step"], "train_loss": m["loss"], "total_steps": total}
                    if "mean_token_accuracy" in m:
                        data["train_mean_token_accuracy"] = m["mean_token_accuracy"]
                    data.update({k: v for k, v in m.items() if k.startswith("rewards/") or k in ("reward", "kl")})
                    out.append((logged, "info", "metrics", f"Step {m['step']}/{total}: training loss={m['loss']:.4f}",
                                data))
                elif "eval_loss" in m:
                    out.append((logged, "info", "metrics", f"Step {m['step']}/{total}: validation loss="
                                f"{m['eval_loss']:.4f}", {"step": m["step"], "valid_loss": m["eval_loss"]}))
            end = iso_seconds(view.get("completed_at")) or time.time()
            status = openai_status(view["status"], rec.get("paused", False))
            if status == "succeeded":
                out.append((end, "info", "message",
                            f"The job has successfully completed; new model: {rec['fine_tuned_model']}", {}))
            elif status == "failed":
                out.append((end, "error", "message", f"The job failed: {res.get('error') or 'see the job log'}", {}))
            elif status == "cancelled":
                out.append((end, "info", "message", "The job was cancelled", {}))
        out.sort(key=lambda e: e[0])  # stable: what was recorded first stays first within the same instant
        return [{"id": f"ftevent-{rec['id'][6:]}-{i}", "object": "fine_tuning.job.event", "created_at": int(t),
                 "level": level, "type": kind, "message": message, "data": data}
                for i, (t, level, kind, message, data) in enumerate(out)]

    def checkpoints(self, rec: dict[str, Any], view: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The job's recorded checkpoints, newest first, each servable under its `ft:...:ckpt-step-N` id."""
        view = view if view is not None else self._view(rec)
        out = []
        by_step = {c["step"]: c for c in (view or {}).get("checkpoints", [])}  # the final model over checkpoint-N
        for c in by_step.values():
            m = c.get("training_metrics") or {}
            out.append({"id": f"ftckpt-{rec['id'][6:]}-{c['step']}", "object": "fine_tuning.job.checkpoint",
                        "created_at": epoch(c.get("created_at")) or rec["created_at"],
                        "fine_tuned_model_checkpoint": f"{rec['fine_tuned_model']}:ckpt-step-{c['step']}",
                        "fine_tuning_job_id": rec["id"], "step_number": c["step"],
                        "metrics": {"step": c["step"], "train_loss": m.get("train_loss"),
                                    "valid_loss": m.get("validation_loss")}})
        return out[::-1]

    def resolve_ft(self, ref: str, field: str) -> str:
        """`ft:<base>:<org>:<suffix>:<job>` (the job's final model) or `...:ckpt-step-N` (a checkpoint) as a
        checkpoint directory; BadRequest naming `field` otherwise."""
        return str(self._ft_source(ref, field)[1])

    def _ft_source(self, ref: str, field: str) -> tuple[dict[str, Any], Path, int | None]:
        """The job record, checkpoint directory and step (None: the final model) an `ft:` id names."""
        parts = ref.split(":")
        step = None
        if len(parts) == 6 and re.fullmatch(r"ckpt-step-\d{1,9}", parts[5]):
            step = int(parts[5].rsplit("-", 1)[1])
            parts = parts[:5]
        if len(parts) != 5:
            raise BadRequest(f"{field}: {ref[:200]!r} is not ft:<base>:<org>:<suffix>:<job id>[:ckpt-step-N]")
        try:
            rec = self.state.get_job(parts[4])
        except NotFound:
            raise BadRequest(f"{field}: no fine-tuned model {ref[:200]!r}") from None
        if ":".join(parts) != rec["fine_tuned_model"]:
            raise BadRequest(f"{field}: no fine-tuned model {ref[:200]!r} (job {rec['id']} made "
                             f"{rec['fine_tuned_model']})")
        view = self._view(rec)
        checkpoints = (view or {}).get("checkpoints", [])
        if step is None:
            if not view or view["status"] != "completed" or not checkpoints:
                raise BadRequest(f"{field}: {ref[:200]!r} is not ready: job {rec['id']} is "
                                 f"{openai_status(view and view['status'], rec.get('paused', False))}")
            return rec, Path(checkpoints[-1]["path"]), None
        found = [c for c in checkpoints if c["step"] == step]
        if not found or not Path(found[-1]["path"]).is_dir():
            raise BadRequest(f"{field}: job {rec['id']} has no checkpoint at step {step} "
                             f"(it has {sorted({c['step'] for c in checkpoints})})")
        return rec, Path(found[-1]["path"]), step

    def job_name(self, job_uuid: str) -> str | None:
        """What the dashboard shows beside a fine-tuning job's id: the `ft:` model it makes (its suffix in it)."""
        try:
            return self.state.get_job(job_uuid)["fine_tuned_model"]
        except NotFound:  # not a fine-tuning job (or another user's)
            return None

    def job_marks(self, job_uuid: str) -> list[dict[str, Any]]:
        """A fine-tuning job's pauses and resumes, oldest first, for the dashboard's job page."""
        try:
            events = self.state.get_job(job_uuid).get("events", [])
        except NotFound:  # not a fine-tuning job (or another user's)
            return []
        return [{"created_at": e["created_at"], "message": e["message"]} for e in events
                if e["message"].startswith(("Job paused", "Job resumed"))]

    def served_models(self) -> list[str]:
        """The `ft:` ids the chat API serves: each succeeded job's model and every job's checkpoints."""
        out = []
        for rec in self.state.list_jobs():
            view = self._view(rec)
            if view is None:
                continue
            if view["status"] == "completed" and view.get("checkpoints"):
                out.append(rec["fine_tuned_model"])
            out += [c["fine_tuned_model_checkpoint"] for c in self.checkpoints(rec, view)]
        return out

    def cancel(self, job_id: str) -> dict[str, Any]:
        rec = self.state.get_job(job_id)
        status = self._core_status(rec)
        if status not in ACTIVE and not (status == "cancelled" and rec.get("paused")):
            raise ApiError(409, f"fine_tuning_job_id: {job_id} is {openai_status(status)}; only queued or running "
                                "jobs are cancelled", "fine_tuning_job_id")
        self.service.cancel_job(job_id)
        with self.state.lock:
            rec = self.state.get_job(job_id)
            rec["paused"] = False
            self.state.put_job(rec)
        return self.job_object(rec)

    async def pause(self, job_id: str) -> dict[str, Any]:
        """Stop a queued or running job so that it can resume: a running job first saves a checkpoint at the end
        of its current step (waiting at most PAUSE_WAIT_S for it, on the event loop: a waiting pause holds no
        worker thread), then its processes are stopped."""
        rec = self.state.get_job(job_id)
        view = self._view(rec)
        status = view["status"] if view else None
        if status not in ACTIVE:
            raise ApiError(409, f"fine_tuning_job_id: {job_id} is {openai_status(status, rec.get('paused'))}; only "
                                "queued or running jobs pause", "fine_tuning_job_id")
        step = await self._pause_checkpoint(job_id, view) if status == "in_progress" else None
        if self._core_status(rec) not in ACTIVE:  # it ended (finished, failed) before it reached a step end
            return self.job_object(rec)
        started = self.service.job_view(job_id).get("started_at")
        await asyncio.to_thread(self.service.cancel_job, job_id, "paused")
        if started:  # the run being paused: its start stays an event (a resumed run has a start of its own)
            self.state.add_event(job_id, STARTED, at=iso_seconds(started))
        message = (f"Job paused with a checkpoint at step {step}; it resumes there" if step is not None else
                   "Job paused; it resumes from its newest checkpoint")
        rec = self.state.add_event(job_id, message, paused=True)
        return self.job_object(rec)

    async def _pause_checkpoint(self, job_id: str, view: dict[str, Any]) -> int | None:
        """Ask the running job for a checkpoint (RunFiles.pause_request) and wait until it is recorded; its
        step, or None when none came in PAUSE_WAIT_S or the job ended first."""
        files = RunFiles(view["resources_allocated"]["run_dir"])
        files.pause_saved.unlink(missing_ok=True)
        files.pause_request.write_text(f"{time.time()}\n")
        deadline = time.monotonic() + PAUSE_WAIT_S
        while time.monotonic() < deadline:
            try:
                return int(files.pause_saved.read_text())
            except (FileNotFoundError, ValueError):  # not yet, or half written
                pass
            if self.service.job_view(job_id)["status"] not in ACTIVE:
                return None
            await asyncio.sleep(0.2)
        return None

    def resume(self, job_id: str) -> dict[str, Any]:
        rec = self.state.get_job(job_id)
        if not rec.get("paused"):
            raise ApiError(409, f"fine_tuning_job_id: {job_id} is {openai_status(self._core_status(rec))}, not "
                                "paused", "fine_tuning_job_id")
        view = self._view(rec)
        if view and view["resources_allocated"].get("run_dir"):
            files = RunFiles(view["resources_allocated"]["run_dir"])
            files.pause_request.unlink(missing_ok=True)  # else the resumed run would pause again at once
            files.pause_saved.unlink(missing_ok=True)
        with openai_errors("fine_tuning_job_id"):
            self.service.resume_job(job_id)
        rec = self.state.add_event(job_id, "Job resumed", paused=False)
        return self.job_object(rec)


def _declared_length(request: Request) -> int:
    try:
        return max(0, int(request.headers.get("content-length", "0")))
    except ValueError:
        return 0
