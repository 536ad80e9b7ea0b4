"""Hostile input and crashes, bounded in time: the service's whole OpenAPI fuzzed by schemathesis, the
Llama Stack routes (the provider methods behind `llama stack run`) fuzzed by hypothesis with raw bodies
(non-finite numbers, huge and deeply nested values, unicode and NUL, wrong types), and the service
SIGKILLed at random points of submit, training and checkpointing. After each: no 5xx, every record
consistent, nothing written outside the data dir, a valid job still completes, the restart is clean."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
import schemathesis
from helpers import free_port, processes_mentioning, wait_for_job, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fsdp_service import Service
from test_security import API_TOKEN, NODE_TOKEN, Authed, secret_files, sft

pytestmark = pytest.mark.slow  # fuzzes and SIGKILLs real service processes

ACTIVE = ("scheduled", "in_progress")
FUZZ_COUNTS = {"requests": 0, "5xx": 0}


def sft_body(job_uuid: str, model: str, steps: int = 2, **tc) -> dict:
    """test_security's one-process SFT body, with training_config extras."""
    body = sft(job_uuid, model, steps)
    body["training_config"].update(tc)
    return body


def job_processes(run_dir: Path) -> list[int]:
    """Live processes of the job in `run_dir` (its path is an argument of their command line)."""
    return [pid for pid, cmdline in processes_mentioning(str(run_dir)) if str(run_dir) in cmdline.split()]


def records_consistent(data_dir: Path, status_of) -> list[str]:
    """Problems with the job records: scheduled without a spec, in_progress without a process."""
    problems = []
    runs = data_dir / "runs"
    for job in status_of():
        run_dir = runs / job["job_uuid"]
        if job["status"] == "scheduled" and not (run_dir / "spec.json").exists():
            problems.append(f"{job['job_uuid']}: scheduled without a spec")
        if job["status"] == "in_progress" and not job_processes(run_dir):
            problems.append(f"{job['job_uuid']}: in_progress without a process")
    return problems


# -- schemathesis over the service's OpenAPI (its hypothesis strategies, driven directly: schemathesis'
# pytest plugin does not run under pytest 9) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory, toy_data, tiny_models):
    root = tmp_path_factory.mktemp("fuzz")
    api, node = secret_files(root / "secrets")
    svc = Authed(root / "data", extra=["--api-token-file", str(api), "--node-token-file", str(node),
                                       "--max-archive-mb", "8", "--max-body-mb", "8"])
    rows = "".join(json.dumps(r) + "\n" for r in toy_data["instruct"])
    assert svc.post("/v1/datasets/toy/rows", data=rows).status_code == 200
    svc.tmp_before = set(os.listdir("/tmp"))  # what exists outside the data dir before the fuzzing
    yield svc
    svc.stop()
    for pid, _ in processes_mentioning(str(svc.data_dir)):
        os.kill(pid, signal.SIGKILL)


def test_openapi_fuzz_never_answers_5xx(fuzz_service):
    """Every operation of the service's OpenAPI, with schemathesis-generated requests (valid and invalid
    shapes, unicode and NUL in strings, wrong types), carrying both credentials so that the generated
    requests reach the routes' own validation."""
    schema = schemathesis.openapi.from_url(fuzz_service.url + "/openapi.json")
    headers = {"authorization": f"Bearer {API_TOKEN}", "x-node-token": NODE_TOKEN}
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def call(case):
            response = case.call(base_url=fuzz_service.url, headers=headers, timeout=60)
            FUZZ_COUNTS["requests"] += 1
            if response.status_code >= 500:
                FUZZ_COUNTS["5xx"] += 1
                failures.append(f"{case.method} {case.formatted_path} {case.body!r:.300}: "
                                f"{response.status_code} {response.text[:300]}")

        call()
    assert failures == [], "\n".join(failures[:20])


def test_after_fuzzing_records_are_consistent_and_the_service_restarts_clean(fuzz_service, tiny_models, tmp_path):
    svc = fuzz_service
    print(f"\nschemathesis: {FUZZ_COUNTS['requests']} requests, {FUZZ_COUNTS['5xx']} answered 5xx")
    assert FUZZ_COUNTS["5xx"] == 0
    jobs = lambda: [{"job_uuid": j["job_uuid"], "status": j["status"]}  # noqa: E731
                    for j in svc.get("/v1/post-training/jobs").json()["data"]]
    assert records_consistent(svc.data_dir, jobs) == []
    # Nothing created outside the data dir (the fuzzer sent paths of every kind): beside it, and in /tmp
    # apart from what tests and jobs make there (pytest's and tempfile's directories, zygote sockets, the
    # torchrun agents' log dirs of any test's job: the other worker's tests run meanwhile).
    assert sorted(p.name for p in svc.data_dir.parent.iterdir()) == sorted(["data", "secrets", svc.log.name])
    new = {n for n in set(os.listdir("/tmp")) - svc.tmp_before
           if not n.startswith(("tmp", "pytest", "trl-zygote", "torchelastic_"))}
    assert new == set(), new
    r = svc.post("/v1/post-training/supervised-fine-tune", json=sft_body("after-fuzz", tiny_models["student"]))
    assert r.status_code == 200, r.text
    assert svc.wait("after-fuzz")["status"] == "completed"
    svc.stop()
    again = Authed(svc.data_dir, port=svc.port, extra=["--api-token-file", str(svc.data_dir.parent / "secrets" / "api"),
                                                       "--node-token-file", str(svc.data_dir.parent / "secrets" / "node")])
    fuzz_service.proc = again.proc  # the module fixture stops whichever runs
    assert again.status("after-fuzz")["status"] == "completed"
    r = again.post("/v1/post-training/supervised-fine-tune", json=sft_body("after-restart", tiny_models["student"]))
    assert r.status_code == 200 and again.wait("after-restart")["status"] == "completed"


