"""GET /metrics in Prometheus' text format (prometheus-client), for the FSDP training service.

Job, queue and node figures are collected when Prometheus scrapes (a SQLite read, plus the tail of each
running job's metrics.jsonl), so serving API requests costs nothing extra for them. HTTP latency is a
histogram filled by a small ASGI middleware, labelled by route template (not raw path) so the number
of series stays bounded.

    trl_jobs{state}                          jobs by state (scheduled, in_progress, completed, ...)
    trl_queue_length                         jobs waiting for a slot
    trl_job_step / trl_job_total_steps       per running job {job_uuid, method}
    trl_job_steps_per_second                 over the job's last logged steps
    trl_job_tokens_per_second                last logged tokens/s (TRL's num_tokens)
    trl_job_last_loss                        last logged training loss
    trl_node_heartbeat_age_seconds{node_id}  seconds since the node's last heartbeat
    trl_node_up{node_id}, trl_node_load{node_id}
    trl_http_request_duration_seconds{method, route, status}   histogram
    trl_tinker_sessions, trl_tinker_models_resident, trl_tinker_requests_queued, trl_tinker_futures_pending
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from ..dashboard.sources import last_metrics, rates
from ..jobs.store import FINISHED, JobStore
from ..remote_fsdp.service.nodes import NodeRegistry

STATES = ("scheduled", "in_progress", *FINISHED)


class ServiceCollector:
    """Job, queue and node gauges, read at scrape time."""

    def __init__(self, store: JobStore, nodes: NodeRegistry):
        self.store = store
        self.registry = nodes

    def collect(self):
        jobs = self.store.list()
        by_state = GaugeMetricFamily("trl_jobs", "Jobs by state", labels=["state"])
        counts = {s: 0 for s in STATES}
        for job in jobs:
            counts[job.status] = counts.get(job.status, 0) + 1
        for state, n in counts.items():
            by_state.add_metric([state], n)
        yield by_state
        yield GaugeMetricFamily("trl_queue_length", "Jobs waiting for a slot", value=counts["scheduled"])

        labels = ["job_uuid", "method"]
        step = GaugeMetricFamily("trl_job_step", "Optimizer steps done, per running job", labels=labels)
        total = GaugeMetricFamily("trl_job_total_steps", "Optimizer steps planned, per running job", labels=labels)
        sps = GaugeMetricFamily("trl_job_steps_per_second", "Recent training steps per second", labels=labels)
        tps = GaugeMetricFamily("trl_job_tokens_per_second", "Recent training tokens per second", labels=labels)
        loss = GaugeMetricFamily("trl_job_last_loss", "Last logged training loss", labels=labels)
        for job in jobs:
            if job.status != "in_progress":
                continue
            lv = [job.job_uuid, job.method]
            recent = last_metrics(job.run_dir, 20)
            train = [r for r in recent if "loss" in r]
            if train:
                step.add_metric(lv, train[-1].get("step", 0))
                loss.add_metric(lv, float(train[-1]["loss"]))
            r = rates(recent)
            if "steps_per_s" in r:
                sps.add_metric(lv, r["steps_per_s"])
            if "tokens_per_s" in r:
                tps.add_metric(lv, r["tokens_per_s"])
            planned = _total_steps(job.run_dir)
            if planned is not None:
                total.add_metric(lv, planned)
        yield from (step, total, sps, tps, loss)

        age = GaugeMetricFamily("trl_node_heartbeat_age_seconds", "Seconds since the node's last heartbeat",
                                labels=["node_id"])
        up = GaugeMetricFamily("trl_node_up", "1 if the node is up", labels=["node_id"])
        load = GaugeMetricFamily("trl_node_load", "Jobs running on the node (this node: counted now; others: last heartbeat)",
                                 labels=["node_id"])
        now = time.time()
        for node in self.registry.nodes():
            age.add_metric([node.node_id], max(0.0, now - node.last_heartbeat))
            up.add_metric([node.node_id], 1.0 if node.state == "up" else 0.0)
            load.add_metric([node.node_id], node.load)
        yield from (age, up, load)


class TinkerCollector:
    """The Tinker API's gauges (providers/tinker_api: TinkerService.gauges), when the app serves it."""

    def __init__(self, app):
        self.app = app

    def collect(self):
        tinker = getattr(self.app.state, "tinker", None)  # read at scrape time: mounted after /metrics
        for name, (help_text, value) in (tinker.gauges().items() if tinker is not None else ()):
            yield GaugeMetricFamily(name, help_text, value=value)


def _total_steps(run_dir: str) -> int | None:
    from ..training.run_files import RunFiles

    return RunFiles(run_dir).read_status().get("total_steps")


class LatencyMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware task hop): request durations into a histogram."""

    def __init__(self, app, histogram: Histogram):
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status: dict[str, Any] = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.histogram.labels(scope["method"], route_template(scope), str(status["code"])).observe(
                time.perf_counter() - start)


def route_template(scope) -> str:
    """The request path with its path parameters put back as `{name}` (/v1/pipelines/{pipeline_id}):
    a bounded label set whatever ids clients send. Unrouted requests (404s) share one label."""
    if "route" not in scope:
        return "unmatched"
    path = scope["path"]
    for name, value in sorted((scope.get("path_params") or {}).items(), key=lambda kv: -len(str(kv[1]))):
        value = str(value)
        if not value:
            continue
        if path.endswith("/" + value):  # also `{name:path}` tails that span several segments
            path = path[: -len(value)] + "{" + name + "}"
        else:
            path = path.replace("/" + value + "/", "/{" + name + "}/", 1)
    return path


def install_metrics(app, store: JobStore, nodes: NodeRegistry, auth: list) -> CollectorRegistry:
    """Add GET /metrics (behind `auth`: the service's bearer token when one is set) and the latency
    middleware to `app`. A registry of its own, so several apps in one process never clash."""
    disable_created_metrics()  # no *_created series: Prometheus does not need them
    registry = CollectorRegistry()
    registry.register(ServiceCollector(store, nodes))
    registry.register(TinkerCollector(app))
    histogram = Histogram(
        "trl_http_request_duration_seconds", "HTTP request latency", ["method", "route", "status"],
        registry=registry,
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    )
    app.add_middleware(LatencyMiddleware, histogram=histogram)
    router = APIRouter(dependencies=auth)

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
    return registry
