"""Corrupt state files at start-up: the service starts, the file is set aside as NAME.corrupt-TIME with a
logged error, and the rest of its state is intact. One test per kind of file (providers/state_files.py).

Fast: the app is built in this process (create_app) and driven through its lifespan with a test client;
nothing trains and no model loads."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from providers.remote_fsdp.service.app import create_app
from providers.remote_fsdp.service.config import ServiceConfig

CORRUPT = '{"half a file'
NODE = {"node_id": "worker-1", "url": "http://127.0.0.1:9", "state": "down",
        "capabilities": {"cpu_cores": 2, "ram_gb": 4.0, "address": "127.0.0.1"}}


def healthy_state(data: Path) -> None:
    """One of each kind of state, all readable: a known node, a finished pipeline, a finished workflow task."""
    data.mkdir(parents=True, exist_ok=True)
    (data / "nodes.json").write_text(json.dumps([NODE]))
    (data / "pipelines" / "done").mkdir(parents=True)
    (data / "pipelines" / "done" / "pipeline.json").write_text(json.dumps(
        {"pipeline_id": "done", "state": "completed", "teacher": {}, "students": []}))
    (data / "workflows" / "validations" / "checked").mkdir(parents=True)
    (data / "workflows" / "validations" / "checked" / "task.json").write_text(json.dumps(
        {"id": "checked", "kind": "validations", "state": "completed", "created_at": "2026-01-01T00:00:00Z"}))
    (data / "pending_jobs").mkdir()


def start(data: Path, caplog, corrupt: Path) -> dict:
    """Start the service on `data` with `corrupt` broken; what its routes say about the other state."""
    corrupt.parent.mkdir(parents=True, exist_ok=True)
    corrupt.write_text(CORRUPT)
    caplog.set_level(logging.ERROR)
    with TestClient(create_app(ServiceConfig(data_dir=str(data)))) as client:
        assert client.get("/health").json()["status"] == "OK"
        seen = {
            "nodes": [n["node_id"] for n in client.get("/v1/nodes").json()["data"]],
            "pipelines": [p["pipeline_id"] for p in client.get("/v1/pipelines").json()["data"]],
            "validations": [t["id"] for t in client.get("/v1/validations").json()["data"]],
        }
    assert not corrupt.exists()
    assert list(corrupt.parent.glob(f"{corrupt.name}.corrupt-*")), "the corrupt file was not set aside"
    assert any(str(corrupt) in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records), caplog.text
    return seen


def test_corrupt_nodes_file(tmp_path, caplog):
    data = tmp_path / "data"
    healthy_state(data)
    seen = start(data, caplog, data / "nodes.json")
    assert "worker-1" not in seen["nodes"] and len(seen["nodes"]) == 1  # this node only
    assert seen["pipelines"] == ["done"] and seen["validations"] == ["checked"]


def test_corrupt_pending_job_file(tmp_path, caplog):
    data = tmp_path / "data"
    healthy_state(data)
    seen = start(data, caplog, data / "pending_jobs" / "waiting.json")
    assert "worker-1" in seen["nodes"] and seen["pipelines"] == ["done"] and seen["validations"] == ["checked"]


def test_corrupt_pipeline_file(tmp_path, caplog):
    data = tmp_path / "data"
    healthy_state(data)
    seen = start(data, caplog, data / "pipelines" / "broken" / "pipeline.json")
    assert seen["pipelines"] == ["done"]
    assert "worker-1" in seen["nodes"] and seen["validations"] == ["checked"]


@pytest.mark.parametrize("kind", ["validations", "workflows"])
def test_corrupt_workflow_task_file(tmp_path, caplog, kind):
    data = tmp_path / "data"
    healthy_state(data)
    seen = start(data, caplog, data / "workflows" / kind / "broken" / "task.json")
    assert seen["validations"] == ["checked"]
    assert "worker-1" in seen["nodes"] and seen["pipelines"] == ["done"]
