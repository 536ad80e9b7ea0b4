"""Futures and base workers: the models on one base run their requests one at a time, in the order they
arrived (the SDK submits a training client's requests in seq_id order), on that base's thread in the service,
which hands each to the base's worker process (process.py) and waits for its answer; every request's outcome
lands in the FutureTable, which `retrieve_future` long-polls.

The base, its models' LoRA adapters and optimizer states live in that process, not in the service: a request
that crashes it (a segfault, a CUDA error, the out-of-memory killer) ends that process only. Its request and
every request queued behind it then fail with an error naming the death, the service answers everything
else, and the base's next request starts a fresh process, where a model saved since its last step comes back
(service.TinkerService._ensure). The process ends when its base holds no model any more (idle eviction), so
its memory returns to the system, and with the service (process.py).
"""

from __future__ import annotations

import logging
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import channel
from .types import LogprobRequest, LoraSpec, UserInputError

log = logging.getLogger("providers.tinker_api")


@dataclass
class Future:
    owner: str | None
    kind: str  # what the result is: "proto" (bytes, application/x-protobuf) or "json"
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: str | None = None
    category: str = "user"


class FutureTable:
    """request_id -> Future; the oldest finished ones are forgotten beyond `keep`. A request id names the
    service's incarnation (`req-INCARNATION-...`), so an id from before a restart is told from an unknown one."""

    def __init__(self, keep: int):
        self._futures: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._keep = keep
        self.incarnation = uuid.uuid4().hex[:12]

    def from_before_restart(self, rid: str) -> bool:
        return rid.startswith("req-") and not rid.startswith(f"req-{self.incarnation}-")

    def create(self, owner: str | None, kind: str = "json") -> tuple[str, Future]:
        rid, fut = f"req-{self.incarnation}-{uuid.uuid4().hex}", Future(owner, kind)
        with self._lock:
            self._futures[rid] = fut
            while len(self._futures) > self._keep:
                oldest, f = next(iter(self._futures.items()))
                if not f.done.is_set():
                    break
                del self._futures[oldest]
        return rid, fut

    def get(self, rid: str) -> Future | None:
        with self._lock:
            return self._futures.get(rid)

    def pending(self) -> int:
        with self._lock:
            return sum(not f.done.is_set() for f in self._futures.values())

    def done(self, result: Any) -> tuple[str, Future]:
        """A request answered at once (a future that is already finished)."""
        rid, fut = self.create(None)
        fut.result = result
        fut.done.set()
        return rid, fut


class WorkerDied(Exception):
    """A base's worker process ended while the service waited on it (its message says how)."""


class WorkerError(Exception):
    """A request failed in the worker process on a bug (its message names the error id the process logged)."""


def _launch(argv: list[str], cwd: str, env: dict[str, str], fd: int):
    """Start a worker process with descriptor `fd`: forked from the job zygote (it has imported torch,
    transformers and peft: seconds of CPU a fresh interpreter spends again), waiting for it while it imports;
    spawned where the zygote is off or failed. Its output goes to the service's stderr (its log)."""
    from ..jobs import zygote

    if zygote.enabled():
        z = zygote.zygote_for(env)  # the jobs' own: one preloaded process per environment
        if z.ready():
            try:
                return z.spawn(argv, sys.__stderr__, cwd, env, pass_fds=(fd,))
            except Exception as e:  # noqa: BLE001 - any zygote failure: spawn it
                log.warning("job zygote failed to start a Tinker worker (%s: %s); spawning it", type(e).__name__, e)
        else:
            log.warning("job zygote not ready (its log:\n%s); spawning the Tinker worker", z.log_tail())
    # Its own session, as a forked one: a Ctrl-C of the service reaches the service alone, which saves the
    # process's models before stopping it.
    return subprocess.Popen(argv, cwd=cwd, env={**env, zygote.PASSED_FDS: str(fd)}, pass_fds=(fd,),
                            stdin=subprocess.DEVNULL, stdout=sys.__stderr__, stderr=subprocess.STDOUT,
                            start_new_session=True)


