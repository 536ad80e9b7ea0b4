#!/usr/bin/env python
"""Benchmark: GRPO on the toy "reverse the letters" task, our recipe vs a bare TRL GRPOTrainer.

The base policy is the tiny teacher with seeded noise on its weight matrices (as tests/test_grpo.py builds
it): it answers about a third of the held-out prompts right, so sampled groups differ in reward. The reward
is an exact-match grader (`string_check`, `{{ sample.output_text }}` eq `{{ item.expected_answer }}`).

Runs the same job (4 prompts x 8 generations per step, 16 new tokens at most, fp32, lr 2e-4, seed 0) through

  bare  TRL's GRPOTrainer built by hand, a hand-written exact-match reward, no callbacks;
  core  our recipe, `providers.training.recipes.grpo.train(spec, RunFiles)` in this process (graders as
        reward functions, RunReporter writing metrics.jsonl and status.json at every log),

alternating bare, core, core, bare, ... and prints:
  reward        mean greedy exact match on the 30 held-out prompts, before and after each run;
  gen tok/s     completion tokens generated / time inside TRL's generation (`_generate_single_turn`);
  gen share     that time / the training loop's wall time (the rest: scoring, log-probs, backward, optimizer);
  steps/s       steps / `train_runtime` (the trainer's own timer), and the ratio core/bare (median of pairs);
  implied       1 - (the core's grader time beyond the bare reward's + its RunReporter time) / its loop time:
                the ratio measured directly (same config and losses on both sides), free of run-to-run noise.

Usage (repository root, venv active):

    python benchmarks/bench_grpo.py                     # 16 steps, 2 repeats, 1 thread
    python benchmarks/bench_grpo.py --steps 24 --repeats 3 --threads 2

A benchmark, not a test: it asserts nothing; a shared machine makes the timings noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from providers.training.components import RunReporter  # noqa: E402
from providers.training.data import normalize_rows, write_jsonl  # noqa: E402
from providers.training.recipes import grpo as core_grpo  # noqa: E402
from providers.training.run_files import RunFiles  # noqa: E402
from providers.training.spec import JobSpec  # noqa: E402
from scripts.build_tiny_models import answer_accuracy, build_tiny_models, make_toy_datasets  # noqa: E402

PROMPTS, GENERATIONS, NEW_TOKENS, LR, SEED, NOISE = 4, 8, 16, 2e-4, 0, 1.2
EXACT = {"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
         "reference": "{{ item.expected_answer }}", "operation": "eq"}

# --------------------------------------------------------------------------- #
# Timing hooks, the same for both sides
# --------------------------------------------------------------------------- #
RUNS: list[dict] = []
_GEN = {"s": 0.0, "tokens": 0}
_orig_train = transformers.Trainer.train
_orig_generate = GRPOTrainer._generate_single_turn
_orig_rewards = GRPOTrainer._calculate_rewards
_REPORTER = {"s": 0.0}


def _timed_train(self, *args, **kwargs):
    _GEN.update(s=0.0, tokens=0, reward_s=0.0)
    _REPORTER["s"] = 0.0
    c0 = time.process_time()
    out = _orig_train(self, *args, **kwargs)
    RUNS.append({"runtime": out.metrics["train_runtime"], "cpu": time.process_time() - c0,
                 "steps": self.state.global_step, "gen_s": _GEN["s"], "gen_tokens": _GEN["tokens"],
                 "reward_s": _GEN["reward_s"], "reporter_s": _REPORTER["s"],
                 "losses": [h["loss"] for h in self.state.log_history if "loss" in h]})
    return out


def _timed_generate(self, *args, **kwargs):
    t0 = time.perf_counter()
    completion_ids, logprobs = _orig_generate(self, *args, **kwargs)
    _GEN["s"] += time.perf_counter() - t0
    _GEN["tokens"] += sum(len(c) for c in completion_ids)
    return completion_ids, logprobs


def _timed_rewards(self, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        return _orig_rewards(self, *args, **kwargs)
    finally:
        _GEN["reward_s"] += time.perf_counter() - t0


def _timed(fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _REPORTER["s"] += time.perf_counter() - t0

    return wrapper


transformers.Trainer.train = _timed_train
GRPOTrainer._generate_single_turn = _timed_generate
GRPOTrainer._calculate_rewards = _timed_rewards
for _name in ("on_train_begin", "on_log", "on_step_end", "on_save"):
    if _name in RunReporter.__dict__:
        setattr(RunReporter, _name, _timed(RunReporter.__dict__[_name]))


@contextlib.contextmanager
def quiet():
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def noisy_teacher(teacher: str, out: Path) -> str:
    model = AutoModelForCausalLM.from_pretrained(teacher)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * NOISE * p.std())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    return str(out)


def heldout(model_dir: str, rows: list[dict]) -> float:
    return answer_accuracy(AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir),
                           rows)


def exact_match(prompts, completions, expected_answer, **_):
    """The bare side's reward: the completion's text equals the row's answer."""
    return [float(c[0]["content"] == a) for c, a in zip(completions, expected_answer)]


