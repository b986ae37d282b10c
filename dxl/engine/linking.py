"""The link operations of the API: ``link_clusters``, ``unlink_clusters``, ``switch_role``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .._validate import check_int32, check_isinstance, check_uint64
from ..config import OPT_LOCAL_COMM_RES, EngineOptions, listen_from_options
from ..errors import LLMStatusCode, fail, param_invalid
from ..types import LLMClusterInfo, LLMRole
from .handshake import Handshake
from .links import LinkTable
from .listener import Listener
from .state import Identity, RunState

log = logging.getLogger("dxl")

MAX_PARALLEL_LINKS = 16  # clusters linked concurrently per call, as the reference


class LinkOps:
    """Links to peers, and the listener peers link to."""

    def __init__(
        self,
        identity: Identity,
        options: EngineOptions,
        state: RunState,
        links: LinkTable,
        listener: Listener,
        handshake: Handshake,
    ) -> None:
        self._identity = identity
        self._opts = options
        self._state = state
        self._links = links
        self._listener = listener
        self._handshake = handshake

    async def listen(self, op: str, listen: tuple[str, int]) -> None:
        await self._listener.start(op, listen, self._handshake.accept, self._links.key_for)

    async def link_clusters(
        self,
        clusters: list[LLMClusterInfo] | tuple[LLMClusterInfo, ...],
        timeout: int = 3000,
    ) -> tuple[LLMStatusCode, list[LLMStatusCode]]:
        """Link to listening peers. Failures are returned per cluster, not raised.

        Returns:
            ``(overall, per_cluster)``; ``overall`` is LLM_SUCCESS only if every cluster linked.
        """
        self._check_link_args("link_clusters", clusters, timeout, need_local_ip=True)
        self._state.require("link_clusters")
        sem = asyncio.Semaphore(MAX_PARALLEL_LINKS)

        async def one(info: LLMClusterInfo) -> LLMStatusCode:
            async with sem:
                return await self._handshake.connect(info, timeout / 1000)

        results = list(await asyncio.gather(*(one(c) for c in clusters)))
        return _overall(results), results

    async def unlink_clusters(
        self,
        clusters: list[LLMClusterInfo] | tuple[LLMClusterInfo, ...],
        timeout: int = 3000,
        force: bool = False,
    ) -> tuple[LLMStatusCode, list[LLMStatusCode]]:
        """Tear links down. ``force=False`` tells the peer and waits for its answer;
        ``force=True`` only drops the local end (the peer notices the closed connection)."""
        self._check_link_args("unlink_clusters", clusters, timeout, need_local_ip=False)
        check_isinstance("force", force, bool, allow_none=False)
        self._state.require("unlink_clusters")
        results = list(
            await asyncio.gather(
                *(self._links.unlink(_cluster_id(c), timeout / 1000, force) for c in clusters)
            )
        )
        return _overall(results), results

    async def switch_role(
        self, role: LLMRole, switch_options: dict[str, str] | None = None
    ) -> None:
        """Change the role label and the listener: ``llm.listenIpInfo`` in ``switch_options``
        (re)listens there (the same address keeps the listener); without it the engine stops
        listening. Refused with ``LLM_EXIST_LINK`` while any link exists."""
        op = "switch_role"
        check_isinstance("role", role, LLMRole, allow_none=False)
        check_isinstance("switch_options", switch_options, dict)
        self._state.require(op)
        listen = listen_from_options(switch_options or {})
        if self._links.busy:
            raise fail(
                op,
                LLMStatusCode.LLM_EXIST_LINK,
                f"{len(self._links)} link(s) exist; unlink every cluster before switching role",
            )
        current = self._listener.address
        same_port = listen is not None and current is not None and 0 != listen[1] == current[1]
        if not same_port:
            await self._listener.stop()
            if listen is not None:
                await self.listen(op, listen)
        self._identity.role = role
        log.info("dxl: cluster %d switched to %s", self._identity.cluster_id, role.name)

    def _check_link_args(self, op: str, clusters: Any, timeout: Any, need_local_ip: bool) -> None:
        check_int32("timeout", timeout)
        if timeout <= 0:
            raise param_invalid(op, f"timeout must be > 0 ms, got {timeout}")
        check_isinstance(
            "clusters", clusters, (list, tuple), allow_none=False, inner=LLMClusterInfo
        )
        for i, info in enumerate(clusters):
            check_uint64(f"clusters[{i}].remote_cluster_id", info.remote_cluster_id)
            if (
                need_local_ip
                and not info.local_ip_info_list
                and OPT_LOCAL_COMM_RES not in self._opts.raw
            ):
                raise param_invalid(
                    op, f"clusters[{i}].local_ip_info_list is empty; call append_local_ip_info"
                )


def _cluster_id(info: LLMClusterInfo) -> int:
    cluster_id = info.remote_cluster_id
    assert cluster_id is not None  # checked by _check_link_args
    return cluster_id


def _overall(results: list[LLMStatusCode]) -> LLMStatusCode:
    return next((r for r in results if r != LLMStatusCode.LLM_SUCCESS), LLMStatusCode.LLM_SUCCESS)
