"""Findings 2, 6 and 7 of the third security review (and the file count and listing of the same issue), each as
an attack through real HTTP on a real service subprocess on 127.0.0.1 that must fail:

 2  a multipart upload with thousands of small form fields, all kept in memory: bounded in count and bytes (413);
 6  a heartbeat for a node sent from another address (127.0.0.2 on loopback) reviving it: 403, it stays down;
 7  malformed multipart bodies (a part header over the parser's limit, 9 part headers, no leading boundary,
    a boundary over 256 bytes, no closing boundary): 400 naming `body`, never a 500 with a traceback;
    stored OpenAI files capped in number per data dir (429); GET /files pages with `limit`/`after` under a cap.

Every test here failed against the code before these fixes."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from helpers import wait_until
from test_fsdp_service import Service
from conftest import kill_leftover_processes

API_TOKEN = "api-" + uuid.uuid4().hex
NODE_TOKEN = "node-" + uuid.uuid4().hex
FILES = "/v1/openai/v1/files"
CHAT = {"messages": [{"role": "user", "content": "reverse: a b"}, {"role": "assistant", "content": "b a"}]}
ROWS = (json.dumps(CHAT) + "\n").encode()
BOUNDARY = "b0undary"


def multipart(parts: list[tuple[str, bytes]], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """A multipart/form-data body: (header lines, value) per part; `close=False` leaves out the closing boundary."""
    body = b"".join(f"--{boundary}\r\n{headers}\r\n\r\n".encode() + value + b"\r\n" for headers, value in parts)
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


def field(name: str, value: str) -> tuple[str, bytes]:
    return f'Content-Disposition: form-data; name="{name}"', value.encode()


FILE_PART = ('Content-Disposition: form-data; name="file"; filename="train.jsonl"\r\n'
             "Content-Type: application/jsonl", ROWS)


class Secured(Service):
    """The service with both tokens (clients' and nodes'); a node missing heartbeats for 1 s is down."""

    def __init__(self, data_dir: Path):
        super().__init__(data_dir, extra=["--down-after-s", "1"],
                         env={"TRL_FSDP_API_TOKEN": API_TOKEN, "TRL_FSDP_NODE_TOKEN": NODE_TOKEN})
        self.http = httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {API_TOKEN}"}, timeout=60)

    def upload(self, body: bytes, boundary: str = BOUNDARY) -> httpx.Response:
        return self.http.post(FILES, content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1/openai/v1", api_key=API_TOKEN, max_retries=0, timeout=60)

    def log_has_no_traceback(self) -> None:
        text = self.log.read_text(errors="replace")
        assert "Traceback" not in text and "internal error" not in text, text[-3000:]


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    service = Secured(tmp_path_factory.mktemp("security_http") / "data")
    yield service
    service.stop()
    kill_leftover_processes(service.data_dir)


# -- 2. form fields bounded in count and bytes ---------------------------------------------------------------------
@pytest.mark.slow
def test_form_fields_are_bounded_in_count_and_in_total_bytes(svc):
    from providers.api.multipart import FORM_LIMITS

    assert svc.upload(multipart([field("purpose", "fine-tune"), FILE_PART])).status_code == 200
    many = [field(f"f{i}", "x") for i in range(FORM_LIMITS.fields + 1)]
    r = svc.upload(multipart([field("purpose", "fine-tune"), *many, FILE_PART]))
    assert r.status_code == 413 and f"more than {FORM_LIMITS.fields} form fields" in r.text, r.text
    # Each field under the per-field cap, all of them over the total.
    big = [field(f"g{i}", "y" * FORM_LIMITS.field_bytes) for i in range(FORM_LIMITS.total_bytes // FORM_LIMITS.field_bytes + 1)]
    r = svc.upload(multipart([field("purpose", "fine-tune"), *big, FILE_PART]))
    assert r.status_code == 413 and f"{FORM_LIMITS.total_bytes} bytes" in r.text, r.text
    r = svc.upload(multipart([field("purpose", "fine-tune" + "z" * FORM_LIMITS.field_bytes), FILE_PART]))
    assert r.status_code == 413 and "purpose" in r.text, r.text
    svc.log_has_no_traceback()


# -- 7. malformed multipart bodies: 400, no traceback ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case", ["header_too_long", "nine_headers", "no_leading_boundary", "long_boundary",
                                  "no_closing_boundary"])
def test_a_malformed_multipart_body_is_a_400_naming_the_body(svc, case):
    boundary = BOUNDARY
    if case == "header_too_long":
        body = multipart([(f'Content-Disposition: form-data; name="{"n" * 5000}"', b"x"), FILE_PART])
    elif case == "nine_headers":
        headers = "\r\n".join(['Content-Disposition: form-data; name="purpose"'] + [f"X-H{i}: v" for i in range(8)])
        body = multipart([(headers, b"fine-tune"), FILE_PART])
    elif case == "no_leading_boundary":
        body = b"garbage\r\n" + multipart([field("purpose", "fine-tune"), FILE_PART])
    elif case == "long_boundary":
        boundary = "b" * 300
        body = multipart([field("purpose", "fine-tune"), FILE_PART], boundary)
    else:  # the file's part never ends: what came is not stored as the file
        body = multipart([field("purpose", "fine-tune"), FILE_PART], close=False)
    r = svc.upload(body, boundary)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("body:"), r.text
    svc.log_has_no_traceback()


# -- the number of stored files, and listing them ---------------------------------------------------------------
def fake_records(data_dir: Path, n: int) -> list[str]:
    """`n` file records written as the store writes them (no blobs: listing and counting read records only)."""
    ids = []
    for _ in range(n):
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        (data_dir / "openai_ft" / "files" / f"{file_id}.json").write_text(json.dumps(
            {"id": file_id, "bytes": 1, "created_at": int(time.time()), "filename": "x.jsonl", "purpose": "fine-tune",
             "status": "processed", "status_details": None, "expires_at": None, "kind": "chat", "rows": 1}))
        ids.append(file_id)
    return ids


@pytest.mark.slow
def test_stored_files_are_capped_and_listed_in_bounded_pages(svc):
    from providers.openai_ft.store import LIST_FILES_LIMIT, MAX_STORED_FILES

    client = svc.sdk()
    records = svc.data_dir / "openai_ft" / "files"
    fake_records(svc.data_dir, MAX_STORED_FILES - len(list(records.glob("file-*.json"))))
    blobs = sorted((svc.data_dir / "files").iterdir())
    with pytest.raises(openai.RateLimitError) as e:  # not retried: no Retry-After, x-should-retry false
        client.files.create(file=("t.jsonl", ROWS), purpose="fine-tune")
    assert f"{MAX_STORED_FILES} files" in str(e.value) and e.value.response.headers.get("retry-after") is None
    assert sorted((svc.data_dir / "files").iterdir()) == blobs  # nothing left behind by the refused upload
    # A page is at most LIST_FILES_LIMIT records (the default); `after` walks them all, each once.
    r = svc.http.get(FILES, params={"limit": LIST_FILES_LIMIT + 1})
    assert r.status_code == 400 and "limit" in r.text, r.text
    assert len(svc.http.get(FILES).json()["data"]) == min(LIST_FILES_LIMIT, MAX_STORED_FILES)
    seen = []
    for f in client.files.list(limit=MAX_STORED_FILES // 3):  # the SDK follows `after` while has_more
        seen.append(f.id)
    assert len(seen) == len(set(seen)) == MAX_STORED_FILES
    client.files.delete(seen[0])  # room for one again
    assert client.files.create(file=("t.jsonl", ROWS), purpose="fine-tune").id == client.files.list(limit=1).data[0].id
    svc.log_has_no_traceback()


# -- 6. heartbeats from the registered node's address only -------------------------------------------------------------
@pytest.mark.slow
def test_a_heartbeat_from_another_address_cannot_revive_a_node(svc):
    node = {"x-node-token": NODE_TOKEN}
    reg = {"node_id": "ghost", "url": "http://127.0.0.1:9", "capabilities": {"cpu_cores": 1, "ram_gb": 1}}
    assert svc.http.post("/v1/nodes/register", json=reg, headers=node).status_code == 200

    def ghost() -> dict:
        return next(n for n in svc.http.get("/v1/nodes").json()["data"] if n["node_id"] == "ghost")

    wait_until(lambda: ghost()["state"] == "down", 10, message="ghost down after 1 s without heartbeats")
    other = httpx.Client(base_url=svc.url, headers=node, timeout=30,
                         transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    r = other.post("/v1/nodes/ghost/heartbeat", json={"load": 0, "parts": [uuid.uuid4().hex]})
    assert r.status_code == 403 and "127.0.0.2" in r.text and "127.0.0.1" in r.text, r.text
    assert "ended_parts" not in r.text and ghost()["state"] == "down"
    # The node itself, from its own address: up again, and its answer names none of the parts it does not run.
    r = svc.http.post("/v1/nodes/ghost/heartbeat", json={"load": 0, "parts": [uuid.uuid4().hex]}, headers=node)
    assert r.status_code == 200 and r.json()["ended_parts"] == {} and ghost()["state"] == "up", r.text
