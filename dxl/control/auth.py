"""Mutual HMAC-SHA256 challenge-response over any byte stream, with the standard library only.

Both ends of a new connection prove to each other that they hold the same shared secret, without
sending it. The exchange is symmetric and has three fixed-size steps, each sent by both sides
before either reads the other's (so neither waits on the other to speak first)::

    hello    (72 bytes)  b"DXLA", version, flags (bit 0: "I have a secret"), 2 zero bytes,
                         purpose (16 bytes, NUL-padded), key id (16 bytes: which secret, zeros
                         for the deployment's), a fresh 32-byte random nonce
    proof    (32 bytes)  HMAC-SHA256(secret, "dxl-auth-v2" | purpose | key id | sender's role |
                         client nonce | server nonce)
    verdict  (1 byte)    1 if the peer's proof checked out, else 0

Each proof covers both nonces, so it is worthless on any other connection, and the sender's role
("client": the side that connected, "server": the side that accepted), so a proof cannot be
reflected back in the other direction; the purpose ("data" for data-server streams, "link" for
the engine's control connection) keeps a proof for one kind of connection from being used on the
other. Proofs are compared with :func:`hmac.compare_digest`. The verdicts let each side say in its
error which side rejected which proof.

Without a secret on either side, the exchange stops after the hellos: both sides see the other's
flag and agree to skip authentication. If only one side has a secret, both fail with an
:class:`AuthError` that says which side has one and which does not.

Key ids: a server may hold many secrets and pick the one the client names. The engine's data
servers do: every link has its own key (:func:`link_key`, derived from the link handshake's two
challenges and the deployment secret), a data connection names its link's key id, and a key the
server no longer holds (the link ended) is refused. So data access is per link, not per secret.

The secret never appears in a message, log line, exception or ``repr``.

Drivers: :func:`authenticate_socket` (blocking socket, for data streams),
:func:`authenticate_sock_async` (a non-blocking socket on an asyncio loop: reads exactly the
handshake's bytes, so the socket can then be handed to native code with nothing buffered in
Python) and :func:`authenticate_streams` (asyncio ``StreamReader``/``StreamWriter``, for the
control connection). :class:`Handshake` is the sans-I/O core they share.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from ..errors import DxlError

__all__ = [
    "HELLO_BYTES",
    "KEY_ID_BYTES",
    "PROOF_BYTES",
    "VERDICT_BYTES",
    "AuthError",
    "Handshake",
    "Role",
    "authenticate_sock_async",
    "authenticate_socket",
    "authenticate_streams",
    "link_key",
    "normalize_secret",
]

Role = Literal["client", "server"]

MAGIC = b"DXLA"
VERSION = 2
FLAG_SECRET = 0x01
NONCE_BYTES = 32
PURPOSE_BYTES = 16
KEY_ID_BYTES = 16
HELLO_BYTES = 4 + 1 + 1 + 2 + PURPOSE_BYTES + KEY_ID_BYTES + NONCE_BYTES
PROOF_BYTES = hashlib.sha256().digest_size
VERDICT_BYTES = 1
_LABEL = b"dxl-auth-v2"
KeyLookup = Callable[[bytes], bytes | None]  # key id -> secret, None if unknown
_ACCEPT = b"\x01"
_REJECT = b"\x00"


class AuthError(DxlError):
    """The authentication handshake failed; the message says which side refused what.

    Attributes:
        reason: a short machine-readable cause: ``"not-dxl"``, ``"version"``, ``"purpose"``,
            ``"secret-missing-here"``, ``"secret-missing-peer"``, ``"rejected-by-peer"``,
            ``"rejected-here"``, ``"rejected-both"``, ``"unknown-key"``, ``"closed"`` or
        ``"timeout"``.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def normalize_secret(secret: str | bytes | None) -> bytes | None:
    """The secret as bytes, or None when none is configured (None or empty)."""
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, bytes | bytearray | memoryview):
        raise TypeError(f"the shared secret must be str or bytes, not {type(secret).__name__}")
    return bytes(secret) or None


