"""A link to one peer engine: its control channel, its advertised caches and the transport."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .control import Channel
from .registry import RemoteRegistry
from .stats import OpStats
from .transport import Transport
from .usage import Usage


@dataclass(slots=True)
class PeerInfo:
    """What a peer said about itself in the handshake."""

    cluster_id: int
    role: int
    incarnation: str
    host: str
    pid: int
    probe: tuple[int, int]
    address: str  # the peer's IP as this side reaches it (its data server listens there)
    data_port: int  # 0: the peer runs no data server (it does not listen)
    pool: tuple[int, int, int] | None  # (fd, base, size) of its memfd HOST pool

    @classmethod
    def from_wire(cls, msg: dict[str, Any], address: str) -> PeerInfo:
        addr, token = msg["probe"]
        return cls(
            msg["cluster_id"],
            msg["role"],
            msg["incarnation"],
            msg["host"],
            msg["pid"],
            (addr, token),
            address,
            msg["data_port"],
            tuple(msg["pool"]) if msg["pool"] else None,  # type: ignore[arg-type]
        )


@dataclass(slots=True)
class Link:
    """A live link. Symmetric: whichever side opened it, both may pull and push over it."""

    peer: PeerInfo
    channel: Channel
    transport: Transport
    registry: RemoteRegistry
    initiator: bool  # True on the side that called link_clusters
    pull: OpStats = field(default_factory=OpStats)
    push: OpStats = field(default_factory=OpStats)
    usage: Usage = field(default_factory=Usage)  # transfers in flight over this link

    @property
    def closed(self) -> bool:
        return self.channel.closed

    def snapshot(self) -> dict[str, Any]:
        return {
            "transport": self.transport.name,
            "peer_pid": self.peer.pid,
            "peer_incarnation": self.peer.incarnation,
            "initiator": self.initiator,
            "remote_caches": len(self.registry.caches),
            "pull": self.pull.snapshot(),
            "push": self.push.snapshot(),
        }
