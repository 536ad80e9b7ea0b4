"""The messages between the service and a base's worker process (worker.py, process.py), over a Unix socket
pair: each a JSON header and a payload of bytes (a request's protobuf body, a result's encoded protobuf),
length-prefixed, so a round trip copies bytes and pickles nothing."""

from __future__ import annotations

import json
import socket
import struct

PREFIX = struct.Struct(">IQ")  # the header's length, the payload's length


def send(sock: socket.socket, header: dict, payload: bytes = b"") -> None:
    head = json.dumps(header).encode()
    sock.sendall(PREFIX.pack(len(head), len(payload)) + head)
    if payload:
        sock.sendall(payload)


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError("the other end closed the channel")
        got += k
    return bytes(buf)


def recv(sock: socket.socket) -> tuple[dict, bytes]:
    """The next message (header, payload); EOFError when the other end is gone."""
    head_len, payload_len = PREFIX.unpack(_exactly(sock, PREFIX.size))
    header = json.loads(_exactly(sock, head_len))
    return header, _exactly(sock, payload_len) if payload_len else b""
