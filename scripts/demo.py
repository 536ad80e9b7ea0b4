"""The demo: real training jobs through Llama Stack's post-training API on locally built tiny models.

1. inline::trl  (`llama stack run run.yaml`): SFT, logit distillation from a teacher, then DPO on the SFT
   model, each measured before and after on held-out prompts (examples/data/reverse_heldout.jsonl).
2. remote::trl_fsdp (`trl-fsdp-service` + `llama stack run run_fsdp.yaml`): DPO of the same SFT model on 2
   FSDP processes, with the share of parameters each process held.
Every job is submitted with the unmodified `llama-stack-client`; progress is printed while it trains,
then one table of results.

Usage: python scripts/demo.py [--workdir DIR] [--skip-remote]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from providers.cli.jobfile import LLAMA_STACK_REQUIRED
from providers.quiet import PYTHONWARNINGS

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "examples" / "data" / "reverse_heldout.jsonl"
SFT_STEPS, DPO_STEPS, BATCH = 200, 40, 32  # demo_student reaches ~100% held-out exact match in 200 steps
# Both DPO runs: beta 0.5 (the FSDP run lost exact match at 0.1: 97% -> 77%; 90% at 0.5); for the other three
# fields 0.2.12's client requires, the values that change nothing (the service notes any other as not applied).
DPO_CONFIG = {"type": "dpo", **LLAMA_STACK_REQUIRED["dpo"], "reward_scale": 0.5}


def load_builder():
    spec = importlib.util.spec_from_file_location("build_tiny_models", ROOT / "scripts" / "build_tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = load_builder()


def start(argv: list[str], log: Path, health_url: str, env: dict[str, str]) -> subprocess.Popen:
    """Start a server in its own process group and wait until its health route answers."""
    port = urllib.parse.urlsplit(health_url).port
    with socket.socket() as probe:  # a server already there would answer the health check for ours
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            sys.exit(f"port {port} is in use (another llama stack or training service?); stop it and run the "
                     "demo again")
    warn = ",".join(filter(None, (os.environ.get("PYTHONWARNINGS"), PYTHONWARNINGS)))
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONWARNINGS": warn, **env})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{argv[0]} exited early; see {log}")
        try:
            with urllib.request.urlopen(health_url, timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    sys.exit(f"{health_url} did not come up; see {log}")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Watcher:
    """Prints each job's state changes and every quarter of its steps, until the jobs it waits for end."""

    def __init__(self, client):
        self.client = client
        self.shown: dict[str, tuple] = {}
        self.final: dict[str, object] = {}

    def wait(self, job_uuids: list[str]) -> dict[str, object]:
        while any(j not in self.final for j in job_uuids):
            for job_uuid in list(self.shown):
                if job_uuid not in self.final:
                    self.poll(job_uuid)
            time.sleep(1.0)
        return {j: self.final[j] for j in job_uuids}

    def add(self, job_uuid: str) -> None:
        self.shown[job_uuid] = ()

    def poll(self, job_uuid: str) -> None:
        s = self.client.post_training.job.status(job_uuid=job_uuid)
        r = s.resources_allocated or {}
        step, total, loss = r.get("step"), r.get("total_steps"), r.get("last_loss")
        quarter = int(4 * step / total) if step and total else 0
        if (s.status, quarter) != self.shown[job_uuid]:
            self.shown[job_uuid] = (s.status, quarter)
            line = f"  {job_uuid:<14} {s.status:<12}"
            if step:
                line += f" step {int(step):>3}/{int(total or 0):<4}"
            if loss is not None:
                line += f" loss {loss:.4f}"
            print(line, flush=True)
        if s.status not in ("scheduled", "in_progress"):
            self.final[job_uuid] = s
            if s.status != "completed":
                sys.exit(f"  {job_uuid} {s.status}: {r.get('error')}")


def training_config(dataset_id: str, steps: int, lr: float, batch_size: int = BATCH) -> dict:
    """One epoch of `steps` batches over fresh rows, AdamW at `lr` with a short warm-up."""
    return {
        "n_epochs": 1,
        "max_steps_per_epoch": steps,
        "dtype": "fp32",
        "data_config": {"dataset_id": dataset_id, "batch_size": batch_size, "shuffle": True,
                        "data_format": "instruct"},
        "optimizer_config": {"optimizer_type": "adamw", "lr": lr, "weight_decay": 0.0, "num_warmup_steps": 10},
    }


