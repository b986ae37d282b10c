"""The ticket of an offer, and the records of how offers end.

A ticket is what the offering engine hands out and a router forwards (like vLLM's
``kv_transfer_params``): plain JSON, no pickle. It says who offers (cluster id, incarnation,
endpoint), which request, which blocks, and carries a random token. It grants nothing by
itself: a fetch needs a live, authenticated link to the offering engine too, and the offer must
still be live there; the token makes a ticket unguessable, and an offer serves one fetcher once.
"""

from __future__ import annotations

import enum
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import LLMException, LLMStatusCode

__all__ = ["Ended", "FetchError", "Finished", "Ticket"]

TICKET_VERSION = 1
_MAX_TICKET = 1 << 20  # a ticket of 64k block ids is ~0.5 MiB of JSON
MAX_TICKET_BLOCKS = 1 << 16  # block ids in one ticket (a dict is not bounded by _MAX_TICKET)
_DIGEST_HEX = 64  # a prompt digest: sha256, lowercase hex


class Ended(enum.StrEnum):
    """Why an offer ended (each ends exactly once); after it, its blocks may be reused."""

    DONE = "done"  # the blocks were moved
    FAILED = "failed"  # the transfer failed, or the other engine was lost mid-transfer
    ABORTED = "aborted"  # either side cancelled it
    EXPIRED = "expired"  # the lease ran out and nobody had claimed the offer


