"""Two "hosts" on one machine: network namespaces joined by a veth pair (root only); or a star
of many "hosts" around a hub namespace (``Star``).

``TwoHosts`` creates namespaces ``dxl-<tag>-a`` and ``dxl-<tag>-b`` with addresses
10.231.<n>.1/24 and 10.231.<n>.2/24 on the two ends of one veth pair, and removes everything
on exit. Traffic only ever goes to those two addresses, which exist only inside namespaces the
test created. A child process joins a namespace with :func:`enter_netns` (``setns(2)``).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import subprocess

CLONE_NEWNET = 0x40000000


def netns_available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (the ip command)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class TwoHosts:
    """Context manager: two namespaces joined by a veth pair; ``down()`` cuts the cable."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.ns_a, self.ns_b = f"dxl-{tag}-a", f"dxl-{tag}-b"
        self._veth_a, self._veth_b = f"dxa{tag}", f"dxb{tag}"
        subnet = int(tag[:2], 16) % 250 + 1
        self.ip_a, self.ip_b = f"10.231.{subnet}.1", f"10.231.{subnet}.2"

    def __enter__(self) -> TwoHosts:
        try:
            _ip("netns", "add", self.ns_a)
            _ip("netns", "add", self.ns_b)
            _ip("link", "add", self._veth_a, "type", "veth", "peer", "name", self._veth_b)
            _ip("link", "set", self._veth_a, "netns", self.ns_a)
            _ip("link", "set", self._veth_b, "netns", self.ns_b)
            for ns, dev, addr in (
                (self.ns_a, self._veth_a, self.ip_a),
                (self.ns_b, self._veth_b, self.ip_b),
            ):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def down(self) -> None:
        """Take the veth down in namespace a (the cable is pulled mid-transfer)."""
        _ip("-n", self.ns_a, "link", "set", self._veth_a, "down")

    def received_b(self, pid: int) -> int:
        """Bytes received so far by namespace b's end of the veth, read from
        ``/proc/<pid>/net/dev`` of process ``pid``, which lives in namespace b."""
        with open(f"/proc/{pid}/net/dev") as f:
            for line in f:
                name, sep, fields = line.partition(":")
                if sep and name.strip() == self._veth_b:
                    return int(fields.split()[0])
        raise LookupError(f"{self._veth_b} is not in the namespace of pid {pid}")

    def __exit__(self, *exc: object) -> None:
        for ns in (self.ns_a, self.ns_b):  # deleting a namespace removes its veth end too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)


class Star:
    """Context manager: ``n`` "hosts" (namespaces ``dxl-<tag>-h<i>``) each joined to a hub
    namespace (``dxl-<tag>-hub``) by a veth pair of its own: host i is 10.234.<s+i>.2/24, the
    hub's end of its cable 10.234.<s+i>.1/24 (``s`` from the tag). A process in the hub that
    listens on 0.0.0.0 is reached from host i at ``hub_ip(i)``; everything is removed on exit."""

    def __init__(self, n: int) -> None:
        tag = secrets.token_hex(3)
        self.tag = tag
        self.hub = f"dxl-{tag}-hub"
        self.hosts = [f"dxl-{tag}-h{i}" for i in range(n)]
        self._base = int(tag[:2], 16) % (250 - n) + 1
        self._made: list[str] = []

    def host_ip(self, i: int) -> str:
        return f"10.234.{self._base + i}.2"

    def hub_ip(self, i: int) -> str:
        return f"10.234.{self._base + i}.1"

    def __enter__(self) -> Star:
        try:
            _ip("netns", "add", self.hub)
            self._made.append(self.hub)
            _ip("-n", self.hub, "link", "set", "lo", "up")
            for i, ns in enumerate(self.hosts):
                _ip("netns", "add", ns)
                self._made.append(ns)
                hub_end, host_end = f"dxs{self.tag}{i}", f"dxh{self.tag}{i}"
                _ip("link", "add", hub_end, "type", "veth", "peer", "name", host_end)
                _ip("link", "set", hub_end, "netns", self.hub)
                _ip("link", "set", host_end, "netns", ns)
                _ip("-n", self.hub, "addr", "add", f"{self.hub_ip(i)}/24", "dev", hub_end)
                _ip("-n", ns, "addr", "add", f"{self.host_ip(i)}/24", "dev", host_end)
                _ip("-n", self.hub, "link", "set", hub_end, "up")
                _ip("-n", ns, "link", "set", host_end, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in reversed(self._made):  # deleting a namespace removes its veth ends too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)
        self._made.clear()


def enter_netns(name: str) -> None:
    """Move the calling process (single-threaded, before any sockets) into namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)
