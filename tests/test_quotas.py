"""Disk quotas that count everything a user's work writes (issue 27, finding 3), through real HTTP and the openai
SDK on a real service: uploads, fine-tuning jobs' copies of files, run dirs and checkpoints, continuation models.
Each test failed on the code before: jobs copied files with no claim, checkpoints counted nowhere, a failed
continuation left its merged model behind, and there was no usage route."""

from __future__ import annotations

import io
import json
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from helpers import users_service

KEYS = {name: f"{name}-{uuid.uuid4().hex}" for name in ("ops", "alice", "carol", "erin", "bob")}
GB = 1 << 30
ALICE_GB, ERIN_GB, DATA_GB = 0.004, 0.006, 0.03  # 4.3 MB, 6.4 MB; the data dir: 32 MB
USERS = {"ops": ("admin", KEYS["ops"], {}), "alice": ("member", KEYS["alice"], {"max_data_gb": ALICE_GB}),
         "carol": ("member", KEYS["carol"], {"max_data_gb": 0.05}),
         "erin": ("member", KEYS["erin"], {"max_data_gb": ERIN_GB}), "bob": ("member", KEYS["bob"], {})}


@pytest.fixture(scope="module")
def svc(tmp_path_factory, tiny_models):
    models_root = str(Path(tiny_models["student"]).parent)
    with users_service(tmp_path_factory.mktemp("quotas"), USERS, models_root, "--nproc-per-node", "1",
                       "--max-data-gb", str(DATA_GB), "--max-queued-jobs", "50") as (url, data, log):
        yield {"url": url, "data": data, "log": log, "student": tiny_models["student"]}


def sdk(svc, user: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=svc["url"] + "/v1/openai/v1", api_key=KEYS[user], max_retries=0, timeout=120)


def usage(svc) -> dict:
    r = httpx.get(svc["url"] + "/v1/admin/usage", headers={"authorization": f"Bearer {KEYS['ops']}"})
    assert r.status_code == 200, r.text
    return {u["user"]: u for u in r.json()["users"]} | {"data_dir": r.json()["data_dir"]}


