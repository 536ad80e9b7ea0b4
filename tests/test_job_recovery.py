"""The job queue's own guarantees, on the JobManager itself (no server, no training): a record whose run
directory or spec is gone or corrupt fails alone with the reason at start-up and never blocks the queue,
and a run directory without a record (a submit cut short) is removed."""

from __future__ import annotations

import sys

import pytest

from providers.jobs.manager import JobManager
from providers.jobs.store import JobRecord, JobStore
from providers.training.run_files import RunFiles
from providers.training.spec import CheckpointSpec, DataSpec, JobSpec


def spec_for(run_dir, job_uuid: str) -> JobSpec:
    return JobSpec(job_uuid=job_uuid, method="sft", model="/models/none", run_dir=str(run_dir),
                   data=DataSpec(train_file=str(run_dir / "train.jsonl")),
                   checkpoint=CheckpointSpec(output_dir=str(run_dir / "checkpoints")))


def exits_at_once(spec: JobSpec, files: RunFiles) -> list[str]:
    # Stands in for the training entry point: these tests are about the queue, not about training.
    return [sys.executable, "-c", "import json, sys; json.dump({'state': 'completed'}, open('status.json', 'w'))"]


@pytest.fixture
def no_zygote(monkeypatch):
    """Jobs start as new processes, at once: with a zygote, the first jobs after a JobManager starts wait in
    the queue while it imports the training stack (seconds), which these tests of the queue do not need."""
    monkeypatch.setenv("TRL_JOB_ZYGOTE", "0")


@pytest.mark.usefixtures("no_zygote")
def test_broken_records_fail_alone_and_the_queue_runs_on(tmp_path):
    runs = tmp_path / "runs"
    store = JobStore(tmp_path / "jobs.db")
    for name in ("missing-dir", "corrupt-spec", "good"):
        store.create(JobRecord(job_uuid=name, method="sft", run_dir=str(runs / name)))
    (runs / "corrupt-spec").mkdir(parents=True)
    (runs / "corrupt-spec" / "spec.json").write_text('{"job_uuid": "corrupt-spec", "lr": ')
    (runs / "good").mkdir()
    spec_for(runs / "good", "good").save()
    (runs / "orphan").mkdir()  # a run dir whose submission never created its record
    (runs / "orphan" / "train.jsonl").write_text("{}\n")

    manager = JobManager(store, exits_at_once, max_concurrent_jobs=1, runs_dir=runs, niceness=0)
    assert store.get("missing-dir").status == "failed" and "run directory" in store.get("missing-dir").error
    assert store.get("corrupt-spec").status == "failed" and "spec" in store.get("corrupt-spec").error
    assert manager.wait("good", timeout_s=60) == "completed"
    assert not (runs / "orphan").exists()


@pytest.mark.usefixtures("no_zygote")
def test_a_job_that_cannot_start_fails_and_the_next_one_runs(tmp_path):
    runs = tmp_path / "runs"
    calls = []

    def command(spec: JobSpec, files: RunFiles) -> list[str]:
        calls.append(spec.job_uuid)
        if spec.job_uuid == "unlaunchable":
            raise OSError("no such interpreter")
        return exits_at_once(spec, files)

    manager = JobManager(JobStore(tmp_path / "jobs.db"), command, max_concurrent_jobs=1, runs_dir=runs, niceness=0)
    for name in ("unlaunchable", "next"):
        with manager.reserve(name) as run_dir:
            manager.submit(spec_for(run_dir, name))
    assert manager.wait("next", timeout_s=60) == "completed"
    failed = manager.store.get("unlaunchable")
    assert failed.status == "failed" and "no such interpreter" in failed.error
    assert calls == ["unlaunchable", "next"]


@pytest.mark.slow  # six job processes one after another behind a 1.5 s blocker
@pytest.mark.usefixtures("no_zygote")
def test_higher_priority_starts_first_and_a_failed_run_is_retried(tmp_path):
    """One slot: while a job holds it, three wait; they start highest priority first (equal priorities in
    submit order). A job with max_retries 1 that fails once runs again and completes, its record keeping
    the first run's error."""
    runs = tmp_path / "runs"
    started = []

    def command(spec: JobSpec, files: RunFiles) -> list[str]:
        started.append(spec.job_uuid)
        if spec.job_uuid == "blocker":
            return [sys.executable, "-c", "import time, json; time.sleep(1.5); "
                    "json.dump({'state': 'completed'}, open('status.json', 'w'))"]
        if spec.job_uuid == "flaky" and not (files.dir / "tried").exists():
            return [sys.executable, "-c", "open('tried', 'w'); raise SystemExit('first run fails')"]
        return exits_at_once(spec, files)

    manager = JobManager(JobStore(tmp_path / "jobs.db"), command, max_concurrent_jobs=1, runs_dir=runs, niceness=0)
    for name, priority, retries in (("blocker", 0, 0), ("low", -5, 0), ("flaky", 0, 1), ("high", 50, 0),
                                    ("later-high", 50, 0)):
        with manager.reserve(name) as run_dir:
            spec = spec_for(run_dir, name)
            spec.scheduling.priority, spec.scheduling.max_retries = priority, retries
            manager.submit(spec)
    for name in ("blocker", "low", "flaky", "high", "later-high"):
        assert manager.wait(name, timeout_s=60) == "completed", manager.store.get(name).error
    assert started == ["blocker", "high", "later-high", "flaky", "flaky", "low"]
    flaky = manager.store.get("flaky")
    assert flaky.attempts == 2 and "first run fails" in flaky.resources["retries"][0]["error"]
    assert manager.job_view("flaky")["resources_allocated"]["attempts"] == 2
