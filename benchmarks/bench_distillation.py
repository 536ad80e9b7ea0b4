#!/usr/bin/env python
"""Benchmark: knowledge distillation in the training core, speed and what the student learns.

Tiny Llama student and teacher from `scripts/build_tiny_models.py`, toy "reverse: a b c" -> "c b a" data,
batch 8, fp32, no gradient checkpointing, every recipe run in this process
(`providers.training.recipes.{sft,distill,teacher}.train(spec, RunFiles(run_dir))`).

Part 1, step time of the same student on the same prompts, same steps, seed and torch thread count:
  live    logit distillation with the teacher in memory (DistillSpec(method="logit", teacher_model=...)),
          TRL SFTTrainer + our loss step (DistillationTrainer)
  cached  logit distillation from a teacher task's cached top-k log-probs (DistillSpec(method="logit",
          teacher_outputs_dir=...)), transformers Trainer + CachedLogitsCollator (CachedDistillationTrainer);
          the teacher task (top_k=--top-k) runs first, untimed
  sft     plain SFT on the ground-truth answers (TRL SFTTrainer)
  One discarded warm-up run of each, then --repeats rounds, the order rotated and reversed every round.
  ms/step = train_runtime / steps: the trainer's own timer around the training loop (model load, dataset
  tokenization, the final save are outside it), wall clock. Per step it is split, by wrapping methods, into
    data   Trainer.get_batch_samples: dataset rows out of Arrow + the collator (cached: `collate` of it
           is CachedLogitsCollator.__call__ alone)
    fwd+loss  compute_loss: student forward + loss (+ the teacher's forward for live)
    rest   backward, optimizer, scheduler, callbacks (RunReporter writes metrics.jsonl every step)
  all in CPU time (time.thread_time, one torch thread), next to CPU ms/step = process CPU time over the same
  span as train_runtime / steps, which is less sensitive to other load on a shared machine than wall time.

Part 2, held-out exact-match accuracy (greedy answers on the 30 held-out prompts, `answer_accuracy`) of
students trained from the same base student with the same steps / lr / batch (full fine-tuning, defaults 800
steps at lr 3e-3, constant; the checkpoints saved every --eval-every steps are evaluated too, a learning curve):
  sft      SFT on the ground-truth answers
  output   SFT on the teacher's (cached) greedy answers      DistillSpec(method="output", teacher_outputs_dir)
  logit    T^2 * CE to the renormalized cached teacher top-k DistillSpec(method="logit", teacher_outputs_dir)
  hybrid   alpha * CE(labels) + (1 - alpha) * the above      DistillSpec(method="hybrid", teacher_outputs_dir)
  logit-live  T^2 * KL to the live teacher, full vocabulary  DistillSpec(method="logit", teacher_model)
over --seeds (JobSpec.seed, and unless --fixed-data also the seed of make_toy_datasets for the training
prompts, minus any held-out prompt). The held-out set is always seed 0's (the one the teacher's pretraining
excluded); the teacher is fixed, and a teacher task answers each seed's training prompts (untimed).

Part 3 (--part checks, ~30 s, not in the default run): the logged loss / grad norm of a few steps for cached
logit with top_k = the whole vocabulary vs the live teacher (must be equal), and batch 8 x GA 1 vs 4 x 2 vs
2 x 4 for sft, live and cached (must be equal within each).

Usage (from the repository root, venv active):

    python benchmarks/bench_distillation.py                  # speed + accuracy, ~9 min on 2 busy CPU cores
    python benchmarks/bench_distillation.py --part speed --speed-steps 200 --repeats 7
    python benchmarks/bench_distillation.py --part accuracy --acc-steps 600 --eval-every 100 --seeds 0 1 2
    python benchmarks/bench_distillation.py --part checks

This is a benchmark, not a test: it asserts nothing, the machine may be shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import statistics
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
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer  # noqa: E402
from trl import SFTTrainer  # noqa: E402

from providers.training.data import normalize_rows, write_jsonl  # noqa: E402
from providers.training.recipes import distill as core_distill  # noqa: E402
from providers.training.recipes import sft as core_sft  # noqa: E402
from providers.training.recipes import teacher as core_teacher  # noqa: E402
from providers.training.recipes.teacher import read_shards  # noqa: E402
from providers.training.run_files import RunFiles  # noqa: E402
from providers.training.spec import (  # noqa: E402
    CheckpointSpec,
    DataSpec,
    DistillSpec,
    JobSpec,
    OptimizerSpec,
    TeacherSpec,
)
from scripts.build_tiny_models import (  # noqa: E402
    answer_accuracy,
    build_tiny_models,
    make_toy_datasets,
)

BATCH = 8
MAX_LEN = 128
SPEED_SEED = 42
SPEED_LR = 3e-3

# --------------------------------------------------------------------------- #
# Timing hooks: the same wrappers for all three trainers
# --------------------------------------------------------------------------- #
_TRAIN_CALLS: list[dict] = []
_ACC = {"data": 0.0, "collate": 0.0, "loss": 0.0, "data_cpu": 0.0, "collate_cpu": 0.0, "loss_cpu": 0.0,
        "tokens": 0, "answer_tokens": 0, "batches": 0, "loop_cpu": 0.0}
_orig_train = Trainer.train


def _timed_train(self, *args, **kwargs):
    for key in _ACC:
        _ACC[key] = 0 if isinstance(_ACC[key], int) else 0.0
    t0 = time.perf_counter()
    out = _orig_train(self, *args, **kwargs)
    wall, cpu = time.perf_counter() - t0, _ACC["loop_cpu"]
    losses = [h["loss"] for h in self.state.log_history if "loss" in h]
    _TRAIN_CALLS.append({"wall": wall, "cpu": cpu, "runtime": out.metrics["train_runtime"],
                         "steps": self.state.global_step, "losses": losses, **_ACC})
    return out


Trainer.train = _timed_train  # SFTTrainer and both distillation trainers inherit train() from Trainer


def _wrap(cls, name: str, key: str):
    orig = cls.__dict__[name]

    def wrapper(self, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return orig(self, *args, **kwargs)
        finally:
            _ACC[key] += time.perf_counter() - t0
            _ACC[key + "_cpu"] += time.thread_time() - c0

    setattr(cls, name, wrapper)


_wrap(Trainer, "get_batch_samples", "data")

# Process CPU time between on_train_begin and on_train_end: the same span as train_runtime.
_orig_begin = transformers.trainer_callback.CallbackHandler.on_train_begin
_orig_end = transformers.trainer_callback.CallbackHandler.on_train_end


def _begin(self, *args, **kwargs):
    _ACC["cpu0"] = time.process_time()
    return _orig_begin(self, *args, **kwargs)


def _end(self, *args, **kwargs):
    _ACC["loop_cpu"] = time.process_time() - _ACC.pop("cpu0")
    return _orig_end(self, *args, **kwargs)


transformers.trainer_callback.CallbackHandler.on_train_begin = _begin
transformers.trainer_callback.CallbackHandler.on_train_end = _end
_wrap(core_distill.CachedLogitsCollator, "__call__", "collate")
for _cls in (SFTTrainer, core_distill.DistillationTrainer, core_distill.CachedDistillationTrainer):
    _orig_loss = _cls.__dict__["compute_loss"]

    def _loss(self, model, inputs, *args, _orig=_orig_loss, **kwargs):
        if model.training:
            _ACC["tokens"] += int(inputs["attention_mask"].sum())
            _ACC["answer_tokens"] += int((inputs["labels"][:, 1:] != -100).sum())
            _ACC["batches"] += 1
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return _orig(self, model, inputs, *args, **kwargs)
        finally:
            _ACC["loss"] += time.perf_counter() - t0
            _ACC["loss_cpu"] += time.thread_time() - c0

    _cls.compute_loss = _loss


@contextlib.contextmanager
def quiet():
    """Trainer prints every log with disable_tqdm=True: to /dev/null, the same for every side."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


