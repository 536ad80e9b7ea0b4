#!/usr/bin/env python
"""GPU benchmark (run by benchmarks/gpu_bench.sh): a ~0.5B Llama (random init, bf16 weights on disk),
full SFT through the training core on one GPU with each knob, LoRA vs full vs QLoRA memory, and 2-process
FSDP when the machine has 2 GPUs.

Each variant is a separate process (`--child`), so its peak GPU memory and compile state are its own.
tokens/s: real (non-pad) tokens (TRL's num_tokens) per wall second after the first --warmup steps (CUDA
synchronised at each logged step);
MFU: 6 N (4 N for LoRA/QLoRA) x tokens/s over the bf16 matmul peak measured on this GPU in the same run
(best 8192^3 torch.mm); N = parameters in matmuls (all but the input embedding). Training runs in bf16
autocast with fp32 master weights (the core's default), batch 8, long-tailed rows up to max_seq_len 1024.
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

BATCH, MAX_LEN = 8, 1024


def bf16_peak_tflops(n: int = 8192, repeats: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e12)
    return best


def child(run_dir: str, warmup: int) -> None:
    import torch
    from transformers import TrainerCallback

    from providers.training import components
    from providers.training import run as entry

    marks: list[tuple[float, float]] = []  # (time, TRL's cumulative num_tokens: real tokens) per logged step

    class Timer(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                torch.cuda.synchronize()
                marks.append((time.perf_counter(), float(logs["num_tokens"])))

        def on_train_begin(self, args, state, control, model=None, **kw):
            marks.clear()
            if model is not None:
                Path(run_dir, "n.json").write_text(json.dumps({"n": bc.matmul_params(model)}))

    original = components.callbacks

    def callbacks(spec, files, tokenizer):
        reporter, cbs = original(spec, files, tokenizer)
        return reporter, [*cbs, Timer()]

    components.callbacks = callbacks
    code = entry.main(run_dir)
    rank = os.environ.get("RANK", "0")
    out = {"code": code, "peak_mb": torch.cuda.max_memory_allocated() / 2**20, "steps": len(marks)}
    if len(marks) > warmup + 1:
        (t0, g0), (t1, g1) = marks[warmup], marks[-1]
        out["tokens_per_s"] = (g1 - g0) / (t1 - t0)
        out["s_per_step"] = (t1 - t0) / (len(marks) - 1 - warmup)
    Path(run_dir, f"gpu_rank{rank}.json").write_text(json.dumps(out))
    sys.exit(code)


def job(work: Path, name: str, model: str, rows, steps: int, **fields) -> Path:
    from providers.training.data import write_jsonl
    from providers.training.spec import CheckpointSpec, DataSpec, JobSpec, OptimizerSpec

    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    write_jsonl(rows, run_dir / "train.jsonl")
    JobSpec(job_uuid=name, method="sft", model=model, run_dir=str(run_dir), dtype="bf16",
            data=DataSpec(train_file=str(run_dir / "train.jsonl"), batch_size=BATCH, max_seq_len=MAX_LEN, shuffle=False),
            optimizer=OptimizerSpec(lr=1e-5), max_steps_per_epoch=steps, max_validation_steps=1,
            checkpoint=CheckpointSpec(output_dir=str(run_dir / "checkpoints"), resume=False), **fields).save()
    return run_dir


def run(run_dir: Path, warmup: int, nproc: int = 1, timeout: int = 240) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{bc.REPO}{os.pathsep}{bc.REPO / 'benchmarks'}"}
    script = [str(Path(__file__).resolve()), "--child", str(run_dir), "--warmup", str(warmup)]
    argv = [sys.executable, *script]
    if nproc > 1:
        argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *script]
    try:
        with open(run_dir / "bench.log", "w") as log:
            code = subprocess.call(argv, cwd=bc.REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    results = [json.loads(p.read_text()) for p in sorted(run_dir.glob("gpu_rank*.json"))]
    if code != 0 or not results:
        text = (run_dir / "bench.log").read_text(errors="replace")
        status = run_dir / "status.json"
        error = json.loads(status.read_text()).get("error") if status.exists() else None
        return {"error": (error or text[-300:]).strip().splitlines()[-1][:200]}
    n = json.loads((run_dir / "n.json").read_text())["n"] if (run_dir / "n.json").exists() else None
    return {**results[0], "n": n, "peak_mb": max(r["peak_mb"] for r in results),
            "tokens_per_s": sum(r.get("tokens_per_s", 0) for r in results)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "bench_models"))
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "gpu_bench"))
    p.add_argument("--out", help="also write the table as markdown here")
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.warmup)

    import torch

    from providers.training.efficiency import four_bit_trains_here
    from providers.training.spec import EfficiencySpec, FsdpSpec, PeftSpec

    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    peak = bf16_peak_tflops()
    model = bc.sized_model("500m", args.models_dir, dtype="bfloat16")
    rows = bc.longtail_rows(BATCH * (args.steps + 2) * 2, MAX_LEN)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{name} x{gpus}; bf16 matmul peak {peak:.0f} TFLOP/s (measured); torch {torch.__version__}", flush=True)

    has = {m: __import__("importlib").util.find_spec(m) is not None for m in ("liger_kernel", "flash_attn")}
    lora = PeftSpec(method="lora", rank=16, alpha=32)
    variants = [
        ("full, sdpa, padded", {}),
        ("full, padding-free", {"efficiency": EfficiencySpec(padding_free=True)}),
        ("full, padding-free + Liger", {"efficiency": EfficiencySpec(padding_free=True, use_liger_kernel=True)}),
        ("full, padding-free + torch.compile", {"efficiency": EfficiencySpec(padding_free=True, torch_compile=True)}),
        ("full, padding-free + flash_attention_2", {"efficiency": EfficiencySpec(padding_free=True, attn_implementation="flash_attention_2")}),
        ("full, gradient checkpointing", {"efficiency": EfficiencySpec(gradient_checkpointing=True)}),
        ("LoRA r16 all-linear", {"peft": lora}),
        ("QLoRA r16 (NF4 base)", {"peft": lora, "efficiency": EfficiencySpec(load_in_4bit=True)}),
    ]
    table = []
    for label, fields in variants:
        eff = fields.get("efficiency")
        if eff and eff.use_liger_kernel and not has["liger_kernel"]:
            table.append([label, "-", "-", "-", "liger-kernel not installed"])
            continue
        if eff and eff.attn_implementation == "flash_attention_2" and not has["flash_attn"]:
            table.append([label, "-", "-", "-", "flash-attn not installed"])
            continue
        if eff and eff.load_in_4bit and four_bit_trains_here():
            table.append([label, "-", "-", "-", four_bit_trains_here()[:60]])
            continue
        r = run(job(work, f"v{len(table)}", model, rows, args.steps, **fields), args.warmup)
        if "error" in r:
            table.append([label, "-", "-", "-", r["error"]])
        else:
            per_token = 4 if "peft" in fields else 6
            mfu = per_token * (r["n"] or 0) * r["tokens_per_s"] / (peak * 1e12)
            table.append([label, f"{r['tokens_per_s']:,.0f}", f"{100 * mfu:.1f}%", f"{r['peak_mb'] / 1024:.1f} GiB", ""])
        print(f"  {label}: {table[-1][1:]}", flush=True)
    if gpus >= 2:
        r = run(job(work, "fsdp2", model, rows, args.steps, fsdp=FsdpSpec(mixed_precision_policy="bf16"),
                    efficiency=EfficiencySpec(padding_free=True)), args.warmup, nproc=2)
        table.append(["FSDP2 FULL_SHARD, 2 GPUs, padding-free", f"{r.get('tokens_per_s', 0):,.0f}" if "error" not in r else "-",
                      "-", f"{r['peak_mb'] / 1024:.1f} GiB/rank" if "error" not in r else "-", r.get("error", "")])
    else:
        table.append(["FSDP2, 2 GPUs", "-", "-", "-", f"this machine has {gpus} GPU"])
    header = ["variant (0.5B Llama, batch 8, long-tailed rows <= 1024 tokens, bf16 autocast)", "tokens/s", "MFU",
              "peak GPU memory", "note"]
    bc.print_table(f"{name}: SFT through the training core (MFU vs measured bf16 peak {peak:.0f} TFLOP/s)", header, table)
    if args.out:
        lines = [f"{name}, bf16 matmul peak {peak:.0f} TFLOP/s measured", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table]
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
