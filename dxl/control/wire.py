"""Control-plane frames: a fixed schema, a size bound, and nothing that executes code.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON holding one
object. JSON (not pickle) keeps decoding free of side effects; every message kind is a frozen
dataclass of :mod:`dxl.control.messages`, whose fields are its schema, and :func:`decode` checks
every field before any handler sees the message. Anything else raises :class:`FrameError`, and
the connection that sent it is closed (and only that one); a request whose ``rid`` is sound but
whose fields are not raises :class:`FieldError`, and only that request fails.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from .messages import (
    MAX_TEXT,
    MAX_TOKEN,
    SCHEMAS,
    FieldError,
    FrameError,
    Message,
    build,
    check_cache_entry,
    clip,
    from_wire,
    is_token,
    to_wire,
)

__all__ = [
    "HEADER",
    "MAX_FRAME",
    "MAX_TEXT",
    "MAX_TOKEN",
    "PRELINK_MAX_FRAME",
    "PROTOCOL_VERSION",
    "SCHEMAS",
    "FieldError",
    "FrameError",
    "check_cache_entry",
    "clip",
    "decode",
    "encode",
    "frame_length",
    "is_token",
]

MAX_FRAME = 4 << 20  # a registry of 240 addresses is a few KiB; 4 MiB leaves room, bounds memory
# Before a peer is linked (hello, welcome) nothing big is needed: a stranger announcing a huge
# frame must not make us buffer it.
PRELINK_MAX_FRAME = 16 << 10
HEADER = struct.Struct(">I")
# 4: claim and fetch carry the taker's view of the offer (the offerer checks it)
# 5: an advertised cache carries its device (a DEVICE cache's CUDA index, for the peer's NIXL)
PROTOCOL_VERSION = 5


def encode(msg: Message | str, /, **fields: Any) -> bytes:
    """Encode one message (checked against its schema) as a length-prefixed frame; ``msg`` is
    the message, or its kind with ``fields`` (``encode("ack", rid=1, code=0, message="")``)."""
    if isinstance(msg, str):
        msg = build(msg, **fields)
    elif fields:
        raise TypeError("encode takes a message, or a kind and its fields")
    body = json.dumps(to_wire(msg), separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise FrameError(f"{msg.KIND} frame is {len(body)} bytes, over the {MAX_FRAME} byte bound")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes, max_frame: int = MAX_FRAME) -> int:
    """Return the body length announced by a frame header, refusing oversize frames."""
    length: int = HEADER.unpack(header)[0]
    if length == 0 or length > max_frame:
        raise FrameError(f"frame length {length} outside 1..{max_frame}")
    return length


def decode(body: bytes) -> Message:
    """Decode and validate one frame body into its message; FrameError on anything off-schema
    (FieldError: a request with a sound rid and a bad field)."""
    try:
        obj = json.loads(body.decode("utf-8"))
    # deep nesting raises RecursionError, a number too long ValueError: input, not our bug
    except (UnicodeDecodeError, ValueError, RecursionError, OverflowError) as exc:
        raise FrameError(f"frame is not UTF-8 JSON: {type(exc).__name__}") from None
    return from_wire(obj)