# --------------------------------------------------------------------------- #
# Jobs
# --------------------------------------------------------------------------- #
def epochs_for(steps: int, rows: int) -> tuple[int, int]:
    """(n_epochs, max_steps_per_epoch) giving `steps` optimizer steps over `rows` rows."""
    per_epoch = math.ceil(rows / BATCH)
    n_epochs = math.ceil(steps / per_epoch)
    if steps % n_epochs:
        raise SystemExit(f"{steps} steps over {rows} rows at batch {BATCH}: use a multiple of {n_epochs}")
    return n_epochs, steps // n_epochs


def job(name: str, run_dir: Path, model: str, train_file: str, *, steps: int, rows: int, lr: float, seed: int,
        distill: DistillSpec | None = None, save_steps: int | None = None) -> JobSpec:
    n_epochs, per_epoch = epochs_for(steps, rows)
    return JobSpec(
        job_uuid=name,
        method="distill" if distill else "sft",
        model=model,
        run_dir=str(run_dir),
        data=DataSpec(train_file=train_file, batch_size=BATCH, max_seq_len=MAX_LEN),
        optimizer=OptimizerSpec(optimizer_type="adamw", lr=lr),
        n_epochs=n_epochs,
        max_steps_per_epoch=per_epoch,
        dtype="fp32",
        seed=seed,
        distill=distill,
        checkpoint=CheckpointSpec(output_dir=str(run_dir / "checkpoints"), save_steps=save_steps,
                                  save_total_limit=None, resume=False),
    )


