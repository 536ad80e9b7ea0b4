"""A job's torchrun options and command line, built as an argument list (no shell strings)."""

from __future__ import annotations

import socket
import sys

from pydantic import ConfigDict, Field, PositiveInt, field_validator

from ..training.bound_store import torchrun_argv
from ..keys import KnownKeys
from ..training.run_files import RunFiles
from ..training.spec import JobSpec
from . import NAME_PATTERN


class TorchRunOptions(KnownKeys):
    """torchrun settings of a job; defaults come from the service config, a request may override them."""

    model_config = ConfigDict(extra="forbid")

    nproc_per_node: PositiveInt = 2
    nnodes: PositiveInt = 1
    node_rank: int = Field(0, ge=0)
    master_addr: str = "127.0.0.1"
    master_port: int | None = Field(None, ge=1024, le=65535)  # None: a free port
    rdzv_backend: str = "static"  # the only one: see `only_static`
    rdzv_timeout_s: PositiveInt = 60  # torchrun's default is 600 s: a missing node fails the job sooner
    local_addr: str | None = None  # this node's address (the coordinator's placement record)
    # Who starts the processes: a name in providers/launchers' registry (local, nodes, slurm, ray).
    # None: the service's default; `nodes` when nnodes > 1.
    launcher: str | None = Field(None, pattern=NAME_PATTERN)
    # How a one-node job with the static rendezvous starts its ranks: forked from one preloaded process
    # (providers/training/local_ranks.py: the training stack imported once, not once per rank) or torchrun.
    rank_start: str = Field("fork", pattern="^(fork|torchrun)$")

    @field_validator("rdzv_backend")
    @classmethod
    def only_static(cls, value: str) -> str:
        if value != "static":
            raise ValueError(
                f"{value!r} is not accepted: torch's c10d rendezvous listens on every interface and its agent "
                "unpickles the state it reads from that store, so anyone who reaches the port runs code in the job; "
                "every job uses the static rendezvous, its store bound to loopback or the cluster address "
                "(accepted: 'static')")
        return value

    def model_post_init(self, _: object) -> None:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def torchrun_command(spec: JobSpec, files: RunFiles, opts: TorchRunOptions) -> list[str]:
    """This node's agent: for a one-node job `python -m providers.training.local_ranks ...` (ranks forked) or
    torchrun on 127.0.0.1; for a multi-node job torchrun with its store on the master address
    (`providers.training.bound_store`), then `-m providers.training.run RUN_DIR`. No store listens anywhere
    else, whatever the request says."""
    one_node = opts.nnodes == 1
    master = "127.0.0.1" if one_node else opts.master_addr
    port = opts.master_port or free_port()
    if opts.rank_start == "fork" and one_node:
        return [sys.executable, "-m", "providers.training.local_ranks", f"--nproc-per-node={opts.nproc_per_node}",
                f"--master-addr={master}", f"--master-port={port}", f"--run-id={spec.job_uuid}", str(files.dir)]
    argv = torchrun_argv(sys.executable, nnodes=opts.nnodes, nproc_per_node=opts.nproc_per_node,
                         node_rank=opts.node_rank, run_id=spec.job_uuid, endpoint=f"{master}:{port}",
                         timeout_s=opts.rdzv_timeout_s)
    return argv + ["-m", "providers.training.run", str(files.dir)]
