"""HOST memory pools behind ``allocate_cache`` / ``allocate_blocks_cache`` (spec 4.1, 6.4-6.6).

A :class:`HostPool` is one ``llm.HostMemPoolConfig`` pool: a memfd of ``memory_size`` bytes
(rounded up to the pool's page size), mapped once in this process and cut into page-granular
allocations by a small free list. Backing it by a memfd rather than anonymous memory lets
same-host peers map the very same pages (the fd goes to them over a Unix socket with
SCM_RIGHTS, or they open ``/proc/<pid>/fd/<fd>``), so a pull from a pool cache becomes a plain
memcpy with no syscall per piece.

Huge pages: the mapping is advised ``MADV_HUGEPAGE``, but whether shared memory gets
transparent huge pages is the kernel's ``/sys/kernel/mm/transparent_hugepage/shmem_enabled``
setting, not the anonymous-memory one; with the common default ``never`` the pool stays on
4 KiB pages. :attr:`HostPool.huge_page_bytes` tells which case holds.

A DEVICE pool (``llm.MemPoolConfig``) needs CUDA and does not exist here: the engine answers
``LLM_FEATURE_NOT_ENABLED`` for DEVICE allocations.

Thread-safety: none. A pool is used only from its engine's event loop (allocation and
deallocation are quick, loop-side bookkeeping), so it takes no lock.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import warnings
from bisect import bisect_left
from typing import Final

import numpy as np

from .. import _ffi
from ..config import PoolConfig
from ..errors import LLMException, LLMStatusCode, fail

__all__ = ["HostPool", "allocate_tensors"]

_TOUCH_STRIDE: Final = 4096  # the smallest page size: touching one byte per 4 KiB faults all in
_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def _round_up(n: int, granule: int) -> int:
    return -(-n // granule) * granule


class HostPool:
    """One shared-memory HOST pool with page-granular first-fit allocation.

    Args:
        config: ``memory_size`` (rounded up to ``1 << page_shift``) and ``page_shift``.
        name: Pool name, used for the memfd (``/proc/<pid>/maps`` shows ``/memfd:<name>``) and
            in messages.
        prefault: Fault every page in now, so the first transfer does not pay page faults.

    Raises:
        LLMException: ``LLM_OUT_OF_MEMORY`` if the memory cannot be created, mapped or
            faulted in.

    Attributes:
        name: The pool name.
        page_size: Allocation granule in bytes; every size is rounded up to it, and every
            allocation starts at a multiple of it from :attr:`base`.
        size: Pool size in bytes (a multiple of :attr:`page_size`).
        fd: The memfd (close-on-exec, sealed against resizing so no peer can shrink it under
            us). Owned by the pool; a peer that maps it uses offsets from :meth:`offset_of`.
        base: Address of the mapping in this process, usable as a numpy/ctypes address.
    """

    __slots__ = (
        "_free_len",
        "_free_start",
        "_live",
        "_mmap",
        "base",
        "fd",
        "name",
        "page_size",
        "size",
    )

    def __init__(self, config: PoolConfig, name: str, *, prefault: bool = True) -> None:
        self.name = name
        self.page_size = config.page_size
        self.size = _round_up(config.memory_size, self.page_size)
        self._mmap: mmap.mmap | None = None
        self.fd = -1
        try:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(self.fd, self.size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            self._mmap = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED)
            # The mapping never moves; drop the buffer export at once so close() can unmap.
            anchor = ctypes.c_char.from_buffer(self._mmap)
            self.base = ctypes.addressof(anchor)
            del anchor
            # Advise before faulting in: a page's size is fixed when it is first faulted.
            self._advise(mmap.MADV_HUGEPAGE)
            if prefault:
                self._prefault()
        except OSError as exc:
            self._release()
            raise LLMException(
                f"host memory pool {name!r}: cannot create {self.size} bytes of shared memory: "
                f"{exc}",
                status_code=LLMStatusCode.LLM_OUT_OF_MEMORY,
            ) from exc
        # Free extents as offsets, sorted by start, never adjacent (merged on free).
        self._free_start: list[int] = [0]
        self._free_len: list[int] = [self.size]
        self._live: dict[int, int] = {}  # offset -> rounded length

    def _advise(self, advice: int) -> bool:
        assert self._mmap is not None
        try:
            self._mmap.madvise(advice)
        except OSError:  # EINVAL: kernel without THP, or advice unknown to it
            return False
        return True

    def _prefault(self) -> None:
        if _ffi.lib.dxl_prefault(self.base, self.size) == 0:
            return
        # It failed: write one byte per 4 KiB page (the memory is fresh, zeros change nothing).
        view = np.frombuffer(self._mmap, dtype=np.uint8)  # type: ignore[arg-type]
        view[::_TOUCH_STRIDE] = 0
        del view

    # -- allocation ---------------------------------------------------------------------------

    @property
    def used(self) -> int:
        """Bytes held by live allocations (rounded sizes)."""
        return sum(self._live.values())

    @property
    def free_bytes(self) -> int:
        """Bytes not allocated, in all free extents."""
        return sum(self._free_len)

    @property
    def largest_free(self) -> int:
        """Length of the largest free extent: the largest allocation that can succeed now."""
        return max(self._free_len, default=0)

    @property
    def live_count(self) -> int:
        """Number of live allocations."""
        return len(self._live)

    def rounded(self, nbytes: int) -> int:
        """``nbytes`` rounded up to the page size (what :meth:`alloc` takes for it)."""
        return _round_up(nbytes, self.page_size)

    def describe_free(self) -> str:
        """``"<free> bytes free, largest free extent <n> bytes"`` for messages."""
        return f"{self.free_bytes} bytes free, largest free extent {self.largest_free} bytes"

    def alloc(self, nbytes: int) -> int:
        """Allocate ``nbytes`` rounded up to the page size; first fit, lowest address first.

        The contents are unspecified: a new pool is zeroed, freed memory is not cleared.

        Returns:
            The address (in this process) of the allocation.

        Raises:
            TypeError: ``nbytes`` is not an int.
            LLMException: ``LLM_PARAM_INVALID`` for ``nbytes <= 0`` or a closed pool;
                ``LLM_OUT_OF_MEMORY`` (naming the pool, the request and what is free) if no
                free extent is large enough.
        """
        if not isinstance(nbytes, int):
            raise TypeError(f"nbytes must be int, got {type(nbytes).__name__}")
        self._check_open()
        if nbytes <= 0:
            raise LLMException(
                f"host memory pool {self.name!r}: allocation size must be > 0, got {nbytes}",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            )
        need = self.rounded(nbytes)
        i = next((k for k, n in enumerate(self._free_len) if n >= need), -1)
        if i < 0:
            raise LLMException(
                f"host memory pool {self.name!r} (size {self.size}) is out of memory: requested "
                f"{nbytes} bytes ({need} after rounding to the {self.page_size}-byte page), "
                f"{self.describe_free()}",
                status_code=LLMStatusCode.LLM_OUT_OF_MEMORY,
            )
        length = self._free_len[i]
        offset = self._free_start[i]
        if length == need:
            del self._free_start[i], self._free_len[i]
        else:
            self._free_start[i] += need
            self._free_len[i] -= need
        self._live[offset] = need
        return self.base + offset

    def free(self, addr: int) -> None:
        """Return an allocation to the pool, merging it with free neighbours.

        Raises:
            LLMException: ``LLM_PARAM_INVALID`` if ``addr`` is not the start of a live
                allocation of this pool (double free, foreign or interior address, closed pool).
        """
        self._check_open()
        length = self._live.pop(addr - self.base, None)
        if length is None:
            raise LLMException(
                f"host memory pool {self.name!r}: address {addr:#x} is not a live allocation "
                "of this pool (double free, or not allocated here)",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            )
        offset = addr - self.base
        starts, lens = self._free_start, self._free_len
        i = bisect_left(starts, offset)
        if i > 0 and starts[i - 1] + lens[i - 1] == offset:  # merge into the left neighbour
            i -= 1
            lens[i] += length
        else:
            starts.insert(i, offset)
            lens.insert(i, length)
        if i + 1 < len(starts) and starts[i] + lens[i] == starts[i + 1]:  # absorb the right one
            lens[i] += lens.pop(i + 1)
            del starts[i + 1]

    def offset_of(self, addr: int) -> int:
        """Offset of ``addr`` in the pool's memfd (what a peer that maps the fd adds to its base).

        Raises:
            LLMException: ``LLM_PARAM_INVALID`` if ``addr`` lies outside the pool.
        """
        offset = addr - self.base
        if not 0 <= offset < self.size:
            raise LLMException(
                f"host memory pool {self.name!r}: address {addr:#x} lies outside the pool "
                f"[{self.base:#x}, {self.base + self.size:#x})",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            )
        return offset

    def contains(self, addr: int, nbytes: int = 1) -> bool:
        """True if ``[addr, addr + nbytes)`` lies inside the pool's mapping."""
        return self.base <= addr and addr + nbytes <= self.base + self.size

    # -- diagnostics --------------------------------------------------------------------------

    @property
    def huge_page_bytes(self) -> int:
        """Bytes of the mapping backed by huge pages now (``ShmemPmdMapped`` in smaps); 0 when
        the kernel keeps shared memory on small pages, or on a kernel without smaps."""
        self._check_open()
        start = f"{self.base:x}-"
        try:
            with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
                found = False
                for line in f:
                    if not found:
                        found = line.startswith(start)
                    elif line.startswith(("ShmemPmdMapped:", "FilePmdMapped:")):
                        kib = int(line.split()[1])
                        if kib:
                            return kib << 10
                    elif line.startswith("VmFlags:"):
                        return 0
        except OSError:
            pass
        return 0

    # -- lifetime -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._mmap is None

    def _check_open(self) -> None:
        if self._mmap is None:
            raise LLMException(
                f"host memory pool {self.name!r} is closed",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            )

    def close(self, *, force: bool = False) -> None:
        """Unmap the pool and close its fd; idempotent.

        Peers that mapped the memfd keep their mapping (the pages live until the last one is
        unmapped); addresses in this process become invalid.

        Args:
            force: Close even with live allocations (engine finalize, after every cache that
                used them is gone); without it live allocations are refused.

        Raises:
            LLMException: ``LLM_FAILED`` if allocations are live and ``force`` is False.
        """
        if self._mmap is None:
            return
        if self._live and not force:
            raise LLMException(
                f"host memory pool {self.name!r}: close() with {len(self._live)} live "
                f"allocation(s) of {self.used} bytes; free them first or pass force=True",
                status_code=LLMStatusCode.LLM_FAILED,
            )
        self._live.clear()
        self._release()

    def _release(self) -> None:
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> HostPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(force=True)

    def __del__(self) -> None:
        if getattr(self, "_mmap", None) is not None:
            warnings.warn(
                f"host memory pool {self.name!r} was not closed", ResourceWarning, stacklevel=2
            )
            self._release()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"used={self.used}, {self.describe_free()}"
        return f"HostPool({self.name!r}, size={self.size}, page_size={self.page_size}, {state})"


