"""Rank-table links: the reference's double-sided ``link(comm_name, cluster_rank_info,
rank_table)``, ``unlink(comm_id)`` and ``query_register_mem_status(comm_id)`` between dxl
engines.

Every member calls ``link`` with the same table. The table names each rank's device (HCCL
format: ``server_list[].device[].{device_id, device_ip, rank_id}``, plus the server's
``host_ip`` or ``server_id``); dxl maps rank ``r`` to the endpoint

    (its ``device_ip``, else its server's ``host_ip``, else ``server_id``) : base port + r

with base port ``dxl.RankTableBasePort`` (default 27100), so two engines on one host whose table
gives both ranks the same IP still meet. Each member listens at its own rank's endpoint (starting
the listener if the engine does not listen yet) and links to every other member with its own
link, retrying until it answers or the comm's deadline (``link_total_time``, default 120 s)
passes: whichever member starts first, they meet. ``query_register_mem_status`` says
``PREPARING`` until all of this member's links are up, then ``OK``, or ``FAILED`` once the
deadline passed. ``unlink`` ends this member's links of the comm.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from .._validate import check_dict, check_isinstance, check_uint32, check_uint64, ensure
from ..config import EngineOptions
from ..errors import LLMStatusCode, param_invalid
from ..types import LLMClusterInfo, RegisterMemStatus
from .handshake import Handshake
from .linking import LinkOps
from .links import LinkTable
from .listener import Listener
from .state import Identity, RunState

log = logging.getLogger("dxl")

DEFAULT_LINK_TOTAL_TIME_S = 120  # the reference's HCCL_CONNECT_TIMEOUT
ATTEMPT_TIMEOUT_S = 3.0  # one link attempt (link_clusters' default timeout)
MAX_MEMBERS = 4
Endpoint = tuple[str, int]


@dataclass(slots=True)
class _Comm:
    """One communication domain this engine is a member of."""

    comm_id: int
    name: str
    peers: dict[int, Endpoint]  # the other members: cluster id -> endpoint
    status: RegisterMemStatus = RegisterMemStatus.PREPARING
    linked: set[int] = field(default_factory=set)  # members our own link reaches
    task: asyncio.Task[None] | None = None


class RankTableLinks:
    """The comms of one engine (see the module docstring)."""

    def __init__(
        self,
        identity: Identity,
        options: EngineOptions,
        state: RunState,
        links: LinkTable,
        listener: Listener,
        linking: LinkOps,
        handshake: Handshake,
    ) -> None:
        self._identity = identity
        self._opts = options
        self._state = state
        self._links = links
        self._listener = listener
        self._linking = linking
        self._handshake = handshake
        self._comms: dict[int, _Comm] = {}
        self._next_id = 1

    async def link(self, comm_name: str, cluster_rank_info: dict[int, int], rank_table: str) -> int:
        """Join the communication domain ``comm_name`` of the members in ``cluster_rank_info``
        (cluster id -> rank id) at the endpoints ``rank_table`` gives their ranks; returns its
        ``comm_id`` at once: poll :meth:`query_register_mem_status` until ``OK``."""
        op = "link"
        check_isinstance("comm_name", comm_name, str, allow_none=False)
        ensure(bool(comm_name) and len(comm_name) < 128, "comm_name must have 1..127 chars")
        check_dict("cluster_rank_info", cluster_rank_info, int, int)
        ensure(len(cluster_rank_info) <= MAX_MEMBERS, "cluster_rank_info holds at most 4 members")
        for cluster_id, rank in cluster_rank_info.items():
            check_uint64("cluster_rank_info key", cluster_id)
            check_uint32("cluster_rank_info value", rank)
        check_isinstance("rank_table", rank_table, str)
        ensure(len(cluster_rank_info) >= 2, "cluster_rank_info needs at least 2 members")
        ranks = list(cluster_rank_info.values())
        ensure(ranks == sorted(ranks), "cluster_rank_info ranks must ascend")
        ensure(len(set(ranks)) == len(ranks), "cluster_rank_info ranks must be distinct")
        self._state.require(op)
        me = self._identity.cluster_id
        if me not in cluster_rank_info:
            raise param_invalid(
                op, f"this engine's cluster id {me} is not a member of cluster_rank_info"
            )
        endpoints = rank_endpoints(
            op, rank_table, cluster_rank_info, self._opts.rank_table_base_port
        )
        await self._listen_at(op, endpoints[me])
        comm = _Comm(self._next_id, comm_name, {c: e for c, e in endpoints.items() if c != me})
        self._next_id += 1
        self._comms[comm.comm_id] = comm
        comm.task = asyncio.create_task(self._join(comm), name=f"dxl-comm-{comm.comm_id}")
        log.info(
            "dxl: cluster %d joins comm %r (id %d) at %s:%d with %s",
            me,
            comm_name,
            comm.comm_id,
            *endpoints[me],
            comm.peers,
        )
        return comm.comm_id

    async def unlink(self, comm_id: int) -> None:
        """Leave a comm: this member's links of it end (the other members do the same)."""
        check_uint64("comm_id", comm_id)
        self._state.require("unlink")
        comm = self._comms.pop(comm_id, None)
        if comm is None:
            raise param_invalid("unlink", f"no communication domain {comm_id} (see link())")
        if comm.task is not None:
            comm.task.cancel()
            await asyncio.gather(comm.task, return_exceptions=True)
        in_use = {c for other in self._comms.values() for c in other.linked}
        for cluster_id in comm.linked - in_use:  # a link another comm still needs stays
            own = self._links.own(cluster_id)
            if own is not None:
                await self._links.unlink(cluster_id, ATTEMPT_TIMEOUT_S, force=False)

    async def query_register_mem_status(self, comm_id: int) -> RegisterMemStatus:
        """``PREPARING`` until this member's links of the comm are up, then ``OK``; ``FAILED``
        once the comm's deadline passed without them."""
        check_uint64("comm_id", comm_id)
        self._state.require("query_register_mem_status")
        comm = self._comms.get(comm_id)
        return comm.status if comm is not None else RegisterMemStatus.FAILED

    async def close(self) -> None:
        tasks = [c.task for c in self._comms.values() if c.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._comms.clear()

    # ------------------------------------------------------------------ internals
    async def _listen_at(self, op: str, endpoint: Endpoint) -> None:
        """Listen at this member's endpoint (start the listener, or keep it if it is there)."""
        current = self._listener.address
        if current is None:
            await self._linking.listen(op, endpoint)
            return
        if _same_endpoint(current, endpoint):
            return
        raise param_invalid(
            op,
            f"this engine listens on {current[0]}:{current[1]}, but the rank table puts its rank "
            f"at {endpoint[0]}:{endpoint[1]} (device_ip or host_ip, dxl.RankTableBasePort + "
            "rank id); listen there or adjust the table or the base port",
        )

    async def _join(self, comm: _Comm) -> None:
        """Link to every other member, each attempt bounded, retrying until the deadline."""
        loop = asyncio.get_running_loop()
        total = self._opts.link_total_time_s or DEFAULT_LINK_TOTAL_TIME_S
        deadline = loop.time() + total
        pending = dict(comm.peers)
        backoff = 0.02
        while pending:
            for cluster_id, (ip, port) in list(pending.items()):
                left = deadline - loop.time()
                if left <= 0:
                    break
                code = await self._handshake.connect(
                    _cluster_info(cluster_id, ip, port), min(ATTEMPT_TIMEOUT_S, left), quiet=True
                )
                if code in (LLMStatusCode.LLM_SUCCESS, LLMStatusCode.LLM_ALREADY_LINK):
                    comm.linked.add(cluster_id)
                    del pending[cluster_id]
            if not pending:
                break
            if loop.time() >= deadline:
                comm.status = RegisterMemStatus.FAILED
                log.error(
                    "dxl: comm %r (id %d): no link to %s within %d s",
                    comm.name,
                    comm.comm_id,
                    sorted(pending),
                    total,
                )
                return
            await asyncio.sleep(backoff)  # the other member may not listen yet
            backoff = min(2 * backoff, 0.5)
        comm.status = RegisterMemStatus.OK


def rank_endpoints(
    op: str, rank_table: str, cluster_rank_info: dict[int, int], base_port: int
) -> dict[int, Endpoint]:
    """Each member's endpoint by the rule of the module docstring."""
    if not isinstance(rank_table, str):  # None passes the reference's type check; not here
        raise param_invalid(
            op, f"rank_table must be a JSON string, got {type(rank_table).__name__}"
        )
    try:
        table: Any = json.loads(rank_table)
    except (ValueError, RecursionError) as exc:
        raise param_invalid(op, f"rank_table is not JSON: {exc}") from None
    if not isinstance(table, dict) or not isinstance(table.get("server_list"), list):
        raise param_invalid(op, "rank_table must be a JSON object with a server_list array")
    ips: dict[int, str] = {}
    for server in table["server_list"]:
        if not isinstance(server, dict) or not isinstance(server.get("device", []), list):
            raise param_invalid(
                op, "rank_table server_list entries must be objects with a device list"
            )
        host = server.get("host_ip") or server.get("server_id")
        for device in server.get("device", []):
            if not isinstance(device, dict) or "rank_id" not in device:
                raise param_invalid(op, "rank_table devices must be objects with a rank_id")
            rank = _rank(op, device["rank_id"])
            if rank in ips:
                raise param_invalid(op, f"rank_table names rank {rank} twice")
            ip = device.get("device_ip") or host
            ips[rank] = _ip(op, ip, rank)
    endpoints: dict[int, Endpoint] = {}
    for cluster_id, rank in cluster_rank_info.items():
        if rank not in ips:
            raise param_invalid(op, f"rank {rank} of cluster {cluster_id} is not in the rank table")
        port = base_port + rank
        if port > 65535:
            raise param_invalid(
                op, f"rank {rank} needs port {base_port} + {rank} > 65535 (dxl.RankTableBasePort)"
            )
        endpoints[cluster_id] = (ips[rank], port)
    return endpoints


def _rank(op: str, value: object) -> int:
    text = str(value)
    if isinstance(value, bool) or not text.isascii() or not text.isdigit():
        raise param_invalid(op, f"rank_table rank_id must be a decimal integer, got {value!r}")
    return int(text)


def _ip(op: str, value: object, rank: int) -> str:
    if not isinstance(value, str):
        raise param_invalid(
            op, f"rank {rank} of the rank table has no device_ip, host_ip or server_id address"
        )
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise param_invalid(op, f"rank {rank}'s address {value!r} is not an IP address") from None


def _same_endpoint(a: Endpoint, b: Endpoint) -> bool:
    return a[1] == b[1] and ipaddress.ip_address(a[0]) == ipaddress.ip_address(b[0])


def _cluster_info(cluster_id: int, ip: str, port: int) -> LLMClusterInfo:
    info = LLMClusterInfo()
    info.remote_cluster_id = cluster_id
    info.append_remote_ip_info(ip, port)
    return info
