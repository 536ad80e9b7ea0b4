"""The demo: real training jobs through Llama Stack's post-training API on locally built tiny models.

1. inline::trl  (`llama stack run run.yaml`): SFT with LoRA, DPO, and logit distillation from a teacher.
2. remote::trl_fsdp (`trl-fsdp-service` + `llama stack run run_fsdp.yaml`): DPO on 2 FSDP processes.
Every job is submitted with the unmodified `llama-stack-client`; progress is printed while it trains,
then the final losses, the checkpoint paths and one generation from a trained model.

Usage: python scripts/demo.py [--workdir DIR] [--skip-remote]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_builder():
    spec = importlib.util.spec_from_file_location("build_tiny_models", ROOT / "scripts" / "build_tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start(argv: list[str], log: Path, health_url: str, env: dict[str, str]) -> subprocess.Popen:
    """Start a server in its own process group and wait until its health route answers."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **env})
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


def watch(client, job_uuids: list[str]) -> dict[str, object]:
    """Print progress of each job until all have finished; returns the final statuses."""
    final: dict[str, object] = {}
    last_line: dict[str, str] = {}
    while len(final) < len(job_uuids):
        for job_uuid in job_uuids:
            if job_uuid in final:
                continue
            s = client.post_training.job.status(job_uuid=job_uuid)
            r = s.resources_allocated or {}
            step, total, loss = r.get("step"), r.get("total_steps"), r.get("last_loss")
            line = f"  {job_uuid:<14} {s.status:<12}"
            if step is not None:
                line += f" step {int(step)}/{int(total or 0)}"
            if loss is not None:
                line += f"  loss {loss:.4f}"
            if line != last_line.get(job_uuid):
                print(line, flush=True)
                last_line[job_uuid] = line
            if s.status not in ("scheduled", "in_progress"):
                final[job_uuid] = s
                if s.status != "completed":
                    print(f"  {job_uuid} {s.status}: {r.get('error')}")
        time.sleep(1.0)
    return final


def report(statuses: dict[str, object]) -> None:
    print("\nResults")
    for job_uuid, s in statuses.items():
        r = s.resources_allocated or {}
        final = s.checkpoints[-1]["path"] if s.checkpoints else "-"
        print(f"  {job_uuid:<14} {s.status:<10} final train loss {r.get('final_train_loss')!s:<22} checkpoint {final}")


