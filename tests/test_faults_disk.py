"""A full or read-only disk and a stopped rank, round two (issue 32): a job's end and its cause reach disk even
when the disk is full and survive a restart; a restart on a full disk serves (degraded), on a read-only one it
exits at once with one line; a stopped rank is found after a limit derived from the job's own pace."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time

import pytest
from helpers import processes_mentioning, wait_until
from test_faults import fill, long_sft, services, start_and_fail, tmpfs, upload_toy  # noqa: F401 - fixtures
from test_fsdp_service import sft_body
from test_security import sft

from providers.jobs.store import STORE_RESERVE_BYTES
from providers.training.run_files import PROGRESS_FLOOR_S

pytestmark = pytest.mark.slow  # real services on real small file systems

SUBMIT = "/v1/post-training/supervised-fine-tune"


def on_disk(data_dir, job_uuid: str) -> tuple[str, str | None]:
    """(status, error) of the job as jobs.db has it, read by another process's connection."""
    db = sqlite3.connect(f"file:{data_dir / 'jobs.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT status, error FROM jobs WHERE job_uuid = ?", [job_uuid]).fetchone()
    finally:
        db.close()


def health(svc) -> dict:
    return svc.get("/health").json()


def test_a_full_disk_leaves_the_jobs_end_and_cause_on_disk_through_a_restart(tmpfs, services, tiny_models, toy_data):
    disk = tmpfs("disk", 32)
    data = disk / "data"
    svc = services(data)
    upload_toy(svc, toy_data)
    assert (data / "jobs.db.reserve").stat().st_blocks * 512 >= STORE_RESERVE_BYTES
    r = svc.post(SUBMIT, json=long_sft("filling", tiny_models["student"], save_steps=2, save_total_limit=2))
    assert r.status_code == 200, r.text
    wait_until(lambda: svc.status("filling")["checkpoints"], 240, interval=0.2, message="a first checkpoint")
    filler = fill(disk, leave_bytes=256 << 10)  # the next checkpoint cannot fit

    ended = svc.wait("filling", timeout=240)
    error = ended["resources_allocated"].get("error", "")
    assert ended["status"] == "failed" and "no space left" in error.lower(), error
    # On disk, not only in memory: the store, the status file, the rank's whole traceback; no temp file left.
    assert on_disk(data, "filling") == ("failed", error)
    run = data / "runs" / "filling"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "no space left" in status["error"].lower(), status
    log = (run / "logs" / "rank0.log").read_text(errors="replace")
    traceback = log[log.rindex("Traceback (most recent call last):"):]
    assert re.search(r"^\w[\w.]*(Error|Exception): ", traceback, re.M), traceback[-2000:]  # its last line too
    assert [p.name for p in run.rglob("*") if ".tmp" in p.name or p.name.endswith(".reserve")] == []
    # Degraded, and says why; new work is refused with 507 while the space kept back is gone.
    h = health(svc)
    print(f"\ndisk full: {error[:200]}\n/health: {h}")
    assert h["status"] == "degraded" and "no space left" in " ".join(h["problems"]), h
    r = svc.post(SUBMIT, json=sft("while-full", tiny_models["student"]))
    assert r.status_code == 507, (r.status_code, r.text)

    # SIGTERM, then a restart on the disk that is still full: it serves, and the cause is still the cause.
    svc.stop()
    t_start = time.monotonic()
    svc = services(data)
    print(f"restart on the full disk: serving after {time.monotonic() - t_start:.1f} s: {health(svc)}")
    assert svc.status("filling")["resources_allocated"]["error"] == error
    assert health(svc)["status"] == "degraded"

    # Space freed: it keeps space back again by itself and takes jobs.
    filler.unlink()
    wait_until(lambda: health(svc)["status"] == "OK", 30, message="healthy once there is room")
    assert svc.post(SUBMIT, json=sft("after", tiny_models["student"])).status_code == 200


