"""Registered framework memory moved onto shared memory in place (``dxl.ShareRegistered``).

A same-host pull from private memory is ``process_vm_readv``, which pins and walks the owner's
page tables for every 4 KiB page: on 4 KiB pages it reaches about half of memcpy. Memory that
lives in a memfd can instead be mapped by the peer once, and its pulls become a memcpy. Caches
that dxl allocates already live in its memfd pool (:mod:`dxl.pool`); with this option, caches
that the framework allocated and registers are moved onto a memfd at registration: the same
addresses and bytes, now backed by shared memory (``dxl_share_in_place``).

Only whole pages inside a registered tensor move (a tensor's first and last partial page stay
private and keep going through cma), and only from private anonymous read-write mappings with no
unusual flags: the ``brk`` heap, memory that is locked, or that a device or NIC may have pinned
(device mappings, ``MADV_DONTFORK``), is left alone. Nothing tells from user space that one
page was pinned with ``cudaHostRegister``: such a device would keep using the old pages. So the
option, while unset, shares only where the process shows no sign of any pinning at all
(:func:`dxl.memory.pins.pin_hazard`: no GPU/RDMA runtime or device mapped, ``VmPin`` 0), and
leaves memory on transparent huge pages alone there (a memfd would give its owner 4 KiB pages;
cma on huge pages is near memcpy already).

Safety: the move write-protects each chunk with userfaultfd, so a write by another thread during
the move waits and then lands on the new page (never lost); without userfaultfd write protection
nothing moves. The memfds are sealed against shrinking and growing. Shares are process-wide
(several engines, or caches, may register the same memory) and counted: when the last
registration using a span goes, its pages become private again (a private mapping of the same
bytes: ``fork()`` copies them, and no peer sees later writes) and the memfd is closed.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import threading
from dataclasses import dataclass

from .. import _ffi
from .pins import pin_hazard

log = logging.getLogger("dxl")

PAGE = mmap.PAGESIZE
MEMFD_NAME = "/memfd:dxl-share"  # how /proc/<pid>/maps names our memfds (dxl_share.c)
# VmFlags of plain read-write heap memory (proc(5)); anything else (locked, I/O or PFN
# mappings, do-not-copy-on-fork as RDMA registration sets it, userfaultfd...) keeps its pages.
_PLAIN_FLAGS = frozenset(
    {"rd", "wr", "sh", "mr", "mw", "me", "ms", "ac", "nr", "sd", "hg", "nh", "mg", "sf", "ht"}
)
_VMA_HEAD = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")


@dataclass(frozen=True, slots=True)
class Window:
    """Pages ``[base, base + size)`` of this process, at ``offset`` in the memfd ``fd``
    (whose inode is ``ino``, so a peer can tell a reused fd number)."""

    fd: int
    ino: int
    offset: int
    base: int
    size: int

    def wire(self) -> list[int]:
        """As peers map it: :meth:`dxl.transport.CmaTransport.map_shared`'s order."""
        return [self.fd, self.offset, self.base, self.size, self.ino]


@dataclass(slots=True)
class _Span:
    start: int
    end: int
    fd: int
    ino: int
    refs: int = 0
    # shared by the automatic default: given back only while nothing can have pinned its pages
    careful: bool = False


