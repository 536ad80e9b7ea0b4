"""What `trl-fsdp-service` writes where an operator looks: a one-line banner on the terminal, each request's
audit line in DATA_DIR/logs/service.log (on stderr only when asked), and no progress bars in a job's logs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from helpers import free_port, stop_process_group, wait_for_health, wait_until

pytestmark = pytest.mark.slow  # starts the service and trains one step

REPO_ROOT = Path(__file__).resolve().parent.parent


def start(data: Path, stderr: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(stderr, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "providers.remote_fsdp.service.app", "--port", str(port),
                                 "--data-dir", str(data), "--nproc-per-node", "1", *extra],
                                cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_for_health(url, timeout=120, proc=proc, path="/health", log_file=stderr)
    return proc, url


def test_the_terminal_gets_a_banner_and_the_log_file_gets_the_requests(tmp_path, tiny_models, toy_data):
    data, stderr = tmp_path / "data", tmp_path / "stderr.txt"
    proc, url = start(data, stderr, "--allowed-model-root", str(Path(tiny_models["student"]).parent))
    try:
        rows = "".join(json.dumps(r) + "\n" for r in toy_data["instruct"])
        assert requests.post(f"{url}/v1/datasets/toy/rows", data=rows, timeout=60).status_code == 200
        body = {"job_uuid": "quiet", "model": tiny_models["student"], "training_config": {
            "n_epochs": 1, "max_steps_per_epoch": 1, "dtype": "fp32",
            "data_config": {"dataset_id": "toy", "batch_size": 2, "data_format": "instruct"},
            "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-3, "weight_decay": 0.0, "num_warmup_steps": 0}}}
        r = requests.post(f"{url}/v1/post-training/supervised-fine-tune", json=body, timeout=60)
        assert r.status_code == 200, r.text
        status = lambda: requests.get(f"{url}/v1/post-training/job/status", params={"job_uuid": "quiet"},  # noqa: E731
                                      timeout=60).json()["status"]
        assert wait_until(lambda: (s := status()) not in ("scheduled", "in_progress") and s, 300) == "completed"
    finally:
        stop_process_group(proc)
    terminal = stderr.read_text()
    log_file = data / "logs" / "service.log"
    banner = [line for line in terminal.splitlines() if "serving on" in line]
    assert len(banner) == 1 and url in banner[0] and f"{url}/dashboard/" in banner[0] and str(log_file) in banner[0]
    assert "POST /v1/datasets/toy/rows" not in terminal and "audit" not in terminal, terminal[-2000:]
    audit = log_file.read_text()
    assert "POST /v1/datasets/toy/rows -> 200" in audit and "GET /v1/post-training/job/status" in audit
    job_logs = "".join(p.read_text(errors="replace") for p in (data / "runs" / "quiet" / "logs").glob("*.log"))
    assert job_logs and "Loading weights" not in job_logs and "it/s]" not in job_logs and "examples/s]" not in job_logs
    assert "Loading weights" not in terminal


def test_requests_reach_stderr_when_asked(tmp_path):
    data, stderr = tmp_path / "data", tmp_path / "stderr.txt"
    proc, url = start(data, stderr, "--log-requests-to-stderr")
    try:
        assert requests.get(f"{url}/v1/post-training/jobs", timeout=60).status_code == 200
        wait_until(lambda: "GET /v1/post-training/jobs -> 200" in stderr.read_text(), 30, message="the audit line")
    finally:
        stop_process_group(proc)
    assert "GET /v1/post-training/jobs -> 200" in (data / "logs" / "service.log").read_text()
