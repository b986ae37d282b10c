"""A dxl Engine in another process, driven by the test over a pipe.

The child owns KV buffers (``dxl.testing.KVBuffers``) and an Engine that listens on loopback;
the test sends commands (register, link, pull, push, read back, stop) and gets results or the
child's exception (type name, message, status code). Every wait has a deadline, so a broken
child fails the test instead of hanging it.

Request handoff (``engine.handoff``) has commands of its own: offer, offer_many,
offer_destination, fetch, renew, abort (optionally refilling blocks with a new pattern the
moment it returns), fill, handoff_push, push_layers, complete, finished (poll_finished as
dicts), live, layers_seen, handoff_stats, max_fetches. Commands run one at a time, but
``spawn`` starts one in a task of its own (returning a task id) and ``join`` waits for its
result, so a child can push and abort, or fetch and abort, at once. ``aio`` calls from a
coroutine without a thread (many peers at once); ``loop="uvloop"`` runs the child's engine on
uvloop.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import os
import signal
from typing import Any

import numpy as np
from waiting import wait_until

CTX = mp.get_context("spawn")
DEFAULT_DEADLINE_S = 30.0


class PeerError(Exception):
    """An operation failed inside the peer process."""

    def __init__(
        self,
        type_name: str,
        message: str,
        status_code: int | None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.status_code = status_code
        self.extra = extra or {}  # e.g. a FetchError's request_id and partial_blocks


class Peer:
    """Handle of a child process running one Engine."""

    def __init__(
        self,
        cluster_id: int,
        role: str = "PROMPT",
        options: dict[str, str] | None = None,
        netns: str | None = None,
        loop: str = "asyncio",
        wait: bool = True,
    ) -> None:
        opts = {"llm.listenIpInfo": "127.0.0.1:0", "dxl.HeartbeatIntervalMs": "200"}
        opts.update(options or {})
        self.cluster_id = cluster_id
        self._conn, child = CTX.Pipe()
        self.proc = CTX.Process(
            target=_child_main, args=(child, cluster_id, role, opts, netns, loop)
        )
        self.proc.start()
        child.close()
        self._alock: asyncio.Lock | None = None
        if wait:
            self.wait_ready()

    def wait_ready(self, deadline_s: float = DEFAULT_DEADLINE_S) -> None:
        """Wait for the child's engine to run (``wait=False`` starts many children at once)."""
        self.address, self.pid = self._wait_reply(deadline_s)

    def call(self, cmd: str, deadline_s: float = DEFAULT_DEADLINE_S, **kwargs: Any) -> Any:
        self._conn.send((cmd, kwargs))
        return self._wait_reply(deadline_s)

    async def acall(self, cmd: str, deadline_s: float = DEFAULT_DEADLINE_S, **kwargs: Any) -> Any:
        """``call`` from a coroutine: waits on a thread so this process's engine keeps running
        (the peer may need it to answer, e.g. to acknowledge a registry change)."""
        return await asyncio.to_thread(self.call, cmd, deadline_s, **kwargs)

    async def aio(self, cmd: str, deadline_s: float = DEFAULT_DEADLINE_S, **kwargs: Any) -> Any:
        """``call`` from a coroutine without a thread: the loop watches the pipe, so many peers
        can be driven at once (one command at a time per peer; ``spawn`` for more)."""
        if self._alock is None:
            self._alock = asyncio.Lock()
        async with self._alock:
            loop = asyncio.get_running_loop()
            ready = loop.create_future()
            fd = self._conn.fileno()
            self._conn.send((cmd, kwargs))
            loop.add_reader(fd, lambda: None if ready.done() else ready.set_result(None))
            try:
                async with asyncio.timeout(deadline_s):
                    await ready
            except TimeoutError:
                raise TimeoutError(
                    f"peer {self.cluster_id} gave no answer to {cmd} within {deadline_s} s"
                ) from None
            finally:
                loop.remove_reader(fd)
            return self._wait_reply(deadline_s)

    def _wait_reply(self, deadline_s: float) -> Any:
        if not self._conn.poll(deadline_s):
            raise TimeoutError(f"peer {self.cluster_id} gave no answer within {deadline_s} s")
        status, payload = self._conn.recv()
        if status == "err":
            raise PeerError(*payload)
        return payload

    def cluster_info(self):
        from dxl import LLMClusterInfo

        info = LLMClusterInfo()
        info.remote_cluster_id = self.cluster_id
        info.append_local_ip_info("127.0.0.1", 0)
        info.append_remote_ip_info(self.address[0], self.address[1])
        return info

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig``; for SIGSTOP, return only once the process really is stopped (signal
        delivery is asynchronous, and a test must not race the stop)."""
        pid = self.proc.pid
        assert pid is not None, "the peer process was never started"
        os.kill(pid, sig)
        if sig == signal.SIGSTOP:
            wait_until(
                lambda state: state in ("T", "t"),
                10,
                f"peer {self.cluster_id} (pid {pid}) to be stopped",
                observe=lambda: _state(pid),
            )

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("stop", deadline_s=10)
            except (TimeoutError, EOFError, BrokenPipeError, OSError):
                self.proc.kill()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self._conn.close()


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _state(pid: int) -> str:
    """The scheduler state letter of a process (R, S, T, Z...), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def _child_main(
    conn: Any,
    cluster_id: int,
    role: str,
    options: dict[str, str],
    netns: str | None,
    loop: str = "asyncio",
) -> None:
    if netns is not None:  # another "host": join its network namespace before any socket
        from dxl.bench.netns import enter_netns

        enter_netns(netns)
    if loop == "uvloop":
        import uvloop

        uvloop.run(_serve(conn, cluster_id, role, options))
    else:
        asyncio.run(_serve(conn, cluster_id, role, options))


