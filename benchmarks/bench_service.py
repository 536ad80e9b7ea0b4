#!/usr/bin/env python
"""Benchmark: the FSDP training service's own costs (job start overhead, status-poll latency).

Starts `python -m providers.remote_fsdp.service.app` on a free 127.0.0.1 port with its own temporary
data dir, uploads the toy "reverse the letters" instruct rows, and measures:

1. Submit-to-first-step overhead, service vs by hand. The same SFT job (tiny Llama student, fp32,
   `--steps` steps, `--nproc` torchrun processes on gloo, FULL_SHARD) is run
     service  POST /v1/post-training/supervised-fine-tune; t0 = just before the POST, so the submit's
              request validation, training-data normalization (prepare_job writes train.jsonl),
              spec/status writes and the torchrun Popen all count on the service side;
     by hand  a fresh run dir holding the service's spec.json / train.jsonl / torchrun.json (paths
              rewritten), t0 = just before building the argv with the service's own
              `launcher.torchrun_command` and `subprocess.Popen`-ing it exactly as
              `JobManager._start` does (own session, cwd = run dir, log to logs/train.log);
   and the time to the first step is the unix "time" of the first metrics.jsonl record with a loss
   (written by rank 0 right after step 1), minus t0. Runs alternate ABBA (svc, hand, hand, svc, ...),
   each waits for the previous job to finish, after `--warmup` discarded pairs (the first submit pays
   the service's lazy imports; it is printed, not counted). Medians and their difference are reported,
   with a breakdown from status.json (process_started_at: rank 0 running Python, training_started_at:
   Trainer.on_train_begin).

2. Status-poll latency under load. A long job (thousands of steps) is submitted and, once it trains,
   GET /v1/post-training/job/status?job_uuid=... is driven open-loop at `--rate` req/s for
   `--duration` s: request i is due at t0 + i/rate, `--workers` threads (one keep-alive httpx.Client
   each) take due requests in order. Latency = response received - request sent; "from due" adds any
   lateness of the client (coordinated omission), so a stalled server cannot hide. Then the job is
   cancelled and the same load is driven against the same (now idle) job, with no training running,
   as the baseline. p50 / p99 / max, errors and the achieved rate of both, and their ratio.
   If the loaded p99 misses `--p99-target-ms` (or with --profile), the status path is taken apart
   in-process against the live data dir while the job still runs (read-only: SQLite get, status.json,
   rank reports, FastAPI's jsonable_encoder + json.dumps), plus a serial (one at a time) HTTP probe,
   and a cProfile of the view + encoding.

Usage (from the repository root, venv active):

    python benchmarks/bench_service.py                         # both parts, defaults below
    python benchmarks/bench_service.py --models-dir /tmp/mine/m --repeats 5 --steps 5
    python benchmarks/bench_service.py --skip-overhead --rate 200 --duration 15 --profile
    python benchmarks/bench_service.py --json results.json --keep   # keep the data dir for inspection

Tiny models are built (or reused) with scripts/build_tiny_models.py under --models-dir. Only
127.0.0.1 is contacted. The service, every job it started and every by-hand torchrun are stopped
(process groups killed) at the end, also on error or Ctrl-C. This is a benchmark, not a test: it
asserts nothing; on a shared machine the numbers are noisy (the load average is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import itertools
import json
import os
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `scripts.build_tiny_models` and, if not installed, `providers`

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402

HOST = "127.0.0.1"
ACTIVE = ("scheduled", "in_progress")
STATUS = "/v1/post-training/job/status"


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def iso_to_unix(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    xs = sorted(values)
    k = max(0, min(len(xs) - 1, int(round(q / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def first_step(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if "loss" in rec:
                return rec
    return None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def kill_group(pgid: int, grace_s: float = 5.0) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (our unique temp dir), this one excluded."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def sft_body(job_uuid: str, model: str, nproc: int, steps: int, n_epochs: int = 1, global_batch: int = 8) -> dict:
    """The request of tests/test_fsdp_service.py's `sft_body`."""
    return {
        "job_uuid": job_uuid,
        "model": model,
        "training_config": {
            "n_epochs": n_epochs,
            "max_steps_per_epoch": steps,
            "dtype": "fp32",
            "data_config": {"dataset_id": "toy", "batch_size": global_batch // nproc, "shuffle": False,
                            "data_format": "instruct"},
            "optimizer_config": {"optimizer_type": "adamw", "lr": 3e-3, "weight_decay": 0.0,
                                 "num_warmup_steps": 0},
            "torch_run_config": {"nproc_per_node": nproc},
            "fsdp_config": {"sharding_strategy": "FULL_SHARD"},
        },
    }