def run_recipe(spec: JobSpec) -> dict:
    """Run the spec's recipe in this process; returns the train() timings and the recipe's summary."""
    shutil.rmtree(spec.checkpoint.output_dir, ignore_errors=True)
    for f in ("metrics.jsonl", "status.json"):
        (Path(spec.run_dir) / f).unlink(missing_ok=True)
    spec.save()
    recipe = {"sft": core_sft, "distill": core_distill, "teacher": core_teacher}[spec.method]
    t0 = time.perf_counter()
    with quiet():
        summary = recipe.train(spec, RunFiles(spec.run_dir))
    total = time.perf_counter() - t0
    timing = _TRAIN_CALLS.pop() if spec.method != "teacher" else {}
    return {**timing, "total": total, "summary": summary}


def teacher_task(work: Path, teacher: str, train_file: str, top_k: int) -> tuple[str, float]:
    """Run a teacher task over train_file's prompts; returns (outputs dir, seconds)."""
    run_dir = work / "teacher-task"
    out = run_dir / "outputs"
    shutil.rmtree(run_dir, ignore_errors=True)
    spec = JobSpec(job_uuid="bench-teacher", method="teacher", model=teacher, run_dir=str(run_dir),
                   data=DataSpec(train_file=train_file), checkpoint=CheckpointSpec(output_dir=str(out)),
                   teacher=TeacherSpec(teacher_model=teacher, top_k=top_k, max_new_tokens=16,
                                       generation_batch_size=32))
    r = run_recipe(spec)
    return str(out), r["total"]


def write_rows(rows: list[dict], path: Path) -> str:
    write_jsonl(normalize_rows(rows, "completion"), path)
    return str(path)


