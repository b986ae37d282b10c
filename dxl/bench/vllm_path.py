"""``dxl bench --vllm``: the vLLM connector's own path, against the same-run limit.

Two fresh processes (spawn), a *prefill* and a *decode* worker, each a
:class:`~dxl.integrations.vllm.worker.WorkerSide` (the connector's worker half: a dxl engine on
its own loop thread) that registers its KV caches through ``register`` (what
``register_kv_caches`` calls), laid out as vLLM's CPU attention backend lays them out (no vLLM
import): one buffer ``[layers, num_blocks, num_kv_heads, block_size, head_size + head_size_v]``
of float16 in private anonymous memory (4 KiB pages, like :mod:`dxl.bench.workload`), one 4-D
view per layer (``LBHNC``), so a block of a layer (its K and V) is one span of ``B`` bytes.

Per request, driven as vLLM drives the connector, each side with its own
:class:`~dxl.integrations.vllm.scheduler.SchedulerSide`:

- prefill (untimed): the scheduler side plans the request's ``k`` blocks (the prompt is
  ``k * block_size`` tokens), the worker side offers them after the "forward"
  (``after_forward``, timed on its own as *offer*), ``request_finished`` returns the
  ``kv_transfer_params`` (the tickets), and the next step hands the offer over;
- decode (timed, the *load*): from ``get_num_new_matched_tokens`` with those params, through
  ``update_state_after_alloc`` (``k`` new block ids), the step's ``start_load_kv``, to
  ``get_transfer_results`` reporting the request in ``finished_recving`` (polled every
  ``POLL_S``, as vLLM polls once per step; so a load is over-timed by up to that).

Source block ids are ``k`` random distinct ids, destination ids a fixed random permutation of
them (the two schedulers allocate independently). Every pass verifies every destination block
byte for byte, and every offer must have ended on the prefill (``finished_sending``).

Baselines, same pass, alternating order, in the decode process: memcpy of the same pieces (block
``s`` of every layer to block ``perm[s]``) between two local caches of the same layout, with one
thread and with dxl's copy threads (the limit for same-host links), and for a tcp link raw TCP
to the prefill process with one stream and with as many as dxl opens (the limit for tcp).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..memory.plan import block_pieces
from ..testing import KVBuffers
from ..transport.names import TCP
from .baselines import RawSocketClient, RawSocketServer, copy_threads, memcpy_requests, tcp_streams
from .engines import LogCapture
from .handoff import poll_decode
from .measure import BenchFailure, median, percentiles_us, rounded
from .report import Progress, machine_line
from .workload import SOURCE_SEED, format_size, pass_tables

BLOCK_TOKENS = 16  # vLLM's block_size (tokens per block) on its CPU backend
HEAD_BYTES = BLOCK_TOKENS * 128 * 2  # one KV head of one block: K and V of 64 dims, float16
POLL_S = 0.0002  # how often the decode looks at get_transfer_results
WAIT_S = 120.0  # bound on one load / one pass's offers ending (a loaded machine is slow)
READY_TIMEOUT_S = 120.0
JOIN_TIMEOUT_S = 30
DONE = "FINISHED_LENGTH_CAPPED"
MAX_REQUEST_BYTES = 256 << 20


@dataclass(frozen=True)
class VllmWorkload:
    """One configuration: ``layers`` tensors (one per layer) of ``num_blocks`` blocks of
    ``block_bytes``; a request moves ``blocks_per_request`` blocks of every layer."""

    transport: str
    block_bytes: int
    layers: int
    num_blocks: int
    blocks_per_request: int
    requests: int = 20
    warmup: int = 3
    passes: int = 3
    seed: int = 0
    debug_corrupt: bool = False  # flip a bit of a destination block after each pass

    @property
    def request_bytes(self) -> int:
        return self.blocks_per_request * self.layers * self.block_bytes

    @property
    def heads(self) -> int:
        """num_kv_heads of the layout (head_size 64 + 64), or 1 head of B bytes."""
        return self.block_bytes // HEAD_BYTES if self.block_bytes % HEAD_BYTES == 0 else 1

    @property
    def label(self) -> str:
        return f"vllm {self.transport} {format_size(self.block_bytes)}"


def shape(block_bytes: int, layers: int, cache_mib: int, k: int | None) -> tuple[int, int]:
    """``(blocks per layer, blocks per request)``: each side holds at least ``cache_mib``; a
    request 128 blocks (the bench's 64 of a K and a V tensor), fewer to stay within
    ``min(256 MiB, cache / 2)``."""
    row = layers * block_bytes
    cache = cache_mib << 20
    if k is None:
        k = max(1, min(128, min(MAX_REQUEST_BYTES, cache // 2) // row))
    return max(4 * k, -(-cache // row)), k


def workloads(
    transports: Sequence[str],
    sizes: Sequence[int],
    layers: int,
    cache_mib: int,
    k: int | None,
    requests: int,
    warmup: int,
    passes: int,
    seed: int,
    debug_corrupt: bool = False,
) -> list[VllmWorkload]:
    """Every configuration, block size outermost. Raises SystemExit for a block size that is
    not a float16 layout of 16 tokens (a multiple of 32 bytes) or a request that does not fit."""
    out = []
    for bb in sizes:
        if bb % (2 * BLOCK_TOKENS):
            raise SystemExit(
                f"dxl bench --vllm: a block of {bb} bytes is not {BLOCK_TOKENS} tokens of "
                "float16 heads: use a multiple of 32 bytes"
            )
        blocks, kk = shape(bb, layers, cache_mib, k)
        if kk > blocks:
            raise SystemExit(f"dxl bench: --blocks-per-request {kk} exceeds {blocks} blocks")
        for t in transports:
            out.append(
                VllmWorkload(
                    t, bb, layers, blocks, kk, requests, warmup, passes, seed, debug_corrupt
                )
            )
    return out


# ------------------------------------------------------------------------- vLLM's objects


class _Tensor:
    """What ``register_kv_caches`` reads of a torch tensor, over a numpy view."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape = tuple(array.shape)
        self.device = SimpleNamespace(type="cpu")

    def stride(self) -> tuple[int, ...]:
        return tuple(s // self.array.itemsize for s in self.array.strides)

    def data_ptr(self) -> int:
        return int(self.array.ctypes.data)

    def element_size(self) -> int:
        return int(self.array.itemsize)


@dataclass
class _Request:
    """The part of ``vllm.v1.request.Request`` the connector's scheduler side reads."""

    request_id: str
    num_prompt_tokens: int
    kv_transfer_params: dict[str, Any] | None
    prompt_token_ids: list[int] | None  # mutable attribute: typed as RequestLike types it
    num_computed_tokens: int = 0
    status: str = "RUNNING"


@dataclass
class KVCaches:
    """vLLM's CPU KV caches: one buffer, one ``[B, H, N, C]`` view per layer (``LBHNC``)."""

    w: VllmWorkload
    fill: bool
    tensors: dict[str, _Tensor] = field(init=False)
    kv: KVBuffers = field(init=False)

    def __post_init__(self) -> None:
        w = self.w
        size = w.layers * w.num_blocks * w.block_bytes
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # 4 KiB pages, as the throughput bench
            self._map.madvise(mmap.MADV_NOHUGEPAGE, 0, size)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        flat = np.ctypeslib.as_array((ctypes.c_uint16 * (size // 2)).from_address(base))
        heads = w.heads
        dims = (w.layers, w.num_blocks, heads, BLOCK_TOKENS, w.block_bytes // heads // 32)
        full = flat.view(np.float16).reshape(dims)
        self.tensors = {
            f"model.layers.{i}.self_attn.attn": _Tensor(full[i]) for i in range(w.layers)
        }
        addrs = [t.data_ptr() for t in self.tensors.values()]
        self.kv = KVBuffers.over(addrs, w.num_blocks, w.block_bytes, SOURCE_SEED, fill=self.fill)
        if not self.fill:
            self.clear()  # every page touched, as an initialised cache

    def clear(self) -> None:
        for words in self.kv.words:
            words.fill(0)


def prompt_of(rid: str, tokens: int) -> list[int]:
    """The request's prompt token ids (both sides know them: the router sends the prompt)."""
    salt = sum(rid.encode())
    return [(1000 + 7919 * (i + salt)) % 151_000 for i in range(tokens)]


def _config(w: VllmWorkload) -> Any:
    from ..integrations.vllm.config import DxlConnectorConfig

    return DxlConnectorConfig(transport=w.transport)


def _worker(w: VllmWorkload, caches: KVCaches) -> Any:
    from ..integrations.vllm.worker import WorkerSide

    side = WorkerSide(_config(w))
    side.register(caches.tensors, w.num_blocks)
    return side


def _wait_results(side: Any, want: str, rids: set[str], why: str) -> Any:
    """Poll ``side.results()`` until every request of ``rids`` is in its ``want`` field."""
    from ..integrations.vllm.worker import TransferResults

    seen = TransferResults()
    deadline = time.monotonic() + WAIT_S
    while True:
        r = side.results()
        for name in ("finished_sending", "finished_recving", "failed_recving"):
            getattr(seen, name).update(getattr(r, name))
        if rids <= getattr(seen, want):
            return seen
        if time.monotonic() > deadline:
            raise BenchFailure(f"{why}: not reported within {WAIT_S:.0f} s")
        time.sleep(POLL_S)


# ------------------------------------------------------------------------------- prefill


def prefill_main(w: VllmWorkload, conn: Connection, verbose: bool = False) -> None:
    """Process entry (spawn): offer requests the decode asks for, until it says done."""
    from ..integrations.vllm.scheduler import SchedulerSide

    logs = LogCapture(verbose)
    side: Any = None
    raw: RawSocketServer | None = None
    try:
        caches = KVCaches(w, fill=True)
        side = _worker(w, caches)
        raw = RawSocketServer(w.request_bytes)
        sched = SchedulerSide(_config(w), BLOCK_TOKENS)
        sched.set_handshake({0: side.handshake})
        tables: dict[str, list[int]] = {}
        conn.send(("ready", {"raw_port": raw.port}))
        while True:
            msg = conn.recv()
            if msg[0] == "done":
                return
            if msg[0] == "offer":  # -> (params, seconds in after_forward)
                rid, src = msg[1], msg[2]
                tokens = len(src) * BLOCK_TOKENS
                req = _Request(rid, tokens, {"do_remote_decode": True}, prompt_of(rid, tokens))
                tables[rid] = src
                sched.after_alloc(req, list, 0)
                plan = sched.build_plan({rid: tokens}, (), tables.__getitem__)
                req.num_computed_tokens = tokens
                side.start(plan)
                t0 = time.perf_counter()
                side.after_forward(plan)
                took = time.perf_counter() - t0
                req.status = DONE
                delay, params = sched.request_finished(req, src)
                if not delay or params is None:
                    raise BenchFailure(f"request {rid} was not handed off: {params!r}")
                side.start(sched.build_plan({}, (), tables.__getitem__))  # the hand-over
                conn.send(("ok", (params, took)))
            elif msg[0] == "ended":  # every offer of these requests ended (fetched)
                rids = set(msg[1])
                _wait_results(side, "finished_sending", rids, "offers ending")
                for rid in rids:
                    tables.pop(rid, None)
                conn.send(("ok", True))
            elif msg[0] == "why":
                conn.send(("ok", logs.why()))
    except (EOFError, OSError):
        return
    except Exception as exc:
        if verbose:
            traceback.print_exc()
        detail = logs.why()
        with contextlib.suppress(OSError):
            conn.send(
                (
                    "error",
                    f"prefill: {type(exc).__name__}: {exc}" + (f" ({detail})" if detail else ""),
                )
            )
    finally:
        if raw is not None:
            raw.close()
        if side is not None:
            side.shutdown()


# -------------------------------------------------------------------------------- decode


class _Prefill:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def ask(self, *msg: Any) -> Any:
        self.conn.send(msg)
        if not self.conn.poll(WAIT_S):
            raise BenchFailure(f"the prefill did not answer {msg[0]!r} within {WAIT_S:.0f} s")
        kind, value = self.conn.recv()
        if kind != "ok":
            raise BenchFailure(str(value))
        return value


class _Decode:
    """The decode worker, its scheduler side, and the baselines over the same pieces."""

    def __init__(self, w: VllmWorkload, prefill: _Prefill, info: dict[str, Any]) -> None:
        from ..integrations.vllm.scheduler import SchedulerSide

        self.w = w
        self.prefill = prefill
        self.caches = KVCaches(w, fill=False)
        self.source = KVCaches(w, fill=True)  # the memcpy baseline's local source
        self.side = _worker(w, self.caches)
        self.sched = SchedulerSide(_config(w), BLOCK_TOKENS)
        self.perm = np.random.default_rng([w.seed, 1 << 21]).permutation(w.num_blocks)
        self.threads = copy_threads(None)  # the connector leaves transfer_threads to the engine
        self.sock: RawSocketClient | None = None
        self.streams: RawSocketClient | None = None
        if w.transport == TCP:
            self.sock = RawSocketClient(info["raw_port"], w.request_bytes)
            n = tcp_streams(w.request_bytes)
            if n > 1:
                self.streams = RawSocketClient(info["raw_port"], w.request_bytes, n)
        self.count = 0
        self.gbps: list[float] = []
        self.p50s: list[float] = []
        self.p99s: list[float] = []
        self.offers: list[float] = []
        self.base: dict[str, list[float]] = {
            "memcpy": [],
            "memcpy_limit": [],
            "raw_socket": [],
            "raw_socket_limit": [],
        }

    def load(self, src: np.ndarray) -> tuple[float, float]:
        """One request through both sides; ``(decode load seconds, prefill offer seconds)``."""
        self.count += 1
        rid = f"req-{self.count}"
        params, offer_s = self.prefill.ask("offer", rid, src.tolist())
        dst = [int(b) for b in self.perm[src]]
        tokens = len(dst) * BLOCK_TOKENS
        req = _Request(rid, tokens, params, prompt_of(rid, tokens))
        t0 = time.perf_counter()
        count, is_async = self.sched.num_new_matched_tokens(req, 0)
        if (count, is_async) != (tokens, True):
            raise BenchFailure(f"the decode's scheduler refused the tickets: {(count, is_async)}")
        self.sched.after_alloc(req, lambda: dst, count)
        self.side.start(self.sched.build_plan({}, (), lambda r: []))
        got = _wait_results(self.side, "finished_recving", {rid}, f"load of {rid}")
        took = time.perf_counter() - t0
        self.sched.finished_recving([rid])
        if got.failed_recving:
            raise BenchFailure(f"load of {rid} failed: {self.prefill.ask('why')}")
        return took, offer_s

    def dxl_pass(self, tables: list[np.ndarray]) -> bool:
        w = self.w
        self.caches.clear()
        times = [self.load(t) for t in tables]
        lat = [t for t, _ in times[w.warmup :]]
        first = self.count - len(tables) + 1
        self.prefill.ask("ended", [f"req-{i}" for i in range(first, self.count + 1)])
        self.gbps.append(w.requests * w.request_bytes / sum(lat) / 1e9)
        p50, p99 = percentiles_us(lat)
        self.p50s.append(p50)
        self.p99s.append(p99)
        self.offers.append(percentiles_us([o for _, o in times[w.warmup :]])[0])
        src = np.unique(np.concatenate(tables))
        if w.debug_corrupt:
            self.caches.kv.blocks(w.layers - 1)[self.perm[src[0]], 0] ^= np.uint64(1)
        layers = range(w.layers)
        return self.caches.kv.matches(layers, self.perm[src], SOURCE_SEED, layers, src)

    def baselines(self, tables: list[np.ndarray]) -> None:
        w = self.w
        nbytes = w.requests * w.request_bytes
        dst = np.asarray(self.caches.kv.addrs, dtype=np.uint64)
        src = np.asarray(self.source.kv.addrs, dtype=np.uint64)
        plans = [block_pieces(dst, src, self.perm[t], t, w.block_bytes) for t in tables]
        for name, threads in (("memcpy", 1), ("memcpy_limit", self.threads)):
            memcpy_requests(plans[: w.warmup], threads)
            wall, _ = memcpy_requests(plans[w.warmup :], threads)
            self.base[name].append(nbytes / wall / 1e9)
        for name, client in (
            ("raw_socket", self.sock),
            ("raw_socket_limit", self.streams or self.sock),
        ):
            if client is not None:
                client.requests("pull", w.request_bytes, w.warmup)
                wall, _ = client.requests("pull", w.request_bytes, w.requests)
                self.base[name].append(nbytes / wall / 1e9)

    def link_transport(self) -> str:
        links = self.side.engine.stats()["links"]
        return str(next(iter(links.values()))["transport"]) if links else "?"

    def close(self) -> None:
        for client in (self.sock, self.streams):
            if client is not None:
                client.close()
        self.side.shutdown()


def _measure(w: VllmWorkload, d: _Decode, progress: Callable[[int, str], None]) -> dict[str, Any]:
    verified = True
    for p in range(w.passes):
        tables = pass_tables(w.seed, p, w.num_blocks, w.blocks_per_request, w.warmup + w.requests)
        order = ("dxl", "baselines") if p % 2 == 0 else ("baselines", "dxl")
        for name in order:  # alternating, so drift and noise hit both alike
            progress(0, f"{w.label}: pass {p + 1}/{w.passes} {name}")
            if name == "dxl":
                verified &= d.dxl_pass(tables)
            else:
                d.baselines(tables)
            progress(1, f"{w.label}: pass {p + 1}/{w.passes} {name}")
    link = d.link_transport()
    match = "raw_socket" if link == TCP else "memcpy"
    g = median(d.gbps)
    one, limit = median(d.base[match]), median(d.base[f"{match}_limit"])
    ok = verified
    return {
        "link_transport": link,
        "gbps": round(g, 3) if ok else None,
        "baseline": match,
        "baseline_gbps": round(one, 3),
        "ratio": round(g / one, 3) if ok else None,
        "limit": match,
        "limit_parallel": (d.streams.streams if d.streams else 1)
        if match == "raw_socket"
        else d.threads,
        "limit_gbps": round(limit, 3),
        "limit_ratio": round(g / limit, 3) if ok else None,
        "limit_passes": rounded(d.base[f"{match}_limit"]),
        "p50_us": round(median(d.p50s), 1) if ok else None,
        "p99_us": round(median(d.p99s), 1) if ok else None,
        "offer_p50_us": round(median(d.offers), 1) if ok else None,
        "gbps_passes": rounded(d.gbps) if ok else None,
        "baselines": {
            k: {"gbps": round(median(v), 3), "passes": rounded(v)} for k, v in d.base.items() if v
        },
        "verified": ok,
        "error": None if ok else "destination bytes differ from the source: UNVERIFIED",
    }


def decode_main(
    w: VllmWorkload, to_prefill: Connection, parent: Connection, verbose: bool = False
) -> None:
    """Process entry (spawn): drive both sides, send ``("result", fields)`` to the parent."""
    logs = LogCapture(verbose)
    prefill = _Prefill(to_prefill)
    d: _Decode | None = None

    def progress(units: int, label: str) -> None:
        parent.send(("progress", units, label))

    try:
        if not to_prefill.poll(READY_TIMEOUT_S):
            raise BenchFailure(f"the prefill did not start within {READY_TIMEOUT_S:.0f} s")
        kind, info = to_prefill.recv()
        if kind != "ready":
            raise BenchFailure(str(info))
        progress(1, f"{w.label}: registered")
        d = _Decode(w, prefill, info)
        fields = _measure(w, d, progress)
    except BenchFailure as exc:
        fields = {"error": str(exc)}
    except Exception as exc:
        if verbose:
            traceback.print_exc()
        detail = logs.why()
        fields = {
            "error": f"{type(exc).__name__}: {exc}" + (f" (dxl log: {detail})" if detail else "")
        }
    finally:
        with contextlib.suppress(OSError):
            to_prefill.send(("done",))
        if d is not None:
            d.close()
    parent.send(("result", fields))


# -------------------------------------------------------------------------------- parent


def units_for(w: VllmWorkload) -> int:
    return 1 + 2 * w.passes


def row_base(w: VllmWorkload) -> dict[str, Any]:
    from .. import __version__

    return {
        "mode": "vllm",
        "label": w.label,
        "transport": w.transport,
        "block_bytes": w.block_bytes,
        "layers": w.layers,
        "tensors": w.layers,
        "kv_heads": w.heads,
        "block_tokens": BLOCK_TOKENS,
        "num_blocks": w.num_blocks,
        "blocks_per_request": w.blocks_per_request,
        "pieces_per_request": w.blocks_per_request * w.layers,
        "request_bytes": w.request_bytes,
        "requests": w.requests,
        "warmup": w.warmup,
        "passes": w.passes,
        "transfer_threads": copy_threads(None),
        "seed": w.seed,
        "dxl_version": __version__,
        "cpus": os.cpu_count(),
        "machine": machine_line(),
        "load_1m": round(os.getloadavg()[0], 2),
    }


def run_one(
    w: VllmWorkload, progress: Progress, timeout_s: float, verbose: bool = False
) -> dict[str, Any]:
    """Measure one configuration in a fresh prefill + decode process pair; its row."""
    ctx = mp.get_context("spawn")
    progress.label(f"{w.label}: starting")
    a, b = ctx.Pipe()
    results, theirs = ctx.Pipe(duplex=False)
    prefill = ctx.Process(target=prefill_main, args=(w, a, verbose), name="dxl-vllm-prefill")
    decode = ctx.Process(target=decode_main, args=(w, b, theirs, verbose), name="dxl-vllm-decode")
    prefill.start()
    decode.start()
    for end in (a, b, theirs):
        end.close()
    fields: dict[str, Any] | None = None
    done = 0
    deadline = time.monotonic() + timeout_s
    try:
        while fields is None:
            fields, units = poll_decode(results, decode, progress, deadline, timeout_s)
            done += units
    finally:
        progress.advance(max(0, units_for(w) - done), w.label)
        clean = fields is not None and not fields.get("error")
        for proc in (decode, prefill):
            proc.join(JOIN_TIMEOUT_S if clean else 5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()
    row = {**row_base(w), **fields}
    row.setdefault("verified", False)
    if row.get("error"):
        row["verified"] = False
        for key in ("gbps", "ratio", "limit_ratio", "p50_us", "p99_us"):
            row[key] = None
    return row


def run_all(
    todo: list[VllmWorkload],
    progress: Progress,
    timeout_s: float,
    on_row: Callable[[dict[str, Any]], None],
    verbose: bool = False,
) -> list[dict[str, Any]]:
    rows = []
    for w in todo:
        row = run_one(w, progress, timeout_s, verbose)
        rows.append(row)
        on_row(row)
    return rows