# -- hypothesis over the Llama Stack routes --------------------------------------------------------------------
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["\x00", "..", "../../etc", "/etc/passwd", "\ud800", "🦙" * 50, "x" * 10000, "1e999"]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=20)


def mutate(body: dict, path: list[str], value) -> dict:
    node = body
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return body


FIELDS = [["job_uuid"], ["model"], ["finetuned_model"], ["checkpoint_dir"], ["logger_config"],
          ["hyperparam_search_config"], ["algorithm_config"], ["algorithm_config", "reward_scale"],
          ["algorithm_config", "epsilon"], ["algorithm_config", "loss_type"], ["training_config"],
          ["training_config", "n_epochs"], ["training_config", "learning_rate"],
          ["training_config", "data_config"], ["training_config", "data_config", "batch_size"],
          ["training_config", "data_config", "dataset_id"], ["training_config", "optimizer_config", "lr"],
          ["training_config", "max_seq_len"], ["training_config", "dtype"], ["logger_config", "logging_steps"]]


@pytest.fixture(scope="module")
def stack(llama_stack_factory, run_yaml, tmp_path_factory, tiny_models, toy_data):
    server = llama_stack_factory(run_yaml, tmp_path_factory.mktemp("fuzz_stack"))
    client = server.client()
    client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": toy_data["preference"]},
                             dataset_id="pref")
    client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": toy_data["instruct"]},
                             dataset_id="toy")
    return server, client


