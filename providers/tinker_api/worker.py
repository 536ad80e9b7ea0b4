"""Futures and base workers: the models on one base run their requests one at a time, in the order they
arrived (the SDK submits a training client's requests in seq_id order), on that base's thread; every
request's outcome lands in the FutureTable, which `retrieve_future` long-polls.

A thread, not yet a process: a request that crashes the interpreter would take the service with it (see
the report of issue 29 for the plan to move the worker behind the service's zygote).
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .types import UserInputError

if TYPE_CHECKING:  # model.py imports torch: the worker imports it when it first loads a base
    from .model import SharedBase

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


UNLOAD = object()  # a queue item: drop the base if it holds no adapter


class BaseWorker:
    """The thread that owns one SharedBase: it reads the base on first use, runs every request of every model
    on that base in arrival order (so each client's order holds), and drops the base when told to while it
    holds no adapter (the next request reads it again)."""

    def __init__(self, base_path: str):
        self.base_path = base_path
        self.host: SharedBase | None = None
        self.queue: queue.Queue = queue.Queue()
        self.last_used = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"tinker-base-{base_path[-40:]}", daemon=True)
        self._thread.start()

    def submit(self, fut: Future | None, work: Callable[[SharedBase], Any]) -> None:
        """Run `work(base)` in turn; its result or error goes to `fut` (None: the service's own work, logged)."""
        self.queue.put((fut, work))

    def stop(self, wait_s: float = 0.0) -> None:
        self.queue.put(None)
        if wait_s:
            self._thread.join(wait_s)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            fut, work = item
            if work is UNLOAD:
                if self.host is not None and not self.host.adapters:
                    self.host = None
                    gc.collect()
                continue
            self.last_used = time.monotonic()
            try:
                if self.host is None:
                    from .model import SharedBase

                    try:
                        self.host = SharedBase(self.base_path)
                    except (OSError, ValueError) as e:
                        raise UserInputError(f"the model could not be loaded: {type(e).__name__}: {str(e)[:300]}")
                result = work(self.host)
                if fut is not None:
                    fut.result = result
            except UserInputError as e:
                if fut is None:
                    log.warning("tinker base %s: %s", self.base_path, e)
                else:
                    fut.error, fut.category = str(e), "user"
            except Exception as e:  # a bug (or out of memory): the future fails, the worker goes on
                error_id = uuid.uuid4().hex[:12]
                log.exception("tinker base %s: request failed (error id %s)", self.base_path, error_id)
                if fut is not None:
                    fut.error, fut.category = f"internal error {error_id}: {type(e).__name__}", "server"
            if fut is not None:
                fut.done.set()