def _other(role: Role) -> Role:
    return "server" if role == "client" else "client"


class Handshake:
    """The sans-I/O state of one side of the exchange.

    Use: send :meth:`hello`; give the peer's hello to :meth:`on_hello`, which returns this side's
    proof to send (or None: both sides agreed that there is no secret, done); give the peer's
    proof to :meth:`on_proof`, which returns the verdict to send; give the peer's verdict to
    :meth:`on_verdict`, which raises :class:`AuthError` unless both proofs were accepted.
    """

    __slots__ = (
        "_accepted",
        "_key_id",
        "_keys",
        "_nonce",
        "_peer_nonce",
        "_purpose",
        "_secret",
        "role",
    )

    def __init__(
        self,
        secret: str | bytes | KeyLookup | None,
        role: Role,
        purpose: str,
        *,
        key_id: bytes = b"",
    ) -> None:
        """``secret``: the shared secret, or (server) a lookup from the key id the client names
        to its secret; ``key_id`` (client): which of the server's secrets this one is."""
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        raw = purpose.encode("ascii")
        if not raw or len(raw) > PURPOSE_BYTES:
            raise ValueError(f"purpose must be 1 to {PURPOSE_BYTES} ASCII characters")
        if len(key_id) > KEY_ID_BYTES:
            raise ValueError(f"key_id must be at most {KEY_ID_BYTES} bytes")
        self._keys = secret if callable(secret) else None
        self._secret = None if callable(secret) else normalize_secret(secret)
        self._key_id = key_id.ljust(KEY_ID_BYTES, b"\0")
        self.role: Role = role
        self._purpose = raw.ljust(PURPOSE_BYTES, b"\0")
        self._nonce = secrets.token_bytes(NONCE_BYTES)
        self._peer_nonce = b""
        self._accepted = False

    def __repr__(self) -> str:  # never the secret
        return f"Handshake(role={self.role!r}, secret={'set' if self._secret else 'none'})"

    @property
    def has_secret(self) -> bool:
        return self._secret is not None or self._keys is not None

    @property
    def key_id(self) -> bytes:
        """The key id (``KEY_ID_BYTES``) the proofs cover: the client's own; on a server with a
        key lookup, the one the client named (once its hello arrived); else zeros."""
        return self._key_id

    def hello(self) -> bytes:
        flags = FLAG_SECRET if self.has_secret else 0
        return MAGIC + bytes((VERSION, flags, 0, 0)) + self._purpose + self._key_id + self._nonce

    def on_hello(self, data: bytes) -> bytes | None:
        """Check the peer's hello: this side's proof to send, or None when neither side has a
        secret (authentication is skipped by agreement)."""
        peer = _other(self.role)
        if len(data) != HELLO_BYTES or data[:4] != MAGIC:
            raise AuthError(f"the {peer} is not speaking the dxl handshake", "not-dxl")
        version, flags = data[4], data[5]
        if version != VERSION:
            raise AuthError(
                f"the {peer} speaks handshake version {version}, this {self.role} {VERSION}",
                "version",
            )
        purpose = data[8 : 8 + PURPOSE_BYTES]
        if purpose != self._purpose:
            theirs = purpose.rstrip(b"\0").decode("ascii", "replace")
            ours = self._purpose.rstrip(b"\0").decode("ascii")
            raise AuthError(
                f"the {peer} opened a {theirs!r} connection, this {self.role} expected {ours!r}",
                "purpose",
            )
        key_at = 8 + PURPOSE_BYTES
        self._peer_nonce = data[key_at + KEY_ID_BYTES :]
        # the client names the key and the server must hold it (the server's own hello, sent
        # before it read the client's, names none); both proofs then cover the named key id
        if self._keys is not None:
            self._key_id = data[key_at : key_at + KEY_ID_BYTES]
            self._secret = normalize_secret(self._keys(self._key_id))
            if self._secret is None:
                raise AuthError(
                    f"authentication failed: the {peer} named a key this {self.role} does not "
                    "hold (its link ended, or it never existed)",
                    "unknown-key",
                )
        peer_has = bool(flags & FLAG_SECRET)
        if peer_has and self._secret is None:
            raise AuthError(
                f"authentication failed: the {peer} requires a shared secret but this "
                f"{self.role} has none configured",
                "secret-missing-here",
            )
        if not peer_has and self._secret is not None:
            raise AuthError(
                f"authentication failed: this {self.role} requires a shared secret but the "
                f"{peer} has none configured",
                "secret-missing-peer",
            )
        if self._secret is None:
            return None
        return self._mac(self.role)

    def _mac(self, sender: Role) -> bytes:
        assert self._secret is not None
        if self.role == "client":
            client_nonce, server_nonce = self._nonce, self._peer_nonce
        else:
            client_nonce, server_nonce = self._peer_nonce, self._nonce
        msg = b"|".join(
            (_LABEL, self._purpose, self._key_id, sender.encode(), client_nonce, server_nonce)
        )
        return hmac.new(self._secret, msg, hashlib.sha256).digest()

    def on_proof(self, data: bytes) -> bytes:
        """Check the peer's proof; the verdict to send back."""
        expected = self._mac(_other(self.role))
        self._accepted = len(data) == PROOF_BYTES and hmac.compare_digest(data, expected)
        return _ACCEPT if self._accepted else _REJECT

    def on_verdict(self, data: bytes) -> None:
        """Raise :class:`AuthError` unless both sides accepted each other's proof."""
        peer = _other(self.role)
        peer_accepted = data == _ACCEPT
        if self._accepted and peer_accepted:
            return
        if not self._accepted and not peer_accepted:
            raise AuthError(
                f"authentication failed: this {self.role} and the {peer} each rejected the "
                "other's proof (the shared secrets differ)",
                "rejected-both",
            )
        if not self._accepted:
            raise AuthError(
                f"authentication failed: this {self.role} rejected the {peer}'s proof (the "
                "shared secrets differ)",
                "rejected-here",
            )
        raise AuthError(
            f"authentication failed: the {peer} rejected this {self.role}'s proof (the shared "
            "secrets differ)",
            "rejected-by-peer",
        )


