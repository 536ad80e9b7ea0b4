"""The node registry: the machines jobs can be placed on, what each has, and which are up.

Every machine runs the same service; workers register with a coordinator and send heartbeats (the HTTP side:
providers/remote_fsdp/service/nodes.py and routes.py). Nodes are named (a URL each); nothing scans the network.
A node that misses heartbeats for `down_after_s` is marked down and gets no new work; jobs with parts on it
fail (providers/launchers/nodes.py). It sits below the launchers and the service: both place work with it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import BadRequest, ClientError, Conflict
from ..state_files import load_state, save_state
from ..training.spec import SAFE_NAME, ResourceRequest

HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,253}[A-Za-z0-9])?$")
FINITE = ConfigDict(allow_inf_nan=False)

log = logging.getLogger("providers.remote_fsdp")


def host_is(host: str, address: str) -> bool:
    """Whether `host` (an IP or a name) is `address`."""
    try:
        peer = ipaddress.ip_address(address)
    except ValueError:
        return host == address
    try:
        return ipaddress.ip_address(host) == peer
    except ValueError:
        pass
    try:
        return any(ipaddress.ip_address(info[4][0]) == peer for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


class Gpu(BaseModel):
    model_config = FINITE
    name: str = Field(max_length=200)
    memory_gb: float = Field(ge=0, le=10_000)


class Capabilities(BaseModel):
    """What a node says it has. Bounded: a node claiming absurd hardware would attract every task."""

    model_config = FINITE
    cpu_cores: int = Field(ge=1, le=100_000)
    ram_gb: float = Field(ge=0, le=1_000_000)
    gpus: list[Gpu] = Field(default_factory=list, max_length=64)
    models: list[str] = Field(default_factory=list, max_length=10_000)  # model directories on this node's disk
    address: str = Field("127.0.0.1", max_length=255)  # how other nodes reach this one (torchrun master_addr, gloo)
    gloo_socket_ifname: str | None = Field(None, max_length=64)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            if not HOSTNAME.fullmatch(v):
                raise ValueError(f"{v[:100]!r} is not an IP address or host name") from None
            return v

    @property
    def gpu_memory_gb(self) -> float:
        return sum(g.memory_gb for g in self.gpus)


def requested(resources: ResourceRequest) -> bool:
    """Whether a task asks for any resources at all (all zero: it fits every node)."""
    return any(getattr(resources, f) for f in ResourceRequest.model_fields)


def describe(resources: ResourceRequest) -> str:
    """A request in words: '>= 2 GPUs, >= 16 GB GPU memory'."""
    parts = [f">= {resources.gpus} GPUs" if resources.gpus else "",
             f">= {resources.gpu_memory_gb:g} GB GPU memory" if resources.gpu_memory_gb else "",
             f">= {resources.cpu_cores} CPU cores" if resources.cpu_cores else "",
             f">= {resources.ram_gb:g} GB RAM" if resources.ram_gb else ""]
    return ", ".join(p for p in parts if p) or "any resources"


def misfit(capabilities: Capabilities, resources: ResourceRequest) -> str | None:
    """Why a node with `capabilities` cannot hold one node's share of a task asking for `resources`
    ('1 GPUs (needs 2), 8 GB GPU memory (needs 16)'), or None when it fits."""
    c = capabilities
    short = [
        f"{len(c.gpus)} GPUs (needs {resources.gpus})" if len(c.gpus) < resources.gpus else "",
        f"{c.gpu_memory_gb:g} GB GPU memory (needs {resources.gpu_memory_gb:g})"
        if c.gpu_memory_gb < resources.gpu_memory_gb else "",
        f"{c.cpu_cores} CPU cores (needs {resources.cpu_cores})" if c.cpu_cores < resources.cpu_cores else "",
        f"{c.ram_gb:g} GB RAM (needs {resources.ram_gb:g})" if c.ram_gb < resources.ram_gb else "",
    ]
    return ", ".join(s for s in short if s) or None


class Node(BaseModel):
    node_id: str
    url: str
    capabilities: Capabilities
    state: str = "up"  # up | down
    load: int = 0  # jobs running
    registered_at: float = Field(default_factory=time.time)
    last_heartbeat: float = Field(default_factory=time.time)
    registered_from: str | None = None  # the address its registration came from: its heartbeats must too


class NotFromNode(ClientError):
    """A heartbeat sent from another address than its node's."""

    status = 403


class Registration(BaseModel):
    model_config = FINITE
    node_id: str = Field(pattern=SAFE_NAME)
    url: str = Field(max_length=512)
    capabilities: Capabilities


class Heartbeat(BaseModel):
    load: int = Field(0, ge=0, le=100_000)
    # The multi-node jobs this node runs a part of: the coordinator answers which of them have ended there.
    parts: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=1_000)


class HeartbeatAnswer(Node):
    """The coordinator's answer to a heartbeat: the node as registered, and the parts it should stop (job_uuid ->
    how the job ended): a cancel sent while the node was stopped or cut off may never have reached it."""

    ended_parts: dict[str, str] = Field(default_factory=dict)


def models_on_disk(model_dirs: list[str]) -> list[str]:
    """The model directories (config.json) the operator's --model-dir folders are or hold, one level down."""
    models = []
    for root in model_dirs:
        root_path = Path(root).expanduser()
        if (root_path / "config.json").exists():
            models.append(str(root_path))
        models += sorted(str(p.parent) for p in root_path.glob("*/config.json"))
    return models


def local_capabilities(model_dirs: list[str], address: str, gloo_socket_ifname: str | None) -> Capabilities:
    from ..training.devices import cuda_available

    gpus = []
    if cuda_available():
        import torch

        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(Gpu(name=p.name, memory_gb=round(p.total_memory / 2**30, 1)))
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return Capabilities(cpu_cores=os.cpu_count() or 1, ram_gb=round(ram_gb, 1), gpus=gpus,
                        models=models_on_disk(model_dirs),
                        address=address, gloo_socket_ifname=gloo_socket_ifname)