# --------------------------------------------------------------------------- #
# Part 1: step time
# --------------------------------------------------------------------------- #
def speed(args, paths: dict, work: Path) -> None:
    steps = args.speed_steps
    n_rows = steps * BATCH  # one epoch of distinct rows (make_toy_datasets' first 200 are the usual ones)
    toy = make_toy_datasets(seed=0, n_train=n_rows)
    train_file = write_rows(toy["instruct"], work / "speed" / "train.jsonl")
    outputs, t_teacher = teacher_task(work / "speed", paths["teacher"], train_file, args.top_k)
    print(f"[speed] teacher task over {n_rows} prompts, top_k {args.top_k}: {t_teacher:.1f}s (untimed below)")

    def spec_for(side: str, n_steps: int, rows: int) -> JobSpec:
        distill = {
            "live": DistillSpec(method="logit", teacher_model=paths["teacher"]),
            "cached": DistillSpec(method="logit", teacher_outputs_dir=outputs),
            "sft": None,
        }[side]
        return job(f"speed-{side}", work / "speed" / side, paths["student"], train_file,
                   steps=n_steps, rows=rows, lr=SPEED_LR, seed=SPEED_SEED, distill=distill)

    sides = ["live", "cached", "sft"]
    for side in sides:  # warm-up, discarded: the first `warmup_steps` batches of the same epoch
        run_recipe(spec_for(side, args.warmup_steps, args.warmup_steps * BATCH))

    results: dict[str, list[dict]] = {s: [] for s in sides}
    for i in range(args.repeats):
        order = sides[i % 3:] + sides[: i % 3]
        if i % 2:
            order = order[::-1]
        for side in order:
            r = run_recipe(spec_for(side, steps, n_rows))
            results[side].append(r)
            print(f"  round {i + 1} {side:6s}: {1000 * r['runtime'] / r['steps']:7.2f} ms/step "
                  f"(train_runtime {r['runtime']:.2f}s, {r['steps']} steps, CPU {1000 * r['cpu'] / r['steps']:.2f} "
                  f"ms/step, train() {r['wall']:.2f}s, final loss {r['losses'][-1]:.4f})", flush=True)

    def med(rs, fn):
        return statistics.median(fn(r) for r in rs)

    print(f"\n[speed] ms/step, median over {args.repeats} rounds; {steps} steps, batch {BATCH}, fp32, "
          f"{torch.get_num_threads()} torch thread(s), seed {SPEED_SEED}, lr {SPEED_LR}")
    hdr = (f"{'side':7s} {'ms/step':>8s} {'min':>7s} {'max':>7s} | {'CPU ms':>7s} {'data':>6s} {'(collate)':>9s} "
           f"{'fwd+loss':>8s} {'rest':>6s} | {'tok/step':>8s} {'ans tok':>7s} {'final loss':>10s}")
    print(hdr)
    print("-" * len(hdr))
    for side in sides:
        rs = results[side]
        ms = [1000 * r["runtime"] / r["steps"] for r in rs]
        cpu = med(rs, lambda r: 1000 * r["cpu"] / r["steps"])
        data = med(rs, lambda r: 1000 * r["data_cpu"] / r["steps"])
        coll = med(rs, lambda r: 1000 * r["collate_cpu"] / r["steps"])
        loss = med(rs, lambda r: 1000 * r["loss_cpu"] / r["steps"])
        rest = med(rs, lambda r: 1000 * (r["cpu"] - r["data_cpu"] - r["loss_cpu"]) / r["steps"])
        print(f"{side:7s} {statistics.median(ms):8.2f} {min(ms):7.2f} {max(ms):7.2f} | {cpu:7.2f} {data:6.2f} "
              f"{(f'{coll:.2f}' if side == 'cached' else '-'):>9s} {loss:8.2f} {rest:6.2f} | "
              f"{med(rs, lambda r: r['tokens'] / r['batches']):8.1f} "
              f"{med(rs, lambda r: r['answer_tokens'] / r['batches']):7.1f} {rs[-1]['losses'][-1]:10.4f}")
    print("ms/step: wall, train_runtime / steps. CPU ms: process CPU time over the same span / steps, split into\n"
          "data (get_batch_samples: rows out of Arrow + collator; collate = CachedLogitsCollator alone), fwd+loss\n"
          "(compute_loss) and rest (backward, optimizer, callbacks). tok/step: tokens in a batch (attention mask),\n"
          "ans tok: answer tokens in the loss. On a shared machine trust CPU ms more than wall ms/step.")

    def ratio(a: str, b: str, key: str = "runtime") -> tuple[float, float]:
        overall = (statistics.median(r[key] for r in results[a]) / statistics.median(r[key] for r in results[b]))
        paired = statistics.median(x[key] / y[key] for x, y in zip(results[a], results[b]))
        return overall, paired

    print("\nratios of the medians, wall (train_runtime) and CPU; 'paired' = median over rounds of the wall ratio within "
          "a round:")
    for a, b, target in (("cached", "sft", "target <= 1.15x"), ("live", "sft", ""), ("cached", "live", "")):
        (o, p), (oc, _) = ratio(a, b), ratio(a, b, "cpu")
        print(f"  {a + '/' + b:11s} wall {o:.3f}x  paired {p:.3f}x  CPU {oc:.3f}x  {target}")


# --------------------------------------------------------------------------- #
# Part 2: accuracy
# --------------------------------------------------------------------------- #
def accuracy_of(model_dir: str, rows: list[dict]) -> float:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return answer_accuracy(model, tok, rows)


