"""The FSDP training service app and its command line (`trl-fsdp-service`, port 8322 by default).

`create_app` builds the core (post-training, dataset and node routes, jobs, nodes, distributed jobs,
launchers, security) and then mounts the add-ons listed in ADDONS, each with one call."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import secrets
import signal
import sqlite3
import sys
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ...errors import ClientError, first_validation_error
from ...training.keys import error_loc
from ...training.optional_imports import leave_out

from ... import openai_ft, operator_tools, pipelines, tinker_api, workflows
from ...jobs.child_env import parse_pass_env
from ...jobs.manager import QueueFullError
from ...outbound import read_outbound_config
from ...versions import warn_untested_versions
from ...jobs.store import StoreTooNew, StoreUnavailable, UnknownJobError
from ...launchers import LAUNCHERS
from ...launchers.base import LauncherUnavailable
from ...launchers.nodes import NodesLauncher
from .config import LaunchersConfig, ServiceConfig, read_secret
from .core import ServiceCore
from .quota import attach as attach_user_quotas, usage_router
from .users import client_auth, install_auth_errors, read_users_file, require_admin
from .jobs import FsdpJobService
from .nodes import HeartbeatSender, Node, NodeRegistry, Registration, local_capabilities
from .docs import install_offline_docs
from .routes import (
    datasets_router,
    job_parts_router,
    node_membership_router,
    nodes_router,
    post_training_router,
)
from .security import (
    BodyTooLarge,
    LimitsAndAudit,
    PrintableFormatter,
    QuotaExceeded,
    audit,
    install_printable_logs,
    node_auth,
    node_headers,
)

log = logging.getLogger("providers.remote_fsdp")

# The add-ons, in the order their routes are mounted: each is a package whose `install(app, core)` mounts it.
ADDONS = (
    pipelines,  # teacher-student pipelines, teacher and student tasks, adapter merges
    workflows,  # OpenAI chat, data enhancement, validation, export, enhance -> train -> validate -> export
    operator_tools,  # /dashboard, /metrics
    openai_ft,  # the OpenAI files and fine-tuning API (after workflows: its `ft:` models resolve in chat)
    tinker_api,  # the Tinker API (/api/v1) for the `tinker` SDK: sessions, resident LoRA models, sampling
)


def _error(status: int, detail) -> JSONResponse:
    # Llama Stack clients retry 5xx answers, POSTs included, unless told not to.
    return JSONResponse(status_code=status, content={"detail": detail}, headers={"x-should-retry": "false"})


def create_app(config: ServiceConfig) -> FastAPI:
    warn_untested_versions()
    service = FsdpJobService(config)
    local = Node(node_id=config.node_id, url=config.url, capabilities=local_capabilities(
        config.model_dirs, config.node_address, config.gloo_socket_ifname))
    registry = NodeRegistry(config.data_path / "nodes.json", local, down_after_s=config.down_after_s,
                            local_load=service.local_load)
    peer_headers = node_headers(config.api_token, config.node_token)
    nodes = NodesLauncher(service, registry, peer_headers)
    service.attach_nodes(nodes)
    heartbeat = None
    if config.coordinator:
        heartbeat = HeartbeatSender(
            config.coordinator, Registration(node_id=local.node_id, url=local.url, capabilities=local.capabilities),
            peer_headers, service.local_load,
            config.heartbeat_interval_s, lost_after_s=config.down_after_s,
            on_lost=lambda silent_s: nodes.stop_parts_of_lost_coordinator(silent_s, config.coordinator),
            parts=nodes.running_parts,
            on_ended=lambda ended: nodes.stop_parts_of_ended_jobs(ended, config.coordinator),
        )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        registry.answering()
        if heartbeat:
            heartbeat.start()
        yield
        if heartbeat:
            heartbeat.stop.set()
        for stop in core.on_shutdown:
            stop()
        nodes.shutdown()  # the other nodes' parts of running multi-node jobs, before this node's stop
        service.jobs.shutdown()

    app = FastAPI(title="TRL FSDP post-training service", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.registry = registry

    keys = config.user_keys()
    if keys is not None:
        service.jobs.limits_of = keys.limits_of
    internal_key = secrets.token_urlsafe(32)  # the service's calls to its own routes; never leaves this process
    auth = [Depends(client_auth(keys, config.node_token, internal_key))]
    node_only = [Depends(node_auth(config.node_token))]
    for prefix in ("/v1/post-training", "/v1alpha/post-training"):
        app.include_router(post_training_router(service), prefix=prefix, dependencies=auth)
    app.include_router(job_parts_router(service, config), prefix="/v1/post-training", dependencies=node_only)
    app.include_router(datasets_router(service), prefix="/v1", dependencies=auth)
    quotas = attach_user_quotas(service, keys)  # each claim on --max-data-gb is its user's too (max_data_gb)
    app.include_router(usage_router(quotas, keys), prefix="/v1", dependencies=[*auth, Depends(require_admin)])
    app.include_router(nodes_router(registry), prefix="/v1", dependencies=auth)
    app.include_router(node_membership_router(registry, nodes.ended_parts), prefix="/v1", dependencies=node_only)
    core = ServiceCore(config, service, registry, peer_headers, auth, node_only, internal_key,
                       upload_prefixes=["/v1/datasets/"])
    for addon in ADDONS:
        addon.install(app, core)
    install_offline_docs(app)
    app.add_middleware(LimitsAndAudit, body_limit=config.max_body_mb << 20, upload_limit=config.max_upload_mb << 20,
                       upload_prefixes=tuple(core.upload_prefixes))

    @app.get("/health")
    async def health() -> dict:
        # 200 while degraded (a full or unwritable store): reads work and a restart would not help, so a
        # liveness probe must not kill it; "problems" says what an operator has to fix.
        problems = service.jobs.problems()
        return {"status": "degraded" if problems else "OK", **({"problems": problems} if problems else {}),
                "node_id": local.node_id, "jobs_running": len(service.jobs.store.list(statuses=("in_progress",)))}

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError):
        errors = [
            {"field": ".".join(str(p) for p in error_loc(e) if p != "body") or "body", "reason": e["msg"]}
            for e in exc.errors()
        ]
        return _error(400, errors)

    install_auth_errors(app)

    @app.exception_handler(ClientError)
    async def client_error(_: Request, exc: ClientError):
        return _error(exc.status, str(exc))

    @app.exception_handler(ValidationError)
    async def invalid(_: Request, exc: ValidationError):
        # A request body validated inside a handler (a job part, a pending job's stored request).
        return _error(400, first_validation_error(exc))

    @app.exception_handler(UnknownJobError)
    async def unknown_job(_: Request, exc: UnknownJobError):
        return _error(404, f"job_uuid: {exc}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # Not the client's fault (ClientError says that): a 500 whose id the log repeats beside the traceback.
        error_id = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s: %s: %s", error_id, request.method, request.url.path,
                  type(exc).__name__, exc, exc_info=exc)
        return _error(500, f"internal error (error id {error_id}): the service's log has the details")

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(_: Request, exc: StoreUnavailable):
        return _error(507 if exc.full else 503, str(exc))

    @app.exception_handler(OSError)
    async def os_error(request: Request, exc: OSError):
        # A full or read-only disk is the host's state, not a bug: say which and where.
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return _error(507, f"no space left on device writing {exc.filename or config.data_path}: free space "
                               "there, then send again")
        if exc.errno == errno.EROFS:
            return _error(503, f"read-only file system at {exc.filename or config.data_path}")
        return await internal_error(request, exc)

    @app.exception_handler(QueueFullError)
    async def queue_full(_: Request, exc: QueueFullError):
        return _error(429, str(exc))

    @app.exception_handler(QuotaExceeded)
    async def quota_exceeded(_: Request, exc: QuotaExceeded):
        return _error(507, str(exc))

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Request, exc: BodyTooLarge):
        return _error(413, f"body: over this route's limit of {exc.limit} bytes")

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", help="bind address (default 127.0.0.1, env TRL_FSDP_HOST)")
    parser.add_argument("--port", type=int, help="port (default 8322, env TRL_FSDP_PORT)")
    parser.add_argument("--data-dir", help="jobs, runs and datasets (env TRL_FSDP_DATA_DIR)")
    parser.add_argument("--api-token-file", help="file holding the clients' bearer token (env TRL_FSDP_API_TOKEN "
                                                 "also works; a token on the command line is visible in ps)")
    parser.add_argument("--api-token", help=argparse.SUPPRESS)  # deprecated: visible in ps
    parser.add_argument("--api-keys-file", help="YAML/JSON file of users: name, role (admin|member), key_sha256 and "
                                                "limits; each user sees only its own jobs, files and models "
                                                "(docs/security.md)")
    parser.add_argument("--node-token-file", help="file holding the cluster's node (join) token: needed to take "
                                                  "or join nodes (env TRL_FSDP_NODE_TOKEN)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="serve a non-loopback address without an API token (anyone who reaches it can train "
                             "and read models)")
    parser.add_argument("--max-concurrent-jobs", type=int)
    parser.add_argument("--max-queued-jobs", type=int, help="queued jobs beyond this are refused (429)")
    parser.add_argument("--max-body-mb", type=int, help="JSON request bodies (default 64)")
    parser.add_argument("--max-upload-mb", type=int, help="dataset and archive uploads (default 4096)")
    parser.add_argument("--max-archive-mb", type=int, help="extracted size of an uploaded archive (default 4096)")
    parser.add_argument("--max-data-gb", type=float, help="uploads and downloads the data dir may hold in all "
                                                          "(datasets, teacher outputs, files; default 200): 507 past it")
    parser.add_argument("--chat-workers", type=int, help="chat generations running at once (default 2)")
    parser.add_argument("--chat-queue", type=int, help="chat requests waiting for a worker; beyond it 429 (default 16)")
    parser.add_argument("--chat-max-tokens", type=int, help="the most max_tokens a chat request may ask (default 4096)")
    parser.add_argument("--pass-env", action="append", default=[], metavar="KIND=VAR",
                        help="hand the secret variable VAR to child processes of KIND (training, validation, "
                             "export), e.g. training=WANDB_API_KEY; they get no other secret (repeatable)")
    parser.add_argument("--nproc-per-node", type=int, help="default torchrun processes per job")
    parser.add_argument("--allowed-checkpoint-root", action="append", dest="allowed_checkpoint_roots",
                        help="a directory checkpoint_dir may point into (repeatable; DATA_DIR/checkpoints always is)")
    parser.add_argument("--allowed-model-root", action="append", dest="allowed_model_roots",
                        help="a directory models may be read from (repeatable; the --model-dir entries and the "
                             "Hugging Face cache always are)")
    parser.add_argument("--node-id", help="this node's name (default: host name; env TRL_FSDP_NODE_ID)")
    parser.add_argument("--coordinator", help="coordinator URL to register with (env TRL_FSDP_COORDINATOR)")
    parser.add_argument("--advertise-url", help="URL other nodes use for this one (default http://ADDRESS:PORT)")
    parser.add_argument("--address", help="this node's address for torchrun/gloo (default HOST)")
    parser.add_argument("--gloo-socket-ifname", help="network interface for gloo (env GLOO_SOCKET_IFNAME)")
    parser.add_argument("--model-dir", action="append", dest="model_dirs",
                        help="a model directory (or a folder of them) to advertise and allow (repeatable)")
    parser.add_argument("--down-after-s", type=float, help="seconds without heartbeat before a node is down")
    parser.add_argument("--progress-timeout-s", type=int,
                        help="a rank without a training step or heartbeat for this long fails its job (default 300; "
                             "a job's training_config.scheduling.progress_timeout_s overrides it)")
    parser.add_argument("--launchers-config", help=f"YAML file: which launchers jobs may use ({', '.join(LAUNCHERS)}), "
                                                   "their settings and the shared run dir "
                                                   "(env TRL_FSDP_LAUNCHERS_CONFIG; docs/clusters.md)")
    parser.add_argument("--outbound-config", help="YAML file: chat endpoints (and their key variables) requests may "
                                                  "name, the Hub token and namespaces exports may push to, Hub "
                                                  "downloads (env TRL_FSDP_OUTBOUND_CONFIG; default: none of them)")
    parser.add_argument("--tinker-config", help="YAML file: the Tinker API's limits (per request, sessions, how "
                                                "long an idle model stays in memory; docs/tinker.md)")
    parser.add_argument("--log-requests-to-stderr", action="store_true",
                        help="print each request's audit line on stderr too (always in DATA_DIR/logs/service.log)")
    args = parser.parse_args(argv)
    leave_out(("bitsandbytes",))  # this process serves and merges models; only its 4-bit probe brings it back
    # force: importing llama_stack installs its own root handler at WARNING, which would hide the service's lines.
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)
    install_printable_logs()  # request data in any log line is escaped: one record, one line
    if not args.log_requests_to_stderr:
        # One audit line per request would flood the terminal where `--watch` draws; the log file keeps them.
        logging.getLogger().handlers[0].addFilter(lambda record: not record.name.startswith(audit.name))
    overrides = {
        "host": args.host, "port": args.port, "data_dir": args.data_dir, "api_token": args.api_token,
        "max_concurrent_jobs": args.max_concurrent_jobs, "max_queued_jobs": args.max_queued_jobs,
        "max_body_mb": args.max_body_mb, "max_upload_mb": args.max_upload_mb, "max_archive_mb": args.max_archive_mb,
        "allowed_checkpoint_roots": args.allowed_checkpoint_roots, "allowed_model_roots": args.allowed_model_roots,
        "node_id": args.node_id, "coordinator": args.coordinator, "advertise_url": args.advertise_url,
        "address": args.address, "gloo_socket_ifname": args.gloo_socket_ifname, "model_dirs": args.model_dirs,
        "down_after_s": args.down_after_s, "insecure_no_auth": args.insecure_no_auth or None,
        "max_data_gb": args.max_data_gb, "chat_workers": args.chat_workers, "chat_queue": args.chat_queue,
        "chat_max_tokens": args.chat_max_tokens, "progress_timeout_s": args.progress_timeout_s,
    }
    try:
        overrides["pass_env"] = parse_pass_env(args.pass_env)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.api_token_file:
        overrides["api_token"] = read_secret(args.api_token_file, "--api-token-file")
    if args.api_keys_file:
        if args.api_token_file or args.api_token or os.environ.get("TRL_FSDP_API_TOKEN"):
            raise SystemExit("--api-keys-file: give it alone (an admin's key belongs in it), not beside "
                             "--api-token-file or TRL_FSDP_API_TOKEN")
        overrides["api_keys"] = read_users_file(args.api_keys_file)
    if args.node_token_file:
        overrides["node_token"] = read_secret(args.node_token_file, "--node-token-file")
    launchers_file = args.launchers_config or os.environ.get("TRL_FSDP_LAUNCHERS_CONFIG")
    if launchers_file:
        overrides["launchers"] = read_launchers_config(launchers_file)
    outbound_file = args.outbound_config or os.environ.get("TRL_FSDP_OUTBOUND_CONFIG")
    if outbound_file:
        overrides["outbound"] = read_outbound_config(outbound_file)
    if args.tinker_config:
        from ...config_file import read_section
        from ...tinker_api.limits import TinkerLimits

        overrides["tinker"] = read_section(args.tinker_config, "--tinker-config", "tinker", TinkerLimits)
    config = ServiceConfig.from_env(**overrides)
    if args.nproc_per_node:
        config.torch_run.nproc_per_node = args.nproc_per_node
    check_exposure(config)
    import uvicorn

    # Access lines come from our audit log (client, route, status), which never prints headers.
    try:
        log_file = log_to_file(config.data_path)
        app = create_app(config)
    except LauncherUnavailable as e:
        raise SystemExit(str(e)) from None
    except (StoreUnavailable, StoreTooNew, OSError, sqlite3.Error) as e:
        # One line saying what to fix, never a traceback: a read-only, full, missing or locked data dir, or
        # one a newer version wrote.
        raise SystemExit(f"cannot start: data dir {config.data_path}: {e}") from None
    # llama_stack's logging set-up (run on its first import) puts every logger that exists then at WARNING: ours
    # too when one of our modules made its logger first. The service's levels are basicConfig's.
    for name, logger in logging.root.manager.loggerDict.items():
        if name.startswith("providers") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.NOTSET)
    # uvicorn re-raises SIGTERM after its graceful shutdown: with the default action the process would die
    # before its exit handlers run (the zygote's temporary directory would stay behind).
    signal.signal(signal.SIGTERM, lambda *_: exit_after_handlers(128 + signal.SIGTERM))
    log.info("serving on %s, dashboard %s/dashboard/, log %s", config.url, config.url, log_file)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_file(data_path: Path) -> Path:
    """Send every log line of the service (audit lines included) to DATA_DIR/logs/service.log as well,
    rotated at 10 MB with 5 old files kept; returns the file's path."""
    from logging.handlers import RotatingFileHandler

    class LogFile(RotatingFileHandler):
        def handleError(self, record: logging.LogRecord) -> None:
            # A full disk: the service serves on (degraded, as /health says); a traceback on stderr for every
            # line it could not write would bury the lines stderr still gets.
            pass

    path = data_path / "logs" / "service.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = LogFile(path, maxBytes=10 * 2**20, backupCount=5, encoding="utf-8")
    handler.setFormatter(PrintableFormatter(LOG_FORMAT))  # one record, one line, as on stderr
    logging.getLogger().addHandler(handler)
    return path


