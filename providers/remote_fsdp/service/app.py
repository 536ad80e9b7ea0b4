"""The FSDP training service app and its command line (`trl-fsdp-service`, port 8322 by default)."""

from __future__ import annotations

import argparse
import logging
import secrets
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ...jobs.store import DuplicateJobError, UnknownJobError
from .config import ServiceConfig
from .distributed import DistributedJobs
from .jobs import FsdpJobService
from .nodes import HeartbeatSender, Node, NodeRegistry, Registration, local_capabilities
from .operator_tools import install_operator_tools
from .pipelines import Pipelines
from .routes import (
    datasets_router,
    nodes_router,
    pipelines_router,
    post_training_router,
)

log = logging.getLogger("providers.remote_fsdp")


def _error(status: int, detail) -> JSONResponse:
    # Llama Stack clients retry 5xx answers, POSTs included, unless told not to.
    return JSONResponse(status_code=status, content={"detail": detail}, headers={"x-should-retry": "false"})


def create_app(config: ServiceConfig) -> FastAPI:
    service = FsdpJobService(config)
    local = Node(node_id=config.node_id, url=config.url, capabilities=local_capabilities(
        config.model_dirs, config.node_address, config.gloo_socket_ifname))
    registry = NodeRegistry(config.data_path / "nodes.json", local, down_after_s=config.down_after_s)
    distributed = DistributedJobs(service, registry, config.api_token)
    heartbeat = None
    if config.coordinator:
        heartbeat = HeartbeatSender(
            config.coordinator, Registration(node_id=local.node_id, url=local.url, capabilities=local.capabilities),
            config.api_token, lambda: len(service.jobs.store.list(statuses=("in_progress",))),
            config.heartbeat_interval_s,
        )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if heartbeat:
            heartbeat.start()
        yield
        if heartbeat:
            heartbeat.stop.set()
        service.jobs.shutdown()

    app = FastAPI(title="TRL FSDP post-training service", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    app.state.registry = registry

    async def require_token(request: Request) -> None:  # async: no thread-pool hop per request
        if config.api_token is None:
            return
        header = request.headers.get("authorization", "")
        if not secrets.compare_digest(header, f"Bearer {config.api_token}"):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token")

    auth = [Depends(require_token)]
    for prefix in ("/v1/post-training", "/v1alpha/post-training"):
        app.include_router(post_training_router(service, distributed), prefix=prefix, dependencies=auth)
    app.include_router(datasets_router(service), prefix="/v1", dependencies=auth)
    app.include_router(nodes_router(registry), prefix="/v1", dependencies=auth)
    app.include_router(pipelines_router(service, Pipelines(service, registry, config.api_token)), prefix="/v1", dependencies=auth)
    install_operator_tools(app, service, registry, distributed, config.api_token, auth)  # /dashboard, /metrics

    @app.get("/health")
    async def health() -> dict:
        return {"status": "OK", "node_id": local.node_id,
                "jobs_running": len(service.jobs.store.list(statuses=("in_progress",)))}

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError):
        errors = [
            {"field": ".".join(str(p) for p in e["loc"] if p != "body") or "body", "reason": e["msg"]}
            for e in exc.errors()
        ]
        return _error(400, errors)

    @app.exception_handler(ValueError)
    async def bad_value(_: Request, exc: ValueError):
        return _error(400, str(exc))

    @app.exception_handler(UnknownJobError)
    async def unknown_job(_: Request, exc: UnknownJobError):
        return _error(404, f"job_uuid: {exc}")

    @app.exception_handler(FileExistsError)
    @app.exception_handler(DuplicateJobError)
    async def duplicate(_: Request, exc: Exception):
        return _error(409, str(exc))

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", help="bind address (default 127.0.0.1, env TRL_FSDP_HOST)")
    parser.add_argument("--port", type=int, help="port (default 8322, env TRL_FSDP_PORT)")
    parser.add_argument("--data-dir", help="jobs, runs and datasets (env TRL_FSDP_DATA_DIR)")
    parser.add_argument("--api-token", help="require this bearer token (env TRL_FSDP_API_TOKEN)")
    parser.add_argument("--max-concurrent-jobs", type=int)
    parser.add_argument("--nproc-per-node", type=int, help="default torchrun processes per job")
    parser.add_argument("--allowed-checkpoint-root", action="append", dest="allowed_checkpoint_roots",
                        help="a directory checkpoint_dir may point into (repeatable; the data dir always is)")
    parser.add_argument("--node-id", help="this node's name (default: host name; env TRL_FSDP_NODE_ID)")
    parser.add_argument("--coordinator", help="coordinator URL to register with (env TRL_FSDP_COORDINATOR)")
    parser.add_argument("--advertise-url", help="URL other nodes use for this one (default http://HOST:PORT)")
    parser.add_argument("--address", help="this node's address for torchrun/gloo (default HOST)")
    parser.add_argument("--gloo-socket-ifname", help="network interface for gloo (env GLOO_SOCKET_IFNAME)")
    parser.add_argument("--model-dir", action="append", dest="model_dirs",
                        help="a model directory (or a folder of them) to advertise (repeatable)")
    parser.add_argument("--down-after-s", type=float, help="seconds without heartbeat before a node is down")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {
        "host": args.host, "port": args.port, "data_dir": args.data_dir, "api_token": args.api_token,
        "max_concurrent_jobs": args.max_concurrent_jobs, "allowed_checkpoint_roots": args.allowed_checkpoint_roots,
        "node_id": args.node_id, "coordinator": args.coordinator, "advertise_url": args.advertise_url,
        "address": args.address, "gloo_socket_ifname": args.gloo_socket_ifname, "model_dirs": args.model_dirs,
        "down_after_s": args.down_after_s,
    }
    config = ServiceConfig.from_env(**overrides)
    if args.nproc_per_node:
        config.torch_run.nproc_per_node = args.nproc_per_node
    import uvicorn

    log.info("serving on http://%s:%d, data in %s", config.host, config.port, config.data_path)
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning")


if __name__ == "__main__":
    main()
