"""One service, several users (`--api-keys-file`): each user's jobs, files, models, tasks and pipelines are its
own. Another user's object answers exactly as an object that does not exist, through every route family:
the Llama Stack post-training routes, datasets, the OpenAI files / fine-tuning / models / chat API, the
workflow tasks, pipelines, the dashboard's API, the log stream, /metrics and the remote::trl_fsdp adapter.
An admin sees everyone's, with the owner named. Per-user limits: queued jobs."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import httpx
import openai
import pytest
from helpers import users_service, wait_until

ALICE, BOB, ROOT = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef", "root-key-0123456789abcdef"
USERS = {"alice": ("member", ALICE, {}), "bob": ("member", BOB, {"max_queued_jobs": 1, "max_files": 1}),
         "root": ("admin", ROOT, {})}


# -- fast: the keys file ------------------------------------------------------------------------------------
@pytest.mark.parametrize("content,message", [
    ("users: [{name: a, key_sha256: secret-key-in-plain-text}]", "users.0.key_sha256"),
    ("users: [{name: Alice!, key_sha256: " + "a" * 64 + "}]", "users.0.name"),
    ("users: [{name: a, key_sha256: " + "a" * 64 + "}, {name: b, key_sha256: " + "a" * 64 + "}]", "the same key"),
    ("users: [{name: a, role: owner, key_sha256: " + "a" * 64 + "}]", "users.0.role"),
    ("users: [{name: a, key_sha256: " + "a" * 64 + ", limits: {max_jobs: 1}}]", "users.0.limits.max_jobs"),
])
def test_a_bad_keys_file_stops_start_up_in_one_line(tmp_path, content, message):
    from providers.remote_fsdp.service.users import read_users_file

    (tmp_path / "keys.yaml").write_text(content)
    with pytest.raises(SystemExit) as e:
        read_users_file(str(tmp_path / "keys.yaml"))
    assert message in str(e.value) and "\n" not in str(e.value), e.value


# -- slow: one service, three users ------------------------------------------------------------------------
def chat_rows(toy_data, n=16):
    return [{"messages": [{"role": "user", "content": r["input_query"]},
                          {"role": "assistant", "content": r["expected_answer"]}]} for r in toy_data["instruct"][:n]]


@pytest.fixture(scope="module")
def svc(tmp_path_factory, tiny_models, toy_data):
    """Alice's work: a dataset, an OpenAI file and fine-tuning job (a service job too) that completed, a
    validation task of its model and a pipeline; bob and root (an admin) then look for them."""
    models_root = str(Path(tiny_models["student"]).parent)
    with users_service(tmp_path_factory.mktemp("users"), USERS, models_root, "--nproc-per-node", "1") as (
            url, data, log):
        alice = openai.OpenAI(base_url=url + "/v1/openai/v1", api_key=ALICE, max_retries=0, timeout=120)
        http = httpx.Client(base_url=url, headers={"authorization": f"Bearer {ALICE}"}, timeout=120)
        rows = [{"messages": r["messages"]} for r in chat_rows(toy_data)]
        assert http.post("/v1/datasets/toy/rows", json=rows).json()["rows"] == 16
        datasets = http.get("/v1/datasets").json()["data"]
        f = alice.files.create(file=("train.jsonl", io.BytesIO("".join(json.dumps(r) + "\n" for r in rows).encode())),
                               purpose="fine-tune")
        job = alice.fine_tuning.jobs.create(
            model=tiny_models["student"], training_file=f.id, suffix="mine",
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
            extra_body={"trl": {"training_config": {"max_steps_per_epoch": 2, "save_steps": 1, "dtype": "fp32"}}})
        wait_until(lambda: alice.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed"), 300,
                   interval=0.5, message="alice's job ends")
        job = alice.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded", (job.error, log.read_text()[-3000:])
        ckpt = alice.fine_tuning.jobs.checkpoints.list(job.id).data[-1].fine_tuned_model_checkpoint
        r = http.post("/v1/validations", json={"validation_id": "val-a", "model": f"job:{job.id}",
                                               "prompts": [{"input_query": "reverse: a b", "expected_answer": "b a"}], "max_new_tokens": 4})
        assert r.status_code == 200, r.text
        r = http.post("/v1/pipelines/teacher-student", json={
            "pipeline_id": "pipe-a", "rows": [{"input_query": "reverse: ab"}] * 4,
            "teacher": {"model": tiny_models["student"], "max_new_tokens": 4},
            "students": [{"name": "s", "model": tiny_models["student"], "max_steps_per_epoch": 1}]})
        assert r.status_code == 200, r.text
        yield {"url": url, "data": data, "log": log, "job": job, "file": f, "ckpt": ckpt, "http": http,
               "student": tiny_models["student"], "datasets": datasets}
        http.close()


def client(svc, key):
    return httpx.Client(base_url=svc["url"], headers={"authorization": f"Bearer {key}"}, timeout=120)


def same_as_missing(bob: httpx.Client, method: str, path: str, real: str, fake: str, field: str = "", **kw) -> None:
    """Bob asking for alice's `real` id gets exactly what he gets for the id `fake` that exists nowhere (an
    error naming `field`)."""
    def ask(ident):
        swap = lambda v: json.loads(json.dumps(v).replace(real, ident)) if v is not None else None
        r = bob.request(method, path.replace(real, ident), params=swap(kw.get("params")), json=swap(kw.get("json")))
        return r.status_code, r.text.replace(ident, "ID")

    got, missing = ask(real), ask(fake)
    assert got == missing, (method, path, got, missing)
    assert got[0] in (400, 404) and field in got[1], (method, path, got)


@pytest.mark.slow
def test_bob_finds_nothing_of_alices_anywhere(svc, toy_data):
    job, f, ckpt = svc["job"], svc["file"], svc["ckpt"]
    fake_job, fake_file = "ftjob-" + "0" * 24, "file-" + "0" * 24
    with client(svc, BOB) as bob:
        # Llama Stack's post-training routes (0.2.12 and later shapes), the log stream, downloads
        assert job.id not in bob.get("/v1/post-training/jobs").text
        for method, path, kw in [
            ("GET", "/v1/post-training/job/status", {"params": {"job_uuid": job.id}}),
            ("GET", "/v1/post-training/job/artifacts", {"params": {"job_uuid": job.id}}),
            ("GET", "/v1/post-training/job/logs", {"params": {"job_uuid": job.id}}),
            ("GET", "/v1/post-training/job/logs", {"params": {"job_uuid": job.id, "follow": True}}),
            ("GET", "/v1/post-training/job/download", {"params": {"job_uuid": job.id}}),
            ("POST", "/v1/post-training/job/cancel", {"json": {"job_uuid": job.id}}),
            ("POST", "/v1/post-training/job/resume", {"json": {"job_uuid": job.id}}),
            ("GET", f"/v1alpha/post-training/jobs/{job.id}/status", {}),
            ("GET", f"/v1alpha/post-training/jobs/{job.id}/artifacts", {}),
            # the OpenAI API: files, jobs, events, checkpoints, models
            ("GET", f"/v1/openai/v1/files/{f.id}", {}),
            ("GET", f"/v1/openai/v1/files/{f.id}/content", {}),
            ("DELETE", f"/v1/openai/v1/files/{f.id}", {}),
            ("GET", f"/v1/openai/v1/fine_tuning/jobs/{job.id}", {}),
            ("GET", f"/v1/openai/v1/fine_tuning/jobs/{job.id}/events", {}),
            ("GET", f"/v1/openai/v1/fine_tuning/jobs/{job.id}/checkpoints", {}),
            ("POST", f"/v1/openai/v1/fine_tuning/jobs/{job.id}/cancel", {}),
            ("POST", f"/v1/openai/v1/fine_tuning/jobs/{job.id}/pause", {}),
            ("POST", f"/v1/openai/v1/fine_tuning/jobs/{job.id}/resume", {}),
            ("GET", f"/v1/openai/v1/models/{job.fine_tuned_model}", {}),
            ("GET", f"/v1/openai/v1/models/{ckpt}", {}),
            # the dashboard's API
            ("GET", f"/dashboard/api/jobs/{job.id}", {}),
            ("GET", f"/dashboard/api/jobs/{job.id}/metrics", {}),
            ("GET", f"/dashboard/api/jobs/{job.id}/logs", {}),
            ("POST", f"/dashboard/api/jobs/{job.id}/cancel", {}),
            ("POST", f"/dashboard/api/jobs/{job.id}/resume", {}),
        ]:
            same_as_missing(bob, method, path, job.id if job.id in json.dumps([path, kw]) else f.id,
                            fake_job if job.id in json.dumps([path, kw]) else fake_file, **kw)
        # chat with alice's model, its checkpoint, or her job's model; train on her file or continue from her model
        for model in (job.fine_tuned_model, ckpt, f"job:{job.id}"):
            same_as_missing(bob, "POST", "/v1/openai/v1/chat/completions", job.id, fake_job,
                            json={"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
            same_as_missing(bob, "POST", "/v1/openai/v1/completions", job.id, fake_job, "model",
                            json={"model": model, "prompt": "x", "max_tokens": 2, "logprobs": 1, "echo": True})
        same_as_missing(bob, "POST", "/v1/openai/v1/fine_tuning/jobs", f.id, fake_file,
                        json={"model": svc["student"], "training_file": f.id})
        same_as_missing(bob, "POST", "/v1/openai/v1/fine_tuning/jobs", job.id, fake_job,
                        json={"model": job.fine_tuned_model, "training_file": f.id})
        # by path: her checkpoint (to chat with, to train from, as checkpoint_dir), her pipeline's teacher outputs
        final = svc["http"].get("/v1/post-training/job/status", params={"job_uuid": job.id}).json()["checkpoints"][-1]["path"]
        assert bob.post("/v1/datasets/toy/rows", json=[{"messages": r["messages"]} for r in chat_rows(toy_data, 8)]
                        ).json()["rows"] == 8
        same_as_missing(bob, "POST", "/v1/openai/v1/chat/completions", job.id, fake_job, "model",
                        json={"model": final, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})
        same_as_missing(bob, "POST", "/v1/completions", job.id, fake_job, "model",
                        json={"model": final, "max_tokens": 2, "prompt": "x"})
        sft = {"job_uuid": "b-steal", "model": final, "algorithm_config": None, "logger_config": {},
               "hyperparam_search_config": {}, "checkpoint_dir": None,
               "training_config": {"n_epochs": 1, "max_steps_per_epoch": 1,
                                   "data_config": {"dataset_id": "toy", "batch_size": 2}}}
        same_as_missing(bob, "POST", "/v1/post-training/supervised-fine-tune", job.id, fake_job, "model", json=sft)
        same_as_missing(bob, "POST", "/v1/post-training/supervised-fine-tune", job.id, fake_job, "checkpoint_dir",
                        json={**sft, "model": svc["student"], "checkpoint_dir": str(Path(final).parent)})
        outputs = str(svc["data"] / "teacher_outputs" / "pipe-a-teacher")
        same_as_missing(bob, "POST", "/v1/post-training/supervised-fine-tune", "pipe-a-teacher", "nothing-here",
                        "teacher_outputs_dir", json={**sft, "model": svc["student"],
                              "algorithm_config": {"type": "distillation", "teacher_outputs_dir": outputs}})
        # workflow tasks and pipelines, each listing, reading, cancelling
        for base, ident in (("/v1/validations", "val-a"), ("/v1/pipelines", "pipe-a")):
            assert ident not in bob.get(base).text
            same_as_missing(bob, "GET", f"{base}/{ident}", ident, "nothing-here")
            same_as_missing(bob, "POST", f"{base}/{ident}/cancel", ident, "nothing-here")
        same_as_missing(bob, "GET", "/dashboard/api/tasks/validations/val-a", "val-a", "nothing-here")
        same_as_missing(bob, "GET", "/dashboard/api/pipelines/pipe-a", "pipe-a", "nothing-here")
        # lists: nothing of alice's
        for path in ("/v1/openai/v1/files", "/v1/openai/v1/fine_tuning/jobs", "/v1/openai/v1/models",
                     "/dashboard/api/jobs", "/dashboard/api/pipelines", "/dashboard/api/tasks/validations"):
            text = bob.get(path).text
            assert job.id not in text and f.id not in text and "pipe-a" not in text and "val-a" not in text, path
        # her dataset name is hers: his own "toy" left hers as it was
        mine, hers = (c.get("/v1/datasets").json()["data"] for c in (bob, svc["http"]))
        assert [d["dataset_id"] for d in mine] == ["toy"] and hers == svc["datasets"] and mine != hers
        # /metrics is every user's: admins only
        assert bob.get("/metrics").status_code == 403
    # the Llama Stack adapter passes bob's key: alice's job is unknown there too
    from providers.remote_fsdp.adapter import TrlFsdpAdapter
    from providers.remote_fsdp.config import TrlFsdpAdapterConfig

    adapter = TrlFsdpAdapter(TrlFsdpAdapterConfig(url=svc["url"], api_token=BOB, retries=0), datasetio=None)

    async def as_bob():
        listed = await adapter.get_training_jobs()
        try:
            await adapter.get_training_job_status(job.id)
        except Exception as e:  # noqa: BLE001 - the adapter's error for a 404
            return listed, str(e)
        return listed, None

    listed, error = asyncio.run(as_bob())
    assert job.id not in str(listed) and "unknown job_uuid" in str(error), error


def test_a_wrong_or_missing_key_is_a_401_whose_message_the_sdk_shows():
    """Through the OpenAI SDK, which prints only `error.message`: not a bare `Error code: 401`."""
    from fastapi import Depends, FastAPI

    from providers.remote_fsdp.service.users import UserKeys, client_auth, install_auth_errors

    app = FastAPI()
    install_auth_errors(app)

    @app.get("/v1/models", dependencies=[Depends(client_auth(UserKeys.single_admin("the-key")))])
    async def models():
        return {"object": "list", "data": []}

    async def call(key: str) -> str:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            sdk = openai.AsyncOpenAI(base_url="http://t/v1", api_key=key, http_client=http, max_retries=0)
            try:
                await sdk.models.list()
            except openai.AuthenticationError as e:
                assert e.status_code == 401
                return str(e)
            return "accepted"

    assert asyncio.run(call("the-key")) == "accepted"
    wrong = asyncio.run(call("not-the-key"))
    assert "wrong API key: not a key of this service" in wrong, wrong

    async def bare() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            return await http.get("/v1/models")
    r = asyncio.run(bare())  # Llama Stack clients read `detail`
    assert r.status_code == 401 and r.json()["detail"].startswith("missing API key")


@pytest.mark.slow
def test_an_admin_sees_everyone_with_the_owner_named_and_the_audit_log_names_users(svc):
    job = svc["job"]
    with client(svc, ROOT) as root:
        view = root.get("/v1/post-training/job/status", params={"job_uuid": job.id}).json()
        assert view["resources_allocated"]["owner"] == "alice"
        row = next(j for j in root.get("/dashboard/api/jobs").json()["data"] if j["job_uuid"] == job.id)
        assert row["owner"] == "alice"
        assert "pipe-a" in root.get("/dashboard/api/pipelines").text and "val-a" in root.get("/v1/validations").text
        assert root.get("/metrics").status_code == 200
    with client(svc, "not-a-key") as stranger:
        r = stranger.get("/v1/post-training/jobs")
        assert r.status_code == 401 and "wrong API key" in r.text
    log = (svc["data"] / "logs" / "service.log").read_text()  # the audit trail: in the data dir, not on stderr
    assert "user=alice POST /v1/openai/v1/fine_tuning/jobs -> 200" in log
    assert "user=bob GET /v1/post-training/job/status" in log


@pytest.mark.slow
def test_a_users_limits_leave_others_free(svc, toy_data):
    """Bob may queue one job (max_queued_jobs: 1) and keep one file (max_files: 1): past each, a 429 naming his
    limit; alice is not held back by his."""
    body = lambda uuid: {"job_uuid": uuid, "model": svc["student"], "algorithm_config": None, "logger_config": {},
                         "hyperparam_search_config": {}, "checkpoint_dir": None,
                         "training_config": {"n_epochs": 1, "max_steps_per_epoch": 1, "dtype": "fp32",
                                             "data_config": {"dataset_id": "toy", "batch_size": 2}}}
    rows = [{"messages": r["messages"]} for r in chat_rows(toy_data)]
    with client(svc, BOB) as bob, client(svc, ALICE) as alice:
        assert bob.post("/v1/datasets/toy/rows", json=rows).status_code == 200
        # alice's long job holds the one slot (or waits behind her pipeline): bob's first job waits in the queue
        long = body("a-long")
        long["training_config"]["n_epochs"] = 50
        assert alice.post("/v1/post-training/supervised-fine-tune", json=long).status_code == 200
        assert bob.post("/v1/post-training/supervised-fine-tune", json=body("b-1")).status_code == 200
        second = bob.post("/v1/post-training/supervised-fine-tune", json=body("b-2"))
        assert second.status_code == 429 and "max_queued_jobs" in second.text and "'bob'" in second.text, second.text
        assert alice.post("/v1/post-training/supervised-fine-tune", json=body("a-2")).status_code == 200
        for uuid, c in (("a-long", alice), ("b-1", bob), ("a-2", alice)):
            assert c.post("/v1/post-training/job/cancel", json={"job_uuid": uuid}).status_code == 200
    # bob keeps one file (max_files: 1); alice is not limited by his count
    upload = lambda key: openai.OpenAI(base_url=svc["url"] + "/v1/openai/v1", api_key=key, max_retries=0).files.create(
        file=("t.jsonl", io.BytesIO(("".join(json.dumps(r) + "\n" for r in rows)).encode())), purpose="fine-tune")
    upload(BOB)
    with pytest.raises(openai.RateLimitError, match="max_files"):
        upload(BOB)
    upload(ALICE)