def exit_after_handlers(code: int) -> None:
    """Run the exit handlers (the zygote's temporary directory, logging) and leave without the interpreter's
    teardown: with transformers' Trainer imported, its final garbage collections take seconds of CPU."""
    import atexit

    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def read_launchers_config(path: str) -> LaunchersConfig:
    """The launchers' settings from a YAML (or JSON) file; a bad file stops start-up naming the key."""
    from ...config_file import read_section

    return read_section(path, "--launchers-config", "launchers", LaunchersConfig)


def check_exposure(config: ServiceConfig) -> None:
    """Refuse to serve a network address without a token: whoever reaches the port could run training
    code and read every model. `--insecure-no-auth` overrides, loudly."""
    if config.loopback_only:
        return
    if config.user_keys() is None:
        if not config.insecure_no_auth:
            raise SystemExit(
                f"refusing to serve {config.host} without an API token: anyone who can reach it could train and "
                "read models. Give --api-token-file FILE (or TRL_FSDP_API_TOKEN), bind 127.0.0.1, or pass "
                "--insecure-no-auth if this network is yours alone."
            )
        log.warning("SERVING %s WITHOUT AUTHENTICATION (--insecure-no-auth): anyone who reaches port %d can "
                    "start training jobs and read models", config.host, config.port)
    if config.coordinator and not (config.advertise_url or config.address) and config.host in ("0.0.0.0", "::"):
        raise SystemExit("a worker bound to a wildcard address needs --advertise-url (or --address): other "
                         f"nodes cannot reach http://{config.host}:{config.port}")


if __name__ == "__main__":
    main()
