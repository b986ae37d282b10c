"""A stranger on the wire: raw sockets speaking dxl's link protocol, no Engine.

Everything an attacker needs is public: the HMAC handshake (``dxl.control.auth``), the frame
format (a 4-byte length and a JSON object of a fixed schema, ``dxl.control.wire``) and the link
steps hello -> welcome -> ready -> ready. This module sends whatever it is told to claim.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
from typing import Any

from dxl.control import wire
from dxl.control.auth import authenticate_socket, link_key

HEADER = struct.Struct(">I")


def connect(
    address: tuple[str, int], secret: str | None = None, timeout: float = 5.0
) -> socket.socket:
    """A control connection, authenticated with ``secret`` (None: the no-secret exchange)."""
    sock = socket.create_connection(address, timeout=timeout)
    authenticate_socket(sock, secret, role="client", purpose="link", timeout=timeout)
    return sock


def send(sock: socket.socket, kind: str, **fields: Any) -> None:
    sock.sendall(wire.encode(kind, **fields))


def send_raw(sock: socket.socket, body: bytes) -> None:
    """A frame whose body is whatever we like (the server must survive it)."""
    sock.sendall(HEADER.pack(len(body)) + body)


def recv(sock: socket.socket) -> dict[str, Any]:
    header = _exactly(sock, HEADER.size)
    (length,) = HEADER.unpack(header)
    return json.loads(_exactly(sock, length))


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def about(
    cluster_id: int,
    *,
    pid: int | None = None,
    probe: tuple[int, int] = (4096, 1),
    data_port: int = 0,
    host: str | None = None,
    incarnation: str = "stranger",
    challenge: bytes | None = None,
) -> dict[str, Any]:
    """What a hello or welcome claims (anything the stranger likes)."""
    from dxl.transport import host_identity

    return {
        "proto": wire.PROTOCOL_VERSION,
        "cluster_id": cluster_id,
        "role": 1,
        "incarnation": incarnation,
        "host": host if host is not None else host_identity(),
        "pid": os.getpid() if pid is None else pid,
        "probe": list(probe),
        "data_port": data_port,
        "data_ip": "",
        "pool": [],
        "heartbeat_ms": 1000,
        "challenge": (challenge or secrets.token_bytes(32)).hex(),
    }


class Link:
    """A link a stranger sets up to an engine, claiming what it likes, then uses by hand."""

    def __init__(
        self,
        address: tuple[str, int],
        expect_cluster_id: int,
        claims: dict[str, Any],
        secret: str | None = None,
        caches: list[dict[str, Any]] | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.sock = connect(address, secret, timeout)
        challenge = bytes.fromhex(claims["challenge"])
        send(self.sock, "hello", expect_cluster_id=expect_cluster_id, **claims)
        self.welcome = recv(self.sock)
        if self.welcome["t"] != "welcome":
            self.ready = self.welcome
            return
        self.key_id, self.key = link_key(
            secret, challenge, bytes.fromhex(self.welcome["challenge"])
        )
        send(self.sock, "ready", caches=caches or [])
        self.ready = recv(self.sock)

    @property
    def up(self) -> bool:
        return self.ready.get("t") == "ready"

    def close(self) -> None:
        self.sock.close()


def cache_entry(
    cache_id: int, addrs: list[int], tensor_size: int, units: int, model_id: int | None = 0
) -> dict[str, Any]:
    """A registry entry the stranger advertises: addresses of its choice."""
    return {
        "id": cache_id,
        "gen": 1,
        "blocks": True,
        "num_tensors": len(addrs),
        "tensor_size": tensor_size,
        "units": units,
        "placement": 0,
        "device": 0,
        "addrs": addrs,
        "model_id": model_id,
        "keys": [],
        "shm": [],
    }
