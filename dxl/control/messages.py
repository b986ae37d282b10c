"""The control messages: one frozen dataclass per message kind, which *is* its wire schema.

A message travels as a JSON object: ``"t"`` (its kind, :attr:`Message.KIND`) and one member
per dataclass field. :func:`from_wire` turns a decoded JSON object into the message, checking
every field against the field's annotation before any handler sees it, and :func:`to_wire` is
the inverse. The annotations say everything the check needs:

==========================================  =================================================
annotation                                  accepted
==========================================  =================================================
``int``                                     an integer in [-1, 2**64) (never ``true``/``false``)
``bool``                                    ``true`` or ``false``
``str``                                     at most ``MAX_TEXT`` characters, encodable UTF-8
``Annotated[str, Text(n)]``                 the same, at most ``n`` characters
``Token``                                   an offer's token: 1 to ``MAX_TOKEN`` hex digits
``list[int]``                               unsigned 64-bit integers
``Annotated[list[int], Length(n)]``         exactly ``n`` of them
``CacheEntry`` / ``list[CacheEntry]``       advertised caches (:func:`check_cache_entry`)
==========================================  =================================================

Range checks that tie fields together are a message's :meth:`Message.check`. A request (a
message with a ``rid``, other than ``ack``) whose ``rid`` is sound but which breaks its schema
raises :class:`FieldError` (that request fails alone); anything else raises :class:`FrameError`.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from ..errors import DxlError

MAX_TEXT = 4096  # any string field: error messages are clipped to this (see clip)
MAX_DATA_INFO = 1 << 20  # a data_info frame's text (NIXL metadata grows with registrations)
MAX_TOKEN = 128  # an offer's token: hex digits (32 generated, up to 128 chosen)
_HEX = frozenset("0123456789abcdefABCDEF")
_U64 = (1 << 64) - 1


class FrameError(DxlError, ValueError):
    """A frame broke the wire schema; the connection that sent it is closed."""


class FieldError(FrameError):
    """A request (a message with a valid ``rid``, not an ack) carries a field that breaks its
    schema: only that request fails (answered with an error ack); the link stays."""

    def __init__(self, message: str, kind: str, rid: int) -> None:
        super().__init__(message)
        self.kind = kind
        self.rid = rid


@dataclass(frozen=True, slots=True)
class Text:
    """A string field of at most ``max_len`` characters."""

    max_len: int


@dataclass(frozen=True, slots=True)
class Length:
    """A list field of exactly ``n`` items."""

    n: int


class _TokenRule:
    """Marks a token field."""


class _CacheRule:
    """Marks an advertised cache (a registry entry)."""


Token = Annotated[str, _TokenRule()]
CacheEntry = Annotated[dict[str, Any], _CacheRule()]  # checked by check_cache_entry


# ====================================================================== the messages
@dataclass(frozen=True, slots=True)
class Message:
    """A control message (base of every kind)."""

    KIND: ClassVar[str] = ""

    def check(self) -> None:
        """Checks across fields, after each field matched its annotation (FrameError)."""


@dataclass(frozen=True, slots=True)
class _About(Message):
    """What an engine says about itself in hello (client) and welcome (server)."""

    proto: int
    cluster_id: int
    role: int
    incarnation: Annotated[str, Text(64)]
    host: Annotated[str, Text(256)]  # declared: only the kernel's view decides same-host
    pid: int  # declared: used only once the kernel proved this pid holds the connection
    probe: Annotated[list[int], Length(2)]  # [address, token]: 8 bytes the peer reads
    data_port: int  # port of the native data server, 0 if none
    # the IP it listens on; "" (a wildcard listen): where the control connection came from
    data_ip: Annotated[str, Text(64)]
    pool: list[int]  # [fd, base, size] of the memfd HOST pool, [] without one
    heartbeat_ms: int  # the sender pings at least this often
    challenge: Annotated[str, Text(64)]  # 64 hex digits, fresh per link: feed the data key

    def check(self) -> None:
        if len(self.pool) not in (0, 3):
            raise FrameError("pool must be [] or [fd, base, size]")
        if len(self.challenge) != 64 or any(c not in "0123456789abcdef" for c in self.challenge):
            raise FrameError("challenge must be 64 lowercase hex digits")
        if not 1 <= self.heartbeat_ms <= 1 << 31:
            raise FrameError("heartbeat_ms must be in [1, 2^31]")


# A link is set up with hello -> welcome -> ready (client) -> ready (server), or a reject at any
# step; registries travel in the ready frames, once both transports are proven.
@dataclass(frozen=True, slots=True)
class Hello(_About):
    KIND: ClassVar[str] = "hello"
    expect_cluster_id: int


@dataclass(frozen=True, slots=True)
class Welcome(_About):
    KIND: ClassVar[str] = "welcome"


@dataclass(frozen=True, slots=True)
class Ready(Message):
    KIND: ClassVar[str] = "ready"
    caches: list[CacheEntry]


@dataclass(frozen=True, slots=True)
class Reject(Message):
    KIND: ClassVar[str] = "reject"
    code: int
    message: str


# Requests carry a "rid" (the channel fills it in: 0 until sent), answered by the "ack" of that
# rid.
@dataclass(frozen=True, slots=True)
class RegAdd(Message):
    """A cache the sender advertises (or re-advertises, a new generation)."""

    KIND: ClassVar[str] = "reg_add"
    cache: CacheEntry
    rid: int = 0


@dataclass(frozen=True, slots=True)
class DataInfo(Message):
    """What the link's data transport tells its peer (nixl: its agent's metadata, base64): once
    in the handshake (after ready, both ways, when the transport has any) and before a
    ``reg_add`` of a cache the peer has not seen."""

    KIND: ClassVar[str] = "data_info"
    info: Annotated[str, Text(MAX_DATA_INFO)]
    rid: int = 0


@dataclass(frozen=True, slots=True)
class RegDel(Message):
    KIND: ClassVar[str] = "reg_del"
    id: int
    gen: int
    rid: int = 0


@dataclass(frozen=True, slots=True)
class Unlink(Message):
    KIND: ClassVar[str] = "unlink"
    rid: int = 0


@dataclass(frozen=True, slots=True)
class Probe(Message):
    """Are you there? (before a new link may replace this one)"""

    KIND: ClassVar[str] = "probe"
    rid: int = 0


@dataclass(frozen=True, slots=True)
class Consume(Message):
    """A pull through a CacheKey finished: the owner may consume the key (spec section 1)."""

    KIND: ClassVar[str] = "consume"
    id: int
    key: Annotated[list[int], Length(4)]  # [req_id, model_id, prefix_id, batch_index]
    tensors: Annotated[list[int], Length(2)]  # [lo, hi)
    rid: int = 0


def _check_range(kind: str, lo: int, hi: int) -> None:
    if not 0 <= lo < hi:
        raise FrameError(f"{kind} layers [lo, hi) must satisfy 0 <= lo < hi")


def _check_layers(kind: str, layers: list[int]) -> None:
    if layers and (len(layers) != 2 or layers[0] >= layers[1]):
        raise FrameError(f"{kind} layers must be [] or [start, stop) with start < stop")


# Request handoff (dxl.handoff): offers by id on the offering engine, with their token. A fetch
# or a claim says what its ticket says the offer is (cache, layers, tensors per layer, block
# size, tensor count): the offerer refuses one that does not match its own record, so an edited
# ticket cannot aim a copy at other blocks or layers.
@dataclass(frozen=True, slots=True)
class Fetch(Message):
    """Pull mode: write this offer into my blocks."""

    KIND: ClassVar[str] = "fetch"
    offer: int
    token: Token
    cache: int  # the fetcher's destination cache (advertised to the offerer)
    blocks: list[int]  # destination block ids, one per offered block (or the tail)
    per_layer: bool  # report each layer as it lands
    src_cache: int  # the offer's cache, as the ticket names it
    offered: int  # how many blocks the ticket offers
    layers: list[int]  # [start, stop), or [] for every layer
    tensors_per_layer: int
    block_bytes: int
    num_tensors: int
    rid: int = 0

    def check(self) -> None:
        _check_layers(self.KIND, self.layers)


@dataclass(frozen=True, slots=True)
class Layer(Message):
    """Layers [lo, hi) of an offer landed (pull mode, to the fetcher)."""

    KIND: ClassVar[str] = "layer"
    offer: int
    lo: int
    hi: int

    def check(self) -> None:
        _check_range(self.KIND, self.lo, self.hi)


@dataclass(frozen=True, slots=True)
class Fetched(Message):
    """A fetch ended (to the fetcher)."""

    KIND: ClassVar[str] = "fetched"
    offer: int
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Renew(Message):
    KIND: ClassVar[str] = "renew"
    offer: int
    token: Token
    rid: int = 0


@dataclass(frozen=True, slots=True)
class Claim(Message):
    """Push mode: I will write into this offer (the offer's cache and these blocks)."""

    KIND: ClassVar[str] = "claim"
    offer: int
    token: Token
    cache: int  # the offer's cache, as the ticket names it
    blocks: list[int]  # the offer's blocks the claimer will write
    layers: list[int]
    tensors_per_layer: int
    block_bytes: int
    num_tensors: int
    rid: int = 0

    def check(self) -> None:
        _check_layers(self.KIND, self.layers)


@dataclass(frozen=True, slots=True)
class Pushed(Message):
    """Layers [lo, hi) of a claimed offer landed (push mode, to the offerer)."""

    KIND: ClassVar[str] = "pushed"
    offer: int
    lo: int
    hi: int
    rid: int = 0

    def check(self) -> None:
        _check_range(self.KIND, self.lo, self.hi)


@dataclass(frozen=True, slots=True)
class Complete(Message):
    KIND: ClassVar[str] = "complete"
    offer: int
    code: int
    message: str
    rid: int = 0


@dataclass(frozen=True, slots=True)
class Abort(Message):
    """Cancel an offer; ``mine``: it is the sender's (the receiver holds a claim on it)."""

    KIND: ClassVar[str] = "abort"
    offer: int
    token: Token
    mine: bool
    rid: int = 0


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """The answer to the request of ``rid``: ``code`` 0 (success) or an LLMStatusCode."""

    KIND: ClassVar[str] = "ack"
    rid: int
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Ping(Message):
    KIND: ClassVar[str] = "ping"


Request = (
    RegAdd
    | RegDel
    | DataInfo
    | Unlink
    | Probe
    | Consume
    | Fetch
    | Renew
    | Claim
    | Pushed
    | Complete
    | Abort
)

KINDS: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (
        Hello, Welcome, Ready, Reject, RegAdd, RegDel, DataInfo, Unlink, Probe, Consume, Fetch,
        Layer, Fetched, Renew, Claim, Pushed, Complete, Abort, Ack, Ping,
    )
}  # fmt: skip


