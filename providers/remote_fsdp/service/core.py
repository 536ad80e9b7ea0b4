"""What the service's core hands each add-on (pipelines, workflows, operator tools) when it mounts it.

An add-on is a package with `install(app, core)`: it builds what it needs from these parts, mounts its
routers behind `core.auth` (client token) or `core.node_only` (node token), and may add a shutdown step
or an upload route. The core imports no add-on; app.py lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .config import ServiceConfig
from .jobs import FsdpJobService
from .nodes import NodeRegistry


@dataclass
class ServiceCore:
    config: ServiceConfig
    service: FsdpJobService  # the job store, the job manager (every launcher, `nodes` too), the run directories
    registry: NodeRegistry
    peer_headers: dict[str, str]  # what calls to other nodes carry (the API token and the node token)
    auth: list  # route dependencies: the clients' bearer token
    node_only: list  # route dependencies: the cluster's node token
    internal_key: str  # a bearer key for the service's calls to its own routes (acts as the service)
    # Route prefixes whose bodies are streamed uploads: they get the upload limit, not the JSON body limit.
    upload_prefixes: list[str] = field(default_factory=list)
    on_shutdown: list[Callable[[], None]] = field(default_factory=list)  # run when the app stops
    # An add-on's name for a job of the store (None: not its job), shown beside the job's id (the dashboard).
    job_names: list[Callable[[str], str | None]] = field(default_factory=list)
    # An add-on's marks in a job's history ({"created_at", "message"}: an OpenAI job's pauses and resumes), shown
    # on the dashboard's job page: the store's job alone reads as cancelled, then running again.
    job_marks: list[Callable[[str], list[dict]]] = field(default_factory=list)