def test_llama_stack_routes_fuzzed_with_hostile_bodies(stack, tiny_models, llama_stack_factory, run_yaml):
    server, client = stack
    counts = {"requests": 0, "5xx": 0}
    base = {
        "job_uuid": "fuzz", "model": tiny_models["student"], "finetuned_model": tiny_models["student"],
        "algorithm_config": {"type": "dpo", "reward_scale": 0.1, "reward_clip": 5.0, "epsilon": 0.1, "gamma": 0.99},
        "training_config": {"n_epochs": 1, "max_steps_per_epoch": 1, "dtype": "fp32",
                            "data_config": {"dataset_id": "pref", "batch_size": 2, "shuffle": True,
                                            "data_format": "instruct"},
                            "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-3, "weight_decay": 0.0,
                                                 "num_warmup_steps": 0}},
        "hyperparam_search_config": {}, "logger_config": {},
    }

    @given(route=st.sampled_from(["supervised-fine-tune", "preference-optimize"]),
           changes=st.lists(st.tuples(st.sampled_from(FIELDS), json_values), min_size=1, max_size=3),
           nesting=st.integers(min_value=0, max_value=3000))
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def fuzz(route, changes, nesting):
        body = json.loads(json.dumps(base))
        body["job_uuid"] = f"fuzz-{counts['requests']}"
        for path, value in changes:
            mutate(body, path, value)
        if nesting > 2000:  # a deeply nested value somewhere
            body["hyperparam_search_config"] = json.loads("[" * 900 + "]" * 900)
        data = json.dumps(body, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
        r = requests.post(f"{server.base_url}/v1/post-training/{route}", data=data,
                          headers={"content-type": "application/json"}, timeout=120)
        counts["requests"] += 1
        if r.status_code >= 500:
            counts["5xx"] += 1
        assert r.status_code < 500, (route, body, r.status_code, r.text[:500])
        if r.status_code == 200:  # an accepted job must not linger: cancel it
            client.post_training.job.cancel(job_uuid=body["job_uuid"])

    fuzz()
    print(f"\nhypothesis on the Llama Stack routes: {counts['requests']} requests, {counts['5xx']} answered 5xx")
    jobs = lambda: [{"job_uuid": j.job_uuid, "status": client.post_training.job.status(job_uuid=j.job_uuid).status}  # noqa: E731
                    for j in client.post_training.job.list()]
    wait_until(lambda: not [j for j in jobs() if j["status"] in ACTIVE], 120, message="fuzzed jobs ended")
    assert records_consistent(server.data_dir, jobs) == []
    runs = {p.name for p in (server.data_dir / "runs").iterdir()} if (server.data_dir / "runs").exists() else set()
    assert runs == {j["job_uuid"] for j in jobs()}  # a run dir for every record and a record for every run dir
    client.post_training.supervised_fine_tune(
        job_uuid="after-hypothesis", model=tiny_models["student"], hyperparam_search_config={}, logger_config={},
        training_config={**base["training_config"],
                         "data_config": {**base["training_config"]["data_config"], "dataset_id": "toy"}})
    assert wait_for_job(client, "after-hypothesis", 300).status == "completed"
    # The server restarts cleanly on the same data dir, with every record.
    before = {j["job_uuid"] for j in jobs()}
    server.stop()
    again = llama_stack_factory(run_yaml, server.data_dir)
    assert {j.job_uuid for j in again.client().post_training.job.list()} == before
    assert again.client().post_training.job.status(job_uuid="after-hypothesis").status == "completed"


# -- SIGKILL chaos -------------------------------------------------------------------------------------------------------
def test_sigkill_at_random_points_keeps_every_record_consistent(tmp_path, tiny_models, toy_data):
    """Six SIGKILLs of the service, two at each point: during a submit, while training, while checkpoints are written."""
    rng = random.Random(20261128)
    data = tmp_path / "data"
    port = free_port()
    svc = Service(data, port=port, extra=["--max-concurrent-jobs", "1"])
    rows = "".join(json.dumps(r) + "\n" for r in toy_data["instruct"])
    assert svc.post("/v1/datasets/toy/rows", data=rows).status_code == 200
    student = tiny_models["student"]
    jobs = lambda: svc.get("/v1/post-training/jobs").json()["data"]  # noqa: E731
    survived = 0
    try:
        for i in range(6):
            point = ("submit", "training", "checkpoint")[i % 3]
            running = f"chaos-{i}"
            # 48 steps with a checkpoint every 2: a kill within 0.5 s of a checkpoint finds the job still running
            # (with 16, a fast machine finished some before the kill, and none was left failed to resume)
            body = sft_body(running, student, steps=48, save_steps=2, save_total_limit=2)
            queued = sft_body(f"chaos-{i}-queued", student, steps=1)
            if point == "submit":
                t = threading.Thread(target=lambda: _quiet_post(svc, body))
                t.start()
                time.sleep(rng.uniform(0.0, 0.25))
            else:
                assert svc.post("/v1/post-training/supervised-fine-tune", json=body).status_code == 200
                assert svc.post("/v1/post-training/supervised-fine-tune", json=queued).status_code == 200
                key = "step" if point == "training" else "checkpoints"
                wait_until(lambda: _progress(svc, running, key), 180, interval=0.05, message=f"{running} {key}")
                time.sleep(rng.uniform(0.0, 0.5))
            os.kill(svc.proc.pid, signal.SIGKILL)  # the service dies; its jobs lose their supervisor
            svc.proc.wait()
            svc = Service(data, port=port, extra=["--max-concurrent-jobs", "1"])
            survived += 1
            assert records_consistent(data, jobs) == [], (point, jobs())
            records = {j["job_uuid"]: j["status"] for j in jobs()}
            if point != "submit":
                # Stopped at the restart, or it finished before the restart came (its status.json says so):
                # recorded as it ended, with its final checkpoint.
                assert records[running] in ("failed", "completed"), records
                if records[running] == "completed":
                    assert svc.status(running)["checkpoints"], svc.status(running)
                # The queued job was not lost: it runs after the restart.
                assert svc.wait(f"chaos-{i}-queued")["status"] == "completed"
            else:
                assert records.get(running) in (None, "failed", "in_progress", "scheduled", "completed")
                if records.get(running) in ACTIVE:
                    svc.post("/v1/post-training/job/cancel", json={"job_uuid": running})
            # Nothing of the killed incarnation runs on: a job that is not active has no process.
            for job in jobs():
                if job["status"] not in ACTIVE:
                    assert job_processes(data / "runs" / job["job_uuid"]) == [], job
        # A job killed while checkpointing resumes from its own checkpoint and completes.
        resumable = next(j["job_uuid"] for j in jobs() if j["job_uuid"].endswith(("-1", "-2", "-4", "-5"))
                         and j["status"] == "failed" and svc.status(j["job_uuid"])["checkpoints"])
        assert svc.post("/v1/post-training/job/resume", json={"job_uuid": resumable}).status_code == 200
        final = svc.wait(resumable, timeout=300)
        assert final["status"] == "completed", final["resources_allocated"].get("error")
        print(f"\nSIGKILL chaos: {survived} restarts survived, every record consistent")
    finally:
        svc.stop()
        assert processes_mentioning(str(data / "runs")) == []


def _quiet_post(svc, body):
    try:
        svc.post("/v1/post-training/supervised-fine-tune", json=body)
    except requests.RequestException:
        pass  # the service died mid-request


def _progress(svc, job_uuid: str, key: str) -> bool:
    s = svc.status(job_uuid)
    if s["status"] not in ACTIVE:
        raise AssertionError(f"{job_uuid} ended early: {s}")
    return bool(s["checkpoints"] if key == "checkpoints" else (s["resources_allocated"].get("step") or 0) >= 1)
