"""Findings 7-11 of the second security review, each as an attack on a real service on 127.0.0.1 (real
httpx and openai clients, a real browser for the dashboard) that must fail:

 7  a forged audit line through a percent-encoded newline in the path (no token needed);
 8  uploads filling the disk: a total quota per data dir (--max-data-gb), 507 and no partial file;
 9  long chat generations starving job control, log tails and uploads; no limit on queued chats;
10  validation, export and training processes inheriting the service's secrets;
11  markup in a dashboard fact, and names with a trailing newline passing SAFE_NAME.

Every test here failed against the code before these fixes (run against that commit, whose service
was given the same flags by ignoring the ones it did not know yet)."""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import shutil
import socket
import sys
import tarfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from helpers import processes_mentioning, wait_until
from test_fsdp_service import Service
from conftest import kill_leftover_processes

API_TOKEN = "api-" + uuid.uuid4().hex
NODE_TOKEN = "node-" + uuid.uuid4().hex
# Secrets in the service's environment that no child may see (WANDB_API_KEY only training, by --pass-env).
SECRETS = {"TRL_FSDP_API_TOKEN": API_TOKEN, "TRL_FSDP_NODE_TOKEN": NODE_TOKEN, "HF_TOKEN": "hf_" + uuid.uuid4().hex,
           "GITHUB_TOKEN": "ghp_" + uuid.uuid4().hex, "AWS_SECRET_ACCESS_KEY": "aws-" + uuid.uuid4().hex,
           "OPENAI_API_KEY": "sk-" + uuid.uuid4().hex, "WANDB_API_KEY": "wandb-" + uuid.uuid4().hex}
# asyncio's default pool in the service (min(32, cores + 4) threads): the chat API fills exactly this many.
FILLERS = min(32, (os.cpu_count() or 1) + 4)
QUOTA_GB = 0.004  # about 4.3 MB of uploads
HOSTILE_MODEL_NAME = "tiny<b id=pwn>x"


# -- unit checks (fast) ------------------------------------------------------------------------------------
def test_printable_escapes_every_control_character():
    from providers.remote_fsdp.service.security import printable

    forged = "/v1/jobs\n2026-01-01 INFO audit: 10.6.6.6 POST /job/cancel -> 200\r\x1b[2K\u2028\x85"
    out = printable(forged)
    assert out.isprintable() and "\\n" in out and "\\x1b" in out and "\\u2028" in out
    assert printable("plain é ü /v1/x?y=1") == "plain é ü /v1/x?y=1"


def test_formatter_keeps_one_record_on_one_line_even_through_tracebacks():
    from providers.remote_fsdp.service.security import PrintableFormatter

    fmt = PrintableFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "job %s failed: %s", ("a\nb", "c\r\nd"), None)
    assert "\n" not in fmt.format(record)
    try:
        raise ValueError("bad\n10.6.6.6 POST /v1/post-training/job/cancel -> 200")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    lines = fmt.format(record).splitlines()
    assert lines[0] == "ERROR x: boom" and all(line.startswith("    ") for line in lines[1:])


def test_child_env_drops_secrets_and_keeps_what_was_handed():
    from providers.jobs.child_env import child_env, is_secret, parse_pass_env

    base = {"PATH": "/bin", "TOKENIZERS_PARALLELISM": "false", "HF_HOME": "/h", **SECRETS, "PGPASSWORD": "p",
            "MY_SERVICE_KEY": "k", "GOOGLE_APPLICATION_CREDENTIALS": "/c.json"}
    env = child_env(base=base, extra={"PYTHONSAFEPATH": "1"})
    assert env == {"PATH": "/bin", "TOKENIZERS_PARALLELISM": "false", "HF_HOME": "/h", "PYTHONSAFEPATH": "1"}
    handed = child_env(keep=["WANDB_API_KEY", "TRL_FSDP_API_TOKEN", None], base=base)
    assert handed["WANDB_API_KEY"] == SECRETS["WANDB_API_KEY"] and "TRL_FSDP_API_TOKEN" not in handed
    assert is_secret("HUGGING_FACE_HUB_TOKEN") and not is_secret("TOKENIZERS_PARALLELISM")
    assert parse_pass_env(["training=WANDB_API_KEY", "export=HF_TOKEN"]) == {"training": ["WANDB_API_KEY"],
                                                                             "export": ["HF_TOKEN"]}
    for bad in ("WANDB_API_KEY", "jobs=X", "training=TRL_FSDP_API_TOKEN", "training=A-B"):
        with pytest.raises(ValueError, match="--pass-env"):
            parse_pass_env([bad])