# ====================================================================== checks
FieldCheck = Callable[[str, Any], None]  # (what, value): raises FrameError


def _check_int(what: str, value: Any) -> None:
    # bool is an int subclass; an int field must not accept true/false
    if not isinstance(value, int) or isinstance(value, bool):
        raise FrameError(f"{what} has type {type(value).__name__}")
    if not -1 <= value <= _U64:
        raise FrameError(f"{what} is outside the 64-bit range")


def _check_bool(what: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise FrameError(f"{what} has type {type(value).__name__}")


def _text(max_len: int) -> FieldCheck:
    def check(what: str, value: Any) -> None:
        if not isinstance(value, str):
            raise FrameError(f"{what} has type {type(value).__name__}")
        if len(value) > max_len:
            raise FrameError(f"{what} is over {max_len} characters")
        try:  # JSON may carry a lone surrogate ("\ud800"), which no UTF-8 holds
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise FrameError(f"{what} is not encodable text") from None

    return check


def _check_token(what: str, value: Any) -> None:
    if not is_token(value):
        raise FrameError(f"{what} must be 1 to {MAX_TOKEN} hex digits")


def _u64_list(length: int | None) -> FieldCheck:
    def check(what: str, value: Any) -> None:
        check_u64_list(what, value, length)

    return check


def _check_cache(what: str, value: Any) -> None:
    check_cache_entry(value)


def _check_caches(what: str, value: Any) -> None:
    if not isinstance(value, list):
        raise FrameError(f"{what} has type {type(value).__name__}")
    for entry in value:
        check_cache_entry(entry)


def _field_check(hint: Any) -> FieldCheck:
    """The check of one field, from its annotation (the table in the module docstring)."""
    meta: tuple[Any, ...] = ()
    if typing.get_origin(hint) is Annotated:
        hint, *rest = typing.get_args(hint)
        meta = tuple(rest)
    if hint is int:
        return _check_int
    if hint is bool:
        return _check_bool
    if hint is str:
        if any(isinstance(m, _TokenRule) for m in meta):
            return _check_token
        sizes = [m.max_len for m in meta if isinstance(m, Text)]
        return _text(sizes[0] if sizes else MAX_TEXT)
    if any(isinstance(m, _CacheRule) for m in meta):
        return _check_cache
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if item is int:
            lengths = [m.n for m in meta if isinstance(m, Length)]
            return _u64_list(lengths[0] if lengths else None)
        if item == CacheEntry:
            return _check_caches
    raise TypeError(f"no wire check for the annotation {hint!r}")  # a bug in this module


def _schema(cls: type[Message]) -> dict[str, FieldCheck]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: _field_check(hints[f.name]) for f in dataclasses.fields(cls)}


