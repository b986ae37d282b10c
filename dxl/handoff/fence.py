"""The fence on our blocks: stopping the engine that writes into them (the offerer of a fetch of
ours, the claimer of a push-mode offer of ours), and knowing it stopped, before the caller
reuses the blocks."""

from __future__ import annotations

import logging

from ..control import messages as m
from ..errors import LLMException
from .defaults import ABORT_TIMEOUT_S
from .port import EnginePort, Link

log = logging.getLogger("dxl")


class WriterFence:
    """Stops a writer into our blocks and waits out writes that already run."""

    def __init__(self, engine: EnginePort) -> None:
        self._engine = engine

    async def stop_writer(self, link: Link, *, offer: int, token: str, mine: bool) -> None:
        """Tell the engine that writes into our blocks (the fetch's offerer, the push's
        claimer) to stop, and return once it no longer does. It confirms once its copy
        stopped; one that does not within ABORT_TIMEOUT_S is cut off: its link closes, which
        revokes its tcp data connections, and the fence waits out a write already running.
        A cma peer stalled in the middle of one native write may still finish that write
        after this returns (docs/security.md): a kernel copy cannot be revoked."""
        try:
            await link.channel.request(
                m.Abort(offer=offer, token=token, mine=mine), ABORT_TIMEOUT_S
            )
            return
        except LLMException as exc:
            if not link.closed:
                log.warning(
                    "dxl: cluster %d did not confirm a handoff abort: unlinking it (%s)",
                    link.peer.cluster_id,
                    exc,
                )
                link.close(f"no confirmation of a handoff abort: {exc}")
        await self.wait_out_writes()

    async def wait_out_writes(self) -> None:
        """A writer's link closed (its tcp connections are revoked): wait out a write of it
        that already runs in our data server."""
        await self._engine.fence_writes()