def test_disk_quota_counts_disk_and_reservations(tmp_path):
    from providers.remote_fsdp.service.security import DiskQuota, QuotaExceeded

    quota = DiskQuota(tmp_path, 1000)
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "a").write_bytes(b"x" * 400)
    (tmp_path / "datasets" / ".a.part-1").write_bytes(b"x" * 900)  # partial: counted by its reservation
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ckpt").write_bytes(b"x" * 5000)  # training output: not an upload
    assert quota.used() == 400
    with quota.reservation("upload x", step=100) as r:
        r.add(500)
        assert quota.used() >= 900
        with pytest.raises(QuotaExceeded, match="--max-data-gb"):
            r.add(200)
    assert quota.used() == 400


# -- the service --------------------------------------------------------------------------------------------
class Secured(Service):
    """The service with the secrets above in its environment and small limits; calls carry the token."""

    def __init__(self, data_dir: Path, extra: list[str]):
        super().__init__(data_dir, extra=extra, env=SECRETS)
        self.http = httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {API_TOKEN}"}, timeout=120)

    def chat(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1/openai/v1", api_key=API_TOKEN, max_retries=0, timeout=120)


def copy_model(src: str, dest: Path, endless: bool = False) -> str:
    """A copy of a tiny model. `endless`: its end-of-sequence token is one the model cannot emit (an id past
    its vocabulary), so every generation runs to max_tokens: a long generation on any machine."""
    if not dest.exists():
        shutil.copytree(src, dest)
        if endless:
            from transformers import AutoTokenizer, GenerationConfig

            tok = AutoTokenizer.from_pretrained(dest)
            tok.add_special_tokens({"eos_token": "<|never|>"})
            tok.save_pretrained(dest)
            gen = GenerationConfig.from_pretrained(dest)
            gen.eos_token_id = None
            gen.save_pretrained(dest)
    return str(dest)


@pytest.fixture(scope="module")
def svc(tmp_path_factory, tiny_models, toy_data):
    root = tmp_path_factory.mktemp("security_service")
    models = root / "models"
    models.mkdir()
    service = Secured(root / "data", [
        "--allowed-model-root", str(models), "--allowed-model-root", str(Path(tiny_models["student"]).parent),
        "--max-data-gb", str(QUOTA_GB),
        "--chat-workers", "2", "--chat-queue", str(FILLERS - 2), "--chat-max-tokens", "4096",
        "--pass-env", "training=WANDB_API_KEY"])
    service.models = models
    rows = "".join(json.dumps(r) + "\n" for r in toy_data["instruct"])
    assert service.http.post("/v1/datasets/toy/rows", content=rows).status_code == 200
    yield service
    service.stop()
    kill_leftover_processes(service.data_dir)


def sft(job_uuid: str, model: str, steps: int = 2) -> dict:
    return {"job_uuid": job_uuid, "model": model, "training_config": {
        "n_epochs": 1, "max_steps_per_epoch": steps, "dtype": "fp32",
        "data_config": {"dataset_id": "toy", "batch_size": 4, "shuffle": False},
        "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-3, "weight_decay": 0.0, "num_warmup_steps": 0},
        "torch_run_config": {"nproc_per_node": 1}}}


# -- 7. audit log forgery --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_percent_encoded_newline_cannot_forge_an_audit_line(svc):
    forged = "2026-01-01 00:00:00,000 INFO providers.remote_fsdp.audit: 10.6.6.6 POST /v1/post-training/job/cancel -> 200 in 1 ms"
    path = "/v1/post-training/jobs%0a" + forged.replace(" ", "%20").replace(">", "%3E") + "%0d%1b%5B2K%E2%80%A8"
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=30)
    conn.request("GET", path)  # no token: a 401, and still an audit line
    assert conn.getresponse().status in (401, 404)
    audit_log = svc.data_dir / "logs" / "service.log"  # the audit trail: in the data dir, not on stderr
    lines = wait_until(lambda: [line for line in audit_log.read_text(errors="replace").splitlines() if "10.6.6.6" in line],
                       30, message="the audit line of the forged request")
    for line in lines:
        assert not line.startswith("2026-01-01") and " GET /v1/post-training/jobs\\n" in line, line
    assert not any("\x1b" in line or "\u2028" in line or "\r" in line for line in audit_log.read_text().splitlines())


