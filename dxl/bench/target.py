"""The target process: owns the remote cache, serves dxl links and the raw socket baseline.

For a pull it holds the source pattern; for a push it is the destination, and the initiator
asks it over the control pipe to clear its cache before a pass and to verify the blocks a pass
wrote. Messages (pipe, initiator -> target): ``("clear",)``, ``("verify", blocks, strict)``,
``("corrupt", block)``, ``("cpu",)`` (this process's CPU seconds), ``("done",)``; each is
answered ``("ok", value)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import traceback
from multiprocessing.connection import Connection
from typing import Any

from .baselines import RawSocketServer
from .engines import LogCapture, engine_config, run_loop
from .netns import enter_netns
from .workload import (
    SOURCE_SEED,
    TARGET_ID,
    Workload,
    clear,
    corrupt,
    destination_buffers,
    source_buffers,
    thp_mib,
    verify,
)


async def _serve(w: Workload, conn: Connection, logs: LogCapture) -> None:
    from .. import BlocksCacheKey, CacheDesc, DataType, Engine, LLMRole, Placement
    from ..testing import KVBuffers

    loop = asyncio.get_running_loop()
    raw = RawSocketServer(w.request_bytes, w.hosts.target_ip)
    cfg = engine_config(w, listen=True)
    if w.memory in ("private", "shared"):  # else the default: dxl.ShareRegistered unset
        cfg.share_registered = w.memory == "shared"
    if w.memory == "allocated":  # dxl's memfd pool: one region per tensor, 64 KiB pages
        per_tensor = -(-w.num_blocks * w.block_bytes // (64 << 10)) * (64 << 10)
        cfg.host_mem_pool_cfg = json.dumps(
            {"memory_size": w.tensors * per_tensor, "page_shift": 16}
        )
    try:
        async with Engine(TARGET_ID, LLMRole.PROMPT, cfg) as eng:
            key = BlocksCacheKey(TARGET_ID, 0)
            if w.memory == "allocated":
                desc = CacheDesc(
                    w.tensors,
                    [w.num_blocks, w.block_bytes // 2],
                    DataType.DT_FLOAT16,
                    Placement.HOST,
                )
                cache = await eng.allocate_blocks_cache(desc, key)
                kv = KVBuffers.over(
                    cache.tensor_addrs,
                    w.num_blocks,
                    w.block_bytes,
                    seed=SOURCE_SEED,
                    fill=w.op == "pull",
                )
                if w.op != "pull":
                    clear(kv)
            else:
                kv = source_buffers(w) if w.op == "pull" else destination_buffers(w)
                await eng.register_blocks_cache(kv.desc(), kv.addrs, key, remote_accessible=True)
            conn.send(
                (
                    "ready",
                    {
                        "address": eng.listen_address,
                        "pid": os.getpid(),
                        "raw_port": raw.port,
                        "addrs": kv.addrs,
                    },
                )
            )
            while True:
                try:
                    msg = await loop.run_in_executor(None, conn.recv)
                except EOFError:
                    return
                kind = msg[0]
                result: Any = True
                if kind == "done":
                    conn.send(("ok", True))
                    return
                if kind == "clear":
                    await loop.run_in_executor(None, clear, kv)
                elif kind == "verify":
                    result = await loop.run_in_executor(None, verify, kv, msg[1], msg[2])
                elif kind == "corrupt":
                    corrupt(kv, msg[1])
                elif kind == "thp":
                    result = thp_mib(kv)
                elif kind == "cpu":  # CPU seconds of this process so far, every thread
                    use = resource.getrusage(resource.RUSAGE_SELF)
                    result = use.ru_utime + use.ru_stime
                elif kind == "why":
                    result = logs.why()
                else:
                    result = f"unknown message {kind!r}"
                conn.send(("ok", result))
    finally:
        raw.close()


def target_main(w: Workload, conn: Connection, verbose: bool = False) -> None:
    """Process entry (spawn): serve until the initiator says done or goes away."""
    logs = LogCapture(verbose)
    try:
        if w.hosts.target_ns is not None:  # before any socket or thread of this process
            enter_netns(w.hosts.target_ns)
        run_loop(_serve(w, conn, logs), w.loop)
    except Exception as exc:
        detail = logs.why()
        msg = f"target failed: {type(exc).__name__}: {exc}" + (f" ({detail})" if detail else "")
        if verbose:
            traceback.print_exc()
        with contextlib.suppress(OSError):
            conn.send(("error", msg))
