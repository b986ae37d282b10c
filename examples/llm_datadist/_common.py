"""Process plumbing shared by the LLM-DataDist sample flows; no flow logic lives here.

What every flow changes from its reference sample:

- **Processes, not hosts.** The samples run each role on its own host, started by hand with
  command-line addresses, and line the roles up with ``torch.distributed`` barriers or fixed
  sleeps. Here :meth:`Flow.run` starts every role as a process ("spawn") and
  :meth:`Flow.barrier` stands in for those barriers and sleeps: it returns once every role
  reached the same step, with what each role posted there (a listen address, say). Every wait
  has a deadline and every role a hard one, so a broken flow fails, never hangs.
- **127.0.0.1 and ephemeral ports**, posted out of band, instead of fixed ports (26000...).
  Rank-table flows (``link()``) build the reference's one-server rank table with 127.0.0.1 as
  every device's IP, and set ``rank_table_base_port`` on both sides to a base from
  :func:`free_port_base` (dxl puts rank ``r`` at that base + ``r``), instead of HCCL's device
  network.
- **HOST memory** (numpy arrays from :func:`host_kv`, filled with a pattern unique per 8-byte
  word) instead of NPU tensors, and no ``device_id``; a cache a peer reads or writes is
  registered with ``remote_accessible=True``, since dxl's default for HOST memory is False
  (dxl stance 3), where the reference's DEVICE caches are remotely accessible by default.
- **Every byte is checked**: what a transfer wrote, and that nothing else changed.
"""

from __future__ import annotations

import faulthandler
import json
import multiprocessing as mp
import random
import socket
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import dxl
from dxl.testing import KVBuffers

LOCALHOST = "127.0.0.1"
DEADLINE_S = 20.0  # the longest a role may run; each flow takes well under a second
_DONE, _ERROR = "done", "error"


class SampleError(Exception):
    """The flow did not do what the reference sample does (wrong bytes, wrong status...)."""


def expect(ok: bool, what: str) -> None:
    if not ok:
        raise SampleError(what)


def expect_ok(result: tuple[dxl.LLMStatusCode, list[dxl.LLMStatusCode]], what: str) -> None:
    """``result`` of link_clusters / unlink_clusters must be success, overall and per cluster."""
    ok = dxl.LLMStatusCode.LLM_SUCCESS
    expect(result[0] == ok and all(code == ok for code in result[1]), f"{what}: {result}")


def expect_status(code: dxl.LLMStatusCode, call: Callable[..., Any], *args: Any) -> None:
    """``call(*args)`` must raise ``LLMException`` with status ``code``."""
    try:
        call(*args)
    except dxl.LLMException as exc:
        expect(exc.status_code == code, f"{call.__name__}: {exc.status_code!r}, not {code!r}")
        return
    raise SampleError(f"{call.__name__} succeeded; expected {code!r}")


def init_datadist(role: dxl.LLMRole, cluster_id: int, **config: Any) -> dxl.LLMDataDist:
    """The samples' ``init_llm_datadist``: ``LLMConfig`` properties, ``generate_options()``,
    ``init``. ``device_id`` is left out: dxl needs none for HOST memory."""
    datadist = dxl.LLMDataDist(role, cluster_id)
    llm_config = dxl.LLMConfig()
    for name, value in config.items():
        setattr(llm_config, name, value)
    datadist.init(llm_config.generate_options())
    return datadist


def cluster_info(
    remote_cluster_id: int, remote_address: tuple[str, int] | None = None
) -> dxl.LLMClusterInfo:
    """A peer descriptor as the samples build it (the address may be left out to unlink)."""
    cluster = dxl.LLMClusterInfo()
    cluster.remote_cluster_id = remote_cluster_id
    if remote_address is not None:
        cluster.append_local_ip_info(LOCALHOST, 0)
        cluster.append_remote_ip_info(*remote_address)
    return cluster


