"""Futures and model workers: each resident model runs its requests one at a time, in the order they
arrived (the SDK submits a training client's requests in seq_id order), on its own thread; every request's
outcome lands in the FutureTable, which `retrieve_future` long-polls.

A thread, not yet a process: a request that crashes the interpreter would take the service with it (see
the report of issue 29 for the plan to move the worker behind the service's zygote).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .model import TinkerModel, UserInputError

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
    """request_id -> Future; the oldest finished ones are forgotten beyond `keep` (an unknown id is a 404)."""

    def __init__(self, keep: int):
        self._futures: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._keep = keep

    def create(self, owner: str | None, kind: str = "json") -> tuple[str, Future]:
        rid, fut = f"req-{uuid.uuid4().hex}", Future(owner, kind)
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


class ModelWorker:
    """One resident TinkerModel, built and used on its own thread; requests queue in arrival order."""

    def __init__(self, name: str, build: Callable[[], TinkerModel]):
        self.name = name
        self.model: TinkerModel | None = None
        self.queue: queue.Queue = queue.Queue()
        self.last_used = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(build,), name=f"tinker-{name}", daemon=True)
        self._thread.start()

    def submit(self, fut: Future, work: Callable[[TinkerModel], Any]) -> None:
        self.queue.put((fut, work))

    def stop(self) -> None:
        self.queue.put(None)

    def _run(self, build) -> None:
        try:
            self.model = build()
        except Exception as e:
            self._fail_all(e)
            return
        while True:
            item = self.queue.get()
            if item is None:
                return
            fut, work = item
            self.last_used = time.monotonic()
            try:
                fut.result = work(self.model)
            except UserInputError as e:
                fut.error, fut.category = str(e), "user"
            except Exception as e:  # a bug (or out of memory): the future fails, the worker goes on
                error_id = uuid.uuid4().hex[:12]
                log.exception("tinker worker %s: request failed (error id %s)", self.name, error_id)
                fut.error, fut.category = f"internal error {error_id}: {type(e).__name__}", "server"
            fut.done.set()

    def _fail_all(self, e: Exception) -> None:
        """The model could not be built: every request, now and later, fails with the reason."""
        user = isinstance(e, (UserInputError, OSError, ValueError))
        if not user:
            log.exception("tinker worker %s: model failed to load", self.name)
        reason = f"the model could not be loaded: {type(e).__name__}: {str(e)[:300]}"
        while True:
            item = self.queue.get()
            if item is None:
                return
            fut, _ = item
            fut.error, fut.category = reason, "user" if user else "server"
            fut.done.set()
