"""Engine set-up shared by the target and initiator processes: options, event loop, log capture."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from typing import Any, TypeVar

from ..config import LLMConfig
from ..transport.names import NIXL
from ..types import LLMClusterInfo
from .workload import TARGET_ID, Workload

T = TypeVar("T")

SYNC_KV_TIMEOUT_MS = 120_000  # a slow noisy pass must not turn into a transfer timeout


def engine_config(w: Workload, listen: bool) -> LLMConfig:
    """The LLMConfig both sides use: the asked transport, threads and generous limits."""
    cfg = LLMConfig()
    if listen:
        cfg.listen_ip_info = f"{w.hosts.target_ip}:0"
    cfg.transport = w.transport
    if w.hosts.auth_token is not None:
        cfg.auth_token = w.hosts.auth_token
    if w.transport == NIXL:  # the bench's two processes are its own: emulated RMA is fine
        cfg.nixl_allow_emulated = True
    cfg.sync_kv_timeout = SYNC_KV_TIMEOUT_MS
    cfg.max_registered_addrs = max(240, 2 * w.tensors)
    if w.transfer_threads is not None:
        cfg.transfer_threads = w.transfer_threads
    return cfg


def cluster_info(address: tuple[str, int], local_ip: str) -> LLMClusterInfo:
    """How the initiator (at ``local_ip``) names the target in ``link_clusters``."""
    info = LLMClusterInfo()
    info.remote_cluster_id = TARGET_ID
    info.append_local_ip_info(local_ip, 0)
    info.append_remote_ip_info(*address)
    return info


def new_loop(name: str) -> asyncio.AbstractEventLoop:
    """A uvloop loop when ``name`` is "uvloop" and uvloop is installed, else asyncio's."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            return asyncio.new_event_loop()
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_loop(coro: Coroutine[Any, Any, T], loop: str) -> T:
    """Run ``coro`` to completion on a :func:`new_loop`."""
    with asyncio.Runner(loop_factory=lambda: new_loop(loop)) as runner:
        return runner.run(coro)


class LogCapture(logging.Handler):
    """Keeps dxl's recent warnings and errors so a failed configuration can say why, instead of
    writing them across the progress bar."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__(logging.WARNING)
        self.lines: deque[str] = deque(maxlen=8)
        log = logging.getLogger("dxl")
        log.addHandler(self)
        log.propagate = verbose

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def why(self) -> str:
        return "; ".join(self.lines)