class BaseProcess:
    """The service's handle on one base's worker process: each method sends one request and returns its
    answer (a UserInputError for a client mistake, WorkerError for a bug, WorkerDied when the process is
    gone). `adapters` and `snapshots` are what the process holds, as the service knows it."""

    def __init__(self, base_path: str, tinker_dir: Path, env: dict[str, str]):
        self.base_path = base_path
        self.adapters: set[str] = set()
        self.snapshots: set[str] = set()
        self.sock, theirs = socket.socketpair()
        argv = [sys.executable, "-m", "providers.tinker_api.process", str(tinker_dir), base_path]
        try:
            self.proc = _launch(argv, str(tinker_dir), env, theirs.fileno())
        finally:
            theirs.close()  # the process's alone: its death closes the channel
        self.pid = self.proc.pid
        self._call("hello")

    # -- the channel ---------------------------------------------------------------------------------------
    def _call(self, op: str, payload: bytes = b"", **args) -> tuple[Any, bytes]:
        try:
            if op != "hello":  # the process speaks first, once it has read the base
                channel.send(self.sock, {"op": op, "args": args}, payload)
            header, out = channel.recv(self.sock)
        except (EOFError, OSError):
            raise WorkerDied(self.how_it_ended()) from None
        if "error" in header:
            if header.get("category") == "user":
                if op == "hello":
                    self.stop()
                raise UserInputError(header["error"])
            raise WorkerError(header["error"])
        return header["result"], out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def how_it_ended(self) -> str:
        """How the process ended (waiting a moment for its exit status), as a request's error says it."""
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:  # its channel is broken but it lives on: it can serve nothing
            self.proc.kill()
            code = None
        self.sock.close()
        if code is None:
            how = "stopped answering"
        elif code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            how = f"was killed by {name}" + (" (the out-of-memory killer sends it too)" if -code == 9 else "")
        else:
            how = f"exited with status {code}"
        return f"the worker process of base model {Path(self.base_path).name} (pid {self.pid}) {how}"

    def stop(self, wait_s: float = 30.0) -> None:
        """Ask the process to exit (killed if it has not after `wait_s`)."""
        try:
            channel.send(self.sock, {"op": "exit"})
        except OSError:
            pass
        self.sock.close()
        try:
            self.proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    # -- the requests (process.Executor runs them) ------------------------------------------------------
    def add(self, name: str, lora: LoraSpec | None, directory: Path | None = None, with_optimizer: bool = False,
            version: int | None = None) -> None:
        """A new adapter `name`: fresh (as `lora` says), or the one saved in `directory`; `version` counts
        the model's steps and loads (what a snapshot is compared with)."""
        self._call("add", name=name, lora=asdict(lora) if lora is not None else None,
                   directory=str(directory) if directory is not None else None, with_optimizer=with_optimizer,
                   version=version)
        self.adapters.add(name)

    def remove(self, name: str) -> None:
        self._call("remove", name=name)
        self.adapters.discard(name)

    def has_gradients(self, name: str) -> bool:
        return self._call("has_gradients", name=name)[0]

    def forward_backward(self, name: str, body: bytes, loss_fn: str, forward_only: bool) -> tuple[bytes, dict]:
        """The ForwardBackwardOutput (encoded) of the request `body` (a ForwardBackwardRequest) and its metrics."""
        metrics, out = self._call("forward_backward", body, name=name, loss_fn=loss_fn, forward_only=forward_only)
        return out, metrics

    def optim_step(self, name: str, **adam: float) -> dict[str, float]:
        return self._call("optim_step", name=name, **adam)[0]

    def snapshot(self, name: str, key: str) -> None:
        """Keep adapter `name`'s weights as they are now under `key` (an ephemeral sampler's)."""
        self._call("snapshot", name=name, key=key)
        self.snapshots.add(key)

    def drop_snapshot(self, key: str) -> None:
        self._call("drop_snapshot", key=key)
        self.snapshots.discard(key)

    def sample(self, name: str | None, snapshot: str | None, logprobs: LogprobRequest, **params) -> tuple[bytes, int]:
        """The SampleResponse (encoded) and how many tokens were sampled."""
        tokens, out = self._call("sample", name=name, snapshot=snapshot, logprobs=asdict(logprobs), **params)
        return out, tokens

    def save_bytes(self, name: str, with_optimizer: bool) -> int:
        return self._call("save_bytes", name=name, with_optimizer=with_optimizer)[0]

    def save(self, name: str, directory: Path, with_optimizer: bool, meta: dict) -> None:
        self._call("save", name=name, directory=str(directory), with_optimizer=with_optimizer, meta=meta)

    def load(self, name: str, directory: Path, with_optimizer: bool) -> None:
        self._call("load", name=name, directory=str(directory), with_optimizer=with_optimizer)


