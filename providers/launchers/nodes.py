"""The `nodes` launcher: multi-node jobs from one API call, on this service's registered nodes.

The coordinator places a job with `nnodes > 1` on that many live nodes (itself as node 0), sends every
other node its part (the same request with its `node_rank`, the master address and port, and
`part_of` set), and each node starts its own torchrun; torchrun's rendezvous joins them. A watcher
thread follows the parts: when one fails, or its node goes down, the job fails with that node's error
and every other part is stopped, so nothing is left running anywhere. Cancel stops every part.

A job with `training_config.scheduling.resources` goes only to live nodes that have them (node 0 is still
this coordinator, so it must have them too: workers take parts only from their coordinator as master).
When too few such nodes are up, the job waits in DATA_DIR/pending_jobs/JOB_UUID.json (status `scheduled`,
with the reason) until they are, and a thread places waiting jobs, higher `priority` first, then in submit
order. A waiting job has no JobManager record yet; one cancelled (or whose placement fails) before it was
placed gets a record of that final state, so the job lists and status show it like any other.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import httpx

from .. import access
from ..errors import BadRequest, Conflict
from ..api.paths import check_job_uuid
from ..api.requests import PreferenceOptimizeRequest, SupervisedFineTuneRequest
from ..api.to_spec import method_of, preference_target, scheduling_spec
from ..jobs.manager import JobManager
from ..jobs.store import ACTIVE, DuplicateJobError, JobRecord, StoreUnavailable, UnknownJobError
from ..cluster.nodes import Node, NodeRegistry, describe, misfit, requested
from ..state_files import load_state, save_state
from ..training.run_files import RunFiles, utc_now
from ..training.spec import FsdpSpec, JobSpec, ResourceRequest
from .base import check_mesh
from .local import LocalLauncher, check_host_processes
from .torchrun import TorchRunOptions, free_port



class JobService(Protocol):
    """What the `nodes` launcher uses of the service that owns it (remote_fsdp.service.jobs.FsdpJobService):
    a protocol, so that the launcher does not import the service that imports it."""

    data_dir: Path
    jobs: JobManager

    def submit_request(self, route: str, request: Any, trusted: bool = False) -> dict[str, Any]: ...
    def torch_run_options(self, overrides: dict[str, Any] | None, trusted: bool = False) -> TorchRunOptions: ...
    def fsdp_options(self, overrides: dict[str, Any] | None) -> FsdpSpec: ...
    def resolve_model(self, model: str, field: str) -> str: ...
    def dataset_path(self, dataset_id: str) -> Path: ...
    def view(self, job_uuid: str) -> dict[str, Any]: ...

log = logging.getLogger("providers.remote_fsdp")


class NodesLauncher:
    """Places a job's parts on registered nodes (this coordinator is node 0); each node runs its part with
    its own `local` launcher. Built by the service app, which has the node registry."""

    name = "nodes"
    runs_elsewhere = False  # node 0 runs here; the other nodes check their own part when it arrives
    part_launcher = LocalLauncher.name  # what each node runs its part with (its JobManager record says so)

    def __init__(self, service: JobService, registry: NodeRegistry, headers: dict[str, str], poll_s: float = 1.0,
                 place_interval_s: float = 1.0):
        self.service = service
        self.registry = registry
        self.headers = headers  # the API token and the node token: parts go to the node-only parts route
        self.poll_s = poll_s
        self.place_interval_s = place_interval_s
        self.part_status: dict[str, dict[str, Any]] = {}  # job_uuid -> node_id -> last seen status
        self.pending_dir = service.data_dir / "pending_jobs"
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pending: dict[str, dict[str, Any]] = {}  # job_uuid -> a waiting job's entry (its body stays on disk)
        self._placing: set[str] = set()
        self._fencing: set[str] = set()  # parts this worker is stopping (its coordinator is gone or ended the job)
        self._resuming: set[str] = set()  # jobs whose parts are being resumed (not ended, whatever the record says)
        self.stop = threading.Event()
        self._following: set[str] = set()  # jobs a follower thread watches (a completed one: until every part is)
        self._unreachable: dict[tuple[str, str], float] = {}  # (job, node) -> since when its status is unanswered
        for job in service.jobs.store.list(statuses=ACTIVE):  # jobs of a previous run of this service
            if (Path(job.run_dir) / "nodes.json").exists():
                self._watch(job.job_uuid)  # node 0's part still runs here: follow every part again
        # Node 0's part died with the previous run of this service, so the job failed: stop its other parts
        # (they would otherwise wait in a collective until it times out).
        orphaned = [u for u in getattr(service.jobs, "failed_at_start", []) if self._parts_or_none(u)]
        if orphaned:
            threading.Thread(target=self._stop_orphaned_parts, args=(orphaned,), daemon=True,
                             name="stop-orphaned-parts").start()
        for path in sorted(self.pending_dir.glob("*.json")):  # jobs that were waiting for nodes
            entry = load_state(path, default=None)
            if not isinstance(entry, dict) or not isinstance(entry.get("body"), dict):
                log.error("pending job file %s is unreadable; that job is dropped", path)
                continue
            if service.jobs.store.exists(entry["job_uuid"]):  # placed just before a restart
                path.unlink(missing_ok=True)
                continue
            self._pending[entry["job_uuid"]] = {k: v for k, v in entry.items() if k != "body"}
        threading.Thread(target=self._place_loop, daemon=True, name="place-pending-jobs").start()

    def _http(self) -> httpx.Client:
        return httpx.Client(headers=self.headers, timeout=30)

    def submit(self, route: str, body: dict[str, Any]) -> dict[str, str]:
        """Place the job on `nnodes` live nodes (that have its requested resources) and start every part; a
        job whose resources too few live nodes have waits for them (see `place_pending`)."""
        tc = body["training_config"]
        opts = self.service.torch_run_options(tc.get("torch_run_config"))
        fsdp = self.service.fsdp_options(tc.get("fsdp_config"))
        self.check(opts, fsdp, ResourceRequest())
        job_uuid = body["job_uuid"]
        check_job_uuid(job_uuid)
        if job_uuid in self._pending:
            raise Conflict(f"job_uuid: a job named {job_uuid!r} already exists (waiting for nodes)")
        request = self._request(route, body)
        scheduling = scheduling_spec(request.training_config)
        if not requested(scheduling.resources):
            live = self.registry.live()
            if len(live) < opts.nnodes:
                raise BadRequest(
                    f"training_config.torch_run_config.nnodes: {opts.nnodes} nodes needed, {len(live)} up "
                    f"({[n.node_id for n in live]})"
                )
            return self._start(route, body, opts, live[: opts.nnodes])
        self._check_placeable(scheduling.resources, opts.nnodes)
        with self._lock:
            if job_uuid in self._pending or self.service.jobs.store.exists(job_uuid):
                raise Conflict(f"job_uuid: a job named {job_uuid!r} already exists")
            nodes = self._fitting(scheduling.resources, opts.nnodes)
            if nodes is None:
                model = self._check_inputs(route, request)
                entry = {
                    "job_uuid": job_uuid, "route": route, "submitted_at": utc_now(),
                    "seq": time.time_ns(), "priority": scheduling.priority, "nnodes": opts.nnodes,
                    "nproc_per_node": opts.nproc_per_node, "resources": scheduling.resources.model_dump(),
                    "method": method_of(route, request.algorithm_config),
                    "model": model, "owner": access.owner_name(),
                }
                save_state(self._pending_path(job_uuid), {**entry, "body": body})
                self._pending[job_uuid] = entry
                log.info("job %s waits: %s", job_uuid, self._waiting_reason(entry))
                return {"job_uuid": job_uuid}
        return self._start(route, body, opts, nodes)

    def check(self, torch_run: TorchRunOptions, fsdp: FsdpSpec | None, resources: ResourceRequest) -> None:
        """The mesh, and this host's GPUs and cores for node 0's part (the resources: `_check_placeable`)."""
        check_mesh(fsdp, torch_run)
        if fsdp is not None:
            check_host_processes(torch_run.nproc_per_node)

    def unhonoured(self, spec: JobSpec) -> dict[str, str]:
        return {}

    @staticmethod
    def _request(route: str, body: dict[str, Any]) -> SupervisedFineTuneRequest | PreferenceOptimizeRequest:
        model = PreferenceOptimizeRequest if route == "preference-optimize" else SupervisedFineTuneRequest
        return model.model_validate(body)

    def _check_inputs(self, route: str, request: SupervisedFineTuneRequest | PreferenceOptimizeRequest) -> str:
        """What a waiting job can be refused for now rather than when it is placed: its model and dataset.
        Returns the model it trains."""
        if route == "preference-optimize":
            model = preference_target(request.finetuned_model, request.model)[0]
            self.service.resolve_model(model, "model" if request.model else "finetuned_model")
        else:
            model = request.model
            self.service.resolve_model(model, "model")
        dc = request.training_config.data_config
        if request.rows is None and dc is not None and not self.service.dataset_path(dc.dataset_id).exists():
            raise BadRequest(f"training_config.data_config.dataset_id: no dataset {dc.dataset_id!r} on this service "
                             "(upload its rows first)")
        return model

    def _check_placeable(self, resources: ResourceRequest, nnodes: int) -> None:
        """A 400 for a job that the registered nodes can never hold, whichever of them are up."""
        local = self.registry.local
        short = misfit(local.capabilities, resources)
        if short:
            raise BadRequest(
                f"training_config.scheduling.resources: node 0 of a multi-node job is this coordinator "
                f"({local.node_id}), which has {short}; the most any registered node has: {self.registry.largest()}"
            )
        fitting = self.registry.fitting(resources, live_only=False)
        if len(fitting) < nnodes:
            raise BadRequest(
                f"training_config.scheduling.resources: {nnodes} nodes with {describe(resources)} needed, "
                f"{len(fitting)} registered ({[n.node_id for n in fitting]}); the most any registered node has: "
                f"{self.registry.largest()}"
            )

    def _fitting(self, resources: ResourceRequest, nnodes: int, heard: bool = False) -> list[Node] | None:
        """`nnodes` live nodes with `resources`, this coordinator first, then the least loaded; None if too few.
        `heard`: only nodes heard from since this service started (NodeRegistry.live)."""
        nodes = self.registry.fitting(resources, heard=heard)
        if len(nodes) < nnodes or nodes[0].node_id != self.registry.local.node_id:
            return None
        return nodes[:nnodes]

    def _start(self, route: str, body: dict[str, Any], opts: TorchRunOptions, nodes: list[Node],
               waited_since: str | None = None) -> dict[str, str]:
        """Send every other node its part, then start this node's (node 0)."""
        master = nodes[0].capabilities.address
        port = opts.master_port or free_port()
        job_uuid = body["job_uuid"]
        parts = []
        for rank, node in enumerate(nodes):
            part = json.loads(json.dumps(body))
            part["part_of"] = self.registry.local.url
            torch_run = {**opts.model_dump(), "node_rank": rank, "master_addr": master, "master_port": port,
                         "local_addr": node.capabilities.address}
            if "launcher" in TorchRunOptions.model_fields:  # each node runs its own part on its own host
                torch_run["launcher"] = self.part_launcher
            part["training_config"]["torch_run_config"] = torch_run
            parts.append((node, part))
        # Remote parts first: if a node refuses its part, nothing has started here yet.
        started: list[Node] = []
        try:
            for node, part in parts[1:]:
                self._send_part(node, route, part)
                started.append(node)
            self.service.submit_request(route, parts[0][1], trusted=True)
        except Exception:
            self._cancel_remote(job_uuid, started)
            raise
        placement = [{"node_id": n.node_id, "url": n.url, "node_rank": r, "address": n.capabilities.address}
                     for r, n in enumerate(nodes)]
        job = self.service.jobs.store.get(job_uuid)
        save_state(Path(job.run_dir) / "nodes.json", placement)
        waited = {"waited_since": waited_since, "placed_at": utc_now()} if waited_since else {}
        self.service.jobs.store.update(job_uuid, resources={**job.resources, "nodes": placement,
                                                            "master_addr": master, "master_port": port, **waited})
        self._watch(job_uuid)
        return {"job_uuid": job_uuid}

    # -- jobs waiting for nodes ----------------------------------------------------------------------
    def _pending_path(self, job_uuid: str) -> Path:
        return self.pending_dir / f"{job_uuid}.json"

    def _waiting_reason(self, entry: dict[str, Any]) -> str:
        resources = ResourceRequest(**entry["resources"])
        live = len(self.registry.fitting(resources))
        fit = "fits" if live == 1 else "fit"
        return f"waiting for {entry['nnodes']} nodes with {describe(resources)} ({live} {fit} now)"

    def _place_loop(self) -> None:
        while not self.stop.wait(self.place_interval_s):
            if self._pending:
                try:
                    self.place_pending()
                except Exception:  # the placing thread must outlive one bad pass
                    log.exception("placing waiting jobs failed")

    def place_pending(self) -> None:
        """Start the waiting jobs that enough live nodes can now hold: higher priority first, then submit order.
        A job whose placement fails (a node refuses its part) fails with that error."""
        with self._lock:
            order = sorted(self._pending.values(), key=lambda e: (-e["priority"], e["seq"]))
        for entry in order:
            job_uuid = entry["job_uuid"]
            with self._lock:
                if job_uuid not in self._pending:  # cancelled meanwhile
                    continue
                nodes = self._fitting(ResourceRequest(**entry["resources"]), entry["nnodes"], heard=True)
                if nodes is None:
                    continue
                self._placing.add(job_uuid)
            try:
                body = load_state(self._pending_path(job_uuid), default={}).get("body")
                if not isinstance(body, dict):
                    raise ValueError(f"its pending file {self._pending_path(job_uuid)} is unreadable")
                opts = self.service.torch_run_options(body["training_config"].get("torch_run_config"))
                log.info("job %s: placing on %s", job_uuid, [n.node_id for n in nodes])
                with access.acting_for(entry.get("owner")):  # its record names the user who submitted it
                    self._start(entry["route"], body, opts, nodes, waited_since=entry["submitted_at"])
            except Exception as e:  # noqa: BLE001 - the job records why it could not start
                log.warning("job %s could not be placed: %s", job_uuid, e)
                with self._lock:
                    self._end_waiting(entry, "failed", f"placing the job on {[n.node_id for n in nodes]} failed: "
                                                       f"{type(e).__name__}: {str(e)[:2000]}")
            else:
                with self._lock:
                    self._pending.pop(job_uuid, None)
                    self._pending_path(job_uuid).unlink(missing_ok=True)
            finally:
                with self._lock:
                    self._placing.discard(job_uuid)

    def _end_waiting(self, entry: dict[str, Any], status: str, error: str | None) -> None:
        """A waiting job that will not be placed (cancelled, or its placement failed) becomes a job record in
        that final state, so it shows in the job lists. Call with the lock held."""
        job_uuid = entry["job_uuid"]
        now = utc_now()
        try:
            with self.service.jobs.reserve(job_uuid) as run_dir:
                RunFiles(run_dir).update_status(state=status, error=error, finished_at=now)
                resources = {k: entry[k] for k in ("method", "model", "nnodes", "nproc_per_node")}
                self.service.jobs.store.create(JobRecord(
                    job_uuid=job_uuid, method=entry["method"], run_dir=str(run_dir), status=status,
                    scheduled_at=entry["submitted_at"], completed_at=now, error=error, priority=entry["priority"],
                    resources={**resources, "launcher": self.name, "requested_resources": entry["resources"]},
                ))
        except DuplicateJobError:  # a job of that name was started meanwhile (the single-node routes)
            log.error("job %s: a job of the same name exists; the waiting one is dropped", job_uuid)
        self._pending.pop(job_uuid, None)
        self._pending_path(job_uuid).unlink(missing_ok=True)

    def _pending_view(self, entry: dict[str, Any]) -> dict[str, Any]:
        placing = entry["job_uuid"] in self._placing
        return {
            "job_uuid": entry["job_uuid"], "status": "scheduled", "scheduled_at": entry["submitted_at"],
            "started_at": None, "completed_at": None, "checkpoints": [],
            "resources_allocated": {
                "method": entry["method"], "model": entry["model"], "nnodes": entry["nnodes"],
                "nproc_per_node": entry["nproc_per_node"], "launcher": self.name, "priority": entry["priority"],
                "requested_resources": entry["resources"],
                "waiting_for": "being placed" if placing else self._waiting_reason(entry),
            },
        }

    def _shown_status(self, job_uuid: str, status: str) -> str:
        """A multi-node job whose node 0 completed is `in_progress` until every other part said it completed."""
        return "in_progress" if status == "completed" and job_uuid in self._following else status

    def is_waiting(self, job_uuid: str) -> bool:
        """Whether `job_uuid` names a job waiting for nodes (it has no JobManager record yet)."""
        entry = self._pending.get(job_uuid)
        return entry is not None and access.can_see(entry.get("owner"))

    def list_jobs(self) -> list[dict[str, str]]:
        """Every job: the JobManager's records, then the jobs still waiting for nodes."""
        jobs = [{"job_uuid": j.job_uuid, "status": self._shown_status(j.job_uuid, j.status)}
                for j in self.service.jobs.store.list()]
        known = {j["job_uuid"] for j in jobs}
        return jobs + [{"job_uuid": u, "status": "scheduled"} for u, entry in list(self._pending.items())
                       if u not in known and access.can_see(entry.get("owner"))]

    def _send_part(self, node: Node, route: str, part: dict[str, Any]) -> None:
        dataset_id = part["training_config"]["data_config"]["dataset_id"]
        with self._http() as http:
            if part.get("rows") is None:  # the node needs the rows: stream our copy of the dataset
                path = self.service.dataset_path(dataset_id)
                if not path.exists():
                    raise BadRequest(f"training_config.data_config.dataset_id: no dataset {dataset_id!r} here")
                with open(path, "rb") as f:
                    http.post(f"{node.url}/v1/datasets/{dataset_id}/rows", content=f).raise_for_status()
            r = http.post(f"{node.url}/v1/post-training/parts/{route}", json=part)
        if r.status_code != 200:
            raise BadRequest(f"node {node.node_id} refused its part: {r.status_code} {r.text}")

    def _parts(self, job_uuid: str) -> list[dict[str, Any]]:
        job = self.service.jobs.store.get(job_uuid)
        parts = load_state(Path(job.run_dir) / "nodes.json", default=[])
        return parts if isinstance(parts, list) else []

    def _remote(self, job_uuid: str) -> list[dict[str, Any]]:
        return [p for p in self._parts(job_uuid) if p["node_id"] != self.registry.local.node_id]

    def _watch(self, job_uuid: str) -> None:
        self._following.add(job_uuid)
        threading.Thread(target=self._follow_parts, args=(job_uuid,), daemon=True, name=f"watch-{job_uuid}").start()

    def _follow_parts(self, job_uuid: str) -> None:
        try:
            self._follow(job_uuid)
        except Exception:  # noqa: BLE001 - logged; the job's own supervisor still records node 0's end
            log.exception("job %s: following its parts failed", job_uuid)
        finally:
            self._following.discard(job_uuid)
            for key in [k for k in self._unreachable if k[0] == job_uuid]:
                self._unreachable.pop(key, None)

    def _follow(self, job_uuid: str) -> None:
        """Fail the whole job as soon as any part fails or its node goes down (or stops answering for the
        registry's down_after_s); once node 0 completes, the job is completed only when every other part
        says it completed too (see `view`)."""
        seen = self.part_status.setdefault(job_uuid, {})
        finished_at = None
        with self._http() as http:
            while True:
                if self.stop.is_set():  # this service stops: `shutdown` stops the parts, the job says why
                    return
                local = self.service.jobs.store.get(job_uuid)
                if local.status not in ACTIVE and local.status != "completed":
                    self._cancel_remote(job_uuid, None)
                    return
                for part in self._remote(job_uuid):
                    failure = self._part_failure(http, job_uuid, part, seen)
                    if failure and local.status in ACTIVE:
                        log.warning("job %s: %s; stopping every part", job_uuid, failure)
                        self.service.jobs.cancel(job_uuid, reason=failure)
                        self._cancel_remote(job_uuid, None)
                        return
                    if failure:  # node 0 completed, this part did not: the job did not complete
                        self._fail_completed(job_uuid, f"{failure} (after node 0's part completed)")
                        return
                if local.status == "completed":
                    finished_at = finished_at or time.monotonic()
                    done = all(seen.get(p["node_id"], {}).get("status") == "completed" for p in self._remote(job_uuid))
                    if done:
                        return
                    if time.monotonic() - finished_at > 60:
                        waiting = [p["node_id"] for p in self._remote(job_uuid)
                                   if seen.get(p["node_id"], {}).get("status") != "completed"]
                        self._fail_completed(job_uuid, f"node 0's part completed, but {waiting} did not report "
                                                       "completing theirs within 60 s")
                        return
                time.sleep(self.poll_s)

    def silent_nodes(self, job_uuid: str) -> str | None:
        """Which other nodes of a failed multi-node job do not answer now, or None. When a machine dies, its
        peers' collectives break ("Connection closed by peer [ADDRESS]") before its heartbeats are missed:
        this names the machine in the job's error (JobManager.failure_context)."""
        silent = []
        with self._http() as http:
            for part in self._remote(job_uuid):
                try:
                    self._part_status(http, job_uuid, part, timeout=3)
                except httpx.HTTPError as e:
                    silent.append(f"node {part['node_id']} ({part['url']}) does not answer: {type(e).__name__}")
        return "; ".join(silent) or None

    def _fail_completed(self, job_uuid: str, reason: str) -> None:
        """A job whose node 0 completed while another part failed (or never said it completed) is failed:
        no job is reported completed that did not complete on every node."""
        self.service.jobs.fail(job_uuid, reason)
        self._cancel_remote(job_uuid, None)

    @staticmethod
    def _part_status(http: httpx.Client, job_uuid: str, part: dict, timeout: float) -> dict[str, Any]:
        """A part's status, from its node's service; raises httpx.HTTPError when the node does not answer."""
        r = http.get(f"{part['url']}/v1/post-training/job/status", params={"job_uuid": job_uuid}, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def _part_failure(self, http: httpx.Client, job_uuid: str, part: dict, seen: dict) -> str | None:
        node_id = part["node_id"]
        try:
            if self.registry.get(node_id).state == "down":
                return f"node {node_id} is down (no heartbeat for {self.registry.down_after_s:g} s)"
        except KeyError:
            return f"node {node_id} is no longer registered"
        try:
            status = self._part_status(http, job_uuid, part, timeout=5)
        except httpx.HTTPError as e:
            # One unanswered poll is no partition: fail after as long as the registry waits for heartbeats.
            since = self._unreachable.setdefault((job_uuid, node_id), time.monotonic())
            if time.monotonic() - since > self.registry.down_after_s:
                return f"node {node_id} unreachable for {time.monotonic() - since:.0f} s: {type(e).__name__}: {e}"
            return None
        self._unreachable.pop((job_uuid, node_id), None)
        res = status["resources_allocated"]
        seen[node_id] = {"status": status["status"], "step": res.get("step"), "error": res.get("error"),
                         "ranks": res.get("ranks", [])}
        if status["status"] in ("failed", "cancelled"):
            why = seen[node_id]["error"]
            return f"node {node_id} (node_rank {part['node_rank']}) {status['status']}" + (f": {why}" if why else "")
        return None

    def _parts_or_none(self, job_uuid: str) -> list[dict[str, Any]]:
        try:
            return self._remote(job_uuid)
        except (UnknownJobError, OSError):
            return []

    def _stop_orphaned_parts(self, job_uuids: list[str], attempts: int = 30) -> None:
        """Cancel the other nodes' parts of jobs whose node 0 died with this service's previous run; a node
        not reachable now is tried again (it stops its parts itself once it misses its coordinator too)."""
        left = list(job_uuids)
        for _ in range(attempts):
            left = [u for u in left if not self._cancel_remote(u, None)]
            if not left or self.stop.wait(2):
                return
        log.warning("jobs %s: parts on other nodes could not be reached to stop them", left)

    def running_parts(self) -> list[str]:
        """On a worker: the multi-node jobs it runs a part of now (its heartbeats name them)."""
        return [job.job_uuid for job in self.service.jobs.store.list(statuses=ACTIVE, everyone=True)
                if (job.resources.get("node_rank") or 0) > 0]

    def ended_parts(self, node_id: str, url: str, job_uuids: list[str]) -> dict[str, str]:
        """On the coordinator: of the jobs node `node_id` at `url` says it runs a part of, those placed on it that
        ended here (failed or cancelled), with how: the node stops those parts. Slurm does the same with a returning node's jobs:
        a cancel sent while the node was stopped or cut off may never have reached it."""
        ended = {}
        for job_uuid in job_uuids:
            if job_uuid in self._resuming:  # its other parts resume first, then this node's record
                continue
            try:
                job = self.service.jobs.store.get(job_uuid)
            except (UnknownJobError, StoreUnavailable):  # being placed (its parts start before its record)
                continue
            if job.status in ("failed", "cancelled") and any(p["node_id"] == node_id and p.get("url") == url
                                                             for p in self._parts_or_none(job_uuid)):
                ended[job_uuid] = job.status + (f": {job.error[:1000]}" if job.error else "")
        return ended

    def stop_parts_of_ended_jobs(self, ended: dict[str, str], coordinator: str) -> None:
        """On a worker: stop its parts of the jobs its coordinator says ended (`ended_parts`): `cancelled` where a
        user cancelled the job, else `failed` with how it ended."""
        for job_uuid, how in ended.items():
            why = f"the coordinator {coordinator} ended the job ({how}): this node stopped its part"
            self._stop_part(job_uuid, None if how == "cancelled" else why, why)

    def stop_parts_of_lost_coordinator(self, silent_s: float, coordinator: str) -> None:
        """On a worker that has not reached its coordinator for `silent_s`: stop every part of a multi-node
        job running here (the coordinator fails those jobs once it misses this node's heartbeats)."""
        for job_uuid in self.running_parts():
            self._stop_part(job_uuid, f"lost contact with the coordinator {coordinator} for {silent_s:.0f} s (a "
                                      "network partition, or the coordinator is down): this node stopped its part")

    def _stop_part(self, job_uuid: str, reason: str | None, why: str | None = None) -> None:
        """Stop this worker's part of a job: `failed` with `reason`, or `cancelled` when None (in a thread: the
        caller is the heartbeat thread)."""
        try:
            job = self.service.jobs.store.get(job_uuid)
        except UnknownJobError:
            return
        if job.status not in ACTIVE or (job.resources.get("node_rank") or 0) == 0 or job_uuid in self._fencing:
            return
        self._fencing.add(job_uuid)
        log.warning("job %s: %s", job_uuid, why or reason)
        threading.Thread(target=self._fence, args=(job_uuid, reason), daemon=True, name=f"fence-{job_uuid}").start()

    def _fence(self, job_uuid: str, reason: str | None) -> None:
        try:
            self.service.jobs.cancel(job_uuid, reason=reason)
        finally:
            self._fencing.discard(job_uuid)

    def shutdown(self) -> None:
        """This service stops: node 0's parts stop with it (the JobManager's shutdown), so stop the other
        nodes' parts of every running multi-node job first."""
        self.stop.set()
        for job in self.service.jobs.store.list(statuses=ACTIVE, everyone=True):
            if self._parts_or_none(job.job_uuid):
                self._cancel_remote(job.job_uuid, None, timeout_s=5)

    def _cancel_remote(self, job_uuid: str, nodes: list[Node] | None, timeout_s: float = 30) -> bool:
        """Cancel the job's parts on other nodes; whether every one answered."""
        targets = [{"node_id": n.node_id, "url": n.url} for n in nodes] if nodes is not None else self._remote(job_uuid)
        reached = True
        with self._http() as http:
            for part in targets:
                if self._is_down(part["node_id"]):
                    # A stopped node would hold the request until it timed out, a cut-off one never gets it: it
                    # stops its part when its next heartbeat is answered (ended_parts), or itself without us.
                    reached = False
                    log.warning("job %s: node %s is down; it stops its part when it is back (or by itself after "
                                "%g s without this coordinator)", job_uuid, part["node_id"], self.registry.down_after_s)
                    continue
                try:
                    http.post(f"{part['url']}/v1/post-training/job/cancel", json={"job_uuid": job_uuid},
                              timeout=timeout_s).raise_for_status()
                except httpx.HTTPError as e:
                    reached = False
                    log.warning("could not cancel job %s on node %s: %s", job_uuid, part["node_id"], e)
        return reached

    def _is_down(self, node_id: str) -> bool:
        try:
            return self.registry.get(node_id).state == "down"
        except KeyError:  # not registered: nothing will answer its heartbeats, so try the request
            return False

    def cancel(self, job_uuid: str) -> None:
        """Cancel on the coordinator: this node's part and every other node's, or the job while it waits."""
        deadline = time.monotonic() + 120
        while True:
            with self._lock:
                if job_uuid not in self._placing:
                    entry = self._pending.get(job_uuid) if self.is_waiting(job_uuid) else None
                    if entry is not None:
                        self._end_waiting(entry, "cancelled", None)
                        return
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_uuid}: still being placed after 120 s")
            time.sleep(0.05)  # being placed: cancel it once it has its record
        self.service.jobs.cancel(job_uuid)
        self._cancel_remote(job_uuid, None)

    def resume(self, job_uuid: str) -> JobRecord:
        """Resume a multi-node job that failed or was cancelled: every other node's part first (each from its
        newest checkpoint, through that node's own resume route), then this node's; then follow the parts
        again. A node that cannot resume its part refuses the whole resume before anything here starts."""
        job = self.service.jobs.store.get(job_uuid)
        if job.status not in ("failed", "cancelled"):
            raise BadRequest(f"job_uuid: job {job_uuid!r} is {job.status}; only failed or cancelled jobs resume")
        self._resuming.add(job_uuid)
        try:
            return self._resume(job_uuid)
        finally:
            self._resuming.discard(job_uuid)

    def _resume(self, job_uuid: str) -> JobRecord:
        with self._http() as http:
            for part in self._remote(job_uuid):
                try:
                    r = http.post(f"{part['url']}/v1/post-training/job/resume", json={"job_uuid": job_uuid}, timeout=30)
                    why = None if r.status_code == 200 else f"{r.status_code} {r.text[:1000]}"
                except httpx.HTTPError as e:
                    why = f"unreachable: {e}"
                if why:
                    self._cancel_remote(job_uuid, None)  # the parts resumed so far
                    raise BadRequest(f"job_uuid: node {part['node_id']} cannot resume its part of {job_uuid!r}: {why}")
        try:
            record = self.service.jobs.resume(job_uuid)
        except Exception:
            self._cancel_remote(job_uuid, None)
            raise
        self.part_status.pop(job_uuid, None)  # the previous run's part states
        self._watch(job_uuid)
        return record

    def view(self, job_uuid: str) -> dict[str, Any]:
        entry = self._pending.get(job_uuid) if self.is_waiting(job_uuid) else None
        if entry is not None:
            return self._pending_view(entry)
        view = self.service.view(job_uuid)
        parts = self._parts(job_uuid)
        if parts:
            last = self.part_status.get(job_uuid, {})
            local = self.registry.local.node_id
            res = view["resources_allocated"]
            res["nodes"] = [
                {**p, **({"status": view["status"]} if p["node_id"] == local else
                         {k: v for k, v in last.get(p["node_id"], {}).items() if k != "ranks"})}
                for p in parts
            ]
            remote_ranks = [r for node in last.values() for r in node.get("ranks", [])]
            res["ranks"] = sorted(res.get("ranks", []) + remote_ranks, key=lambda r: r.get("rank", 0))
            shown = self._shown_status(job_uuid, view["status"])
            if shown != view["status"]:
                view["status"] = shown
                res["waiting_for"] = "every other node to report its part completed"
        return view

    def is_distributed(self, job_uuid: str) -> bool:
        try:
            return bool(self._parts(job_uuid))
        except UnknownJobError:
            return False
