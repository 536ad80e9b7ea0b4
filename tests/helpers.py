"""Process, port and job helpers shared by the end-to-end test modules (no pytest fixtures here).

Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ACTIVE_STATES = ("scheduled", "in_progress")


# -- ports and health ----------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_for_health(
    base_url: str,
    timeout: float = 120.0,
    proc: subprocess.Popen | None = None,
    path: str = "/v1/health",
    log_file: str | Path | None = None,
) -> None:
    """Poll GET base_url+path until it answers 200. Fails early when `proc` exits first."""
    deadline = time.monotonic() + timeout
    last_error: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"server process exited with code {proc.returncode} before {base_url}{path} answered"
                + log_tail(log_file)
            )
        try:
            with urllib.request.urlopen(base_url + path, timeout=2) as r:
                if r.status == 200:
                    return
                last_error = f"HTTP {r.status}"
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            last_error = e
        time.sleep(0.25)
    raise TimeoutError(f"{base_url}{path} did not answer within {timeout}s (last: {last_error})" + log_tail(log_file))


def log_tail(log_file: str | Path | None, lines: int = 40) -> str:
    if log_file is None or not Path(log_file).exists():
        return ""
    text = Path(log_file).read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last {len(text)} lines of {log_file} ---\n" + "\n".join(text)


# -- processes -----------------------------------------------------------------------------------
def stop_process_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process group led by `proc` (started with start_new_session=True), then SIGKILL."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def process_group_exists(pgid: int) -> bool:
    """os.killpg(pgid, 0): True unless it raises ProcessLookupError (zombies count as existing)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def is_rank_agent(cmdline: str) -> bool:
    """A job's process that starts ranks: torchrun, or the agent that forks them (providers.training.local_ranks)."""
    return "torch.distributed.run" in cmdline or "providers.training.local_ranks" in cmdline


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, cmdline) of every live (non-zombie) process whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pid = int(entry.name)
        if text in cmdline and pid != os.getpid() and _proc_state(pid) not in (None, "Z"):
            found.append((pid, cmdline.strip()))
    return found


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def unused_subnets(count: int, low: int, high: int) -> list[int]:
    """`count` distinct X in [low, high) with 10.231.X.0/24 not routed on this host now. A test network
    left behind by a killed run (or one of a concurrent run) keeps its route: reusing its subnet would send
    the test's packets into the stale namespace."""
    import random

    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    used = {int(m) for m in re.findall(r"^10\.231\.(\d+)\.", routes, re.M)}
    free = [x for x in range(low, high) if x not in used]
    if len(free) < count:
        raise RuntimeError(f"no unused 10.231.{low}-{high - 1}.0/24 subnets left: {routes}")
    return random.sample(free, count)


def wait_until(predicate, timeout: float, interval: float = 0.1, message: str = "condition"):
    """Poll `predicate()` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not reached within {timeout}s")
        time.sleep(interval)


# -- jobs ----------------------------------------------------------------------------------------
def wait_for_job(client, job_uuid: str, timeout: float = 600.0, interval: float = 0.25):
    """Poll client.post_training.job.status until the job is no longer scheduled/in_progress; return
    the final status response. Raises TimeoutError (with the last status) when it takes too long."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = client.post_training.job.status(job_uuid=job_uuid)
        if status.status not in ACTIVE_STATES:
            return status
        time.sleep(interval)
    raise TimeoutError(f"job {job_uuid} still {getattr(status, 'status', None)} after {timeout}s: {status}")


def wait_for_step(client, job_uuid: str, min_step: int = 1, timeout: float = 300.0):
    """Wait until the job is in_progress and reports step >= min_step; return that status."""

    def check():
        s = client.post_training.job.status(job_uuid=job_uuid)
        if s.status not in ACTIVE_STATES:
            raise AssertionError(f"job {job_uuid} ended ({s.status}) before reaching step {min_step}: {s}")
        step = (s.resources_allocated or {}).get("step") or 0
        return s if s.status == "in_progress" and step >= min_step else None

    return wait_until(check, timeout, interval=0.1, message=f"job {job_uuid} at step >= {min_step}")


# -- Hugging Face cache --------------------------------------------------------------------------------
def hf_cache_with(model_dir: str | Path, repo_id: str, hf_home: str | Path) -> Path:
    """Place a local model in a Hugging Face cache at `hf_home` in the standard snapshot layout
    (hub/models--ORG--NAME/{refs/main, snapshots/COMMIT/...}), as `hf download` leaves it; returns hf_home."""
    import shutil

    commit = "0" * 40
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    return Path(hf_home)


@contextlib.contextmanager
def token_service(root: Path, token: str, models_root: str, *extra_args: str):
    """A training service process on a free port with a clean data dir under `root`, the clients' `token`
    read from a file, and models allowed under `models_root`; yields (url, data dir, log file). On exit the
    service is stopped and any process naming its data dir is killed."""
    (root / "token").write_text(token)
    with _service(root, ["--api-token-file", str(root / "token")], models_root, *extra_args) as started:
        yield started


@contextlib.contextmanager
def users_service(root: Path, users: dict[str, tuple[str, str, dict]], models_root: str, *extra_args: str):
    """As token_service, with users instead of one token: `users` maps a name to (role, key, limits), written
    as an --api-keys-file holding each key's SHA-256 only."""
    import hashlib

    import yaml

    entries = [{"name": name, "role": role, "key_sha256": hashlib.sha256(key.encode()).hexdigest(), "limits": limits}
               for name, (role, key, limits) in users.items()]
    (root / "keys.yaml").write_text(yaml.safe_dump({"users": entries}))
    with _service(root, ["--api-keys-file", str(root / "keys.yaml")], models_root, *extra_args) as started:
        yield started


@contextlib.contextmanager
def _service(root: Path, auth_args: list[str], models_root: str, *extra_args: str):
    data = root / "data"
    port = free_port()
    log = root / "service.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "providers.remote_fsdp.service.app", "--port", str(port), "--data-dir", str(data),
             *auth_args, "--allowed-model-root", models_root, *extra_args],
            cwd=Path(__file__).resolve().parent.parent, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, timeout=120, proc=proc, path="/health", log_file=log)
        yield url, data, log
    finally:
        stop_process_group(proc)
        kill_pids([pid for pid, _ in processes_mentioning(str(data))])
