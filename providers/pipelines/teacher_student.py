"""Teacher-student pipelines: one teacher task, N students trained from its cached outputs, a merge.

    teacher task   the teacher answers every prompt, with top-k log-probs per answer token
                   -> PIPELINE_DIR/teacher_outputs/shard-*.jsonl
    student tasks  each with its own base model, PEFT method and distillation method (output, logit or
                   hybrid from the cached log-probs: no teacher in memory); they run in parallel as the
                   service's job slots allow -> PIPELINE_DIR/students/NAME/final
    merge          the students' adapters averaged (or combined by a peft method) -> PIPELINE_DIR/merged

Placement: the teacher task runs on the live node with the most accelerator memory (else the most
RAM) that has the teacher model; students are spread over the live nodes, least loaded first, higher
`scheduling.priority` first. A task with `scheduling.resources` goes only to nodes that have them; while
no live node does (but a registered one could), the pipeline waits and its state says for what. A task
on another node is sent there over HTTP with what it needs (prompts, or the teacher outputs as a tar),
and its results come back the same way, so the output layout is the same wherever tasks ran. Model
paths mean the same directory on every node.

Every task is an ordinary job of the service that runs it (status, logs, cancel work as for any job).
The pipeline's own state is PIPELINE_DIR/pipeline.json, so a restart keeps it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
from llama_stack.apis.post_training import LoraFinetuningConfig
from pydantic import BeforeValidator, Field, PositiveFloat, PositiveInt

from .. import access
from ..errors import BadRequest, Conflict
from ..api.requests import DistillationConfig, PeftFinetuningConfig, TrainingConfig
from ..api.to_spec import peft_spec
from ..jobs.manager import QueueFullError
from ..jobs.store import ACTIVE, UnknownJobError
from ..launchers import LauncherName, runs_elsewhere
from ..remote_fsdp.service.jobs import FsdpJobService
from ..remote_fsdp.service.nodes import Node, NodeRegistry, describe, misfit
from ..remote_fsdp.service.security import extract_archive, write_archive
from ..state_files import load_state, save_state
from ..training.keys import KnownKeys, keys_checker
from ..training.data import read_shards
from ..training.run_files import utc_now
from ..training.spec import SAFE_NAME, KlDirection, ResourceRequest, SchedulingSpec

log = logging.getLogger("providers.remote_fsdp")


class TeacherTaskConfig(KnownKeys):
    model: str
    top_k: PositiveInt | None = 20
    max_new_tokens: PositiveInt = 32
    generation_batch_size: PositiveInt = 16
    # priority, max_retries and resources per node, as in training_config.scheduling
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    # slurm / ray: the coordinator hands the task to that scheduler; None, local, nodes: placed on this
    # service's registered nodes
    launcher: LauncherName | None = None


class StudentConfig(KnownKeys):
    name: str = Field(pattern=SAFE_NAME)
    model: str
    method: Literal["output", "logit", "hybrid"] = "logit"
    peft: Annotated[LoraFinetuningConfig | PeftFinetuningConfig | None, Field(discriminator="type"),
                    BeforeValidator(keys_checker(LoraFinetuningConfig, PeftFinetuningConfig))] = None
    temperature: PositiveFloat = 2.0
    alpha: float = Field(0.5, ge=0, le=1)
    kl_direction: KlDirection = "forward"
    n_epochs: PositiveInt = 1
    max_steps_per_epoch: PositiveInt = 50
    batch_size: PositiveInt = 8
    lr: PositiveFloat = 3e-3
    seed: int = 42
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    launcher: LauncherName | None = None  # as TeacherTaskConfig.launcher


class MergeConfig(KnownKeys):
    method: str = "linear"
    weights: list[float] | None = None


class PipelineRequest(KnownKeys):
    pipeline_id: str = Field(pattern=SAFE_NAME)
    dataset_id: str | None = None  # a dataset uploaded to this service
    rows: list[dict[str, Any]] | None = None  # or the prompts inline
    teacher: TeacherTaskConfig
    students: list[StudentConfig] = Field(min_length=1)
    merge: MergeConfig | None = None


def scheduled_elsewhere(task: TeacherTaskConfig | StudentConfig) -> bool:
    """Whether a scheduler (Slurm, Ray) places the task rather than this service's node registry."""
    return runs_elsewhere(task.launcher)