# kind -> field -> its check: the wire schema, made from the dataclasses once
SCHEMAS: dict[str, dict[str, FieldCheck]] = {kind: _schema(cls) for kind, cls in KINDS.items()}


def from_wire(obj: Any) -> Message:
    """The message a decoded JSON object holds, every field checked (FrameError, FieldError)."""
    if not isinstance(obj, dict):
        raise FrameError("frame must hold a JSON object")
    kind = obj.get("t")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None or not isinstance(kind, str):
        raise FrameError(f"unknown message type {kind!r}")
    rid = obj.get("rid")
    try:
        return _build(cls, kind, obj)
    except FieldError:
        raise
    except FrameError as exc:
        if kind == "ack" or "rid" not in SCHEMAS[kind] or not _is_u64(rid):
            raise
        assert isinstance(rid, int)
        raise FieldError(str(exc), kind, rid) from None  # this request fails, the link stays


def _build(cls: type[Message], kind: str, obj: dict[str, Any]) -> Message:
    schema = SCHEMAS[kind]
    unknown = set(obj) - set(schema) - {"t"}
    if unknown:
        raise FrameError(f"{kind} message has unknown fields {sorted(unknown)!r}")
    for name, check in schema.items():
        if name not in obj:
            raise FrameError(f"{kind} message lacks field {name!r}")
        check(f"{kind} message field {name!r}", obj[name])
    msg = cls(**{name: obj[name] for name in schema})
    msg.check()
    return msg


