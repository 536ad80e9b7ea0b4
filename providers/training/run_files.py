"""The files of a run directory: what the training process writes and the API layer reads.

RUN_DIR/
  spec.json       the JobSpec
  train.jsonl     normalized training rows (validation.jsonl when given)
  status.json     state, timestamps, totals, error, checkpoints (rewritten atomically)
  metrics.jsonl   one line per logged step
  logs/           process logs (rank logs under torchrun)
  checkpoints/    Hugging Face checkpoints (unless the job named another directory)
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .path_map import PathMap


RUN_STARTED = "=== run"
DEFAULT_PROGRESS_TIMEOUT_S = 300  # the service's --progress-timeout-s default: the limit until a job's pace is known
PROGRESS_FLOOR_S = 60  # a pace-derived limit is never shorter: heartbeats beat every 10 s, a loaded host delays them
PROGRESS_STEPS = 10  # once the pace is known, a rank may go this many step times without a heartbeat
RANK_RESERVE_BYTES = 256 << 10  # what a rank keeps back for its traceback, status.json and rank report


def progress_timeout_s(scheduling_timeout: int | None) -> int:
    """Seconds a rank may go without progress before the job fails: the job's own
    training_config.scheduling.progress_timeout_s, else the service's (TRL_PROGRESS_TIMEOUT_S in the job's env)."""
    if scheduling_timeout:
        return int(scheduling_timeout)
    try:
        return int(float(os.environ.get("TRL_PROGRESS_TIMEOUT_S", DEFAULT_PROGRESS_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_PROGRESS_TIMEOUT_S


def progress_limit(files: RunFiles, job_timeout: int | None, service_timeout: int) -> tuple[int, str]:
    """(seconds, why) a rank of the job may go without a heartbeat: the job's own progress_timeout_s; else,
    once its pace is known, PROGRESS_STEPS step times within [PROGRESS_FLOOR_S, the service's limit]; else
    the service's limit (--progress-timeout-s), while the model loads and the first steps run."""
    if job_timeout:
        return int(job_timeout), "training_config.scheduling.progress_timeout_s"
    step_s = files.step_time_s()
    if step_s is None:
        return service_timeout, "the service's --progress-timeout-s (the job's step time is not known yet)"
    floor = min(PROGRESS_FLOOR_S, service_timeout)
    limit = int(min(service_timeout, max(floor, PROGRESS_STEPS * step_s)))
    return limit, (f"{PROGRESS_STEPS} x the job's step time ({step_s:.2f} s), at least {floor} s, at most "
                   f"--progress-timeout-s ({service_timeout} s)")


def no_space_left(directories: list[str | Path], min_free: int = 1 << 20) -> str | None:
    """'no space left on device in DIR (N bytes free)' for the first of `directories` whose file system has
    less than `min_free` bytes left, else None."""
    for directory in directories:
        path = Path(directory)
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            st = os.statvfs(path)
        except OSError:
            continue
        free = st.f_bavail * st.f_frsize
        if free < min_free:
            return f"no space left on device in {directory} ({free} bytes free of {st.f_blocks * st.f_frsize})"
    return None


def writes_status() -> bool:
    """Whether this process writes the job's status.json: global rank 0 when the run dir is shared by every
    node (Slurm, Ray: TRL_SHARED_RUN_DIR=1), else each node's local rank 0 (a single process, or the
    `nodes` launcher, where every node keeps its own run dir)."""
    if os.environ.get("TRL_SHARED_RUN_DIR") == "1":
        return int(os.environ.get("RANK", "0")) == 0
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


def write_atomically(path: Path, text: str) -> None:
    """Write `path` through a temp file and a rename, so readers never see half of it; a failed write (a full
    disk) leaves the old file and no temp file."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class SpaceReserve:
    """A file holding `size` bytes of a file system back, given up when a write that must reach disk (a job's
    end and its cause) finds the disk full, and made again once there is room: a ballast file (CockroachDB's
    EMERGENCY_BALLAST is one). posix_fallocate takes real blocks (glibc writes zeros where the file system
    cannot allocate)."""

    def __init__(self, path: str | Path, size: int):
        self.path = Path(path)
        self.size = size
        self.released_because: str | None = None  # why it was given up, until it is made again

    def make(self) -> bool:
        """Take the space unless that would leave less than `size` free besides; True if it is held now."""
        try:
            if self.path.exists() and self.path.stat().st_blocks * 512 >= self.size:
                self.released_because = None
                return True
            self.path.parent.mkdir(parents=True, exist_ok=True)
            st = os.statvfs(self.path.parent)
            if st.f_bavail * st.f_frsize < 2 * self.size:
                return False
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
        except OSError:
            self.path.unlink(missing_ok=True)
            return False
        self.released_because = None
        return True

    def release(self, because: str) -> bool:
        """Give the space back to the file system; True if there was any to give."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        self.released_because = because
        return True


class RunFiles:
    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.spec = self.dir / "spec.json"
        self.status = self.dir / "status.json"
        self.metrics = self.dir / "metrics.jsonl"
        self.logs = self.dir / "logs"
        self.log = self.logs / "train.log"
        self.ranks = self.dir / "ranks"
        self.pause_request = self.dir / "pause.request"  # the service asks for a checkpoint, then stops the run
        self.pause_saved = self.dir / "pause.saved"  # the step of that checkpoint, once it is recorded
        # In a job whose hosts mount the shared volume elsewhere: paths are recorded as the service sees them.
        self.paths = PathMap.from_env()

    def heartbeat(self, rank: int | str) -> Path:
        """The file rank `rank` touches while it makes progress (its mtime is the rank's last sign of life)."""
        return self.ranks / f"rank{rank}.alive"

    def stalled_rank(self, timeout_s: float) -> tuple[str, int] | None:
        """(rank, seconds) of a rank whose heartbeat is older than `timeout_s`, or None."""
        now = time.time()
        for path in sorted(self.ranks.glob("rank*.alive")):
            try:
                age = now - path.stat().st_mtime
            except OSError:
                continue
            if age > timeout_s:
                return path.name[len("rank"):-len(".alive")], int(age)
        return None

    def read_status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def update_status(self, **fields: Any) -> dict[str, Any]:
        """Merge fields into status.json; written to a temp file and renamed so readers never see half."""
        status = self.read_status()
        status.update(self.paths.tree_to_host(fields))
        write_atomically(self.status, json.dumps(status, indent=2, default=str))
        return status

    def add_checkpoint(self, checkpoint: dict[str, Any], keep: set[str] | None = None) -> None:
        """Record a checkpoint; `keep` (paths still on disk) drops records of rotated-out checkpoints."""
        checkpoint = self.paths.tree_to_host(checkpoint)
        keep = None if keep is None else {self.paths.to_host(p) for p in keep}
        checkpoints = [c for c in self.read_status().get("checkpoints", []) if c["path"] != checkpoint["path"]]
        if keep is not None:
            checkpoints = [c for c in checkpoints if c["path"] in keep]
        self.update_status(checkpoints=checkpoints + [checkpoint])

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def last_metrics(self, tail_bytes: int = 16384) -> list[dict[str, Any]]:
        """The newest records of metrics.jsonl (those in its last `tail_bytes`): cheap on a long run's file."""
        try:
            with open(self.metrics, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - tail_bytes))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return []
        records = []
        for line in lines[1:] if size > tail_bytes else lines:  # the first may be cut
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def step_time_s(self) -> float | None:
        """Seconds per optimizer step over the newest logged steps, the first logged step left out (it carries
        compilation and warm-up); None until three steps were logged."""
        first_seen: dict[int, float] = {}
        for r in self.last_metrics():
            if isinstance(r.get("step"), int) and isinstance(r.get("time"), (int, float)):
                first_seen.setdefault(r["step"], float(r["time"]))
        steps = sorted(first_seen.items())
        if len(steps) < 3 or steps[-1][0] <= steps[1][0]:
            return None
        return max(0.0, (steps[-1][1] - steps[1][1]) / (steps[-1][0] - steps[1][0]))

    def rank_reserve(self, rank: int | str) -> Path:
        """The space a rank keeps back for its failure report (see SpaceReserve)."""
        return self.ranks / f"rank{rank}.reserve"

    def drop_rank_reserves(self) -> None:
        """Remove the reserves of ranks that could not remove their own (killed)."""
        for path in self.ranks.glob("rank*.reserve"):
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a read-only disk: nothing to gain there
                pass

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        with open(self.metrics) as f:
            return [json.loads(line) for line in f if line.strip()]

    def tail_log(self, lines: int = 50) -> list[str]:
        """Last lines of the main log (rank 0's under torchrun)."""
        candidates = [self.log, *sorted(self.logs.glob("**/rank0*.log")), *sorted(self.logs.glob("**/*.log"))]
        for path in candidates:
            if path.exists():
                return path.read_text(errors="replace").splitlines()[-lines:]
        return []

    def rank_reports(self) -> list[dict[str, Any]]:
        """Per-rank reports of a torchrun job (params held, peak memory, error), by rank."""
        reports = []
        for path in self.ranks.glob("rank*.json"):
            try:
                reports.append(json.loads(path.read_text()))
            except json.JSONDecodeError:
                continue
        return sorted(reports, key=lambda r: r.get("rank", 0))

    def first_rank_error(self) -> str | None:
        """The error of the rank that failed first (the others usually fail because it did). A rank that was
        killed writes no report of its own: torchrun's "Root Cause" names it, and it comes first."""
        failed = [r for r in self.rank_reports() if r.get("error")]
        killed = self.killed_rank()
        earliest = min(failed, key=lambda r: r.get("failed_at", "")) if failed else None
        first = f"rank {earliest['rank']}: {earliest['error']}" if earliest else None
        if killed and not any(str(r.get("rank")) == killed[0] for r in failed):
            return f"rank {killed[0]} died: {killed[1]}" + (f"; then {first}" if first else "")
        return first

    def mark_run_start(self, attempt: int, launcher: str) -> None:
        """A line in logs/train.log where a run of the job begins (retries and resumes append to the log)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f:
            f.write(f"{RUN_STARTED} {attempt} ({launcher}) at {utc_now()} ===\n")

    def killed_rank(self) -> tuple[str, str] | None:
        """(rank, why) from torchrun's failure summary in logs/train.log when a rank of the latest run died by
        a signal."""
        try:
            text = self.log.read_text(errors="replace")[-50_000:]
        except OSError:
            return None
        text = text[text.rfind(RUN_STARTED) + 1:]  # this run's part of the log
        # Several torchruns (one per node) may append their summaries: the first that names a signal counts.
        for block in text.split("Root Cause (first observed failure)")[1:]:
            rank = re.search(r"rank\s*:\s*(\d+)", block)
            signal = re.search(r"traceback\s*:\s*(Signal \d+ \(\w+\)[^\n]*)", block)
            if rank and signal:
                return rank.group(1), signal.group(1).strip()
        return None
