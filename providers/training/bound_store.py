"""Rendezvous stores that listen on one address: torchrun's static rendezvous without a port on every interface.

torch's TCPStore server listens on `*:PORT` whatever host name it is given, so whoever reaches the host
reaches the job's store (and, under torchrun's c10d rendezvous, the agent unpickles what it reads there).
Here the store serves a socket bound to one address, through TCPStore's `master_listen_fd`: 127.0.0.1 for a
one-node job, node 0's cluster address (the master address) for a multi-node one. The store lives in the
agent (node 0's torchrun, or the forked-ranks agent) and every rank connects to it as a client
(TORCHELASTIC_USE_AGENT_STORE=True), so no rank opens a store of its own.

    python -m providers.training.bound_store -m torch.distributed.run --rdzv_backend=static-bound \\
        --rdzv_endpoint=MASTER_ADDR:PORT --rdzv_conf=rank=NODE_RANK,timeout=S ... -m providers.training.run RUN_DIR

runs torchrun (its own arguments, named as `python -m` would) with the `static-bound` rendezvous registered:
torch's static rendezvous (node rank given, no pickled state: the agent reads only JSON rank assignments and
barrier counters from the store) whose node-0 store listens on the master address only.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from datetime import timedelta

BACKEND = "static-bound"
TORCHRUN = ["-m", "torch.distributed.run"]


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host`:`port` (0: any free port), for a store to listen on; never a wildcard."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    if ipaddress.ip_address(sockaddr[0]).is_unspecified:
        raise ValueError(f"master address {host!r} is a wildcard: a job's store listens on one address only")
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(sockaddr)
    return sock


def server_store(sock: socket.socket, timeout: timedelta, world_size: int | None = None):
    """The TCPStore server on `sock` (from `listen_socket`). With `world_size`, waits for that many members
    (this one included) to connect, as torch's static rendezvous does."""
    from torch.distributed import TCPStore

    host, port = sock.getsockname()[:2]
    store = TCPStore(host, port, world_size, True, timeout, wait_for_workers=world_size is not None,
                     master_listen_fd=sock.fileno())
    sock.detach()  # the store's server owns the descriptor now
    return store


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
    except (socket.gaierror, ValueError):
        return False


def keep_on_loopback(env: dict[str, str] | os._Environ) -> None:
    """A one-node job's gloo (and NCCL bootstrap) sockets listen on loopback, unless the operator named an
    interface: by default gloo binds the host name's address, which other hosts reach."""
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("NCCL_SOCKET_IFNAME", "lo")  # read only on CUDA


def torchrun_argv(python: str, *, nnodes: int | str, nproc_per_node: int, node_rank: int | str, run_id: str,
                  endpoint: str, timeout_s: int) -> list[str]:
    """This node's agent command up to (not including) the entry point: torchrun under `static-bound`, the
    store on `endpoint` (MASTER_ADDR:PORT). Values may be shell expressions (the Slurm script's
    `"$SLURM_NODEID"`): the caller quotes the rest."""
    return [python, "-m", "providers.training.bound_store", *TORCHRUN,
            f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}", f"--rdzv_id={run_id}",
            f"--rdzv_backend={BACKEND}", f"--rdzv_endpoint={endpoint}",
            f"--rdzv_conf=rank={node_rank},timeout={timeout_s}", "--max_restarts=0"]


def create_handler(params):
    """The `static-bound` rendezvous: torch's static one, whose node-0 store listens on the master address."""
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    class BoundStaticRendezvous(StaticTCPRendezvous):
        def get_backend(self) -> str:
            return BACKEND

        def next_rendezvous(self):
            if not self._store:
                if self.rank == 0:
                    sock = listen_socket(self.master_addr, self.master_port)
                    self._store = server_store(sock, self.timeout, self.world_size)
                else:
                    self._store = TCPStore(self.master_addr, self.master_port, self.world_size, False, self.timeout)
            return super().next_rendezvous()

    if "rank" not in params.config:
        raise ValueError(f"--rdzv_conf: the {BACKEND} rendezvous needs rank=NODE_RANK")
    master_addr, master_port = parse_rendezvous_endpoint(params.endpoint.strip(), -1)
    if master_port == -1:
        raise ValueError(f"--rdzv_endpoint: {params.endpoint!r} names no port")
    if is_loopback(master_addr):  # every rank is on this host
        keep_on_loopback(os.environ)
    return BoundStaticRendezvous(master_addr, master_port, int(params.config["rank"]), params.max_nodes,
                                 params.run_id, int(params.config.get("timeout", 600)))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] != TORCHRUN:
        raise SystemExit(f"usage: python -m providers.training.bound_store {' '.join(TORCHRUN)} TORCHRUN_ARGS...")
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry
    from torch.distributed.run import main as torchrun

    rendezvous_handler_registry.register(BACKEND, create_handler)
    torchrun(argv[2:])


if __name__ == "__main__":
    main()