def to_wire(msg: Message) -> dict[str, Any]:
    """The JSON object of ``msg`` (checked as :func:`from_wire` checks it: FrameError)."""
    obj = {"t": msg.KIND, **{name: getattr(msg, name) for name in SCHEMAS[msg.KIND]}}
    _build(type(msg), msg.KIND, obj)
    return obj


def build(kind: str, **fields: Any) -> Message:
    """The message of ``kind`` with ``fields`` (checked: FrameError)."""
    cls = KINDS.get(kind)
    if cls is None:
        raise FrameError(f"unknown message type {kind!r}")
    return _build(cls, kind, {"t": kind, **fields})


def _is_u64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _U64


def is_token(token: object) -> bool:
    """``token`` looks like an offer's token: 1 to MAX_TOKEN hex digits."""
    return isinstance(token, str) and 0 < len(token) <= MAX_TOKEN and all(c in _HEX for c in token)


def clip(text: str) -> str:
    """``text`` made fit for a string field: at most MAX_TEXT characters, and encodable (an
    exception's text may quote whatever a peer sent)."""
    text = text[:MAX_TEXT]
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_u64_list(what: str, values: Any, length: int | None = None) -> None:
    if not isinstance(values, list) or (length is not None and len(values) != length):
        raise FrameError(f"{what} must be a list" + (f" of {length}" if length else ""))
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _U64:
            raise FrameError(f"{what} must hold unsigned 64-bit integers")


