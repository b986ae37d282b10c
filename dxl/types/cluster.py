"""A peer's descriptor for ``link_clusters`` (:class:`LLMClusterInfo`) and the IP parsing it
shares with the option table (IPv4 as the reference's little-endian int, IPv6 as canonical text)."""

from __future__ import annotations

import socket

from dxl._validate import (
    check_isinstance,
    check_uint16,
    check_uint32,
    check_uint64,
    ensure,
)
from dxl.types.enums import LLMRole

__all__ = ["LLMClusterInfo", "ip_to_str", "ipv6_or_none", "parse_ip"]


def ipv6_or_none(text: str) -> str | None:
    """Return the canonical form of an IPv6 address (brackets allowed), else None."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))
    except (OSError, ValueError):
        return None


def parse_ip(ip: str | int) -> str | int:
    """IPv4 text -> little-endian int (reference); IPv6 text -> canonical text; int as is.

    Raises:
        RuntimeError: ``"Can not parse ip str:..."`` (the reference's error) for bad text.
    """
    if not isinstance(ip, str):
        return ip
    try:
        return int.from_bytes(socket.inet_aton(ip), byteorder="little")
    except OSError:
        pass
    v6 = ipv6_or_none(ip)
    if v6 is None:
        raise RuntimeError(f"Can not parse ip str:{ip}")
    return v6


def ip_to_str(ip: str | int) -> str:
    """Render a stored ip (little-endian IPv4 int, or IPv6 string) as text."""
    if isinstance(ip, str):
        return ip
    return socket.inet_ntoa(int(ip).to_bytes(4, byteorder="little"))


class LLMClusterInfo:
    """Describes one peer for ``link_clusters`` / ``unlink_clusters``.

    ``LLMClusterInfo()`` then set :attr:`remote_cluster_id` and call
    :meth:`append_remote_ip_info` (and :meth:`append_local_ip_info`), as in the reference.

    Args:
        remote_cluster_id: dxl extension: sets :attr:`remote_cluster_id`.
        remote_ip: dxl extension: with ``remote_port``, calls :meth:`append_remote_ip_info`.
        remote_port: dxl extension: see ``remote_ip``.

    Raises:
        LLMException: ``LLM_PARAM_INVALID`` if only one of ``remote_ip``/``remote_port``
            is given.
    """

    __slots__ = (
        "_local_ip_info_list",
        "_remote_cluster_id",
        "_remote_ip_info_list",
        "_remote_role_type",
    )

    def __init__(
        self,
        *,
        remote_cluster_id: int | None = None,
        remote_ip: str | int | None = None,
        remote_port: int | None = None,
    ) -> None:
        self._remote_cluster_id: int | None = None
        self._remote_role_type: LLMRole | int | None = None
        self._local_ip_info_list: list[tuple[str | int, int]] = []
        self._remote_ip_info_list: list[tuple[str | int, int]] = []
        if remote_cluster_id is not None:
            self.remote_cluster_id = remote_cluster_id
        ensure(
            (remote_ip is None) == (remote_port is None),
            "LLMClusterInfo: give both remote_ip and remote_port, or neither",
        )
        if remote_ip is not None:
            self.append_remote_ip_info(remote_ip, remote_port)  # type: ignore[arg-type]

    @property
    def remote_cluster_id(self) -> int | None:
        """The peer's cluster id; None until set."""
        return self._remote_cluster_id

    @remote_cluster_id.setter
    def remote_cluster_id(self, value: int) -> None:
        check_uint64("remote_cluster_id", value)
        self._remote_cluster_id = value

    @property
    def remote_role_type(self) -> LLMRole | int | None:
        """The peer's role (unused in v2)."""
        return self._remote_role_type

    @remote_role_type.setter
    def remote_role_type(self, value: LLMRole | int) -> None:
        check_isinstance("remote_role_type", value, (LLMRole, int))
        self._remote_role_type = value

    @property
    def local_ip_info_list(self) -> list[tuple[str | int, int]]:
        """``(ip, port)`` entries added by :meth:`append_local_ip_info`."""
        return self._local_ip_info_list

    @property
    def remote_ip_info_list(self) -> list[tuple[str | int, int]]:
        """``(ip, port)`` entries added by :meth:`append_remote_ip_info`."""
        return self._remote_ip_info_list

    @staticmethod
    def _checked_ip(ip: str | int, port: int) -> str | int:
        check_isinstance("ip", ip, (str, int), allow_none=False)
        check_uint16("port", port)
        if isinstance(ip, int):
            check_uint32("ip", ip)
        return parse_ip(ip)

    def append_local_ip_info(self, ip: str | int, port: int) -> None:
        """Add this side's host ip and port.

        Args:
            ip: Dotted IPv4 (stored as its little-endian int), an IPv4 int, or IPv6 text
                (dxl extension, stored as canonical text).
            port: uint16; 0 is allowed.

        Raises:
            TypeError: ``ip`` not str/int or ``port`` not int.
            ValueError: ``port`` not uint16 or an int ``ip`` not uint32.
            RuntimeError: ``"Can not parse ip str:..."`` for an unparsable ip string.
        """
        self._local_ip_info_list.append((self._checked_ip(ip, port), port))

    def append_remote_ip_info(self, ip: str | int, port: int) -> None:
        """Add the peer's listening host ip and port (same rules as the local one)."""
        self._remote_ip_info_list.append((self._checked_ip(ip, port), port))

    def remote_endpoint(self) -> tuple[str, int]:
        """Return the first remote entry as ``(ip text, port)``.

        Raises:
            LLMException: ``LLM_PARAM_INVALID`` if no remote ip was added.
        """
        ensure(
            bool(self._remote_ip_info_list),
            f"LLMClusterInfo(remote_cluster_id={self._remote_cluster_id}): "
            "remote_ip_info_list is empty",
        )
        ip, port = self._remote_ip_info_list[0]
        return ip_to_str(ip), port

    def __repr__(self) -> str:
        remotes = [(ip_to_str(ip), port) for ip, port in self._remote_ip_info_list]
        locals_ = [(ip_to_str(ip), port) for ip, port in self._local_ip_info_list]
        return (
            f"LLMClusterInfo(remote_cluster_id={self._remote_cluster_id}, "
            f"remote_ip_info_list={remotes}, local_ip_info_list={locals_})"
        )
