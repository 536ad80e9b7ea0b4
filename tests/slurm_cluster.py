"""A two-node Slurm cluster on this one host, for the `slurm` launcher's end-to-end tests.

munged, slurmctld and two `slurmd -N` (nodes vm1 and vm2, both 127.0.0.1 on their own ports) with a
private slurm.conf, state and spool dirs under a temp dir: nothing in /etc/slurm is touched and every
daemon is stopped at the end. The Slurm commands find the cluster through SLURM_CONF. The Debian
packages (slurmctld slurmd slurm-client munge) are installed by scripts/install-slurm.sh.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from helpers import free_port

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol")


def missing_commands() -> list[str]:
    return [c for c in DAEMONS if shutil.which(c) is None and not Path("/usr/sbin", c).exists()]


def _which(cmd: str) -> str:
    return shutil.which(cmd) or str(Path("/usr/sbin", cmd))


SLURM_CONF = """\
ClusterName=trltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
MinJobAge=600
KillWait=2
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=vm1 NodeHostname={host} NodeAddr=127.0.0.1 Port={port1} CPUs=2 RealMemory=8000 State=UNKNOWN
NodeName=vm2 NodeHostname={host} NodeAddr=127.0.0.1 Port={port2} CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=vm1,vm2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> SlurmCluster:
        for d in ("state", "spool/vm1", "spool/vm2"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(SLURM_CONF.format(
            host=socket.gethostname(), root=self.root, ctld_port=free_port(), slurmd_port=free_port(),
            port1=free_port(), port2=free_port()))
        self._start_munge()
        self._spawn([_which("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf)], "slurmctld")
        for node in ("vm1", "vm2"):
            self._spawn([_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)], f"slurmd-{node}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            if states.get("vm1") == "idle" and states.get("vm2") == "idle":
                return self
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}: {self.logs()}")
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes not idle after {timeout}s: {r.stdout} {r.stderr} {self.logs()}")

    def _start_munge(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "-c", "-f"], check=True)
            shutil.chown(key, "munge", "munge")
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        # munged refuses to run as root; it forks into the background and we stop it by its pid file
        subprocess.run(["runuser", "-u", "munge", "--", _which("munged")], check=True)
        self._munged_started = True

    def _spawn(self, argv: list[str], name: str) -> None:
        out = open(self.root / f"{name}.out", "ab")
        self.procs.append(subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def logs(self) -> str:
        parts = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True)
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if getattr(self, "_munged_started", False):
            pid_file = Path("/run/munge/munged.pid")
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                except (ValueError, ProcessLookupError):
                    pass

    def squeue(self) -> str:
        return subprocess.run(["squeue", "-h", "-o", "%i %T %R"], env=self.env, capture_output=True, text=True).stdout
