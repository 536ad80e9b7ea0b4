"""Workflow tasks of the training service: data enhancement, validation, export, and the one-call
pipeline enhance -> train -> validate -> export.

Each task has a directory DATA_DIR/workflows/KIND/ID/ with its state in task.json (state, timestamps,
progress, outputs, error) beside its outputs. Enhancement runs in a thread of the service (it waits on
HTTP: the student, judge and teacher, which may be this service's own chat API); validation and export
run as child processes (their own memory, and cancel kills them); training is an ordinary job.
Tasks that were running when the service stopped go on when it starts again (enhancement resumes at
the first unfinished row).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import BadRequest, Conflict
from ..api.paths import check_path_text, owned
from ..api.requests import (
    DPOAlignmentConfig,
    PeftFinetuningConfig,
    PreferenceOptimizeRequest,
    SupervisedFineTuneRequest,
    TrainingConfig,
)
from ..enhance import EnhanceConfig, enhance_rows
from ..export.hub import HubSettings, hub_target
from ..jobs.child_env import child_env
from ..jobs.store import ACTIVE, UnknownJobError
from ..remote_fsdp.service.jobs import FsdpJobService
from ..serving.engine import adapter_base, is_adapter
from .. import access
from ..state_files import load_state, save_state
from ..training.keys import KnownKeys
from ..training.run_files import utc_now
from ..training.spec import SAFE_NAME

log = logging.getLogger("providers.remote_fsdp")

MAX_ROWS = 200_000
MAX_PROMPTS = 5_000
REPO_ROOT = Path(__file__).resolve().parents[3]


class _Strict(KnownKeys):  # an unknown key is an error naming the nearest accepted one
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class EnhanceRequest(_Strict):
    enhancement_id: str = Field(pattern=SAFE_NAME)
    config: EnhanceConfig
    dataset_id: str | None = None  # a dataset uploaded to this service
    rows: list[dict[str, Any]] | None = Field(None, max_length=MAX_ROWS)  # or the rows inline

    @model_validator(mode="after")
    def _one_source(self):
        if (self.rows is None) == (self.dataset_id is None):
            raise BadRequest("dataset_id/rows: give exactly one")
        return self


class ValidationSettings(_Strict):
    prompts: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_PROMPTS)  # held-out rows
    base_model: str | None = None  # default: the adapter's base (none for a full model)
    max_new_tokens: int = Field(64, ge=1, le=2048)
    match: Literal["exact", "normalized", "contains"] = "normalized"
    min_pass_rate: float | None = Field(None, ge=0, le=1)  # the bar; None: validation.verdict's default (0.5)
    alpha: float = Field(0.05, gt=0, lt=1)  # significance of the gain over the base (one-sided exact McNemar)
    compare_base: bool = True


class ValidationRequest(ValidationSettings):
    validation_id: str = Field(pattern=SAFE_NAME)
    model: str


class ExportSettings(_Strict):
    formats: list[Literal["merged", "gguf", "hub"]] = Field(default_factory=lambda: ["merged", "gguf"], min_length=1)
    gguf_dtype: Literal["f32", "f16", "bf16"] = "f16"
    hub: HubSettings | None = None  # without the operator's Hub token: a dry run
    name: str | None = Field(None, pattern=SAFE_NAME)


class ExportRequest(ExportSettings):
    export_id: str = Field(pattern=SAFE_NAME)
    model: str
    validation_id: str | None = Field(None, pattern=SAFE_NAME)  # its results go into the model card


class TrainSettings(_Strict):
    method: Literal["sft", "dpo"] = "sft"  # SFT on the enhanced rows, or DPO on the preference pairs
    model: str | None = None  # default: the student's model
    peft: PeftFinetuningConfig | None = None  # any PEFT method; none: full fine-tuning
    dpo: DPOAlignmentConfig | None = None
    n_epochs: int = Field(1, ge=1, le=1000)
    max_steps_per_epoch: int = Field(100, ge=1, le=1_000_000)
    batch_size: int = Field(8, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0, le=1)
    max_seq_len: int = Field(512, ge=8, le=131072)
    seed: int = Field(42, ge=0, le=2**32 - 1)


class WorkflowRequest(_Strict):
    """enhance -> train -> validate -> export in one call."""

    workflow_id: str = Field(pattern=SAFE_NAME)
    dataset_id: str | None = None
    rows: list[dict[str, Any]] | None = Field(None, max_length=MAX_ROWS)
    enhance: EnhanceConfig
    train: TrainSettings = Field(default_factory=TrainSettings)
    validate_: ValidationSettings | None = Field(None, alias="validate")
    export: ExportSettings | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.rows is None) == (self.dataset_id is None):
            raise BadRequest("dataset_id/rows: give exactly one")
        if self.train.method == "dpo" and self.train.peft is not None:
            raise BadRequest("train.peft: DPO through this service trains the full model; use method 'sft' for PEFT")
        return self


KINDS = {"enhancements": EnhanceRequest, "validations": ValidationRequest, "exports": ExportRequest,
         "workflows": WorkflowRequest}


def train_model(req: WorkflowRequest) -> str:
    """What the workflow trains: train.model, else the student when this service serves it."""
    if req.train.model:
        return req.train.model
    if req.enhance.student.endpoint:
        raise BadRequest("train.model: required when the student is an external endpoint "
                         f"({req.enhance.student.endpoint!r}): name the local model directory to train")
    return req.enhance.student.model


class Cancelled(Exception):
    pass


class ModelRefs:
    """A request's model reference as a local directory:
    - a model directory (checked by the service's resolve_model: allowed roots, hub cache);
    - `job:<job_uuid>`: the final checkpoint of a completed job (an adapter is applied over its base);
    - `pipeline:<id>` (the merged adapter) or `pipeline:<id>/<student>` of a teacher-student pipeline;
    - `workflow:<id>`: the model a one-call workflow trained;
    - an adapter directory inside the service's data dir."""

    def __init__(self, service: FsdpJobService):
        self.service = service
        self.data_dir = service.data_dir.resolve()
        # Add-ons' own prefixes -> resolve(ref, field) giving a directory (openai_ft: `ft:` models, checkpoints)
        self.resolvers: dict[str, Callable[[str, str], str]] = {}
        # Add-ons' servable model ids, for GET /models (openai_ft: `ft:` models and checkpoints)
        self.listers: list[Callable[[], list[str]]] = []

    def resolve(self, ref: str, field: str = "model") -> str:
        kind, sep, name = ref.partition(":")
        if sep and kind in ("job", "pipeline", "workflow"):
            return self._named(kind, name, ref, field)
        if sep and kind in self.resolvers:
            return self._checked_adapter(Path(self.resolvers[kind](ref, field)), field)
        check_path_text(ref, field)  # before any file system call: NUL, '..', over-long names
        resolved = Path(ref).expanduser().resolve()
        if not owned(resolved, self.service.defaults):  # another user's path: as if it were outside the roots
            return self.service.resolve_model(ref, field)
        # An adapter directory is looked at only inside the data dir (a path elsewhere reveals nothing).
        if self.data_dir in resolved.parents and (resolved / "adapter_config.json").is_file():
            return self._checked_adapter(resolved, field)
        return self.service.resolve_model(ref, field)

    def _checked_adapter(self, path: Path, field: str) -> str:
        """An adapter's base model must pass the same checks as a model named in a request."""
        if is_adapter(path):
            self.service.resolve_model(adapter_base(path), f"{field} (the adapter's base_model_name_or_path)")
        return str(path)

    def _named(self, kind: str, name: str, ref: str, field: str) -> str:
        first, _, rest = name.partition("/")
        if not re.fullmatch(SAFE_NAME, first) or (rest and not re.fullmatch(SAFE_NAME, rest)):
            raise BadRequest(f"{field}: {ref!r} is not {kind}:<name>")
        if kind == "job":
            try:
                view = self.service.view(first)
            except UnknownJobError:
                raise BadRequest(f"{field}: no job {first!r}") from None
            if view["status"] != "completed" or not view["checkpoints"]:
                raise BadRequest(f"{field}: job {first!r} is {view['status']}, not completed with a checkpoint")
            path = Path(view["checkpoints"][-1]["path"])
            if not (path / "config.json").is_file() and not is_adapter(path):
                raise BadRequest(f"{field}: job {first!r} produced no model (a teacher task's outputs?)")
            return self._checked_adapter(path, field)
        if kind == "pipeline":
            state = load_state(self.service.data_dir / "pipelines" / first / "pipeline.json", default=None)
            if not isinstance(state, dict) or not access.can_see(state.get("owner")):
                raise BadRequest(f"{field}: no pipeline {first!r}")
            root = self.service.data_dir / "pipelines" / first
            path = root / "students" / rest / "final" if rest else root / "merged"
        else:
            state = load_state(self.service.data_dir / "workflows" / "workflows" / first / "task.json", default=None)
            state = state if isinstance(state, dict) and access.can_see(state.get("owner")) else {}
            trained = state.get("outputs", {}).get("model")
            if not trained:
                raise BadRequest(f"{field}: workflow {first!r} has no trained model (yet)")
            path = Path(trained)
        if not path.exists():
            raise BadRequest(f"{field}: {ref!r} has no model at {path}")
        return self._checked_adapter(path, field)


class WorkflowTasks:
    def __init__(self, service: FsdpJobService, refs: ModelRefs, local_base_url: str, api_token: str | None):
        self.service, self.refs = service, refs
        self.local_base_url, self.api_token = local_base_url, api_token
        self.root = service.data_dir / "workflows"
        self._lock = threading.Lock()
        self._stops: dict[tuple[str, str], threading.Event] = {}
        self._procs: dict[tuple[str, str], subprocess.Popen] = {}
        self._threads: dict[tuple[str, str], threading.Thread] = {}
        for kind in KINDS:
            for state_file in sorted((self.root / kind).glob("*/task.json")):  # tasks a restart interrupted go on
                state = load_state(state_file, default=None)
                if not isinstance(state, dict) or "state" not in state:
                    log.error("%s %s: its state file is unreadable; it is not resumed", kind, state_file.parent.name)
                    continue
                if state["state"] in ACTIVE:
                    self._start(kind, state_file.parent.name)

    # -- state ---------------------------------------------------------------------------------------
    def owner_of(self, parts: tuple[str, ...]) -> str | None:
        """Who created the task whose folder is KIND/ID (`parts`); the service's own when unknown."""
        state = load_state(self.root.joinpath(*parts[:2]) / "task.json", default=None) if len(parts) >= 2 else None
        return state.get("owner") if isinstance(state, dict) else None

    def task_dir(self, kind: str, task_id: str) -> Path:
        if kind not in KINDS or not re.fullmatch(SAFE_NAME, task_id):
            raise UnknownJobError(task_id)
        return self.root / kind / task_id

    def get(self, kind: str, task_id: str) -> dict[str, Any]:
        path = self.task_dir(kind, task_id) / "task.json"
        if not path.exists():
            raise UnknownJobError(task_id)
        state = json.loads(path.read_text())
        if not access.can_see(state.get("owner")):
            raise UnknownJobError(task_id)
        state.pop("request", None)
        return state

    def request(self, kind: str, task_id: str):
        body = json.loads((self.task_dir(kind, task_id) / "task.json").read_text())["request"]
        if "rows" in KINDS[kind].model_fields and body.get("dataset_id") is None:
            body = {**body, "rows": []}  # the rows themselves are in request_rows.jsonl
        return KINDS[kind].model_validate(body)

    def list(self, kind: str) -> list[dict[str, Any]]:
        out = []
        for p in sorted((self.root / kind).glob("*/task.json")):
            s = load_state(p, default=None)
            if not isinstance(s, dict) or not access.can_see(s.get("owner")):
                continue
            out.append({"id": s["id"], "state": s["state"], "created_at": s["created_at"]})
        return out

    def update(self, kind: str, task_id: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            path = self.task_dir(kind, task_id) / "task.json"
            state = json.loads(path.read_text())
            state.update(fields)
            save_state(path, state)
            return state

    def artifacts(self, kind: str, task_id: str) -> dict[str, Any]:
        d = self.task_dir(kind, task_id)
        state = self.get(kind, task_id)
        files = [{"path": str(p.relative_to(d)), "bytes": p.stat().st_size}
                 for p in sorted(d.rglob("*")) if p.is_file() and p.name not in ("task.json", "request_rows.jsonl")]
        return {"id": task_id, "state": state["state"], "dir": str(d), "outputs": state.get("outputs", {}),
                "files": files}

    def file(self, kind: str, task_id: str, name: str) -> Path:
        d = self.task_dir(kind, task_id).resolve()
        path = (d / name).resolve()
        if d not in path.parents or not path.is_file():
            raise BadRequest(f"name: no file {name!r} in {kind}/{task_id}")
        return path

    # -- lifecycle -----------------------------------------------------------------------------------
    def create(self, kind: str, task_id: str, request: BaseModel, rows: list[dict] | None = None) -> dict[str, Any]:
        d = self.task_dir(kind, task_id)
        if d.exists():
            raise Conflict(f"{kind}: {task_id!r} already exists")
        d.mkdir(parents=True)
        if rows is not None:  # the input rows, kept beside the task so a restart can resume it
            with open(d / "request_rows.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        body = request.model_dump(mode="json", by_alias=True, exclude={"rows"})
        state = {"id": task_id, "kind": kind, "state": "scheduled", "created_at": utc_now(), "started_at": None,
                 "finished_at": None, "error": None, "progress": {}, "outputs": {}, "request": body,
                 "owner": access.owner_name()}
        save_state(d / "task.json", state)
        self._start(kind, task_id)
        return self.get(kind, task_id)

    def _start(self, kind: str, task_id: str) -> None:
        self._stops[(kind, task_id)] = threading.Event()
        owner = load_state(self.task_dir(kind, task_id) / "task.json", default={}).get("owner")
        thread = threading.Thread(target=self._run_as, args=(owner, kind, task_id), daemon=True,
                                  name=f"{kind}-{task_id}")
        self._threads[(kind, task_id)] = thread
        thread.start()

    def cancel(self, kind: str, task_id: str) -> dict[str, Any]:
        state = self.get(kind, task_id)
        if state["state"] not in ACTIVE:
            return state
        self.update(kind, task_id, state="cancelled", finished_at=utc_now())
        stop = self._stops.get((kind, task_id))
        if stop:
            stop.set()
        proc = self._procs.get((kind, task_id))
        if proc and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        if kind == "workflows":
            train = state.get("outputs", {}).get("train_job")
            if train:
                try:
                    self.service.jobs.cancel(train)
                except (UnknownJobError, ValueError):
                    pass
        return self.get(kind, task_id)

    def resume(self, kind: str, task_id: str) -> dict[str, Any]:
        """Run a failed or cancelled enhancement again; finished rows are kept."""
        state = self.get(kind, task_id)
        if kind != "enhancements":
            raise BadRequest(f"{kind}: only data enhancements resume")
        if state["state"] in ACTIVE:
            raise BadRequest(f"enhancement_id: {task_id!r} is {state['state']}")
        previous = self._threads.get((kind, task_id))
        if previous is not None:  # a cancelled run finishes its rows in flight first: never two writers
            previous.join(timeout=300)
            if previous.is_alive():
                raise BadRequest(f"enhancement_id: {task_id!r} is still finishing its rows in flight; try again")
        self.update(kind, task_id, state="scheduled", error=None, finished_at=None)
        self._start(kind, task_id)
        return self.get(kind, task_id)

    def _stopped(self, kind: str, task_id: str) -> bool:
        return self._stops[(kind, task_id)].is_set()

    def _run_as(self, owner: str | None, kind: str, task_id: str) -> None:
        with access.acting_for(owner):  # what the task makes (its training job) is its owner's
            self._run(kind, task_id)

    def _run(self, kind: str, task_id: str) -> None:
        try:
            self.update(kind, task_id, state="in_progress", started_at=utc_now())
            outputs = getattr(self, f"_run_{kind}")(task_id, self.request(kind, task_id))
            if self._stopped(kind, task_id):
                raise Cancelled()
            self.update(kind, task_id, state="completed", finished_at=utc_now(), outputs=outputs)
        except Cancelled:
            self.update(kind, task_id, state="cancelled", finished_at=self.get(kind, task_id)["finished_at"] or utc_now())
        except Exception as e:  # noqa: BLE001 - the task's state must say why it stopped
            if self._stopped(kind, task_id):
                return
            log.exception("%s %s failed", kind, task_id)
            self.update(kind, task_id, state="failed", error=f"{type(e).__name__}: {e}", finished_at=utc_now())

    # -- steps ---------------------------------------------------------------------------------------
    def _rows(self, kind: str, task_id: str) -> list[dict]:
        path = self.task_dir(kind, task_id) / "request_rows.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _enhance(self, kind: str, task_id: str, config: EnhanceConfig, out: Path) -> dict[str, Any]:
        def progress(counts: dict) -> None:
            self.update(kind, task_id, progress={**self.get(kind, task_id)["progress"], "enhance": counts})

        report = asyncio.run(enhance_rows(
            self._rows(kind, task_id), config, out, endpoints=self.service.config.outbound.endpoints,
            local_base_url=self.local_base_url,
            local_api_key=self.api_token, progress=progress, should_stop=lambda: self._stopped(kind, task_id)))
        if self._stopped(kind, task_id):
            raise Cancelled()
        return report

    def _run_enhancements(self, task_id: str, req: EnhanceRequest) -> dict[str, Any]:
        out = self.task_dir("enhancements", task_id)
        report = self._enhance("enhancements", task_id, req.config, out)
        return {"report": str(out / "enhancement_report.json"), "enhanced_dataset": str(out / "enhanced_dataset.jsonl"),
                "preferences": str(out / "preferences.jsonl"), "results": str(out / "results.jsonl"),
                "rows_kept": report["rows_kept"], "training_data_correct_share": report["training_data_correct_share"]}

    def _child(self, kind: str, task_id: str, module: str, config: dict[str, Any], out: Path) -> None:
        """`python -m MODULE CONFIG.json` in its own process group; raises with its log tail on failure."""
        out.mkdir(parents=True, exist_ok=True)
        config_file = out / f"{module.rsplit('.', 1)[-1]}_config.json"
        config_file.write_text(json.dumps(config, indent=2))
        log_file = out / f"{module.rsplit('.', 1)[-1]}.log"
        child = module.rsplit(".", 1)[-1]  # validation, export: no service secrets, only what was handed to it
        env = child_env(keep=[*self.service.config.pass_env.get(child, []), (config.get("hub") or {}).get("token_env")],
                        extra={"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])})
        with open(log_file, "ab") as log_out:
            proc = subprocess.Popen([sys.executable, "-m", module, str(config_file)], cwd=str(REPO_ROOT), env=env,
                                    stdout=log_out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self._procs[(kind, task_id)] = proc
        try:
            rc = proc.wait()
        finally:
            self._procs.pop((kind, task_id), None)
        if self._stopped(kind, task_id):
            raise Cancelled()
        if rc != 0:
            tail = log_file.read_text(errors="replace").splitlines()[-5:]
            raise RuntimeError(f"{module} exited with {rc}: {' | '.join(tail)}")

    def _validate(self, kind: str, task_id: str, model: str, s: ValidationSettings, out: Path,
                  default_base: str | None = None) -> dict[str, Any]:
        base = self.refs.resolve(s.base_model, "base_model") if s.base_model else default_base
        config = {"model": model, "out_dir": str(out), "prompts": s.prompts, "base_model": base,
                  "max_new_tokens": s.max_new_tokens, "match": s.match, "min_pass_rate": s.min_pass_rate,
                  "alpha": s.alpha, "compare_base": s.compare_base}
        self._child(kind, task_id, "providers.validation", config, out)
        report = json.loads((out / "validation.json").read_text())
        return {"validation": str(out / "validation.json"), "report_md": str(out / "validation.md"),
                "passed": report["passed"], "summary": report.get("summary"), "verdict": report.get("verdict")}

    def _run_validations(self, task_id: str, req: ValidationRequest) -> dict[str, Any]:
        model = self.refs.resolve(req.model, "model")
        return self._validate("validations", task_id, model, req, self.task_dir("validations", task_id))

    def _export(self, kind: str, task_id: str, model: str, s: ExportSettings, out: Path,
                validation_dir: Path | None, card: dict[str, Any]) -> dict[str, Any]:
        hub = hub_target(s.hub, self.service.config.outbound.hub, "hub") if s.hub else None
        config = {"model": model, "out_dir": str(out), "formats": s.formats, "gguf_dtype": s.gguf_dtype, "hub": hub,
                  "card": {**card, "name": s.name}, "validation_dir": str(validation_dir) if validation_dir else None}
        self._child(kind, task_id, "providers.export", config, out)
        return json.loads((out / "export.json").read_text())

    def _run_exports(self, task_id: str, req: ExportRequest) -> dict[str, Any]:
        model = self.refs.resolve(req.model, "model")
        vdir = self.task_dir("validations", req.validation_id) if req.validation_id else None
        return self._export("exports", task_id, model, req, self.task_dir("exports", task_id), vdir,
                            {"training": {"model": req.model}})

    # -- enhance -> train -> validate -> export --------------------------------------------------------
    def _run_workflows(self, task_id: str, req: WorkflowRequest) -> dict[str, Any]:
        kind, d = "workflows", self.task_dir("workflows", task_id)
        results: dict[str, Any] = {"workflow_id": task_id, "started_at": utc_now(), "steps": {}}
        outputs: dict[str, Any] = {}

        def step(name: str, fn):
            info = {"status": "in_progress", "started_at": utc_now()}
            results["steps"][name] = info
            (d / "pipeline_results.json").write_text(json.dumps(results, indent=2, default=str))
            t0 = time.monotonic()
            try:
                info["outputs"] = fn()
                info["status"] = "completed"
                return info["outputs"]
            except Cancelled:
                info["status"] = "cancelled"
                raise
            except Exception as e:
                info.update(status="failed", error=f"{type(e).__name__}: {e}")
                raise
            finally:
                info.update(finished_at=utc_now(), elapsed_s=round(time.monotonic() - t0, 3))
                (d / "pipeline_results.json").write_text(json.dumps(results, indent=2, default=str))
                self.update(kind, task_id, progress={**self.get(kind, task_id)["progress"],
                                                     "steps": {k: v["status"] for k, v in results["steps"].items()}})

        try:
            report = step("enhance", lambda: self._enhance(kind, task_id, req.enhance, d / "enhance"))
            outputs["enhancement_report"] = str(d / "enhance" / "enhancement_report.json")
            job_uuid = f"{task_id}-train"
            outputs["train_job"] = job_uuid
            self.update(kind, task_id, outputs=outputs)
            trained = step("train", lambda: self._train(task_id, job_uuid, req, d / "enhance", report))
            outputs["model"] = trained["model"]
            self.update(kind, task_id, outputs=outputs)
            vdir = None
            if req.validate_:
                vdir = d / "validate"
                vdir.mkdir(exist_ok=True)
                step("validate", lambda: self._validate(kind, task_id, trained["model"], req.validate_, vdir,
                                                        default_base=trained["base_model"]))
                outputs["validation"] = str(vdir / "validation.json")
            else:
                results["steps"]["validate"] = {"status": "skipped"}
            if req.export:
                card = {"method": req.train.method, "base_model": trained["base_model"],
                        "training": {"method": req.train.method, "peft": req.train.peft.peft_type if req.train.peft else "full",
                                     "epochs": req.train.n_epochs, "lr": req.train.lr, "job": job_uuid},
                        "data": {"rows": report["rows_total"], "rows_kept": report["rows_kept"],
                                 "preference_pairs": report["preference_pairs"],
                                 "correct_share_before": report["training_data_correct_share"]["before"],
                                 "correct_share_after": report["training_data_correct_share"]["after"],
                                 "enhancement": "student -> judge -> teacher hint -> retry"}}
                step("export", lambda: self._export(kind, task_id, trained["model"], req.export, d / "export", vdir, card))
                outputs["export"] = str(d / "export" / "export.json")
            else:
                results["steps"]["export"] = {"status": "skipped"}
        finally:
            results["finished_at"] = utc_now()
            results["state"] = ("completed" if all(s["status"] in ("completed", "skipped") for s in results["steps"].values())
                                and len(results["steps"]) == 4 else "stopped")
            (d / "pipeline_results.json").write_text(json.dumps(results, indent=2, default=str))
        outputs["pipeline_results"] = str(d / "pipeline_results.json")
        return outputs

    def _train(self, task_id: str, job_uuid: str, req: WorkflowRequest, enhance_dir: Path,
               report: dict[str, Any]) -> dict[str, Any]:
        t = req.train
        source = enhance_dir / ("preferences.jsonl" if t.method == "dpo" else "enhanced_dataset.jsonl")
        rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
        if not rows:
            raise BadRequest(f"train: enhancement left no {'preference pairs' if t.method == 'dpo' else 'rows'} "
                             f"to train on (report: {report['rows_dropped']})")
        model = self.refs.resolve(train_model(req), "train.model")
        training_config = TrainingConfig.model_validate({
            "n_epochs": t.n_epochs, "max_steps_per_epoch": t.max_steps_per_epoch, "dtype": "fp32", "seed": t.seed,
            "max_seq_len": t.max_seq_len,
            "data_config": {"dataset_id": f"{task_id}-enhanced", "batch_size": t.batch_size, "shuffle": True,
                            "data_format": "instruct"},
            "optimizer_config": {"optimizer_type": "adamw", "lr": t.lr, "weight_decay": 0.0, "num_warmup_steps": 0},
            "torch_run_config": {"nproc_per_node": 1},
        })
        try:  # the workflow ran before a restart: pick its job up again instead of submitting a second one
            previous = self.service.view(job_uuid)["status"]
        except UnknownJobError:
            previous = None
        if previous in ("failed", "cancelled"):
            self.service.resume_job(job_uuid)
        elif previous is None and t.method == "dpo":
            if t.peft:
                raise BadRequest("train.peft: DPO through this service trains the full model; use method 'sft' for PEFT")
            self.service.submit_request("preference-optimize", PreferenceOptimizeRequest(
                job_uuid=job_uuid, finetuned_model=model, training_config=training_config,
                algorithm_config=t.dpo or DPOAlignmentConfig(), rows=rows))
        elif previous is None:
            self.service.submit_request("supervised-fine-tune", SupervisedFineTuneRequest(
                job_uuid=job_uuid, model=model, training_config=training_config, algorithm_config=t.peft, rows=rows))
        while True:
            view = self.service.view(job_uuid)
            if view["status"] not in ACTIVE:
                break
            if self._stopped("workflows", task_id):
                self.service.jobs.cancel(job_uuid)
                raise Cancelled()
            self.update("workflows", task_id, progress={**self.get("workflows", task_id)["progress"],
                                                        "train": {"step": view["resources_allocated"].get("step"),
                                                                  "total_steps": view["resources_allocated"].get("total_steps")}})
            time.sleep(1.0)
        if view["status"] != "completed":
            raise RuntimeError(f"training job {job_uuid} {view['status']}: {view['resources_allocated'].get('error')}")
        final = view["checkpoints"][-1]["path"]
        return {"job_uuid": job_uuid, "model": final, "base_model": model, "rows": len(rows),
                "final_train_loss": view["resources_allocated"].get("final_train_loss")}
