"""Configuration of the FSDP training service (CLI flags and environment variables)."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from ...launchers import LAUNCHERS, LauncherName, settings_model
from ...launchers.torchrun import TorchRunOptions
from ...outbound import OutboundConfig
from ...tinker_api.limits import TinkerLimits
from .users import UserEntry, UserKeys
from ...training.spec import FsdpSpec


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_secret(path: str, what: str) -> str:
    """A token from a file (its first line): tokens on the command line are visible in `ps`."""
    try:
        token = Path(path).expanduser().read_text().strip().splitlines()[0].strip()
    except (OSError, IndexError):
        raise SystemExit(f"{what}: cannot read a token from {path}") from None
    if len(token) < 16:
        raise SystemExit(f"{what}: the token in {path} is shorter than 16 characters")
    return token


class LaunchersConfig(BaseModel):
    """Which launchers jobs may ask for (torch_run_config.launcher) and their settings: one section per
    launcher (`slurm:`, `ray:`), validated by that launcher's own model (the registry's `settings`), so this
    module imports only the launchers a config enables or configures."""

    model_config = ConfigDict(extra="allow")  # the launchers' sections; any other key is refused in _sections
    enabled: list[LauncherName] = Field(default_factory=lambda: ["local", "nodes"])
    default: LauncherName = "local"
    # Run directories (spec, status, logs, checkpoints) of slurm/ray jobs: a file system every cluster node
    # mounts. Default: the service's data dir (enough for one-host clusters and tests).
    shared_dir: str | None = None
    # Where the job's hosts mount what this host sees (this host's directory -> theirs, e.g. {"/srv/trl":
    # "/mnt/trl"}): the run dir and every path in spec.json as the job sees them. Empty: the same paths.
    path_map: dict[str, str] = Field(default_factory=dict)
    python: str | None = None  # the interpreter on the cluster's nodes (default: this service's)

    @field_validator("path_map")
    @classmethod
    def _absolute(cls, value: dict[str, str]) -> dict[str, str]:
        for here, there in value.items():
            if not (here.startswith("/") and there.startswith("/")):
                raise ValueError(f"launchers.path_map: {here!r} -> {there!r}: both sides must be absolute paths")
        return value

    @model_validator(mode="after")
    def _sections(self) -> LaunchersConfig:
        if self.default not in self.enabled:
            raise ValueError(f"launchers.default: {self.default!r} is not in launchers.enabled {self.enabled}")
        sections = self.__pydantic_extra__ or {}
        configurable = [name for name, entry in LAUNCHERS.items() if entry.settings]
        for key in sections:
            if key not in configurable:
                raise ValueError(f"launchers.{key}: unknown key; launcher sections: {', '.join(configurable)}")
        for name in configurable:
            if name in sections or name in self.enabled:
                try:
                    sections[name] = settings_model(name).model_validate(sections.get(name) or {})
                except ValidationError as e:
                    first = e.errors()[0]
                    msg = first["msg"].removeprefix("Value error, ")
                    where = ".".join(["launchers", name, *(str(p) for p in first["loc"])])
                    raise ValueError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        return self

    def section(self, name: str) -> BaseModel:
        """Launcher `name`'s settings (its defaults where the config has no section for it)."""
        return (self.__pydantic_extra__ or {}).get(name) or settings_model(name)()


