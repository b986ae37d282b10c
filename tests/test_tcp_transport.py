"""The tcp transport from Python: ``dxl.tcp.DataServer`` and ``dxl.tcp.TcpTransport``, with the
``dxl.auth`` handshake.

Transfers run across two processes on 127.0.0.1: a child registers numpy memory and serves it
with a DataServer (on asyncio or uvloop); this process pulls and pushes with a TcpTransport and
checks every byte against a model of the child's buffer (it is generated from a known seed).
Handshake tests run a DataServer in this process, on the test's own event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from waiting import ops_inflight, wait_until

from dxl import _ffi
from dxl.control.auth import (
    HELLO_BYTES,
    AuthError,
    Handshake,
    authenticate_socket,
    authenticate_streams,
)
from dxl.memory.plan import Pieces
from dxl.memory.regions import RegionRegistry
from dxl.transport import PeerGone, TransportClosed
from dxl.transport.tcp import InstanceMismatch, TcpTransport
from dxl.transport.tcp_server import DataServer

lib = _ffi.lib
MiB = 1 << 20
SECRET = "correct horse battery staple"
SIZE = 64 * MiB
U64 = np.uint64

CHILD = r"""
import asyncio, hashlib, json, os, sys
import numpy as np
from dxl import _ffi
from dxl.memory.regions import RegionRegistry
from dxl.transport.tcp_server import DataServer
size, seed, secret, loop_name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
buf = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
regions = RegionRegistry()
regions.add(buf.ctypes.data, size)

async def main():
    srv = await DataServer.start("127.0.0.1", 0, secret or None, registry=regions,
                                 instance="child-1", auth_timeout=1.0)
    print("READY", srv.address[1], buf.ctypes.data, flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        cmd, *a = line.split() or ["quit"]
        if cmd == "sha":
            off, n = int(a[0]), int(a[1])
            print(hashlib.sha256(buf[off:off + n].tobytes()).hexdigest(), flush=True)
        elif cmd == "stats":
            print(json.dumps(srv.stats()), flush=True)
        else:
            break
    await srv.close()
    print("BYE", _ffi.lib.dxl_tcp_servers_live(), flush=True)

if loop_name == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


class Child:
    """A process serving SIZE seeded bytes at `addr` through a DataServer on `port`."""

    def __init__(self, secret: str = SECRET, seed: int = 11, loop: str = "asyncio") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(SIZE), str(seed), secret, loop],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both PIPEs
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        line = self.stdout.readline().split()
        assert line and line[0] == "READY", f"child failed to start: {line}"
        self.port = int(line[1])
        self.addr = int(line[2])
        self.address = ("127.0.0.1", self.port)
        self.model = np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8)

    def ask(self, line: str) -> str:
        self.stdin.write(line + "\n")
        self.stdin.flush()
        return self.stdout.readline().strip()

    def sha(self, off: int, n: int) -> str:
        return self.ask(f"sha {off} {n}")

    def stats(self) -> dict[str, int]:
        return json.loads(self.ask("stats"))

    def stop(self) -> None:
        """Ask a live child to quit; it answers with its count of live data servers, which
        must be 0 (a child that died or was killed has nothing to answer)."""
        bye = None
        if self.proc.poll() is None:
            try:
                bye = self.ask("quit")
                self.proc.wait(10)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self.stdin.close()
        self.stdout.close()
        assert bye in (None, "BYE 0"), f"the child's data servers at exit: {bye!r}"


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def child(request: pytest.FixtureRequest) -> Iterator[Child]:
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    c = Child(loop=request.param)
    yield c
    c.stop()


@pytest.fixture
def fresh_child() -> Iterator[Child]:
    c = Child(seed=5)
    yield c
    with_pid = c.proc.pid
    if c.proc.poll() is None:
        os.kill(with_pid, signal.SIGCONT)
    c.stop()


