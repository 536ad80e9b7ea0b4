"""Security finding 1 of issue 18: a job's rendezvous store, process-group store and gloo sockets must not be
reachable from the network. For every torch_run_config a client may send, while the job's ranks are up: every
TCP port that a process of the service listens on is bound to loopback (one node) or to the cluster address the
node was given (multi-node), never to a wildcard; and a peer in another network namespace that connects to
each of those ports through this host's non-loopback address is refused. A client's `rdzv_backend: "c10d"`
(torch's pickle-based dynamic rendezvous) is a 400 naming the field."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import stop_process_group, unused_subnets, wait_until
from test_fsdp_service import Service, sft_body
from conftest import kill_leftover_processes

pytestmark = pytest.mark.slow

PEER_CONNECT = """
import json, socket, sys
out = {}
for port in map(int, sys.argv[2:]):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((sys.argv[1], port))
        out[port] = "open"
    except ConnectionRefusedError:
        out[port] = "refused"
    except OSError as e:
        out[port] = type(e).__name__
    finally:
        s.close()
print(json.dumps(out))
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class Peer:
    """A host on this machine's network: a namespace joined to the root namespace by a veth pair. The root
    side (this host's non-loopback address, `host_addr`) is what a network peer reaches."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.ns, self.veth = f"trlsec{tag}", f"vs{tag}"
        (net,) = unused_subnets(1, 100, 250)  # 10.231.100-249.0/24: beside test_multinode's 0-99
        self.host_addr, self.peer_addr = f"10.231.{net}.1", f"10.231.{net}.2"
        sh("ip", "netns", "add", self.ns)
        try:
            sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", f"vp{tag}")
            sh("ip", "link", "set", f"vp{tag}", "netns", self.ns)
            sh("ip", "addr", "add", f"{self.host_addr}/24", "dev", self.veth)
            sh("ip", "-n", self.ns, "addr", "add", f"{self.peer_addr}/24", "dev", f"vp{tag}")
            sh("ip", "link", "set", self.veth, "up")
            sh("ip", "-n", self.ns, "link", "set", f"vp{tag}", "up")
            sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError:
            self.destroy()
            raise

    def connect(self, addr: str, ports: list[int]) -> dict[int, str]:
        """From the peer's namespace: "open", "refused" or the error of a TCP connect to each addr:port."""
        out = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", PEER_CONNECT, addr,
                              *map(str, ports)], capture_output=True, text=True, timeout=120, check=True)
        return {int(k): v for k, v in json.loads(out.stdout).items()}

    def destroy(self) -> None:
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


@pytest.fixture(scope="module")
def peer():
    try:
        p = Peer()
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"network namespaces unavailable here: {e}")
    yield p
    p.destroy()


@pytest.fixture(scope="module")
def service(tmp_path_factory, toy_data):
    svc = Service(tmp_path_factory.mktemp("rdzv") / "data")
    rows = "".join(json.dumps(r) + "\n" for r in toy_data["instruct"])
    assert svc.post("/v1/datasets/toy/rows", data=rows).status_code == 200
    yield svc
    svc.stop()
    kill_leftover_processes(svc.data_dir)