def accuracy(args, paths: dict, work: Path) -> None:
    heldout = make_toy_datasets(seed=0)["heldout_prompts"]
    held_q = {r["input_query"] for r in heldout}
    t_acc = accuracy_of(paths["teacher"], heldout)
    print(f"\n[accuracy] teacher held-out accuracy {t_acc:.1%}; base student "
          f"{accuracy_of(paths['student'], heldout):.1%}")
    methods = ["sft", "output", "logit", "hybrid"] + ([] if args.no_live_acc else ["logit-live"])
    every = args.eval_every or args.acc_steps
    points = list(range(every, args.acc_steps + 1, every))
    if points[-1] != args.acc_steps:
        points.append(args.acc_steps)
    acc: dict[str, dict[int, list[float]]] = {m: {p: [] for p in points} for m in methods}
    loss: dict[str, list[float]] = {m: [] for m in methods}
    secs: dict[str, list[float]] = {m: [] for m in methods}
    teacher_train_acc = []
    for seed in args.seeds:
        d = work / f"acc-seed{seed}"
        toy = make_toy_datasets(seed=seed if args.vary_data else 0)
        rows = [r for r in toy["instruct"] if r["input_query"] not in held_q]
        train_file = write_rows(rows, d / "train.jsonl")
        outputs, t_teacher = teacher_task(d, paths["teacher"], train_file, args.top_k)
        cached = read_shards(outputs)
        teacher_train_acc.append(sum(c["completion"][0]["content"] == r["expected_answer"]
                                     for c, r in zip(cached, rows)) / len(rows))
        print(f"  seed {seed}: {len(rows)} training rows; teacher task {t_teacher:.1f}s, teacher answers right on "
              f"{teacher_train_acc[-1]:.1%} of them", flush=True)
        for m in methods:
            distill = {
                "sft": None,
                "output": DistillSpec(method="output", teacher_outputs_dir=outputs),
                "logit": DistillSpec(method="logit", teacher_outputs_dir=outputs, temperature=args.temperature),
                "hybrid": DistillSpec(method="hybrid", teacher_outputs_dir=outputs, temperature=args.temperature,
                                      alpha=args.alpha),
                "logit-live": DistillSpec(method="logit", teacher_model=paths["teacher"], temperature=args.temperature),
            }[m]
            # Intermediate checkpoints (save_steps) give the accuracy after fewer steps from the same run: saving
            # touches no random state, so the trajectory is the one a run stopped there would have had.
            spec = job(f"acc-{m}-{seed}", d / m, paths["student"], train_file, steps=args.acc_steps, rows=len(rows),
                       lr=args.lr, seed=seed, distill=distill, save_steps=every if len(points) > 1 else None)
            r = run_recipe(spec)
            ck = Path(spec.checkpoint.output_dir)
            for p in points:
                model_dir = ck / "final" if p == args.acc_steps else ck / f"checkpoint-{p}"
                acc[m][p].append(accuracy_of(str(model_dir), heldout))
            loss[m].append(statistics.mean(r["losses"][-10:]))
            secs[m].append(r["total"])
            curve = " ".join(f"{acc[m][p][-1]:6.1%}" for p in points)
            print(f"    {m:10s} held-out acc at steps {points}: {curve}  (mean loss of the last 10 steps "
                  f"{loss[m][-1]:.4f}, {r['total']:.1f}s)", flush=True)

    def ms(xs):
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    print(f"\n[accuracy] held-out exact match (greedy) on {len(heldout)} prompts; batch {BATCH}, lr {args.lr} "
          f"(AdamW, constant), full fine-tuning, fp32, T {args.temperature}, hybrid alpha {args.alpha}, top_k "
          f"{args.top_k}, seeds {args.seeds} ({'data + shuffle' if args.vary_data else 'shuffle only'})")
    last = args.acc_steps
    w = 6 * len(args.seeds)
    print(f"\nafter {last} steps:")
    hdr = f"{'student':11s} {'mean':>6s} {'std':>6s}  {'per seed':{w}s} {'final loss':>10s} {'s/run':>6s}"
    print(hdr)
    print("-" * len(hdr))
    for m in methods:
        mean, sd = ms(acc[m][last])
        per = " ".join(f"{x:5.1%}" for x in acc[m][last])
        print(f"{m:11s} {mean:6.1%} {sd:6.1%}  {per:{w}s} {statistics.mean(loss[m]):10.4f} {statistics.mean(secs[m]):6.1f}")
    print(f"{'teacher':11s} {t_acc:6.1%} {'':6s}  (fixed; right on {statistics.mean(teacher_train_acc):.1%} of the "
          f"training prompts it answered)")
    print("final loss: mean training loss of the last 10 steps, mean over seeds; not comparable across methods (CE for "
          "sft/output,\nT^2 * KL for logit-live, T^2 * cross-entropy against the renormalized teacher top-k for cached "
          "logit, the mix for hybrid). s/run: whole recipe (load, train, checkpoint saves), wall.")
    if len(points) > 1:
        print(f"\nlearning curve, held-out accuracy mean +- std over {len(args.seeds)} seeds, by steps:")
        hdr = f"{'student':11s} " + " ".join(f"{p:>13d}" for p in points)
        print(hdr)
        print("-" * len(hdr))
        for m in methods:
            print(f"{m:11s} " + " ".join(f"{ms(acc[m][p])[0]:6.1%} +-{ms(acc[m][p])[1]:5.1%}" for p in points))
        print("(one run per seed and method, evaluated at its intermediate checkpoints)")
    if min(teacher_train_acc) == 1.0:
        print("note: the teacher answered every training prompt right, so 'output' trains on exactly the ground-truth "
              "tokens: it is SFT again (same losses), as expected")


