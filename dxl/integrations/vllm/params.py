"""What a request's ``kv_transfer_params`` may make the connector do, checked before it does it.

The params come from the client (through a proxy): nothing in them is trusted. :func:`role_of`
reads the two flags (only real booleans count), :func:`check_claim` parses a decode request's
tickets and binds them to the request's own prompt: the tickets must agree with each other,
their blocks must hold exactly the tokens they claim, and the prompt digest they carry must be
the one of the request's own prompt tokens (:func:`prompt_digest`). Anything else is a refused
claim, which the scheduler side turns into a failed load; no exception leaves these functions
for anything a client can send.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import LLMException
from ...handoff.ticket import Ticket

__all__ = ["Claim", "Role", "check_claim", "prompt_digest", "role_of"]

PARAMS_KEY = "dxl_tickets"  # the tickets (one per tensor-parallel rank) in kv_transfer_params
MAX_RANKS = 256  # tickets in one request's params (one per tensor-parallel rank)
_DIGEST_SEED = b"dxl.vllm.prompt.v1\0"


class Role(enum.Enum):
    """What a request's params ask of this instance."""

    NONE = "none"  # a plain request (or params we ignore, with a reason)
    PRODUCE = "produce"  # a prefill: offer its blocks when it finishes
    LOAD = "load"  # a decode: load its prompt's KV from the tickets
    BAD_LOAD = "bad load"  # asks for a load, but malformed: a failed load


@dataclass(frozen=True, slots=True)
class RoleOf:
    role: Role
    why: str = ""  # for NONE: why params were ignored; for BAD_LOAD: why the load fails


def role_of(params: Any) -> RoleOf:
    """Read ``do_remote_prefill`` and ``do_remote_decode``: true, false or absent; anything
    else (``"false"``, 1, a list) is malformed, and so is both at once."""
    if params is None:
        return RoleOf(Role.NONE)
    if not isinstance(params, dict):  # we mark a handled load in it: it must be a dict
        return RoleOf(Role.NONE, f"kv_transfer_params must be an object, not {_kind(params)}")
    prefill, decode = params.get("do_remote_prefill"), params.get("do_remote_decode")
    if prefill is not None and type(prefill) is not bool:  # 1 == True, "false" is truthy
        why = f"do_remote_prefill must be true or false, not {_kind(prefill)}"
        return RoleOf(Role.BAD_LOAD, why)
    if prefill is True and decode is True:
        return RoleOf(Role.BAD_LOAD, "do_remote_prefill and do_remote_decode are both true")
    if prefill is True:
        return RoleOf(Role.LOAD)
    if decode is not None and type(decode) is not bool:
        return RoleOf(Role.NONE, f"do_remote_decode must be true or false, not {_kind(decode)}")
    return RoleOf(Role.PRODUCE) if decode is True else RoleOf(Role.NONE)


@dataclass(frozen=True, slots=True)
class Claim:
    """A decode request's tickets, checked against its own prompt: what it may load."""

    tickets: tuple[dict[str, Any], ...] = ()  # re-serialised from the parsed tickets
    num_tokens: int = 0  # tokens the tickets' blocks hold (the prompt's, all of them)
    num_blocks: int = 0  # blocks of each ticket: exactly ceil(num_tokens / block_size)
    refused: str = ""  # why nothing may be loaded (then tickets is empty)


def check_claim(
    params: Mapping[str, Any],
    prompt_token_ids: Sequence[int] | None,
    num_prompt_tokens: int,
    block_size: int,
    ranks: int | None = None,
) -> Claim:
    """The tickets in ``params``, if they are well formed, agree, cover exactly the tokens they
    claim and are bound to this prompt (``ranks``: this instance's tensor-parallel size, if
    known); else a refused claim saying why."""
    raw = params.get(PARAMS_KEY)
    if raw is None:
        return _refuse(f"no {PARAMS_KEY} in kv_transfer_params")
    if not isinstance(raw, list | tuple):
        return _refuse(f"{PARAMS_KEY} must be a list, not {_kind(raw)}")
    if not 1 <= len(raw) <= MAX_RANKS:
        return _refuse(f"{PARAMS_KEY} must hold 1 to {MAX_RANKS} tickets, got {len(raw)}")
    if ranks and len(raw) != ranks:
        return _refuse(f"{len(raw)} tickets for this instance's {ranks} tensor-parallel ranks")
    try:
        tickets = [Ticket.from_dict(t) for t in raw]
    except LLMException as exc:
        return _refuse(str(exc)[:200])
    first = tickets[0]
    for t in tickets:
        if t.kind != "pull":
            return _refuse("a push-mode ticket cannot be loaded from")
        if t.num_tokens is None or t.prompt_digest is None:
            return _refuse("a ticket without num_tokens or prompt_digest binds no prompt")
        if (t.num_tokens, len(t.block_ids), t.prompt_digest) != (
            first.num_tokens,
            len(first.block_ids),
            first.prompt_digest,
        ):
            return _refuse("the ranks' tickets disagree on the tokens or blocks they hold")
    num_tokens, num_blocks = first.num_tokens, len(first.block_ids)
    assert num_tokens is not None and first.prompt_digest is not None  # checked above
    if num_tokens < 1 or -(-num_tokens // block_size) != num_blocks:
        # more tokens than blocks hold would count stale KV as computed; fewer, load too much
        return _refuse(
            f"{num_blocks} blocks of {block_size} tokens cannot hold exactly {num_tokens} tokens"
        )
    if num_tokens != num_prompt_tokens:
        return _refuse(f"the tickets hold {num_tokens} tokens, the prompt has {num_prompt_tokens}")
    digest = prompt_digest(prompt_token_ids, num_tokens, block_size)
    if digest is None:
        return _refuse("the request's prompt token ids are not known: nothing to bind to")
    if not hmac.compare_digest(digest, first.prompt_digest):
        return _refuse("the tickets hold the KV of another prompt (prompt_digest differs)")
    return Claim(tuple(t.to_dict() for t in tickets), num_tokens, num_blocks)


def prompt_digest(token_ids: Sequence[int] | None, num_tokens: int, block_size: int) -> str | None:
    """The hash chain of the first ``num_tokens`` prompt tokens, one link per block of
    ``block_size`` (the last one maybe partial), as vLLM's prefix cache keys blocks: a link is
    sha256(previous link, the block's token ids as little-endian u64); the first "previous
    link" is a digest of the block size. Returns the last link (lowercase hex): it covers every
    token before it. None if the tokens are not known or not token ids."""
    if token_ids is None or block_size < 1:
        return None
    try:
        if not 0 <= num_tokens <= len(token_ids):
            return None
        ids = array("Q", token_ids[:num_tokens])
    except (TypeError, OverflowError, ValueError):
        return None
    if sys.byteorder != "little":
        ids.byteswap()
    data = memoryview(ids).cast("B")
    link = hashlib.sha256(_DIGEST_SEED + block_size.to_bytes(8, "little")).digest()
    step = 8 * block_size
    for start in range(0, len(data), step):
        h = hashlib.sha256(link)
        h.update(data[start : start + step])
        link = h.digest()
    return link.hex()


def _refuse(why: str) -> Claim:
    return Claim(refused=why)


def _kind(value: Any) -> str:
    """A value's type, never its content (it may be huge, or a secret)."""
    return "null" if value is None else type(value).__name__