# -- 8. disk quota ------------------------------------------------------------------------------------------------
def jsonl(nbytes: int) -> bytes:
    row = json.dumps({"input_query": "x" * 900, "expected_answer": "y"}).encode() + b"\n"
    return row * (nbytes // len(row) + 1)


def partial_files(data_dir: Path) -> list[Path]:
    return [p for p in data_dir.rglob("*") if any(m in p.name for m in (".part-", ".extract-", ".upload-"))]


@pytest.mark.slow
def test_uploads_stop_at_the_data_dir_quota(svc):
    datasets = svc.data_dir / "datasets"
    big = jsonl(1_500_000)
    assert svc.http.post("/v1/datasets/q1/rows", content=big).status_code == 200
    assert svc.http.post("/v1/datasets/q2/rows", content=big).status_code == 200
    try:
        r = svc.http.post("/v1/datasets/q3/rows", content=big)
        assert r.status_code == 507 and "--max-data-gb" in r.json()["detail"], r.text
        assert not (datasets / "q3.jsonl").exists() and partial_files(svc.data_dir) == []
        # append=true, many ids, chunked bodies: all count against the same quota.
        size = (datasets / "q1.jsonl").stat().st_size
        r = svc.http.post("/v1/datasets/q1/rows", params={"append": "true"}, content=big)
        assert r.status_code == 507 and (datasets / "q1.jsonl").stat().st_size == size
        r = svc.http.post("/v1/datasets/q4/rows", content=(big[i:i + 65536] for i in range(0, len(big), 65536)))
        assert r.status_code == 507 and not (datasets / "q4.jsonl").exists()
        # A small archive that extracts past the quota (node token): refused, and nothing is left.
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            info = tarfile.TarInfo("teacher_task.json")
            data = b" " * 3_000_000
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        r = httpx.put(f"{svc.url}/v1/teacher-outputs/bomb", content=buf.getvalue(), timeout=60,
                      headers={"authorization": f"Bearer {API_TOKEN}", "x-node-token": NODE_TOKEN})
        assert r.status_code == 507, r.text
        assert not (svc.data_dir / "uploaded_teacher_outputs" / "bomb").exists()
        assert partial_files(svc.data_dir) == []
        assert svc.http.post("/v1/datasets/small/rows", content=jsonl(1000)).status_code == 200  # room is left
    finally:
        for name in ("q1", "q2", "small"):  # give the quota back to the other tests
            (datasets / f"{name}.jsonl").unlink(missing_ok=True)


# -- 9. chat generations vs job control ------------------------------------------------------------------------------
class Filler(threading.Thread):
    """One streamed chat generation of max_tokens=4096 that reads until its [DONE]; `close` hangs up (the
    socket is shut down, which wakes a blocked read; the service then stops that generation)."""

    def __init__(self, svc: Secured, model: str):
        super().__init__(daemon=True)
        self.conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=900)
        self.body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Reverse: abc"}],
                                "max_tokens": 4096, "temperature": 0, "stream": True})
        self.status: int | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            self.conn.request("POST", "/v1/openai/v1/chat/completions", body=self.body, headers={
                "authorization": f"Bearer {API_TOKEN}", "content-type": "application/json"})
            response = self.conn.getresponse()
            self.status = response.status
            while line := response.fp.readline():
                if line.strip() == b"data: [DONE]":
                    self.finished.set()
        except (OSError, http.client.HTTPException):  # hung up by the test
            pass

    def close(self) -> None:
        if self.conn.sock is not None:
            try:
                self.conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conn.close()