@dataclass(frozen=True, slots=True)
class Ticket:
    """An offer as the other side needs it (``to_json``/``from_json`` for routers).

    Attributes:
        kind: ``"pull"`` (the offerer's blocks are the source; the receiver fetches them) or
            ``"push"`` (the offerer's blocks are the destination; the receiver pushes into them).
        cluster_id, incarnation, endpoint: the offering engine (``endpoint`` "ip:port" of its
            listener, where the other side links if it has no link yet).
        request_id: the request the blocks belong to.
        offer_id, token: name the offer on the offering engine; the token is random.
        cache_id: the offerer's cache the blocks are in.
        block_ids: the offered blocks, in order.
        layers: ``(start, stop)`` layer range, or None for every layer.
        tensors_per_layer: tensors per layer (K and V: 2).
        block_bytes, num_tensors: the offered cache's block size and tensor count (checked
            against the other side's cache before anything moves).
        num_tokens: tokens the blocks hold, if the offerer said (informational to the
            handoff; the vLLM connector requires it and binds it, see ``prompt_digest``).
        lease_ms: the lease the offer was made with.
        prompt_digest: what the blocks hold, if the offerer said: the sha256 hash chain of the
            ``num_tokens`` prompt tokens, one link per block (lowercase hex of the last link).
            The handoff does not read it; a consumer that knows the prompt (the vLLM
            connector's decode) recomputes it over its own prompt before trusting the blocks.
    """

    kind: str
    cluster_id: int
    incarnation: str
    endpoint: str
    request_id: str
    offer_id: int
    token: str
    cache_id: int
    block_ids: list[int] = field(default_factory=list)
    layers: tuple[int, int] | None = None
    tensors_per_layer: int = 2
    block_bytes: int = 0
    num_tensors: int = 0
    num_tokens: int | None = None
    lease_ms: int = 0
    prompt_digest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["v"] = TICKET_VERSION
        out["layers"] = list(self.layers) if self.layers is not None else None
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Ticket:
        if len(text) > _MAX_TICKET:
            raise _bad(f"ticket is {len(text)} bytes, over {_MAX_TICKET}")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise _bad(f"ticket is not JSON: {type(exc).__name__}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Ticket:
        """Parse and check a ticket (TypeError-free: a bad one is LLM_PARAM_INVALID)."""
        if not isinstance(data, Mapping):
            raise _bad(f"a ticket must be an object, got {type(data).__name__}")
        version = data.get("v")
        if type(version) is not int or version != TICKET_VERSION:  # True == 1: not a version
            raise _bad(f"not a dxl handoff ticket of version {TICKET_VERSION}")
        try:
            ticket = cls(
                kind=_str(data, "kind"),
                cluster_id=_uint(data, "cluster_id"),
                incarnation=_str(data, "incarnation"),
                endpoint=_str(data, "endpoint"),
                request_id=_str(data, "request_id"),
                offer_id=_uint(data, "offer_id"),
                token=_str(data, "token"),
                cache_id=_uint(data, "cache_id"),
                block_ids=[
                    _as_uint(b, "block_ids") for b in _list(data, "block_ids", MAX_TICKET_BLOCKS)
                ],
                layers=_layers(data.get("layers")),
                tensors_per_layer=_uint(data, "tensors_per_layer"),
                block_bytes=_uint(data, "block_bytes"),
                num_tensors=_uint(data, "num_tensors"),
                num_tokens=None if data.get("num_tokens") is None else _uint(data, "num_tokens"),
                lease_ms=_uint(data, "lease_ms"),
                prompt_digest=_digest(data.get("prompt_digest")),
            )
        except (KeyError, IndexError, TypeError) as exc:
            raise _bad(f"ticket field missing or malformed: {exc}") from None
        if ticket.kind not in ("pull", "push"):
            raise _bad(f"ticket kind must be pull or push, got {ticket.kind!r}")
        if ticket.layers is not None and not 0 <= ticket.layers[0] < ticket.layers[1]:
            raise _bad(f"ticket layers {ticket.layers} must satisfy 0 <= start < stop")
        if not ticket.block_ids or ticket.tensors_per_layer < 1:
            raise _bad("ticket must name blocks and at least one tensor per layer")
        return ticket

    @classmethod
    def of(cls, ticket: Ticket | Mapping[str, Any] | str | bytes) -> Ticket:
        """Accept a Ticket, its dict (as a router forwards it) or its JSON."""
        if isinstance(ticket, Ticket):
            return ticket
        if isinstance(ticket, str | bytes):
            return cls.from_json(ticket)
        return cls.from_dict(ticket)


@dataclass(frozen=True, slots=True)
class Finished:
    """An offer of this engine that ended, and why (reported exactly once per offer)."""

    request_id: str
    offer_id: int
    kind: str  # "pull" (our blocks were the source) or "push" (our blocks the destination)
    reason: Ended
    peer: int | None  # the engine that claimed it, if one did
    block_ids: list[int]
    detail: str = ""


class FetchError(LLMException):
    """A fetch (or push into an offer) failed: which request, and which destination blocks may
    hold partial data (they must not be trusted; the offerer was told and freed its side)."""

    def __init__(
        self,
        message: str,
        *,
        status_code: LLMStatusCode,
        request_id: str,
        partial_blocks: list[int],
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.request_id = request_id
        self.partial_blocks = partial_blocks

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_fetch_error,
            (self.args[0], int(self.status_code), self.request_id, self.partial_blocks),
        )


def _rebuild_fetch_error(
    message: str, code: int, request_id: str, partial_blocks: list[int]
) -> FetchError:
    from ..errors import status_from_code

    return FetchError(
        message,
        status_code=status_from_code(code),
        request_id=request_id,
        partial_blocks=partial_blocks,
    )


def format_endpoint(address: tuple[str, int]) -> str:
    """A listener address as a ticket's ``endpoint``: "ip:port", an IPv6 ip in brackets."""
    ip, port = address
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """The (ip, port) of a ticket's ``endpoint`` (the inverse of :func:`format_endpoint`):
    "ip:port", an IPv6 ip in brackets, a port in 1..65535; anything else (a ticket edited on
    its way) is LLM_PARAM_INVALID."""
    if not isinstance(endpoint, str) or len(endpoint) > 64:
        raise _bad('endpoint must be an "ip:port" of at most 64 characters')
    host, _, port = endpoint.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    ip = host[1:-1] if bracketed else host
    try:
        version = ipaddress.ip_address(ip).version
    except ValueError:
        raise _bad(f"endpoint {endpoint!r} does not name an IP address") from None
    if (version == 6) != bracketed:
        raise _bad(f"endpoint {endpoint!r}: an IPv6 address (only) is written in brackets")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise _bad(f"endpoint {endpoint!r} must end in a port in 1..65535")
    return ip, int(port)


def _bad(message: str) -> LLMException:
    return LLMException(f"handoff ticket: {message}", status_code=LLMStatusCode.LLM_PARAM_INVALID)


def _str(data: Mapping[str, Any], name: str) -> str:
    value = data[name]
    if not isinstance(value, str) or len(value) > 1024:
        raise TypeError(f"{name} must be a string")
    return value


def _uint(data: Mapping[str, Any], name: str) -> int:
    return _as_uint(data[name], name)


def _as_uint(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
        raise TypeError(f"{name} must be an unsigned 64-bit integer")
    return value


def _list(data: Mapping[str, Any], name: str, most: int) -> list[Any]:
    value = data[name]
    if not isinstance(value, list):
        raise TypeError(f"{name} must be a list")
    if len(value) > most:
        raise TypeError(f"{name} must hold at most {most} items, got {len(value)}")
    return value


def _layers(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise TypeError("layers must be null or a [start, stop] pair")
    return _as_uint(value[0], "layers"), _as_uint(value[1], "layers")


def _digest(value: Any) -> str | None:
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or len(value) != _DIGEST_HEX
        or not all(c in "0123456789abcdef" for c in value)
    ):
        raise TypeError(f"prompt_digest must be null or {_DIGEST_HEX} lowercase hex digits")
    return value
