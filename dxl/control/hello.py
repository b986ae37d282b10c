"""What engines say about themselves when they link (the ``hello`` and ``welcome`` frames)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .messages import Hello, Welcome


@dataclass(slots=True)
class PeerInfo:
    """What a peer said about itself in the handshake."""

    cluster_id: int
    role: int
    incarnation: str
    host: str
    pid: int
    probe: tuple[int, int]  # (address, token): 8 bytes the peer reads to prove a transport
    address: str  # the peer's IP as this side reaches it (its data server listens there)
    data_port: int  # 0: the peer runs no data server (it does not listen)
    pool: tuple[int, int, int] | None  # (fd, base, size) of its memfd HOST pool
    heartbeat_ms: int  # it pings at least this often

    @classmethod
    def from_wire(cls, msg: Hello | Welcome, address: str) -> PeerInfo:
        """From a decoded (schema-checked) hello or welcome frame; ``address`` is where its
        control connection came from, the data server's address unless it names its own (a
        multi-homed peer, or one whose connections leave from another IP than it listens on).
        Whatever it names, a tcp transport there must authenticate with the link's key."""
        addr, token = msg.probe
        pool = msg.pool
        return cls(
            cluster_id=msg.cluster_id,
            role=msg.role,
            incarnation=msg.incarnation,
            host=msg.host,
            pid=msg.pid,
            probe=(addr, token),
            address=_data_ip(msg.data_ip) or address,
            data_port=msg.data_port,
            pool=(pool[0], pool[1], pool[2]) if pool else None,
            heartbeat_ms=msg.heartbeat_ms,
        )


def _data_ip(text: str) -> str:
    """A specific IP the peer's data server listens on, or "" (none named, or a wildcard)."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return ""
    return "" if ip.is_unspecified else str(ip)