class ServiceConfig(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8322
    data_dir: str = "~/.llama/trl_fsdp_service"
    api_token: str | None = None  # set: every /v1 route needs `Authorization: Bearer <token>` (one admin key)
    # --api-keys-file: the users, each a key (by its SHA-256), a role and limits (service/users.py)
    api_keys: list[UserEntry] | None = None
    # The nodes' credential (a join token, separate from the clients' API token): registration, heartbeats
    # and the parts of multi-node jobs a coordinator sends carry it. Unset: this service takes no nodes
    # and no job parts.
    node_token: str | None = None
    insecure_no_auth: bool = False  # serve a non-loopback address without a token (loudly)
    # checkpoint_dir in a request must lie under DATA_DIR/checkpoints or one of these
    allowed_checkpoint_roots: list[str] = Field(default_factory=list)
    # model directories in a request must lie under one of these, the model dirs or the HF cache
    allowed_model_roots: list[str] = Field(default_factory=list)
    max_concurrent_jobs: PositiveInt = 1
    max_queued_jobs: PositiveInt = 100
    max_pipelines: PositiveInt = 20  # pipelines running at once
    max_body_mb: PositiveInt = 64  # JSON request bodies
    max_upload_mb: PositiveInt = 4096  # dataset uploads (streamed to disk)
    max_archive_mb: PositiveInt = 4096  # extracted size of an archive (teacher outputs, results)
    max_archive_members: PositiveInt = 100_000
    # Uploads and downloads in the data dir, in all (datasets, teacher outputs, downloaded files): 507 past it
    max_data_gb: float = Field(200.0, gt=0, allow_inf_nan=False)
    # The chat API: generations run on their own threads, never on the ones control routes use
    chat_workers: PositiveInt = 2  # generations at once
    chat_queue: int = Field(16, ge=0)  # requests waiting for a worker; beyond: 429
    chat_max_tokens: PositiveInt = 4096  # a request asking for more: 400 naming max_tokens
    # Secrets a kind of child process (training, validation, export) gets anyway (--pass-env KIND=VAR)
    pass_env: dict[str, list[str]] = Field(default_factory=dict)
    max_nproc_per_node: PositiveInt = 64
    dtype: str = "fp32"
    fsdp: FsdpSpec = Field(default_factory=FsdpSpec)
    torch_run: TorchRunOptions = Field(default_factory=TorchRunOptions)
    # Nodes: a worker names its coordinator; every node advertises how it is reached.
    node_id: str = Field(default_factory=socket.gethostname)
    coordinator: str | None = None  # e.g. http://10.0.0.1:8322: register there and send heartbeats
    advertise_url: str | None = None  # default http://HOST:PORT
    address: str | None = None  # torchrun master address / gloo address of this node; default HOST
    gloo_socket_ifname: str | None = None  # network interface gloo uses (GLOO_SOCKET_IFNAME)
    model_dirs: list[str] = Field(default_factory=list)  # models on disk, advertised to the coordinator
    heartbeat_interval_s: float = 2.0
    down_after_s: float = 10.0  # a node that sent no heartbeat for this long is down
    # A rank without a training step or heartbeat for this long fails its job (a job's
    # training_config.scheduling.progress_timeout_s overrides it); collectives time out 60 s after it.
    progress_timeout_s: PositiveInt = 300
    launchers: LaunchersConfig = Field(default_factory=LaunchersConfig)
    # Endpoints, keys, Hub namespaces and downloads the operator allows (--outbound-config); default: none
    outbound: OutboundConfig = Field(default_factory=OutboundConfig)
    tinker: TinkerLimits = Field(default_factory=TinkerLimits)  # the Tinker API's limits (--tinker-config)

    @property
    def url(self) -> str:
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        # A wildcard bind is no address another node can call: advertise this node's address instead.
        return f"http://{self.node_address}:{self.port}"

    def user_keys(self) -> UserKeys | None:
        """The keys clients authenticate with: the users file's, else the one admin token; None: no keys
        (loopback only: every request acts as the local admin)."""
        if self.api_keys:
            return UserKeys(self.api_keys)
        return UserKeys.single_admin(self.api_token) if self.api_token else None

    @property
    def loopback_only(self) -> bool:
        return is_loopback(self.host)

    def model_roots(self) -> list[str]:
        return [*self.model_dirs, *self.allowed_model_roots]

    @property
    def node_address(self) -> str:
        return self.address or (self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def shared_path(self) -> Path:
        """Where run directories live: the launchers' shared dir, else the data dir."""
        shared = self.launchers.shared_dir
        return Path(shared).expanduser().resolve() if shared else self.data_path


    @classmethod
    def from_env(cls, **overrides) -> ServiceConfig:
        """Defaults, then TRL_FSDP_* / NODE_RANK / MASTER_ADDR from the environment, then explicit values."""
        env = os.environ
        values: dict = {}
        for key, var in (("host", "TRL_FSDP_HOST"), ("port", "TRL_FSDP_PORT"), ("data_dir", "TRL_FSDP_DATA_DIR"),
                         ("api_token", "TRL_FSDP_API_TOKEN"), ("node_token", "TRL_FSDP_NODE_TOKEN"),
                         ("coordinator", "TRL_FSDP_COORDINATOR"),
                         ("node_id", "TRL_FSDP_NODE_ID"), ("gloo_socket_ifname", "GLOO_SOCKET_IFNAME")):
            if env.get(var):
                values[key] = env[var]
        for key, var in (("allowed_model_roots", "TRL_FSDP_ALLOWED_MODEL_ROOTS"),
                         ("allowed_checkpoint_roots", "TRL_FSDP_ALLOWED_CHECKPOINT_ROOTS")):
            if env.get(var):
                values[key] = [p for p in env[var].split(os.pathsep) if p]
        torch_run = {}
        if env.get("NODE_RANK"):
            torch_run["node_rank"] = int(env["NODE_RANK"])
        if env.get("MASTER_ADDR"):
            torch_run["master_addr"] = env["MASTER_ADDR"]
        if env.get("NNODES"):
            torch_run["nnodes"] = int(env["NNODES"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        if torch_run:
            values["torch_run"] = {**torch_run, **values.get("torch_run", {})}
        return cls(**values)
