"""Launcher: a job's torchrun command line, built as an argument list (no shell strings)."""

from __future__ import annotations

import socket
import sys

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from ...training.run_files import RunFiles
from ...training.spec import JobSpec


class TorchRunOptions(BaseModel):
    """torchrun settings of a job; defaults come from the service config, a request may override them."""

    model_config = ConfigDict(extra="forbid")

    nproc_per_node: PositiveInt = 2
    nnodes: PositiveInt = 1
    node_rank: int = Field(0, ge=0)
    master_addr: str = "127.0.0.1"
    master_port: int | None = Field(None, ge=1024, le=65535)  # None: a free port
    rdzv_backend: str = Field("static", pattern="^(static|c10d)$")
    rdzv_timeout_s: PositiveInt = 60  # torchrun's default is 600 s: a missing node fails the job sooner
    local_addr: str | None = None  # this node's address for the rendezvous (default: its host name)
    # Who starts the processes: local (this host), nodes (this service's node registry), slurm or ray
    # (providers/remote_fsdp/service/launchers/). None: the service's default; `nodes` when nnodes > 1.
    launcher: str | None = Field(None, pattern="^(local|nodes|slurm|ray)$")
    # How a one-node job with the static rendezvous starts its ranks: forked from one preloaded process
    # (providers/training/local_ranks.py: the training stack imported once, not once per rank) or torchrun.
    rank_start: str = Field("fork", pattern="^(fork|torchrun)$")

    def model_post_init(self, _: object) -> None:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def torchrun_command(spec: JobSpec, files: RunFiles, opts: TorchRunOptions) -> list[str]:
    """`python -m torch.distributed.run ... -m providers.training.run RUN_DIR` for this node, or for a one-node
    job with the static rendezvous `python -m providers.training.local_ranks ...` (ranks forked)."""
    port = opts.master_port or free_port()
    if opts.rank_start == "fork" and opts.nnodes == 1 and opts.rdzv_backend == "static":
        return [sys.executable, "-m", "providers.training.local_ranks", f"--nproc-per-node={opts.nproc_per_node}",
                f"--master-addr={opts.master_addr}", f"--master-port={port}", f"--run-id={spec.job_uuid}",
                str(files.dir)]
    argv = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={opts.nproc_per_node}",
        f"--nnodes={opts.nnodes}",
        f"--node_rank={opts.node_rank}",
        f"--rdzv_id={spec.job_uuid}",
        "--max_restarts=0",
    ]
    if opts.rdzv_backend == "c10d":
        conf = f"join_timeout={opts.rdzv_timeout_s}" + (",is_host=1" if opts.node_rank == 0 else ",is_host=0")
        argv += ["--rdzv_backend=c10d", f"--rdzv_endpoint={opts.master_addr}:{port}", f"--rdzv_conf={conf}"]
        if opts.local_addr:  # nodes may share a host name (containers, namespaces): name the address
            argv.append(f"--local_addr={opts.local_addr}")
    else:
        argv += ["--rdzv_backend=static", f"--master_addr={opts.master_addr}", f"--master_port={port}",
                 f"--rdzv_conf=timeout={opts.rdzv_timeout_s}"]
    return argv + ["-m", "providers.training.run", str(files.dir)]
