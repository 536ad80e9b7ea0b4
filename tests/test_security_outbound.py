"""What the service reaches on its own behalf, under attack (issue 18, findings #2, #3, #6, #8): a client
that names a URL, a key's environment variable, a Hub token, a foreign Hub namespace, a public repository
or a model to download. Each attack runs against a real service process on 127.0.0.1 whose environment
holds secrets (OPENAI_API_KEY, HF_TOKEN) and whose Hub endpoint (HF_ENDPOINT) is a listener of the test:
the request must be a 400 naming the field, and no listener may see a single connection.

The one way out is the operator's: an endpoint declared in --outbound-config, with its key, reaches
that endpoint only."""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_security import Authed, secret_files, sft

pytestmark = pytest.mark.slow  # starts the service

SERVICE_SECRET = "sk-service-own-openai-key-0123456789"  # the service's OPENAI_API_KEY: must never leave
HF_SECRET = "hf_service_own_token_0123456789"  # the service's HF_TOKEN
ENDPOINT_KEY = "sk-declared-endpoint-key-0123456789"  # the key the operator gave the declared endpoint


class _Handler(http.server.BaseHTTPRequestHandler):
    def _record(self) -> bytes:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.requests.append({"method": self.command, "path": self.path,
                                     "authorization": self.headers.get("authorization"), "body": body.decode()})
        return body

    def _json(self, status: int, data: dict) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_POST(self):  # noqa: N802 - http.server's name
        self._record()
        if self.path.endswith("/chat/completions"):  # an OpenAI-compatible answer: always the same text
            self._json(200, {"id": "c1", "object": "chat.completion", "created": 0, "model": "fake-model",
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": self.server.answer}}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        else:
            self._json(404, {"error": "not here"})

    def do_GET(self):  # noqa: N802
        self._record()
        if self.path.startswith("/api/models/"):  # the Hub's model_info: one 5 MB file
            repo = self.path.split("?")[0][len("/api/models/"):]
            self._json(200, {"id": repo, "sha": "0" * 40, "private": False,
                             "siblings": [{"rfilename": "model.safetensors", "size": 5_000_000}]})
        else:
            self._json(404, {"error": "not here"})

    def log_message(self, *args):
        pass


class Listener(http.server.ThreadingHTTPServer):
    """A server on 127.0.0.1 that counts every TCP connection it accepts and records every request."""

    daemon_threads = True

    def __init__(self, answer: str = "42"):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.connections, self.requests, self.answer = 0, [], answer
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def process_request(self, request, client_address):
        self.connections += 1
        super().process_request(request, client_address)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def seen(self) -> str:
        return f"{self.connections} connection(s): {[(r['method'], r['path'], r['authorization']) for r in self.requests]}"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models):
    """The service with secrets in its environment, one declared endpoint (a fake OpenAI server of the test),
    a Hub token and namespace, and HF_ENDPOINT pointing at the test's trap."""
    root = tmp_path_factory.mktemp("outbound")
    endpoint, trap = Listener(), Listener()
    outbound = root / "outbound.yaml"
    outbound.write_text(yaml.safe_dump({"outbound": {
        "endpoints": {"fake": {"base_url": endpoint.url + "/v1", "api_key_env": "FAKE_ENDPOINT_API_KEY",
                               "models": ["fake-model"]}},
        "hub": {"token_env": "HF_TOKEN", "allowed_namespaces": ["team"], "allow_public": False}}}))
    api, _ = secret_files(root / "secrets")
    env = {"OPENAI_API_KEY": SERVICE_SECRET, "FAKE_ENDPOINT_API_KEY": ENDPOINT_KEY, "HF_TOKEN": HF_SECRET,
           "HF_ENDPOINT": trap.url, "HF_HUB_OFFLINE": "0",  # "online", so only the service's rules keep it offline
           "TRL_FSDP_OUTBOUND_CONFIG": str(outbound)}  # the variable, not the flag: old builds start too
    svc = Authed(root / "data", extra=["--api-token-file", str(api)], env=env)
    yield {"svc": svc, "endpoint": endpoint, "trap": trap, "models": tiny_models}
    svc.stop()
    for server in (endpoint, trap):
        server.shutdown()


@pytest.fixture(autouse=True)
def fresh_listeners(request):
    """Each attack is judged by its own connections only (a leak in one test must not fail the next)."""
    if "world" in request.fixturenames:
        for listener in (request.getfixturevalue("world")["endpoint"], request.getfixturevalue("world")["trap"]):
            listener.connections = 0
            listener.requests.clear()


def quiet(*listeners: Listener, wait_s: float = 3.0) -> None:
    """No listener saw a connection, also a few seconds after the answer (a task would call later)."""
    time.sleep(wait_s)
    for listener in listeners:
        assert listener.connections == 0, f"the service called {listener.url}: {listener.seen()}"


def enhance(svc, task_id: str, student: dict, teacher: dict, judge: dict | None = None):
    config = {"student": student, "teacher": teacher, "judge": judge or {"type": "rule", "mode": "exact"},
              "max_iterations": 1}
    return svc.post("/v1/data-enhancement", json={"enhancement_id": task_id, "config": config,
                                                  "rows": [{"input_query": "q", "expected_answer": "42"}]})


def no_task(svc, kind: str, task_id: str) -> None:
    assert not (svc.data_dir / "workflows" / kind / task_id).exists()


def test_client_url_with_the_service_key_is_refused_and_nothing_connects(world):
    """#2: base_url of the client's choosing + api_key_env OPENAI_API_KEY sent the service's key there."""
    svc, trap, endpoint = world["svc"], world["trap"], world["endpoint"]
    local = {"model": world["models"]["teacher"]}
    r = enhance(svc, "leak1", {"model": "gpt-4o", "base_url": trap.url + "/v1", "api_key_env": "OPENAI_API_KEY"}, local)
    quiet(trap)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "config.student.base_url" in detail and "name an endpoint the operator declared" in detail
    assert "['fake']" in detail
    no_task(svc, "enhancements", "leak1")

    # a declared endpoint with a key variable of the client's choosing: still no
    r = enhance(svc, "leak2", {"model": "fake-model", "endpoint": "fake", "api_key_env": "OPENAI_API_KEY"}, local)
    assert r.status_code == 400 and "config.student.api_key_env" in r.json()["detail"], r.text
    # the same through the one-call workflow and a model judge
    r = svc.post("/v1/workflows", json={
        "workflow_id": "leak3", "rows": [{"input_query": "q", "expected_answer": "42"}],
        "enhance": {"student": local, "teacher": local,
                    "judge": {"type": "model", "role": {"model": "m", "base_url": trap.url + "/v1",
                                                        "api_key_env": "OPENAI_API_KEY"}}},
        "train": {"model": world["models"]["student"]}})
    assert r.status_code == 400 and "enhance.judge.role.base_url" in r.json()["detail"], r.text
    quiet(trap, endpoint, wait_s=1.0)
    no_task(svc, "workflows", "leak3")


@pytest.mark.parametrize("target", ["trap", "closed", "service"])
def test_ssrf_to_loopback_ports_is_refused_and_nothing_connects(world, target):
    """#3: any host/port as base_url, with errors or answers read back through results.jsonl."""
    from helpers import free_port

    svc, trap = world["svc"], world["trap"]
    url = {"trap": trap.url, "closed": f"http://127.0.0.1:{free_port()}", "service": svc.url}[target]
    r = enhance(svc, f"ssrf-{target}", {"model": world["models"]["student"]},
                {"model": "m", "base_url": url + "/v1/openai/v1"})
    quiet(trap, wait_s=1.0)
    assert r.status_code == 400 and "config.teacher.base_url" in r.json()["detail"], r.text
    no_task(svc, "enhancements", f"ssrf-{target}")


def test_endpoints_are_picked_by_declared_name_only(world):
    svc, trap, endpoint = world["svc"], world["trap"], world["endpoint"]
    local = {"model": world["models"]["teacher"]}
    r = enhance(svc, "unknown", {"model": "fake-model", "endpoint": "internal-admin"}, local)
    assert r.status_code == 400, r.text
    assert "config.student.endpoint: 'internal-admin'" in r.json()["detail"] and "['fake']" in r.json()["detail"]
    r = enhance(svc, "other-model", {"model": "gpt-4o", "endpoint": "fake"}, local)
    assert r.status_code == 400 and "not offered by endpoint 'fake'" in r.json()["detail"], r.text
    quiet(trap, endpoint, wait_s=1.0)


def test_a_declared_endpoint_gets_its_own_key_and_nothing_else(world):
    """The operator's way out: the declared endpoint sees `Bearer <its key>`; no other secret leaves."""
    svc, trap, endpoint = world["svc"], world["trap"], world["endpoint"]
    role = {"model": "fake-model", "endpoint": "fake", "max_retries": 0}
    r = enhance(svc, "declared", role, role)
    assert r.status_code == 200, r.text
    state = svc.get("/v1/data-enhancement/declared").json()
    deadline = time.monotonic() + 120
    while state["state"] in ("scheduled", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.25)
        state = svc.get("/v1/data-enhancement/declared").json()
    assert state["state"] == "completed", state
    assert state["outputs"]["training_data_correct_share"]["after"] == 1.0
    assert endpoint.requests and all(req["path"] == "/v1/chat/completions" for req in endpoint.requests)
    assert {req["authorization"] for req in endpoint.requests} == {f"Bearer {ENDPOINT_KEY}"}
    for secret in (SERVICE_SECRET, HF_SECRET, svc.http.headers["authorization"].split()[-1]):
        assert not any(secret in json.dumps(req) for req in endpoint.requests)
    stored = (svc.data_dir / "workflows/enhancements/declared/task.json").read_text()
    assert ENDPOINT_KEY not in stored and endpoint.url not in stored  # the request holds the name only
    assert trap.connections == 0, trap.seen()


@pytest.mark.parametrize("hub,field", [
    ({"repo_id": "team/model", "token_env": "HF_TOKEN"}, "token_env"),  # the service's own Hub token
    ({"repo_id": "victim-org/their-model"}, "repo_id"),  # a commit over someone else's repository
    ({"repo_id": "team/model", "private": False}, "repo_id"),
    ({"repo": "model", "namespace": "victim-org"}, "hub.namespace"),
    ({"repo": "model", "namespace": "team", "private": False}, "hub.private"),
])
def test_hub_push_goes_only_where_the_operator_allows(world, hub, field):
    """#6: token_env, any namespace and public repositories were the client's choice."""
    svc, trap = world["svc"], world["trap"]
    task_id = f"hub-{abs(hash(json.dumps(hub))) % 10**8}"
    r = svc.post("/v1/exports", json={"export_id": task_id, "model": world["models"]["student"], "formats": ["hub"],
                                      "hub": hub})
    quiet(trap, wait_s=2.0)
    assert r.status_code == 400 and field in r.text, r.text
    no_task(svc, "exports", task_id)
    r = svc.post("/v1/workflows", json={
        "workflow_id": task_id, "rows": [{"input_query": "q", "expected_answer": "42"}],
        "enhance": {"student": {"model": world["models"]["student"]}, "teacher": {"model": world["models"]["teacher"]}},
        "export": {"formats": ["hub"], "hub": hub}})
    assert r.status_code == 400 and field.split(".")[-1] in r.text, r.text
    no_task(svc, "workflows", task_id)
    assert trap.connections == 0, trap.seen()


def test_hub_download_is_off_unless_the_operator_allows(world):
    """#8: a model id not in the cache was downloaded (any size) when the service was online."""
    svc, trap = world["svc"], world["trap"]
    r = svc.post("/v1/openai/v1/chat/completions", json={
        "model": "some-org/not-cached-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    quiet(trap, wait_s=1.0)
    assert r.status_code in (400, 404) and "downloads no models" in r.text, r.text
    assert svc.post("/v1/datasets/toy/rows", data='{"input_query": "q", "expected_answer": "a"}\n').status_code == 200
    r = svc.post("/v1/post-training/supervised-fine-tune", json=sft("dl1", "some-org/not-cached-model"))
    assert r.status_code in (400, 404) and "downloads no models" in r.text, r.text
    quiet(trap, wait_s=1.0)


def test_allowed_downloads_check_the_size_before_downloading(monkeypatch, tmp_path):
    """With downloads allowed, the repository's size (the Hub's file list) is checked against the cap
    first: an oversized model is a 400 and no file is fetched."""
    from huggingface_hub import constants

    from providers.outbound import HubDownloads
    from providers.api.paths import hub_snapshot

    hub = Listener()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    try:
        with pytest.raises(ValueError, match=r"model: 'org/big' is 0.01 GB, over this service's download limit of 0.001"):
            hub_snapshot("org/big", "model", HubDownloads(allow_download=True, max_download_gb=0.001))
        assert [r["path"].split("?")[0] for r in hub.requests] == ["/api/models/org/big"]
        with pytest.raises(ValueError, match="downloads no models"):
            hub_snapshot("org/big", "model", HubDownloads())
        assert len(hub.requests) == 1  # off: not even the file list
    finally:
        hub.shutdown()
