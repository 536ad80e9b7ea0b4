"""Faults between nodes (issue 21), on one two-node cluster in network namespaces (tests/test_multinode.py's
Network): a partition mid-job, a worker node stopped whole (SIGSTOP) mid-job, and a coordinator that dies and
restarts during a multi-node job. Each must end in a truthful job state on both sides, with no rank left
running anywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from helpers import processes_mentioning, stop_process_group, wait_until
from test_multinode import HTTP, Network, _ok, body, start_service, status, two_services, wait_done

pytestmark = pytest.mark.slow  # two services in network namespaces, training

PROGRESS_TIMEOUT_S = 30  # each job's watchdog; the nodes' --down-after-s is 4 (test_multinode.start_service)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, toy_data):
    net = Network()
    if not net.namespaces:
        pytest.skip(f"a partition needs network namespaces: {net.kind}")
    try:
        with two_services(tmp_path_factory.mktemp("faults-cluster"), net, toy_data, 18432, 18433) as c:
            yield c
    finally:
        net.destroy()


def long_job(job_uuid: str, model: str) -> dict:
    job = body(job_uuid, model, nnodes=2, nproc=1, steps=25, epochs=200)
    job["training_config"]["scheduling"] = {"progress_timeout_s": PROGRESS_TIMEOUT_S}
    return job


def submit_and_wait_for_training(url: str, job: dict) -> None:
    r = HTTP.post(url + "/v1/post-training/supervised-fine-tune", json=job, timeout=60)
    assert r.status_code == 200, r.text
    wait_until(lambda: (status(url, job["job_uuid"])["resources_allocated"].get("step") or 0) >= 2, 300,
               message="both nodes training")


def part_state(data_dir, job_uuid: str) -> dict:
    """A node's own record of its part of a job (its status file)."""
    return json.loads((data_dir / "runs" / job_uuid / "status.json").read_text())


def no_process_of(cluster, job_uuid: str) -> bool:
    return all(processes_mentioning(str(d / "runs" / job_uuid)) == [] for d in cluster["dirs"].values())


def node_states(url: str) -> dict[str, str]:
    return {n["node_id"]: n["state"] for n in HTTP.get(url + "/v1/nodes", timeout=10).json()["data"]}


def assert_fails_naming_node_b(url: str, job_uuid: str, t_fault: float, fault: str) -> None:
    """The coordinator fails the job, naming node-b, within the progress timeout of the fault at `t_fault`."""
    final = wait_done(url, job_uuid, timeout=PROGRESS_TIMEOUT_S + 60)
    detect_s = time.monotonic() - t_fault
    error = final["resources_allocated"]["error"]
    print(f"\n{fault}: coordinator says {final['status']} after {detect_s:.1f} s: {error[:200]}")
    assert final["status"] == "failed" and "node-b" in error, error
    assert detect_s < PROGRESS_TIMEOUT_S


def test_a_partition_fails_the_job_on_both_sides_and_the_node_takes_work_when_it_heals(cluster, tiny_models):
    url, dirs, net = cluster["url"], cluster["dirs"], cluster["net"]
    submit_and_wait_for_training(url, long_job("split", tiny_models["student"]))
    link = ["ip", "-n", net.namespaces[1], "link", "set", net.ifname["b"]]
    subprocess.run([*link, "down"], check=True)
    t_cut = time.monotonic()
    try:
        assert_fails_naming_node_b(url, "split", t_cut, "partition")
        # Each side stops its own ranks: node B cannot be told (it is cut off), so it stops its part itself.
        wait_until(lambda: no_process_of(cluster, "split"), 60, message="no rank left on either side")
        stopped_s = time.monotonic() - t_cut
        b = wait_until(lambda: (s := part_state(dirs["b"], "split"))["state"] not in ("scheduled", "in_progress")
                       and s, 30, message="node B's record of its part ended")
        print(f"partition: node B's part {b['state']}: {b.get('error')}; every rank gone {stopped_s:.1f} s after the cut")
        assert b["state"] == "failed" and "lost contact with the coordinator" in b["error"], b
        assert node_states(url)["node-b"] == "down"
    finally:
        subprocess.run([*link, "up"], check=True)
    t_heal = time.monotonic()
    wait_until(lambda: node_states(url) == {"node-a": "up", "node-b": "up"}, 60, message="node B up again")
    print(f"partition healed: node-b up after {time.monotonic() - t_heal:.1f} s")
    assert status(url, "split")["status"] == "failed"  # no job ended in another state on the way
    job = body("after-split", tiny_models["student"], nnodes=2, nproc=1, steps=2)
    assert HTTP.post(url + "/v1/post-training/supervised-fine-tune", json=job, timeout=60).status_code == 200
    done = wait_done(url, "after-split", timeout=300)
    assert done["status"] == "completed", done["resources_allocated"].get("error")
    # Completed is shown only once node B's part said it completed too.
    assert [n.get("status") for n in done["resources_allocated"]["nodes"]] == ["completed", "completed"]
    assert part_state(dirs["b"], "after-split")["state"] == "completed"