def link_key(
    secret: str | bytes | None, client_challenge: bytes, server_challenge: bytes
) -> tuple[bytes, bytes]:
    """``(key id, key)`` of one link's data connections, derived from the two challenges its
    handshake exchanged and the deployment secret (if any): only the two ends of that link know
    the key, and it is new for every link."""
    base = normalize_secret(secret) or b""
    key = hmac.new(
        base, b"|".join((b"dxl-link-v1", client_challenge, server_challenge)), hashlib.sha256
    ).digest()
    key_id = hmac.new(key, b"dxl-link-id", hashlib.sha256).digest()[:KEY_ID_BYTES]
    return key_id, key


async def _run_async(
    hs: Handshake,
    send: Callable[[bytes], Awaitable[None]],
    recv_exactly: Callable[[int], Awaitable[bytes]],
) -> None:
    await send(hs.hello())
    proof = hs.on_hello(await recv_exactly(HELLO_BYTES))
    if proof is None:
        return
    await send(proof)
    await send(hs.on_proof(await recv_exactly(PROOF_BYTES)))
    hs.on_verdict(await recv_exactly(VERDICT_BYTES))


def _closed(hs: Handshake) -> AuthError:
    return AuthError(
        f"the {_other(hs.role)} closed the connection during the handshake "
        "(it may have refused this side)",
        "closed",
    )


def _timeout(hs: Handshake, timeout: float) -> AuthError:
    return AuthError(
        f"the {_other(hs.role)} did not complete the handshake within {timeout:g} s", "timeout"
    )