class SharedMemory:
    """The process's shared spans, and the rules to add and drop them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the table; never held across a copy
        self._share_lock = threading.Lock()  # one share at a time: spans never race to exist
        self._spans: list[_Span] = []

    def share(self, ranges: list[tuple[int, int]], auto: bool = False) -> list[Window]:
        """Share the whole pages inside each ``[start, end)`` (blocking: copies the memory once).

        Returns one window per range that could be shared; a range that cannot (too small,
        not plain private memory, partly shared already) is logged and keeps going through cma.
        ``auto`` (the unset option's default) also leaves memory on huge pages alone, and marks
        the spans it creates to stay shared if a pin may exist when they are given back.
        """
        windows: list[Window] = []
        with self._share_lock:
            vmas: list[_Vma] | None = None
            for start, end in _merge(ranges):
                lo, hi = -(-start // PAGE) * PAGE, end // PAGE * PAGE
                if hi <= lo:
                    continue
                with self._lock:
                    span = self._containing(lo, hi)
                    overlaps = any(s.start < hi and lo < s.end for s in self._spans)
                    if span is not None:
                        span.refs += 1
                if span is None and overlaps:
                    log.info("dxl: %#x-%#x is partly shared already; it stays on cma", lo, hi)
                    continue
                if span is None:
                    if vmas is None:
                        vmas = _read_vmas()
                    reason = _unshareable(vmas, lo, hi) or (_huge(vmas, lo, hi) if auto else "")
                    if reason:
                        log.info("dxl: %#x-%#x is not shared: %s; it stays on cma", lo, hi, reason)
                        continue
                    span = self._create(lo, hi)
                    if span is None:
                        continue
                    span.careful = auto
                windows.append(Window(span.fd, span.ino, lo - span.start, lo, hi - lo))
        return windows

    def release(self, windows: list[Window]) -> None:
        """Drop the registrations' references; a span without any becomes private memory again
        and its memfd is closed. Callers release only after peers unmapped it."""
        with self._lock:
            for w in windows:
                span = next(s for s in self._spans if s.fd == w.fd and s.ino == w.ino)
                span.refs -= 1
                if span.refs == 0:
                    self._spans.remove(span)
                    hazard = pin_hazard() if span.careful else ""
                    if hazard:  # a pin taken since would keep the memfd's pages: keep them
                        log.warning(
                            "dxl: %#x-%#x stays on shared memory: %s", span.start, span.end, hazard
                        )
                        os.close(span.fd)  # the mapping holds the memfd's pages
                        continue
                    rc = _ffi.lib.dxl_share_release(span.start, span.end - span.start, span.fd)
                    if rc < 0:  # still mapped and valid, only shared: say so, lose nothing
                        log.warning(
                            "dxl: %#x-%#x stays on shared memory: %s",
                            span.start,
                            span.end,
                            _ffi.NativeError(rc, "unshare", _ffi.lib.dxl_last_errno()),
                        )
                    os.close(span.fd)

    def live(self) -> int:
        with self._lock:
            return len(self._spans)

    def _containing(self, lo: int, hi: int) -> _Span | None:
        return next((s for s in self._spans if s.start <= lo and hi <= s.end), None)

    def _create(self, lo: int, hi: int) -> _Span | None:
        fd_out = _ffi.ffi.new("int *")
        try:
            _ffi.check(_ffi.lib.dxl_share_in_place(lo, hi - lo, 0, fd_out), "share memory")
        except _ffi.NativeError as exc:  # nothing stays moved; every byte is where it was
            if exc.code == _ffi.lib.DXL_E_UNSUPPORTED:
                log.warning(
                    "dxl: %#x-%#x is not shared: moving memory safely needs userfaultfd write "
                    "protection (Linux >= 5.14 with userfaultfd allowed); it stays on cma",
                    lo,
                    hi,
                )
            else:
                log.warning("dxl: sharing %#x-%#x failed (%s); it stays on cma", lo, hi, exc)
            return None
        fd = int(fd_out[0])
        span = _Span(lo, hi, fd, os.fstat(fd).st_ino, refs=1)
        with self._lock:
            self._spans.append(span)
        return span


@dataclass(slots=True)
class _Vma:
    start: int
    end: int
    perms: str
    path: str
    flags: frozenset[str]
    huge_kb: int = 0  # AnonHugePages: bytes on transparent huge pages, in KiB


def _read_vmas() -> list[_Vma]:
    vmas: list[_Vma] = []
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            head = _VMA_HEAD.match(line)
            if head:
                start, end, perms, path = head.groups()
                vmas.append(_Vma(int(start, 16), int(end, 16), perms, path, frozenset()))
            elif line.startswith("VmFlags:") and vmas:
                vmas[-1].flags = frozenset(line.split()[1:])
            elif line.startswith("AnonHugePages:") and vmas:
                vmas[-1].huge_kb = int(line.split()[1])
    return vmas


def _unshareable(vmas: list[_Vma], lo: int, hi: int) -> str:
    """Why ``[lo, hi)`` must keep its pages, or "" if it is plain memory all through."""
    at = lo
    for vma in vmas:
        if vma.end <= at or vma.start >= hi:
            continue
        if vma.start > at:
            return f"{at:#x} is not mapped"
        if vma.path == "[heap]":  # brk memory: the allocator grows and trims it under us
            return "it is brk heap memory (allocate KV memory with mmap, as large arrays are)"
        private_anon = vma.perms == "rw-p" and vma.path == ""
        ours = vma.perms in ("rw-s", "rw-p") and vma.path.startswith(MEMFD_NAME)  # shared before
        if not (private_anon or ours):
            return f"mapping {vma.perms} {vma.path or '(anonymous)'} is not private memory"
        odd = vma.flags - _PLAIN_FLAGS
        if odd:
            return f"mapping has flags {' '.join(sorted(odd))} (locked, pinned or special)"
        at = vma.end
        if at >= hi:
            return ""
    return f"{at:#x} is not mapped"


def _huge(vmas: list[_Vma], lo: int, hi: int) -> str:
    """Why ``[lo, hi)`` keeps its pages automatically: part of it is on huge pages ("" if not).
    Read per mapping: a mapping with any huge page counts, even outside ``[lo, hi)``."""
    if any(v.huge_kb and v.start < hi and lo < v.end for v in vmas):
        return "it is on transparent huge pages (cma reads them near memcpy speed)"
    return ""


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of the ranges, sorted: tensors that touch share their pages as one span."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


SHARED = SharedMemory()