@pytest.mark.slow
def test_long_generations_never_hold_up_job_control(svc, tiny_models):
    model = copy_model(tiny_models["student"], svc.models / "endless", endless=True)
    r = svc.http.post("/v1/post-training/supervised-fine-tune", json=sft("ctl-job", tiny_models["student"], 5000))
    assert r.status_code == 200, r.text
    fillers = [Filler(svc, model) for _ in range(FILLERS)]
    for f in fillers:
        f.start()
    try:
        wait_until(lambda: all(f.status for f in fillers), 300, message="every filler generation admitted")
        assert all(f.status == 200 for f in fillers), [f.status for f in fillers]
        # Job control, log tails and uploads answer while every generation is still running or waiting.
        assert svc.http.get("/v1/post-training/job/status", params={"job_uuid": "ctl-job"}).status_code == 200
        logs = svc.http.get("/v1/post-training/job/logs", params={"job_uuid": "ctl-job", "tail": 5})
        assert logs.status_code == 200, logs.text
        assert svc.http.post("/v1/datasets/during-chat/rows", content=jsonl(2000)).status_code == 200
        assert svc.http.post("/v1/post-training/job/cancel", json={"job_uuid": "ctl-job"}).status_code == 200
        assert not any(f.finished.is_set() for f in fillers), "a generation ended before job control answered"
        # The chat API is full: the next chat is refused at once, in OpenAI's shape.
        with pytest.raises(openai.RateLimitError) as refused:
            svc.chat().chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        assert refused.value.body["code"] == "rate_limit_exceeded" and "--chat-workers" in refused.value.body["message"]
        # A request above the operator's cap is a 400 naming max_tokens (not clamped, not queued).
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            svc.chat().chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=5000)
    finally:
        for f in fillers:
            f.close()
        (svc.data_dir / "datasets" / "during-chat.jsonl").unlink(missing_ok=True)
    wait_until(lambda: svc.http.get("/v1/post-training/job/status",
                                    params={"job_uuid": "ctl-job"}).json()["status"] == "cancelled", 120,
               message="ctl-job cancelled")


# -- 10. child processes' environments ------------------------------------------------------------------------
def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(e.split("=", 1) for e in raw.split("\0") if "=" in e)


def child_environments(marker: str, timeout: float = 120) -> list[dict[str, str]]:
    """The environments of the processes whose command line mentions `marker`, read while they run."""
    def read():
        envs = []
        for pid, _ in processes_mentioning(marker):
            try:
                envs.append(environ_of(pid))
            except OSError:
                continue
        return envs
    return wait_until(read, timeout, interval=0.02, message=f"a process mentioning {marker}")


def assert_no_secrets(env: dict[str, str], allowed: tuple[str, ...] = ()) -> None:
    leaked = {k for k, v in SECRETS.items() if k not in allowed and (k in env or v in env.values())}
    assert not leaked, f"secrets in a child's environment: {sorted(leaked)}"
    assert not [k for k in env if k.startswith("TRL_FSDP_")]