# --------------------------------------------------------------------------- #
# The service under test
# --------------------------------------------------------------------------- #
class Service:
    def __init__(self, work: Path):
        self.data_dir = work / "data"
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = work / "service.log"
        self.client = httpx.Client(base_url=self.url, timeout=120)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "providers.remote_fsdp.service.app", "--host", HOST,
                 "--port", str(self.port), "--data-dir", str(self.data_dir)],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get("/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"service did not answer /health:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def run_dir(self, job_uuid: str) -> Path:
        return self.data_dir / "runs" / job_uuid

    def submit(self, body: dict) -> None:
        r = self.client.post("/v1/post-training/supervised-fine-tune", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"submit {body['job_uuid']}: HTTP {r.status_code} {r.text}")

    def status(self, job_uuid: str) -> dict:
        r = self.client.get(STATUS, params={"job_uuid": job_uuid})
        r.raise_for_status()
        return r.json()

    def wait(self, job_uuid: str, timeout: float = 600, interval: float = 0.5) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status(job_uuid)
            if s["status"] not in ACTIVE:
                return s
            time.sleep(interval)
        raise TimeoutError(f"job {job_uuid} still running after {timeout}s")

    def cancel(self, job_uuid: str) -> None:
        self.client.post("/v1/post-training/job/cancel", json={"job_uuid": job_uuid}, timeout=60)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        kill_group(self.proc.pid, grace_s=20)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


# --------------------------------------------------------------------------- #
# Part 1: submit-to-first-step overhead
# --------------------------------------------------------------------------- #
def timings(t0: float, run_dir: Path, t_returned: float | None = None) -> dict:
    rec = first_step(run_dir)
    status = read_json(run_dir / "status.json")
    out = {
        "first_step_s": rec["time"] - t0 if rec else float("nan"),
        "process_started_s": (iso_to_unix(status.get("process_started_at")) or float("nan")) - t0,
        "training_started_s": (iso_to_unix(status.get("training_started_at")) or float("nan")) - t0,
        "state": status.get("state"),
    }
    if t_returned is not None:
        out["submit_http_s"] = t_returned - t0
    return out


def service_run(svc: Service, name: str, model: str, args) -> dict:
    body = sft_body(name, model, args.nproc, args.steps)
    t0 = time.time()
    svc.submit(body)
    t_returned = time.time()
    final = svc.wait(name, timeout=args.job_timeout)
    out = timings(t0, svc.run_dir(name), t_returned)
    out["state"] = final["status"]
    return out


def make_template(svc: Service, source_uuid: str, dest: Path) -> Path:
    """spec.json / train.jsonl / torchrun.json of a finished service job: what a by-hand run starts from."""
    src = svc.run_dir(source_uuid)
    dest.mkdir(parents=True)
    for name in ("spec.json", "train.jsonl", "torchrun.json"):
        shutil.copy2(src / name, dest / name)
    return dest


def hand_run(template: Path, source_uuid: str, run_dir: Path, name: str, procs: list, args) -> dict:
    from providers.remote_fsdp.service.launcher import TorchRunOptions, torchrun_command
    from providers.training.run_files import RunFiles
    from providers.training.spec import JobSpec

    run_dir.mkdir(parents=True)
    spec_text = (template / "spec.json").read_text()
    old_dir = json.loads(spec_text)["run_dir"]
    spec_text = spec_text.replace(old_dir, str(run_dir)).replace(f'"{source_uuid}"', f'"{name}"')
    (run_dir / "spec.json").write_text(spec_text)
    shutil.copy2(template / "train.jsonl", run_dir / "train.jsonl")
    shutil.copy2(template / "torchrun.json", run_dir / "torchrun.json")

    t0 = time.time()
    files = RunFiles(run_dir)
    files.logs.mkdir(parents=True, exist_ok=True)
    spec = JobSpec.load(run_dir)
    opts = TorchRunOptions.model_validate_json((run_dir / "torchrun.json").read_text())
    argv = torchrun_command(spec, files, opts)
    with open(files.log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=run_dir)
    procs.append(proc)
    try:
        code = proc.wait(timeout=args.job_timeout)
    finally:
        kill_group(proc.pid, grace_s=2)  # nothing of it may outlive it
    out = timings(t0, run_dir)
    out["state"] = out["state"] if code == 0 else f"exit {code}"
    return out


def part_overhead(svc: Service, model: str, work: Path, procs: list, args) -> dict:
    print(f"\n== 1. submit-to-first-step: {args.steps} steps, nproc {args.nproc}, "
          f"{args.warmup} warm-up pair(s) + {args.repeats} pairs (ABBA) ==", flush=True)
    runs = {"service": [], "hand": []}
    template: Path | None = None
    source = ""
    counter = itertools.count()

    def one(kind: str, counted: bool) -> None:
        nonlocal template, source
        i = next(counter)
        if kind == "service":
            name = f"ovh-svc-{i}"
            r = service_run(svc, name, model, args)
            if template is None:
                template, source = make_template(svc, name, work / "hand-template"), name
        else:
            name = f"ovh-hand-{i}"
            r = hand_run(template, source, work / "hand" / name, name, procs, args)
        tag = "" if counted else "  (warm-up, not counted)"
        extra = f"  submit HTTP {r['submit_http_s']:.3f}s" if "submit_http_s" in r else ""
        print(f"  {name:12s} first step {r['first_step_s']:7.3f}s  python {r['process_started_s']:6.3f}s  "
              f"train begin {r['training_started_s']:6.3f}s{extra}  [{r['state']}]  load {loadavg()}{tag}",
              flush=True)
        if counted:
            runs[kind].append(r)

    for _ in range(args.warmup):
        one("service", False)
        one("hand", False)
    for i in range(args.repeats):
        order = ("service", "hand") if i % 2 == 0 else ("hand", "service")
        for kind in order:
            one(kind, True)
    return runs


# --------------------------------------------------------------------------- #
# Part 2: status-poll latency, open loop
# --------------------------------------------------------------------------- #
def drive(url: str, job_uuid: str, rate: float, duration: float, workers: int) -> dict:
    n = int(rate * duration)
    results: list[tuple | None] = [None] * n
    counter = itertools.count()
    lock = threading.Lock()
    start = {}
    ready = threading.Barrier(workers + 1)

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            with contextlib.suppress(httpx.HTTPError):
                client.get(STATUS, params={"job_uuid": job_uuid})  # open the keep-alive connection
            ready.wait()
            t0 = start["t0"]
            while True:
                with lock:
                    i = next(counter)
                if i >= n:
                    return
                due = t0 + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                sent = time.perf_counter()
                error = None
                try:
                    r = client.get(STATUS, params={"job_uuid": job_uuid})
                    if r.status_code != 200:
                        error = f"HTTP {r.status_code}"
                    else:
                        r.json()
                except Exception as e:  # noqa: BLE001 - every failure is a counted error
                    error = type(e).__name__
                results[i] = (due, sent, time.perf_counter(), error)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    start["t0"] = time.perf_counter() + 0.1
    ready.wait()
    for t in threads:
        t.join(timeout=duration + 60)
    done = [r for r in results if r is not None]
    ok = [r for r in done if r[3] is None]
    lat = [(r[2] - r[1]) * 1000 for r in ok]
    from_due = [(r[2] - r[0]) * 1000 for r in ok]
    late = [(r[1] - r[0]) * 1000 for r in done]
    errors: dict[str, int] = {}
    for r in done:
        if r[3] is not None:
            errors[r[3]] = errors.get(r[3], 0) + 1
    missing = n - len(done)
    if missing:
        errors["not sent"] = missing
    span = (max(r[2] for r in done) - min(r[1] for r in done)) if done else float("nan")
    return {
        "requests": n,
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "achieved_rate": len(done) / span if done else 0.0,
        "p50_ms": pct(lat, 50) if lat else float("nan"),
        "p90_ms": pct(lat, 90) if lat else float("nan"),
        "p99_ms": pct(lat, 99) if lat else float("nan"),
        "max_ms": max(lat) if lat else float("nan"),
        "mean_ms": statistics.fmean(lat) if lat else float("nan"),
        "p99_from_due_ms": pct(from_due, 99) if from_due else float("nan"),
        "max_from_due_ms": max(from_due) if from_due else float("nan"),
        "p99_client_late_ms": pct(late, 99) if late else float("nan"),
        "over_20ms": sum(1 for x in lat if x > 20),
    }


def steps_between(run_dir: Path, t_from: float, t_to: float) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    n = 0
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if "loss" in rec and t_from <= rec["time"] <= t_to:
                n += 1
    return n


def profile_status_path(svc: Service, job_uuid: str, iterations: int) -> dict:
    """Take GET job/status apart, in this process, against the live data dir (reads only)."""
    from fastapi.encoders import jsonable_encoder

    from providers.jobs.manager import JobManager
    from providers.jobs.store import JobStore
    from providers.training.run_files import RunFiles

    store = JobStore(svc.data_dir / "jobs.db")  # opens the same WAL database; creates nothing new
    fake_manager = SimpleNamespace(store=store)
    job = store.get(job_uuid)
    files = RunFiles(job.run_dir)

    def view():
        return JobManager.job_view(fake_manager, job_uuid)

    def encode():
        return json.dumps(jsonable_encoder(view()), ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode()

    v = view()
    parts = {
        "store.get (SQLite)": lambda: store.get(job_uuid),
        "read_status (status.json)": files.read_status,
        "rank_reports (glob + json)": files.rank_reports,
        "job_view total": view,
        "jsonable_encoder(view)": lambda: jsonable_encoder(v),
        "json.dumps (JSONResponse)": lambda: json.dumps(jsonable_encoder(v), separators=(",", ":")),
        "view + encode": encode,
    }
    out = {}
    for name, fn in parts.items():
        fn()
        samples = []
        for _ in range(iterations):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1000)
        out[name] = {"p50_ms": pct(samples, 50), "p99_ms": pct(samples, 99), "max_ms": max(samples)}

    # The real routes (routes.post_training_router) in a bare FastAPI app, called as ASGI in this process:
    # FastAPI/Starlette routing, the sync auth dependency and sync handler (each a thread-pool hop), the
    # response model and JSON encoding; no uvicorn, no socket. Once with create_app's auth dependency
    # (a plain `def`, as there), once without it.
    out.update(asgi_timings(fake_manager, view, job_uuid, iterations))

    # serial HTTP probe: one request at a time, no concurrency (latency floor of the full stack)
    serial = []
    with httpx.Client(base_url=svc.url, timeout=10) as client:
        client.get(STATUS, params={"job_uuid": job_uuid})
        for _ in range(iterations):
            t = time.perf_counter()
            client.get(STATUS, params={"job_uuid": job_uuid})
            serial.append((time.perf_counter() - t) * 1000)
        health = []
        for _ in range(iterations):
            t = time.perf_counter()
            client.get("/health")
            health.append((time.perf_counter() - t) * 1000)
    out["HTTP GET job/status, serial"] = {"p50_ms": pct(serial, 50), "p99_ms": pct(serial, 99), "max_ms": max(serial)}
    out["HTTP GET /health, serial"] = {"p50_ms": pct(health, 50), "p99_ms": pct(health, 99), "max_ms": max(health)}

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iterations):
        encode()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(18)
    out["_cprofile"] = text.getvalue()
    out["_view_bytes"] = len(encode())
    out["_status_json_bytes"] = files.status.stat().st_size if files.status.exists() else 0
    out["_rank_files"] = len(list(files.ranks.glob("rank*.json")))
    return out