def bare_run(base: str, train_file: str, steps: int, out: str) -> str:
    tok = AutoTokenizer.from_pretrained(base)
    config = GRPOConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=PROMPTS * GENERATIONS,
        per_device_eval_batch_size=PROMPTS * GENERATIONS, learning_rate=LR, weight_decay=0.0,
        optim="adamw_torch_fused", lr_scheduler_type="constant", bf16=False, fp16=False,
        activation_checkpointing=False, use_cpu=not torch.cuda.is_available(), seed=SEED, logging_steps=1,
        report_to="none", save_strategy="no", eval_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
        num_generations=GENERATIONS, max_completion_length=NEW_TOKENS, temperature=1.0, beta=0.0, loss_type="dapo",
        scale_rewards="group", epsilon=0.2, num_iterations=1, shuffle_dataset=True,
    )
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                          reward_funcs=exact_match, args=config,
                          train_dataset=Dataset.from_json(train_file), processing_class=tok)
    with quiet():
        trainer.train()
    trainer.save_model(out + "/final")
    tok.save_pretrained(out + "/final")
    return out + "/final"


def core_run(base: str, train_file: str, steps: int, run_dir: str) -> str:
    spec = JobSpec(job_uuid="bench-grpo", method="grpo", model=base, run_dir=run_dir,
                   data={"train_file": train_file, "batch_size": PROMPTS, "max_seq_len": 128},
                   optimizer={"lr": LR}, max_steps_per_epoch=steps, seed=SEED,
                   checkpoint={"output_dir": run_dir + "/checkpoints", "resume": False},
                   grpo={"graders": [EXACT], "num_generations": GENERATIONS, "max_completion_length": NEW_TOKENS})
    with quiet():
        return core_grpo.train(spec, RunFiles(run_dir))["final_checkpoint"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models-dir", default=os.environ.get("TRL_TEST_MODELS_DIR"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    try:
        models = build_tiny_models(args.models_dir or str(work / "models"))
        base = noisy_teacher(models["teacher"], work / "base")
        toy = make_toy_datasets(seed=0)
        train_file = str(work / "train.jsonl")
        write_jsonl(normalize_rows(toy["instruct"], "graded_prompt"), train_file)
        before = heldout(base, toy["heldout_prompts"])
        results = {"bare": [], "core": []}
        order = [side for _ in range(args.repeats) for side in ("bare", "core", "core", "bare")][: 2 * args.repeats]
        for i, side in enumerate(order):
            out = str(work / f"{side}{i}")
            final = (bare_run if side == "bare" else core_run)(base, train_file, args.steps, out)
            run = RUNS[-1]
            run["after"] = heldout(final, toy["heldout_prompts"])
            results[side].append(run)
            shutil.rmtree(out, ignore_errors=True)
        print(f"\nGRPO, {args.steps} steps of {PROMPTS} prompts x {GENERATIONS} generations, {args.threads} thread(s), "
              f"torch {torch.__version__}\nheld-out greedy reward before: {before:.3f}\n")
        print(f"{'side':5} {'reward after':>12} {'steps/s':>8} {'gen tok/s':>10} {'gen share':>9} {'CPU s':>7} "
              f"{'reward ms/step':>14} {'reporter ms/step':>16}")
        for side, runs in results.items():
            for r in runs:
                print(f"{side:5} {r['after']:12.3f} {r['steps'] / r['runtime']:8.3f} "
                      f"{r['gen_tokens'] / max(r['gen_s'], 1e-9):10.1f} {r['gen_s'] / r['runtime']:9.1%} {r['cpu']:7.1f} "
                      f"{1000 * r['reward_s'] / r['steps']:14.2f} {1000 * r['reporter_s'] / r['steps']:16.2f}")
        pairs = [c["steps"] / c["runtime"] / (b["steps"] / b["runtime"]) for b, c in zip(results["bare"], results["core"])]
        same = all(b["losses"] == c["losses"] for b, c in zip(results["bare"], results["core"]))
        print(f"\ncore/bare steps/s (median of pairs): {statistics.median(pairs):.3f}x  "
              f"(pairs: {', '.join(f'{p:.3f}' for p in pairs)}); same losses: {same}")
        # The two loops run the same config and losses; what the core adds is its graders (vs the bare
        # reward function) and its RunReporter: their share of the core loop is the ratio, free of run noise.
        extra = statistics.median((c["reward_s"] - b["reward_s"] + c["reporter_s"]) / c["runtime"]
                                  for b, c in zip(results["bare"], results["core"]))
        print(f"core/bare implied by the core's own time (graders beyond the bare reward + RunReporter): "
              f"{1 - extra:.4f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