class PipelineCancelled(Exception):
    pass


class Pipelines:
    def __init__(self, service: FsdpJobService, registry: NodeRegistry, headers: dict[str, str] | None = None,
                 max_running: int = 20, task_timeout_s: float = 7 * 24 * 3600):
        self.service = service
        self.registry = registry
        self.headers = headers or {}  # calls to other nodes carry the API token and the node token
        self.max_running = max_running
        self.task_timeout_s = task_timeout_s  # a node that answers in_progress forever cannot pin a thread
        self.root = service.data_dir / "pipelines"
        self.root.mkdir(parents=True, exist_ok=True)
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._remotes: dict[str, RemoteNode] = {}
        self._running: set[str] = set()
        for state_file in self.root.glob("*/pipeline.json"):  # pipelines interrupted by a restart go on
            pipeline_id = state_file.parent.name
            state = load_state(state_file, default=None)
            if not isinstance(state, dict) or "teacher" not in state:
                log.error("pipeline %s: its state file is unreadable; it is not resumed", pipeline_id)
                continue
            if state.get("state") in ACTIVE:
                self._start(pipeline_id)

    # -- state ---------------------------------------------------------------------------------------
    def _state_path(self, pipeline_id: str) -> Path:
        if not isinstance(pipeline_id, str) or not re.fullmatch(SAFE_NAME, pipeline_id):
            raise UnknownJobError(str(pipeline_id)[:200])
        return self.root / pipeline_id / "pipeline.json"

    def _read(self, pipeline_id: str) -> dict[str, Any]:
        path = self._state_path(pipeline_id)
        state = load_state(path, default=None) if path.exists() else None
        if not isinstance(state, dict) or "teacher" not in state or not access.can_see(state.get("owner")):
            raise UnknownJobError(pipeline_id)
        return state

    def owner_of(self, parts: tuple[str, ...]) -> str | None:
        """Who submitted the pipeline whose folder `parts[0]` is (the service's own when unknown)."""
        state = load_state(self.root / parts[0] / "pipeline.json", default=None) if parts else None
        return state.get("owner") if isinstance(state, dict) else None

    def get(self, pipeline_id: str) -> dict[str, Any]:
        with self._lock:
            state = self._read(pipeline_id)
        for task in [state["teacher"], *state["students"]]:
            if task.get("node_id") is None:
                task.setdefault("status", "scheduled")
                continue
            try:
                task.update(self.runner(task["node_id"]).status(task["job_uuid"]))
            except (UnknownJobError, KeyError):
                task.setdefault("status", "scheduled")
        return state

    def runner(self, node_id: str) -> LocalNode | RemoteNode:
        if node_id == self.registry.local.node_id:
            return LocalNode(self, node_id)
        node = self.registry.get(node_id)
        with self._lock:
            runner = self._remotes.get(node_id)
            if runner is None or runner.url != node.url:  # kept per URL: a re-registered node gets a new client
                if runner is not None:
                    runner.close()
                runner = self._remotes[node_id] = RemoteNode(node, self.headers)
        return runner

    def _candidates(self, model: str, resources: ResourceRequest, live_only: bool = True) -> list[Node]:
        """Nodes that have `model` (or advertise no models) and `resources`: live ones, or every registered one."""
        return [n for n in self.registry.fitting(resources, live_only)
                if not n.capabilities.models or model in n.capabilities.models]

    def place_teacher(self, teacher: TeacherTaskConfig) -> Node | None:
        """The live node with the most accelerator memory, else the most RAM, that has the teacher model and
        its resources; None while no live node does."""
        if scheduled_elsewhere(teacher):
            return self.registry.local  # this service hands it to the scheduler, which places it
        nodes = self._candidates(teacher.model, teacher.scheduling.resources)
        if not nodes:
            return None
        local = self.registry.local.node_id
        return max(nodes, key=lambda n: (n.capabilities.gpu_memory_gb, n.capabilities.ram_gb, n.node_id == local))

    def place_students(self, students: list[StudentConfig]) -> list[Node | None]:
        """Spread over live nodes that have each student's model and resources, least loaded first,
        round-robin, higher priority first; None for a student no live node can take now."""
        live = sorted(self.registry.live(), key=lambda n: n.load)
        placed: list[Node | None] = [None] * len(students)
        k = 0
        for i in sorted(range(len(students)), key=lambda i: -students[i].scheduling.priority):
            s = students[i]
            if scheduled_elsewhere(s):
                placed[i] = self.registry.local
                continue
            nodes = [n for n in live if (not n.capabilities.models or s.model in n.capabilities.models)
                     and misfit(n.capabilities, s.scheduling.resources) is None]
            if nodes:
                placed[i] = nodes[k % len(nodes)]
                k += 1
        return placed

    def _check_placeable(self, req: PipelineRequest) -> None:
        """A 400 for a task that no registered node (up or down) could ever take."""
        enabled = self.service.config.launchers.enabled
        for field, task in [("teacher", req.teacher), *((f"students[{i}]", s) for i, s in enumerate(req.students))]:
            if task.launcher is not None and task.launcher not in enabled:
                raise BadRequest(f"{field}.launcher: {task.launcher!r} is not enabled on this service (enabled: {enabled})")
        tasks = [("teacher", req.teacher.model, req.teacher.scheduling.resources)] if not scheduled_elsewhere(req.teacher) else []
        tasks += [(f"students[{i}]", s.model, s.scheduling.resources) for i, s in enumerate(req.students)
                  if not scheduled_elsewhere(s)]
        for field, model, resources in tasks:
            if not self._candidates(model, ResourceRequest(), live_only=False):
                raise BadRequest(f"{field}.model: no registered node has {model!r}")
            if not self._candidates(model, resources, live_only=False):
                raise BadRequest(f"{field}.scheduling.resources: no registered node with {model!r} has "
                                 f"{describe(resources)}; the most any registered node has: {self.registry.largest()}")

    def _waiting_reason(self, model: str, resources: ResourceRequest) -> str:
        down = [n.node_id for n in self._candidates(model, resources, live_only=False)]
        return (f"waiting for a live node with {describe(resources)} that has {model!r} "
                f"(none is up; {', '.join(down)} could take it)")

    def list(self) -> list[dict[str, Any]]:
        out = []
        with self._lock:
            for p in sorted(self.root.glob("*/pipeline.json")):
                state = load_state(p, default=None)
                if isinstance(state, dict) and access.can_see(state.get("owner")):
                    out.append({"pipeline_id": p.parent.name, "state": state.get("state")})
        return out

    def _update(self, pipeline_id: str, **fields: Any) -> None:
        """Change the pipeline's state file; a cancelled pipeline stays cancelled."""
        with self._lock:
            state = self._read(pipeline_id)
            if state.get("state") == "cancelled" and fields.get("state") not in (None, "cancelled"):
                raise PipelineCancelled(pipeline_id)
            state.update(fields)
            save_state(self._state_path(pipeline_id), state)

    # -- tasks ---------------------------------------------------------------------------------------
    def create_teacher_task(self, job_uuid: str, teacher: TeacherTaskConfig, rows: Any, output_dir: Path) -> str:
        """Submit a teacher task: answers (+ top-k log-probs) for every prompt, written as JSONL shards."""
        self.service.submit_teacher(
            job_uuid=job_uuid, model=teacher.model, rows=rows, output_dir=output_dir, top_k=teacher.top_k,
            max_new_tokens=teacher.max_new_tokens, generation_batch_size=teacher.generation_batch_size,
            scheduling=teacher.scheduling, launcher=teacher.launcher,
        )
        return job_uuid

    def create_student_task(self, job_uuid: str, student: StudentConfig, teacher_outputs_dir: Path,
                            rows: list[dict], checkpoint_dir: Path) -> str:
        """Submit one student: distillation from a teacher task's outputs (no teacher in memory); `rows`
        are the teacher's prompt/completion rows (its answers, also the student's validation slice)."""
        tc = TrainingConfig(
            n_epochs=student.n_epochs, max_steps_per_epoch=student.max_steps_per_epoch, dtype="fp32",
            seed=student.seed,
            data_config={"dataset_id": "teacher-outputs", "batch_size": student.batch_size, "shuffle": True,
                         "data_format": "instruct"},
            optimizer_config={"optimizer_type": "adamw", "lr": student.lr, "weight_decay": 0.0, "num_warmup_steps": 0},
            torch_run_config={"nproc_per_node": 1, "launcher": student.launcher},
            scheduling=student.scheduling.model_dump(),
        )
        algorithm = DistillationConfig(
            teacher_outputs_dir=str(teacher_outputs_dir), method=student.method, temperature=student.temperature,
            alpha=student.alpha, kl_direction=student.kl_direction, student_peft=student.peft,
        )
        self.service.submit(job_uuid=job_uuid, method="distill", model=student.model, training_config=tc,
                            algorithm_config=algorithm, logger_config={}, checkpoint_dir=None, rows=rows,
                            validation_rows=None, output_dir=checkpoint_dir, use_fsdp=False)
        return job_uuid

    # -- pipelines -----------------------------------------------------------------------------------
    def submit(self, req: PipelineRequest) -> dict[str, Any]:
        if self._state_path(req.pipeline_id).parent.exists():
            raise Conflict(f"pipeline_id: a pipeline named {req.pipeline_id!r} already exists")
        if len(self._running) >= self.max_running:
            raise QueueFullError(f"pipeline_id: {len(self._running)} pipelines are running (the limit is "
                                 f"{self.max_running}); submit again when some have finished")
        if (req.rows is None) == (req.dataset_id is None):
            raise BadRequest("dataset_id/rows: give exactly one")
        names = [s.name for s in req.students]
        if len(set(names)) != len(names):
            raise BadRequest(f"students: names must be unique, got {names}")
        if req.merge:
            self._check_mergeable(req.students)
        self._check_placeable(req)
        rows = req.rows if req.rows is not None else list(self.service.dataset_rows(req.dataset_id, "dataset_id"))
        pdir = self.root / req.pipeline_id
        try:
            pdir.mkdir()  # exclusive: concurrent submissions of one id cannot both win
        except FileExistsError:
            raise Conflict(f"pipeline_id: a pipeline named {req.pipeline_id!r} already exists") from None
        (pdir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        state = {
            "pipeline_id": req.pipeline_id, "state": "scheduled", "created_at": utc_now(), "finished_at": None,
            "owner": access.owner_name(),
            "error": None, "output_dir": str(pdir), "request": req.model_dump(mode="json", exclude={"rows"}),
            "teacher": {"job_uuid": f"{req.pipeline_id}-teacher", "outputs": str(pdir / "teacher_outputs")},
            "students": [{"name": s.name, "job_uuid": f"{req.pipeline_id}-student-{s.name}",
                          "output": str(pdir / "students" / s.name / "final")} for s in req.students],
            "merge": {"state": "pending" if req.merge else "skipped", "output": str(pdir / "merged")},
        }
        try:
            node = self.place_teacher(req.teacher)
            if node is None:  # the pipeline's thread starts it once a node that fits is up
                state["teacher"].update(node_id=None, waiting_for=self._waiting_reason(
                    req.teacher.model, req.teacher.scheduling.resources))
            else:
                state["teacher"]["node_id"] = node.node_id
                self.runner(node.node_id).start_teacher(state["teacher"]["job_uuid"], req.teacher, rows,
                                                        pdir / "teacher_outputs")
            save_state(self._state_path(req.pipeline_id), state)
        except Exception:
            shutil.rmtree(pdir, ignore_errors=True)
            raise
        self._start(req.pipeline_id)
        return {"pipeline_id": req.pipeline_id, "state": "scheduled"}

    @staticmethod
    def _check_mergeable(students: list[StudentConfig]) -> None:
        if any(s.peft is None for s in students):
            raise BadRequest("merge: every student needs a PEFT adapter (full fine-tunes cannot be merged)")
        kinds = {(s.model, peft_spec(s.peft).peft_type) for s in students}
        if len(kinds) > 1:
            raise BadRequest(f"merge: students must share base model and PEFT method, got {sorted(map(str, kinds))}")

    def _start(self, pipeline_id: str) -> None:
        with self._lock:
            self._running.add(pipeline_id)
        threading.Thread(target=self._run, args=(pipeline_id,), daemon=True, name=f"pipeline-{pipeline_id}").start()

    def _wait(self, pipeline_id: str, tasks: list[dict]) -> dict[str, dict]:
        """Final status of each task (a dict with job_uuid and node_id), wherever it runs. Stops when the
        pipeline is cancelled, the service shuts down, or the tasks outlive `task_timeout_s`."""
        deadline = time.monotonic() + self.task_timeout_s
        while True:
            self._check_live(pipeline_id)
            states = {t["job_uuid"]: self.runner(t["node_id"]).status(t["job_uuid"]) for t in tasks}
            if all(s["status"] not in ACTIVE for s in states.values()):
                return states
            if time.monotonic() > deadline:
                raise TimeoutError(f"tasks {sorted(states)} still running after {self.task_timeout_s:.0f}s")
            self.stop.wait(0.5)

    def _check_live(self, pipeline_id: str) -> None:
        if self._read(pipeline_id).get("state") == "cancelled":
            raise PipelineCancelled(pipeline_id)
        if self.stop.is_set():
            raise PipelineCancelled(pipeline_id)

    def _run(self, pipeline_id: str) -> None:
        with access.acting_as(None):
            owner = self._read(pipeline_id).get("owner")
        with access.acting_for(owner):  # its tasks are jobs of the user who submitted the pipeline
            self._run_as_owner(pipeline_id)

    def _run_as_owner(self, pipeline_id: str) -> None:
        try:
            self._update(pipeline_id, state="in_progress")
            state = self._read(pipeline_id)
            req = PipelineRequest(**state["request"], rows=[])
            teacher = state["teacher"]
            self._start_teacher(pipeline_id, req, teacher)
            result = self._wait(pipeline_id, [teacher])[teacher["job_uuid"]]
            if result["status"] != "completed":
                raise RuntimeError(f"teacher task {teacher['job_uuid']} on {teacher['node_id']} "
                                   f"{result['status']}: {result['error']}")
            outputs = Path(teacher["outputs"])
            if not (outputs / "teacher_task.json").exists():
                self.runner(teacher["node_id"]).fetch(teacher["job_uuid"], outputs)
            answered = [{"prompt": r["prompt"], "completion": r["completion"]} for r in read_shards(outputs)]
            self._start_students(pipeline_id, req, state["students"], outputs, answered)
            results = self._wait(pipeline_id, state["students"])
            failed = {j: f"{r['status']}: {r['error']}" for j, r in results.items() if r["status"] != "completed"}
            if failed:
                raise RuntimeError(f"students did not complete: {failed}")
            for task in state["students"]:
                if not Path(task["output"]).exists():
                    self.runner(task["node_id"]).fetch(task["job_uuid"], Path(task["output"]))
            if req.merge:
                self._check_live(pipeline_id)
                from ..training.merge import merge_adapters  # torch: imported when a merge runs

                summary = merge_adapters([t["output"] for t in state["students"]], state["merge"]["output"],
                                         req.merge.weights, req.merge.method)
                self._update(pipeline_id, merge={**state["merge"], "state": "completed", **summary})
            self._update(pipeline_id, state="completed", finished_at=utc_now())
        except PipelineCancelled:
            return  # cancelled, or the service stops (a restart picks an in-progress pipeline up again)
        except Exception as e:  # noqa: BLE001 - the pipeline's state must say why it stopped
            log.exception("pipeline %s failed", pipeline_id)
            try:
                self._update(pipeline_id, state="failed", error=f"{type(e).__name__}: {str(e)[:2000]}",
                             finished_at=utc_now())
            except (PipelineCancelled, UnknownJobError):
                pass
        finally:
            with self._lock:
                self._running.discard(pipeline_id)

    def _start_teacher(self, pipeline_id: str, req: PipelineRequest, task: dict[str, Any]) -> None:
        """Start the teacher task unless it runs already: placed at submit, or once a node that fits is up."""
        if task.get("node_id") is not None:
            try:
                self.runner(task["node_id"]).status(task["job_uuid"])
                return  # started at submit (or before a restart)
            except UnknownJobError:
                pass  # placed, then the service stopped before it started
        else:
            while (node := self.place_teacher(req.teacher)) is None:
                self._check_live(pipeline_id)
                self.stop.wait(1.0)
            task.update(node_id=node.node_id)
            task.pop("waiting_for", None)
            self._update(pipeline_id, teacher=task)  # before the start: a restart then finds it placed
        pdir = self.root / pipeline_id
        rows = [json.loads(line) for line in (pdir / "prompts.jsonl").read_text().splitlines() if line.strip()]
        self.runner(task["node_id"]).start_teacher(task["job_uuid"], req.teacher, rows, Path(task["outputs"]))

    def _start_students(self, pipeline_id: str, req: PipelineRequest, tasks: list[dict[str, Any]], outputs: Path,
                        answered: list[dict]) -> None:
        """Start every student, higher priority first, each on a live node that fits it; students no live
        node fits wait (the reason in their task's `waiting_for`) until one is up."""
        order = sorted(range(len(tasks)), key=lambda i: -req.students[i].scheduling.priority)
        started: set[int] = set()
        while True:
            self._check_live(pipeline_id)  # a cancelled pipeline starts no more students
            unplaced = [i for i in range(len(tasks)) if tasks[i].get("node_id") is None]
            before = json.dumps(tasks)
            for i, node in zip(unplaced, self.place_students([req.students[i] for i in unplaced])):
                s = req.students[i]
                if node is None:
                    tasks[i]["waiting_for"] = self._waiting_reason(s.model, s.scheduling.resources)
                else:
                    tasks[i]["node_id"] = node.node_id
                    tasks[i].pop("waiting_for", None)
            if json.dumps(tasks) != before:
                self._update(pipeline_id, students=tasks)
            for i in order:
                task = tasks[i]
                if task.get("node_id") is None or i in started:
                    continue
                self._check_live(pipeline_id)
                runner = self.runner(task["node_id"])
                try:
                    runner.status(task["job_uuid"])  # already submitted before a restart
                except UnknownJobError:
                    runner.start_student(task["job_uuid"], req.students[i], outputs, answered,
                                         Path(task["output"]).parent, pipeline_id)
                started.add(i)
            if len(started) == len(tasks):
                return
            self.stop.wait(1.0)

    def cancel(self, pipeline_id: str) -> None:
        state = self.get(pipeline_id)
        if state.get("state") not in ACTIVE:
            return
        self._update(pipeline_id, state="cancelled", finished_at=utc_now())
        for task in [state["teacher"], *state["students"]]:
            if task.get("node_id") is None:
                continue
            try:
                if task["node_id"] == self.registry.local.node_id:
                    self.service.jobs.cancel(task["job_uuid"])
                else:
                    self.runner(task["node_id"]).http.post(
                        "/v1/post-training/job/cancel", json={"job_uuid": task["job_uuid"]})
            except (UnknownJobError, KeyError, httpx.HTTPError):
                pass


class LocalNode:
    """Runs a pipeline's tasks as jobs of this service."""

    def __init__(self, pipelines: Pipelines, node_id: str):
        self.pipelines = pipelines
        self.node_id = node_id

    def start_teacher(self, job_uuid: str, teacher: TeacherTaskConfig, rows: list[dict], outputs: Path) -> None:
        self.pipelines.create_teacher_task(job_uuid, teacher, rows, outputs)

    def start_student(self, job_uuid: str, student: StudentConfig, outputs: Path, answered: list[dict],
                      final_parent: Path, outputs_id: str) -> None:
        self.pipelines.create_student_task(job_uuid, student, outputs, answered, final_parent)

    def status(self, job_uuid: str) -> dict[str, Any]:
        view = self.pipelines.service.view(job_uuid)
        res = view["resources_allocated"]
        return {"status": view["status"], "step": res.get("step"), "total_steps": res.get("total_steps"),
                "error": res.get("error")}

    def fetch(self, job_uuid: str, dest: Path) -> None:
        pass  # written in place


class RemoteNode:
    """Runs a pipeline's tasks on another node's service (the node the task was placed on: results are
    fetched from that node's registered URL and nowhere else)."""

    def __init__(self, node: Node, headers: dict[str, str]):
        self.node_id = node.node_id
        self.url = node.url
        self.http = httpx.Client(base_url=node.url, headers=headers, timeout=120)
        self.uploaded: set[str] = set()

    def close(self) -> None:
        self.http.close()

    def _ok(self, r: httpx.Response) -> dict:
        if r.status_code >= 400:
            raise RuntimeError(f"node {self.node_id}: {r.request.method} {r.request.url.path}: {r.status_code} {r.text}")
        return r.json() if r.content else {}

    def start_teacher(self, job_uuid: str, teacher: TeacherTaskConfig, rows: list[dict], outputs: Path) -> None:
        self._ok(self.http.post("/v1/teacher-tasks", json={"job_uuid": job_uuid, "teacher": teacher.model_dump(),
                                                            "rows": rows}))

    def start_student(self, job_uuid: str, student: StudentConfig, outputs: Path, answered: list[dict],
                      final_parent: Path, outputs_id: str) -> None:
        if outputs_id not in self.uploaded:
            with tempfile.TemporaryDirectory() as tmp:
                archive = Path(tmp) / "outputs.tar.gz"
                write_archive(outputs, archive)
                with open(archive, "rb") as f:
                    r = self.http.put(f"/v1/teacher-outputs/{outputs_id}", content=f)
            if r.status_code != 409:  # 409: uploaded before a restart of this service
                self._ok(r)
            self.uploaded.add(outputs_id)
        prefix = job_uuid[: -len(f"-student-{student.name}")]
        self._ok(self.http.post("/v1/student-tasks", json={"teacher_outputs": outputs_id, "prefix": prefix,
                                                            "students": [student.model_dump(mode="json")]}))

    def status(self, job_uuid: str) -> dict[str, Any]:
        try:
            r = self.http.get("/v1/post-training/job/status", params={"job_uuid": job_uuid}, timeout=10)
        except httpx.HTTPError as e:
            return {"status": "failed", "error": f"node {self.node_id} unreachable: {e}"}
        if r.status_code == 404:
            raise UnknownJobError(job_uuid)
        view = self._ok(r)
        res = view["resources_allocated"]
        return {"status": view["status"], "step": res.get("step"), "total_steps": res.get("total_steps"),
                "error": res.get("error")}

    def fetch(self, job_uuid: str, dest: Path, max_bytes: int = 64 << 30, max_members: int = 100_000) -> None:
        """The task's result from its node, streamed to disk and extracted as plain files only."""
        with tempfile.TemporaryDirectory(dir=dest.parent if dest.parent.exists() else None) as tmp:
            archive = Path(tmp) / "result.tar.gz"
            with self.http.stream("GET", "/v1/post-training/job/download", params={"job_uuid": job_uuid}) as r:
                if r.status_code >= 400:
                    r.read()
                    raise RuntimeError(f"node {self.node_id}: download of {job_uuid}: {r.status_code} {r.text}")
                with open(archive, "wb") as f:
                    for chunk in r.iter_bytes():
                        f.write(chunk)
            extract_archive(archive, dest, max_bytes, max_members)
