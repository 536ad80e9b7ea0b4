"""A process that will fork training processes: preload the training stack, then, in each forked child,
run the entry point as `python -m` would.

Shared by the job zygote (providers/jobs/zygote.py: one child per job) and one node's ranks
(local_ranks.py: one child per rank). It lives in the training core so that local_ranks.py, which runs
the training entry point, imports nothing from the job layer above it.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

from .methods import METHODS, recipe_module

# What a training job imports before its first step; importing them here is the whole point. Every method's
# recipe (the method table's), so that no job of a new method pays for the imports the zygote saves.
PRELOAD = (
    "torch",
    "transformers",
    "datasets",
    "accelerate",
    "peft",
    "trl",
    "providers.training.run",
    "providers.training.components",
    *(recipe_module(name) for name in METHODS),
)


def preload() -> str | None:
    """Import the training stack (PRELOAD); None when this process may fork afterwards, else why not."""
    import importlib

    from .optional_imports import leave_out

    leave_out()  # a job forked from here brings back what it uses (bitsandbytes for 4-bit, its loggers)
    # numpy's OpenBLAS workers and pyarrow's jemalloc background thread start at import, and so do scipy's own
    # OpenBLAS workers where scipy is installed (peft imports it when it can: lm-evaluation-harness brings it);
    # these libraries stop and restart them around fork (pthread_atfork). Any other thread after the imports
    # (torch's OpenMP or inter-op pools would only start with a torch op) means the process must not fork.
    import numpy  # noqa: F401
    import pyarrow  # noqa: F401

    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        pass

    baseline = _thread_count()
    for module in PRELOAD:
        importlib.import_module(module)
    from .plots import pyplot

    pyplot()  # every run draws its plots at its end: matplotlib's import was 1.0 s of each job's CPU
    freeze_imports()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return "CUDA was initialised while importing; refusing to fork"
    if _thread_count() > baseline:
        return f"{_thread_count() - baseline} threads started while importing; refusing to fork"
    return None


def freeze_imports() -> None:
    """Leave what the imports allocated out of every later garbage collection (gc.freeze): a collection walked
    all of it, 0.85 s of CPU at the end of each run (accelerate's free_memory calls gc.collect), and in a
    forked child touched every page of it, copying what the fork shared."""
    import gc

    gc.collect()
    gc.freeze()


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def set_threads_from_env() -> None:
    """torch's thread count from OMP_NUM_THREADS as it is now: OpenMP read the variable when torch was
    imported here, before a forked job set its own environment."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))


def run_as_main(args: list[str]) -> None:
    """`python -m MODULE ...` or `python -c CODE ...` (args: what follows the interpreter) in this forked
    process, as the interpreter would run it, then exit with its status. Never returns."""
    code = 1
    try:
        if args[0] == "-m":
            import runpy
            import warnings

            sys.argv = [args[1], *args[2:]]
            with warnings.catch_warnings():  # the module was preloaded; running it as __main__ is intended
                warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
                runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *args[2:]]
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 - what `python -c` does
        code = 0
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - report like an interpreter would, then exit
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()  # what interpreter exit runs (logging flush, libraries' handlers)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF if code >= 0 else 1)
