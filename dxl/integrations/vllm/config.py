"""``kv_connector_extra_config`` of the dxl connector: typed, checked at start-up, with defaults
that work on one host.

Every value is checked for its type as well as its range (JSON gives strings, numbers and
booleans; ``"false"`` is a string, and a string where a boolean belongs is refused, naming the
key), so a value can never mean the opposite of what it says. The shared secret is given by
reference (``secret_env``, ``secret_file``): vLLM prints its non-default arguments at start-up,
so a literal ``secret`` would be logged in clear text (it still works, with a warning).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ...config import (
    ENV_AUTH_TOKEN,
    OPT_ALLOW_REMOTE_LISTEN,
    OPT_AUTH_TOKEN,
    OPT_DEVICE_ID,
    OPT_LISTEN_IP_INFO,
    OPT_NIXL_ALLOW_EMULATED,
    OPT_SHARE_REGISTERED,
    OPT_TRANSPORT,
    TRANSPORTS,
)
from ...handoff.handoff import DEFAULT_FETCH_TIMEOUT_S, DEFAULT_LEASE_S
from ...transport.names import AUTO, NIXL

__all__ = ["DxlConnectorConfig"]

log = logging.getLogger("dxl.vllm")

SECRET_KEYS = ("secret", "secret_env", "secret_file")
MAX_SECRET_BYTES = 4096  # a secret file is read up to this (a secret is a line, not a document)
MAX_TEXT = 4096  # any other string value
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class DxlConnectorConfig:
    """The connector's settings (keys of ``kv_connector_extra_config``; all optional).

    Attributes:
        listen: ``"host:port"`` where each worker's dxl engine listens (peers link to it).
            Port 0 picks a free port; a fixed port is used by rank 0 and port + rank by the
            others. Default ``127.0.0.1:0`` (one host); use a routable address across hosts.
        secret_env: the name of an environment variable holding the shared secret that
            authenticates links (``dxl.AuthToken``; both sides need the same). The way to give
            a secret: the variable must be set and non-empty at start-up.
        secret_file: the path of a file holding the shared secret (one line; a trailing
            newline is dropped). The file must exist and hold a non-empty secret at start-up.
        secret: the shared secret itself. Works, but vLLM logs its arguments at start-up, so
            the secret ends up in the log in clear text: a warning says so. At most one of
            ``secret``, ``secret_env`` and ``secret_file``; none: ``DXL_AUTH_TOKEN`` from the
            environment, else no secret (any process of the same user on the host may link;
            see docs/security.md). Never shown by ``repr``.
        lease_s: how long a prefill holds a finished request's blocks for a decode that has
            not come to fetch them; then the offer expires and vLLM frees them.
        fetch_timeout_s: a decode's bound on one fetch (linking included); then it fails
            and vLLM's ``kv_load_failure_policy`` applies.
        transport: ``auto`` (host KV caches: cma on one host, tcp across hosts; CUDA KV
            caches: nixl), ``cma``, ``tcp`` or ``nixl`` (needs ``pip install 'dxl[nixl]'``;
            the only transport of CUDA KV caches, so ``cma`` or ``tcp`` with them is refused).
        share_registered: ``dxl.ShareRegistered`` for the KV caches (same-host peers map them
            and memcpy; docs/api.md says when it is safe). Host memory only: true is refused
            with CUDA KV caches. Default unset (null): automatic, on where nothing in the
            worker can have pinned the caches (vLLM's CPU platform: no CUDA/RDMA runtime
            mapped, VmPin 0); a JSON boolean forces it on or off.
        allow_remote_listen: listen on a non-loopback address without a secret
            (``dxl.AllowRemoteListen``; dxl refuses that otherwise). Default off; a JSON boolean.
        idle_wait_s: in a step that runs no forward (vLLM steps its engine every millisecond
            while a request waits for its KV or a prefill's blocks wait for their decode),
            how long a worker waits for a load or offer in flight to end before it answers,
            instead of spinning into the next empty step: the fetch gets the CPU and the GIL,
            and its end is reported in the step it happens in. 0: do not wait. Default 0.005.
        gil_switch_s: ``sys.setswitchinterval`` in each worker process: how long the
            worker's main thread (which spins on vLLM's step queue between steps) may hold
            the GIL while dxl's thread waits for it to serve or finish a transfer. 0: leave
            Python's (0.005). Default 0.0005.

    Raises:
        ValueError: on construction, for a value of the wrong type or out of range, naming the
            key and the rule (never echoing a secret).
    """

    listen: str = "127.0.0.1:0"
    secret: str | None = field(default=None, repr=False)
    secret_env: str | None = None
    secret_file: str | None = None
    lease_s: float = DEFAULT_LEASE_S
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    transport: str = AUTO
    share_registered: bool | None = None
    allow_remote_listen: bool = False
    nixl_allow_emulated: bool = False
    idle_wait_s: float = 0.005
    gil_switch_s: float = 0.0005

    def __post_init__(self) -> None:
        self.check()
        # ints are fine numbers in JSON; store them as the floats the fields are
        object.__setattr__(self, "lease_s", float(self.lease_s))
        object.__setattr__(self, "fetch_timeout_s", float(self.fetch_timeout_s))
        object.__setattr__(self, "idle_wait_s", float(self.idle_wait_s))
        object.__setattr__(self, "gil_switch_s", float(self.gil_switch_s))

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> DxlConnectorConfig:
        """Parse ``kv_connector_extra_config``: its ``dxl`` sub-dict if there is one, else
        the dict itself. Keys this connector does not know are refused (a typo would silently
        be a default), and so is a value of the wrong type."""
        if extra is None:
            extra = {}
        if not isinstance(extra, Mapping):
            raise ValueError(
                "dxl connector: kv_connector_extra_config must be an object, "
                f"got {type(extra).__name__}"
            )
        raw = dict(extra)
        if "dxl" in raw:
            if not isinstance(raw["dxl"], Mapping):
                raise ValueError(
                    "dxl connector: kv_connector_extra_config key 'dxl' must be an object, "
                    f"got {type(raw['dxl']).__name__}"
                )
            raw = dict(raw["dxl"])
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k)[:64] for k in set(raw) - known)
        if unknown:
            raise ValueError(
                f"dxl connector: unknown kv_connector_extra_config key(s) {unknown}; "
                f"known: {sorted(known)}"
            )
        cfg = cls(**raw)
        if cfg.secret is not None:
            log.warning(
                "dxl connector: kv_connector_extra_config holds a literal 'secret', which vLLM "
                "prints with its arguments at start-up: give it by reference instead, "
                "'secret_env' (the name of an environment variable) or 'secret_file' (a path)"
            )
        return cfg

    def check(self) -> None:
        """Every key's type and range, and that a referenced secret can be read."""
        _text("listen", self.listen)
        host, sep, port = self.listen.rpartition(":")
        if (
            not sep
            or not host
            or not (port.isascii() and port.isdigit() and len(port) <= 5)
            or int(port) > 65535
        ):
            raise ValueError(f"dxl connector: listen must be 'host:port', got {self.listen!r}")
        _number("lease_s", self.lease_s, 86400)
        _number("fetch_timeout_s", self.fetch_timeout_s, 3600)
        _number("idle_wait_s", self.idle_wait_s, 1, zero=True)
        _number("gil_switch_s", self.gil_switch_s, 0.1, zero=True)
        _text("transport", self.transport)
        if self.transport not in TRANSPORTS:
            raise ValueError(
                f"dxl connector: transport must be one of {TRANSPORTS}, got {self.transport!r}"
            )
        if self.share_registered is not None:  # None: dxl decides (docs/api.md)
            _flag("share_registered", self.share_registered)
        _flag("allow_remote_listen", self.allow_remote_listen)
        _flag("nixl_allow_emulated", self.nixl_allow_emulated)
        given = [k for k in SECRET_KEYS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(
                f"dxl connector: give at most one of {', '.join(SECRET_KEYS)}; got {given}"
            )
        if self.secret is not None and (not isinstance(self.secret, str) or not self.secret):
            raise ValueError("dxl connector: secret must be a non-empty string")
        if self.secret_env is not None:
            _text("secret_env", self.secret_env)
            if not _ENV_NAME.fullmatch(self.secret_env):
                raise ValueError(
                    "dxl connector: secret_env must be an environment variable's name "
                    f"([A-Za-z_][A-Za-z0-9_]*), got {self.secret_env[:64]!r}"
                )
        if self.secret_file is not None:
            _text("secret_file", self.secret_file)
        self.auth_token()  # a referenced secret that cannot be read is refused at start-up

    def auth_token(self) -> str | None:
        """The shared secret: literal, from ``secret_env``'s variable, from ``secret_file``,
        else ``DXL_AUTH_TOKEN``, else None. Raises ValueError naming the key (never the
        secret) when a reference cannot be resolved."""
        if self.secret is not None:
            return self.secret
        if self.secret_env is not None:
            value = os.environ.get(self.secret_env)
            if not value:
                raise ValueError(
                    f"dxl connector: secret_env names the environment variable "
                    f"{self.secret_env!r}, which is not set or empty"
                )
            return value
        if self.secret_file is not None:
            return _read_secret(self.secret_file)
        return os.environ.get(ENV_AUTH_TOKEN) or None

    def listen_for(self, rank: int) -> str:
        """The listen address of the worker of ``rank``."""
        host, _, port = self.listen.rpartition(":")
        p = int(port)
        return f"{host}:{p + rank if p else 0}"

    def transport_for(self, device: int | None) -> str:
        """The transport of KV caches in host memory (``device`` None) or on CUDA device
        ``device``: as configured for host memory; ``nixl`` for CUDA, the only transport that
        moves device memory (``auto`` picks it; ``cma`` or ``tcp`` are refused).

        Raises:
            ValueError: CUDA caches with ``cma``/``tcp``, with ``share_registered``, or
                without nixl installed (the message names ``pip install 'dxl[nixl]'``).
        """
        if device is None:
            return self.transport
        if self.transport not in (AUTO, NIXL):
            raise ValueError(
                f"dxl connector: the KV caches are on cuda:{device}, which only the nixl "
                f"transport moves, but transport is {self.transport!r}: set transport to "
                "'auto' or 'nixl'"
            )
        if self.share_registered:
            raise ValueError(
                f"dxl connector: share_registered is for KV caches in host memory; these are "
                f"on cuda:{device}"
            )
        from ...transport.nixl import nixl_version  # imports no nixl

        if nixl_version() is None:
            raise ValueError(
                f"dxl connector: the KV caches are on cuda:{device}, which dxl moves over the "
                "nixl transport, and nixl is not installed: pip install 'dxl[nixl]'"
            )
        return NIXL

    def engine_options(self, rank: int, device: int | None = None) -> dict[str, str]:
        """The dxl engine options of the worker of ``rank`` whose KV caches are in host memory
        (``device`` None) or on CUDA device ``device`` (:meth:`transport_for`; raises
        ValueError)."""
        opts = {
            OPT_LISTEN_IP_INFO: self.listen_for(rank),
            OPT_TRANSPORT: self.transport_for(device),
        }
        if device is not None:  # the device of the engine's Placement.DEVICE caches
            opts[OPT_DEVICE_ID] = str(device)
        secret = self.auth_token()
        if secret:
            opts[OPT_AUTH_TOKEN] = secret
        if self.share_registered is not None:
            opts[OPT_SHARE_REGISTERED] = "1" if self.share_registered else "0"
        if self.allow_remote_listen:
            opts[OPT_ALLOW_REMOTE_LISTEN] = "1"
        if self.nixl_allow_emulated:
            opts[OPT_NIXL_ALLOW_EMULATED] = "1"
        return opts


def _text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError(f"dxl connector: {name} must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise ValueError(f"dxl connector: {name} must be at most {MAX_TEXT} characters")


def _flag(name: str, value: Any) -> None:
    # bool("false") is True: only a real boolean may switch an option on or off
    if type(value) is not bool:
        raise ValueError(
            f"dxl connector: {name} must be true or false (a JSON boolean), "
            f"got {type(value).__name__} {str(value)[:32]!r}"
        )


def _number(name: str, value: Any, most: float, zero: bool = False) -> None:
    """A number of seconds in (0, most], or [0, most] with ``zero``."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(
            f"dxl connector: {name} must be a number of seconds, got {type(value).__name__}"
        )
    # compared as given: float() of a huge int would raise OverflowError
    low = value >= 0 if zero else value > 0
    if (isinstance(value, float) and not math.isfinite(value)) or not (low and value <= most):
        shown = value if isinstance(value, float) or abs(value) < 10**12 else "a huge number"
        bounds = f"[0, {most:g}]" if zero else f"(0, {most:g}]"
        raise ValueError(f"dxl connector: {name} must be in {bounds}, got {shown}")


def _read_secret(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise ValueError(
            f"dxl connector: secret_file {path[:256]!r} cannot be read: {exc.strerror}"
        ) from None
    if len(data) > MAX_SECRET_BYTES:
        raise ValueError(
            f"dxl connector: secret_file {path[:256]!r} must hold at most "
            f"{MAX_SECRET_BYTES} bytes (one line: the secret)"
        )
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ValueError(f"dxl connector: secret_file {path[:256]!r} must be UTF-8") from None
    if text.endswith("\n"):  # what echo and most editors leave at the end
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    if not text:
        raise ValueError(f"dxl connector: secret_file {path[:256]!r} is empty")
    return text
