"""Long uptime: N short jobs through one FSDP training service (zygote on), measured every K jobs.

    python benchmarks/bench_uptime.py --model /tmp/tiny-models/student --jobs 300 --every 25

Prints one table row per K jobs: the service's and the zygote's RSS, open file descriptors and threads, the
service's child processes (and zombies among them), jobs.db and jobs.db-wal sizes, and the status route's
p50/p99 latency over 50 calls. The service is stopped with SIGTERM at the end and the WAL size printed again
(a clean stop folds it into jobs.db). Not a test: nothing is asserted; see tests/test_faults.py for the short
version that checks fds, threads and children stay flat."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent


def proc_stat(pid: int) -> dict:
    """RSS (MB), open fds and threads of process `pid` from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of the direct children of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append((int(entry.name), fields[0]))
    return found


def zygote_of(pid: int) -> int | None:
    for child, _ in children(pid):
        try:
            if b"providers.jobs.zygote" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
        except OSError:
            continue
    return None


def measure(url: str, pid: int, data_dir: Path, job_uuid: str) -> dict:
    """One row: the service's and its zygote's resources, the store's size, status latency."""
    row = {f"svc_{k}": v for k, v in proc_stat(pid).items()}
    zygote = zygote_of(pid)
    row.update({f"zyg_{k}": v for k, v in (proc_stat(zygote) if zygote else {}).items()})
    kids = children(pid)
    row["children"] = len(kids)
    row["zombies"] = sum(1 for _, state in kids if state == "Z")
    row["db_kb"] = (data_dir / "jobs.db").stat().st_size / 1024
    wal = data_dir / "jobs.db-wal"
    row["wal_kb"] = wal.stat().st_size / 1024 if wal.exists() else 0.0
    times = []
    for _ in range(50):
        t = time.perf_counter()
        requests.get(f"{url}/v1/post-training/job/status", params={"job_uuid": job_uuid}, timeout=30)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    row["status_p50_ms"] = statistics.median(times)
    row["status_p99_ms"] = times[int(len(times) * 0.99) - 1]
    return row


def sft(job_uuid: str, model: str) -> dict:
    return {"job_uuid": job_uuid, "model": model, "training_config": {
        "n_epochs": 1, "max_steps_per_epoch": 1, "dtype": "fp32",
        "data_config": {"dataset_id": "toy", "batch_size": 2, "shuffle": False},
        "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-3, "weight_decay": 0.0, "num_warmup_steps": 0},
        "torch_run_config": {"nproc_per_node": 1}}}


def run_jobs(url: str, model: str, start: int, count: int) -> None:
    """Submit `count` one-step jobs one after the other, each waited for."""
    for i in range(start, start + count):
        job_uuid = f"up-{i:04d}"
        r = requests.post(f"{url}/v1/post-training/supervised-fine-tune", json=sft(job_uuid, model), timeout=120)
        r.raise_for_status()
        while True:
            status = requests.get(f"{url}/v1/post-training/job/status", params={"job_uuid": job_uuid},
                                  timeout=30).json()["status"]
            if status not in ("scheduled", "in_progress"):
                if status != "completed":
                    raise RuntimeError(f"job {job_uuid} {status}")
                break
            time.sleep(0.1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a tiny causal LM directory (scripts/build_tiny_models.py)")
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--data-dir", help="default: a new temporary directory")
    args = p.parse_args()
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="bench-uptime-")) / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "TRL_FSDP_ALLOWED_MODEL_ROOTS": str(Path(args.model).resolve().parent)}
    log = open(data_dir.parent / "service.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "providers.remote_fsdp.service.app", "--port", str(port),
                             "--data-dir", str(data_dir)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                requests.get(f"{url}/health", timeout=2).raise_for_status()
                break
            except requests.RequestException:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"the service did not start; see {data_dir.parent / 'service.log'}")
                time.sleep(0.5)
        rows = "".join(json.dumps({"input_query": f"reverse: {a} {b}", "expected_answer": f"{b} {a}"}) + "\n"
                       for a in "abcdefgh" for b in "ijklmnop")
        requests.post(f"{url}/v1/datasets/toy/rows", data=rows, timeout=60).raise_for_status()
        header = ("jobs", "svc_rss_mb", "zyg_rss_mb", "svc_fds", "zyg_fds", "svc_threads", "zyg_threads",
                  "children", "zombies", "db_kb", "wal_kb", "status_p50_ms", "status_p99_ms")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        done = 0
        while done < args.jobs:
            n = min(args.every, args.jobs - done)
            run_jobs(url, args.model, done, n)
            done += n
            row = {"jobs": done, **measure(url, proc.pid, data_dir, f"up-{done - 1:04d}")}
            print("| " + " | ".join(f"{row.get(k, 0):.1f}" if isinstance(row.get(k, 0), float) else str(row.get(k, ""))
                                    for k in header) + " |", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    wal = data_dir / "jobs.db-wal"
    print(f"after SIGTERM: exit {proc.returncode}, jobs.db-wal {wal.stat().st_size if wal.exists() else 0} bytes")


if __name__ == "__main__":
    main()
