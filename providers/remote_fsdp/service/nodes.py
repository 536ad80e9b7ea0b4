"""Nodes, the service's side: a worker's heartbeats to its coordinator. The registry itself (Node,
NodeRegistry, capabilities, placement checks) lives below the launchers in providers/cluster/nodes.py;
its names are re-exported here for the routes and add-ons that import them from the service.
"""

from __future__ import annotations

import logging
import threading
import time

import httpx

from ...cluster.nodes import (  # noqa: F401 - re-exported
    Capabilities,
    Gpu,
    Heartbeat,
    HeartbeatAnswer,
    Node,
    NodeRegistry,
    NotFromNode,
    Registration,
    describe,
    local_capabilities,
    misfit,
    requested,
)

log = logging.getLogger("providers.remote_fsdp")


class HeartbeatSender(threading.Thread):
    """A worker's link to its coordinator: register, then heartbeat; register again if forgotten."""

    def __init__(self, coordinator: str, registration: Registration, headers: dict[str, str], load,
                 interval_s: float = 2.0, lost_after_s: float | None = None, on_lost=None, parts=None,
                 on_ended=None):
        super().__init__(daemon=True, name="heartbeat")
        self.coordinator = coordinator.rstrip("/")
        self.registration = registration
        self.headers = headers
        self.load = load
        self.interval_s = interval_s
        # No answer from the coordinator for lost_after_s (a partition, or the coordinator is down): call
        # on_lost(seconds) on every beat until it answers again. The coordinator marks this node down after the
        # same time and fails its jobs, so this node stops its parts of them: both sides agree, nothing hangs.
        self.lost_after_s = lost_after_s
        self.on_lost = on_lost
        self.last_contact = time.monotonic()
        # parts(): the job_uuids of the parts running here; on_ended({job_uuid: why}): stop those, the
        # coordinator ended their jobs (its cancel may have been lost while this node was stopped or cut off).
        self.parts = parts or (lambda: [])
        self.on_ended = on_ended
        self.stop = threading.Event()

    def _check_contact(self) -> None:
        silent = time.monotonic() - self.last_contact
        if self.on_lost is None or self.lost_after_s is None or silent <= self.lost_after_s:
            return
        try:
            self.on_lost(silent)
        except Exception:  # noqa: BLE001 - the heartbeat thread must outlive a failed fence
            log.exception("stopping the parts of coordinator %s's jobs failed", self.coordinator)

    def _stop_ended(self, answer: httpx.Response) -> None:
        if self.on_ended is None:
            return
        try:
            ended = answer.json().get("ended_parts")  # an older coordinator answers without it
            if ended:
                self.on_ended(ended)
        except Exception:  # noqa: BLE001 - the heartbeat thread must outlive a failed stop
            log.exception("stopping the parts of jobs coordinator %s ended failed", self.coordinator)

    def run(self) -> None:
        registered = False
        with httpx.Client(base_url=self.coordinator, headers=self.headers, timeout=5) as http:
            while not self.stop.is_set():
                try:
                    if not registered:
                        http.post("/v1/nodes/register", json=self.registration.model_dump()).raise_for_status()
                        registered = True
                        log.info("registered with coordinator %s as %s", self.coordinator, self.registration.node_id)
                    r = http.post(f"/v1/nodes/{self.registration.node_id}/heartbeat",
                                  json={"load": self.load(), "parts": self.parts()})
                    if r.status_code == 404:
                        registered = False
                        continue
                    r.raise_for_status()
                    self.last_contact = time.monotonic()
                    self._stop_ended(r)
                except httpx.HTTPError as e:
                    log.warning("coordinator %s: %s", self.coordinator, e)
                    registered = registered and not isinstance(e, httpx.HTTPStatusError)
                    self._check_contact()
                self.stop.wait(self.interval_s)
