"""The cluster side of the service's `ray` launcher: one torchrun per node of a Ray cluster.

The service submits this module as a Ray job's entry point (providers/launchers/ray.py):

    python -m providers.remote_fsdp.ray_launch RUN_DIR --nnodes N --nproc-per-node P --cpus C --gpus G
        [--memory-gb M] [--rdzv-timeout-s T]

It reserves one placement-group bundle per node (STRICT_SPREAD), starts an actor in each, and every actor
runs torchrun with a static rendezvous (node rank = the actor's index) on the first actor's node, whose
store listens on that node's Ray address only; the ranks are `providers.training.run`
as everywhere else. When a node fails the others are stopped at once (as srun --kill-on-bad-exit does)
and the driver exits with that node's exit code; 0 when all succeed. Only this module imports Ray; the
training core does not know it runs under Ray.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..training import bound_store

SUBREAPER_FLAG = "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"


def die_with_actor() -> None:
    """torchrun's preexec_fn: the kernel SIGKILLs it when its actor dies (each rank does the same when its
    torchrun dies), so stopping or losing a node leaves no process behind."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


@ray.remote
class NodeRunner:
    """One node of the job: reports where it is, then runs that node's torchrun."""

    def address(self) -> tuple[str, int]:
        ip = ray.util.get_node_ip_address()
        with bound_store.listen_socket(ip, 0) as s:  # a port free on the address the store will listen on
            return ip, s.getsockname()[1]

    def run(self, argv: list[str], log_path: str) -> int:
        with open(log_path, "ab") as out:
            code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   preexec_fn=die_with_actor)
        return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it


def torchrun_argv(args: argparse.Namespace, node_rank: int, endpoint: str) -> list[str]:
    """Node `node_rank`'s torchrun: a static rendezvous (the actor's index is the node rank) whose store, on
    node 0, listens on that node's Ray address only (providers/training/bound_store.py)."""
    run_id = f"{Path(args.run_dir).name}-{endpoint.rsplit(':', 1)[1]}"
    return [*bound_store.torchrun_argv(sys.executable, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node,
                                       node_rank=node_rank, run_id=run_id, endpoint=endpoint,
                                       timeout_s=args.rdzv_timeout_s),
            "-m", "providers.training.run", args.run_dir]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m providers.remote_fsdp.ray_launch")
    p.add_argument("run_dir")
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--cpus", type=float, default=1.0)
    p.add_argument("--gpus", type=float, default=0.0)
    p.add_argument("--memory-gb", type=float)
    p.add_argument("--rdzv-timeout-s", type=int, default=60)
    args = p.parse_args(argv)
    if os.environ.get(SUBREAPER_FLAG, "").lower() in ("1", "true"):
        print(f"warning: {SUBREAPER_FLAG} is set: Ray may report this job SUCCEEDED when it failed; the service "
              "trusts the trainer's status.json over it", flush=True)
    logs = Path(args.run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ray.init(address="auto")
    bundle = {"CPU": args.cpus, **({"GPU": args.gpus} if args.gpus else {})}
    actor_resources = {"num_cpus": args.cpus, "num_gpus": args.gpus}
    if args.memory_gb:
        bundle["memory"] = actor_resources["memory"] = int(args.memory_gb * 2**30)
    pg = placement_group([bundle] * args.nnodes, strategy="STRICT_SPREAD")  # one bundle per node
    print(f"waiting for {args.nnodes} node(s) with {bundle} each", flush=True)
    while not ray.wait([pg.ready()], timeout=60)[0]:
        print(f"still waiting for {args.nnodes} node(s) with {bundle} each", flush=True)
    actors = [NodeRunner.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
                                 **actor_resources).remote() for i in range(args.nnodes)]

    def stop(*_):  # `ray job stop`: take the nodes' torchruns (and, through PDEATHSIG, their ranks) along
        for actor in actors:
            ray.kill(actor)
        os._exit(143)

    signal.signal(signal.SIGTERM, stop)
    addresses = ray.get([a.address.remote() for a in actors])
    endpoint = f"{addresses[0][0]}:{addresses[0][1]}"
    print(f"nodes {[ip for ip, _ in addresses]}, rendezvous on {endpoint}", flush=True)
    # Every node's torchrun appends to logs/train.log (as srun's tasks do): its failure summary names a
    # killed rank, whichever node it ran on.
    runs = {actor.run.remote(torchrun_argv(args, i, endpoint), str(logs / "train.log")): i
            for i, actor in enumerate(actors)}
    code, pending = 0, list(runs)
    while pending and not code:
        done, pending = ray.wait(pending, timeout=1.0)
        for ref in done:
            try:
                node_code = ray.get(ref)
            except ray.exceptions.RayError as e:  # the node (or its actor) was lost
                node_code, why = 1, f"{type(e).__name__}: {str(e).splitlines()[0]}"
            else:
                why = f"torchrun exited with code {node_code}"
            if node_code:
                print(f"node {runs[ref]} ({addresses[runs[ref]][0]}) failed: {why}", flush=True)
                code = code or node_code
    if code:  # as srun --kill-on-bad-exit: the failed node's torchrun summary names the root cause
        for actor in actors:
            ray.kill(actor)
    print(f"exit code {code}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
