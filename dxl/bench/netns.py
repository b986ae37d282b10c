"""Two "hosts" on one machine: network namespaces joined by a veth pair (root only); or a star
of many "hosts" around a hub namespace (``Star``). Used by ``dxl bench --netns``, the netns
tests and ``benchmarks/handoff_fan_in.py``.

``TwoHosts`` creates namespaces ``<prefix>-<tag>-a`` and ``<prefix>-<tag>-b`` joined by one veth
pair whose ends are made inside them (never in the caller's namespace, so a run killed at any
point leaves no interface or address behind there), with addresses 10.231.<n>.1/30 and
10.231.<n>.2/30, and removes everything on exit. Traffic only ever goes to those two addresses,
which exist only inside namespaces the caller created. A process joins a namespace with
:func:`enter_netns` (``setns(2)``).
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from .workload import Hosts

CLONE_NEWNET = 0x40000000
_IP_TIMEOUT_S = 10


def netns_available() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (the ip command)"
    return None


def _ip(*args: str) -> str:
    proc = subprocess.run(
        ["ip", *args], check=False, capture_output=True, text=True, timeout=_IP_TIMEOUT_S
    )
    if proc.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def _del_netns(name: str) -> None:
    """Delete namespace ``name`` if it exists (its veth ends go with it)."""
    subprocess.run(
        ["ip", "netns", "del", name], capture_output=True, timeout=_IP_TIMEOUT_S, check=False
    )


def netns_names() -> list[str]:
    """The named network namespaces of this machine (``ip netns list``)."""
    return [ln.split()[0] for ln in _ip("netns", "list").splitlines() if ln.strip()]


def owned_prefix(pid: int) -> str:
    """The namespace name prefix of the :class:`TwoHosts` a process ``pid`` owns (see
    :func:`sweep_stale`)."""
    return f"dxlown{pid}"


_OWNED = re.compile(r"^dxlown(\d+)-[0-9a-f]{6}-[ab]$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete the namespaces left by owners that died without cleaning up (killed with SIGKILL,
    say): those named with :func:`owned_prefix` of a process that no longer exists. Another
    live run's namespaces, and every other name, are left alone. Returns the names deleted."""
    gone = []
    for name in netns_names():
        m = _OWNED.match(name)
        if m and not _alive(int(m.group(1))):
            _del_netns(name)
            gone.append(name)
    return gone


class TwoHosts:
    """Context manager: two namespaces joined by a veth pair; ``down()`` cuts the cable.

    Args:
        prefix: namespace names start with it (``owned_prefix(os.getpid())`` lets a later
            run's :func:`sweep_stale` remove them should this process be killed).
    """

    def __init__(self, prefix: str = "dxl") -> None:
        tag = secrets.token_hex(3)
        self.ns_a, self.ns_b = f"{prefix}-{tag}-a", f"{prefix}-{tag}-b"
        self.veth_a, self.veth_b = f"dxa{tag}", f"dxb{tag}"
        subnet = int(tag[:2], 16) % 250 + 1
        self.ip_a, self.ip_b = f"10.231.{subnet}.1", f"10.231.{subnet}.2"

    def __enter__(self) -> TwoHosts:
        try:
            _ip("netns", "add", self.ns_a)
            _ip("netns", "add", self.ns_b)
            # both ends are born inside their namespaces: nothing ever lands in ours
            _ip(
                "link", "add", self.veth_a, "netns", self.ns_a, "type", "veth",
                "peer", "name", self.veth_b, "netns", self.ns_b,
            )  # fmt: skip
            for ns, dev, addr in (
                (self.ns_a, self.veth_a, self.ip_a),
                (self.ns_b, self.veth_b, self.ip_b),
            ):
                _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def down(self) -> None:
        """Take the veth down in namespace a (the cable is pulled mid-transfer)."""
        _ip("-n", self.ns_a, "link", "set", self.veth_a, "down")

    def received_b(self, pid: int) -> int:
        """Bytes received so far by namespace b's end of the veth, read from
        ``/proc/<pid>/net/dev`` of process ``pid``, which lives in namespace b."""
        with open(f"/proc/{pid}/net/dev") as f:
            for line in f:
                name, sep, fields = line.partition(":")
                if sep and name.strip() == self.veth_b:
                    return int(fields.split()[0])
        raise LookupError(f"{self.veth_b} is not in the namespace of pid {pid}")

    def __exit__(self, *exc: object) -> None:
        for ns in (self.ns_a, self.ns_b):  # deleting a namespace removes its veth end too
            _del_netns(ns)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def bench_hosts() -> Iterator[Hosts]:
    """``dxl bench --netns``: the target's namespace and the initiator's, joined by a veth
    pair, for as long as the block runs. They are removed on every way out of it: an
    exception, Ctrl-C, and SIGTERM too (turned into ``SystemExit`` while the block runs, as
    Python's default would end the process without unwinding). A SIGKILL cannot be caught:
    the next run's :func:`sweep_stale` removes what it left."""
    sweep_stale()
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _terminate) if main else None
    try:
        with TwoHosts(owned_prefix(os.getpid())) as two:
            yield Hosts(
                target_ip=two.ip_a,
                initiator_ip=two.ip_b,
                target_ns=two.ns_a,
                initiator_ns=two.ns_b,
                auth_token=secrets.token_hex(16),
            )
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)


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
                _ip(
                    "link", "add", hub_end, "netns", self.hub, "type", "veth",
                    "peer", "name", host_end, "netns", ns,
                )  # fmt: skip
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
            _del_netns(ns)
        self._made.clear()


def enter_netns(name: str) -> None:
    """Move the calling thread into namespace ``name``: call it from a process's only thread,
    before any socket (threads started later inherit it; sockets made before keep theirs)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)