def allocate_tensors(
    pool: HostPool, num_tensors: int, tensor_size: int, op: str = "allocate_cache"
) -> list[int]:
    """Allocate one region per tensor (the reference gives each tensor its own address).

    All or nothing: on failure every region taken so far is freed again, so the pool is left
    exactly as it was.

    Args:
        pool: The pool matching the cache's placement.
        num_tensors: Tensors of the cache, > 0.
        tensor_size: Bytes of one tensor (``CacheDesc.size``), > 0.
        op: Operation named in messages.

    Returns:
        The tensor addresses, in tensor order.

    Raises:
        LLMException: ``LLM_OUT_OF_MEMORY`` naming the pool, the request and what is free;
            ``LLM_PARAM_INVALID`` for a count or size <= 0.
    """
    if num_tensors <= 0 or tensor_size <= 0:
        raise fail(
            op,
            LLMStatusCode.LLM_PARAM_INVALID,
            f"num_tensors and the tensor size must be > 0, got {num_tensors} and {tensor_size}",
        )
    addrs: list[int] = []
    try:
        for _ in range(num_tensors):
            addrs.append(pool.alloc(tensor_size))
    except LLMException as exc:
        for addr in addrs:
            pool.free(addr)
        if exc.status_code != LLMStatusCode.LLM_OUT_OF_MEMORY:
            raise
        need = pool.rounded(tensor_size)
        raise fail(
            op,
            LLMStatusCode.LLM_OUT_OF_MEMORY,
            f"host memory pool {pool.name!r} (size {pool.size}) cannot hold {num_tensors} "
            f"tensor(s) of {tensor_size} bytes ({need} each after rounding to the "
            f"{pool.page_size}-byte page, {num_tensors * need} in all): {pool.describe_free()}",
        ) from None
    return addrs
