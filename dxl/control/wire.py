"""Control-plane frames: a fixed schema, a size bound, and nothing that executes code.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON holding one
object. JSON (not pickle) keeps decoding free of side effects; every message type has a fixed
set of fields with fixed types, checked by :func:`decode` before any handler sees it. Anything
else raises :class:`FrameError`, and the connection that sent it is closed (and only that one).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from ..errors import DxlError

MAX_FRAME = 4 << 20  # a registry of 240 addresses is a few KiB; 4 MiB leaves room, bounds memory
# Before a peer is linked (hello, welcome) nothing big is needed: a stranger announcing a huge
# frame must not make us buffer it.
PRELINK_MAX_FRAME = 16 << 10
HEADER = struct.Struct(">I")
# 4: claim and fetch carry the taker's view of the offer (the offerer checks it)
PROTOCOL_VERSION = 4

_INT = (int,)
_STR = (str,)
_BOOL = (bool,)
_LIST = (list,)


class FrameError(DxlError, ValueError):
    """A frame broke the wire schema; the connection that sent it is closed."""


class FieldError(FrameError):
    """A request (a message with a valid ``rid``, not an ack) carries a field that breaks its
    schema: only that request fails (answered with an error ack); the link stays."""

    def __init__(self, message: str, kind: str, rid: int) -> None:
        super().__init__(message)
        self.kind = kind
        self.rid = rid


MAX_TEXT = 4096  # any string field: error messages are clipped to this (see clip)
MAX_TOKEN = 128  # an offer's token: hex digits (32 generated, up to 128 chosen)
_HEX = frozenset("0123456789abcdefABCDEF")


# Fields of one advertised cache (registry entry). Only remotely accessible caches are sent.
CACHE_FIELDS: dict[str, tuple[type, ...]] = {
    "id": _INT,  # cache_id on the owner
    "gen": _INT,  # registry generation of this entry on the owner
    "blocks": _BOOL,  # blocks (paged) cache or contiguous cache
    "num_tensors": _INT,
    "tensor_size": _INT,  # bytes of one tensor
    "units": _INT,  # num_blocks for a blocks cache, batch size for a contiguous one
    "placement": _INT,
    "addrs": _LIST,  # one base address per tensor
    "model_id": (int, type(None)),  # BlocksCacheKey.model_id bound to a blocks cache
    "keys": _LIST,  # [[req_id, model_id, prefix_id, batch_index], ...] of a contiguous cache
    "shm": _LIST,  # [[fd, offset, base, size, inode], ...]: pages shared through memfds
}

# Every message type and its fields. "rid" correlates a request with its "ack".
# What an engine says about itself in hello (client) and welcome (server).
_ABOUT: dict[str, tuple[type, ...]] = {
    "proto": _INT,
    "cluster_id": _INT,
    "role": _INT,
    "incarnation": _STR,
    "host": _STR,  # declared: only the kernel's view (dxl.control.peercred) decides same-host
    "pid": _INT,  # declared: used only once the kernel proved this pid holds the connection
    "probe": _LIST,  # [address, token]: 8 bytes the peer reads to prove its transport
    "data_port": _INT,  # port of the native data server, 0 if none
    # the IP it listens on; "" (a wildcard listen): where the control connection came from
    "data_ip": _STR,
    "pool": _LIST,  # [fd, base, size] of the memfd HOST pool, [] without one
    "heartbeat_ms": _INT,  # the sender pings at least this often
    "challenge": _STR,  # 64 hex digits, fresh per link: both feed the link's data key
}

# What a claim or a fetch says the offer is (from its ticket): the offerer refuses one that does
# not match its own record, so an edited ticket cannot aim a copy at other blocks or layers.
_VIEW: dict[str, tuple[type, ...]] = {
    "layers": _LIST,  # [start, stop), or [] for every layer
    "tensors_per_layer": _INT,
    "block_bytes": _INT,
    "num_tensors": _INT,
}

# Every message type and its fields. "rid" correlates a request with its "ack". A link is set up
# with hello -> welcome -> ready (client) -> ready (server), or a reject at any step; registries
# travel in the ready frames, once both transports are proven.
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {**_ABOUT, "expect_cluster_id": _INT},
    "welcome": _ABOUT,
    "ready": {"caches": _LIST},
    "reject": {"code": _INT, "message": _STR},
    "reg_add": {"rid": _INT, "cache": (dict,)},
    "reg_del": {"rid": _INT, "id": _INT, "gen": _INT},
    "unlink": {"rid": _INT},
    "probe": {"rid": _INT},  # are you there? (before a new link may replace this one)
    # a pull through a CacheKey finished: the owner may consume the key (spec section 1)
    "consume": {"rid": _INT, "id": _INT, "key": _LIST, "tensors": _LIST},
    # request handoff (dxl.handoff): offers by id on the offering engine, with their token
    "fetch": {
        "rid": _INT,
        "offer": _INT,
        "token": _STR,
        "cache": _INT,  # the fetcher's destination cache (advertised to the offerer)
        "blocks": _LIST,  # destination block ids, one per offered block
        "per_layer": _BOOL,  # report each layer as it lands
        **_VIEW,
        "src_cache": _INT,  # the offer's cache, as the ticket names it
        "offered": _INT,  # how many blocks the ticket offers
    },
    "layer": {"offer": _INT, "lo": _INT, "hi": _INT},  # layers [lo, hi) of an offer landed
    "fetched": {"offer": _INT, "code": _INT, "message": _STR},  # a fetch ended
    "renew": {"rid": _INT, "offer": _INT, "token": _STR},
    # push mode: write into this offer: the offer's cache and blocks the claimer will write
    "claim": {"rid": _INT, "offer": _INT, "token": _STR, "cache": _INT, "blocks": _LIST, **_VIEW},
    "pushed": {"rid": _INT, "offer": _INT, "lo": _INT, "hi": _INT},
    "complete": {"rid": _INT, "offer": _INT, "code": _INT, "message": _STR},
    # cancel an offer; "mine": it is the sender's offer (the receiver holds a claim on it)
    "abort": {"rid": _INT, "offer": _INT, "token": _STR, "mine": _BOOL},
    "ack": {"rid": _INT, "code": _INT, "message": _STR},
    "ping": {},
}

_U64 = (1 << 64) - 1


def encode(kind: str, **fields: Any) -> bytes:
    """Encode one message (checked against its schema) as a length-prefixed frame."""
    msg = {"t": kind, **fields}
    _check_message(msg)
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise FrameError(f"{kind} frame is {len(body)} bytes, over the {MAX_FRAME} byte bound")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes, max_frame: int = MAX_FRAME) -> int:
    """Return the body length announced by a frame header, refusing oversize frames."""
    length: int = HEADER.unpack(header)[0]
    if length == 0 or length > max_frame:
        raise FrameError(f"frame length {length} outside 1..{max_frame}")
    return length


def decode(body: bytes) -> dict[str, Any]:
    """Decode and validate one frame body; raise FrameError on anything off-schema."""
    try:
        msg = json.loads(body.decode("utf-8"))
    # deep nesting raises RecursionError, a number too long ValueError: input, not our bug
    except (UnicodeDecodeError, ValueError, RecursionError, OverflowError) as exc:
        raise FrameError(f"frame is not UTF-8 JSON: {type(exc).__name__}") from None
    _check_message(msg)
    checked: dict[str, Any] = msg
    return checked


def clip(text: str) -> str:
    """``text`` made fit for a string field: at most MAX_TEXT characters, and encodable (an
    exception's text may quote whatever a peer sent)."""
    text = text[:MAX_TEXT]
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_message(msg: Any) -> None:
    if not isinstance(msg, dict):
        raise FrameError("frame must hold a JSON object")
    kind = msg.get("t")
    schema = SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None or not isinstance(kind, str):
        raise FrameError(f"unknown message type {kind!r}")
    rid = msg.get("rid")
    if kind == "ack" or "rid" not in schema or not isinstance(rid, int) or not _is_u64(rid):
        _check_body(kind, msg, schema)
        return
    try:  # a request: its rid is sound, so a bad field fails this request only
        _check_body(kind, msg, schema)
    except FieldError:
        raise
    except FrameError as exc:
        raise FieldError(str(exc), kind, rid) from None


def _is_u64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _U64


def _check_body(kind: str, msg: dict[str, Any], schema: dict[str, tuple[type, ...]]) -> None:
    _check_fields(f"{kind} message", msg, schema, extra=("t",))
    if "token" in schema:
        _check_token(msg["token"])
    if kind in ("hello", "welcome"):
        _check_probe(msg["probe"])
        if msg["pool"]:
            _check_u64_list("pool", msg["pool"], 3)
        _check_challenge(msg["challenge"])
        if not 1 <= msg["heartbeat_ms"] <= 1 << 31:
            raise FrameError("heartbeat_ms must be in [1, 2^31]")
        if len(msg["incarnation"]) > 64 or len(msg["host"]) > 256 or len(msg["data_ip"]) > 64:
            raise FrameError("incarnation or host is too long")
    elif kind == "ready":
        for entry in msg["caches"]:
            check_cache_entry(entry)
    elif kind == "reg_add":
        check_cache_entry(msg["cache"])
    elif kind in ("fetch", "claim"):
        _check_u64_list(f"{kind} blocks", msg["blocks"])
        _check_u64_list(f"{kind} layers", msg["layers"])
        if msg["layers"] and (len(msg["layers"]) != 2 or msg["layers"][0] >= msg["layers"][1]):
            raise FrameError(f"{kind} layers must be [] or [start, stop) with start < stop")
    elif kind == "consume":
        _check_u64_list("consume key", msg["key"], 4)
        _check_u64_list("consume tensors", msg["tensors"], 2)


def _check_fields(
    what: str, obj: dict[str, Any], schema: dict[str, tuple[type, ...]], extra: tuple[str, ...] = ()
) -> None:
    allowed = set(schema) | set(extra)
    unknown = set(obj) - allowed
    if unknown:
        raise FrameError(f"{what} has unknown fields {sorted(unknown)}")
    for name, types in schema.items():
        if name not in obj:
            raise FrameError(f"{what} lacks field {name!r}")
        value = obj[name]
        # bool is an int subclass; an int field must not accept true/false
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise FrameError(f"{what} field {name!r} has type {type(value).__name__}")
        if isinstance(value, int) and not isinstance(value, bool) and not -1 <= value <= _U64:
            raise FrameError(f"{what} field {name!r} is outside the 64-bit range")
        if isinstance(value, str):
            _check_text(what, name, value)


def _check_text(what: str, name: str, value: str) -> None:
    """Bounded, and encodable as UTF-8 (JSON may carry a lone surrogate, which is not)."""
    if len(value) > MAX_TEXT:
        raise FrameError(f"{what} field {name!r} is over {MAX_TEXT} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise FrameError(f"{what} field {name!r} is not encodable text") from None


def is_token(token: object) -> bool:
    """``token`` looks like an offer's token: 1 to MAX_TOKEN hex digits."""
    return isinstance(token, str) and 0 < len(token) <= MAX_TOKEN and all(c in _HEX for c in token)


def _check_token(token: str) -> None:
    if not is_token(token):
        raise FrameError(f"token must be 1 to {MAX_TOKEN} hex digits")


def _check_u64_list(what: str, values: Any, length: int | None = None) -> None:
    if not isinstance(values, list) or (length is not None and len(values) != length):
        raise FrameError(f"{what} must be a list" + (f" of {length}" if length else ""))
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _U64:
            raise FrameError(f"{what} must hold unsigned 64-bit integers")


def _check_probe(probe: Any) -> None:
    _check_u64_list("probe", probe, 2)


def _check_challenge(challenge: str) -> None:
    if len(challenge) != 64 or any(c not in "0123456789abcdef" for c in challenge):
        raise FrameError("challenge must be 64 lowercase hex digits")


def check_cache_entry(entry: Any) -> None:
    """Validate one advertised cache: types, and sizes that cannot overflow address arithmetic."""
    if not isinstance(entry, dict):
        raise FrameError("cache entry must be an object")
    _check_fields("cache entry", entry, CACHE_FIELDS)
    _check_u64_list("cache entry addrs", entry["addrs"])
    if len(entry["addrs"]) != entry["num_tensors"] or entry["num_tensors"] < 1:
        raise FrameError("cache entry must carry exactly num_tensors (>= 1) addresses")
    if entry["tensor_size"] < 1 or entry["units"] < 1 or entry["tensor_size"] % entry["units"]:
        raise FrameError("cache entry tensor_size must be a positive multiple of units")
    if any(a == 0 or a + entry["tensor_size"] > _U64 for a in entry["addrs"]):
        raise FrameError("cache entry address range wraps or is null")
    for key in entry["keys"]:
        _check_u64_list("cache entry key", key, 4)
    for window in entry["shm"]:
        _check_u64_list("cache entry shm window", window, 5)
        fd, offset, base, size, _ = window
        if fd > 1 << 31 or size < 1 or base + size > _U64 or offset + size > _U64:
            raise FrameError("cache entry shm window is out of range")
