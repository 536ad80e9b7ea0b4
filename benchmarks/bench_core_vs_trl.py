#!/usr/bin/env python
"""Benchmark: our training core vs a bare TRL trainer, same SFT and DPO jobs.

Runs the same job (tiny Llama student, toy "reverse the letters" data, batch 8, fp32, no gradient
checkpointing, same max_length / lr / seed / number of steps, a log every step) through

  bare  TRL's SFTTrainer / DPOTrainer built by hand, no callbacks;
  core  our recipe, `providers.training.recipes.{sft,dpo}.train(spec, RunFiles)` in this process,
        i.e. with `RunReporter` writing metrics.jsonl and rewriting status.json at every log,

alternating bare, core, core, bare, ... `--repeats` times each after one discarded warm-up of each,
and prints a table of the median steps/s of each side and the ratio core/bare.

What is measured (all in one process, torch threads equal, 1 by default):
  loop    steps / `train_runtime`, the trainer's own timer around the training loop (from just before
          `on_train_begin` to the end of the last step). Model loading, dataset tokenization, the final
          evaluation and the model save are outside it.
  paired  the median over i of core_i / bare_i for the runs done back to back.
  CPU     steps / process CPU time (user + sys) of `trainer.train()`: less sensitive to other load on a
          shared machine, but blind to time spent waiting on I/O.
  RunReporter  time inside the core's callback, timed by wrapping its methods. The two loops run the
          same trainer config (checked: the differing fields are printed) and produce the same losses,
          so this callback is the whole difference, and 1 - (its share of the core loop) is the ratio
          measured directly ("implied"), free of run-to-run noise.
For information, the end-to-end wall time of `python -m providers.training.run RUN_DIR` (process
start, imports, loading, training, final eval and save) is measured once per method at the end.

Usage (from the repository root, venv active):

    python benchmarks/bench_core_vs_trl.py                 # sft + dpo, 60 steps, 5 repeats, 1 thread
    python benchmarks/bench_core_vs_trl.py --methods sft --steps 200 --repeats 9 --no-e2e
    python benchmarks/bench_core_vs_trl.py --profile       # + cProfile of one core run per method

This is a benchmark, not a test: it asserts nothing, the machine may be shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `scripts.build_tiny_models` and, if not installed, `providers`

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from providers.training.components import RunReporter  # noqa: E402
from providers.training.data import normalize_rows, write_jsonl  # noqa: E402
from providers.training.recipes import dpo as core_dpo  # noqa: E402
from providers.training.recipes import sft as core_sft  # noqa: E402
from providers.training.run_files import RunFiles  # noqa: E402
from providers.training.spec import (  # noqa: E402
    CheckpointSpec,
    DataSpec,
    DpoSpec,
    JobSpec,
    OptimizerSpec,
)
from scripts.build_tiny_models import build_tiny_models, make_toy_datasets  # noqa: E402

BATCH = 8
MAX_LEN = 128
SEED = 42
LR = {"sft": 3e-3, "dpo": 1e-3}
BETA = 0.1

# --------------------------------------------------------------------------- #
# Timing hook: the same wrapper around Trainer.train for both sides
# --------------------------------------------------------------------------- #
_TRAIN_CALLS: list[dict] = []
_orig_train = transformers.Trainer.train


def _timed_train(self, *args, **kwargs):
    t0, c0 = time.perf_counter(), time.process_time()
    out = _orig_train(self, *args, **kwargs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    losses = [h["loss"] for h in self.state.log_history if "loss" in h]
    _TRAIN_CALLS.append({"wall": wall, "cpu": cpu, "runtime": out.metrics["train_runtime"],
                         "steps": self.state.global_step, "losses": losses})
    return out


transformers.Trainer.train = _timed_train  # SFTTrainer/DPOTrainer inherit train() from Trainer

# Time spent inside the core's own callback (RunReporter: metrics.jsonl append + status.json rewrite per
# log): a direct, noise-robust measure of the core's per-step overhead, next to the noisy ratio.
_CALLBACK_S = [0.0, 0.0]  # wall, CPU (thread time)


def _timed(fn):
    def wrapper(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _CALLBACK_S[0] += time.perf_counter() - t0
            _CALLBACK_S[1] += time.thread_time() - c0

    return wrapper


for _name in ("on_train_begin", "on_log", "on_step_end", "on_step_begin", "on_save"):
    if _name in RunReporter.__dict__:
        setattr(RunReporter, _name, _timed(RunReporter.__dict__[_name]))


# --------------------------------------------------------------------------- #
# Data and jobs
# --------------------------------------------------------------------------- #
@contextlib.contextmanager
def quiet():
    """Send the trainers' stdout (disable_tqdm=True makes Trainer print every log) to /dev/null, the
    same for both sides, so the table stays readable and terminal speed is not measured."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def rows_for(method: str, steps: int) -> list[dict]:
    """Normalized rows, exactly one epoch of `steps` batches."""
    toy = make_toy_datasets(seed=0, n_train=steps * BATCH)
    if method == "sft":
        return list(normalize_rows(toy["instruct"], "completion"))
    return list(normalize_rows(toy["preference"], "preference"))


