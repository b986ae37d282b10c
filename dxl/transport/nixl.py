"""The ``nixl`` transport: dxl's control plane over NIXL's data plane (the extra ``dxl[nixl]``).

One NIXL agent per engine (:class:`NixlHost`), created on the first link that uses this
transport, never at ``import dxl`` (nothing here imports ``nixl`` before then).

Progress: over UCX's emulated RMA (no RDMA hardware, or the peer out of cma's reach) a transfer
completes only while the *target's* UCX worker progresses, for every transfer, not only a new
link's first; the target cannot know when a peer's transfer starts. NIXL's progress thread
does exactly that, but NIXL's Python wrapper runs it with a zero poll delay, so it busy-polls a
core forever (``pthrDelay = 0``: ``poll(efd, 0)`` in a loop). The thread itself waits in
``poll()`` on the worker's event fd and wakes when the peer's traffic arrives; so the agent is
made with that thread and a poll timeout of :data:`PROGRESS_POLL_US` (NIXL's own workaround for
a UCX wake-up bug): idle, it wakes a few dozen times a second and burns no core.

Every cache the engine registers is registered with the agent (host memory as ``DRAM``, device
memory as ``VRAM`` with its device id) and released from it only once the engine's own in-use
holds say no transfer touches it. The agent's metadata travels over the link's authenticated
control connection (a ``data_info`` frame in the handshake, and before each later ``reg_add``):
no etcd, no side channel, no pickle. The peer's agent is added when the link comes up and
removed when it goes (:meth:`NixlTransport.close`).

Descriptor lists are prepared once per cache, as vLLM's NIXL connector does: one descriptor per
(tensor, block) of each of our caches (shared by the engine's links) and of each peer cache a
link uses (prepared on first use, released when the peer withdraws it), so a block request is
one ``make_prepped_xfer`` by index (:meth:`NixlTransport.move_blocks`). Other requests (offsets
of contiguous caches, layer-wise pieces) are one transfer of the planned pieces, one descriptor
per coalesced piece built from the plan's arrays in one call. NIXL checks every descriptor
against the registrations it knows. A transfer polls its state until done or its deadline, then
is released and fails with a timeout; a dead peer fails it (``PeerGone``) and closes the link.

Trust: with RDMA hardware a peer reaches only memory registered with its agent (memory keys);
over UCX's emulated transports (tcp, cma, shared memory) it can read and write any address of
this process, so that needs ``dxl.NixlAllowEmulated`` (docs/security.md).
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DxlError, LLMStatusCode
from ..memory.layout import Layout
from ..memory.plan import Pieces
from ..types import Placement
from . import nixl_notifs
from .base import (
    BlockMove,
    Capabilities,
    Failure,
    PeerGone,
    TransferTimeout,
    Transport,
    native_failure,
)
from .names import NIXL
from .nixl_notifs import NotifCounter

__all__ = [
    "NixlFailed",
    "NixlHost",
    "NixlRefused",
    "NixlTransport",
    "agent_name",
    "hardware_rma",
    "nixl_info",
    "nixl_version",
    "open_nixl",
]

log = logging.getLogger("dxl")

IB_DEVICES = "/sys/class/infiniband"  # RDMA devices the kernel knows (verbs: rc/dc/ud)
PROGRESS_POLL_US = 20_000  # the progress thread's poll() timeout when no event wakes it
SPIN_POLLS = 64  # state checks before a waiting transfer starts sleeping between them
MAX_SLEEP_S = 0.0002  # the longest sleep between two state checks (each drives progress)
MAX_STUCK = 256  # transfers past their deadline NIXL has not ended; past it, no new one posts
LOCAL = "NIXL_INIT_AGENT"  # prep_xfer_dlist's name for our own side
_MAKING = threading.Lock()  # one agent is made at a time (see _make_agent)


class NixlRefused(DxlError):
    """The nixl transport cannot be used for this link (not installed, or not allowed)."""


class NixlFailed(DxlError):
    """NIXL failed a transfer or refused a peer's metadata (not a dead peer, not a timeout)."""


