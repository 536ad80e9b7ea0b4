#!/usr/bin/env python
"""Benchmark: tokens/s and model FLOPs utilisation of the training core vs bare TRL, at real model sizes.

Random-init Llamas of about 25M and 125M parameters (`scripts/build_tiny_models.py --size`), long-tailed
prompt/answer lengths (log-normal, many short, some near max_seq_len), batch 4, max_seq_len 256, fp32,
torch threads = --threads (2: this machine's cores). Every run is in this process (imports paid once):

  bare   TRL's SFTTrainer / DPOTrainer built by hand (same hyperparameters, no callbacks of ours)
  core   our recipe (`providers.training.recipes.{sft,dpo}.train(spec, RunFiles)`), knobs from the JobSpec

Per run: seconds per step and tokens/s after the first step (its warm-up left out), by the process's CPU
time / threads (robust to other load on a shared machine; wall-clock figures are printed per run too),
tokens = the real
(non-pad) tokens every decoder forward processed, counted by wrapping LlamaModel.forward. MFU = model
FLOPs/s over the fp32 matmul peak measured in this run (best 2048^3 torch.mm, same threads, same clock).
Model FLOPs: 6 N per trained token for full training, 4 N for LoRA (no weight gradients of the frozen base), + 2 N per token of reference forwards (DPO); N = the
parameters in matmuls (all but the input embedding); attention FLOPs are not counted.

Tables:
  1. core vs bare, SFT / LoRA-SFT / DPO at each size: tokens/s, MFU, core/bare, alternating runs
  2. knobs on core SFT 25M: padded vs padding-free (useful tokens/s), + torch.compile (--compile)
  3. where the time goes: torch.profiler top ops of core SFT (padding-free) at 25M

Usage (repository root, venv active):
    python benchmarks/bench_speed.py                       # ~15 min on 2 busy cores
    python benchmarks/bench_speed.py --sizes 25m --repeats 3 --steps 12
    python benchmarks/bench_speed.py --only knobs --compile

A benchmark, not a test: nothing is asserted; the machine may be shared and noisy (its load is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import bench_common as bc
import datasets
import torch
import transformers
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from providers.training.data import write_jsonl
from providers.training.recipes import dpo as core_dpo
from providers.training.recipes import sft as core_sft
from providers.training.run_files import RunFiles
from providers.training.spec import (
    CheckpointSpec,
    DataSpec,
    DpoSpec,
    EfficiencySpec,
    JobSpec,
    OptimizerSpec,
    PeftSpec,
)

BATCH, MAX_LEN, LR = 4, 256, 1e-4
TIMER = None  # the StepTimer of the run in progress (added to the core's callbacks too)


@contextlib.contextmanager
def quiet():
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def _with_timer(original):
    def callbacks(spec, files, tokenizer):
        reporter, cbs = original(spec, files, tokenizer)
        return reporter, [*cbs, TIMER]

    return callbacks


core_sft.callbacks = _with_timer(core_sft.callbacks)
core_dpo.callbacks = _with_timer(core_dpo.callbacks)


def common(out_dir: str, steps: int, method: str, eff: EfficiencySpec) -> dict:
    return dict(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
                lr_scheduler_type="constant", bf16=False, fp16=False,  # optimizer: TRL's default (fused AdamW)
                activation_checkpointing=eff.gradient_checkpointing, torch_compile=eff.torch_compile,
                use_cpu=not torch.cuda.is_available(), seed=42, logging_steps=1, report_to="none",
                save_strategy="no", eval_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
                train_sampling_strategy="sequential")


def run_bare(method: str, model_path: str, rows: list[dict], steps: int, work: Path, eff: EfficiencySpec):
    from peft import LoraConfig

    out = work / "bare"
    shutil.rmtree(out, ignore_errors=True)
    tok = transformers.AutoTokenizer.from_pretrained(model_path)
    lm = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if method == "lora" else None
    ds = Dataset.from_list(rows)
    if method == "dpo":
        args = DPOConfig(**common(str(out), steps, method, eff), max_length=MAX_LEN, beta=0.1)
        ref = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        trainer = DPOTrainer(model=lm, ref_model=ref, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[TIMER])
    else:
        pf = eff.padding_free
        args = SFTConfig(**common(str(out), steps, method, eff), max_length=None if pf else MAX_LEN,
                         padding_free=pf, completion_only_loss=True)
        trainer = SFTTrainer(model=lm, args=args, train_dataset=ds, processing_class=tok, peft_config=lora,
                             callbacks=[TIMER])
        if pf:
            trainer.train_dataset = core_sft.truncate(trainer.train_dataset, MAX_LEN)
    with quiet():
        trainer.train()
    return bc.matmul_params(trainer.model)


def run_core(method: str, model_path: str, rows: list[dict], steps: int, work: Path, eff: EfficiencySpec):
    run_dir = work / "core"
    shutil.rmtree(run_dir, ignore_errors=True)
    write_jsonl(rows, run_dir / "train.jsonl")
    spec = JobSpec(
        job_uuid="bench", method="dpo" if method == "dpo" else "sft", model=model_path, run_dir=str(run_dir),
        data=DataSpec(train_file=str(run_dir / "train.jsonl"), batch_size=BATCH, max_seq_len=MAX_LEN, shuffle=False),
        optimizer=OptimizerSpec(lr=LR), max_steps_per_epoch=steps, max_validation_steps=1, seed=42,
        peft=PeftSpec(method="lora", rank=16, alpha=32) if method == "lora" else None,
        dpo=DpoSpec(beta=0.1) if method == "dpo" else None, efficiency=eff,
        checkpoint=CheckpointSpec(output_dir=str(run_dir / "checkpoints"), resume=False),
    )
    spec.save()
    captured = {}
    original = transformers.Trainer.train

    def train(self, *a, **kw):
        captured["model"] = self.model
        return original(self, *a, **kw)

    transformers.Trainer.train = train
    try:
        with quiet():
            (core_dpo if method == "dpo" else core_sft).train(spec, RunFiles(run_dir))
    finally:
        transformers.Trainer.train = original
    return bc.matmul_params(captured["model"])


def measure(side: str, method: str, model_path: str, rows, steps: int, work: Path, eff: EfficiencySpec,
            counter: bc.TokenCounter, peak: float) -> dict:
    global TIMER
    TIMER = bc.step_timer()
    TIMER.counter = counter
    counter.reset()
    n = (run_bare if side == "bare" else run_core)(method, model_path, rows, steps, work, eff)
    s_per_step, grad_tps, nograd_tps, timed = TIMER.rate("cpu")
    _, wall_tps, wall_nograd, _ = TIMER.rate("wall")
    per_token = 4 if method == "lora" else 6
    flops = per_token * n * grad_tps + 2 * n * nograd_tps
    wall_flops = per_token * n * wall_tps + 2 * n * wall_nograd
    return {"s_per_step": s_per_step, "tokens_per_s": grad_tps, "mfu": flops / (peak[1] * 1e9), "steps": timed,
            "wall_tokens_per_s": wall_tps, "wall_mfu": wall_flops / (peak[0] * 1e9),
            "padded_share": 1 - counter.grad_tokens / max(1, counter.padded_positions), "n": n}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["25m", "125m"])
    p.add_argument("--methods", nargs="+", default=["sft", "lora", "dpo"])
    p.add_argument("--steps", type=int, default=8, help="steps per run at 25m (125m: half, at least 3)")
    p.add_argument("--repeats", type=int, default=2, help="alternating bare/core pairs at 25m (125m: 1)")
    # 1 by default: on a shared machine CPU time of one thread is what other load cannot distort (with 2
    # threads, OpenMP barriers stall whenever another process holds a core); --threads 2 for wall figures.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=["compare", "knobs", "profile"], nargs="+",
                   default=["compare", "knobs", "profile"])
    p.add_argument("--compile", action="store_true", help="also time torch_compile in the knobs table")
    p.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "bench_models"))
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "bench_speed"))
    args = p.parse_args(argv)

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    peak = bc.matmul_peak_gflops(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {__import__('trl').__version__}; "
          f"threads {args.threads}; fp32 matmul peak {peak[0]:.1f} GFLOP/s wall, {peak[1]:.1f} per CPU-second x "
          f"threads; {bc.load_average()}", flush=True)
    counter = bc.TokenCounter()
    results = []
    plain = EfficiencySpec()

    if "compare" in args.only:
        for size in args.sizes:
            model = bc.sized_model(size, args.models_dir)
            steps = args.steps if size == "25m" else max(3, args.steps // 2)
            repeats = args.repeats if size == "25m" else 1
            for method in args.methods:
                rows = bc.longtail_rows(BATCH * (steps + 1), MAX_LEN, "preference" if method == "dpo" else "completion")
                runs = {"bare": [], "core": []}
                for i in range(repeats):
                    for side in (("bare", "core") if i % 2 == 0 else ("core", "bare")):
                        r = measure(side, method, model, rows, steps, work, plain, counter, peak)
                        runs[side].append(r)
                        print(f"  {size} {method} {side}: {r['s_per_step']:.2f} CPU-s/step, {r['tokens_per_s']:.0f} tok/s, "
                              f"MFU {100 * r['mfu']:.1f}% (wall: {r['wall_tokens_per_s']:.0f} tok/s, "
                              f"MFU {100 * r['wall_mfu']:.1f}%)", flush=True)
                b = bc.median([r["tokens_per_s"] for r in runs["bare"]])
                c = bc.median([r["tokens_per_s"] for r in runs["core"]])
                paired = bc.median([rc["tokens_per_s"] / rb["tokens_per_s"] for rb, rc in zip(runs["bare"], runs["core"])])
                results.append([size, method, f"{runs['core'][0]['n'] / 1e6:.1f}M", f"{b:.0f}", f"{c:.0f}",
                                f"{100 * bc.median([r['mfu'] for r in runs['bare']]):.1f}%",
                                f"{100 * bc.median([r['mfu'] for r in runs['core']]):.1f}%", f"{c / b:.3f}",
                                f"{paired:.3f}", repeats])
        bc.print_table(
            f"core vs bare TRL (tokens per CPU-second after step 1, median of alternating runs; fp32 matmul peak "
            f"{peak[1]:.1f} GFLOP per CPU-second, {args.threads} thread(s))",
            ["size", "method", "N (matmul)", "bare tok/s", "core tok/s", "bare MFU", "core MFU", "core/bare",
             "paired", "pairs"], results, note=f"{bc.load_average()}; target core/bare >= 0.97")

    if "knobs" in args.only:
        model = bc.sized_model("25m", args.models_dir)
        rows = bc.longtail_rows(BATCH * (args.steps + 1), MAX_LEN)
        variants = [("padded", plain), ("padding-free", EfficiencySpec(padding_free=True)),
                    ("padding-free + grad. checkpointing", EfficiencySpec(padding_free=True, gradient_checkpointing=True))]
        if args.compile:
            variants.append(("padding-free + torch.compile", EfficiencySpec(padding_free=True, torch_compile=True)))
        runs = {name: [] for name, _ in variants}
        for i in range(args.repeats):
            order = variants if i % 2 == 0 else variants[::-1]
            for name, eff in order:
                steps = args.steps * (3 if eff.torch_compile else 1)  # compile: warm-up steps recompile
                r = measure("core", "sft", model, rows * (3 if eff.torch_compile else 1), steps, work, eff, counter, peak)
                runs[name].append(r)
                print(f"  25m sft core {name}: {r['tokens_per_s']:.0f} useful tok/s, MFU {100 * r['mfu']:.1f}%, "
                      f"padding {100 * r['padded_share']:.0f}% of positions", flush=True)
        base = bc.median([r["tokens_per_s"] for r in runs["padded"]])
        table = [[name, f"{bc.median([r['tokens_per_s'] for r in rs]):.0f}",
                  f"{100 * bc.median([r['mfu'] for r in rs]):.1f}%",
                  f"{100 * bc.median([r['padded_share'] for r in rs]):.0f}%",
                  f"{bc.median([r['tokens_per_s'] for r in rs]) / base:.2f}x"] for name, rs in runs.items()]
        bc.print_table("knobs, core full SFT at 25M on long-tailed data (useful = non-pad tokens)",
                       ["variant", "useful tok/s", "MFU", "pad positions", "vs padded"], table,
                       note=bc.load_average())

    if "profile" in args.only:
        from torch.profiler import ProfilerActivity, profile

        model = bc.sized_model("25m", args.models_dir)
        rows = bc.longtail_rows(BATCH * 5, MAX_LEN)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            measure("core", "sft", model, rows, 4, work, EfficiencySpec(padding_free=True), counter, peak)
        print("\nwhere the time goes: torch.profiler, core full SFT 25M padding-free, 4 steps (model load and "
              "tokenization included), top ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))
    counter.close()


if __name__ == "__main__":
    main()