class Scorer:
    """Greedy exact match and the DPO preference margin of a model on the held-out prompts."""

    def __init__(self, heldout: list[dict]):
        rng = random.Random(1)
        self.heldout = heldout
        self.pairs = [(r["input_query"], r["expected_answer"], builder._wrong_answer(rng, r["expected_answer"]))
                      for r in heldout]

    def __call__(self, model_dir: str) -> dict:
        """{'exact': share answered exactly right, 'margin': mean log p(right) - log p(wrong) in nats,
        'prefers': share of pairs where the right answer is the likelier, 'sample': one answer}."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        answers = builder.greedy_answers(model, tok, [r["input_query"] for r in self.heldout])
        exact = sum(a == r["expected_answer"] for a, r in zip(answers, self.heldout)) / len(self.heldout)
        margins = []
        with torch.no_grad():
            for query, right, wrong in self.pairs:
                ids, mask, labels = builder._encode_chats(tok, [(query, right), (query, wrong)])
                logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
                target = labels[:, 1:]
                picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                scores = (picked * (target != -100)).sum(-1)
                margins.append((scores[0] - scores[1]).item())
        return {"exact": exact, "margin": sum(margins) / len(margins),
                "prefers": sum(m > 0 for m in margins) / len(margins), "sample": answers[0]}


def inline_demo(client, models: dict[str, str], score: Scorer) -> tuple[list[tuple], str, dict]:
    """SFT and distillation of demo_student, then DPO on the SFT model; returns rows of the final table,
    the SFT model and its scores."""
    print("\n== inline::trl: SFT, logit distillation and DPO through llama stack run run.yaml")
    student, teacher = models["demo_student"], models["teacher"]
    print("  scoring the models before training ...", flush=True)
    base, teach = score(student), score(teacher)
    watcher = Watcher(client)
    client.post_training.supervised_fine_tune(
        job_uuid="demo-sft", model=student, training_config=training_config("toy-instruct", SFT_STEPS, 3e-3),
        hyperparam_search_config={}, logger_config={}, algorithm_config=None,  # full fine-tuning
    )
    client.post_training.supervised_fine_tune(
        job_uuid="demo-distill", model=student, training_config=training_config("toy-instruct", SFT_STEPS, 3e-3),
        hyperparam_search_config={}, logger_config={},
        # The teacher is near one-hot on this task: at temperature 2 its softened targets left the student at 0%
        # held-out after 200 steps; at 1 it reaches about 85%.
        algorithm_config={"type": "distillation", "teacher_model": teacher, "method": "logit", "temperature": 1.0},
    )
    watcher.add("demo-sft")
    watcher.add("demo-distill")
    sft_model = watcher.wait(["demo-sft"])["demo-sft"].checkpoints[-1]["path"]
    # DPO refines a model that already answers: it starts from the SFT checkpoint, as in a real pipeline.
    client.post_training.preference_optimize(
        job_uuid="demo-dpo", finetuned_model=sft_model,
        training_config=training_config("toy-preference", DPO_STEPS, 2e-4, batch_size=16),  # 5e-4: 93% -> 90%
        hyperparam_search_config={}, logger_config={},
        algorithm_config=DPO_CONFIG,
    )
    watcher.add("demo-dpo")
    statuses = watcher.wait(["demo-sft", "demo-distill", "demo-dpo"])
    print("  scoring the trained models ...", flush=True)
    after = {j: score(s.checkpoints[-1]["path"]) for j, s in statuses.items()}
    prompt = score.heldout[0]["input_query"]
    print(f"\n  held-out prompt {prompt!r} (expected {score.heldout[0]['expected_answer']!r})")
    for name, result in (("teacher", teach), ("demo_student before", base), ("after SFT", after["demo-sft"]),
                         ("after distillation", after["demo-distill"]), ("after SFT + DPO", after["demo-dpo"])):
        print(f"    {name:<20} -> {result['sample']!r}")
    loss = {j: s.resources_allocated.get("final_train_loss") for j, s in statuses.items()}
    return [
        ("SFT", "demo_student", "exact", base, after["demo-sft"], loss["demo-sft"]),
        ("distillation", "demo_student <- teacher", "exact", base, after["demo-distill"], loss["demo-distill"]),
        ("DPO", "SFT model", "margin", after["demo-sft"], after["demo-dpo"], loss["demo-dpo"]),
        ("(teacher)", "teacher", None, teach, None, None),
    ], sft_model, after["demo-sft"]


def remote_demo(workdir: Path, prefs: list[dict], score: Scorer, sft_model: str, sft_scores: dict) -> list[tuple]:
    """DPO of the SFT model on 2 FSDP processes; returns its row of the final table."""
    from llama_stack_client import LlamaStackClient

    print("\n== remote::trl_fsdp: DPO on 2 FSDP processes through llama stack run run_fsdp.yaml")
    # The service reads models only from the directories it is given.
    service = start([sys.executable, "-m", "providers.remote_fsdp.service.app", "--port", "8322",
                     "--data-dir", str(workdir / "fsdp-service"), "--model-dir", str(Path(sft_model).parent)],
                    workdir / "fsdp-service.log", "http://127.0.0.1:8322/health", {})
    stack = None
    try:
        stack = start(["llama", "stack", "run", "run_fsdp.yaml", "--port", "8331"], workdir / "stack-fsdp.log",
                      "http://127.0.0.1:8331/v1/health", {"TRL_FSDP_STACK_DIR": str(workdir / "stack-fsdp")})
        client = LlamaStackClient(base_url="http://127.0.0.1:8331")
        client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": prefs},
                                 dataset_id="toy-preference")
        config = training_config("toy-preference", DPO_STEPS, 2e-4, batch_size=8)  # per rank: a global batch of 16
        config["torch_run_config"] = {"nproc_per_node": 2}
        config["fsdp_config"] = {"sharding_strategy": "FULL_SHARD"}
        client.post_training.preference_optimize(
            job_uuid="demo-fsdp-dpo", finetuned_model=sft_model, training_config=config,
            hyperparam_search_config={}, logger_config={},
            algorithm_config=DPO_CONFIG,
        )
        watcher = Watcher(client)
        watcher.add("demo-fsdp-dpo")
        status = watcher.wait(["demo-fsdp-dpo"])["demo-fsdp-dpo"]
        r = status.resources_allocated
        for rank in r.get("ranks", []):
            print(f"  rank {rank['rank']} held {rank['local_params']}/{rank['total_params']} parameters, "
                  f"peak RSS {rank['peak_host_memory_mb']} MB")
        print(f"  FSDP in force: {json.dumps({k: r['fsdp'][k] for k in ('implementation', 'sharding_strategy', 'mesh')})}")
        for field, why in (r.get("not_applied") or {}).items():
            print(f"  the service noted: {field}={why} (accepted, not applied)")
        return [("DPO, FSDP 2 ranks", "SFT model", "margin", sft_scores, score(status.checkpoints[-1]["path"]),
                 r.get("final_train_loss"))]
    finally:
        if stack:
            stop(stack)
        stop(service)


def print_table(rows: list[tuple], n_heldout: int) -> None:
    """One row per job: exact match and DPO margin before -> after, the job's headline marked with *."""
    print(f"\nResults on {n_heldout} held-out prompts (not in any training set), greedy decoding")
    print(f"  {'method':<18} {'trained model':<24} {'exact match':>17}  {'DPO margin (nats)':>21}  {'final loss':>10}")
    for method, model, headline, before, after, loss in rows:
        exact = f"{before['exact']:>5.0%}" + (f" -> {after['exact']:>4.0%}" if after else " " * 8)
        margin = f"{before['margin']:>+6.1f}" + (f" -> {after['margin']:>+6.1f}" if after else " " * 10)
        exact, margin = (f"{cell} {'*' if headline == name else ' '}" for name, cell in
                         (("exact", exact), ("margin", margin)))
        print(f"  {method:<18} {model:<24} {exact:>17}  {margin:>21}  {'' if loss is None else f'{loss:.4f}':>10}")
    print("\n  * what the job trains for: SFT and distillation the right answers (exact match: share of held-out")
    print("    prompts answered exactly right), DPO the margin: mean log p(right answer) - log p(a wrong one).")
    print("  DPO starts from the SFT model, which already answers: it widens the margin, and its exact match moves")
    print("  a few points either way, only where a greedy answer changes (a side effect, not its objective).")
    print("  Both DPO runs use beta 0.5. Tiny models on a toy task show that the jobs train and the API works end")
    print("  to end, not what a real model reaches.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=None, help="where models, jobs and logs go (default: a temp dir)")
    parser.add_argument("--skip-remote", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="trl-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir: {workdir}\n\n== tiny models (built once, then reused from the workdir)")

    from llama_stack_client import LlamaStackClient
    from transformers.utils import logging as hf_logging

    # Importing llama_stack_client sets the root logger to INFO (httpx then logs every request); the
    # demo's model loads for scoring would each draw a transformers progress bar.
    logging.getLogger().setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()

    models = builder.build_tiny_models(workdir / "models")
    print("  " + ", ".join(models))
    # Fresh rows for every step (one epoch); the held-out prompts are never among them.
    data = builder.make_toy_datasets(n_train=SFT_STEPS * BATCH)
    heldout = [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()]
    assert not {r["input_query"] for r in heldout} & {r["input_query"] for r in data["instruct"]}
    score = Scorer(heldout)

    stack = start(["llama", "stack", "run", "run.yaml", "--port", "8321"], workdir / "stack.log",
                  "http://127.0.0.1:8321/v1/health",
                  # SFT and distillation train side by side; DPO follows SFT.
                  {"TRL_POST_TRAINING_DIR": str(workdir / "stack"), "TRL_MAX_CONCURRENT_JOBS": "2"})
    try:
        client = LlamaStackClient(base_url="http://127.0.0.1:8321")
        for dataset_id, rows in (("toy-instruct", data["instruct"]), ("toy-preference", data["preference"])):
            client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": rows},
                                     dataset_id=dataset_id)
        rows, sft_model, sft_scores = inline_demo(client, models, score)
    finally:
        stop(stack)
    if not args.skip_remote:
        rows += remote_demo(workdir, data["preference"][:DPO_STEPS * 16], score, sft_model, sft_scores)
    print_table(rows, len(heldout))
    print(f"\ndone in {time.monotonic() - started:.0f} s: server and job logs, checkpoints under {workdir}")


if __name__ == "__main__":
    main()