def asgi_timings(fake_manager, view, job_uuid: str, iterations: int) -> dict:
    import asyncio

    from fastapi import Depends, FastAPI, Request

    from providers.remote_fsdp.service.routes import post_training_router

    service = SimpleNamespace(view=lambda uuid: view(), jobs=fake_manager)

    def require_token(request: Request) -> None:  # create_app's, with no api_token configured
        return None

    apps = {}
    for label, deps in (("ASGI in-process, with auth dep", [Depends(require_token)]),
                        ("ASGI in-process, no auth dep", [])):
        app = FastAPI()
        app.include_router(post_training_router(service), prefix="/v1/post-training", dependencies=deps)
        apps[label] = app

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": STATUS, "raw_path": STATUS.encode(), "root_path": "",
             "query_string": f"job_uuid={job_uuid}".encode(), "headers": [(b"host", b"127.0.0.1")],
             "client": (HOST, 1), "server": (HOST, 80)}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def run() -> dict:
        out = {}
        for label, app in apps.items():
            samples = []
            for k in range(iterations + 5):
                sent: list = []

                async def send(message, sent=sent):
                    sent.append(message)

                t = time.perf_counter()
                await app(dict(scope), receive, send)
                if k >= 5:
                    samples.append((time.perf_counter() - t) * 1000)
                if sent[0]["status"] != 200:
                    raise RuntimeError(f"{label}: HTTP {sent[0]['status']}")
            out[label] = {"p50_ms": pct(samples, 50), "p99_ms": pct(samples, 99), "max_ms": max(samples)}
        return out

    return asyncio.run(run())