def chat_file(client, rows: int, pad: int = 0) -> str:
    row = {"messages": [{"role": "user", "content": "reverse: a b c"},
                        {"role": "assistant", "content": "c b a" + " ." * (pad // 2)}]}
    data = "".join(json.dumps(row) + "\n" for _ in range(rows)).encode()
    return client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune").id


def trl(steps: int, finetuning: str = "lora", **extra) -> dict:
    """Our extension: a few steps, fp32 on CPU."""
    return {"extra_body": {"trl": {"finetuning": finetuning,
                                   "training_config": {"max_steps_per_epoch": steps, "dtype": "fp32", **extra}}}}


def wait_job(client, job_id: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"{job_id} still {job.status}"
        time.sleep(0.5)
    return job


def jobs_until_507(client, svc, file_id: str, most: int) -> tuple[list[str], openai.APIStatusError]:
    """Fine-tuning jobs on `file_id`, each cancelled at once, until one is refused (507); the accepted jobs' ids."""
    accepted = []
    for _ in range(most):
        try:
            job = client.fine_tuning.jobs.create(model=svc["student"], training_file=file_id, **trl(1))
        except openai.APIStatusError as e:
            return accepted, e
        accepted.append(job.id)
        client.fine_tuning.jobs.cancel(job.id)
    raise AssertionError(f"{most} jobs were accepted; the quota never refused one")


@pytest.mark.slow
def test_fine_tuning_jobs_copies_count_against_the_users_quota(svc):
    """Finding 3: each job copied its file twice with no claim. Now a member's jobs get a 507 naming its
    max_data_gb before they pass it, the refused job leaves nothing, and no dataset copy outlives a submission."""
    alice = sdk(svc, "alice")
    file_id = chat_file(alice, 500, pad=2000)  # about 1 MB
    accepted, refused = jobs_until_507(alice, svc, file_id, most=8)
    assert refused.status_code == 507 and "max_data_gb" in str(refused.body), refused.body
    assert refused.body["param"] == "training_file" and refused.body["code"] == "quota_exceeded"
    assert 1 <= len(accepted) <= 3
    held = usage(svc)["alice"]
    assert held["limit_bytes"] == int(ALICE_GB * GB) and 3 * (1 << 20) < held["bytes"] <= held["limit_bytes"], held
    assert not list((svc["data"] / "datasets").rglob("ftjob-*")), "a job's dataset copy outlived its submission"
    runs = {p.name for p in (svc["data"] / "runs").iterdir()}
    assert set(accepted) <= runs and not {r for r in runs if r.startswith("ftjob-")} - set(accepted)
    with pytest.raises(openai.APIStatusError) as upload:  # uploads of the same user: the same quota
        chat_file(alice, 500, pad=4000)
    assert upload.value.status_code == 507 and "max_data_gb" in str(upload.value.body)
    assert not [p for p in (svc["data"] / "files").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_usage_route_is_for_admins(svc):
    body = usage(svc)
    assert body["erin"]["max_data_gb"] == ERIN_GB and body["bob"]["limit_bytes"] is None
    assert body["data_dir"]["limit_bytes"] == int(DATA_GB * GB) and body["data_dir"]["bytes"] > 0
    r = httpx.get(svc["url"] + "/v1/admin/usage", headers={"authorization": f"Bearer {KEYS['alice']}"})
    assert r.status_code == 403, r.text


@pytest.mark.slow
def test_a_job_fails_naming_the_quota_when_its_checkpoints_fill_it(svc):
    """Training output is written by the job, not the service: a user whose checkpoints pass its quota has its
    running job failed within seconds, naming max_data_gb (a full fine-tune saving every step, 2 MB a save)."""
    erin = sdk(svc, "erin")
    job = erin.fine_tuning.jobs.create(model=svc["student"], training_file=chat_file(erin, 64),
                                       **trl(400, "full", save_steps=1))
    job = wait_job(erin, job.id, timeout=180)
    assert job.status == "failed" and "max_data_gb" in job.error.message, job
    assert usage(svc)["erin"]["bytes"] > ERIN_GB * GB
    with pytest.raises(openai.APIStatusError) as again:  # over quota: no new work
        erin.fine_tuning.jobs.create(model=svc["student"], training_file=chat_file(sdk(svc, "erin"), 1), **trl(1))
    assert again.value.status_code == 507


@pytest.mark.slow
def test_a_continuation_whose_submission_fails_leaves_no_merged_model(svc):
    """A continuation from an adapter's ft: id merges it into the base (in a child process, claimed from the quota
    first); when the job is then refused, the merged copy is removed instead of staying outside any quota."""
    carol = sdk(svc, "carol")
    file_id = chat_file(carol, 16)
    job = wait_job(carol, carol.fine_tuning.jobs.create(model=svc["student"], training_file=file_id, **trl(2)).id)
    assert job.status == "succeeded", job
    models = svc["data"] / "openai_ft" / "models"
    with pytest.raises(openai.BadRequestError, match="no_such_setting"):
        carol.fine_tuning.jobs.create(model=job.fine_tuned_model, training_file=file_id,
                                      **trl(1, no_such_setting=1))
    assert not [p.name for p in models.iterdir()], "the refused job's merged model stayed"
    again = carol.fine_tuning.jobs.create(model=job.fine_tuned_model, training_file=file_id, **trl(1))
    assert (models / f"{job.id}-final" / "config.json").is_file() and not list(models.glob(".*"))
    carol.fine_tuning.jobs.cancel(again.id)
    assert usage(svc)["carol"]["bytes"] > (models / f"{job.id}-final" / "model.safetensors").stat().st_size


def test_the_merge_child_is_bounded(tmp_path, tiny_models):
    """The merge runs under an address-space limit: too small a one fails the child, never the caller."""
    from providers.openai_ft import continuation

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    base = continuation.MERGE_AS_BASE
    continuation.MERGE_AS_BASE = 64 << 20  # torch alone needs more
    try:
        with pytest.raises(RuntimeError, match="address space"):
            continuation.merge_in_child(adapter, tiny_models["student"], tmp_path / "out", tmp_path / "merge.log")
    finally:
        continuation.MERGE_AS_BASE = base
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_jobs_copies_count_against_the_data_dirs_quota(svc):
    """A member without a quota of its own still meets --max-data-gb: jobs' copies count there too (last: it
    fills the data dir)."""
    bob = sdk(svc, "bob")
    file_id = chat_file(bob, 500, pad=4000)  # about 2 MB
    accepted, refused = jobs_until_507(bob, svc, file_id, most=16)
    assert refused.status_code == 507 and "--max-data-gb" in str(refused.body), refused.body
    assert usage(svc)["data_dir"]["bytes"] <= DATA_GB * GB
