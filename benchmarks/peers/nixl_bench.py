"""dxl bench's workload through NIXL (``nixl`` package, UCX backend, DRAM), when installed.

As vLLM's NIXL connector does, each side's full descriptor list (every block of every tensor,
2L * N entries) is prepared once with ``prep_xfer_dlist``; a request is
``make_prepped_xfer(READ|WRITE, local, idx, remote, idx)`` + ``transfer`` + polling
``check_xfer_state`` + ``release_xfer_handle``, all timed; the index arrays are built before.

Variants (``--variant``, several allowed):
- ``default``: both agents with NIXL's progress thread (an out-of-the-box set-up);
- ``init-no-pthread``: the initiator without a progress thread (its own thread polls), which
  was ~2x faster on a 2-core VM (the anchors' "dst-no-pthr");
and ``--ucx-tls tcp`` restricts UCX to TCP (``UCX_TLS=tcp``; default: UCX's choice, which is
CMA for host memory on one host).

    python benchmarks/peers/nixl_bench.py --json > nixl.jsonl
    python benchmarks/peers/nixl_bench.py --block-bytes 16K --variant default init-no-pthread

Prints ``SKIP nixl: <reason>`` (exit 0) when ``nixl`` is not importable. NIXL's bundled libnl
crashes in its exit-time destructors, so both processes leave with ``os._exit``.
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

SYSTEM = "nixl"


def _set_tls(ucx_tls: str | None) -> None:
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # keep its per-agent INFO lines quiet
    if ucx_tls:
        os.environ["UCX_TLS"] = ucx_tls


def _agent(name: str, prog_thread: bool) -> Any:
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(enable_prog_thread=prog_thread, backends=["UCX"]))


def _register(agent: Any, kv: Any, size: int) -> Any:
    descs = agent.register_memory([(a, size, 0, "") for a in kv.addrs], "DRAM")
    if descs is None:
        raise RuntimeError("nixl register_memory failed")
    return descs


def _all_pieces(kv_addrs: list[int], w: Any) -> np.ndarray:
    """Nx3 (addr, len, dev) of every block of every tensor: index = tensor * N + block."""
    addrs = piece_addrs(kv_addrs, np.arange(w.num_blocks), w.block_bytes)
    out = np.zeros((addrs.size, 3), dtype=np.uint64)
    out[:, 0] = addrs
    out[:, 1] = w.block_bytes
    return out


def target_main(w: Any, conn: Any, ucx_tls: str | None) -> None:
    """Spawned target: an agent with a progress thread serving its registered cache."""
    _set_tls(ucx_tls)
    try:
        agent = _agent("target", True)
        kv = target_buffers(w)
        _register(agent, kv, tensor_bytes(w))
        serve(conn, kv, {"meta": agent.get_agent_metadata()})
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finish(0)


class NixlInitiator:
    def __init__(self, w: Any, local: Any, info: dict[str, Any], prog_thread: bool) -> None:
        self.w = w
        self.agent = agent = _agent("initiator", prog_thread)
        _register(agent, local, tensor_bytes(w))
        self.remote = agent.add_remote_agent(info["meta"])
        self.local_h = agent.prep_xfer_dlist("NIXL_INIT_AGENT", _all_pieces(local.addrs, w), "DRAM")
        self.remote_h = agent.prep_xfer_dlist(self.remote, _all_pieces(info["addrs"], w), "DRAM")
        self.op = "READ" if w.op == "pull" else "WRITE"
        self.n = np.int64(w.num_blocks)
        self.tensors = np.arange(w.tensors, dtype=np.int64)[:, None]

    def prepare(self, blocks: np.ndarray) -> np.ndarray:
        return (self.tensors * self.n + blocks.astype(np.int64)[None, :]).ravel()

    def request(self, idx: np.ndarray) -> None:
        agent = self.agent
        handle = agent.make_prepped_xfer(self.op, self.local_h, idx, self.remote_h, idx)
        state = agent.transfer(handle)
        while state == "PROC":
            state = agent.check_xfer_state(handle)
        agent.release_xfer_handle(handle)
        if state != "DONE":
            raise RuntimeError(f"nixl transfer ended in state {state}")

    def close(self) -> None:
        self.agent.release_dlist_handle(self.local_h)
        self.agent.release_dlist_handle(self.remote_h)
        self.agent.remove_remote_agent(self.remote)


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--variant",
        nargs="+",
        choices=("default", "init-no-pthread"),
        default=["default", "init-no-pthread"],
    )
    p.add_argument("--ucx-tls", default=None, help="UCX_TLS for both agents, e.g. tcp")
    args = p.parse_args()
    _set_tls(args.ucx_tls)
    try:
        import nixl
        from nixl._api import nixl_agent  # noqa: F401
    except Exception as exc:  # ImportError, or a missing shared library behind it
        return skip(
            SYSTEM,
            f"nixl is not importable ({type(exc).__name__}: {exc}); "
            "pip install 'dxl[peers]' in a separate venv",
            args.json,
        )
    version = getattr(nixl, "__version__", None)
    transport = f"ucx-{args.ucx_tls}" if args.ucx_tls else "ucx"
    for w in workloads(args, transport):
        for variant in args.variant:
            prog = variant == "default"

            def make(w: Any, local: Any, info: dict[str, Any], prog: bool = prog) -> NixlInitiator:
                return NixlInitiator(w, local, info, prog)

            row = measure(
                w,
                SYSTEM,
                variant,
                target_main,
                (args.ucx_tls,),
                make,
                {"nixl_version": version, "ucx_tls": args.ucx_tls},
            )
            emit(row, args.json)
    return 0


if __name__ == "__main__":
    finish(main())
