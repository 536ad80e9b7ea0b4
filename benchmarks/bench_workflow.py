#!/usr/bin/env python
"""Benchmark: the adapter workflow end to end on the tiny models, through the training service.

Starts `python -m providers.remote_fsdp.service.app` on a free 127.0.0.1 port (own data dir, bearer
token), then runs the one-call pipeline with the Python client:

    enhance   the tiny student answers each 'reverse the letters' question (served by the service's
              OpenAI chat API), a rule judge (exact match against the reference) checks it, the tiny
              teacher (also served) gives a hint, the student retries (--iterations); a row the student
              never gets right takes the teacher's answer when the judge accepts it
    train     full SFT of the student on the enhanced rows (final-only format)
    validate  the trained model vs the base student on the held-out prompts: exact-match pass rate,
              perplexity of the expected answers, tokens/s, peak memory
    export    merged model, GGUF (f16) + Modelfile, Hub dry run

and prints one table: the share of correct answers in the training data before (the student's own
first answers) and after enhancement, held-out pass rate and perplexity of base and trained model, and
each step's wall time. Wall times on a shared machine vary a lot; the accuracy figures do not.

    python benchmarks/bench_workflow.py --rows 160 --epochs 20 --lr 3e-3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
TOKEN = "bench-workflow-token-0123"  # the service wants 16+ characters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="tiny models dir (built there if missing)")
    ap.add_argument("--rows", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from build_tiny_models import build_tiny_models, make_toy_datasets

    from providers.remote_fsdp.client import TrainingServiceClient

    work = Path(tempfile.mkdtemp(prefix="bench-workflow-"))
    models = build_tiny_models(args.models or work / "models")
    data = make_toy_datasets()
    (work / "token").write_text(TOKEN)
    port = args.port or __import__("socket").create_server(("127.0.0.1", 0)).getsockname()[1]
    log = open(work / "service.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "providers.remote_fsdp.service.app", "--port", str(port),
                             "--data-dir", str(work / "data"), "--api-token-file", str(work / "token"),
                             "--allowed-model-root", str(Path(models["student"]).parent)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                raise SystemExit(f"service exited: {(work / 'service.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        svc = TrainingServiceClient(url, api_token=TOKEN)
        request = {
            "workflow_id": "bench",
            "rows": data["instruct"][: args.rows],
            "enhance": {"student": {"model": models["student"], "max_tokens": 12},
                        "teacher": {"model": models["teacher"], "max_tokens": 12},
                        "judge": {"type": "rule", "mode": "exact"}, "hint_template": "{question}",
                        "max_iterations": args.iterations, "concurrency": 4, "thinking_format": "final-only"},
            "train": {"method": "sft", "n_epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                      "max_seq_len": 64},
            "validate": {"prompts": data["heldout_prompts"], "max_new_tokens": 12, "match": "exact"},
            "export": {"formats": ["merged", "gguf", "hub"], "gguf_dtype": "f16", "hub": {"repo": "bench"}},
        }
        state = svc.run_workflow(request, interval_s=2.0)
        d = work / "data" / "workflows" / "workflows" / "bench"
        results = json.loads((d / "pipeline_results.json").read_text())
        if state["state"] != "completed":
            raise SystemExit(f"workflow {state['state']}: {state.get('error')}\n{json.dumps(results, indent=2)[:3000]}")
        enh = results["steps"]["enhance"]["outputs"]
        val = json.loads((d / "validate" / "validation.json").read_text())
        s, perf = val["summary"], val["performance"]
        steps = results["steps"]["train"]["outputs"]
        rows = [
            ("rows in / kept / preference pairs", f"{enh['rows_total']} / {enh['rows_kept']} / {enh['preference_pairs']}"),
            ("student accuracy by iteration", ", ".join(f"{a['accuracy']:.0%}" for a in enh["accuracy_by_iteration"])),
            ("correct share of training answers", f"{enh['training_data_correct_share']['before']:.0%} (student's own) -> "
                                                  f"{enh['training_data_correct_share']['after']:.0%} (enhanced)"),
            ("hints / teacher answers used", f"{enh['hints_used']} / {enh['teacher_answers_used']}"),
            ("train", f"{args.epochs} epochs x batch {args.batch_size}, lr {args.lr}, final loss {steps['final_train_loss']}"),
            ("held-out exact match (30 prompts)", f"base {s['base_pass_rate']:.0%} -> trained {s['pass_rate']:.0%}"),
            ("held-out perplexity of the answers", f"base {s['base_perplexity']:.1f} -> trained {s['perplexity']:.2f}"),
            ("outputs changed vs base", f"{s['changed_share']:.0%}"),
            ("generation (trained / base)", f"{perf['tokens_per_s']} / {perf.get('base_tokens_per_s')} tokens/s, "
                                            f"peak RSS {perf['peak_rss_mb']} MB"),
            ("validation passed", str(val["passed"])),
            ("step wall times (s)", ", ".join(f"{k} {v['elapsed_s']}" for k, v in results["steps"].items())),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        print(f"\noutputs under {d}")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