def block_plan(
    rng: np.random.Generator,
    local: np.ndarray,
    remote_base: int,
    remote_span: tuple[int, int],
    block: int,
    tensors: int = 64,
    per_tensor: int = 16,
) -> tuple[Pieces, np.ndarray, np.ndarray]:
    """64 tensors x `per_tensor` random blocks: local block slots (dst of a pull) and remote ones
    inside remote_span = (offset, length). Returns (pull pieces, local offsets, remote offsets)."""
    n = tensors * per_tensor
    assert n <= local.size // block and n <= remote_span[1] // block, "plan does not fit"
    lo = rng.permutation(local.size // block)[:n].astype(U64) * U64(block)
    lo_r = rng.permutation(remote_span[1] // block)[:n].astype(U64) * U64(block)
    ro = lo_r + U64(remote_span[0])
    pieces = Pieces(
        (U64(local.ctypes.data) + lo).astype(U64),
        (U64(remote_base) + ro).astype(U64),
        np.full(n, block, dtype=U64),
    )
    return pieces, lo, ro


def check_pull(local: np.ndarray, model: np.ndarray, lo: np.ndarray, ro: np.ndarray, block: int):
    got = local.reshape(-1)[(lo[:, None] + np.arange(block, dtype=U64)).ravel()]
    want = model[(ro[:, None] + np.arange(block, dtype=U64)).ravel()]
    assert np.array_equal(got, want)


# ---- transfers across two processes --------------------------------------------------------------


@pytest.mark.multiproc
@pytest.mark.parametrize("block", [4096, 256 << 10])
def test_pull_and_push_byte_exact(child: Child, block: int) -> None:
    rng = np.random.default_rng(block)
    tr = TcpTransport(child.address, SECRET, expect_instance="child-1")
    try:
        local = np.zeros(32 * MiB, dtype=np.uint8)
        per_tensor = 2 if block > 4096 else 64  # 32 MiB / 8 MiB of blocks
        pull, lo, ro = block_plan(rng, local, child.addr, (0, 32 * MiB), block, 64, per_tensor)
        assert tr.read(pull) == pull.nbytes
        check_pull(local, child.model, lo, ro, block)

        # Push fresh bytes into the child's upper half, at random block slots.
        local[:] = rng.integers(0, 256, local.size, dtype=np.uint8)
        push, lo, ro = block_plan(
            rng, local, child.addr, (32 * MiB, 32 * MiB), block, 64, per_tensor
        )
        push = Pieces(push.src, push.dst, push.length)  # push: src local, dst remote
        assert tr.write(push) == push.nbytes
        idx_r = (ro[:, None] + np.arange(block, dtype=U64)).ravel()
        idx_l = (lo[:, None] + np.arange(block, dtype=U64)).ravel()
        child.model[idx_r] = local[idx_l]
        half = child.model[32 * MiB :]
        assert child.sha(32 * MiB, 32 * MiB) == hashlib.sha256(half.tobytes()).hexdigest()
        assert tr.reconnects == 0
    finally:
        tr.close()


@pytest.mark.multiproc
def test_concurrent_calls_share_a_transport(child: Child) -> None:
    tr = TcpTransport(child.address, SECRET, streams=2, max_sets=2)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            rng = np.random.default_rng(seed)
            for _ in range(5):
                local = np.zeros(4 * MiB, dtype=np.uint8)
                pull, lo, ro = block_plan(rng, local, child.addr, (0, 32 * MiB), 16384, 16, 8)
                assert tr.read(pull) == pull.nbytes
                check_pull(local, child.model, lo, ro, 16384)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    tr.close()
    assert not errors, errors


@pytest.mark.multiproc
def test_refused_range_is_a_clean_remote_error(child: Child) -> None:
    tr = TcpTransport(child.address, SECRET, streams=1)
    try:
        local = np.zeros(8192, dtype=np.uint8)
        bad = Pieces(
            np.array([local.ctypes.data, local.ctypes.data + 4096], dtype=U64),
            np.array([child.addr, child.addr + SIZE - 100], dtype=U64),  # 2nd runs past the end
            np.array([4096, 4096], dtype=U64),
        )
        with pytest.raises(_ffi.NativeError) as info:
            tr.read(bad)
        assert info.value.name == "DXL_E_REMOTE"
        assert getattr(info.value, "remote_status", None) == lib.DXL_E_RANGE
        assert "DXL_E_RANGE" in str(info.value) and "piece 1" in str(info.value)
        ok = Pieces(bad.dst[:1], bad.src[:1], bad.length[:1])
        assert tr.read(ok) == 4096
        assert tr.reconnects == 0  # the refused stream stayed in step and was reused
        assert np.array_equal(local[:4096], child.model[:4096])
    finally:
        tr.close()


@pytest.mark.multiproc
def test_wrong_instance_is_refused(child: Child) -> None:
    with pytest.raises(InstanceMismatch, match="restarted") as info:
        TcpTransport(child.address, SECRET, expect_instance="child-0")
    assert isinstance(info.value, PeerGone)  # the link is dead: the engine ends it


# ---- authentication and hostile clients ----------------------------------------------------------


@pytest.mark.multiproc
def test_wrong_or_missing_secret_is_refused_with_the_side_named(child: Child) -> None:
    with pytest.raises(AuthError) as info:
        TcpTransport(child.address, "wrong secret")
    msg = str(info.value)
    assert "rejected" in msg and "server" in msg and "secrets differ" in msg
    assert "wrong secret" not in msg and SECRET not in msg
    with pytest.raises(AuthError, match="server requires a shared secret but this client has none"):
        TcpTransport(child.address, None)
    # the server counts a refusal after the client has seen it: wait for the count
    wait_until(
        lambda n: n >= 2,
        10,
        "both refusals counted",
        observe=lambda: child.stats()["auth_failures"],
    )


@pytest.mark.multiproc
def test_data_connection_without_the_handshake_is_refused(child: Child) -> None:
    """A well-formed data request sent without authenticating first: closed, nothing served."""
    before = child.stats()
    with socket.create_connection(child.address, timeout=5) as s:
        req = struct.pack("<IHHQQQ", lib.DXL_TCP_REQ_MAGIC, 1, 1, 1, 1, 64)
        s.sendall(req + struct.pack("<QQ", child.addr, 64))
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
    assert len(data) <= HELLO_BYTES  # at most the server's own hello: never our 64 bytes
    wait_until(
        lambda n: n == before["auth_failures"] + 1,
        10,
        "the refusal counted",
        observe=lambda: child.stats()["auth_failures"],
    )
    assert child.stats()["requests_served"] == before["requests_served"]


@pytest.mark.multiproc
def test_garbage_and_silence_on_the_data_port_leave_others_served(child: Child) -> None:
    silent = socket.create_connection(child.address)  # never speaks: dropped after auth_timeout
    garbage = socket.create_connection(child.address)
    garbage.sendall(os.urandom(4096))
    tr = TcpTransport(child.address, SECRET)
    try:
        local = np.zeros(MiB, dtype=np.uint8)
        pull, lo, ro = block_plan(
            np.random.default_rng(3), local, child.addr, (0, SIZE), 4096, 16, 8
        )
        assert tr.read(pull) == pull.nbytes
        check_pull(local, child.model, lo, ro, 4096)
        for s in (garbage, silent):
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass
    finally:
        tr.close()
        silent.close()
        garbage.close()


async def test_handshake_outcomes_in_process() -> None:
    """Every combination of secrets, on this test's loop (asyncio and uvloop): the side that
    refuses is named on both ends, and no secret appears in any message."""
    loop = asyncio.get_running_loop()

    async def pair(server_secret, client_secret, purpose_c="data", purpose_s="data"):
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        results: dict[str, BaseException | None] = {}

        async def server_side() -> None:
            conn, _ = await loop.sock_accept(lsock)
            with conn:
                conn.setblocking(False)
                from dxl.control.auth import authenticate_sock_async

                try:
                    await authenticate_sock_async(
                        conn, server_secret, role="server", purpose=purpose_s, timeout=5
                    )
                    results["server"] = None
                except AuthError as exc:
                    results["server"] = exc

        def client_side() -> None:
            with socket.create_connection(lsock.getsockname()) as s:
                try:
                    authenticate_socket(s, client_secret, role="client", purpose=purpose_c)
                    results["client"] = None
                except AuthError as exc:
                    results["client"] = exc

        await asyncio.gather(server_side(), asyncio.to_thread(client_side))
        lsock.close()
        return results["server"], results["client"]

    assert await pair(None, None) == (None, None)
    assert await pair("k", "k") == (None, None)
    assert await pair(b"k", "k") == (None, None)  # str and bytes secrets are the same

    srv, cli = await pair("k1", "k2")
    assert srv.reason == cli.reason == "rejected-both"
    assert "this server and the client each rejected" in str(srv)
    srv, cli = await pair("k", None)
    assert srv.reason == "secret-missing-peer" and cli.reason == "secret-missing-here"
    assert "this server requires a shared secret but the client has none" in str(srv)
    srv, cli = await pair(None, "k")
    assert "this client requires a shared secret but the server has none" in str(cli)
    srv, cli = await pair("k", "k", purpose_c="link")
    assert srv.reason == "purpose" and "'link'" in str(srv)
    for exc in (srv, cli):
        assert "k1" not in str(exc) and "k2" not in str(exc)


async def test_handshake_over_asyncio_streams() -> None:
    """The control-connection driver: both ends on asyncio streams, one proof forged."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await authenticate_streams(reader, writer, "s", role="server", purpose="link")
            done.set_result(None)
        except AuthError as exc:
            done.set_exception(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await authenticate_streams(reader, writer, "s", role="client", purpose="link")
    await done
    writer.close()
    server.close()
    await server.wait_closed()


def test_a_reflected_proof_is_refused() -> None:
    """A proof covers the sender's role: the server's own proof sent back to it fails."""
    server, client = Handshake("s", "server", "data"), Handshake("s", "client", "data")
    server_proof = server.on_hello(client.hello())
    assert server_proof is not None
    client.on_hello(server.hello())
    assert server.on_proof(server_proof) == b"\x00"
    with pytest.raises(AuthError, match="this server rejected the client's proof"):
        server.on_verdict(b"\x01")
    assert repr(server) == "Handshake(role='server', secret=set)"


async def test_in_process_server_and_transport() -> None:
    """DataServer on this test's loop, the blocking transport on a thread."""
    buf = np.arange(MiB, dtype=np.uint8)
    regions = RegionRegistry()
    rid = regions.add(buf.ctypes.data, buf.nbytes)
    srv = await DataServer.start("127.0.0.1", 0, None, registry=regions, instance="me")
    try:
        tr = await asyncio.to_thread(TcpTransport, srv.address, None, expect_instance="me")
        local = np.zeros(MiB, dtype=np.uint8)
        one = Pieces(
            np.array([local.ctypes.data], dtype=U64),
            np.array([buf.ctypes.data], dtype=U64),
            np.array([MiB], dtype=U64),
        )
        assert await asyncio.to_thread(tr.read, one) == MiB
        assert np.array_equal(local, buf)
        tr.close()
        with pytest.raises(TransportClosed):
            tr.read(one)
        assert srv.fence(100) == 0
    finally:
        await srv.close()
        assert regions.remove(rid)
        regions.close()


async def test_no_secret_on_a_public_address_is_refused() -> None:
    regions = RegionRegistry()
    with pytest.raises(ValueError, match="without a shared secret"):
        await DataServer.start("0.0.0.0", 0, None, registry=regions)
    srv = await DataServer.start("0.0.0.0", 0, None, registry=regions, allow_insecure=True)
    await srv.close()
    regions.close()
    assert lib.dxl_tcp_servers_live() == 0


# ---- peer failure --------------------------------------------------------------------------------


def _big_pull(child: Child, local: np.ndarray) -> Pieces:
    return Pieces(
        np.array([local.ctypes.data], dtype=U64),
        np.array([child.addr], dtype=U64),
        np.array([local.size], dtype=U64),
    )


@pytest.mark.multiproc
def test_peer_killed_mid_transfer_fails_within_the_timeout(fresh_child: Child) -> None:
    # a timeout beyond pytest's: the read can only end by the closed connection
    tr = TcpTransport(fresh_child.address, SECRET, timeout_ms=300_000)
    local = np.zeros(SIZE, dtype=np.uint8)
    outcome: list[BaseException | int] = []
    os.kill(fresh_child.proc.pid, signal.SIGSTOP)  # the request will hang mid-transfer
    t = threading.Thread(
        target=lambda: outcome.append(_catch(tr.read, _big_pull(fresh_child, local)))
    )
    t.start()
    wait_until(ops_inflight, 10, "the read to be in flight (the stopped child cannot answer it)")
    os.kill(fresh_child.proc.pid, signal.SIGKILL)
    wait_until(lambda: not t.is_alive(), 60, "the read to fail once its peer was killed")
    assert len(outcome) == 1 and isinstance(outcome[0], _ffi.NativeError), outcome
    assert outcome[0].name == "DXL_E_PEER"
    with pytest.raises(PeerGone, match="connect to"):  # nothing to reconnect to
        tr.read(_big_pull(fresh_child, local))
    tr.close()
    fresh_child.proc.wait(5)


@pytest.mark.multiproc
def test_stalled_peer_times_out_then_the_streams_are_rebuilt(fresh_child: Child) -> None:
    tr = TcpTransport(fresh_child.address, SECRET, timeout_ms=400)
    local = np.zeros(8 * MiB, dtype=np.uint8)
    pull = _big_pull(fresh_child, local)
    os.kill(fresh_child.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(_ffi.NativeError) as info:
            tr.read(pull)
        assert info.value.name == "DXL_E_TIMEDOUT"  # the stopped child sends nothing
        assert time.monotonic() - t0 >= 0.4  # and not before its timeout
    finally:
        os.kill(fresh_child.proc.pid, signal.SIGCONT)
    # The timed-out streams hold a stale reply in flight: they must be replaced, not reused.
    local[:] = 0
    assert tr.read(pull, timeout_ms=10_000) == local.size
    assert np.array_equal(local, fresh_child.model[: local.size])
    assert tr.reconnects >= 1
    tr.close()


def _catch(fn, *args):
    try:
        return fn(*args)
    except BaseException as exc:
        return exc