async def _serve(conn: Any, cluster_id: int, role: str, options: dict[str, str]) -> None:
    import dxl
    from dxl.testing import KVBuffers

    loop = asyncio.get_running_loop()
    async with dxl.Engine(cluster_id, dxl.LLMRole[role], options) as eng:
        conn.send(("ok", (eng.listen_address, os.getpid())))
        buffers: dict[str, KVBuffers] = {}
        caches: dict[str, Any] = {}
        while True:
            cmd, kw = await loop.run_in_executor(None, conn.recv)
            try:
                result = await _handle(eng, buffers, caches, cmd, kw)
            except Exception as exc:  # reported to the test, which asserts on it
                conn.send(("err", _describe(exc)))
                continue
            conn.send(("ok", result))
            if cmd == "stop":
                return


def _describe(exc: BaseException) -> tuple[str, str, int | None, dict[str, Any]]:
    code = getattr(exc, "status_code", None)
    extra = {}
    from dxl.handoff import FetchError

    if isinstance(exc, FetchError):
        extra = {"request_id": exc.request_id, "partial_blocks": list(exc.partial_blocks)}
    return type(exc).__name__, str(exc), None if code is None else int(code), extra


# handoff state of the child: tasks started by "spawn", layers seen by on_layer callbacks
_TASKS: dict[int, asyncio.Task[Any]] = {}
_TASK_IDS = itertools.count(1)
_LAYERS: dict[str, list[list[int]]] = {}


def _layers(kw: dict) -> range | None:
    layers = kw.get("layers")
    return None if layers is None else range(*layers)


def _recorder(request_id: str) -> Any:
    seen = _LAYERS.setdefault(request_id, [])

    def on_layer(lo: int, hi: int) -> None:
        seen.append([lo, hi])

    return on_layer


