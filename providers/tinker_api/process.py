"""A Tinker base's worker process: `python -m providers.tinker_api.process TINKER_DIR BASE_PATH`.

The service starts one per base in memory (worker.BaseProcess: forked from the job zygote, else spawned) and
talks to it over the socket whose descriptor it passes (zygote.PASSED_FDS), in channel.py's messages. The
process reads the base once, then runs one request at a time on it, as the service sends them (the service
keeps their order, the futures, ownership and limits): it only executes, on the base and the LoRA adapters
(each with its optimizer) and weight snapshots it holds. A request's body comes as its protobuf bytes and its
result goes back encoded, as the SDK reads it.

It ends when the service says `exit` (its base holds no model any more, or the service stops), and when the
service is gone: its end of the socket closes when its process dies, whatever killed it (a SIGKILL
included), which a thread here watches; PR_SET_PDEATHSIG would not do, since a process forked from the
zygote is the zygote's child, not the service's. TINKER_DIR is its working directory and names its service
in /proc, as a job's run directory does.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import sys
import threading
import uuid
from pathlib import Path

from . import channel
from .types import LogprobRequest, LoraSpec, UserInputError

log = logging.getLogger("providers.tinker_api.process")


def _exit_with_service(sock: socket.socket) -> None:
    """A thread that ends this process the moment the service's end of `sock` closes, even mid-request
    (poll's POLLRDHUP: the peer hung up; arriving requests do not wake it)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)

    def watch() -> None:
        while True:
            if any(event & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, event in poller.poll()):
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-service", daemon=True).start()


class Executor:
    """The requests this process runs, by name (nothing else can be called): each takes the header's
    arguments and the payload, and returns (a JSON-able result, payload bytes)."""

    def __init__(self, base):
        self.base = base
        self.snapshots: dict = {}  # key (the sampler's id) -> AdapterSnapshot: an ephemeral sampler's weights

    def run(self, op: str, args: dict, payload: bytes) -> tuple[object, bytes]:
        method = getattr(self, f"op_{op}", None)
        if method is None:
            raise ValueError(f"unknown request {op!r}")
        return method(payload, **args)

    def op_add(self, _, name: str, lora: dict | None = None, directory: str | None = None,
               with_optimizer: bool = False, version: int | None = None):
        self.base.add(name, LoraSpec(**lora) if lora else None, Path(directory) if directory else None,
                      with_optimizer)
        if version is not None:
            self.base.adapters[name].version = version
        return None, b""

    def op_remove(self, _, name: str):
        self.base.remove(name)
        return None, b""

    def op_has_gradients(self, _, name: str):
        return self.base.has_gradients(name), b""

    def op_forward_backward(self, body: bytes, name: str, loss_fn: str, forward_only: bool):
        from .wire import decode_forward_backward, encode_forward_backward, parse_forward_backward

        # The service checked the body against the limits; this reads it again, as the same numpy arrays.
        _, config, _, data = decode_forward_backward(parse_forward_backward(body), self.base.vocab_size, sys.maxsize)
        outputs, metrics = self.base.forward_backward(name, data, loss_fn, config, forward_only)
        return metrics, encode_forward_backward(outputs, metrics)

    def op_optim_step(self, _, name: str, **adam):
        return self.base.optim_step(name, **adam), b""

    def op_snapshot(self, _, name: str, key: str):
        self.snapshots[key] = self.base.snapshot(name)
        return None, b""

    def op_drop_snapshot(self, _, key: str):
        self.snapshots.pop(key, None)
        return None, b""

    def op_sample(self, _, name: str | None, snapshot: str | None, logprobs: dict, **params):
        from .wire import encode_sample

        weights = None
        if snapshot is not None:
            weights = self.snapshots.get(snapshot)
            if weights is None:
                raise UserInputError("sampling_session_id: the weights this sampler was made of are gone (its "
                                     "base's worker process ended); save_weights_and_get_sampling_client again")
        result = self.base.sample(name, logprobs=LogprobRequest(**logprobs), snapshot=weights, **params)
        return sum(len(s["tokens"]) for s in result["sequences"]), encode_sample(result)

    def op_save_bytes(self, _, name: str, with_optimizer: bool):
        return self.base.save_bytes(name, with_optimizer), b""

    def op_save(self, _, name: str, directory: str, with_optimizer: bool, meta: dict):
        self.base.save(name, Path(directory), with_optimizer, meta)
        return None, b""

    def op_load(self, _, name: str, directory: str, with_optimizer: bool):
        self.base.load(name, Path(directory), with_optimizer)
        return None, b""


def serve(sock: socket.socket, base_path: str) -> int:
    """Read the base, say so (or why not), then answer each request until `exit` or the service is gone."""
    from ..training.optional_imports import leave_out

    leave_out()  # as a training process: peft and TRL would import them for nothing (a spawned process)
    from .model import SharedBase

    try:
        base = SharedBase(base_path)
    except (OSError, ValueError) as e:
        channel.send(sock, {"error": f"the model could not be loaded: {type(e).__name__}: {str(e)[:300]}",
                            "category": "user"})
        return 1
    channel.send(sock, {"result": {"pid": os.getpid(), "vocab_size": base.vocab_size}})
    executor = Executor(base)
    while True:
        try:
            header, payload = channel.recv(sock)
        except EOFError:
            return 0
        if header["op"] == "exit":
            return 0
        try:
            result, out = executor.run(header["op"], header.get("args", {}), payload)
            channel.send(sock, {"result": result}, out)
        except UserInputError as e:
            channel.send(sock, {"error": str(e), "category": "user"})
        except Exception as e:  # noqa: BLE001 - a bug (or out of memory): this request fails, the process goes on
            error_id = uuid.uuid4().hex[:12]
            log.exception("tinker base %s: %s failed (error id %s)", base_path, header["op"], error_id)
            channel.send(sock, {"error": f"internal error {error_id}: {type(e).__name__}", "category": "server"})


def main(argv: list[str]) -> int:
    from ..jobs.zygote import PASSED_FDS

    tinker_dir, base_path = argv
    sock = socket.socket(fileno=int(os.environ[PASSED_FDS].split(",")[0]))
    _exit_with_service(sock)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("tinker base %s: worker process %d in %s", base_path, os.getpid(), tinker_dir)
    return serve(sock, base_path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
