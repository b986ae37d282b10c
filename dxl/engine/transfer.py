"""A transfer as a value: which operation, over which route, which way, which pieces, and
within which deadline. An operation builds one after its resolve step; the mover
(:meth:`~dxl.engine.mover.Mover.move`) plans its pieces on a worker thread and moves them.

The pieces are a description (block ids, offsets), not a closure: the plan is computed where the
copy runs, off the event loop, and the value says what will move before anything does (its
size decides whether a small request may run inline).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..memory.plan import Pieces, Scratch, block_pieces, offset_pieces
from ..transport.base import BlockMove
from .resolve import Route


@dataclass(frozen=True, slots=True, eq=False)
class Blocks:
    """Block ``src[i]`` to block ``dst[i]`` of each selected tensor pair (``*_bases``, same
    length), ``block_bytes`` each; :func:`~dxl.memory.plan.block_pieces`."""

    dst_bases: np.ndarray
    src_bases: np.ndarray
    dst: np.ndarray
    src: np.ndarray
    block_bytes: int
    scratch: Scratch | None = None  # lends the arrays of a large plan

    @property
    def nbytes(self) -> int:
        return int(self.dst.size) * int(self.dst_bases.size) * self.block_bytes

    def plan(self) -> Pieces:
        return block_pieces(
            self.dst_bases, self.src_bases, self.dst, self.src, self.block_bytes, self.scratch
        )


@dataclass(frozen=True, slots=True, eq=False)
class Offsets:
    """``length`` bytes from ``src_bases[t] + src_offsets[i]`` to ``dst_bases[t] +
    dst_offsets[i]`` for each tensor pair t and unit i; :func:`~dxl.memory.plan.offset_pieces`."""

    dst_bases: np.ndarray
    src_bases: np.ndarray
    dst_offsets: np.ndarray
    src_offsets: np.ndarray
    length: int

    @property
    def nbytes(self) -> int:
        return int(self.dst_bases.size) * int(self.dst_offsets.size) * self.length

    def plan(self) -> Pieces:
        return offset_pieces(
            self.dst_bases, self.src_bases, self.dst_offsets, self.src_offsets, self.length
        )


@dataclass(frozen=True, slots=True, eq=False)
class Planned:
    """Pieces planned already (a layer-wise transfer checks each against the peer's caches)."""

    pieces: Pieces

    @property
    def nbytes(self) -> int:
        return self.pieces.nbytes

    def plan(self) -> Pieces:
        return self.pieces


PieceSpec = Blocks | Offsets | Planned


@dataclass(frozen=True, slots=True, eq=False)
class Transfer:
    """One request for the mover.

    Attributes:
        op: the operation it serves; a failure raises ``LLMException`` naming it.
        route: the link, our cache and the peer's cache(s) it touches (all held in use while
            the native call runs).
        pieces: which bytes move.
        write: towards the peer (push) rather than from it (pull).
        inline: a small one (up to ``dxl.InlineBytes``) may run on the loop thread.
        timeout_ms: the deadline of the native call; None: the link's (``sync_kv_timeout``).
    """

    op: str
    route: Route
    pieces: PieceSpec
    write: bool
    inline: bool = False
    timeout_ms: int | None = None

    def by_index(self) -> BlockMove | None:
        """The request as whole blocks by index between our cache and the peer's (for a
        transport that prepared lists per cache); None unless it is Blocks of one peer cache."""
        spec = self.pieces
        if not isinstance(spec, Blocks) or len(self.route.remotes) != 1:
            return None
        local, remote = self.route.local, self.route.remote
        ours, theirs = (
            (spec.src_bases, spec.dst_bases) if self.write else (spec.dst_bases, spec.src_bases)
        )
        our_blocks, their_blocks = (spec.src, spec.dst) if self.write else (spec.dst, spec.src)
        return BlockMove(
            local.cache.cache_id,
            local.layout,
            remote.cache_id,
            remote.layout,
            ours,
            theirs,
            our_blocks,
            their_blocks,
            spec.block_bytes,
            remote.placement,
            remote.device,
        )
