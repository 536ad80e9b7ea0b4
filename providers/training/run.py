"""The training entry point: `python -m providers.training.run RUN_DIR`.

Reads RUN_DIR/spec.json, runs the method's recipe, and leaves the outcome in RUN_DIR/status.json.
The inline provider runs it as a plain process; the remote service runs it under torchrun.
"""

from __future__ import annotations

import os

PARENT = os.getppid()  # first, before any import: the torchrun agent that started this rank

import logging  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

from .optional_imports import leave_out  # noqa: E402
from .path_map import load_spec  # noqa: E402
from .plots import write_plots_quietly  # noqa: E402
from .run_files import RANK_RESERVE_BYTES, RunFiles, SpaceReserve, utc_now, writes_status  # noqa: E402
from .spec import JobSpec  # noqa: E402


def resources_used(spec: JobSpec) -> dict:
    """Device, precision and peak memory of this process, for the job's resources_allocated."""
    import resource

    import torch

    from .components import resolve_dtype
    from .devices import device_type

    precision, note = resolve_dtype(spec.dtype)
    used = {
        "device_type": device_type(),
        "precision": precision,
        "peak_host_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if note:
        used["precision_note"] = note
    from .efficiency import in_force

    used["efficiency"] = in_force(spec)
    if torch.cuda.is_available():
        used["peak_device_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if spec.fsdp is not None:
        from .fsdp import options_in_force, world

        used["world_size"] = world()[2]
        used["fsdp"] = options_in_force(spec)
    return used


def redirect_rank_output(files: RunFiles) -> None:
    """Under torchrun each rank writes its own log, logs/rank{RANK}.log (torchrun's own output stays in
    logs/train.log), a line at a time: what a rank printed before it died is on disk."""
    files.logs.mkdir(parents=True, exist_ok=True)
    fd = os.open(files.logs / f"rank{os.environ['RANK']}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


def start_heartbeat(files: RunFiles, spec: JobSpec) -> None:
    """Touch RUN_DIR/ranks/rank{RANK}.alive every few seconds from a thread: a stopped or frozen rank (SIGSTOP,
    a dead NFS mount, swap storm) stops beating and the service's watchdog fails the job. A rank stuck in a
    collective keeps beating; the collective's timeout (progress timeout + 60 s) ends that case."""
    if "RANK" not in os.environ:
        return
    import threading
    import time

    from .run_files import progress_timeout_s

    interval = max(1.0, min(10.0, progress_timeout_s(spec.scheduling.progress_timeout_s) / 5))
    path = files.heartbeat(os.environ["RANK"])

    def beat() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{os.getpid()}\n")  # which process is this rank (operators, the fault tests)
        except OSError:
            pass
        while True:
            try:
                path.touch()
            except OSError:
                pass  # a full disk: touching needs no space once the file exists
            time.sleep(interval)

    threading.Thread(target=beat, daemon=True, name="heartbeat").start()


def describe_error(e: BaseException, spec: JobSpec, files: RunFiles) -> str:
    """The error as status.json shows it; a full disk (whatever layer reported it: OSError 28, torch's
    'file write failed', safetensors) says 'no space left on device' and names the directory."""
    from .run_files import no_space_left

    error = f"{type(e).__name__}: {e}"
    full = no_space_left([spec.checkpoint.output_dir, files.dir])
    if full or getattr(e, "errno", None) == 28:
        return f"{full or 'no space left on device'}: {error}"
    return error


def die_with_parent(parent: int) -> None:
    """Under torchrun, have the kernel SIGKILL this rank when its torchrun agent dies. torchrun starts ranks
    in their own sessions, so when a scheduler kills the agent (Ray stopping a node, Slurm, a SIGKILL) the
    ranks would live on as orphans holding memory and devices."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}", file=sys.stderr)
    if os.getppid() != parent:  # the agent died before the request took effect
        os._exit(1)


def main(run_dir: str) -> int:
    die_with_parent(PARENT)
    files = RunFiles(run_dir)
    if "RANK" in os.environ and "LOCAL_RANK" in os.environ:
        redirect_rank_output(files)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    leave_out()  # before the training stack's imports: what the job uses is brought back where it is used
    spec = load_spec(run_dir)  # its paths as this host mounts them
    # Kept back while the run goes well, given up when it fails: on a full disk its traceback, status.json and
    # rank report still reach disk.
    reserve = SpaceReserve(files.rank_reserve(os.environ.get("RANK", "0")), RANK_RESERVE_BYTES)
    reserve.make()
    start_heartbeat(files, spec)
    is_main = writes_status()
    if is_main:
        files.update_status(state="starting", process_started_at=utc_now(), pid=os.getpid(), error=None)
    try:
        if spec.fsdp is not None:
            from .fsdp import init_distributed

            init_distributed(spec)
        import importlib

        from transformers import set_seed

        from .methods import recipe_module

        # Before any model exists: TRL wraps PEFT adapters (random init) before Trainer seeds itself, and a
        # job forked from the preloaded process would otherwise start from that process's RNG state.
        set_seed(spec.seed)
        recipe = importlib.import_module(recipe_module(spec.method))
        from .preload import freeze_imports

        # The imports out of later collections in a process not forked from a preloaded one (torchrun's ranks,
        # the inline provider's runs); in a forked one they are frozen already and this adds the job's set-up.
        freeze_imports()
        summary = recipe.train(spec, files)
    except BaseException as e:  # noqa: BLE001 - the error must reach status.json before the process dies
        reserve.release("the run failed")
        traceback.print_exc()
        sys.stderr.flush()
        error = describe_error(e, spec, files)
        if spec.fsdp is not None:
            from .fsdp import write_rank_report

            try:
                write_rank_report(files.ranks, error=error, failed_at=utc_now())
            except OSError:
                pass  # a full disk: the service finds the reason itself
        try:
            files.update_status(
                state="failed",
                finished_at=utc_now(),
                error=error + (f" (rank {os.environ['RANK']})" if "RANK" in os.environ else ""),
            )
        except OSError as write_error:
            print(f"could not record the failure in status.json: {write_error}", file=sys.stderr, flush=True)
        if spec.fsdp is not None:
            from .fsdp import shutdown_distributed

            shutdown_distributed(wait_for_peers=False)  # peers may be gone: a barrier could hang
        return 1
    reserve.release("the run completed")
    if spec.fsdp is not None:
        from .fsdp import shutdown_distributed, write_rank_report

        write_rank_report(files.ranks, finished_at=utc_now())
        shutdown_distributed()
    if is_main:
        write_plots_quietly(files.dir)  # RUN_DIR/plots/*.png, before the job reads as completed
        files.update_status(state="completed", finished_at=utc_now(), resources=resources_used(spec), **summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
