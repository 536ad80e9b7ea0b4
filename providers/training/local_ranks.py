"""One node's ranks forked from this process: torchrun's work for a single node with a static rendezvous,
without a fresh interpreter per rank.

    python -m providers.training.local_ranks --nproc-per-node N --master-port P --run-id ID RUN_DIR

Under torchrun every rank is a new interpreter that imports torch, transformers, TRL and peft again (7-9 s
each on a quiet 2-core machine, all ranks at once). Here the agent imports the training stack once (or
already has it: the JobManager forks it from the preloaded zygote), checks that nothing it would hand on
(threads, a CUDA context) exists, and forks the N ranks. Each rank gets the environment torchrun gives
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, TORCHELASTIC_RUN_ID; OMP_NUM_THREADS=1 with several
ranks unless set) and runs `providers.training.run` as `python -m` would. As torchrun's agent does, this
agent holds the job's store and the ranks connect to it (TORCHELASTIC_USE_AGENT_STORE): it listens on the
master address only (127.0.0.1, see providers/training/bound_store.py), the ranks' gloo sockets on loopback.
What torchrun's agent does for a failed job, this does too: the first rank to fail stops the others
(SIGTERM, then SIGKILL after a grace period), its failure is printed in torchrun's "Root Cause" format
(which `RunFiles.killed_rank` reads) and the agent exits 1. Ranks stay in the agent's process group (cancel kills all of it) and die with the
agent (PR_SET_PDEATHSIG in `run.py`, as under torchrun).

When forking is not safe here it runs torchrun instead (exec), with the same arguments.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from datetime import UTC, datetime, timedelta

from . import bound_store

STORE_TIMEOUT_S = 600  # torch's default for a store client's calls
GRACE_S = 15.0  # a failed job's other ranks get this long after SIGTERM (torchrun: 30 s), then SIGKILL


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="providers.training.local_ranks", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("run_dir")
    return p.parse_args(argv)


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    return [*bound_store.torchrun_argv(sys.executable, nnodes=1, nproc_per_node=args.nproc_per_node, node_rank=0,
                                       run_id=args.run_id, endpoint=f"{args.master_addr}:{args.master_port}",
                                       timeout_s=STORE_TIMEOUT_S),
            "-m", "providers.training.run", args.run_dir]


def rank_environment(args: argparse.Namespace, local_rank: int) -> dict[str, str]:
    n = str(args.nproc_per_node)
    env = {
        "RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "GROUP_RANK": "0", "ROLE_RANK": str(local_rank),
        "WORLD_SIZE": n, "LOCAL_WORLD_SIZE": n, "ROLE_WORLD_SIZE": n, "GROUP_WORLD_SIZE": "1",
        "ROLE_NAME": "default", "MASTER_ADDR": args.master_addr, "MASTER_PORT": str(args.master_port),
        "TORCHELASTIC_RUN_ID": args.run_id, "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_USE_AGENT_STORE": "True",  # the agent holds the store; no rank opens one
    }
    if args.nproc_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = "1"  # what torchrun sets with several ranks on a node; one rank keeps all cores
    return env


def run_rank(args: argparse.Namespace, local_rank: int, store_socket: socket.socket) -> None:
    """In the forked child: become rank `local_rank` and run the training entry point. Never returns."""
    from .preload import run_as_main, set_threads_from_env

    try:
        store_socket.close()  # the agent's
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.update(rank_environment(args, local_rank))
        bound_store.keep_on_loopback(os.environ)
        set_threads_from_env()
        if "setproctitle" in sys.modules:  # /proc names the run dir, as a torchrun rank's command line does
            sys.modules["setproctitle"].setproctitle(
                f"{sys.executable} -m providers.training.run {args.run_dir} (rank {local_rank})")
    except BaseException:  # noqa: BLE001 - report like an interpreter would, then exit
        import traceback

        traceback.print_exc()
        os._exit(1)
    run_as_main(["-m", "providers.training.run", args.run_dir])  # as __main__: run.py reads PARENT anew


def root_cause(rank: int, pid: int, code: int) -> str:
    """torchrun's failure summary for the first rank that failed (`RunFiles.killed_rank` parses it)."""
    if code < 0:
        name = signal.Signals(-code).name
        traceback = f"Signal {-code} ({name}) received by PID {pid}"
    else:
        traceback = f"exit code {code}: see logs/rank{rank}.log"
    return (f"{'=' * 60}\nproviders.training.run FAILED\n{'-' * 60}\nRoot Cause (first observed failure):\n[0]:\n"
            f"  time      : {datetime.now(UTC).isoformat(timespec='seconds')}\n"
            f"  host      : {socket.gethostname()}\n  rank      : {rank} (local_rank: {rank})\n"
            f"  exitcode  : {code} (pid: {pid})\n  error_file: <N/A>\n  traceback : {traceback}\n{'=' * 60}")


def supervise(ranks: dict[int, int]) -> int:
    """Wait for the ranks (pid -> rank). The first failure stops the others; returns the agent's exit code."""
    failed: tuple[int, int, int] | None = None  # (rank, pid, exit code)
    stopping_since: float | None = None
    stop_signal: list[int] = []

    def forward(signum, _frame):  # a scheduler or a user signalled the agent: the ranks go too
        stop_signal.append(signum)
        for pid in ranks:
            os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    while ranks:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if stopping_since is not None and time.monotonic() - stopping_since > GRACE_S:
                for other in ranks:
                    os.kill(other, signal.SIGKILL)
                stopping_since = float("inf")
            time.sleep(0.05)
            continue
        rank = ranks.pop(pid, None)
        if rank is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and failed is None and not stop_signal:
            failed = (rank, pid, code)
            print(f"[local_ranks] rank {rank} (pid {pid}) failed with exit code {code}; stopping the others",
                  file=sys.stderr, flush=True)
            for other in ranks:
                os.kill(other, signal.SIGTERM)
            stopping_since = time.monotonic()
    if stop_signal:
        return 128 + stop_signal[0]
    if failed is not None:
        print(root_cause(*failed), file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from .preload import preload

    try:
        import setproctitle  # noqa: F401 - lets each rank name itself in /proc
    except ImportError:
        pass
    why = preload()
    if why:
        print(f"[local_ranks] cannot fork ranks here ({why}); running torchrun", file=sys.stderr, flush=True)
        os.execv(sys.executable, torchrun_argv(args))
    started = time.monotonic()
    # Bound before the forks (the port is the job's), served after them: the store's server is a thread.
    store_socket = bound_store.listen_socket(args.master_addr, args.master_port)
    sys.stdout.flush()
    sys.stderr.flush()
    ranks = {}
    for local_rank in range(args.nproc_per_node):
        pid = os.fork()
        if pid == 0:
            run_rank(args, local_rank, store_socket)
        ranks[pid] = local_rank
    store = bound_store.server_store(store_socket, timedelta(seconds=STORE_TIMEOUT_S))
    print(f"[local_ranks] {args.nproc_per_node} ranks forked in {time.monotonic() - started:.2f}s: "
          f"{', '.join(f'rank {r} pid {p}' for p, r in ranks.items())}", flush=True)
    code = supervise(ranks)
    del store  # served the ranks until they ended
    return code


if __name__ == "__main__":
    sys.exit(main())
