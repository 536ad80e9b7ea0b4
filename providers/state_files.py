"""Every JSON state file (nodes.json, pending_jobs/*.json, pipeline.json, workflows' task.json): written
atomically, read defensively. The one way the service and its add-ons keep state outside SQLite.

A reader never sees half a file (temp file + fsync + os.replace), and a file that is corrupt anyway (a disk
problem, a hand edit) is set aside with a logged error instead of stopping the service from starting."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("providers.remote_fsdp")  # the service's logger: its log lines read as before


def save_state(path: Path, value: Any) -> None:
    """Write `value` as JSON to `path` atomically; what JSON cannot hold (timestamps, paths) is written as str."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: Path, default: Any) -> Any:
    """The file's value; `default` when it is missing; a corrupt file is renamed PATH.corrupt-TIME."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        try:
            os.replace(path, aside)
        except OSError:
            aside = path
        log.error("state file %s is unreadable (%s); set aside as %s", path, e, aside)
        return default