UNLOAD = object()  # a queue item: end the base's process if it holds no adapter


class BaseWorker:
    """The service's thread for one base: it runs every request of every model on that base in arrival order
    (so each client's order holds), each as `work(process)`, starting the base's process on first use; it
    ends the process when told to while it holds no adapter (the next request starts another). When the
    process dies, the request it ran and every one queued fail with an error naming that, and `lost(base)`
    tells the service that nothing of it is in memory any more."""

    def __init__(self, base_path: str, start: Callable[[str], BaseProcess], lost: Callable[[str], None]):
        self.base_path = base_path
        self.host: BaseProcess | None = None
        self.queue: queue.Queue = queue.Queue()
        self.last_used = time.monotonic()
        self._start, self._lost = start, lost
        self._thread = threading.Thread(target=self._run, name=f"tinker-base-{base_path[-40:]}", daemon=True)
        self._thread.start()

    def submit(self, fut: Future | None, work: Callable[[BaseProcess], Any]) -> None:
        """Run `work(process)` in turn; its result or error goes to `fut` (None: the service's own work on what
        the process holds, logged; skipped while no process runs)."""
        self.queue.put((fut, work))

    def stop(self, wait_s: float = 0.0) -> None:
        """After what is queued, end the process and the thread (waiting up to `wait_s` for both)."""
        self.queue.put(None)
        if wait_s:
            self._thread.join(wait_s)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                if self.host is not None:
                    self.host.stop()
                    self.host = None
                return
            fut, work = item
            if self.host is not None and not self.host.alive():  # it died between requests
                self._died(WorkerDied(self.host.how_it_ended()), fut)
                continue
            if work is UNLOAD:
                if self.host is not None and not self.host.adapters:
                    self.host.stop()
                    self.host = None
                continue
            if fut is None and self.host is None:
                continue
            self.last_used = time.monotonic()
            try:
                if self.host is None:
                    self.host = self._start(self.base_path)
                result = work(self.host)
                if fut is not None:
                    fut.result = result
            except WorkerDied as e:
                self._died(e, fut)
                continue
            except UserInputError as e:
                if fut is None:
                    log.warning("tinker base %s: %s", self.base_path, e)
                else:
                    fut.error, fut.category = str(e), "user"
            except WorkerError as e:  # the process logged it with its error id
                if fut is not None:
                    fut.error, fut.category = str(e), "server"
            except Exception as e:  # a bug here: the future fails, the worker goes on
                error_id = uuid.uuid4().hex[:12]
                log.exception("tinker base %s: request failed (error id %s)", self.base_path, error_id)
                if fut is not None:
                    fut.error, fut.category = f"internal error {error_id}: {type(e).__name__}", "server"
            if fut is not None:
                fut.done.set()

    def _died(self, death: WorkerDied, fut: Future | None) -> None:
        """The process is gone: `fut` and every request queued behind it fail saying so (the service's own
        work is dropped: what it acted on is gone); later requests start a fresh process."""
        error_id = uuid.uuid4().hex[:12]
        log.error("tinker base %s: %s (error id %s)", self.base_path, death, error_id)
        message = (f"internal error {error_id}: {death}; this request did not complete, and the models on that "
                   "base lost what they did since their last save (a model's next request restores that save, "
                   "or says it has none: then load a checkpoint, create_training_client_from_state)")
        self.host = None
        self._lost(self.base_path)
        failed, kept = [fut], []
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None or item[1] is UNLOAD:
                kept.append(item)
            else:
                failed.append(item[0])
        for item in kept:
            self.queue.put(item)
        for f in failed:
            if f is not None:
                f.error, f.category = message, "server"
                f.done.set()
