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
    # The service builds its app after the registry (on a loaded machine: seconds); the jobs it follows again
    # ask for the nodes' states meanwhile. That time is not b's to beat in: its grace starts when the service
    # answers.
    time.sleep(0.6)
    assert registry.get("b").state == "up" and registry.live(heard=True) == [local]
    registry.answering()
    assert registry.get("b").state == "up"
    wait_until(lambda: registry.get("b").state == "down", 5, message="b down after down_after_s")


def test_a_worker_names_its_parts_in_each_heartbeat_and_stops_those_the_coordinator_says_ended():
    """The coordinator's answer to a heartbeat names the parts whose jobs ended there (a cancel sent while the
    worker was stopped or cut off may never have reached it): the worker hands them to on_ended."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    beats: list[dict] = []

    class Coordinator(BaseHTTPRequestHandler):
        def do_POST(self):
            beat = json.loads(self.rfile.read(int(self.headers["content-length"])))
            if self.path.endswith("/heartbeat"):
                beats.append(beat)
            ended = {u: "failed: node w is down" for u in beat.get("parts", []) if u == "gone"}
            answer = json.dumps({"ended_parts": ended}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Coordinator)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stopped: list[dict] = []
    registration = Registration(node_id="w", url="http://127.0.0.1:1", capabilities=Capabilities(cpu_cores=1, ram_gb=1))
    sender = HeartbeatSender(f"http://127.0.0.1:{server.server_port}", registration, {}, lambda: 2, interval_s=0.02,
                             parts=lambda: ["gone", "running"], on_ended=stopped.append)
    sender.start()
    try:
        wait_until(lambda: stopped, 5, message="the ended part handed to on_ended")
    finally:
        sender.stop.set()
        sender.join(timeout=5)
        server.shutdown()
    assert beats[0] == {"load": 2, "parts": ["gone", "running"]}
    assert stopped[0] == {"gone": "failed: node w is down"}
