#!/usr/bin/env python
"""Benchmark: what the dashboard and /metrics cost the FSDP service's status polls.

Two services run side by side on 127.0.0.1, same settings, own data dirs:
  off  TRL_FSDP_DASHBOARD=0 TRL_FSDP_METRICS=0: no dashboard routes, no metrics middleware
  on   the default: /dashboard and /metrics installed (latency middleware on every request), plus, while
       it is measured, what an operator adds: an open dashboard job page (GET job, metrics?since, logs
       every 2 s, as the page polls) and a Prometheus scraper on /metrics every `--scrape-s` s.
Phases alternate off, on, on, off (ABBA, `--rounds` times). In each phase that service trains a long
SFT job (tiny Llama student, 1 process) and GET /v1/post-training/job/status is driven open-loop at
`--rate` req/s for `--duration` s (benchmarks/bench_service.py's `drive`: request i due at t0 + i/rate,
latency = response - sent); then the job is cancelled, so only one job trains at any time.
Printed: p50 / p99 / max latency and errors of each phase, pooled per variant, and the on/off ratios.

    python benchmarks/bench_operator_tools.py                      # 200 req/s, 10 s per phase, 1 round
    python benchmarks/bench_operator_tools.py --rounds 2 --json out.json

Only 127.0.0.1 is contacted; both services and their jobs are stopped at the end (process groups).
Not a test: it asserts nothing; on a shared machine the numbers are noisy (the load average is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import drive, free_port, kill_group, loadavg, sft_body  # noqa: E402

STATUS = "/v1/post-training/job/status"


class Service:
    def __init__(self, work: Path, env: dict[str, str], models_root: str):
        self.data_dir = work / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=120)
        log = open(work / "service.log", "ab")  # noqa: SIM115 - lives as long as the service
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "providers.remote_fsdp.service.app", "--port", str(self.port),
             "--data-dir", str(self.data_dir), "--nproc-per-node", "1", "--allowed-model-root", models_root],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **env})
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get("/health", timeout=2).status_code == 200:
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"service did not start: {(work / 'service.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def status(self, job: str) -> dict:
        return self.client.get(STATUS, params={"job_uuid": job}).json()

    def stop(self) -> None:
        self.client.close()
        kill_group(self.proc.pid, grace_s=20, proc=self.proc)


def operator_load(url: str, job: str, stop: threading.Event, scrape_s: float) -> dict[str, int]:
    """An open dashboard job page (polls every 2 s) and a Prometheus scraper, until `stop`."""
    counts = {"dashboard": 0, "metrics": 0}

    def page():
        offset = 0
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                c.get(f"/dashboard/api/jobs/{job}")
                offset = c.get(f"/dashboard/api/jobs/{job}/metrics", params={"since": offset}).json()["next"]
                c.get(f"/dashboard/api/jobs/{job}/logs", params={"tail": 200})
                counts["dashboard"] += 3
                stop.wait(2.0)

    def scraper():
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                c.get("/metrics").raise_for_status()
                counts["metrics"] += 1
                stop.wait(scrape_s)

    threads = [threading.Thread(target=page, daemon=True), threading.Thread(target=scraper, daemon=True)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(timeout=10)
    return counts


def phase(svc: Service, variant: str, n: int, model: str, args) -> dict:
    job = f"{variant}-{n}"
    r = svc.client.post("/v1/post-training/supervised-fine-tune",
                        json=sft_body(job, model, nproc=1, steps=25, n_epochs=400))
    if r.status_code != 200:
        raise RuntimeError(f"submit {job}: HTTP {r.status_code} {r.text}")
    deadline = time.monotonic() + 300
    while (svc.status(job)["resources_allocated"].get("step") or 0) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{job} did not start training")
        time.sleep(0.3)
    stop = threading.Event()
    extra: dict = {}
    helper = None
    if variant == "on":
        helper = threading.Thread(target=lambda: extra.update(operator_load(svc.url, job, stop, args.scrape_s)))
        helper.start()
    t0 = time.time()
    result = drive(svc.url, [("status", STATUS, {"job_uuid": job})], args.rate, args.duration, args.workers)["status"]
    stop.set()
    if helper:
        helper.join()
    steps = svc.status(job)["resources_allocated"].get("step")
    svc.client.post("/v1/post-training/job/cancel", json={"job_uuid": job}, timeout=60)
    return {"variant": variant, "job": job, "started": t0, "load": loadavg(), "steps_at_end": steps,
            "operator_requests": extra, "latencies_ms": result.pop("latencies_ms", None), **result}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=200.0, help="status requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per phase")
    p.add_argument("--workers", type=int, default=8, help="client threads (keep-alive connections)")
    p.add_argument("--rounds", type=int, default=1, help="ABBA rounds (off, on, on, off)")
    p.add_argument("--scrape-s", type=float, default=1.0, help="Prometheus scrape interval while 'on' is measured")
    p.add_argument("--models-dir", default=None, help="tiny models (built here when missing)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    import importlib.util

    spec = importlib.util.spec_from_file_location("build_tiny_models", REPO / "scripts" / "build_tiny_models.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    work = Path(tempfile.mkdtemp(prefix="bench-ops-"))
    models = builder.build_tiny_models(args.models_dir or work / "models")
    rows = "".join(json.dumps(r) + "\n" for r in builder.make_toy_datasets()["instruct"])
    services = {}
    try:
        for variant, env in (("off", {"TRL_FSDP_DASHBOARD": "0", "TRL_FSDP_METRICS": "0"}), ("on", {})):
            (work / variant).mkdir()
            svc = services[variant] = Service(work / variant, env, str(Path(models["student"]).parent))
            svc.client.post("/v1/datasets/toy/rows", content=rows.encode()).raise_for_status()
        assert services["off"].client.get("/metrics").status_code == 404
        assert services["on"].client.get("/metrics").status_code == 200
        results = []
        for rnd in range(args.rounds):
            for i, variant in enumerate(("off", "on", "on", "off")):
                r = phase(services[variant], variant, rnd * 4 + i, models["student"], args)
                results.append(r)
                print(f"{variant:>3}  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  max {r['max_ms']:7.1f} ms  "
                      f"errors {r['errors']}  rate {r['achieved_rate']:.0f}/s  load {r['load']}  "
                      f"operator requests {r['operator_requests']}", flush=True)
    finally:
        for svc in services.values():
            svc.stop()
    summary = {}
    for variant in ("off", "on"):
        rs = [r for r in results if r["variant"] == variant]
        summary[variant] = {k: sum(r[k] for r in rs) / len(rs) for k in ("p50_ms", "p99_ms", "mean_ms", "max_ms")}
        summary[variant]["errors"] = sum(r["errors"] for r in rs)
        summary[variant]["requests"] = sum(r["requests"] for r in rs)
    ratio = {k: summary["on"][k] / summary["off"][k] for k in ("p50_ms", "p99_ms", "mean_ms")}
    print(f"\nstatus polls at {args.rate:.0f} req/s, {args.duration:.0f} s per phase, {args.rounds} ABBA round(s), "
          f"one job training in each phase")
    print(f"{'':>22} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'errors':>7}")
    for variant, label in (("off", "without (off)"), ("on", "dashboard + /metrics")):
        s = summary[variant]
        print(f"{label:>22} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f} {s['mean_ms']:8.2f} {s['errors']:>4}/{s['requests']}")
    print(f"{'ratio on/off':>22} {ratio['p50_ms']:8.2f} {ratio['p99_ms']:8.2f} {ratio['mean_ms']:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "phases": results, "summary": summary,
                                               "ratio": ratio}, indent=2, default=str))


if __name__ == "__main__":
    main()