def common_args(method: str, steps: int, out_dir: str) -> dict:
    """The hyperparameters both sides use, written out by hand (not taken from the core)."""
    return dict(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=LR[method],
        weight_decay=0.0,
        optim="adamw_torch",
        warmup_steps=0,
        lr_scheduler_type="constant",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        seed=SEED,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_length=MAX_LEN,
    )


def bare_config(method: str, steps: int, out_dir: str):
    if method == "sft":
        return SFTConfig(**common_args(method, steps, out_dir), completion_only_loss=True)
    return DPOConfig(**common_args(method, steps, out_dir), beta=BETA, loss_type=["sigmoid"])


def core_spec(method: str, steps: int, run_dir: str, model: str, train_file: str) -> JobSpec:
    return JobSpec(
        job_uuid=f"bench-{method}",
        method=method,
        model=model,
        run_dir=run_dir,
        data=DataSpec(train_file=train_file, batch_size=BATCH, max_seq_len=MAX_LEN, train_on_input=False),
        optimizer=OptimizerSpec(optimizer_type="adamw", lr=LR[method]),
        n_epochs=1,
        max_steps_per_epoch=steps,
        dtype="fp32",
        seed=SEED,
        dpo=DpoSpec(beta=BETA, loss_type=["sigmoid"]) if method == "dpo" else None,
        checkpoint=CheckpointSpec(output_dir=str(Path(run_dir) / "checkpoints"), save_steps=None, resume=False),
    )


def load_tok(path: str):
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_lm(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def run_bare(method: str, steps: int, model: str, rows: list[dict], work: Path) -> dict:
    out = work / f"bare-{method}"
    shutil.rmtree(out, ignore_errors=True)
    tok, lm, ds = load_tok(model), load_lm(model), Dataset.from_list(rows)
    args = bare_config(method, steps, str(out))
    if method == "sft":
        trainer = SFTTrainer(model=lm, args=args, train_dataset=ds, processing_class=tok)
    else:
        trainer = DPOTrainer(model=lm, ref_model=load_lm(model), args=args, train_dataset=ds, processing_class=tok)
    t0 = time.perf_counter()
    with quiet():
        trainer.train()
    total = time.perf_counter() - t0
    return {**_TRAIN_CALLS.pop(), "total": total}


def run_core(method: str, steps: int, model: str, rows: list[dict], work: Path, profile: Path | None = None) -> dict:
    run_dir = work / f"core-{method}"
    shutil.rmtree(run_dir, ignore_errors=True)
    write_jsonl(rows, run_dir / "train.jsonl")
    spec = core_spec(method, steps, str(run_dir), model, str(run_dir / "train.jsonl"))
    spec.save()
    recipe = core_sft if method == "sft" else core_dpo
    prof = cProfile.Profile() if profile else None
    _CALLBACK_S[:] = [0.0, 0.0]
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    with quiet():
        recipe.train(spec, RunFiles(run_dir))  # model load, trainer init, train, final eval + save
    if prof:
        prof.disable()
        prof.dump_stats(profile)
    total = time.perf_counter() - t0
    return {**_TRAIN_CALLS.pop(), "total": total, "callback": _CALLBACK_S[0], "callback_cpu": _CALLBACK_S[1]}


def run_e2e(method: str, steps: int, model: str, rows: list[dict], work: Path, threads: int) -> tuple[float, float]:
    run_dir = work / f"e2e-{method}"
    shutil.rmtree(run_dir, ignore_errors=True)
    write_jsonl(rows, run_dir / "train.jsonl")
    core_spec(method, steps, str(run_dir), model, str(run_dir / "train.jsonl")).save()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "providers.training.run", str(run_dir)], cwd=REPO, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        raise RuntimeError(f"providers.training.run failed for {method} (rc {r.returncode})")
    runtime = [m["train_runtime"] for m in RunFiles(run_dir).read_metrics() if "train_runtime" in m]
    return wall, (runtime[-1] if runtime else float("nan"))