class NixlNotRegistered(NixlFailed):
    """NIXL refused a descriptor outside the registrations it knows."""


def nixl_version() -> str | None:
    """The installed ``nixl`` version, without importing it; None when it is not installed."""
    try:
        return importlib.metadata.version("nixl")
    except importlib.metadata.PackageNotFoundError:
        return None


def hardware_rma() -> list[str]:
    """The RDMA devices of this host (verbs: UCX's rc/dc/ud); [] means UCX can only emulate RMA
    for host memory (tcp, cma, shared memory), under which a NIXL peer reaches any address."""
    try:
        return sorted(os.listdir(IB_DEVICES))
    except OSError:
        return []


def nixl_info() -> dict[str, Any]:
    """What ``dxl info`` shows of NIXL, without importing it (nor CUDA): its version, the UCX
    transport plugins its wheels bundle (tcp, shared memory and self are built into UCX
    itself), this host's RDMA devices, and so whether host memory would move by emulated RMA."""
    import importlib.util
    from pathlib import Path

    version = nixl_version()
    plugins: dict[str, list[str]] = {}
    for wheel in ("nixl_cu12", "nixl_cu13"):
        spec = importlib.util.find_spec(wheel) if version else None
        if spec is None or not spec.submodule_search_locations:
            continue
        ucx = Path(next(iter(spec.submodule_search_locations))).parent / f"{wheel}.libs" / "ucx"
        names = {p.name.split(".so")[0].removeprefix("libuct_") for p in ucx.glob("libuct_*.so*")}
        plugins[wheel] = ["tcp", "sysv", "posix", "self", *sorted(names)]
    devices = hardware_rma()
    return {
        "installed": version,
        "ucx_transports": plugins,
        "rdma_devices": devices,
        "host_memory_rma": "hardware" if devices else "emulated (needs dxl.NixlAllowEmulated)",
    }


def agent_name(cluster_id: int, incarnation: str) -> str:
    """The NIXL agent name of one engine run: unique per start, so a restarted peer is a new
    agent."""
    return f"dxl-{cluster_id}-{incarnation}"


def _mem_type(placement: Placement) -> str:
    return "VRAM" if placement == Placement.DEVICE else "DRAM"


class _DelayedProgress:
    """NIXL's bindings module, except that the agent it makes gets a progress thread that
    waits in ``poll()`` for :data:`PROGRESS_POLL_US` instead of 0 (the Python wrapper hard-codes
    0, a busy loop; the C++ agent takes any delay). Used only while :func:`_make_agent` runs."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def nixlAgent(self, name: str, config: Any) -> Any:
        config.pthrDelay = PROGRESS_POLL_US
        return self._real.nixlAgent(name, config)


def _make_agent(name: str) -> Any:
    """A NIXL agent with the UCX backend and an event-driven progress thread (module
    docstring). Raises NixlRefused when nixl is missing or cannot start."""
    try:
        from nixl import _api
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t
    except ImportError as exc:
        raise NixlRefused(f"nixl is not installed (pip install 'dxl[nixl]'): {exc}") from exc
    config = nixl_agent_config(
        enable_prog_thread=True,
        backends=["UCX"],
        sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,  # workers call it concurrently
    )
    with _MAKING:
        real = _api.nixlBind
        _api.nixlBind = _DelayedProgress(real)
        try:
            agent = nixl_agent(name, config)
        except Exception as exc:  # nixlBackendError: UCX could not start
            raise NixlRefused(f"NIXL could not create its UCX backend: {exc}") from exc
        finally:
            _api.nixlBind = real
    if "UCX" not in agent.backends:
        raise NixlRefused("NIXL has no UCX backend here (its plugin is missing)")
    return agent


@dataclass(frozen=True, slots=True)
class _Registration:
    """One cache as the agent registers it."""

    ranges: list[tuple[int, int, int, str]]  # (address, bytes, device, "") per tensor
    mem: str  # DRAM or VRAM
    remote: bool  # remotely accessible: its keys go to peers

    @property
    def device(self) -> int:
        return self.ranges[0][2] if self.ranges else 0


@dataclass(slots=True)
class _Prepped:
    """One cache's prepared descriptor list: descriptor ``t * units + b`` is block ``b`` of
    tensor ``t``."""

    handle: Any
    units: int
    unit_bytes: int
    tensor_of: dict[int, int]  # tensor base address -> its index

    def indices(self, bases: np.ndarray, blocks: np.ndarray) -> np.ndarray | None:
        """The descriptor of each (tensor, block) pair, tensors outer; None if a base is not
        one of this cache's tensors (the caller falls back to planned pieces)."""
        try:
            tensors = np.array([self.tensor_of[int(b)] for b in bases.tolist()], dtype=np.int64)
        except KeyError:
            return None
        out = tensors[:, None] * self.units + blocks.astype(np.int64)[None, :]
        return np.ascontiguousarray(out.ravel(), dtype=np.int32)