class _Deadline:
    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._end = time.monotonic() + timeout

    def left(self, hs: Handshake) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise _timeout(hs, self._timeout)
        return left


def authenticate_socket(
    sock: socket.socket,
    secret: str | bytes | KeyLookup | None,
    *,
    role: Role,
    purpose: str = "data",
    timeout: float = 10.0,
    key_id: bytes = b"",
) -> None:
    """Run the handshake on a connected blocking socket, within ``timeout`` seconds in all.

    Leaves the socket's own timeout as it found it.

    Raises:
        AuthError: refused, not a dxl peer, closed, or too slow.
        OSError: the socket failed.
    """
    hs = Handshake(secret, role, purpose, key_id=key_id)
    deadline = _Deadline(timeout)
    old = sock.gettimeout()

    def send(data: bytes) -> None:
        sock.settimeout(deadline.left(hs))
        sock.sendall(data)

    def recv_exactly(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            sock.settimeout(deadline.left(hs))
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise _closed(hs)
            buf += chunk
        return bytes(buf)

    try:
        send(hs.hello())
        proof = hs.on_hello(recv_exactly(HELLO_BYTES))
        if proof is None:
            return
        send(proof)
        send(hs.on_proof(recv_exactly(PROOF_BYTES)))
        hs.on_verdict(recv_exactly(VERDICT_BYTES))
    except TimeoutError:
        raise _timeout(hs, timeout) from None
    except (ConnectionResetError, BrokenPipeError):
        raise _closed(hs) from None
    finally:
        sock.settimeout(old)


async def authenticate_sock_async(
    sock: socket.socket,
    secret: str | bytes | KeyLookup | None,
    *,
    role: Role,
    purpose: str = "data",
    timeout: float = 10.0,
    key_id: bytes = b"",
) -> bytes:
    """Run the handshake on a non-blocking socket with the running loop's ``sock_*`` calls.

    Reads exactly the handshake's bytes, never more: whatever the peer sends next is still in the
    socket when this returns.

    Returns:
        The key id the handshake used (:attr:`Handshake.key_id`, ``KEY_ID_BYTES`` bytes): on a
        server with a key lookup, the id of the key the client authenticated with (the engine's
        data server groups connections by it, to cut a link's connections when its key goes).

    Raises:
        AuthError: refused, not a dxl peer, closed, or too slow.
        OSError: the socket failed.
    """
    loop = asyncio.get_running_loop()
    hs = Handshake(secret, role, purpose, key_id=key_id)

    async def recv_exactly(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = await loop.sock_recv(sock, n - len(buf))
            if not chunk:
                raise _closed(hs)
            buf += chunk
        return bytes(buf)

    async def send(data: bytes) -> None:
        await loop.sock_sendall(sock, data)

    try:
        async with asyncio.timeout(timeout):
            await _run_async(hs, send, recv_exactly)
    except TimeoutError:
        raise _timeout(hs, timeout) from None
    except (ConnectionResetError, BrokenPipeError):
        raise _closed(hs) from None
    return hs.key_id


async def authenticate_streams(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    secret: str | bytes | KeyLookup | None,
    *,
    role: Role,
    purpose: str = "link",
    timeout: float = 10.0,
    key_id: bytes = b"",
) -> None:
    """Run the handshake over asyncio streams (the engine's control connection).

    Raises:
        AuthError: refused, not a dxl peer, closed, or too slow.
        OSError: the connection failed.
    """
    hs = Handshake(secret, role, purpose, key_id=key_id)

    async def recv_exactly(n: int) -> bytes:
        try:
            return await reader.readexactly(n)
        except asyncio.IncompleteReadError:
            raise _closed(hs) from None

    async def send(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    try:
        async with asyncio.timeout(timeout):
            await _run_async(hs, send, recv_exactly)
    except TimeoutError:
        raise _timeout(hs, timeout) from None
    except (ConnectionResetError, BrokenPipeError):
        raise _closed(hs) from None