async def _handle_handoff(eng: Any, buffers: dict, caches: dict, cmd: str, kw: dict) -> Any:
    """Handoff commands (see the module docstring); None if ``cmd`` is not one."""
    from patterns import refill

    h = eng.handoff
    if cmd == "offer":
        ticket = await h.offer(
            kw["request_id"],
            caches[kw["name"]],
            kw["blocks"],
            layers=_layers(kw),
            tensors_per_layer=kw.get("tensors_per_layer", 2),
            lease_s=kw.get("lease_s"),
            num_tokens=kw.get("num_tokens"),
        )
        return ticket.to_json()
    if cmd == "offer_many":  # [{request_id, blocks, [seed], [lease_s]}, ...] -> tickets (JSON)
        out = []
        for o in kw["offers"]:
            if "seed" in o:  # the request's own KV: a pattern of its seed in its blocks
                refill(buffers[kw["name"]], o["blocks"], o["seed"])
            ticket = await h.offer(
                o["request_id"], caches[kw["name"]], o["blocks"], lease_s=o.get("lease_s")
            )
            out.append(ticket.to_json())
        return out
    if cmd == "offer_destination":
        ticket = await h.offer_destination(
            kw["request_id"],
            caches[kw["name"]],
            kw["blocks"],
            layers=_layers(kw),
            tensors_per_layer=kw.get("tensors_per_layer", 2),
            lease_s=kw.get("lease_s"),
            on_layer=_recorder(kw["request_id"]),
        )
        return ticket.to_json()
    if cmd == "fetch":  # returns the layers on_layer saw (per_layer), in order
        seen: list[list[int]] = []
        await h.fetch(
            kw["ticket"],
            caches[kw["name"]],
            kw["blocks"],
            on_layer=(lambda lo, hi: seen.append([lo, hi])) if kw.get("per_layer") else None,
            timeout_s=kw.get("timeout_s"),
        )
        return seen
    if cmd == "renew":
        await h.renew(kw["ticket"])
        return None
    if cmd == "abort":  # then, at once, reuse blocks: give them a new pattern
        await h.abort(kw["ticket"])
        if "refill" in kw:
            refill(buffers[kw["name"]], kw["refill"], kw["seed"])
        return None
    if cmd == "fill":
        refill(buffers[kw["name"]], kw["blocks"], kw["seed"])
        return None
    if cmd == "handoff_push":
        await h.push(
            kw["ticket"],
            caches[kw["name"]],
            kw["blocks"],
            layers=_layers(kw),
            timeout_s=kw.get("timeout_s"),
        )
        return None
    if cmd == "push_layers":  # one push per layer of the ticket, then complete; -> layers pushed
        from dxl.handoff import Ticket

        t = Ticket.of(kw["ticket"])
        span = range(*t.layers) if t.layers else range(t.num_tensors // t.tensors_per_layer)
        pushed = 0
        for layer in span:
            await h.push(t, caches[kw["name"]], kw["blocks"], layers=range(layer, layer + 1))
            pushed += 1
        if kw.get("complete", True):
            await h.complete(t)
        return pushed
    if cmd == "complete":
        await h.complete(kw["ticket"], failed=kw.get("failed", ""))
        return None
    if cmd == "finished":
        return [
            {
                "request_id": f.request_id,
                "offer_id": f.offer_id,
                "kind": f.kind,
                "reason": f.reason.value,
                "peer": f.peer,
                "block_ids": f.block_ids,
                "detail": f.detail,
            }
            for f in h.poll_finished()
        ]
    if cmd == "live":
        return h.live()
    if cmd == "layers_seen":
        return _LAYERS.get(kw["request_id"], [])
    if cmd == "handoff_stats":
        return eng.stats()["handoff"]
    if cmd == "max_fetches":
        h.max_fetches = kw["n"]
        return None
    if cmd == "spawn":  # run a command in a task of its own; "join" gets its outcome
        tid = next(_TASK_IDS)
        _TASKS[tid] = asyncio.create_task(_handle(eng, buffers, caches, kw["command"], kw["args"]))
        return tid
    if cmd == "join":
        task = _TASKS[kw["tid"]]
        async with asyncio.timeout(kw.get("deadline_s", DEFAULT_DEADLINE_S)):
            await asyncio.wait([task])
        del _TASKS[kw["tid"]]
        return task.result()
    if cmd == "running":
        return not _TASKS[kw["tid"]].done()
    return _NOT_HANDOFF


_NOT_HANDOFF = object()


async def _handle(eng: Any, buffers: dict, caches: dict, cmd: str, kw: dict) -> Any:
    import dxl
    from dxl.testing import KVBuffers

    result = await _handle_handoff(eng, buffers, caches, cmd, kw)
    if result is not _NOT_HANDOFF:
        return result

    if cmd == "register":
        buf = KVBuffers(
            kw["num_tensors"],
            kw["num_blocks"],
            kw["block_bytes"],
            kw["seed"],
            fill=kw.get("fill", True),
        )
        if kw.get("contiguous"):
            keys = [dxl.CacheKey(eng.cluster_id, *k) for k in kw.get("keys", ())]
            cache = await eng.register_cache(
                buf.desc(), buf.addrs, keys, remote_accessible=kw.get("remote_accessible", True)
            )
        else:
            key = dxl.BlocksCacheKey(eng.cluster_id, kw["model_id"]) if "model_id" in kw else None
            cache = await eng.register_blocks_cache(
                buf.desc(), buf.addrs, key, remote_accessible=kw.get("remote_accessible", True)
            )
        buffers[kw["name"]] = buf
        caches[kw["name"]] = cache
        return cache.cache_id
    if cmd == "allocate":
        shape = [kw["num_blocks"], kw["block_bytes"] // 2]
        desc = dxl.CacheDesc(kw["num_tensors"], shape, dxl.DataType.DT_FLOAT16, dxl.Placement.HOST)
        if kw.get("contiguous"):
            keys = [dxl.CacheKey(eng.cluster_id, *k) for k in kw.get("keys", ())]
            cache = await eng.allocate_cache(desc, keys)
        else:
            cache = await eng.allocate_blocks_cache(
                desc, dxl.BlocksCacheKey(eng.cluster_id, kw.get("model_id", 0))
            )
        buffers[kw["name"]] = KVBuffers.over(
            cache.tensor_addrs, kw["num_blocks"], kw["block_bytes"], kw["seed"]
        )
        caches[kw["name"]] = cache
        return cache.cache_id
    if cmd == "deallocate":
        cache = caches.pop(kw["name"])
        buffers.pop(kw["name"])
        await (
            eng.deallocate_cache(cache)
            if not cache.is_blocks_cache
            else eng.deallocate_blocks_cache(cache)
        )
        return cache.tensor_addrs
    if cmd == "remove_key":
        await eng.remove_cache_key(dxl.CacheKey(eng.cluster_id, *kw["key"]))
        return None
    if cmd == "pool":
        pool = eng._registrations.pool
        return None if pool is None else {"used": pool.used, "live": pool.live_count}
    if cmd == "unregister":
        await eng.unregister_cache(caches.pop(kw["name"]).cache_id)
        buffers.pop(kw["name"])
        return None
    if cmd == "read":
        buf = buffers[kw["name"]]
        return [buf.blocks(t)[np.asarray(kw["blocks"])].tobytes() for t in kw["tensors"]]
    if cmd == "matches":
        return buffers[kw["name"]].matches(**kw["args"])
    if cmd == "untouched":
        return buffers[kw["name"]].untouched(kw["tensors"], kw["blocks"])
    if cmd == "link":
        info = dxl.LLMClusterInfo()
        info.remote_cluster_id = kw["cluster_id"]
        info.append_local_ip_info("127.0.0.1", 0)
        info.append_remote_ip_info(*kw["address"])
        ret, _ = await eng.link_clusters([info], kw.get("timeout", 3000))
        return int(ret)
    if cmd == "pull":
        await eng.pull_blocks(
            dxl.BlocksCacheKey(kw["cluster_id"], kw.get("model_id", 0)),
            caches[kw["name"]],
            kw["src_blocks"],
            kw["dst_blocks"],
            **kw.get("kwargs", {}),
        )
        return None
    if cmd == "push":
        await eng.push_blocks(
            dxl.BlocksCacheKey(kw["cluster_id"], kw.get("model_id", 0)),
            caches[kw["name"]],
            kw["src_blocks"],
            kw["dst_blocks"],
            **kw.get("kwargs", {}),
        )
        return None
    if cmd == "switch_role":
        await eng.switch_role(dxl.LLMRole[kw["role"]], kw.get("options"))
        return eng.listen_address
    if cmd == "unlink":
        info = dxl.LLMClusterInfo()
        info.remote_cluster_id = kw["cluster_id"]
        info.append_remote_ip_info(*kw["address"])
        ret, _ = await eng.unlink_clusters([info], force=kw.get("force", False))
        return int(ret)
    if cmd == "addrs":
        return buffers[kw["name"]].addrs
    if cmd == "links":
        return sorted(eng.stats()["links"])
    if cmd == "stats":
        return eng.stats()
    if cmd == "canary":  # unregistered memory an attacker would love to reach
        from dxl.testing import anonymous_words

        words = anonymous_words(kw.get("words", 4096))
        words[:] = np.arange(words.size, dtype=np.uint64) ^ np.uint64(0xC0FFEE)
        buffers["canary:" + kw["name"]] = words
        return int(words.ctypes.data), int(words.nbytes)
    if cmd == "canary_intact":
        words = buffers["canary:" + kw["name"]]
        return bool(
            np.array_equal(words, np.arange(words.size, dtype=np.uint64) ^ np.uint64(0xC0FFEE))
        )
    if cmd == "rss_kib":
        return _rss_kib()
    if cmd == "stop":
        return None
    raise ValueError(f"unknown command {cmd}")