def host_kv(desc: dxl.CacheDesc, seed: int | None = None) -> KVBuffers:
    """Host memory laid out as ``desc`` says, one numpy allocation per tensor (the samples'
    torch tensors): filled with the verifiable pattern of ``seed``, or zeroed if None."""
    rows = desc.shape[0]
    return KVBuffers(desc.num_tensors, rows, desc.size // rows, seed or 0, seed is not None)


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports nothing listens on now, for flows whose cluster ids are
    derived from their ports."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind((LOCALHOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_base(count: int = 2) -> int:
    """A port ``base`` such that ``base .. base + count - 1`` are free now, for
    ``LLMConfig.rank_table_base_port``. It lies below the kernel's ephemeral range, so no
    outgoing connection or port-0 listener takes one of them before the flow listens there."""
    low = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    for _ in range(200):
        base = random.randrange(10000, max(10001, low - count))
        socks = [socket.socket() for _ in range(count)]
        try:
            for i, s in enumerate(socks):
                s.bind((LOCALHOST, base + i))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise SampleError(f"no {count} consecutive free ports")


def single_server_rank_table(num_devices: int = 2) -> str:
    """The rank table the reference's samples build for one host (``_build_single_rank_table``
    of ``pull_sample_common.py``), with 127.0.0.1 as every device's IP and as the host's."""
    devices = [
        {"device_id": str(i), "device_ip": LOCALHOST, "rank_id": str(i)} for i in range(num_devices)
    ]
    server = {"device": devices, "host_ip": LOCALHOST, "server_id": "1"}
    return json.dumps(
        {"server_count": "1", "status": "completed", "version": "1.2", "server_list": [server]}
    )


def wait_registered(datadist: dxl.LLMDataDist, comm_id: int) -> None:
    """Poll ``query_register_mem_status(comm_id)`` until ``OK``, as the reference's ``link()``
    does (it sleeps 1 s between polls; here 20 ms, under the flow's deadline); ``FAILED`` is an
    error."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        status = datadist.query_register_mem_status(comm_id)
        if status == dxl.RegisterMemStatus.OK:
            return
        expect(status != dxl.RegisterMemStatus.FAILED, f"comm {comm_id}: link failed")
        expect(time.monotonic() < deadline, f"comm {comm_id} still {status!r}")
        time.sleep(0.02)


def link(
    datadist: dxl.LLMDataDist,
    rank_table: str,
    cluster_rank_info: dict[int, int] | None = None,
    comm_name: str = "link",
) -> int:
    """The reference's ``pull_sample_common.link()``: ``link("link", {1: 0, 2: 1},
    rank_table)``, then poll until the comm's memory is registered; returns the comm id."""
    comm_id = datadist.link(comm_name, cluster_rank_info or {1: 0, 2: 1}, rank_table)
    wait_registered(datadist, comm_id)
    return comm_id


Role = Callable[["Flow"], None]  # a module-level function, or a partial of one


class Flow:
    """One role's end of a sample flow: its out-of-band channel to the other roles."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def barrier(self, step: str, value: Any = None) -> dict[str, Any]:
        """Wait for every role to reach ``step``; returns ``{role: value}`` of the roles that
        posted a value."""
        self._conn.send((step, value))
        if not self._conn.poll(DEADLINE_S):
            raise SampleError(f"no answer at barrier {step!r} within {DEADLINE_S:.0f} s")
        return self._conn.recv()

    @staticmethod
    def run(doc: str, **roles: Role) -> int:
        """Run each role ``name=fn`` as ``fn(flow)`` in its own process and relay the barriers.
        Prints one line: the script's name and the first line of its docstring ``doc`` if every
        role finished its flow (every check passed), else what failed. Returns the exit
        status."""
        title = Path(sys.argv[0]).stem
        ctx = mp.get_context("spawn")
        conns: dict[str, Connection] = {}
        procs = []
        for name, role in roles.items():
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_role_main, args=(role, theirs), name=name)
            proc.start()
            theirs.close()
            conns[name] = ours
            procs.append(proc)
        deadline = time.monotonic() + DEADLINE_S + 5
        try:
            step, values = _gather(conns, deadline)
            while step != _DONE:
                for conn in conns.values():
                    conn.send(values)
                step, values = _gather(conns, deadline)
            for proc in procs:
                proc.join(max(0.0, deadline - time.monotonic()))
                expect(proc.exitcode == 0, f"{proc.name} exited with {proc.exitcode}")
        except SampleError as exc:
            print(f"{title}: FAILED: {exc}")
            return 1
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
        print(f"{title}: {doc.splitlines()[0].rstrip('.')}; every byte verified")
        return 0


def _role_main(role: Role, conn: Connection) -> None:
    faulthandler.dump_traceback_later(DEADLINE_S + 2, exit=True)  # the role's hard deadline
    try:
        role(Flow(conn))
    except BaseException:
        conn.send((_ERROR, traceback.format_exc()))
        raise SystemExit(1) from None
    conn.send((_DONE, None))


def _gather(conns: dict[str, Connection], deadline: float) -> tuple[str, dict[str, Any]]:
    """Receive one message from every role: the step they reached and their values."""
    names = {conn: name for name, conn in conns.items()}
    posted: dict[str, tuple[str, Any]] = {}
    while len(posted) < len(conns):
        waiting = [conn for conn, name in names.items() if name not in posted]
        ready = wait(waiting, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise SampleError("timed out waiting for " + ", ".join(names[c] for c in waiting))
        for conn in ready:
            name = names[conn]
            try:
                posted[name] = conn.recv()
            except EOFError:
                raise SampleError(f"{name} exited without finishing its flow") from None
            if posted[name][0] == _ERROR:
                raise SampleError(f"{name} failed:\n{posted[name][1]}")
    steps = {step for step, _ in posted.values()}
    if len(steps) != 1:
        raise SampleError(f"roles out of step: {posted}")
    return steps.pop(), {name: v for name, (_, v) in posted.items() if v is not None}