class NodeRegistry:
    """The coordinator's view of its nodes (itself included), persisted so a restart keeps them."""

    def __init__(self, path: Path, local: Node, down_after_s: float = 10.0, local_load=None):
        self.path = path
        self.local = local
        self.down_after_s = down_after_s
        # This node sends itself no heartbeat: its load is counted when asked (jobs running on this host).
        self.local_load = local_load or (lambda: 0)
        self._lock = threading.Lock()
        # A restart is not a missed heartbeat: nodes loaded from the file get down_after_s from when the service
        # answers (`answering`) to beat, so that the jobs they run can be followed again (re-attached) rather than
        # failed at once. Until then no node is judged: building the app may take seconds on a loaded machine
        # while the followers of those jobs already ask for the nodes' states.
        self._since: float | None = None
        self._nodes: dict[str, Node] = {local.node_id: local}
        for raw in load_state(path, default=[]):
            try:
                node = Node(**raw)
            except (TypeError, ValueError) as e:
                log.error("nodes file %s: skipping an unreadable entry: %s", path, e)
                continue
            if node.node_id != local.node_id:
                self._nodes[node.node_id] = node

    def _save(self) -> None:
        remote = [n.model_dump() for n in self._nodes.values() if n.node_id != self.local.node_id]
        save_state(self.path, remote)

    def register(self, reg: Registration, peer: str | None = None) -> Node:
        """Add a node, or renew a known one, registered from address `peer`. A node id that is up under another
        URL is not taken over (a second machine, or an impostor, must pick its own name)."""
        with self._lock:
            if reg.node_id == self.local.node_id:
                raise BadRequest(f"node_id: {reg.node_id!r} is this coordinator's own name")
            url = reg.url.rstrip("/")
            known = self._nodes.get(reg.node_id)
            if known is not None and known.url != url and time.time() - known.last_heartbeat <= self.down_after_s:
                raise Conflict(f"node_id: {reg.node_id!r} is registered and up at {known.url}; "
                                      "a node cannot take over another's name")
            node = Node(node_id=reg.node_id, url=url, capabilities=reg.capabilities, registered_from=peer)
            self._nodes[node.node_id] = node
            self._save()
        log.info("node %s registered at %s%s", node.node_id, node.url,
                 f" (was {known.url})" if known is not None and known.url != url else "")
        return node

    def answering(self) -> None:
        """The service answers from now: the grace of the nodes loaded from the file starts here, not when the
        registry was built (start-up between the two must not count as their missed heartbeats)."""
        self._since = time.time()

    def heartbeat(self, node_id: str, beat: Heartbeat, peer: str | None = None) -> Node:
        """A heartbeat from address `peer`: only the address the node registered from may send it (NotFromNode
        otherwise: a node token alone must not revive another machine's node or learn how its jobs ended)."""
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None:
                raise KeyError(node_id)
            if node_id == self.local.node_id:
                raise BadRequest(f"node_id: {node_id!r} is this coordinator's own name; it sends itself no heartbeat")
            # A node registered before addresses were kept: its URL's host, which registration checked.
            expected = node.registered_from or urlsplit(node.url).hostname or ""
            if peer is not None and not host_is(expected, peer):
                raise NotFromNode(f"node_id: {node_id!r} registered from {expected}; this heartbeat came from {peer} "
                                  "(a node sends heartbeats from the address it registered from: register again "
                                  "from the new one)")
            if peer is not None and node.registered_from is None:
                node.registered_from = peer
            node.last_heartbeat, node.load, node.state = time.time(), beat.load, "up"
            return node

    def nodes(self) -> list[Node]:
        now = time.time()
        with self._lock:
            for node in self._nodes.values():
                if node.node_id == self.local.node_id:
                    node.last_heartbeat, node.state, node.load = now, "up", self.local_load()
                elif self._since is not None and now - max(node.last_heartbeat, self._since) > self.down_after_s:
                    node.state = "down"
            return [n.model_copy() for n in self._nodes.values()]

    def get(self, node_id: str) -> Node:
        for node in self.nodes():
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)

    def live(self, heard: bool = False) -> list[Node]:
        """Up nodes, this one first, then by load. `heard`: only those heard from since this service started (a
        node loaded from the file at a restart is given time to beat, so that its running parts are not failed,
        but it may have been down when the previous run stopped: work that waited for nodes waits for it)."""
        up = [n for n in self.nodes() if n.state == "up"
              and (not heard or n.node_id == self.local.node_id
                   or (self._since is not None and n.last_heartbeat >= self._since))]
        return sorted(up, key=lambda n: (n.node_id != self.local.node_id, n.load))

    def fitting(self, resources: ResourceRequest, live_only: bool = True, heard: bool = False) -> list[Node]:
        """The nodes that can hold one node's share of a task asking for `resources`: the live ones (this
        one first, then by load; `heard`: as in `live`), or with `live_only=False` every registered one (down
        ones may come back)."""
        nodes = self.live(heard) if live_only else self.nodes()
        return [n for n in nodes if misfit(n.capabilities, resources) is None]

    def largest(self) -> str:
        """The most any registered node has, per resource, for error messages."""
        caps = [n.capabilities for n in self.nodes()]
        return (f"{max(len(c.gpus) for c in caps)} GPUs, {max(c.gpu_memory_gb for c in caps):g} GB GPU memory, "
                f"{max(c.cpu_cores for c in caps)} CPU cores, {max(c.ram_gb for c in caps):g} GB RAM")
