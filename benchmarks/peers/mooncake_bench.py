"""dxl bench's workload through Mooncake's transfer engine (``mooncake-transfer-engine-non-cuda``,
TCP transport), when installed.

Both sides ``initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")`` and ``batch_register_memory``
their 2L tensors; a request is one ``batch_transfer_sync_read`` (pull) or
``batch_transfer_sync_write`` (push) to ``127.0.0.1:<target rpc port>`` with one entry per
piece (k * 2L), timed; the Python address lists are built before.

The default per-peer TCP queue (1024 transfers) rejects a 4096-piece batch, so the runner sets
``MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER`` and ``MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER`` to
65535 (the values deployments use) unless they are set; ``--lanes`` sets
``MC_TCP_LANES_PER_PEER``. The values are recorded in each row.

    python benchmarks/peers/mooncake_bench.py --json > mooncake.jsonl

Prints ``SKIP mooncake: <reason>`` (exit 0) when ``mooncake.engine`` is not importable (it needs
``libibverbs.so.1`` even for TCP: Debian/Ubuntu ``libibverbs1``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from kvpeer import (
    emit,
    finish,
    measure,
    parser,
    piece_addrs,
    serve,
    skip,
    target_buffers,
    tensor_bytes,
    workloads,
)

SYSTEM = "mooncake"
HOST = "127.0.0.1"
QUEUE_ENV = ("MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER", "MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER")


def _env(lanes: int | None) -> dict[str, str]:
    for key in QUEUE_ENV:
        os.environ.setdefault(key, "65535")
    if lanes:
        os.environ["MC_TCP_LANES_PER_PEER"] = str(lanes)
    keys = (*QUEUE_ENV, "MC_TCP_LANES_PER_PEER")
    return {k: os.environ[k] for k in keys if k in os.environ}


def _engine(protocol: str) -> Any:
    from mooncake.engine import TransferEngine

    te = TransferEngine()
    rc = te.initialize(HOST, "P2PHANDSHAKE", protocol, "")
    if rc != 0:
        raise RuntimeError(f"mooncake initialize({protocol}) returned {rc}")
    return te


def _register(te: Any, kv: Any, size: int) -> None:
    rc = te.batch_register_memory(list(kv.addrs), [size] * len(kv.addrs))
    if rc != 0:
        raise RuntimeError(f"mooncake batch_register_memory returned {rc}")


def target_main(w: Any, conn: Any, protocol: str, lanes: int | None) -> None:
    """Spawned target: an engine serving its registered cache."""
    _env(lanes)
    try:
        te = _engine(protocol)
        kv = target_buffers(w)
        _register(te, kv, tensor_bytes(w))
        serve(conn, kv, {"session": f"{HOST}:{te.get_rpc_port()}"})
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finish(0)


class MooncakeInitiator:
    def __init__(self, w: Any, local: Any, info: dict[str, Any], protocol: str) -> None:
        self.w = w
        self.te = _engine(protocol)
        _register(self.te, local, tensor_bytes(w))
        self.session = info["session"]
        self.local = local.addrs
        self.remote = info["addrs"]
        fn = "batch_transfer_sync_read" if w.op == "pull" else "batch_transfer_sync_write"
        self.move = getattr(self.te, fn)

    def prepare(self, blocks: np.ndarray) -> tuple[list[int], list[int], list[int]]:
        bb = self.w.block_bytes
        local = piece_addrs(self.local, blocks, bb).tolist()
        remote = piece_addrs(self.remote, blocks, bb).tolist()
        return local, remote, [bb] * len(local)

    def request(self, prepared: tuple[list[int], list[int], list[int]]) -> None:
        rc = self.move(self.session, *prepared)
        if rc != 0:
            raise RuntimeError(f"mooncake transfer returned {rc}")

    def close(self) -> None:
        self.te.batch_unregister_memory(list(self.local))


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--protocol", default="tcp", help="mooncake transport (default tcp)")
    p.add_argument("--lanes", type=int, default=None, help="MC_TCP_LANES_PER_PEER")
    args = p.parse_args()
    env = _env(args.lanes)
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except Exception as exc:  # ImportError, e.g. libibverbs.so.1 missing
        return skip(
            SYSTEM,
            f"mooncake.engine is not importable ({type(exc).__name__}: {exc}); "
            "pip install mooncake-transfer-engine-non-cuda, and libibverbs1",
            args.json,
        )
    try:
        from importlib.metadata import version

        ver = version("mooncake-transfer-engine-non-cuda")
    except Exception:
        ver = None
    for w in workloads(args, args.protocol):

        def make(w: Any, local: Any, info: dict[str, Any]) -> MooncakeInitiator:
            return MooncakeInitiator(w, local, info, args.protocol)

        row = measure(
            w,
            SYSTEM,
            args.protocol,
            target_main,
            (args.protocol, args.lanes),
            make,
            {"mooncake_version": ver, "env": env},
        )
        emit(row, args.json)
    return 0


if __name__ == "__main__":
    finish(main())