@pytest.mark.slow
def test_validation_and_export_children_get_no_service_secrets(svc, tiny_models, toy_data):
    model = tiny_models["student"]
    r = svc.http.post("/v1/validations", json={"validation_id": "env-val", "model": model, "compare_base": False,
                                              "prompts": toy_data["heldout_prompts"][:3], "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    envs = child_environments(str(svc.data_dir / "workflows" / "validations" / "env-val"))
    for env in envs:
        assert_no_secrets(env)
    r = svc.http.post("/v1/exports", json={"export_id": "env-exp", "model": model, "formats": ["merged"]})
    assert r.status_code == 200, r.text
    envs = child_environments(str(svc.data_dir / "workflows" / "exports" / "env-exp"))
    for env in envs:
        assert_no_secrets(env)
    for kind, task in (("validations", "env-val"), ("exports", "env-exp")):
        wait_until(lambda: svc.http.get(f"/v1/{kind}/{task}").json()["state"] not in ("scheduled", "in_progress"), 300,
                   message=f"{kind} {task} done")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
def test_training_jobs_get_only_the_secrets_handed_to_them(svc, tiny_models):
    r = svc.http.post("/v1/post-training/supervised-fine-tune", json=sft("env-train", tiny_models["student"], 3000))
    assert r.status_code == 200, r.text
    try:
        # The job zygote (the service's child every job forks from) has the jobs' environment; a forked job's
        # /proc environ holds its process title instead, so only readable environments count.
        zygotes = [environ_of(pid) for pid, _ in processes_mentioning("providers.jobs.zygote")
                   if parent_of(pid) == svc.proc.pid]
        envs = [e for e in zygotes + child_environments(str(svc.data_dir / "runs" / "env-train")) if "PATH" in e]
        assert envs, "no readable environment of a training process"
        for env in envs:
            assert_no_secrets(env, allowed=("WANDB_API_KEY",))  # --pass-env training=WANDB_API_KEY
            assert env.get("WANDB_API_KEY") == SECRETS["WANDB_API_KEY"]
    finally:
        svc.http.post("/v1/post-training/job/cancel", json={"job_uuid": "env-train"})


# -- 11. names and the dashboard ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_names_with_a_trailing_newline_are_refused(svc):
    r = svc.http.post("/v1/datasets/evil%0A/rows", content=b'{"a": 1}\n')
    assert r.status_code == 400 and "dataset_id" in r.text, r.text
    assert [p.name for p in (svc.data_dir / "datasets").iterdir() if "\n" in p.name] == []
    r = httpx.put(f"{svc.url}/v1/teacher-outputs/evil%0A", content=b"x", timeout=30,
                  headers={"authorization": f"Bearer {API_TOKEN}", "x-node-token": NODE_TOKEN})
    assert r.status_code == 400, r.text
    assert [p.name for p in (svc.data_dir / "uploaded_teacher_outputs").glob("*") if "\n" in p.name] == []


@pytest.mark.slow
def test_markup_in_a_job_fact_is_shown_as_text(svc, tiny_models):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from operator_fixtures import chromium_path

    model = copy_model(tiny_models["student"], svc.models / HOSTILE_MODEL_NAME)
    r = svc.http.post("/v1/post-training/supervised-fine-tune", json=sft("markup-job", model, steps=2))
    assert r.status_code == 200, r.text
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(f"{svc.url}/dashboard/")
            page.wait_for_selector("#login[open]")
            page.fill("#token", API_TOKEN)
            page.click("#login button[type=submit]")
            page.wait_for_selector("tr[data-job='markup-job']", timeout=60_000)
            page.goto(f"{svc.url}/dashboard/#/job/markup-job")
            page.wait_for_selector("#job-facts div", timeout=60_000)
            wait_until(lambda: "model" in page.inner_text("#job-facts"), 60, message="the job's facts shown")
            assert page.query_selector("#pwn") is None
            assert HOSTILE_MODEL_NAME.split("/")[-1] in page.inner_text("#job-facts")
        finally:
            browser.close()