def part_polling(svc: Service, model: str, args) -> dict:
    name = "poll-long"
    print(f"\n== 2. GET job/status at {args.rate:g} req/s for {args.duration:g}s, {args.workers} client "
          f"threads, open loop ==", flush=True)
    body = sft_body(name, model, args.nproc, steps=25, n_epochs=args.long_epochs)
    svc.submit(body)
    deadline = time.monotonic() + args.job_timeout
    while (svc.status(name)["resources_allocated"].get("step") or 0) < 2:
        if svc.status(name)["status"] not in ACTIVE:
            raise RuntimeError(f"long job ended early: {svc.status(name)}")
        if time.monotonic() > deadline:
            raise TimeoutError("long job did not start training")
        time.sleep(0.5)
    run_dir = svc.run_dir(name)
    print(f"  long job training (step {svc.status(name)['resources_allocated'].get('step')}), load {loadavg()}",
          flush=True)
    # training speed before the load, for comparison with the speed under it
    t_a = time.time()
    time.sleep(args.duration / 3)
    steps_before = steps_between(run_dir, t_a, time.time()) / (time.time() - t_a)
    t_b = time.time()
    loaded = drive(svc.url, name, args.rate, args.duration, args.workers)
    t_c = time.time()
    loaded["train_steps_per_s"] = steps_between(run_dir, t_b, t_c) / (t_c - t_b)
    loaded["train_steps_per_s_before"] = steps_before
    loaded["loadavg_after"] = loadavg()
    still = svc.status(name)["status"]
    print(f"  loaded: p50 {loaded['p50_ms']:.2f} ms, p99 {loaded['p99_ms']:.2f} ms, max {loaded['max_ms']:.1f} ms, "
          f"errors {loaded['errors']}, {loaded['achieved_rate']:.1f} req/s; job {still}, load {loadavg()}", flush=True)

    prof = None
    if args.profile or loaded["p99_ms"] >= args.p99_target_ms:
        print("  profiling the status path (job still training) ...", flush=True)
        prof = profile_status_path(svc, name, args.profile_iterations)

    t = time.time()
    svc.cancel(name)
    cancel_s = time.time() - t
    final = svc.status(name)["status"]
    print(f"  cancelled in {cancel_s:.2f}s -> {final}; {len(pids_mentioning(str(run_dir)))} processes of it left",
          flush=True)
    time.sleep(2)  # let the machine settle after the ranks died
    idle = drive(svc.url, name, args.rate, args.duration, args.workers)
    idle["loadavg_after"] = loadavg()
    print(f"  idle:   p50 {idle['p50_ms']:.2f} ms, p99 {idle['p99_ms']:.2f} ms, max {idle['max_ms']:.1f} ms, "
          f"errors {idle['errors']}, {idle['achieved_rate']:.1f} req/s, load {loadavg()}", flush=True)
    idle_prof = None
    if prof is not None:
        idle_prof = profile_status_path(svc, name, args.profile_iterations)
    return {"loaded": loaded, "idle": idle, "cancel_s": cancel_s, "cancel_state": final,
            "profile_loaded": prof, "profile_idle": idle_prof}


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #
def report(results: dict, args) -> None:
    print("\n" + "=" * 78)
    print(f"RESULTS  (nproc {args.nproc}, {os.cpu_count()} CPUs, load average now {loadavg()})")
    ov = results.get("overhead")
    if ov:
        svc, hand = ov["service"], ov["hand"]
        print(f"\n1. submit -> first training step, median of {len(svc)} service / {len(hand)} by-hand runs")
        print(f"   {'':34s} {'service':>9s} {'by hand':>9s} {'diff':>9s}")
        for key, label in (("first_step_s", "t0 -> first step (metrics time)"),
                           ("process_started_s", "t0 -> rank 0 Python running"),
                           ("training_started_s", "t0 -> Trainer.on_train_begin")):
            a, b = median([r[key] for r in svc]), median([r[key] for r in hand])
            print(f"   {label:34s} {a:8.3f}s {b:8.3f}s {a - b:+8.3f}s")
        print(f"   {'submit HTTP round trip (service)':34s} {median([r['submit_http_s'] for r in svc]):8.3f}s")
        diffs = [s["first_step_s"] - h["first_step_s"] for s, h in zip(svc, hand)]
        print(f"   paired diffs (service - hand): {', '.join(f'{d:+.3f}' for d in diffs)} s  "
              f"(median {median(diffs):+.3f} s; target <= +1 s)")
        svc_all = ", ".join(f"{r['first_step_s']:.2f}" for r in svc)
        hand_all = ", ".join(f"{r['first_step_s']:.2f}" for r in hand)
        print(f"   all runs, t0 -> first step: service {svc_all} s; by hand {hand_all} s")
    po = results.get("polling")
    if po:
        lo, idle = po["loaded"], po["idle"]
        print(f"\n2. GET job/status, open loop {args.rate:g} req/s x {args.duration:g}s "
              f"(target p99 < {args.p99_target_ms:g} ms, 0 errors)")
        print(f"   {'':26s} {'training':>10s} {'idle':>10s} {'ratio':>7s}")
        for key, label in (("p50_ms", "p50 (ms)"), ("p90_ms", "p90 (ms)"), ("p99_ms", "p99 (ms)"),
                           ("max_ms", "max (ms)"), ("mean_ms", "mean (ms)"),
                           ("p99_from_due_ms", "p99 from due time (ms)"),
                           ("p99_client_late_ms", "p99 client lateness (ms)")):
            a, b = lo[key], idle[key]
            print(f"   {label:26s} {a:10.2f} {b:10.2f} {a / b if b else float('nan'):7.2f}")
        for key, label in (("over_20ms", "requests > 20 ms"), ("errors", "errors"), ("requests", "requests")):
            print(f"   {label:26s} {lo[key]:10d} {idle[key]:10d}")
        print(f"   {'achieved rate (req/s)':26s} {lo['achieved_rate']:10.1f} {idle['achieved_rate']:10.1f}")
        print(f"   training steps/s: {lo['train_steps_per_s_before']:.2f} before the load, "
              f"{lo['train_steps_per_s']:.2f} under it; cancel took {po['cancel_s']:.2f}s -> {po['cancel_state']}")
        if lo["error_kinds"] or idle["error_kinds"]:
            print(f"   error kinds: training {lo['error_kinds']}, idle {idle['error_kinds']}")
        for label, prof in (("while training", po.get("profile_loaded")), ("idle", po.get("profile_idle"))):
            if not prof:
                continue
            print(f"\n   status path, in-process, {label} ({args.profile_iterations} calls each; view "
                  f"{prof['_view_bytes']} B, status.json {prof['_status_json_bytes']} B, "
                  f"{prof['_rank_files']} rank files)")
            print(f"   {'':34s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s}")
            for name, v in prof.items():
                if not name.startswith("_"):
                    print(f"   {name:34s} {v['p50_ms']:8.3f} {v['p99_ms']:8.3f} {v['max_ms']:8.2f}")
        if po.get("profile_loaded") and args.verbose_profile:
            print("\n   cProfile (view + encode, while training):")
            print(po["profile_loaded"]["_cprofile"])
    print("=" * 78)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "trl-fsdp-bench-models"),
                   help="tiny models are built here if not already (scripts/build_tiny_models.py)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="counted service/by-hand pairs")
    p.add_argument("--warmup", type=int, default=1, help="discarded service/by-hand pairs first")
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--workers", type=int, default=16, help="client threads of the poll load")
    p.add_argument("--long-epochs", type=int, default=400, help="epochs (25 steps each) of the long job")
    p.add_argument("--p99-target-ms", type=float, default=20.0)
    p.add_argument("--profile", action="store_true", help="profile the status path even if p99 is met")
    p.add_argument("--verbose-profile", action="store_true", help="print the cProfile listing")
    p.add_argument("--profile-iterations", type=int, default=300)
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-polling", action="store_true")
    p.add_argument("--job-timeout", type=float, default=600)
    p.add_argument("--json", help="write all results here")
    p.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    args = p.parse_args(argv)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)

    from scripts.build_tiny_models import build_tiny_models, make_toy_datasets

    model = build_tiny_models(args.models_dir)["student"]
    work = Path(tempfile.mkdtemp(prefix="bench-fsdp-service-"))
    procs: list[subprocess.Popen] = []
    svc = None
    results: dict = {"args": vars(args)}
    print(f"work dir {work}, model {model}, load average {loadavg()}", flush=True)
    try:
        svc = Service(work)
        print(f"service on {svc.url} (pid {svc.proc.pid}), log {svc.log}", flush=True)
        rows = "".join(json.dumps(r) + "\n" for r in make_toy_datasets()["instruct"])
        r = svc.client.post("/v1/datasets/toy/rows", content=rows)
        r.raise_for_status()
        if not args.skip_overhead:
            results["overhead"] = part_overhead(svc, model, work, procs, args)
        if not args.skip_polling:
            results["polling"] = part_polling(svc, model, args)
        report(results, args)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
            print(f"results in {args.json}")
    finally:
        if svc is not None:
            with contextlib.suppress(Exception):
                for job in svc.client.get("/v1/post-training/jobs", timeout=5).json()["data"]:
                    if job["status"] in ACTIVE:
                        svc.cancel(job["job_uuid"])
            svc.stop()
        for proc in procs:
            kill_group(proc.pid, grace_s=2)
        # anything still running from our unique work dir (torchrun agents, ranks) is ours: kill its group
        for pid in pids_mentioning(str(work)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                pgid = os.getpgid(pid)
                if pgid != os.getpgrp():
                    kill_group(pgid, grace_s=2)
        left = pids_mentioning(str(work))
        if left:
            print(f"warning: processes still mention {work}: {left}", file=sys.stderr)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
