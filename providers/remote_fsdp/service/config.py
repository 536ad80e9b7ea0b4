"""Configuration of the FSDP training service (CLI flags and environment variables)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import BaseModel, Field, PositiveInt

from ...training.spec import FsdpSpec
from .launcher import TorchRunOptions


class ServiceConfig(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8322
    data_dir: str = "~/.llama/trl_fsdp_service"
    api_token: str | None = None  # set: every /v1 route needs `Authorization: Bearer <token>`
    # checkpoint_dir in a request must lie under one of these (the data dir is always allowed)
    allowed_checkpoint_roots: list[str] = Field(default_factory=list)
    max_concurrent_jobs: PositiveInt = 1
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

    @property
    def url(self) -> str:
        return (self.advertise_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def node_address(self) -> str:
        return self.address or (self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    def checkpoint_roots(self) -> list[str]:
        return [str(self.data_path), *self.allowed_checkpoint_roots]

    @classmethod
    def from_env(cls, **overrides) -> ServiceConfig:
        """Defaults, then TRL_FSDP_* / NODE_RANK / MASTER_ADDR from the environment, then explicit values."""
        env = os.environ
        values: dict = {}
        for key, var in (("host", "TRL_FSDP_HOST"), ("port", "TRL_FSDP_PORT"), ("data_dir", "TRL_FSDP_DATA_DIR"),
                         ("api_token", "TRL_FSDP_API_TOKEN"), ("coordinator", "TRL_FSDP_COORDINATOR"),
                         ("node_id", "TRL_FSDP_NODE_ID"), ("gloo_socket_ifname", "GLOO_SOCKET_IFNAME")):
            if env.get(var):
                values[key] = env[var]
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
