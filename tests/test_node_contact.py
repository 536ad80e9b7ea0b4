"""A worker's contact with its coordinator and the registry after a restart, without services (fast tier):
a worker that cannot reach its coordinator for lost_after_s says so on every beat until it can again; nodes
loaded from the registry file get down_after_s from the load to send a heartbeat (a restart is not a
missed heartbeat). The end-to-end faults: tests/test_faults_multinode.py."""

from __future__ import annotations

import time

from helpers import free_port, wait_until

from providers.remote_fsdp.service.nodes import Capabilities, HeartbeatSender, Node, NodeRegistry, Registration
from providers.state_files import save_state


def test_a_worker_that_cannot_reach_its_coordinator_reports_the_silence():
    silences: list[float] = []
    registration = Registration(node_id="w", url="http://127.0.0.1:1", capabilities=Capabilities(cpu_cores=1, ram_gb=1))
    sender = HeartbeatSender(f"http://127.0.0.1:{free_port()}", registration, {}, lambda: 0, interval_s=0.02,
                             lost_after_s=0.2, on_lost=silences.append)
    sender.start()
    try:
        wait_until(lambda: len(silences) >= 2, 5, message="two reports of the silence")
    finally:
        sender.stop.set()
        sender.join(timeout=5)
    assert all(s > 0.2 for s in silences) and silences == sorted(silences)


def test_nodes_loaded_after_a_restart_have_down_after_s_to_beat(tmp_path):
    path = tmp_path / "nodes.json"
    caps = Capabilities(cpu_cores=1, ram_gb=1)
    save_state(path, [Node(node_id="b", url="http://127.0.0.1:2", capabilities=caps,
                           last_heartbeat=time.time() - 3600).model_dump()])
    local = Node(node_id="a", url="http://127.0.0.1:1", capabilities=caps)
    registry = NodeRegistry(path, local, down_after_s=0.3)
    assert registry.get("b").state == "up"  # its last beat is an hour old, but this registry just started
    wait_until(lambda: registry.get("b").state == "down", 5, message="b down after down_after_s")