# --------------------------------------------------------------------------- #
# Part 3: checks of the two logit paths against each other (seconds; not part of "both")
# --------------------------------------------------------------------------- #
def checks(args, paths: dict, work: Path) -> None:
    """Logged loss / grad norm of a few steps at a tiny lr:
    - cached logit with top_k = the whole vocabulary must equal the live-teacher logit loss (same KL);
    - gradient accumulation: batch 8 x 1 vs 4 x 2 vs 2 x 4 must log the same loss and grad norm."""
    d = work / "checks"
    rows = make_toy_datasets(seed=0)["instruct"]
    train_file = write_rows(rows, d / "train.jsonl")
    vocab = len(AutoTokenizer.from_pretrained(paths["teacher"]))
    full, _ = teacher_task(d / "full-vocab", paths["teacher"], train_file, vocab)
    topk, _ = teacher_task(d / "topk", paths["teacher"], train_file, args.top_k)

    def logged(name: str, distill: DistillSpec | None, batch: int = BATCH, ga: int = 1) -> list[tuple]:
        spec = JobSpec(job_uuid=name, method="distill" if distill else "sft", model=paths["student"],
                       run_dir=str(d / name), data=DataSpec(train_file=train_file, batch_size=batch, shuffle=False),
                       optimizer=OptimizerSpec(lr=1e-6), max_steps_per_epoch=3, gradient_accumulation_steps=ga,
                       distill=distill, checkpoint=CheckpointSpec(output_dir=str(d / name / "ck"), resume=False))
        run_recipe(spec)
        return [(round(m["loss"], 4), round(m["grad_norm"], 4), round(m.get("soft_loss", float("nan")), 4))
                for m in RunFiles(spec.run_dir).read_metrics() if "loss" in m]

    print("\n[checks] logged (loss, grad_norm, soft_loss) of the first 3 steps, lr 1e-6, no shuffle")
    live = DistillSpec(method="logit", teacher_model=paths["teacher"])
    print(f"  live logit                       {logged('live', live)}")
    print(f"  cached logit, top_k = vocab {vocab} {logged('cached-full', DistillSpec(method='logit', teacher_outputs_dir=full))}")
    print(f"  cached logit, top_k = {args.top_k:<10d} {logged('cached-topk', DistillSpec(method='logit', teacher_outputs_dir=topk))}")
    print("  (expected: the first two equal; top-k differs by design: cross-entropy against the renormalized top-k)")
    for side, distill in (("sft", None), ("live", live),
                          ("cached", DistillSpec(method="logit", teacher_outputs_dir=topk))):
        for batch, ga in ((8, 1), (4, 2), (2, 4)):
            print(f"  {side:6s} batch {batch} x GA {ga}: {logged(f'ga-{side}-{ga}', distill, batch, ga)}")
    print("  (expected: the same numbers for batch 8 x 1, 4 x 2 and 2 x 4 within each side)")


# --------------------------------------------------------------------------- #
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["speed", "accuracy", "both", "checks"], default="both",
                   help="both = speed + accuracy; checks = the consistency checks of the logit paths (~30 s)")
    p.add_argument("--speed-steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=5, help="steps of the discarded warm-up run of each side")
    p.add_argument("--acc-steps", type=int, default=800, help="optimizer steps (epochs over the ~200 rows as needed)")
    p.add_argument("--eval-every", type=int, default=200,
                   help="also evaluate the checkpoints saved every this many steps (0: only the final model)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--fixed-data", dest="vary_data", action="store_false",
                   help="train every seed on seed 0's prompts (the seed then only changes the shuffle order)")
    p.add_argument("--no-live-acc", action="store_true", help="skip the live-teacher logit students in part 2")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    # 1 by default: on a small shared machine a busy neighbour stalls OpenMP threads at every barrier.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "tiny_models"))
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "bench_distillation"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("providers.training").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    paths = build_tiny_models(args.models_dir)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {__import__('trl').__version__}, "
          f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}, cuda {torch.cuda.is_available()}")
    print(f"student {paths['student']}, teacher {paths['teacher']}\n")
    t0 = time.perf_counter()
    if args.part in ("speed", "both"):
        speed(args, paths, work)
    if args.part in ("accuracy", "both"):
        accuracy(args, paths, work)
    if args.part == "checks":
        checks(args, paths, work)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))


if __name__ == "__main__":
    main()