def _check_list(what: str, value: Any) -> None:
    if not isinstance(value, list):
        raise FrameError(f"{what} has type {type(value).__name__}")


def _check_placement(what: str, value: Any) -> None:
    _check_int(what, value)
    if value not in (0, 1):
        raise FrameError(f"{what} must be 0 (HOST) or 1 (DEVICE), got {value!r}")


def _check_device(what: str, value: Any) -> None:
    _check_int(what, value)
    if not 0 <= value < 1 << 16:
        raise FrameError(f"{what} must be a device index in [0, 65536), got {value!r}")


# Fields of one advertised cache (registry entry). Only remotely accessible caches are sent.
CACHE_FIELDS: dict[str, FieldCheck] = {
    "id": _check_int,  # cache_id on the owner
    "gen": _check_int,  # registry generation of this entry on the owner
    "blocks": _check_bool,  # blocks (paged) cache or contiguous cache
    "num_tensors": _check_int,
    "tensor_size": _check_int,  # bytes of one tensor
    "units": _check_int,  # num_blocks for a blocks cache, batch size for a contiguous one
    "placement": _check_placement,  # 0 HOST, 1 DEVICE
    "device": _check_device,  # the owner's CUDA device of a DEVICE cache; 0 for HOST
    "addrs": _u64_list(None),  # one base address per tensor
    "model_id": lambda what, v: None if v is None else _check_int(what, v),  # of a blocks cache
    "keys": _check_list,  # [[req_id, model_id, prefix_id, batch_index], ...] (contiguous)
    "shm": _check_list,  # [[fd, offset, base, size, inode], ...]: pages shared through memfds
}


def check_cache_entry(entry: Any) -> None:
    """Validate one advertised cache: types, and sizes that cannot overflow address arithmetic."""
    if not isinstance(entry, dict):
        raise FrameError("cache entry must be an object")
    unknown = set(entry) - set(CACHE_FIELDS)
    if unknown:
        raise FrameError(f"cache entry has unknown fields {sorted(unknown)!r}")
    for name, check in CACHE_FIELDS.items():
        if name not in entry:
            raise FrameError(f"cache entry lacks field {name!r}")
        check(f"cache entry field {name!r}", entry[name])
    if len(entry["addrs"]) != entry["num_tensors"] or entry["num_tensors"] < 1:
        raise FrameError("cache entry must carry exactly num_tensors (>= 1) addresses")
    if entry["tensor_size"] < 1 or entry["units"] < 1 or entry["tensor_size"] % entry["units"]:
        raise FrameError("cache entry tensor_size must be a positive multiple of units")
    if any(a == 0 or a + entry["tensor_size"] > _U64 for a in entry["addrs"]):
        raise FrameError("cache entry address range wraps or is null")
    for key in entry["keys"]:
        check_u64_list("cache entry key", key, 4)
    for window in entry["shm"]:
        check_u64_list("cache entry shm window", window, 5)
        fd, offset, base, size, _ = window
        if fd > 1 << 31 or size < 1 or base + size > _U64 or offset + size > _U64:
            raise FrameError("cache entry shm window is out of range")
