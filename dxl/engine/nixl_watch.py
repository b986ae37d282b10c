"""The timer that keeps NIXL notifications bounded (dxl/transport/nixl_notifs.py says why).

While the engine's NIXL agent exists, it drains the agent every ``NOTIF_DRAIN_S`` (transfers
drain it too while they poll), and closes the link of a peer that sent more than
``NOTIF_LIMIT`` notifications (or ``NOTIF_BYTES_LIMIT`` bytes of them) in one period: such a
peer's messages are dropped all the same, but a peer that floods has no business on the link.
A wake-up is one cheap call, so an idle engine stays idle (the idle-CPU test of
tests/test_nixl_transport.py measures it).
"""

from __future__ import annotations

import asyncio
import logging

from ..guard import RateLimitedLog
from ..transport import nixl_notifs
from ..transport.nixl import NixlHost, NixlTransport
from .links import LinkTable

__all__ = ["NotifWatch"]

log = logging.getLogger("dxl")
limited = RateLimitedLog(log)


class NotifWatch:
    """Drains one engine's NIXL notifications on a timer and unlinks the peers that flood."""

    def __init__(self, host: NixlHost, links: LinkTable) -> None:
        self._host = host
        self._links = links
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the timer (on the running loop); once."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="dxl-nixl-notifs")

    async def close(self) -> None:
        """Stop the timer and drain once more (nothing a peer sent stays held)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._host.drop_notifs()
        limited.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(nixl_notifs.NOTIF_DRAIN_S)  # the period, not a synchronisation
            for agent in self._host.notif_window():
                self._cut(agent)
            if self._host.stuck():  # transfers past their deadline: release those that ended
                self._host.reap()

    def _cut(self, agent: str) -> None:
        """Close the link whose peer is NIXL agent ``agent`` (if any still is)."""
        for link in list(self._links):
            transport = link.transport
            if isinstance(transport, NixlTransport) and transport.peer_agent == agent:
                limited.warning(
                    "nixl-notif-flood",
                    "dxl: closing the link to cluster %d: its NIXL agent sent more than %d "
                    "notifications or %d bytes of them in %.2f s (dropped; dxl uses none)",
                    link.peer.cluster_id,
                    nixl_notifs.NOTIF_LIMIT,
                    nixl_notifs.NOTIF_BYTES_LIMIT,
                    nixl_notifs.NOTIF_DRAIN_S,
                )
                link.close("the peer flooded NIXL notifications")
