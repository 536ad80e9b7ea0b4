#!/usr/bin/env python
"""Benchmark: job start-up, a job forked from the preloaded zygote vs a new process (today's spawn).

Through the real JobManager (the one both providers use), the tiny student, a short full-SFT job
(--steps steps, batch 4): submit -> first training step (metrics.jsonl holds its first line; polled every
10 ms) and submit -> job completed (whole job), alternating spawn / zygote --repeats times after one
discarded warm-up of each (the zygote is started once, before them: a server starts it with its first job).

Then the same for a 2-rank FSDP job (the remote service's command line), each way its ranks can start:
torchrun (each rank a new interpreter) or forked ranks (`providers.training.local_ranks`: the agent imports
the training stack once and forks the ranks), with the agent spawned or forked from the zygote. Measured:
submit -> every rank has joined the process group (the last rank's "joined" log line: interpreter start,
imports, init_process_group), first step, whole job; and, for scale, what a new interpreter and the
imports cost alone.

Usage (repository root, venv active):
    python benchmarks/bench_job_start.py                  # ~4 min on 2 busy cores
    python benchmarks/bench_job_start.py --repeats 5 --no-torchrun

A benchmark, not a test: nothing is asserted; the machine may be shared (its load is printed).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import bench_common as bc

from providers.jobs import zygote
from providers.jobs.manager import JobManager
from providers.jobs.store import JobStore
from providers.training.data import normalize_rows, write_jsonl
from providers.training.run_files import RunFiles
from providers.training.spec import (
    CheckpointSpec,
    DataSpec,
    FsdpSpec,
    JobSpec,
    OptimizerSpec,
)


def inline_command(spec, files):
    return [sys.executable, "-m", "providers.training.run", str(files.dir)]


def fsdp_command(rank_start: str):
    from providers.launchers.torchrun import TorchRunOptions, torchrun_command

    return lambda spec, files: torchrun_command(
        spec, files, TorchRunOptions(nproc_per_node=2, rdzv_timeout_s=60, rank_start=rank_start))


def make_spec(root: Path, name: str, model: str, rows, steps: int, fsdp: bool) -> JobSpec:
    run_dir = root / "runs" / name
    write_jsonl(rows, run_dir / "train.jsonl")
    return JobSpec(job_uuid=name, method="sft", model=model, run_dir=str(run_dir),
                   data=DataSpec(train_file=str(run_dir / "train.jsonl"), batch_size=4, max_seq_len=64),
                   optimizer=OptimizerSpec(lr=1e-3), max_steps_per_epoch=steps, max_validation_steps=1,
                   fsdp=FsdpSpec() if fsdp else None,
                   checkpoint=CheckpointSpec(output_dir=str(run_dir / "checkpoints"), resume=False))


def run_job(manager: JobManager, spec: JobSpec) -> dict:
    metrics = Path(spec.run_dir) / "metrics.jsonl"
    t0 = time.time()
    manager.submit(spec)
    while not (metrics.exists() and metrics.stat().st_size):
        if manager.store.get(spec.job_uuid).status not in ("scheduled", "in_progress"):
            break
        time.sleep(0.01)
    first = time.time() - t0
    state = manager.wait(spec.job_uuid, timeout_s=600)
    whole = time.time() - t0
    if state != "completed":
        raise RuntimeError(f"{spec.job_uuid} {state}:\n" + "\n".join(RunFiles(spec.run_dir).tail_log(30)))
    return {"first": first, "whole": whole, "t0": t0}


STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*rank (\d+)/\d+ joined")


def rank_phases(spec: JobSpec, t0: float) -> dict:
    """Seconds from submit until the last rank joined the process group (interpreter start, imports,
    init_process_group: the rank's "joined" log line)."""
    logs = sorted((Path(spec.run_dir) / "logs").glob("rank*.log"))
    joined = []
    for p in logs:
        for line in p.read_text(errors="replace").splitlines():
            m = STAMP.match(line)
            if m:
                joined.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return {"joined": max(joined) - t0 if joined else float("nan")}


def bare_interpreter_and_imports() -> tuple[float, float]:
    """A new interpreter: `python -c pass`, and `python -c 'import providers.training.recipes.sft'` (what
    a rank imports before it can train), wall seconds."""
    def timed(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0

    return timed("pass"), timed("import providers.training.run, providers.training.recipes.sft, "
                                "providers.training.recipes.dpo, providers.training.fsdp")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-torchrun", action="store_true")
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "bench_job_start"))
    p.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "tiny_models"))
    args = p.parse_args(argv)

    import shutil

    from scripts.build_tiny_models import build_tiny_models, make_toy_datasets

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    model = build_tiny_models(args.models_dir)["student"]
    rows = list(normalize_rows(make_toy_datasets()["instruct"][: 4 * args.steps], "completion"))
    managers = {}
    for mode in ("spawn", "zygote"):
        managers[mode] = JobManager(JobStore(work / mode / "jobs.db"), inline_command,
                                    env={"OMP_NUM_THREADS": "1", "TRL_JOB_ZYGOTE": "1" if mode == "zygote" else "0"},
                                    niceness=0)
    t0 = time.perf_counter()
    assert zygote.zygote_for(managers["zygote"].job_env()).ready()
    print(f"zygote ready {time.perf_counter() - t0:.1f}s after start (with a server's first job; started first "
          "here, off the measured jobs' path); "
          f"{bc.load_average()}", flush=True)

    def use(mode: str) -> None:
        os.environ["TRL_JOB_ZYGOTE"] = "1" if mode == "zygote" else "0"  # read by the server-side launcher

    results = {"spawn": [], "zygote": []}
    for i in range(args.repeats + 1):
        for mode in (("spawn", "zygote") if i % 2 == 0 else ("zygote", "spawn")):
            use(mode)
            r = run_job(managers[mode], make_spec(work / mode, f"sft-{i}", model, rows, args.steps, fsdp=False))
            print(f"  {'warm-up ' if i == 0 else ''}{mode}: first step {r['first']:.2f}s, whole job {r['whole']:.2f}s",
                  flush=True)
            if i:
                results[mode].append(r)
    table = []
    for key, label in (("first", "submit -> first step"), ("whole", "whole job")):
        s = statistics.median(r[key] for r in results["spawn"])
        z = statistics.median(r[key] for r in results["zygote"])
        table.append([label, f"{s:.2f} s", f"{z:.2f} s", f"{z / s:.2f}x"])
    bc.print_table(f"inline job start (tiny student, {args.steps}-step full SFT, median of {args.repeats} alternating runs)",
                   ["", "spawn (today)", "zygote", "zygote/spawn"], table,
                   note=f"{bc.load_average()}; targets: first step <= 1.5 s, whole job <= 0.5x")

    if not args.no_torchrun:
        bare, imports = bare_interpreter_and_imports()
        variants = [("torchrun", "spawn"), ("torchrun", "zygote"), ("fork", "spawn"), ("fork", "zygote")]
        fsdp = {v: [] for v in variants}
        for rank_start, mode in variants + variants[::-1]:
            use(mode)
            root = work / f"fsdp-{rank_start}-{mode}"
            manager = JobManager(JobStore(root / "jobs.db"), fsdp_command(rank_start),
                                 env={"OMP_NUM_THREADS": "1", "TRL_JOB_ZYGOTE": "1" if mode == "zygote" else "0"},
                                 niceness=0)
            if mode == "zygote":
                zygote.zygote_for(manager.job_env()).ready()
            spec = make_spec(root, f"fsdp-{len(fsdp[rank_start, mode])}", model, rows, args.steps, fsdp=True)
            r = run_job(manager, spec)
            r.update(rank_phases(spec, r["t0"]))
            fsdp[rank_start, mode].append(r)
            print(f"  {rank_start}, agent {mode}: ranks joined {r['joined']:.2f}s, "
                  f"first step {r['first']:.2f}s, whole {r['whole']:.2f}s", flush=True)
        base = statistics.median(r["whole"] for r in fsdp["torchrun", "spawn"])
        table = [[{"torchrun": "torchrun", "fork": "forked ranks"}[rank_start], mode]
                 + [f"{statistics.median(r[k] for r in rs):.2f} s" for k in ("joined", "first", "whole")]
                 + [f"{statistics.median(r['whole'] for r in rs) / base:.2f}x"]
                 for (rank_start, mode), rs in fsdp.items()]
        bc.print_table("2-rank FSDP job (tiny student), median of 2 runs each",
                       ["ranks", "agent", "ranks joined", "first step", "whole job", "vs torchrun, spawned"], table,
                       note=(f"a new interpreter: {bare:.2f} s; + importing the training stack: {imports:.2f} s "
                             f"(what every torchrun rank pays); {bc.load_average()}"))


if __name__ == "__main__":
    main()
