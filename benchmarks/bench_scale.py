#!/usr/bin/env python
"""Benchmark: memory and step time at 125M parameters, each run a separate process through the real entry
point (`providers.training.run.main(RUN_DIR)`, under torchrun for FSDP), so peak RSS is that job's alone.

  dpo-memory   peak RSS of DPO with a frozen reference copy vs LoRA-DPO (the PEFT reference: adapters
               disabled) vs DPO with precomputed reference log-probs (no reference model)
  checkpoint   full SFT with gradient checkpointing off vs on: peak RSS (activation memory) and step time
  fsdp         1 process vs 2 processes FULL_SHARD vs 2 processes FULL_SHARD + CPU offload: per-rank peak
               RSS, parameters held per rank, CPU-s/step and wall s/step
  distill      logit distillation from cached top-k teacher log-probs vs SFT on the same rows: step time
               (the teacher task runs first, untimed; the teacher is the 25M model, same tokenizer)

Step times are per process CPU second / threads after the first step (robust to other load on a shared
machine) and wall-clock; peak RSS is ru_maxrss of the process (each rank). Batch 4 (per rank), long-tailed
rows, max_seq_len 256, fp32, 1 torch thread per process unless --threads.

Usage (repository root, venv active):
    python benchmarks/bench_scale.py                        # all parts, ~15-25 min on 2 busy cores
    python benchmarks/bench_scale.py --parts dpo-memory checkpoint --size 25m

A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc

BATCH, MAX_LEN = 4, 256


def child(run_dir: str) -> None:
    """Run one job in this process (or this rank) with a step timer; write RUN_DIR/bench_rank{R}.json."""
    import torch

    from providers.training import components
    from providers.training import run as entry

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    import peft, transformers, trl  # noqa: E401,F401 - the training stack, before any model: the process's floor

    imports_rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    timer = bc.step_timer()
    original = components.callbacks

    def callbacks(spec, files, tokenizer):
        reporter, cbs = original(spec, files, tokenizer)
        return reporter, [*cbs, timer]

    components.callbacks = callbacks  # before the recipes import it (run.main imports them)
    for module in list(sys.modules.values()):
        if module is not None and getattr(module, "callbacks", None) is original:
            module.callbacks = callbacks
    code = entry.main(run_dir)
    cpu_step, _, _, steps = timer.rate("cpu")
    wall_step, _, _, _ = timer.rate("wall")
    rank = os.environ.get("RANK", "0")
    Path(run_dir, f"bench_rank{rank}.json").write_text(json.dumps({
        "code": code, "rank": int(rank), "cpu_s_per_step": cpu_step, "wall_s_per_step": wall_step, "steps": steps,
        "peak_rss_mb": bc.peak_rss_mb(), "imports_rss_mb": imports_rss}))
    sys.exit(code)


def job(work: Path, name: str, method: str, model: str, rows: list[dict], steps: int, **fields) -> Path:
    from providers.training.data import write_jsonl
    from providers.training.spec import (
        CheckpointSpec,
        DataSpec,
        DpoSpec,
        JobSpec,
        OptimizerSpec,
    )

    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    write_jsonl(rows, run_dir / "train.jsonl")
    data = {"batch_size": BATCH, "max_seq_len": MAX_LEN, "shuffle": False, **fields.pop("data", {})}
    JobSpec(job_uuid=name, method=method, model=model, run_dir=str(run_dir),
            data=DataSpec(train_file=str(run_dir / "train.jsonl"), **data), optimizer=OptimizerSpec(lr=1e-4),
            max_steps_per_epoch=steps, max_validation_steps=1, dpo=DpoSpec() if method == "dpo" else None,
            checkpoint=CheckpointSpec(output_dir=str(run_dir / "checkpoints"), resume=False), **fields).save()
    return run_dir


def run(run_dir: Path, threads: int, nproc: int = 1) -> list[dict]:
    env = {**os.environ, "BENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": f"{bc.REPO}{os.pathsep}{bc.REPO / 'benchmarks'}"}
    script = [str(Path(__file__).resolve()), "--child", str(run_dir)]
    if nproc > 1:
        from providers.launchers.torchrun import free_port

        argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                "--rdzv_backend=static", "--master_addr=127.0.0.1", f"--master_port={free_port()}", *script]
    else:
        argv = [sys.executable, *script]
    t0 = time.perf_counter()
    with open(run_dir / "bench.log", "w") as log:
        code = subprocess.call(argv, cwd=bc.REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    results = [json.loads(p.read_text()) for p in sorted(run_dir.glob("bench_rank*.json"))]
    if code != 0 or not results:
        tail = (run_dir / "bench.log").read_text()[-2000:]
        for p in sorted((run_dir / "logs").glob("*.log")):
            tail += f"\n--- {p.name}\n" + p.read_text()[-1500:]
        raise RuntimeError(f"{run_dir.name} failed (exit {code}):\n{tail}")
    status = json.loads((run_dir / "status.json").read_text())
    for r in results:
        r["process_wall_s"] = wall
        r["resources"] = status.get("resources", {})
        rank_report = run_dir / "ranks" / f"rank{r['rank']}.json"
        if rank_report.exists():
            r.update({k: v for k, v in json.loads(rank_report.read_text()).items() if k in ("local_params", "total_params")})
    return results


def mb(x: float) -> str:
    return f"{x:,.0f} MB"


def main(argv=None) -> None:
    global BATCH
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--parts", nargs="+", default=["dpo-memory", "checkpoint", "fsdp", "distill"],
                   choices=["dpo-memory", "checkpoint", "fsdp", "distill"])
    p.add_argument("--size", default="125m")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=4, help="rows per batch (per rank)")
    p.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "bench_models"))
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "bench_scale"))
    args = p.parse_args(argv)
    if args.child:
        return child(args.child)
    BATCH = args.batch

    from providers.training.spec import EfficiencySpec, FsdpSpec, PeftSpec

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model = bc.sized_model(args.size, args.models_dir)
    print(f"model {args.size} ({model}); batch {BATCH}/process, max_seq_len {MAX_LEN}, {args.steps} steps, "
          f"{args.threads} thread(s) per process; {bc.load_average()}", flush=True)
    sft_rows = bc.longtail_rows(BATCH * 2 * (args.steps + 1), MAX_LEN)
    pref_rows = bc.longtail_rows(BATCH * (args.steps + 1), MAX_LEN, "preference")

    if "dpo-memory" in args.parts:
        # TRL's chunked LM head in every variant (the default with CUDA): no [tokens x vocab] logits, so the rows
        # differ only in what each reference costs. The last row is the CPU default (full logits, faster).
        lora = PeftSpec(method="lora", rank=16, alpha=32)
        variants = [("DPO, frozen reference copy", {"efficiency": EfficiencySpec(chunked_lm_head=True)}),
                    ("LoRA-DPO, PEFT reference (adapters off)",
                     {"peft": lora, "efficiency": EfficiencySpec(chunked_lm_head=True)}),
                    ("DPO, precomputed reference log-probs",
                     {"efficiency": EfficiencySpec(precompute_ref_log_probs=True, chunked_lm_head=True)}),
                    ("LoRA-DPO + gradient checkpointing",
                     {"peft": lora, "efficiency": EfficiencySpec(gradient_checkpointing=True, chunked_lm_head=True)}),
                    ("DPO, precomputed + gradient checkpointing",
                     {"efficiency": EfficiencySpec(precompute_ref_log_probs=True, gradient_checkpointing=True,
                                                   chunked_lm_head=True)}),
                    ("DPO, frozen reference copy, full-logits LM head (the CPU default)",
                     {"efficiency": EfficiencySpec(chunked_lm_head=False)})]
        out = []
        for name, fields in variants:
            r = run(job(work, f"dpo-{len(out)}", "dpo", model, pref_rows, args.steps, **fields), args.threads)[0]
            out.append((name, r))
            print(f"  {name}: peak RSS {mb(r['peak_rss_mb'])}, {r['cpu_s_per_step']:.2f} CPU-s/step", flush=True)
        base = out[0][1]["peak_rss_mb"]
        base_training = base - out[0][1]["imports_rss_mb"]
        bc.print_table(f"DPO peak RSS at {args.size}, batch {BATCH} (one process each)",
                       ["variant", "peak RSS", "vs reference copy", "peak - imports", "vs reference copy",
                        "CPU-s/step", "wall s/step"],
                       [[n, mb(r["peak_rss_mb"]), f"{r['peak_rss_mb'] / base:.2f}x",
                         mb(r["peak_rss_mb"] - r["imports_rss_mb"]),
                         f"{(r['peak_rss_mb'] - r['imports_rss_mb']) / base_training:.2f}x",
                         f"{r['cpu_s_per_step']:.2f}", f"{r['wall_s_per_step']:.2f}"] for n, r in out],
                       note=f"imports: the process after importing torch, transformers, TRL and peft, before any model; "
                            f"{bc.load_average()}")

    if "checkpoint" in args.parts:
        out = []
        for name, eff in [("off", EfficiencySpec()), ("on", EfficiencySpec(gradient_checkpointing=True))]:
            rows = sft_rows
            r = run(job(work, f"gc-{name}", "sft", model, rows, args.steps, efficiency=eff,
                        data={"batch_size": 2 * BATCH}), args.threads)[0]
            out.append((name, r))
            print(f"  gradient checkpointing {name}: peak RSS {mb(r['peak_rss_mb'])}, {r['cpu_s_per_step']:.2f} CPU-s/step",
                  flush=True)
        off, on = out[0][1], out[1][1]
        bc.print_table(f"gradient checkpointing, full SFT at {args.size}, batch {2 * BATCH} (one process each)",
                       ["checkpointing", "peak RSS", "CPU-s/step", "wall s/step"],
                       [[n, mb(r["peak_rss_mb"]), f"{r['cpu_s_per_step']:.2f}", f"{r['wall_s_per_step']:.2f}"] for n, r in out],
                       note=f"on/off: peak RSS {on['peak_rss_mb'] / off['peak_rss_mb']:.2f}x "
                            f"({mb(off['peak_rss_mb'] - on['peak_rss_mb'])} of activations not kept), "
                            f"step time {on['cpu_s_per_step'] / off['cpu_s_per_step']:.2f}x (recompute); {bc.load_average()}")

    if "fsdp" in args.parts:
        variants = [("1 process", 1, None), ("2 processes FULL_SHARD", 2, FsdpSpec()),
                    ("2 processes FULL_SHARD + CPU offload", 2, FsdpSpec(cpu_offload=True))]
        table = []
        for name, nproc, fsdp in variants:
            results = run(job(work, f"fsdp-{nproc}-{bool(fsdp and fsdp.cpu_offload)}", "sft", model, sft_rows,
                              args.steps, fsdp=fsdp), args.threads, nproc)
            peak = max(r["peak_rss_mb"] for r in results)
            held = (f"{results[0]['local_params'] / results[0]['total_params']:.2f}" if "local_params" in results[0]
                    else "1.00")
            cpu = bc.median([r["cpu_s_per_step"] for r in results])
            wall = bc.median([r["wall_s_per_step"] for r in results])
            tokens_per_step = BATCH * nproc
            table.append([name, mb(peak), held, f"{cpu:.2f}", f"{wall:.2f}", f"{tokens_per_step / wall:.2f}"])
            print(f"  {name}: per-rank peak RSS {mb(peak)}, params held {held}, {cpu:.2f} CPU-s/step, "
                  f"{wall:.2f} wall s/step", flush=True)
        bc.print_table(f"FSDP at {args.size} (batch {BATCH} per rank; per-rank figures, the largest rank)",
                       ["run", "peak RSS per rank", "params held", "CPU-s/step", "wall s/step", "rows/s (wall)"], table,
                       note=f"{bc.load_average()}; 2 ranks share the machine's 2 cores")

    if "distill" in args.parts:
        from providers.training.spec import TeacherSpec

        teacher_dir = work / "teacher-task"
        shutil.rmtree(teacher_dir, ignore_errors=True)
        prompts = [{"prompt": r["prompt"]} for r in sft_rows]
        from providers.training.data import write_jsonl
        from providers.training.spec import CheckpointSpec, DataSpec, JobSpec

        write_jsonl(prompts, teacher_dir / "train.jsonl")
        teacher = bc.sized_model("25m", args.models_dir)
        JobSpec(job_uuid="teacher", method="teacher", model=teacher, run_dir=str(teacher_dir),
                data=DataSpec(train_file=str(teacher_dir / "train.jsonl")),
                teacher=TeacherSpec(teacher_model=teacher, top_k=20, max_new_tokens=64, generation_batch_size=16),
                checkpoint=CheckpointSpec(output_dir=str(teacher_dir / "outputs"))).save()
        run(teacher_dir, args.threads)
        from providers.training.recipes.teacher import read_shards
        from providers.training.spec import DistillSpec

        cached = read_shards(teacher_dir / "outputs")
        sft_on_same = [{"prompt": r["prompt"], "completion": r["completion"]} for r in cached]
        out = {"sft": [], "cached": []}
        for i in range(2):
            for name in (("sft", "cached") if i % 2 == 0 else ("cached", "sft")):
                if name == "sft":
                    d = job(work, f"distill-sft-{i}", "sft", model, sft_on_same, args.steps)
                else:
                    d = job(work, f"distill-cached-{i}", "distill", model, sft_on_same, args.steps,
                            distill=DistillSpec(method="logit", teacher_outputs_dir=str(teacher_dir / "outputs")))
                r = run(d, args.threads)[0]
                out[name].append(r)
                print(f"  {name} #{i + 1}: {r['cpu_s_per_step']:.2f} CPU-s/step, {r['wall_s_per_step']:.2f} wall", flush=True)
        s, c = bc.median([r["cpu_s_per_step"] for r in out["sft"]]), bc.median([r["cpu_s_per_step"] for r in out["cached"]])
        bc.print_table(f"distillation from cached top-20 teacher log-probs vs SFT at {args.size} (same rows, 2 alternating runs)",
                       ["run", "CPU-s/step", "vs SFT"],
                       [["SFT", f"{s:.2f}", "1.00x"], ["cached top-k logit distillation", f"{c:.2f}", f"{c / s:.2f}x"]],
                       note=f"target <= 1.15x; {bc.load_average()}")


if __name__ == "__main__":
    main()