def config_diff(method: str, steps: int, model: str, rows: list[dict], work: Path) -> dict:
    """Fields where the core's trainer config differs from the bare one (paths excluded)."""
    spec = core_spec(method, steps, str(work / "cfg"), model, "unused")
    core_cfg = (core_sft.sft_config if method == "sft" else core_dpo.dpo_config)(spec, len(rows), has_eval=True)
    bare_cfg = bare_config(method, steps, spec.checkpoint.output_dir)
    a, b = core_cfg.to_dict(), bare_cfg.to_dict()
    skip = {"output_dir", "logging_dir"}
    return {k: (b.get(k), a.get(k)) for k in sorted(set(a) | set(b)) if k not in skip and a.get(k) != b.get(k)}


# --------------------------------------------------------------------------- #
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=10, help="steps of the discarded warm-up run of each side")
    # 1 by default: on a small shared machine, with as many OpenMP threads as cores any other busy
    # process stalls the threads at every barrier and single runs come out 5-10x slow.
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for both sides")
    p.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "tiny_models"))
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "bench_core_vs_trl"))
    p.add_argument("--no-e2e", action="store_true", help="skip the `python -m providers.training.run` timing")
    p.add_argument("--profile", action="store_true", help="cProfile one extra core run per method")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model = build_tiny_models(args.models_dir)["student"]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"trl {__import__('trl').__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"model {model}; batch {BATCH}, fp32, max_length {MAX_LEN}, steps {args.steps}, seed {SEED}, "
          f"logging every step, {args.repeats} repeats alternating bare/core\n")

    results: dict[str, dict[str, list[dict]]] = {}
    for method in args.methods:
        rows = rows_for(method, args.steps)
        diff = config_diff(method, args.steps, model, rows, work)
        if diff:
            print(f"[{method}] trainer config fields that differ (bare, core), inactive with save/eval "
                  f"strategy 'no' unless listed otherwise: {diff}")
        warm_rows = rows[: args.warmup_steps * BATCH]
        run_bare(method, args.warmup_steps, model, warm_rows, work)
        run_core(method, args.warmup_steps, model, warm_rows, work)
        results[method] = {"bare": [], "core": []}
        for i in range(args.repeats):
            order = ("bare", "core") if i % 2 == 0 else ("core", "bare")
            for side in order:
                r = (run_bare if side == "bare" else run_core)(method, args.steps, model, rows, work)
                results[method][side].append(r)
                cb = (f", in RunReporter {1000 * r['callback'] / r['steps']:.2f} ms/step wall "
                      f"{1000 * r['callback_cpu'] / r['steps']:.2f} CPU" if "callback" in r else "")
                print(f"  {method} {side:4s} #{i + 1}: {r['steps'] / r['runtime']:6.2f} steps/s "
                      f"(train_runtime {r['runtime']:.2f}s, train() {r['wall']:.2f}s wall {r['cpu']:.2f}s CPU{cb}, "
                      f"final loss {r['losses'][-1]:.4f})", flush=True)
        if args.profile:
            prof_path = work / f"core-{method}.prof"
            run_core(method, args.steps, model, rows, work, profile=prof_path)
            s = io.StringIO()
            st = pstats.Stats(str(prof_path), stream=s).sort_stats("cumulative")
            st.print_stats(r"_inner_training_loop|training_step|run_files\.py|components\.py:\d+\(on_|"
                           r"posix\.replace|write_text|json/__init__|io\.open")
            lines = s.getvalue().splitlines()
            start = next(i for i, line in enumerate(lines) if "ncalls" in line)
            print(f"\n[{method}] cProfile of one core run, training loop vs the core's reporting (cumulative s):")
            print("\n".join(line for line in lines[start:] if line.strip()))

    e2e = {}
    if not args.no_e2e:
        for method in args.methods:
            e2e[method] = run_e2e(method, args.steps, model, rows_for(method, args.steps), work, args.threads)

    # ------------------------------------------------------------------- table
    def rate(rs, key, agg=statistics.median):
        return agg(r["steps"] / r[key] for r in rs)

    print(f"\nsteps/s, median over {args.repeats} alternating runs each.\n"
          "  loop:   steps / train_runtime (the trainer's own timer around the training loop), wall clock\n"
          "  paired: median over i of core_i / bare_i, the runs done back to back\n"
          "  CPU:    steps / process CPU time of trainer.train() (user+sys; least sensitive to other load)\n"
          "  RunReporter: time inside the core's callback (metrics.jsonl append + status.json rewrite per log)\n"
          "               as a share of the core's loop, wall (median) and CPU (callback CPU / train() CPU, median);\n"
          "               the loops differ only by this callback (same config, same losses), so 1 - wall share\n"
          "               is the core/bare ratio measured directly, without the run-to-run noise ('implied')")
    hdr = (f"{'method':6s} {'bare loop':>9s} {'core loop':>9s} {'ratio':>6s} {'paired':>6s} | {'bare CPU':>9s} "
           f"{'core CPU':>9s} {'ratio':>6s} | {'RunReporter wall/CPU':>20s} {'implied':>7s} | {'final loss bare / core':>22s} {'max|dloss|':>10s}")
    print(hdr)
    print("-" * len(hdr))
    for method, rs in results.items():
        b, c = rs["bare"], rs["core"]
        b_med, c_med = rate(b, "runtime"), rate(c, "runtime")
        paired = statistics.median(rb["runtime"] / rc["runtime"] for rb, rc in zip(b, c))
        b_cpu, c_cpu = rate(b, "cpu"), rate(c, "cpu")
        cb_share = statistics.median(r["callback"] / r["runtime"] for r in c)
        cb_cpu_share = statistics.median(r["callback_cpu"] / r["cpu"] for r in c)
        lb, lc = b[-1]["losses"], c[-1]["losses"]
        dmax = max(abs(x - y) for x, y in zip(lb, lc)) if len(lb) == len(lc) else float("nan")
        print(f"{method:6s} {b_med:9.2f} {c_med:9.2f} {c_med / b_med:6.3f} {paired:6.3f} | {b_cpu:9.2f} {c_cpu:9.2f} "
              f"{c_cpu / b_cpu:6.3f} | {100 * cb_share:8.2f}% / {100 * cb_cpu_share:6.2f}% {1 - cb_share:7.3f} | {lb[-1]:9.4f} / {lc[-1]:<10.4f} {dmax:10.2e}")
    print("\ntarget: core >= 0.97x bare (ratio = core / bare)")
    if e2e:
        print("\nend-to-end `python -m providers.training.run RUN_DIR` (process start, imports, model load, "
              f"{args.steps} steps, final eval + save), one run each, for information:")
        for method, (wall, runtime) in e2e.items():
            print(f"  {method}: {wall:.1f}s wall, of which training loop {runtime:.2f}s")


if __name__ == "__main__":
    main()
