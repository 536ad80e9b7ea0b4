"""Fixtures shared by the operators' tools tests (tests/test_cli.py, tests/test_dashboard.py): one FSDP
service with an API token for the whole session, the `trl-post-training` command, artifacts folder.

The fixtures (ops_service, cli_env) are registered by tests/conftest.py, so the service starts once even when
several modules use it; modules import only the helpers (a module importing a fixture would start its own).
Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import free_port, processes_mentioning, stop_process_group, wait_for_health, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
TOKEN = "operator-test-token"
ACTIVE = ("scheduled", "in_progress")


def artifacts_dir() -> Path:
    """Where screenshots, pane captures and timings go (TRL_TEST_ARTIFACTS_DIR, default test-artifacts/)."""
    path = Path(os.environ.get("TRL_TEST_ARTIFACTS_DIR", REPO_ROOT / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


class OpsService:
    """`trl-fsdp-service` with a token, one process group; `http` is a client that sends the token."""

    def __init__(self, data_dir: Path, token: str = TOKEN):
        self.data_dir = data_dir
        self.token = token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"service-{self.port}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "providers.remote_fsdp.service.app", "--port", str(self.port),
                 "--data-dir", str(data_dir), "--api-token", token, "--nproc-per-node", "1"],
                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_for_health(self.url, timeout=120, proc=self.proc, path="/health", log_file=self.log)
        self.http = httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {token}"}, timeout=120)

    def status(self, job_uuid: str) -> dict:
        r = self.http.get("/v1/post-training/job/status", params={"job_uuid": job_uuid})
        assert r.status_code == 200, r.text
        return r.json()

    def step(self, job_uuid: str) -> int:
        return self.status(job_uuid)["resources_allocated"].get("step") or 0

    def wait(self, job_uuid: str, timeout: float = 300) -> dict:
        return wait_until(lambda: (s := self.status(job_uuid))["status"] not in ACTIVE and s, timeout,
                          interval=0.25, message=f"job {job_uuid} finished")

    def stop(self) -> None:
        self.http.close()
        stop_process_group(self.proc)
        for pid, _ in processes_mentioning(str(self.data_dir)):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def ops_service(tmp_path_factory, tiny_models):
    svc = OpsService(tmp_path_factory.mktemp("ops") / "data")
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def cli_env(ops_service, tiny_models) -> dict[str, str]:
    """Environment for `trl-post-training` aimed at the shared service (URL and token from env)."""
    return {**os.environ, "TRL_POST_TRAINING_URL": ops_service.url, "TRL_POST_TRAINING_TOKEN": ops_service.token,
            "TRL_MODELS_DIR": str(Path(tiny_models["student"]).parent), "PYTHONUNBUFFERED": "1",
            "COLUMNS": "160"}


def cli_command() -> list[str]:
    """The console script when installed (what users run), else the module."""
    script = Path(sys.executable).parent / "trl-post-training"
    return [str(script)] if script.exists() else [sys.executable, "-m", "providers.cli"]


def cli(env: dict[str, str], *args: str, timeout: float = 300, check: int | None = 0) -> subprocess.CompletedProcess:
    """Run `trl-post-training ARGS` (stdout not a terminal: plain lines); assert its exit code."""
    p = subprocess.run([*cli_command(), *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=timeout)
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode} for {args}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def long_sft_file(tmp_path: Path, job_uuid: str, steps: int = 2000, save_steps: int | None = None) -> Path:
    """A copy of examples/sft_lora.yaml that trains `steps` steps (for cancel/resume and live charts)."""
    import yaml

    spec = yaml.safe_load((EXAMPLES / "sft_lora.yaml").read_text())
    spec["job_uuid"] = job_uuid
    spec["model"] = "${TRL_MODELS_DIR}/student"  # a long job, not a learning one: the fastest model
    spec["dataset"] = str(EXAMPLES / "data" / "reverse_instruct.jsonl")
    spec.pop("validation_dataset")
    spec["training"].update(n_epochs=steps // 25 + 1, max_steps_per_epoch=25, batch_size=8)
    spec["training"].pop("save_steps")
    if save_steps:
        spec["training"]["save_steps"] = save_steps
    spec.pop("logger", None)
    path = tmp_path / f"{job_uuid}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def wait_for_file_text(path: Path, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in (text := path.read_text(errors="replace")):
            return text
        time.sleep(0.2)
    raise TimeoutError(f"{needle!r} not in {path} after {timeout}s")


def chromium_path() -> str:
    """Debian's chromium (installed by scripts/install-browser.sh when missing), or skip saying why."""
    path = os.environ.get("TRL_TEST_CHROMIUM", "/usr/bin/chromium")
    if not Path(path).exists():
        script = REPO_ROOT / "scripts" / "install-browser.sh"
        p = subprocess.run([str(script)], capture_output=True, text=True, timeout=900)
        if not Path(path).exists():
            pytest.skip(f"no Chromium at {path} and scripts/install-browser.sh could not install it "
                        f"(exit {p.returncode}): {p.stderr.strip()[-300:]}")
    return path


def save_json(name: str, data) -> Path:
    path = artifacts_dir() / name
    path.write_text(json.dumps(data, indent=2))
    return path


def tmux_available() -> bool:
    return shutil.which("tmux") is not None
