"""Jobs forked from the preloaded zygote keep what a separate process gives: their own session and process
group, environment, working directory and log; cancel leaves nothing behind; a crashing job (or zygote)
cannot take the server down. And they start faster: measured and printed, never asserted."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from providers.jobs import zygote
from providers.jobs.manager import JobManager, kill_process_group, process_group_alive
from providers.jobs.store import JobStore
from providers.training.data import normalize_rows, write_jsonl
from providers.training.run_files import RunFiles
from providers.training.spec import CheckpointSpec, DataSpec, JobSpec, OptimizerSpec

REPORT = (
    "import json, os, sys; "
    "print(json.dumps({'pid': os.getpid(), 'pgid': os.getpgid(0), 'sid': os.getsid(0), 'cwd': os.getcwd(), "
    "'nice': os.nice(0), 'marker': os.environ.get('JOB_MARKER'), 'leak': os.environ.get('LEAKED'), "
    "'cmdline': open('/proc/self/cmdline').read().replace(chr(0), ' ')})); "
    "os.environ['LEAKED'] = 'yes'"
)


@pytest.fixture(scope="module")
def env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "JOB_MARKER": "m1"}


@pytest.fixture(scope="module")
def ready_zygote(env):
    z = zygote.zygote_for(env)
    assert z.ready(), z.log_tail()
    return z


def launch(argv, env, cwd: Path, log: Path, niceness: int = 0):
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return zygote.launch_job_process(argv, stdout=out, env=env, cwd=str(cwd), niceness=niceness,
                                         start_new_session=True)


@pytest.mark.slow  # starts a zygote process (it imports the training stack)
def test_forked_job_has_its_own_session_env_cwd_and_log(ready_zygote, env, tmp_path):
    reports = []
    for i in range(2):
        log = tmp_path / f"job{i}.log"
        proc = launch([sys.executable, "-c", REPORT, "arg"], env, tmp_path / f"run{i}", log, niceness=3)
        assert isinstance(proc, zygote.ZygoteProcess)
        assert proc.wait(60) == 0
        lines = log.read_text().splitlines()
        assert len(lines) == 1, lines  # only this job's output in its log
        reports.append(json.loads(lines[0]))
    for i, r in enumerate(reports):
        assert r["pid"] == r["pgid"] == r["sid"]  # leader of its own session: cancel signals all of it
        assert r["cwd"] == str(tmp_path / f"run{i}")
        assert r["marker"] == "m1" and r["leak"] is None  # the first job's environment change did not leak
        assert r["nice"] >= 3
        assert REPORT[:20] in r["cmdline"]  # /proc shows the job's command, as for a spawned process
    assert ready_zygote.alive()


@pytest.mark.slow  # starts a zygote process (it imports the training stack)
def test_cancel_kills_the_job_and_its_children(ready_zygote, env, tmp_path):
    code = ("import subprocess, time, pathlib; p = subprocess.Popen(['sleep', '300']); "
            "pathlib.Path('child.pid').write_text(str(p.pid)); time.sleep(300)")
    proc = launch([sys.executable, "-c", code], env, tmp_path / "run", tmp_path / "job.log")
    pid_file = tmp_path / "run" / "child.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    kill_process_group(proc.pid)
    assert proc.wait(10) == -signal.SIGTERM
    assert not process_group_alive(proc.pid)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split(")")[1][:3]


@pytest.mark.slow  # starts a zygote process (it imports the training stack)
def test_a_segfaulting_job_ends_alone(ready_zygote, env, tmp_path):
    proc = launch([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"], env, tmp_path / "run", tmp_path / "log")
    assert proc.wait(30) == -signal.SIGSEGV
    assert ready_zygote.alive()
    again = launch([sys.executable, "-c", "print('still here')"], env, tmp_path / "run2", tmp_path / "log2")
    assert again.wait(30) == 0 and "still here" in (tmp_path / "log2").read_text()


def test_without_a_zygote_jobs_start_as_new_processes(env, tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_JOB_ZYGOTE", "0")
    proc = launch([sys.executable, "-c", "print('spawned')"], env, tmp_path / "run", tmp_path / "log")
    assert not isinstance(proc, zygote.ZygoteProcess)
    assert proc.wait(60) == 0


# -- through the JobManager, with real training jobs -------------------------------------------------
def training_command(spec, files):
    return [sys.executable, "-m", "providers.training.run", str(files.dir)]


def sft_spec(root: Path, name: str, model: str, rows: list[dict]) -> JobSpec:
    run_dir = root / "runs" / name
    write_jsonl(rows, run_dir / "train.jsonl")
    return JobSpec(job_uuid=name, method="sft", model=model, run_dir=str(run_dir),
                   data=DataSpec(train_file=str(run_dir / "train.jsonl"), batch_size=4, max_seq_len=64),
                   optimizer=OptimizerSpec(lr=1e-3), max_steps_per_epoch=3,
                   checkpoint=CheckpointSpec(output_dir=str(run_dir / "checkpoints"), resume=False))


def first_step_s(run_dir: str, submitted: float) -> float:
    """Seconds from submit until metrics.jsonl holds the first logged training step (polled every 10 ms)."""
    path = Path(run_dir) / "metrics.jsonl"
    while not path.exists() or not path.read_text().strip():
        time.sleep(0.01)
    return time.time() - submitted


@pytest.mark.slow  # trains
def test_manager_runs_jobs_from_the_zygote_and_survives_a_crash(tiny_models, toy_data, tmp_path, monkeypatch):
    rows = list(normalize_rows(toy_data["instruct"][:12], "completion"))
    timings = {}
    for mode in ("spawn", "zygote"):
        monkeypatch.setenv("TRL_JOB_ZYGOTE", "0" if mode == "spawn" else "1")
        root = tmp_path / mode
        manager = JobManager(JobStore(root / "jobs.db"), training_command, env={"OMP_NUM_THREADS": "1"}, niceness=0)
        if mode == "zygote":
            assert zygote.zygote_for(manager.job_env()).ready()
        spec = sft_spec(root, f"{mode}-job", tiny_models["student"], rows)
        t0 = time.time()
        manager.submit(spec)
        first = first_step_s(spec.run_dir, t0)
        assert manager.wait(spec.job_uuid, timeout_s=300) == "completed", RunFiles(spec.run_dir).tail_log(30)
        timings[mode] = (first, time.time() - t0)
        assert (Path(spec.run_dir) / "checkpoints" / "final" / "config.json").exists()
    print("\nsubmit -> first step / whole job (s): " + ", ".join(
        f"{mode} {first:.2f} / {whole:.2f}" for mode, (first, whole) in timings.items()))

    # A job that segfaults fails alone; the manager keeps running jobs.
    crash = JobManager(JobStore(tmp_path / "crash" / "jobs.db"),
                       lambda spec, files: [sys.executable, "-c", "import ctypes; ctypes.string_at(0)"],
                       env={"OMP_NUM_THREADS": "1"}, niceness=0)
    spec = sft_spec(tmp_path / "crash", "segv", tiny_models["student"], rows)
    crash.submit(spec)
    assert crash.wait(spec.job_uuid, timeout_s=60) == "failed"
    assert "-11" in (crash.store.get(spec.job_uuid).error or "")
    ok = JobManager(JobStore(tmp_path / "ok" / "jobs.db"), training_command, env={"OMP_NUM_THREADS": "1"}, niceness=0)
    spec = sft_spec(tmp_path / "ok", "after-crash", tiny_models["student"], rows)
    ok.submit(spec)
    assert ok.wait(spec.job_uuid, timeout_s=300) == "completed"


@pytest.mark.slow  # starts a zygote process (it imports the training stack)
def test_a_dead_zygote_is_replaced_and_its_running_job_still_ends(env, tmp_path):
    z = zygote.zygote_for(env)
    assert z.ready()
    run = tmp_path / "run"
    code = "import time, json; time.sleep(1.5); open('status.json', 'w').write(json.dumps({'state': 'completed'}))"
    proc = launch([sys.executable, "-c", code], env, run, tmp_path / "log")
    os.kill(z.proc.pid, signal.SIGKILL)
    assert proc.wait(60) == 0  # exit status from status.json: the zygote that knew it is gone
    again = launch([sys.executable, "-c", "print('new zygote')"], env, tmp_path / "run2", tmp_path / "log2")
    assert again.wait(120) == 0 and "new zygote" in (tmp_path / "log2").read_text()
    assert zygote.zygote_for(env) is not z


def test_a_zygote_whose_server_died_before_it_looked_exits(env, tmp_path):
    """A server SIGKILLed between starting its zygote and the zygote's first look at its parent: the zygote
    knows the server by the pid it was given, not by whoever its parent is by then (init), and exits once
    it has nothing to reap. It lived on before, holding the training stack (640 MB) forever."""
    import subprocess

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a server that is already dead
    sock_dir = tmp_path / "trl-zygote-test"
    sock_dir.mkdir()
    z = subprocess.Popen([sys.executable, "-m", "providers.jobs.zygote", str(sock_dir / "zygote.sock"), str(gone.pid)],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert z.wait(120) == 0
    finally:
        if z.poll() is None:
            z.kill()
    assert not (sock_dir / "zygote.sock").exists()