def node_processes(service_pid: int, data_dir) -> list[int]:
    """A node's service and every process it started (the zygote, torchrun, the ranks: its descendants),
    plus any process naming its data dir."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [service_pid]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return sorted(found | {pid for pid, _ in processes_mentioning(str(data_dir))})


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def test_a_stopped_worker_node_fails_the_job_and_stops_its_own_ranks_when_it_continues(cluster, tiny_models):
    """SIGSTOP of node B's whole service and ranks (hung, not dead): the coordinator fails the job once B misses
    its heartbeats and stops its own ranks; its cancel for B's part goes unanswered, so when B continues it
    learns from its coordinator that the job is over and stops its part; B is up again and takes new work."""
    url, dirs, procs = cluster["url"], cluster["dirs"], cluster["procs"]
    log_a = dirs["a"].parent / "service-a.log"
    submit_and_wait_for_training(url, long_job("stall", tiny_models["student"]))
    frozen = node_processes(procs["b"].pid, dirs["b"])
    assert len(frozen) > 2, frozen  # the service and at least its part's torchrun and rank
    signal_all(frozen, signal.SIGSTOP)
    t_stop = time.monotonic()
    try:
        assert_fails_naming_node_b(url, "stall", t_stop, "node B stopped")
        wait_until(lambda: processes_mentioning(str(dirs["a"] / "runs" / "stall")) == [], 30,
                   message="the coordinator's own ranks stopped")
        print(f"node B stopped: the coordinator's ranks gone {time.monotonic() - t_stop:.1f} s after the stop")
        # No cancel reaches a stopped node: B must find out that the job is over once it runs again.
        wait_until(lambda: "job stall: node node-b is down; it stops its part" in log_a.read_text(errors="replace"), 30,
                   message="the coordinator left node B's part to its next heartbeat")
        assert processes_mentioning(str(dirs["b"] / "runs" / "stall"))  # still there, frozen
    finally:
        signal_all(frozen, signal.SIGCONT)
    t_cont = time.monotonic()
    wait_until(lambda: no_process_of(cluster, "stall"), 60, message="no rank left on either node")
    gone_s = time.monotonic() - t_cont
    b = wait_until(lambda: (s := part_state(dirs["b"], "stall"))["state"] not in ("scheduled", "in_progress") and s,
                   30, message="node B's record of its part ended")
    print(f"node B continued: its part {b['state']} ({b.get('error')}); every rank gone {gone_s:.1f} s after "
          f"SIGCONT ({time.monotonic() - t_stop:.1f} s after the stop)")
    assert b["state"] == "failed", b  # a part of a failed job, not a user's cancel
    wait_until(lambda: node_states(url) == {"node-a": "up", "node-b": "up"}, 30, message="node B up again")
    assert status(url, "stall")["status"] == "failed"  # never `completed`, whatever node B said later
    job = body("after-stall", tiny_models["student"], nnodes=2, nproc=1, steps=2)
    assert HTTP.post(url + "/v1/post-training/supervised-fine-tune", json=job, timeout=60).status_code == 200
    done = wait_done(url, "after-stall", timeout=300)
    assert done["status"] == "completed", done["resources_allocated"].get("error")


def test_a_coordinator_that_dies_mid_job_leaves_no_rank_on_any_node_when_it_restarts(cluster, tiny_models):
    """kill -9 of the coordinator's service (its ranks run on, in their own process group), then a restart:
    it follows the job again, or fails it and stops every part; no rank is ever orphaned."""
    url, dirs, net, procs = cluster["url"], cluster["dirs"], cluster["net"], cluster["procs"]
    submit_and_wait_for_training(url, long_job("restart", tiny_models["student"]))
    port = int(url.rsplit(":", 1)[1])
    os.killpg(procs["a"].pid, signal.SIGKILL)
    procs["a"].wait(timeout=30)
    t_kill = time.monotonic()
    procs["a"] = start_service(net, "a", port, dirs["a"], None, ["--allowed-checkpoint-root", str(cluster["shared"])])
    wait_until(lambda: _ok(url + "/health"), 120, message="coordinator up again")
    final = wait_done(url, "restart", timeout=240)
    detect_s = time.monotonic() - t_kill
    error = final["resources_allocated"].get("error")
    print(f"\ncoordinator kill -9 + restart: {final['status']} {detect_s:.1f} s after the kill: {str(error)[:300]}")
    wait_until(lambda: no_process_of(cluster, "restart"), 60, message="no rank left on either node")
    b = part_state(dirs["b"], "restart")
    print(f"node B's part: {b['state']}: {b.get('error')}")
    if final["status"] == "completed":  # re-attached, and every part completed
        assert b["state"] == "completed"
    else:
        assert final["status"] == "failed" and b["state"] in ("failed", "cancelled"), (final, b)
    # The graceful restart (SIGTERM): the coordinator stops every node's part before it exits.
    wait_until(lambda: node_states(url) == {"node-a": "up", "node-b": "up"}, 60, message="both nodes up")
    submit_and_wait_for_training(url, long_job("restart-term", tiny_models["student"]))
    os.killpg(procs["a"].pid, signal.SIGTERM)
    procs["a"].wait(timeout=60)
    wait_until(lambda: no_process_of(cluster, "restart-term"), 30, message="no rank left after a clean stop")
    b = part_state(dirs["b"], "restart-term")
    print(f"coordinator SIGTERM: node B's part {b['state']}: {b.get('error')}")
    assert b["state"] in ("failed", "cancelled")
    procs["a"] = start_service(net, "a", port, dirs["a"], None, ["--allowed-checkpoint-root", str(cluster["shared"])])
    wait_until(lambda: _ok(url + "/health"), 120, message="coordinator up again")
    final = wait_done(url, "restart-term", timeout=120)
    assert final["status"] == "failed" and "shut down" in final["resources_allocated"]["error"], final


def test_a_coordinator_restarted_within_the_workers_grace_follows_the_job_to_completion(cluster, tiny_models):
    """kill -9 of the coordinator mid-job and a restart before node B gives up on it: the restarted coordinator
    follows node 0's part (still running in its own process group) and node B's again, and the job completes
    on both nodes. Node B is restarted first with a grace longer than the coordinator's restart (and keeps it:
    this test runs last in the module)."""
    url, dirs, net, procs = cluster["url"], cluster["dirs"], cluster["net"], cluster["procs"]
    port_a = int(url.rsplit(":", 1)[1])
    shared = ["--allowed-checkpoint-root", str(cluster["shared"])]
    stop_process_group(procs["b"])
    wait_until(lambda: node_states(url)["node-b"] == "down", 30, message="node B gone")
    procs["b"] = start_service(net, "b", port_a + 1, dirs["b"], f"http://{net.a_addr}:{port_a}",
                               [*shared, "--down-after-s", "180"])
    wait_until(lambda: node_states(url) == {"node-a": "up", "node-b": "up"}, 120, message="node B up again")
    job = body("reattach", tiny_models["student"], nnodes=2, nproc=1, steps=25, epochs=16)
    submit_and_wait_for_training(url, job)
    os.killpg(procs["a"].pid, signal.SIGKILL)
    procs["a"].wait(timeout=30)
    t_kill = time.monotonic()
    procs["a"] = start_service(net, "a", port_a, dirs["a"], None, shared)
    wait_until(lambda: _ok(url + "/health"), 120, message="coordinator up again")
    shown = status(url, "reattach")
    print(f"\ncoordinator kill -9 + restart: answering {time.monotonic() - t_kill:.1f} s after the kill; the job is "
          f"{shown['status']} at step {shown['resources_allocated'].get('step')}")
    assert shown["status"] == "in_progress", shown["resources_allocated"].get("error")
    final = wait_done(url, "reattach", timeout=600)
    assert final["status"] == "completed", final["resources_allocated"].get("error")
    assert [n.get("status") for n in final["resources_allocated"]["nodes"]] == ["completed", "completed"]
    assert part_state(dirs["b"], "reattach")["state"] == "completed"
    wait_until(lambda: no_process_of(cluster, "reattach"), 30, message="no rank left on either node")
