"""``kv_connector_extra_config`` of the dxl connector, with defaults that work on one host."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ...handoff.handoff import DEFAULT_FETCH_TIMEOUT_S, DEFAULT_LEASE_S

__all__ = ["DxlConnectorConfig"]

TRANSPORTS = ("auto", "cma", "tcp")


@dataclass(frozen=True, slots=True)
class DxlConnectorConfig:
    """The connector's settings (keys of ``kv_connector_extra_config``; all optional).

    Attributes:
        listen: ``"host:port"`` where each worker's dxl engine listens (peers link to it).
            Port 0 picks a free port; a fixed port is used by rank 0 and port + rank by the
            others. Default ``127.0.0.1:0`` (one host); use a routable address across hosts.
        secret: shared secret that authenticates links (``dxl.AuthToken``; both sides need the
            same). Default: ``DXL_AUTH_TOKEN`` from the environment, else none (any process of
            the same user on the host may link; see docs/security.md).
        lease_s: how long a prefill holds a finished request's blocks for a decode that has
            not come to fetch them; then the offer expires and vLLM frees them.
        fetch_timeout_s: a decode's bound on one fetch (linking included); then it fails
            and vLLM's ``kv_load_failure_policy`` applies.
        transport: ``auto`` (cma on one host, tcp across hosts), ``cma`` or ``tcp``.
        share_registered: ``dxl.ShareRegistered`` for the KV caches (same-host peers map them
            and memcpy; docs/api.md says when it is safe). Default off.
        allow_remote_listen: listen on a non-loopback address without a secret
            (``dxl.AllowRemoteListen``; dxl refuses that otherwise). Default off.
    """

    listen: str = "127.0.0.1:0"
    secret: str | None = None
    lease_s: float = DEFAULT_LEASE_S
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    transport: str = "auto"
    share_registered: bool = False
    allow_remote_listen: bool = False

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> DxlConnectorConfig:
        """Parse ``kv_connector_extra_config``: its ``dxl`` sub-dict if there is one, else
        the dict itself. Keys this connector does not know are refused (a typo would silently
        be a default)."""
        raw = dict(extra or {})
        if isinstance(raw.get("dxl"), Mapping):
            raw = dict(raw["dxl"])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(
                f"dxl connector: unknown kv_connector_extra_config key(s) {unknown}; "
                f"known: {sorted(known)}"
            )
        cfg = cls(**raw)
        cfg.check()
        return cfg

    def check(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"dxl connector: listen must be 'host:port', got {self.listen!r}")
        if not 0 < float(self.lease_s) <= 86400:
            raise ValueError(f"dxl connector: lease_s must be in (0, 86400], got {self.lease_s}")
        if not 0 < float(self.fetch_timeout_s) <= 3600:
            raise ValueError(
                f"dxl connector: fetch_timeout_s must be in (0, 3600], got {self.fetch_timeout_s}"
            )
        if self.transport not in TRANSPORTS:
            raise ValueError(
                f"dxl connector: transport must be one of {TRANSPORTS}, got {self.transport!r}"
            )

    def listen_for(self, rank: int) -> str:
        """The listen address of the worker of ``rank``."""
        host, _, port = self.listen.rpartition(":")
        p = int(port)
        return f"{host}:{p + rank if p else 0}"

    def engine_options(self, rank: int) -> dict[str, str]:
        """The dxl engine options of the worker of ``rank``."""
        opts = {"llm.listenIpInfo": self.listen_for(rank), "dxl.Transport": self.transport}
        secret = self.secret if self.secret is not None else os.environ.get("DXL_AUTH_TOKEN")
        if secret:
            opts["dxl.AuthToken"] = secret
        if self.share_registered:
            opts["dxl.ShareRegistered"] = "1"
        if self.allow_remote_listen:
            opts["dxl.AllowRemoteListen"] = "1"
        return opts
