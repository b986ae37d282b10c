"""The benchmark's workload: cache shapes, one configuration, request block ids, verification.

Shapes follow the CPU anchors: each side owns L x 2 tensors, each its own allocation of N blocks
of B bytes with N = max(4k, cache / (2L * B)), so each side holds at least ``cache_mib`` (512 MiB
by default, more than a server L3); a request copies k random, distinct, unsorted block ids of
every tensor (k * 2L pieces) into the same ids on the other side, with k = 64 reduced so that a
request stays within 256 MiB (and within half the cache when ``cache_mib`` is shrunk). Request
ids are drawn from ``numpy.random.default_rng([seed, pass])``, so every system benchmarked with
the same seed moves the same blocks (``benchmarks/peers`` imports this module).
"""

from __future__ import annotations

import ctypes
import mmap
import re
from dataclasses import dataclass

import numpy as np

from ..testing import KVBuffers

TARGET_ID = 1
INITIATOR_ID = 2
SOURCE_SEED = 7  # KVBuffers pattern seed of the side that holds the data
DEFAULT_CACHE_MIB = 512
DEFAULT_K = 64
MAX_REQUEST_BYTES = 256 << 20
OPS = ("pull", "push")
APIS = ("async", "sync")


def shape_for(
    block_bytes: int, layers: int, cache_mib: int = DEFAULT_CACHE_MIB, k: int | None = None
) -> tuple[int, int]:
    """``(blocks per tensor, blocks per request)`` for a block size, as the anchors choose them.

    Args:
        block_bytes: B, bytes per block.
        layers: L; the cache has 2L tensors.
        cache_mib: least size of each side's cache.
        k: blocks per request; None picks 64, reduced to keep a request within
            ``min(256 MiB, cache / 2)``.
    """
    row = 2 * layers * block_bytes  # one block id across every tensor
    cache = cache_mib << 20
    if k is None:
        k = max(1, min(DEFAULT_K, min(MAX_REQUEST_BYTES, cache // 2) // row))
    blocks = max(4 * k, -(-cache // row))
    return blocks, k


LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Hosts:
    """Where the target and the initiator run: a network namespace each (None: the parent's)
    and the address the target listens on and the initiator connects from. The default is
    loopback; ``dxl bench --netns`` puts them in two namespaces joined by a veth pair, with a
    shared secret of the run (both engines' ``auth_token``: dxl listens on no address but
    loopback without one)."""

    target_ip: str = LOOPBACK
    initiator_ip: str = LOOPBACK
    target_ns: str | None = None
    initiator_ns: str | None = None
    auth_token: str | None = None


@dataclass(frozen=True)
class Workload:
    """One benchmark configuration, as sent to the target and initiator processes."""

    transport: str
    op: str
    api: str
    block_bytes: int
    layers: int
    num_blocks: int
    blocks_per_request: int
    requests: int = 20
    warmup: int = 3
    passes: int = 3
    concurrency: int = 1
    seed: int = 0
    transfer_threads: int | None = None
    baselines: str = "auto"  # "auto": memcpy, plus the raw socket when the link is tcp; "all"
    loop: str = "uvloop"
    mode: str = "bench"  # "bench" or "overhead"
    debug_corrupt: bool = False
    huge_pages: bool = False  # KV tensors on transparent huge pages (both sides), else 4 KiB
    memory: str = "registered"  # target memory: "registered" (framework's, default settings),
    # "private" / "shared" (the same with dxl.ShareRegistered off / on) or "allocated" (dxl's pool)
    tensors_override: int | None = None  # overhead mode: one tensor
    hosts: Hosts = Hosts()  # dxl's link and the raw socket baseline both run between them

    @property
    def tensors(self) -> int:
        return self.tensors_override or 2 * self.layers

    @property
    def pieces_per_request(self) -> int:
        return self.blocks_per_request * self.tensors

    @property
    def request_bytes(self) -> int:
        return self.pieces_per_request * self.block_bytes

    @property
    def cache_bytes(self) -> int:
        return self.tensors * self.num_blocks * self.block_bytes

    @property
    def label(self) -> str:
        """A short name for progress lines and tables, e.g. ``cma pull async c1 64K``."""
        return (
            f"{self.transport} {self.op} {self.api} c{self.concurrency} "
            f"{format_size(self.block_bytes)}"
        )


def format_size(n: int) -> str:
    """``4096 -> "4K"``, ``1048576 -> "1M"``, ``1000 -> "1000"``."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def pass_tables(
    seed: int, pass_index: int, num_blocks: int, k: int, count: int
) -> list[np.ndarray]:
    """``count`` requests of ``k`` random, distinct, unsorted block ids (int64) for one pass."""
    rng = np.random.default_rng([seed, pass_index])
    return [rng.choice(num_blocks, size=k, replace=False).astype(np.int64) for _ in range(count)]


_HUGE = 2 << 20


def _buffers(w: Workload, source: bool) -> KVBuffers:
    """KV tensors in private anonymous mappings (what a framework's allocator returns), advised
    before they are touched: MADV_HUGEPAGE (2 MiB aligned) with ``w.huge_pages``, else
    MADV_NOHUGEPAGE. Left to numpy, large arrays are advised MADV_HUGEPAGE, and whether they
    get huge pages then depends on free memory at fault time and on khugepaged, run to run."""
    size = w.num_blocks * w.block_bytes
    pad = _HUGE if w.huge_pages else 0
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    maps, addrs = [], []
    for _ in range(w.tensors):
        m = mmap.mmap(-1, size + pad, flags=flags)
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        offset = -base % _HUGE if pad else 0
        advice = "MADV_HUGEPAGE" if w.huge_pages else "MADV_NOHUGEPAGE"
        if hasattr(mmap, advice):
            m.madvise(getattr(mmap, advice), 0, size + pad)
        maps.append(m)
        addrs.append(base + offset)
    kv = KVBuffers.over(addrs, w.num_blocks, w.block_bytes, seed=SOURCE_SEED, fill=source)
    kv.mappings = maps  # type: ignore[attr-defined]  # the words view them: keep them alive
    if not source:
        clear(kv)  # touch every page now, as a framework's initialised KV cache would be
    return kv


def source_buffers(w: Workload) -> KVBuffers:
    """The side that holds the data: every word carries the ``SOURCE_SEED`` pattern."""
    return _buffers(w, source=True)


def destination_buffers(w: Workload) -> KVBuffers:
    """The side that receives: zeroed, every page touched."""
    return _buffers(w, source=False)


_VMA = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")


def thp_mib(*kvs: KVBuffers) -> float:
    """About how many MiB of the tensors of ``kvs`` sit on transparent huge pages now: the
    AnonHugePages of the mappings that hold them (/proc/self/smaps; neighbouring mappings the
    kernel merged with them count too, so it is capped at the tensors' size), 0 if unknown."""
    spans = [(a, a + kv.num_blocks * kv.block_bytes) for kv in kvs for a in kv.addrs]
    total_kib, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                m = _VMA.match(line)
                if m:
                    lo, hi = int(m.group(1), 16), int(m.group(2), 16)
                    inside = any(a < hi and lo < b for a, b in spans)
                elif inside and line.startswith("AnonHugePages:"):
                    total_kib += int(line.split()[1])
    except OSError:
        return 0.0
    return min(total_kib / 1024, sum(b - a for a, b in spans) / (1 << 20))


def clear(kv: KVBuffers) -> None:
    """Zero a destination again before a pass."""
    for words in kv.words:
        words.fill(0)


def corrupt(kv: KVBuffers, block: int) -> None:
    """Flip one bit of ``block`` in the last tensor (``--debug-corrupt``)."""
    kv.blocks(kv.num_tensors - 1)[block, 0] ^= np.uint64(1)


def verify(kv: KVBuffers, blocks: np.ndarray | list[int], strict: bool = False) -> bool:
    """True if every tensor's ``blocks`` of the destination ``kv`` hold the source pattern of
    the same block ids; with ``strict``, also that every other block is still zero."""
    ids = np.unique(np.asarray(blocks, dtype=np.int64))
    tensors = range(kv.num_tensors)
    if not kv.matches(tensors, ids, SOURCE_SEED, tensors, ids):
        return False
    if strict:
        others = np.setdiff1d(np.arange(kv.num_blocks, dtype=np.int64), ids)
        return all(not kv.blocks(t)[others].any() for t in tensors)
    return True