def _prep(agent: Any, who: str, layout: Layout, mem: str, dev: int) -> _Prepped:
    unit = layout.unit_bytes
    starts = (
        layout.addrs.astype(np.uint64)[:, None]
        + np.arange(layout.units, dtype=np.uint64)[None, :] * np.uint64(unit)
    ).ravel()
    descs = np.empty((starts.size, 3), dtype=np.uint64)
    descs[:, 0] = starts
    descs[:, 1] = unit
    descs[:, 2] = dev
    handle = agent.prep_xfer_dlist(who, descs, mem)
    tensor_of = {int(a): i for i, a in enumerate(layout.addrs.tolist())}
    return _Prepped(handle, layout.units, unit, tensor_of)


class NixlHost:
    """The NIXL agent of one engine (see the module docstring). Thread-safe.

    Args:
        name: the agent's name, unique per engine run (:func:`agent_name`).
        probe: ``[address, token]``: the engine's 8-byte probe word, which a peer reads through
            the new link to prove it (registered with the agent).
        allow_emulated: ``dxl.NixlAllowEmulated``: link even without RDMA hardware.
        device_id: the device of ``Placement.DEVICE`` caches (``ge.exec.deviceId``).
    """

    def __init__(
        self, name: str, probe: Sequence[int], *, allow_emulated: bool, device_id: int
    ) -> None:
        self.name = name
        self._probe_addr = int(probe[0])
        self.allow_emulated = allow_emulated
        self._device_id = device_id
        self._lock = threading.Lock()
        self._agent: Any = None
        self.scratch = np.zeros(1, dtype=np.uint64)  # where our probe reads land
        self._caches: dict[int, _Registration] = {}
        self._regs: dict[int, Any] = {}  # cache id -> the agent's registration
        self._prepped: dict[int, _Prepped] = {}  # cache id -> its prepared descriptors
        self._closed = False
        # peers' notifications, drained and dropped (dxl/transport/nixl_notifs.py)
        self.notifs = NotifCounter(nixl_notifs.NOTIF_LIMIT, nixl_notifs.NOTIF_BYTES_LIMIT)
        self._posted = 0  # transfers posted to NIXL and not yet done or released
        # transfers past their deadline that NIXL has not ended: (handle, peer agent). They are
        # not released while NIXL may still copy (a late reply lands in the destination; with
        # the handle released it can land after the memory is gone: a crash seen with UCX over
        # tcp), so they count as in flight until reap() sees them end
        self._abandoned: list[tuple[Any, str]] = []
        self._reaping = threading.Lock()
        self._forget_later: set[str] = set()  # gone peers with stuck transfers (forget())

    # ------------------------------------------------------------------ the agent
    @property
    def agent(self) -> Any:
        """The agent, made (and every registered cache registered with it) on first use.

        Raises:
            NixlRefused: nixl is not installed, cannot start here, or the engine is closing.
        """
        with self._lock:
            if self._closed:
                raise NixlRefused("the engine is closing")
            if self._agent is None:
                agent = _make_agent(self.name)
                agent.register_memory([(self._probe_addr, 8, 0, "")], "DRAM")
                agent.register_memory([(self.scratch.ctypes.data, 8, 0, "")], "DRAM")
                for cache_id, reg in self._caches.items():
                    self._regs[cache_id] = agent.register_memory(reg.ranges, reg.mem)
                self._agent = agent
            return self._agent

    @property
    def registered(self) -> frozenset[int]:
        """The caches registered with the agent now (ids)."""
        with self._lock:
            return frozenset(self._regs)

    def metadata(self) -> str:
        """What a new peer needs: the agent's connection and the keys of the probe word and of
        the remotely accessible caches only (with RDMA hardware, the memory of any other cache
        stays out of the peer's reach), as base64 blobs joined by commas (one per memory
        type)."""
        agent = self.agent
        with self._lock:
            groups: dict[str, list[tuple[int, int, int, str]]] = {
                "DRAM": [(self._probe_addr, 8, 0, "")]
            }
            for reg in self._caches.values():
                if reg.remote:
                    groups.setdefault(reg.mem, []).extend(reg.ranges)
            blobs = [
                agent.get_partial_agent_metadata(agent.get_reg_descs(ranges, mem), True, [])
                for mem, ranges in groups.items()
            ]
        return ",".join(base64.b64encode(bytes(b)).decode() for b in blobs)

    # ------------------------------------------------------------------ registrations
    def cache_added(
        self, cache_id: int, addrs: list[int], nbytes: int, placement: Placement, remote: bool
    ) -> None:
        """A registration of the engine (before it is advertised): registered with the agent if
        there is one, else when the agent is made. Only a remotely accessible one's keys are
        ever sent to peers."""
        dev = self._device_id if placement == Placement.DEVICE else 0
        reg = _Registration(
            [(int(a), int(nbytes), dev, "") for a in addrs], _mem_type(placement), remote
        )
        with self._lock:
            if self._agent is not None:
                self._regs[cache_id] = self._agent.register_memory(reg.ranges, reg.mem)
            self._caches[cache_id] = reg

    def cache_removed(self, cache_id: int) -> None:
        """A registration is gone and no transfer of this engine touches it any more (the
        engine's in-use holds): its prepared list and its registration are released."""
        if self.reap():  # a transfer past its deadline may still copy: keep every registration
            log.error(
                "dxl: nixl: cache %d unregistered while %d transfer(s) past their deadline have "
                "not ended; it stays registered with NIXL until the engine closes",
                cache_id,
                self.stuck(),
            )
            return
        with self._lock:
            self._caches.pop(cache_id, None)
            prepped = self._prepped.pop(cache_id, None)
            reg = self._regs.pop(cache_id, None)
            agent = self._agent
        if agent is None:
            return
        if prepped is not None:
            prepped.handle.release()
        if reg is not None:
            agent.deregister_memory(reg)

    def cache_info(self, cache_id: int) -> str:
        """The agent's metadata of one cache (its memory section only), for the peers linked
        before it was registered; "" without an agent."""
        with self._lock:
            reg = self._regs.get(cache_id)
            cache = self._caches.get(cache_id)
            if reg is None or self._agent is None or cache is None or not cache.remote:
                return ""
            blob = self._agent.get_partial_agent_metadata(reg, False, [])
        return base64.b64encode(bytes(blob)).decode()

    def local_prepped(self, cache_id: int, layout: Layout) -> _Prepped | None:
        """The prepared descriptors of one of our caches (made on first use); None if it is
        not registered with the agent (any more)."""
        with self._lock:
            prepped = self._prepped.get(cache_id)
            if prepped is not None or cache_id not in self._regs or self._agent is None:
                return prepped
            reg = self._caches[cache_id]
            prepped = self._prepped[cache_id] = _prep(
                self._agent, LOCAL, layout, reg.mem, reg.device
            )
            return prepped

    @property
    def transfers_in_flight(self) -> int:
        """Transfers posted to NIXL and not yet ended: the sign that a copy really runs (what
        the native counters show for cma and tcp; NIXL's copies are not native to dxl)."""
        return self._posted

    def posted(self, delta: int) -> None:
        """A transfer was posted (+1) or ended (-1)."""
        with self._lock:
            self._posted += delta

    def abandon(self, handle: Any, peer: str) -> None:
        """Keep a transfer that passed its deadline until NIXL ends it (see ``_abandoned``)."""
        with self._lock:
            self._abandoned.append((handle, peer))

    def stuck(self) -> int:
        """Transfers past their deadline that NIXL has not ended yet."""
        return len(self._abandoned)

    def reap(self) -> int:
        """Release the abandoned transfers NIXL has ended (done or failed); how many remain."""
        with self._reaping:
            with self._lock:
                items, agent = list(self._abandoned), self._agent
            ended = []
            for item in items:
                try:
                    state = agent.check_xfer_state(item[0]) if agent is not None else "ERR"
                except Exception:  # NIXL reports a failed transfer by raising
                    state = "ERR"
                if state != "PROC":
                    ended.append(item)
            for handle, _ in ended:
                try:
                    handle.release()
                except Exception as exc:
                    log.debug("dxl: nixl: releasing an ended transfer: %s", exc)
            with self._lock:
                for item in ended:
                    self._abandoned.remove(item)
                    self._posted -= 1
                left = {p for _, p in self._abandoned}
                free = self._forget_later - left
                self._forget_later -= free
                n = len(self._abandoned)
        for peer in free:
            self.forget(peer)
        return n

    # ------------------------------------------------------------------ notifications
    def drop_notifs(self) -> None:
        """Drain the notifications peers sent the agent, count and drop them (dxl uses none;
        unread, NIXL would keep them in our memory). Nothing without an agent."""
        agent = self._agent  # read once: close() may clear it; it drains only before that
        if agent is None:
            return
        try:
            self.notifs.take(agent.get_new_notifs())
        except Exception as exc:  # the agent is going: nothing left to hold either
            log.debug("dxl: nixl: draining notifications: %s", exc)

    def notif_window(self) -> set[str]:
        """Drain, then end the counting window: the agents that sent more than the limit in it
        (their links are to be closed)."""
        self.drop_notifs()
        return self.notifs.end_window()

    # ------------------------------------------------------------------ peers
    def load(self, info: str, expect: str) -> None:
        """Load a peer's metadata (base64 blobs joined by commas) that must all name the agent
        ``expect``: a blob naming another is refused before NIXL loads it (NIXL reads the name
        from the blob; loading a stranger's would add that agent).

        Raises:
            NixlFailed: not base64, another agent's, or not metadata NIXL accepts.
        """
        self.reap()
        with self._lock:  # linked again (the same incarnation): its agent stays
            self._forget_later.discard(expect)
        for part in info.split(","):
            try:
                blob = base64.b64decode(part.encode(), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise NixlFailed(f"the peer's NIXL metadata is not base64: {exc}") from exc
            if _agent_of(blob) != expect:
                raise NixlFailed(f"NIXL metadata of another agent than {expect!r}")
            try:
                self.agent.add_remote_agent(blob)
            except Exception as exc:  # nixl's errors derive from Exception only
                raise NixlFailed(f"NIXL refused the peer's metadata: {exc}") from exc

    def forget(self, peer: str) -> None:
        """Remove a peer's agent (its link is gone); nothing if it was never loaded. While a
        transfer to it is past its deadline and not ended, the removal waits for reap():
        removing an agent under a live request crashed NIXL's progress thread when the
        peer's late reply came (UCX over tcp, a stopped peer resumed)."""
        with self._lock:
            if any(p == peer for _, p in self._abandoned):
                self._forget_later.add(peer)
                return
            agent = self._agent
        if agent is not None:
            try:
                agent.remove_remote_agent(peer)
            except Exception as exc:  # never loaded, or already gone
                log.debug("dxl: nixl: removing agent %s: %s", peer, exc)

    def close(self) -> None:
        """Release the agent (every link and registration of the engine is gone)."""
        self.reap()
        with self._lock:
            self._closed = True
            agent, self._agent = self._agent, None
            prepped = list(self._prepped.values())
            regs = list(self._regs.values())
            self._prepped.clear()
            self._regs.clear()
        if agent is None:
            return
        for p in prepped:
            p.handle.release()
        for reg in regs:
            agent.deregister_memory(reg)
        del agent  # the agent stops its progress thread and frees UCX when it goes


class NixlTransport(Transport):
    """The data path to one peer through this engine's NIXL agent (module docstring)."""

    name = NIXL
    caps = Capabilities(
        same_host_only=False,
        maps_peer_memory=False,
        inline=False,  # a transfer may wait on the peer
        # DEVICE: registered as VRAM and moved by index only (untested: no GPU here)
        memory=frozenset({Placement.HOST, Placement.DEVICE}),
        block_index=True,
    )

    def __init__(
        self, host: NixlHost, peer_agent: str, probe: Sequence[int], timeout_ms: int
    ) -> None:
        self._host = host
        self._peer = peer_agent
        self._probe = (int(probe[0]), int(probe[1]))
        self._timeout_ms = timeout_ms
        self._lock = threading.Lock()
        self._remote: dict[int, _Prepped] = {}  # the peer's cache id -> its prepared list
        self._loaded = False
        self._closed = False

    @property
    def peer_agent(self) -> str:
        return self._peer

    def local_info(self) -> str:
        return self._host.metadata()

    def attach(self, info: str, deadline_s: float) -> None:
        """Load the peer's metadata (the agent it names must be the one this link expects)
        and prove the path: read the peer's probe word through it and compare the token it
        announced (as the cma transport does). Blocking, bounded by ``deadline_s``."""
        self._host.load(info, self._peer)
        self._loaded = True
        scratch = self._host.scratch
        scratch[0] = 0
        probe = Pieces(
            np.array([scratch.ctypes.data], dtype=np.uint64),
            np.array([self._probe[0]], dtype=np.uint64),
            np.array([8], dtype=np.uint64),
        )
        self.read(probe, max(1, int((deadline_s - time.monotonic()) * 1000)))
        if int(scratch[0]) != self._probe[1]:
            raise NixlFailed("the NIXL peer is not the process of the link (probe mismatch)")

    def peer_info(self, info: str) -> None:
        """More of the peer's metadata (a cache it registered after the link came up)."""
        if info and not self._closed:
            self._host.load(info, self._peer)

    def drop_windows(self, key: object) -> None:
        """The peer withdrew cache ``key`` (and no transfer uses it): release its list."""
        with self._lock:
            prepped = self._remote.pop(key, None) if isinstance(key, int) else None
        if prepped is not None:
            prepped.handle.release()

    # ------------------------------------------------------------------ transfers
    def move_blocks(self, move: BlockMove, write: bool, timeout_ms: int | None) -> int | None:
        """Whole blocks by index into the prepared lists of both caches: one transfer."""
        if self._closed or not self._loaded:
            raise PeerGone("the link's NIXL agent is gone")
        unit = move.block_bytes
        if unit != move.local_layout.unit_bytes or unit != move.remote_layout.unit_bytes:
            return None
        local = self._host.local_prepped(move.local_key, move.local_layout)
        remote = self._remote_prepped(
            move.remote_key,
            move.remote_layout,
            _mem_type(move.remote_placement),
            move.remote_device,
        )
        if local is None or remote is None:
            return None
        li = local.indices(move.local_bases, move.local_blocks)
        ri = remote.indices(move.remote_bases, move.remote_blocks)
        if li is None or ri is None:
            return None
        if li.size == 0:
            return 0
        op = "WRITE" if write else "READ"
        agent = self._host.agent
        try:
            handle = agent.make_prepped_xfer(op, local.handle, li, remote.handle, ri)
        except Exception as exc:
            raise _nixl_error(exc) from exc
        return self._run(agent, handle, op, int(li.size) * unit, timeout_ms)

    def _remote_prepped(
        self, cache_id: int, layout: Layout, mem: str, device: int
    ) -> _Prepped | None:
        with self._lock:
            prepped = self._remote.get(cache_id)
            if prepped is None:
                # NIXL matches a remote descriptor's device id with the peer's registration
                # (0 for DRAM): the device the peer advertised with the cache (wire v5)
                dev = device if mem == "VRAM" else 0
                try:
                    prepped = _prep(self._host.agent, self._peer, layout, mem, dev)
                except Exception as exc:  # its registration has not reached us: planned path
                    log.debug("dxl: nixl: preparing cache %d of %s: %s", cache_id, self._peer, exc)
                    return None
                self._remote[cache_id] = prepped
            return prepped

    def read(self, pieces: Pieces, timeout_ms: int | None = None) -> int:
        return self._pieces("READ", pieces, timeout_ms)

    def write(self, pieces: Pieces, timeout_ms: int | None = None) -> int:
        return self._pieces("WRITE", pieces, timeout_ms)

    def _pieces(self, op: str, pieces: Pieces, timeout_ms: int | None) -> int:
        if self._closed or not self._loaded:
            raise PeerGone("the link's NIXL agent is gone")
        if pieces.count == 0:
            return 0
        agent = self._host.agent
        local_addrs, remote_addrs = (
            (pieces.dst, pieces.src) if op == "READ" else (pieces.src, pieces.dst)
        )
        try:
            local = agent.get_xfer_descs(_descs(local_addrs, pieces.length), "DRAM")
            remote = agent.get_xfer_descs(_descs(remote_addrs, pieces.length), "DRAM")
            handle = agent.initialize_xfer(op, local, remote, self._peer)
        except Exception as exc:
            raise _nixl_error(exc) from exc
        return self._run(agent, handle, op, pieces.nbytes, timeout_ms)

    def _run(self, agent: Any, handle: Any, op: str, nbytes: int, timeout_ms: int | None) -> int:
        """Post one transfer and poll it until done or the deadline. A transfer that ended is
        released; one still in flight at the deadline fails the operation but is kept (see
        ``NixlHost._abandoned``): releasing it would let a late reply land in freed memory."""
        bound_ms = self._timeout_ms if timeout_ms is None else timeout_ms
        deadline = time.monotonic() + bound_ms / 1000
        if self._host.stuck() and self._host.reap() >= MAX_STUCK:
            handle.release()
            raise NixlFailed(
                f"{MAX_STUCK} NIXL transfers are past their deadline and not ended yet; "
                f"no new {op} is posted until they end"
            )
        self._host.posted(1)
        kept = False  # handed to the host past the deadline: released once NIXL ends it
        try:
            state = agent.transfer(handle)
            polls = 0
            sleep = 0.00002
            while state == "PROC":
                if time.monotonic() >= deadline:
                    self._host.abandon(handle, self._peer)
                    kept = True
                    raise TransferTimeout(
                        f"the NIXL {op} of {nbytes} bytes did not complete in {bound_ms} ms "
                        "(failed; NIXL may still end it, and dxl holds it until then)"
                    )
                polls += 1
                if polls > SPIN_POLLS:  # a long transfer: stop spinning, the thread sleeps
                    time.sleep(sleep)
                    sleep = min(sleep * 2, MAX_SLEEP_S)
                # drive our worker: with the progress thread on, check_xfer_state does not,
                # and an initiator-driven copy (cma) wakes no event for the thread; what it
                # returns (peers' notifications) is counted and dropped
                self._host.drop_notifs()
                state = agent.check_xfer_state(handle)
            if state != "DONE":
                raise NixlFailed(f"NIXL reported {state} for the {op}")
        except DxlError:
            raise
        except Exception as exc:
            raise _nixl_error(exc) from exc
        finally:
            if not kept:
                try:
                    handle.release()
                except Exception as exc:
                    log.debug("dxl: nixl: releasing a transfer handle: %s", exc)
                self._host.posted(-1)
        return nbytes

    def failure(self, exc: DxlError) -> Failure:
        if isinstance(exc, NixlNotRegistered):
            return Failure(
                LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                "has no NIXL registration covering the request (its registration changed)",
            )
        if isinstance(exc, NixlFailed):
            return Failure(LLMStatusCode.LLM_FAILED, "failed the NIXL transfer")
        return native_failure(exc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            prepped = list(self._remote.values())
            self._remote.clear()
        for p in prepped:
            try:
                p.handle.release()
            except Exception as exc:
                log.debug("dxl: nixl: releasing a prepared list: %s", exc)
        self._host.forget(self._peer)


def _agent_of(blob: bytes) -> str | None:
    """The agent a NIXL metadata blob names: NIXL's serializer writes ``nixlSerDes|``, then
    its first field: the tag ``Agent``, a u64 length (native order) and the name."""
    tag = b"nixlSerDes|Agent"
    if not blob.startswith(tag) or len(blob) < len(tag) + 8:
        return None
    size = int.from_bytes(blob[len(tag) : len(tag) + 8], sys.byteorder)
    start = len(tag) + 8
    if size > 256 or len(blob) < start + size:
        return None
    try:
        return blob[start : start + size].decode()
    except UnicodeDecodeError:
        return None


def _descs(addrs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    out = np.zeros((addrs.size, 3), dtype=np.uint64)
    out[:, 0] = addrs
    out[:, 1] = lengths
    return out


def _nixl_error(exc: Exception) -> DxlError:
    """A NIXL exception as one of ours (their classes live in the loaded nixl_cuXX module)."""
    kind = type(exc).__name__
    if kind == "nixlRemoteDisconnectError":
        return PeerGone(f"NIXL: the peer disconnected ({exc})")
    if kind == "nixlNotFoundError":
        return NixlNotRegistered(f"NIXL: {exc}")
    return NixlFailed(f"NIXL: {kind}: {exc}")


def open_nixl(
    host: NixlHost | None,
    peer_cluster: int,
    peer_incarnation: str,
    peer_probe: Sequence[int],
    timeout_ms: int,
) -> NixlTransport:
    """The nixl transport of a new link (its peer's metadata comes later, in ``attach``).

    Raises:
        NixlRefused: no agent (dxl.Transport is not nixl), or no RDMA hardware and emulated
            RMA not allowed (``dxl.NixlAllowEmulated``), or nixl cannot start.
    """
    if host is None:
        raise NixlRefused("this engine has no NIXL agent (dxl.Transport is not nixl)")
    if not host.allow_emulated and not hardware_rma():
        raise NixlRefused(
            f"this host has no RDMA device ({IB_DEVICES} is empty), so UCX would emulate RMA "
            "over tcp/cma/shared memory, under which a linked NIXL peer can read and write "
            "any address of this process, not only registered caches; set "
            "dxl.NixlAllowEmulated=1 on a pair that trusts each other to allow it "
            "(docs/security.md)"
        )
    host.agent  # noqa: B018 (makes it: NixlRefused when nixl cannot start)
    peer = agent_name(peer_cluster, peer_incarnation)
    return NixlTransport(host, peer, peer_probe, timeout_ms)
