"""A link to one peer engine: its control channel, its advertised caches and the transport."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..control.channel import Channel
from ..control.hello import PeerInfo
from ..transport import Transport
from .registry import RemoteRegistry
from .stats import OpStats
from .usage import Usage


@dataclass(slots=True)
class Link:
    """A live link. Symmetric: whichever side opened it, both may pull and push over it."""

    peer: PeerInfo
    channel: Channel
    transport: Transport
    registry: RemoteRegistry
    initiator: bool  # True on the side that called link_clusters
    key_id: bytes  # names the link's data key (dxl.control.auth.link_key)
    pull: OpStats = field(default_factory=OpStats)
    push: OpStats = field(default_factory=OpStats)
    usage: Usage = field(default_factory=Usage)  # transfers in flight over this link
    windows_refused: int = 0  # windows of the peer we would not map (their pieces: syscalls)
    window_refusal: str = ""  # why the last one was refused

    @property
    def closed(self) -> bool:
        return self.channel.closed

    def close(self, reason: str) -> None:
        """End the link (idempotent): the channel closes, and the link table's close handler
        retires the transport once no transfer uses it."""
        self.channel.close(reason)

    def snapshot(self) -> dict[str, Any]:
        return {
            "transport": self.transport.name,
            "peer_pid": self.peer.pid,
            "peer_incarnation": self.peer.incarnation,
            "initiator": self.initiator,
            "remote_caches": len(self.registry.caches),
            "windows_refused": self.windows_refused,
            "window_refusal": self.window_refusal,
            "pull": self.pull.snapshot(),
            "push": self.push.snapshot(),
        }