def test_a_restart_on_a_read_only_or_full_disk_exits_at_once_or_serves(tmpfs, services, tiny_models, toy_data):
    """The machine died mid-job (service and job killed); the disk it comes back to is read-only, then full with
    no space kept back: start-up never waits on a write."""
    disk = tmpfs("disk", 32)
    data = disk / "data"
    svc = services(data)
    upload_toy(svc, toy_data)
    assert svc.post(SUBMIT, json=long_sft("cut", tiny_models["student"])).status_code == 200
    wait_until(lambda: (svc.status("cut")["resources_allocated"].get("step") or 0) >= 2, 240, message="step 2")
    os.killpg(svc.proc.pid, signal.SIGKILL)
    svc.proc.wait()
    for pid, _ in processes_mentioning(str(data / "runs" / "cut")):
        os.kill(pid, signal.SIGKILL)

    # Once the killed service's zygote, which holds its log open for writing, has seen its jobs end and exited.
    wait_until(lambda: subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode == 0,
               30, message="the disk remounted read-only")
    try:
        t_start = time.monotonic()
        code, out = start_and_fail(data, timeout=90)
        took = time.monotonic() - t_start
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    last = out.strip().splitlines()[-1]
    print(f"\nread-only at start: exit {code} after {took:.1f} s: {last}")
    assert code != 0 and "Traceback" not in out and last.startswith("cannot start: data dir"), out

    for reserve in [data / "jobs.db.reserve", *(data / "runs" / "cut" / "ranks").glob("*.reserve")]:
        reserve.unlink()  # given up by earlier ends: nothing left to give
    filler = fill(disk, leave_bytes=0)
    t_start = time.monotonic()
    svc = services(data)
    h = health(svc)
    print(f"full at start: serving after {time.monotonic() - t_start:.1f} s: {h}")
    shown = svc.status("cut")
    assert shown["status"] == "failed", shown
    assert "restarted" in shown["resources_allocated"]["error"] and "no space left" in shown["resources_allocated"]["error"]
    assert h["status"] == "degraded" and "held in memory" in " ".join(h["problems"]), h
    assert on_disk(data, "cut")[0] == "in_progress"  # what /health says: not on disk yet
    assert svc.post(SUBMIT, json=sft("while-full", tiny_models["student"])).status_code == 507

    filler.unlink()
    t_free = time.monotonic()
    wait_until(lambda: on_disk(data, "cut")[0] == "failed", 30, message="the held end written")
    wait_until(lambda: health(svc)["status"] == "OK", 30, message="healthy once there is room")
    print(f"space freed: the held end on disk and /health OK after {time.monotonic() - t_free:.1f} s")
    assert on_disk(data, "cut") == ("failed", shown["resources_allocated"]["error"])


def test_a_stopped_rank_is_found_from_the_jobs_pace_with_default_settings(tmp_path, services, tiny_models, toy_data):
    svc = services(tmp_path / "data")
    upload_toy(svc, toy_data)
    body = sft_body("paced", tiny_models["student"], nproc=2, steps=50)
    body["training_config"]["n_epochs"] = 20
    assert svc.post(SUBMIT, json=body).status_code == 200
    run = svc.runs_dir / "paced"
    shown = wait_until(lambda: "x the job's step time" in (s := svc.status("paced")["resources_allocated"]).get(
        "progress_timeout_from", "") and s, 300, interval=0.5, message="the job's pace known")
    print(f"\nprogress limit: {shown['progress_timeout_s']} s: {shown['progress_timeout_from']}")
    assert shown["progress_timeout_s"] == PROGRESS_FLOOR_S  # tiny steps: the floor, not the 300 s default

    def logged_step() -> int:
        return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]

    before = logged_step()
    step = svc.status("paced")["resources_allocated"]["step"]
    assert before <= step <= logged_step()  # the status follows the metrics

    pid = int((run / "ranks" / "rank1.alive").read_text())
    os.kill(pid, signal.SIGSTOP)
    t_stop = time.monotonic()
    try:
        ended = svc.wait("paced", timeout=PROGRESS_FLOOR_S + 60)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    detect_s = time.monotonic() - t_stop
    error = ended["resources_allocated"].get("error", "")
    print(f"SIGSTOP of rank 1, default settings: {ended['status']} after {detect_s:.1f} s: {error[:200]}")
    assert ended["status"] == "failed" and "rank 1 made no progress" in error and "x the job's step time" in error, error
    assert PROGRESS_FLOOR_S - 12 <= detect_s < PROGRESS_FLOOR_S + 30  # the last beat was up to 10 s before the stop
    wait_until(lambda: not processes_mentioning(str(run)), 30, message="no process of the job left")
