"""Multi-node jobs from one API call.

The coordinator places a job with `nnodes > 1` on that many live nodes (itself as node 0), sends every
other node its part (the same request with its `node_rank`, the master address and port, and
`part_of` set), and each node starts its own torchrun; torchrun's rendezvous joins them. A watcher
thread follows the parts: when one fails, or its node goes down, the job fails with that node's error
and every other part is stopped, so nothing is left running anywhere. Cancel stops every part.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from ...jobs.store import ACTIVE, UnknownJobError
from .jobs import FsdpJobService
from .launcher import free_port
from .nodes import Node, NodeRegistry
from .state_files import load_state, save_state

log = logging.getLogger("providers.remote_fsdp")


class DistributedJobs:
    def __init__(self, service: FsdpJobService, registry: NodeRegistry, headers: dict[str, str], poll_s: float = 1.0):
        self.service = service
        self.registry = registry
        self.headers = headers  # the API token and the node token: parts go to the node-only parts route
        self.poll_s = poll_s
        self.part_status: dict[str, dict[str, Any]] = {}  # job_uuid -> node_id -> last seen status
        for job in service.jobs.store.list(statuses=ACTIVE):  # jobs of a previous run of this service
            if (Path(job.run_dir) / "nodes.json").exists():
                self._watch(job.job_uuid)

    def _http(self) -> httpx.Client:
        return httpx.Client(headers=self.headers, timeout=30)

    def submit(self, route: str, body: dict[str, Any]) -> dict[str, str]:
        """Place the job on `nnodes` live nodes and start every part."""
        tc = body["training_config"]
        opts = self.service.torch_run_options(tc.get("torch_run_config"))
        fsdp = self.service.fsdp_options(tc.get("fsdp_config"))
        self.service.check_fsdp(fsdp, opts, opts.nproc_per_node * opts.nnodes)
        live = self.registry.live()
        if len(live) < opts.nnodes:
            raise ValueError(
                f"training_config.torch_run_config.nnodes: {opts.nnodes} nodes needed, {len(live)} up "
                f"({[n.node_id for n in live]})"
            )
        nodes = live[: opts.nnodes]
        master = nodes[0].capabilities.address
        port = opts.master_port or free_port()
        job_uuid = body["job_uuid"]
        parts = []
        for rank, node in enumerate(nodes):
            part = json.loads(json.dumps(body))
            part["part_of"] = self.registry.local.url
            part["training_config"]["torch_run_config"] = {
                **opts.model_dump(), "node_rank": rank, "master_addr": master, "master_port": port,
                "local_addr": node.capabilities.address,
            }
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
        self.service.jobs.store.update(job_uuid, resources={**job.resources, "nodes": placement,
                                                            "master_addr": master, "master_port": port})
        self._watch(job_uuid)
        return {"job_uuid": job_uuid}

    def _send_part(self, node: Node, route: str, part: dict[str, Any]) -> None:
        dataset_id = part["training_config"]["data_config"]["dataset_id"]
        with self._http() as http:
            if part.get("rows") is None:  # the node needs the rows: stream our copy of the dataset
                path = self.service.dataset_path(dataset_id)
                if not path.exists():
                    raise ValueError(f"training_config.data_config.dataset_id: no dataset {dataset_id!r} here")
                with open(path, "rb") as f:
                    http.post(f"{node.url}/v1/datasets/{dataset_id}/rows", content=f).raise_for_status()
            r = http.post(f"{node.url}/v1/post-training/parts/{route}", json=part)
        if r.status_code != 200:
            raise ValueError(f"node {node.node_id} refused its part: {r.status_code} {r.text}")

    def _parts(self, job_uuid: str) -> list[dict[str, Any]]:
        job = self.service.jobs.store.get(job_uuid)
        parts = load_state(Path(job.run_dir) / "nodes.json", default=[])
        return parts if isinstance(parts, list) else []

    def _remote(self, job_uuid: str) -> list[dict[str, Any]]:
        return [p for p in self._parts(job_uuid) if p["node_id"] != self.registry.local.node_id]

    def _watch(self, job_uuid: str) -> None:
        threading.Thread(target=self._follow, args=(job_uuid,), daemon=True, name=f"watch-{job_uuid}").start()

    def _follow(self, job_uuid: str) -> None:
        """Fail the whole job as soon as any part fails or its node goes down."""
        seen = self.part_status.setdefault(job_uuid, {})
        finished_at = None
        with self._http() as http:
            while True:
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
                if local.status == "completed":
                    # Keep the other parts' final state for the status view (they end within seconds).
                    finished_at = finished_at or time.monotonic()
                    done = all(seen.get(p["node_id"], {}).get("status") not in (None, *ACTIVE)
                               for p in self._remote(job_uuid))
                    if done or time.monotonic() - finished_at > 60:
                        return
                time.sleep(self.poll_s)

    def _part_failure(self, http: httpx.Client, job_uuid: str, part: dict, seen: dict) -> str | None:
        node_id = part["node_id"]
        try:
            if self.registry.get(node_id).state == "down":
                return f"node {node_id} is down (missed heartbeats)"
        except KeyError:
            return f"node {node_id} is no longer registered"
        try:
            r = http.get(f"{part['url']}/v1/post-training/job/status", params={"job_uuid": job_uuid}, timeout=5)
            r.raise_for_status()
        except httpx.HTTPError as e:
            return f"node {node_id} unreachable: {e}"
        status = r.json()
        res = status["resources_allocated"]
        seen[node_id] = {"status": status["status"], "step": res.get("step"), "error": res.get("error"),
                         "ranks": res.get("ranks", [])}
        if status["status"] in ("failed", "cancelled"):
            return f"node {node_id} (node_rank {part['node_rank']}) {status['status']}: {seen[node_id]['error']}"
        return None

    def _cancel_remote(self, job_uuid: str, nodes: list[Node] | None) -> None:
        targets = [{"node_id": n.node_id, "url": n.url} for n in nodes] if nodes is not None else self._remote(job_uuid)
        with self._http() as http:
            for part in targets:
                try:
                    http.post(f"{part['url']}/v1/post-training/job/cancel", json={"job_uuid": job_uuid}, timeout=30)
                except httpx.HTTPError as e:
                    log.warning("could not cancel job %s on node %s: %s", job_uuid, part["node_id"], e)

    def cancel(self, job_uuid: str) -> None:
        """Cancel on the coordinator: this node's part and every other node's."""
        self.service.jobs.cancel(job_uuid)
        self._cancel_remote(job_uuid, None)

    def view(self, job_uuid: str) -> dict[str, Any]:
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
        return view

    def is_distributed(self, job_uuid: str) -> bool:
        try:
            return bool(self._parts(job_uuid))
        except UnknownJobError:
            return False
