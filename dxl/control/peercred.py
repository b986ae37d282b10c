"""Kernel-verified facts about the process at the other end of a TCP connection on this host.

A peer's hello *declares* its pid and host; neither may decide where our bytes go. What the
kernel says instead: ``/proc/net/tcp{,6}`` lists every TCP socket of our network namespace with
its owner's uid and inode, so the socket at the other end of our connection is found there
exactly when the peer runs on this host (in this network namespace), and ``/proc/<pid>/fd``
shows whether a process holds that very socket. Together they prove "process ``pid``, of user
``uid``, is the peer on this connection" without trusting anything the peer said, the way
``SO_PEERCRED`` does for Unix sockets.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

__all__ = ["PeerSocket", "holds_socket", "peer_socket"]

_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


@dataclass(frozen=True, slots=True)
class PeerSocket:
    """The peer's end of a connection, as the kernel sees it."""

    uid: int
    inode: int


def _hex_endpoint(address: str, port: int, v6: bool) -> str:
    """An (ip, port) in the notation of /proc/net/tcp (``v6``: tcp6): the address as host-order
    32-bit words of 8 hex digits each, then ``:PORT`` in 4. A dual-stack socket's IPv4 peer is
    ``::ffff:a.b.c.d`` in one table and ``a.b.c.d`` in the other."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None and not v6:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address) and v6:
        ip = ipaddress.IPv6Address(f"::ffff:{ip}")
    if (ip.version == 6) != v6:
        raise ValueError(f"{address} has no form in this table")
    packed = ip.packed
    words = [int.from_bytes(packed[i : i + 4], "little") for i in range(0, len(packed), 4)]
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def peer_socket(sock: socket.socket) -> PeerSocket | None:
    """The other end of ``sock``'s connection if it is a socket of this network namespace (the
    peer runs on this host), else None. Never raises for a peer elsewhere or a closed socket."""
    try:
        local = sock.getsockname()[:2]
        remote = sock.getpeername()[:2]
    except OSError:
        return None
    for path in _TABLES:
        v6 = path.endswith("6")
        try:
            # the peer's socket: its local end is our remote, its remote end our local
            want_local = _hex_endpoint(remote[0], remote[1], v6)
            want_remote = _hex_endpoint(local[0], local[1], v6)
        except ValueError:
            continue
        try:
            with open(path, encoding="ascii") as table:
                next(table, None)  # header
                for line in table:
                    fields = line.split()
                    if len(fields) > 9 and fields[1] == want_local and fields[2] == want_remote:
                        return PeerSocket(uid=int(fields[7]), inode=int(fields[9]))
        except OSError:
            continue
    return None


def holds_socket(pid: int, inode: int) -> bool:
    """True if process ``pid`` has the socket with this inode open (we may read its fds)."""
    if pid <= 0 or inode <= 0:
        return False
    target = f"socket:[{inode}]"
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(f"{fd_dir}/{name}") == target:
                return True
        except OSError:
            continue
    return False
