"""Whose fault an error is decides its status: a ClientError is a 4xx naming the field; anything else that
escapes a route is a 500 with an error id that the log repeats beside the traceback (never a 400).

The service's own app (create_app) with two extra routes that raise, through FastAPI's test client: the
handlers under test are the ones every route shares."""

from __future__ import annotations

import logging
import re

import pytest


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    import os

    os.environ["TRL_JOB_ZYGOTE"] = "0"  # no preloaded process for an app that runs no job
    from fastapi.testclient import TestClient

    from providers.errors import BadRequest, Conflict, NotFound
    from providers.remote_fsdp.service.app import create_app
    from providers.remote_fsdp.service.config import ServiceConfig

    app = create_app(ServiceConfig(data_dir=str(tmp_path_factory.mktemp("data"))))
    raises = {"bad": BadRequest("field.x: 3 is not one of [1, 2]"), "missing": NotFound("job_uuid: 'j' is unknown"),
              "taken": Conflict("job_uuid: 'j' exists"), "bug": ValueError("math domain error"),
              "keyerror": KeyError("oops")}

    @app.get("/test/raise/{kind}")
    def raise_it(kind: str):
        raise raises[kind]

    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    os.environ.pop("TRL_JOB_ZYGOTE", None)


@pytest.mark.parametrize("kind,status", [("bad", 400), ("missing", 404), ("taken", 409)])
def test_client_errors_keep_their_status_and_message(client, kind, status):
    r = client.get(f"/test/raise/{kind}")
    assert r.status_code == status
    assert r.headers["x-should-retry"] == "false"
    assert ":" in r.json()["detail"]  # the field, then the reason


@pytest.mark.parametrize("kind", ["bug", "keyerror"])
def test_an_internal_error_is_a_500_with_an_id_the_log_repeats(client, caplog, kind):
    with caplog.at_level(logging.ERROR, logger="providers.remote_fsdp"):
        r = client.get(f"/test/raise/{kind}")
    assert r.status_code == 500, r.text  # a plain ValueError is no longer the client's fault
    detail = r.json()["detail"]
    error_id = re.search(r"error id ([0-9a-f]{12})", detail).group(1)
    assert "math domain" not in detail  # internals stay in the log
    logged = [rec for rec in caplog.records if error_id in rec.getMessage()]
    assert logged and logged[0].exc_info, "the log names the id, with the traceback"


def test_real_routes_answer_client_errors_with_their_status(client):
    assert client.get("/v1/post-training/job/status", params={"job_uuid": "nope"}).status_code == 404
    r = client.post("/v1/datasets/..bad/rows", json=[{"prompt": "a", "completion": "b"}])
    assert r.status_code == 400 and "dataset_id" in r.json()["detail"]
    r = client.post("/v1/post-training/job/resume", json={"job_uuid": "nope"})
    assert r.status_code == 404