# -- what listens where ------------------------------------------------------------------------------------
def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _address(hexaddr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hexaddr)  # /proc/net/tcp*: 32-bit words in host (little-endian) order
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def listeners(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the processes hold, read in each one's own network
    namespace (/proc/PID/net/tcp{,6} joined with /proc/PID/fd)."""
    found = set()
    for pid in pids:
        try:
            inodes = set()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
            for table in ("tcp", "tcp6"):
                for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                    f = line.split()
                    if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                        addr, port = f[1].split(":")
                        found.add((pid, str(_address(addr)), int(port, 16)))
        except (FileNotFoundError, ProcessLookupError):
            continue  # the process ended meanwhile
    return sorted(found)


def is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def job_is_training(svc: Service, job_uuid: str) -> bool:
    status = svc.status(job_uuid)
    assert status["status"] in ("scheduled", "in_progress"), status
    return (status["resources_allocated"].get("step") or 0) >= 1


def long_job(job_uuid: str, model: str, torch_run: dict) -> dict:
    body = sft_body(job_uuid, model, nproc=torch_run.get("nproc_per_node", 2), steps=25)
    body["training_config"]["n_epochs"] = 40
    body["training_config"]["torch_run_config"] = torch_run
    return body


# -- one node: every option a client may set ----------------------------------------------------------------
@pytest.mark.parametrize("torch_run", [
    {},
    {"rank_start": "fork", "nproc_per_node": 2},
    {"rank_start": "torchrun", "nproc_per_node": 2},
    {"rank_start": "fork", "nproc_per_node": 1},
    {"rank_start": "torchrun", "nproc_per_node": 1},
    {"rdzv_backend": "static", "rank_start": "torchrun", "nproc_per_node": 2, "rdzv_timeout_s": 30},
], ids=["defaults", "fork-2", "torchrun-2", "fork-1", "torchrun-1", "static-torchrun-2"])
def test_a_one_node_job_listens_on_loopback_only(service, peer, tiny_models, torch_run):
    job = "rdzv-" + uuid.uuid4().hex[:8]
    r = service.post("/v1/post-training/supervised-fine-tune", json=long_job(job, tiny_models["student"], torch_run))
    assert r.status_code == 200, r.text
    try:
        wait_until(lambda: job_is_training(service, job), 300, interval=0.5, message=f"{job} trains")
        service_pids = {service.proc.pid}
        found = listeners(descendants(service.proc.pid))
        job_ports = [(pid, addr, port) for pid, addr, port in found if pid not in service_pids]
        assert job_ports, f"no listening socket found for the job's ranks: {found}"  # the store at least
        exposed = [(pid, addr, port) for pid, addr, port in found if not is_loopback(addr)]
        assert not exposed, f"{torch_run}: listening beyond loopback (pid, address, port): {exposed}"
        reached = {p: v for p, v in peer.connect(peer.host_addr, sorted({p for _, _, p in found})).items()
                   if v != "refused"}
        assert not reached, f"{torch_run}: a peer at {peer.peer_addr} reached {peer.host_addr} on {reached}"
    finally:
        service.post("/v1/post-training/job/cancel", json={"job_uuid": job})
        service.wait(job, timeout=120)


def test_a_client_choosing_c10d_gets_a_400_that_says_why(service, tiny_models):
    r = service.post("/v1/post-training/supervised-fine-tune",
                     json=long_job("rdzv-c10d", tiny_models["student"], {"rdzv_backend": "c10d"}))
    assert r.status_code == 400, r.text
    detail = r.text
    assert "training_config.torch_run_config.rdzv_backend" in detail and "c10d" in detail and "static" in detail
    assert not (service.runs_dir / "rdzv-c10d").exists()


# -- several nodes: the store binds the cluster address only -------------------------------------------------
@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, toy_data):
    from test_multinode import HTTP, Network, _ok, start_service

    net = Network()
    if not net.namespaces:
        pytest.skip(f"network namespaces unavailable: {net.kind}")
    root = tmp_path_factory.mktemp("rdzv-cluster")
    dirs = {h: root / h / "data" for h in "ab"}
    for d in dirs.values():
        d.parent.mkdir(parents=True)
    port_a, port_b = 18432, 18433
    procs = {"a": start_service(net, "a", port_a, dirs["a"], None)}
    url = f"http://{net.test_addr_of_a}:{port_a}"
    try:
        wait_until(lambda: _ok(url + "/health"), 120, message="coordinator up")
        procs["b"] = start_service(net, "b", port_b, dirs["b"], f"http://{net.a_addr}:{port_a}")
        wait_until(lambda: len([n for n in HTTP.get(url + "/v1/nodes", timeout=5).json()["data"]
                                if n["state"] == "up"]) == 2, 120, message="worker registered")
        rows = "".join(json.dumps(r) + "\n" for r in toy_data["instruct"])
        assert HTTP.post(url + "/v1/datasets/toy/rows", data=rows, timeout=30).status_code == 200
        yield {"url": url, "net": net, "procs": procs, "http": HTTP}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                stop_process_group(proc)
        for d in dirs.values():
            kill_leftover_processes(d)
        net.destroy()


def test_a_two_node_job_binds_its_store_to_the_cluster_address_only(two_nodes, tiny_models):
    """Node A has two links: the cluster's (net.a_addr, its --address) and the test's (net.test_addr_of_a).
    The job's store and gloo sockets on A listen on the cluster address (or loopback) only: a connect through the
    test's link is refused; and the job trains to the end."""
    url, net, http = two_nodes["url"], two_nodes["net"], two_nodes["http"]
    job = "rdzv-2n-" + uuid.uuid4().hex[:6]
    body = sft_body(job, tiny_models["student"], nproc=1, global_batch=8, steps=25)
    body["training_config"]["data_config"]["batch_size"] = 4
    body["training_config"]["n_epochs"] = 4
    body["training_config"]["torch_run_config"] = {"nnodes": 2, "nproc_per_node": 1, "launcher": "nodes"}
    r = http.post(url + "/v1/post-training/supervised-fine-tune", json=body, timeout=120)
    assert r.status_code == 200, r.text

    def status() -> dict:
        return http.get(url + "/v1/post-training/job/status", params={"job_uuid": job}, timeout=30).json()

    wait_until(lambda: (status()["resources_allocated"].get("step") or 0) >= 1, 300, interval=0.5,
               message=f"{job} trains")
    allowed = {"a": net.a_addr, "b": net.b_addr}
    ports = set()
    for host, proc in two_nodes["procs"].items():
        found = [x for x in listeners(descendants(proc.pid)) if x[0] != proc.pid]  # the service's own HTTP port
        wrong = [(pid, addr, port) for pid, addr, port in found if addr != allowed[host] and not is_loopback(addr)]
        assert not wrong, f"node {host} listens beyond {allowed[host]} and loopback: {wrong}"
        if host == "a":
            ports = {port for _, addr, port in found if addr == net.a_addr}
    assert ports, "node A's store listens on the cluster address"
    out = subprocess.run([sys.executable, "-c", PEER_CONNECT, net.test_addr_of_a, *map(str, sorted(ports))],
                         capture_output=True, text=True, timeout=120, check=True)
    reached = {p: v for p, v in json.loads(out.stdout).items() if v != "refused"}
    assert not reached, f"the job's ports on node A answered on {net.test_addr_of_a}: {reached}"
    final = wait_until(lambda: (s := status())["status"] not in ("scheduled", "in_progress") and s, 600,
                       interval=0.5, message=f"{job} finished")
    assert final["status"] == "completed", final
