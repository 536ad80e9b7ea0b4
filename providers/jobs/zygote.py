"""Job processes forked from a preloaded process (a "zygote"), instead of a fresh interpreter per job.

A fresh `python -m providers.training.run RUN_DIR` spends most of a short job importing torch,
transformers, TRL, peft and datasets (7-9 s on a 2-core machine). The zygote is a separate process,
started with a server's first job in each job environment (`python -m providers.jobs.zygote SOCKET`), that
imports the training stack and then only waits on a Unix socket. Not at the server's start: a server that
runs no job (or no job yet) holds no training stack in memory and spends no CPU importing it. It never runs a torch op, so no OpenMP/MKL thread
pool and no CUDA context exists when it forks (it checks, before it serves anything, that importing
started no thread beyond the fork-safe pools of numpy's OpenBLAS and pyarrow's jemalloc, and that CUDA
is not initialised). For each job it forks a child that:

- becomes the leader of its own session and process group (setsid: cancel kills all of it),
- lowers its priority (niceness), changes to the job's cwd, replaces its environment with the job's,
  points stdin at /dev/null and stdout/stderr at the job's log file (the server's open file, passed
  over the socket), and shows the job's command line in /proc (so a restarted server recognises it),
- inherits the other descriptors the server passed with the request (a Tinker base's channel to the
  service: providers/tinker_api/worker.py), their numbers in its TRL_PASSED_FDS variable,
- runs `-m MODULE args` (runpy, as `python -m` does) or `-c CODE`, and exits with its exit status.

The zygote reaps its children and reports each exit status over the job's connection; `ZygoteProcess`
turns that into the Popen interface the JobManager uses (pid, poll, wait, returncode). A job that crashes
(a segfault included) only ends its own process; if the zygote itself dies or cannot start, jobs are
started the usual way (subprocess.Popen), and the next job starts a new zygote. A server's first jobs wait in
its queue while the first zygote imports (JobManager._zygote_warming: started beside it they would import the
same stack again, for no earlier first step); this function never waits. When the server is gone
the zygote takes no new jobs and exits once its running jobs have ended (it stays their parent and reaps
them; like spawned jobs they run on, and a restarted server stops them). `TRL_JOB_ZYGOTE=0` turns the
zygote off.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..training.preload import PRELOAD, preload, run_as_main, set_threads_from_env

log = logging.getLogger("providers.jobs")

READY_TIMEOUT_S = 120.0
PASSED_FDS = "TRL_PASSED_FDS"  # a child's variable: the numbers of the descriptors passed to it (comma-separated)
MAX_PASSED_FDS = 4


# -- the server side -----------------------------------------------------------------------------------
class ZygoteProcess:
    """A job forked by the zygote, with the subprocess.Popen methods the JobManager uses."""

    def __init__(self, pid: int, conn: socket.socket, cwd: str, argv: list[str]):
        self.pid = pid
        self.args = argv
        self.returncode: int | None = None
        self._conn = conn
        self._cwd = cwd
        self._lock = threading.Lock()
        self._buffer = b""

    def _read_exit(self, timeout: float | None) -> None:
        """Read the zygote's exit report for this job (or notice that the zygote is gone). Another thread
        may be waiting for it already (the supervisor's wait() holds the lock for the job's lifetime):
        then a poll must not block, it answers from what is known."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return
        try:
            if self.returncode is not None:
                return
            deadline = None if timeout is None else time.monotonic() + timeout
            while b"\n" not in self._buffer:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([self._conn], [], [], left)
                if not ready:
                    return
                chunk = self._conn.recv(4096)
                if not chunk:  # the zygote died: follow the process itself
                    self._lost_zygote(deadline)
                    return
                self._buffer += chunk
            self.returncode = int(json.loads(self._buffer.split(b"\n", 1)[0])["returncode"])
            self._conn.close()
        finally:
            self._lock.release()

    def _lost_zygote(self, deadline: float | None) -> None:
        # The job was reparented and is reaped by init; its exit status is lost. status.json (written by
        # the training entry point in its run dir, the cwd) still says whether it completed.
        while _pid_running(self.pid):
            if deadline is not None and time.monotonic() >= deadline:
                return
            time.sleep(0.1)
        log.warning("zygote exited while job pid %d ran; its exit status comes from status.json", self.pid)
        try:
            state = json.loads((Path(self._cwd) / "status.json").read_text()).get("state")
        except (OSError, ValueError):
            state = None
        self.returncode = 0 if state == "completed" else 1
        self._conn.close()

    def poll(self) -> int | None:
        self._read_exit(timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._read_exit(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _pid_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


class Zygote:
    """One preloaded process for one job environment (started by the server, in its own session)."""

    def __init__(self, env: dict[str, str]):
        self.env = dict(env)
        self.dir = Path(tempfile.mkdtemp(prefix="trl-zygote-"))  # 0700: only this user can connect
        self.socket_path = self.dir / "zygote.sock"
        self.log_path = self.dir / "zygote.log"
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "providers.jobs.zygote", str(self.socket_path), str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True,
            )
        self.started = time.monotonic()

    def ready(self, timeout: float = READY_TIMEOUT_S) -> bool:
        """Whether the zygote has imported everything and listens, waiting up to `timeout` seconds (0: just
        look); False if it died or is still importing."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                return False
            if self.socket_path.exists():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def spawn(self, argv: list[str], stdout, cwd: str, env: dict[str, str], niceness: int = 0,
              pass_fds: tuple[int, ...] = ()) -> ZygoteProcess:
        """Fork a job; `stdout` is the open log file (stderr goes there too). The child inherits `pass_fds`
        too (their numbers in the child are in its PASSED_FDS variable), as subprocess.Popen's pass_fds."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(self.socket_path))
            request = json.dumps({"argv": argv, "cwd": cwd, "env": env, "niceness": niceness}).encode()
            socket.send_fds(conn, [len(request).to_bytes(8, "big") + request], [stdout.fileno(), *pass_fds])
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    raise ConnectionError("the zygote closed the connection before starting the job")
                reply += chunk
            answer = json.loads(reply)
            if "error" in answer:
                raise RuntimeError(answer["error"])
            return ZygoteProcess(int(answer["pid"]), conn, cwd, argv)
        except BaseException:
            conn.close()
            raise

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


_zygotes: dict[frozenset, Zygote] = {}
_zygotes_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get("TRL_JOB_ZYGOTE", "1") not in ("0", "false", "no")


def forkable(argv: list[str]) -> bool:
    """Commands the zygote runs as a fresh interpreter would: this interpreter with `-m` or `-c`."""
    return len(argv) >= 3 and argv[0] == sys.executable and argv[1] in ("-m", "-c")


def zygote_for(env: dict[str, str]) -> Zygote:
    """The zygote for this environment, started if needed (a job's environment is the zygote's own, so
    settings read at import time, such as OMP_NUM_THREADS or HF_HUB_OFFLINE, mean the same as in a
    fresh process)."""
    key = frozenset(env.items())
    with _zygotes_lock:
        z = _zygotes.get(key)
        if z is None or not z.alive():
            if z is not None:
                log.warning("job zygote exited (code %s); starting a new one. Its log:\n%s", z.proc.returncode,
                            z.log_tail())
                z.stop()
            if len(_zygotes) >= 4:  # environments changed: keep the newest few
                _zygotes.pop(next(iter(_zygotes))).stop()
            z = _zygotes[key] = Zygote(env)
        return z


def warming(env: dict[str, str]) -> Zygote | None:
    """The zygote of this job environment while it is still importing (started now if none runs), else None:
    jobs can start at once (it is ready, dead, or the zygote is off)."""
    if not enabled():
        return None
    z = zygote_for(env)
    return None if z.ready(timeout=0) or not z.alive() else z


def launch_job_process(argv: list[str], *, stdout, env: dict[str, str], cwd: str, niceness: int = 0,
                       **popen_kwargs: Any):
    """Start a job: forked from the zygote when it is ready, else subprocess.Popen(argv, stdout=...,
    env=..., cwd=..., **popen_kwargs) (which must put the job in its own session, as the zygote does).
    Never waits for a zygote that is still importing (the JobManager holds a server's first jobs back
    until it is ready): a job asked for meanwhile is spawned, so no request ever waits on it."""
    if enabled() and forkable(argv):
        z = zygote_for(env)
        if z.ready(timeout=0):
            try:
                return z.spawn(argv, stdout, cwd, env, niceness)
            except Exception as e:  # noqa: BLE001 - any zygote failure: start the job the usual way
                log.warning("job zygote failed to start a job (%s: %s); starting it as a new process. Zygote "
                            "log:\n%s", type(e).__name__, e, z.log_tail())
        elif z.alive():
            log.info("job zygote still importing (%.0fs); this job starts as a new process",
                     time.monotonic() - z.started)
    return subprocess.Popen(argv, stdout=stdout, env=env, cwd=cwd, **popen_kwargs)


@atexit.register
def _stop_all() -> None:
    for z in list(_zygotes.values()):
        z.stop()


# -- the zygote process ----------------------------------------------------------------------------------
def _recv_request(conn: socket.socket) -> tuple[dict, int, list[int]]:
    """A job's request, its log file's descriptor and the descriptors passed on to it."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 1 + MAX_PASSED_FDS)
    if not fds or len(data) < 8:
        for fd in fds:
            os.close(fd)
        raise ValueError("expected one request with its log file's descriptor")
    size = int.from_bytes(data[:8], "big")
    body = data[8:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("request cut short")
        body += chunk
    return json.loads(body), fds[0], fds[1:]


def _run_child(request: dict, log_fd: int, passed_fds: list[int]) -> None:
    """In the forked child: become the job, run it, exit. Never returns."""
    try:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if request.get("niceness"):
            os.nice(int(request["niceness"]))
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.chdir(request["cwd"])
        argv = request["argv"]
        if "setproctitle" in sys.modules:  # /proc/PID/cmdline names the run dir, as a spawned job's does
            sys.modules["setproctitle"].setproctitle(" ".join(argv))
        os.environ.clear()
        os.environ.update(request["env"])
        if passed_fds:
            os.environ[PASSED_FDS] = ",".join(map(str, passed_fds))
        set_threads_from_env()
    except BaseException:  # noqa: BLE001 - report like an interpreter would, then exit
        import traceback

        traceback.print_exc()
        os._exit(1)
    run_as_main(argv[1:])


def serve(socket_path: str, server_pid: int | None = None) -> None:
    """The zygote's main loop: import the training stack, check nothing forked would inherit threads or a
    CUDA context, then fork one child per request and report each child's exit status. `server_pid`: the
    server that started it (a server killed before this process asked for its parent left it an orphan
    from its first instruction on, and it waited for jobs forever)."""
    parent = server_pid if server_pid is not None else os.getppid()
    started = time.monotonic()
    try:
        import setproctitle  # noqa: F401 - must see the original environment: imported before any job changes it
    except ImportError:
        # Without it a forked job's /proc cmdline would not name its run dir, and a restarted server could
        # not recognise (and stop) it: jobs start as new processes instead.
        sys.exit("zygote: the setproctitle package is not installed; jobs start as new processes")
    why = preload()
    if why:
        sys.exit(f"zygote: {why}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = socket_path + ".tmp"
    listener.bind(tmp)
    listener.listen(64)
    os.replace(tmp, socket_path)  # the socket appears once it accepts connections: the server's "ready"
    print(f"zygote {os.getpid()}: preloaded {len(PRELOAD)} modules in {time.monotonic() - started:.1f}s", flush=True)
    conns: dict[int, socket.socket] = {}  # job pid -> its connection
    while True:
        if listener is not None and os.getppid() != parent:
            # The server is gone: take no new jobs, but stay the parent of the running ones until they end
            # (as spawned jobs, they run on; a restarted server stops them), so each is reaped here.
            listener.close()
            listener = None
            Path(socket_path).unlink(missing_ok=True)
        if listener is None and not conns:
            # The server died without stopping this zygote (SIGKILL): its temporary directory goes with it.
            if Path(socket_path).parent.name.startswith("trl-zygote-"):
                shutil.rmtree(Path(socket_path).parent, ignore_errors=True)
            break
        ready, _, _ = select.select([listener] if listener is not None else [], [], [], 0.05)
        if ready:
            conn, _ = listener.accept()
            try:
                request, log_fd, passed_fds = _recv_request(conn)
            except Exception as e:  # noqa: BLE001 - a bad request must not stop the zygote
                conn.sendall(json.dumps({"error": f"{type(e).__name__}: {e}"}).encode() + b"\n")
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in conns.values():
                    other.close()
                conn.close()
                _run_child(request, log_fd, passed_fds)
            for fd in (log_fd, *passed_fds):  # the child's alone: its peer sees EOF when it ends
                os.close(fd)
            conns[pid] = conn
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        while conns:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                conns.clear()
                break
            if pid == 0:
                break
            conn = conns.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                except OSError:
                    pass
                conn.close()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