def generate(model_dir: str, prompt: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def training_config(dataset_id: str, epochs: int, lr: float) -> dict:
    return {
        "n_epochs": epochs,
        "max_steps_per_epoch": 25,  # 200 rows / batch 8
        "dtype": "fp32",
        "data_config": {"dataset_id": dataset_id, "batch_size": 8, "shuffle": True, "data_format": "instruct"},
        "optimizer_config": {"optimizer_type": "adamw", "lr": lr, "weight_decay": 0.0, "num_warmup_steps": 0},
    }


def inline_demo(client, models: dict[str, str]) -> None:
    print("\n== inline::trl: SFT, DPO and logit distillation through llama stack run run.yaml")
    student, teacher = models["student"], models["teacher"]
    client.post_training.supervised_fine_tune(
        job_uuid="demo-sft", model=student, training_config=training_config("toy-instruct", 6, 3e-3),
        hyperparam_search_config={}, logger_config={}, algorithm_config=None,  # full fine-tuning
    )
    client.post_training.preference_optimize(
        job_uuid="demo-dpo", finetuned_model=student, training_config=training_config("toy-preference", 2, 3e-3),
        hyperparam_search_config={}, logger_config={},
        algorithm_config={"type": "dpo", "reward_scale": 0.5, "reward_clip": 5.0, "epsilon": 0.0, "gamma": 0.0},
    )
    client.post_training.supervised_fine_tune(
        job_uuid="demo-distill", model=student, training_config=training_config("toy-instruct", 6, 3e-3),
        hyperparam_search_config={}, logger_config={},
        algorithm_config={"type": "distillation", "teacher_model": teacher, "method": "logit", "temperature": 2.0},
    )
    statuses = watch(client, ["demo-sft", "demo-dpo", "demo-distill"])
    report(statuses)
    prompt = "reverse: k q z"  # not in the training rows
    print(f"\n  prompt {prompt!r}")
    for name, path in (("teacher", teacher), ("student before training", student),
                       ("SFT student", statuses["demo-sft"].checkpoints[-1]["path"]),
                       ("distilled student", statuses["demo-distill"].checkpoints[-1]["path"])):
        print(f"  {name:<24} -> {generate(path, prompt)!r}")


def remote_demo(workdir: Path, models: dict[str, str], prefs: list[dict]) -> None:
    from llama_stack_client import LlamaStackClient

    print("\n== remote::trl_fsdp: DPO on 2 FSDP processes through llama stack run run_fsdp.yaml")
    models_root = str(Path(models["student"]).parent)  # the service reads models only from allowed roots
    service = start([sys.executable, "-m", "providers.remote_fsdp.service.app", "--port", "8322",
                     "--data-dir", str(workdir / "fsdp-service"), "--model-dir", models_root],
                    workdir / "fsdp-service.log", "http://127.0.0.1:8322/health", {})
    stack = None
    try:
        stack = start(["llama", "stack", "run", "run_fsdp.yaml", "--port", "8331"], workdir / "stack-fsdp.log",
                      "http://127.0.0.1:8331/v1/health", {"TRL_FSDP_STACK_DIR": str(workdir / "stack-fsdp")})
        client = LlamaStackClient(base_url="http://127.0.0.1:8331")
        client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": prefs},
                                 dataset_id="toy-preference")
        config = training_config("toy-preference", 2, 5e-3)
        config["data_config"]["batch_size"] = 4  # per rank: a global batch of 8 on 2 processes
        config["torch_run_config"] = {"nproc_per_node": 2}
        config["fsdp_config"] = {"sharding_strategy": "FULL_SHARD"}
        client.post_training.preference_optimize(
            job_uuid="demo-fsdp-dpo", finetuned_model=models["student"], training_config=config,
            hyperparam_search_config={}, logger_config={},
            # The full payload of llama-stack-client 0.2.12 (all four fields are Required in its types).
            algorithm_config={"type": "dpo", "reward_scale": 0.1, "reward_clip": 5.0, "epsilon": 0.1, "gamma": 0.99},
        )
        statuses = watch(client, ["demo-fsdp-dpo"])
        report(statuses)
        r = statuses["demo-fsdp-dpo"].resources_allocated
        for rank in r.get("ranks", []):
            print(f"  rank {rank['rank']} held {rank['local_params']}/{rank['total_params']} parameters, "
                  f"peak RSS {rank['peak_host_memory_mb']} MB")
        print(f"  FSDP in force: {json.dumps({k: r['fsdp'][k] for k in ('implementation', 'sharding_strategy', 'mesh')})}")
    finally:
        if stack:
            stop(stack)
        stop(service)


def quiet_libraries() -> None:
    """The demo prints progress and results: importing llama_stack_client sets the root logger to INFO
    (httpx then logs every request), and transformers draws a progress bar per model load."""
    import logging

    from transformers.utils import logging as hf_logging

    logging.getLogger().setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=None, help="where models, jobs and logs go (default: a temp dir)")
    parser.add_argument("--skip-remote", action="store_true")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="trl-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir: {workdir}")

    builder = load_builder()
    models = builder.build_tiny_models(workdir / "models")
    data = builder.make_toy_datasets()
    print("tiny models:", ", ".join(f"{k}={v}" for k, v in models.items()))

    from llama_stack_client import LlamaStackClient

    quiet_libraries()
    stack = start(["llama", "stack", "run", "run.yaml", "--port", "8321"], workdir / "stack.log",
                  "http://127.0.0.1:8321/v1/health", {"TRL_POST_TRAINING_DIR": str(workdir / "stack")})
    try:
        client = LlamaStackClient(base_url="http://127.0.0.1:8321")
        for dataset_id, rows in (("toy-instruct", data["instruct"]), ("toy-preference", data["preference"])):
            client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": rows},
                                     dataset_id=dataset_id)
        inline_demo(client, models)
    finally:
        stop(stack)
    if not args.skip_remote:
        remote_demo(workdir, models, data["preference"])
    print(f"\ndone: logs and checkpoints under {workdir}")


if __name__ == "__main__":
    main()
