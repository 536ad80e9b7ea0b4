"""Paths as a job's hosts see them: a shared volume this host mounts at one directory and the job's hosts
(cluster nodes, pods) at another.

The service writes spec.json with its own paths; a launcher whose config has a `path_map` hands the job the
run dir as the job sees it and the map in TRL_PATH_MAP, the trainer reads the spec's paths through it
(`to_job`) and writes the paths it records in status.json back in the service's terms (`to_host`). Only whole
leading directories are mapped: `/srv/trl` maps `/srv/trl/runs/a`, never `/srv/trlx`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV = "TRL_PATH_MAP"


class PathMap:
    """This host's directories -> the same directories on the job's hosts (empty: the same paths)."""

    def __init__(self, host_to_job: dict[str, str] | None = None):
        self.host_to_job = {k.rstrip("/") or "/": v.rstrip("/") or "/" for k, v in (host_to_job or {}).items()}

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ = os.environ) -> PathMap:
        return cls(json.loads(env[ENV])) if env.get(ENV) else cls()

    def env(self) -> dict[str, str]:
        """The job's environment entry that carries the map to the trainer (none for an empty map)."""
        return {ENV: json.dumps(self.host_to_job, sort_keys=True)} if self.host_to_job else {}

    def to_job(self, path: str) -> str:
        return _swap(path, self.host_to_job)

    def to_host(self, path: str) -> str:
        return _swap(path, {v: k for k, v in self.host_to_job.items()})

    def tree_to_job(self, value: Any) -> Any:
        """Every path (a string under a mapped directory) in a JSON value, as the job's hosts see it."""
        return _walk(value, self.to_job)

    def tree_to_host(self, value: Any) -> Any:
        return _walk(value, self.to_host)

    def __bool__(self) -> bool:
        return bool(self.host_to_job)


def _swap(path: str, mapping: dict[str, str]) -> str:
    for src in sorted(mapping, key=len, reverse=True):  # the longest directory wins
        if path == src or path.startswith(src.rstrip("/") + "/"):
            return mapping[src] + path[len(src):] if src != "/" else mapping[src].rstrip("/") + path
    return path


def _walk(value: Any, swap) -> Any:
    if isinstance(value, str):
        return swap(value) if value.startswith("/") else value
    if isinstance(value, dict):
        return {k: _walk(v, swap) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, swap) for v in value]
    return value


def load_spec(run_dir: str | Path):
    """The run's JobSpec with its paths as this job's hosts see them (TRL_PATH_MAP; unmapped without it)."""
    from .spec import JobSpec

    paths = PathMap.from_env()
    if not paths:
        return JobSpec.load(run_dir)
    return JobSpec.model_validate(paths.tree_to_job(json.loads((Path(run_dir) / "spec.json").read_text())))
