"""Shared harness of the peer runners: dxl bench's workload through another transfer library.

The workload, request ids, buffers and verification are ``dxl.bench.workload``'s, so a peer
moves exactly the blocks ``dxl bench`` moves with the same ``--seed``. The target is a spawned
process that owns the remote cache and answers the same pipe protocol as dxl bench's target
(``clear`` / ``verify`` / ``done``, each answered ``("ok", value)``); the initiator is this
process. Per pass: clear the destination, ``warmup`` requests, ``requests`` timed requests one
after another (what is timed is only the library's calls for the request; its inputs are built
before), then every block the pass wrote is verified. One JSON row per configuration, with the
same field names as dxl bench's rows plus ``system`` and ``variant``; an unverified or failed
configuration has ``gbps: null``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np


def import_dxl() -> None:
    """Make ``dxl`` importable: installed, or this checkout (its in-tree native build)."""
    try:
        import dxl  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


import_dxl()

from dxl.bench.cli import DEFAULT_SIZES, parse_size  # noqa: E402
from dxl.bench.workload import (  # noqa: E402
    DEFAULT_CACHE_MIB,
    Workload,
    clear,
    destination_buffers,
    format_size,
    pass_tables,
    shape_for,
    source_buffers,
    verify,
)


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every runner shares (the same names and defaults as ``dxl bench``)."""
    p = argparse.ArgumentParser(description=description)
    a = p.add_argument
    a("--op", nargs="+", choices=("pull", "push"), default=["pull"], help="default: pull")
    a("--block-bytes", nargs="+", type=parse_size, default=list(DEFAULT_SIZES), metavar="SIZE")
    a("--layers", type=int, default=32)
    a("--blocks-per-request", type=int, default=None, metavar="K")
    a("--cache-mib", type=int, default=DEFAULT_CACHE_MIB)
    a("--requests", type=int, default=20)
    a("--warmup", type=int, default=3)
    a("--passes", type=int, default=3)
    a("--seed", type=int, default=0)
    a("--huge-pages", action="store_true", help="KV tensors on transparent huge pages")
    a("--json", action="store_true", help="one JSON object per line")
    return p


def workloads(args: argparse.Namespace, transport: str) -> list[Workload]:
    out = []
    for bb in args.block_bytes:
        blocks, k = shape_for(bb, args.layers, args.cache_mib, args.blocks_per_request)
        for op in args.op:
            out.append(
                Workload(
                    transport=transport,
                    op=op,
                    api="python",
                    block_bytes=bb,
                    layers=args.layers,
                    num_blocks=blocks,
                    blocks_per_request=k,
                    requests=args.requests,
                    warmup=args.warmup,
                    passes=args.passes,
                    seed=args.seed,
                    huge_pages=args.huge_pages,
                )
            )
    return out


class Initiator(Protocol):
    """One library's initiator side, set up against a ready target."""

    def prepare(self, blocks: np.ndarray) -> Any:
        """The library's inputs for one request (built before timing)."""

    def request(self, prepared: Any) -> None:
        """Move one request and return when it is complete (timed)."""

    def close(self) -> None: ...


def tensor_bytes(w: Workload) -> int:
    return w.num_blocks * w.block_bytes


def piece_addrs(bases: list[int], blocks: np.ndarray, block_bytes: int) -> np.ndarray:
    """Address of block ``blocks[i]`` of every tensor, tensor-major (uint64)."""
    b = np.asarray(bases, dtype=np.uint64)[:, None]
    return (b + blocks.astype(np.uint64)[None, :] * np.uint64(block_bytes)).ravel()


# ------------------------------------------------------------------------------- target side


def serve(conn: Any, kv: Any, info: dict[str, Any]) -> None:
    """Announce ``info`` (plus the tensor addresses) and answer the control pipe until done."""
    conn.send(("ready", {**info, "addrs": kv.addrs}))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] == "done":
            conn.send(("ok", True))
            return
        if msg[0] == "clear":
            clear(kv)
            conn.send(("ok", True))
        elif msg[0] == "verify":
            conn.send(("ok", verify(kv, msg[1], msg[2])))
        else:
            conn.send(("ok", f"unknown message {msg[0]!r}"))


def target_buffers(w: Workload) -> Any:
    return source_buffers(w) if w.op == "pull" else destination_buffers(w)


# ---------------------------------------------------------------------------- initiator side


def _ask(conn: Any, *msg: Any) -> Any:
    conn.send(msg)
    kind, value = conn.recv()
    if kind != "ok":
        raise RuntimeError(str(value))
    return value


def measure(
    w: Workload,
    system: str,
    variant: str,
    target_main: Callable[..., None],
    target_args: tuple[Any, ...],
    make_initiator: Callable[[Workload, Any, dict[str, Any]], Initiator],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one configuration: spawn the target, measure, verify, return the row."""
    row: dict[str, Any] = {
        "system": system,
        "variant": variant,
        "transport": w.transport,
        "op": w.op,
        "api": w.api,
        "block_bytes": w.block_bytes,
        "layers": w.layers,
        "tensors": w.tensors,
        "num_blocks": w.num_blocks,
        "cache_mib": round(w.cache_bytes / (1 << 20), 1),
        "blocks_per_request": w.blocks_per_request,
        "pieces_per_request": w.pieces_per_request,
        "request_bytes": w.request_bytes,
        "requests": w.requests,
        "warmup": w.warmup,
        "passes": w.passes,
        "concurrency": 1,
        "seed": w.seed,
        "huge_pages": w.huge_pages,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        **(extra or {}),
        "gbps": None,
        "p50_us": None,
        "p99_us": None,
        "verified": False,
        "error": None,
    }
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=target_main, args=(w, child, *target_args), daemon=True)
    proc.start()
    child.close()
    local = destination_buffers(w) if w.op == "pull" else source_buffers(w)
    init: Initiator | None = None
    try:
        if not conn.poll(300):
            raise RuntimeError("the target did not start within 300 s")
        kind, info = conn.recv()
        if kind != "ready":
            raise RuntimeError(f"target failed: {info}")
        init = make_initiator(w, local, info)
        gbps, p50s, p99s = [], [], []
        verified = True
        for p in range(w.passes):
            tables = pass_tables(
                w.seed, p, w.num_blocks, w.blocks_per_request, w.warmup + w.requests
            )
            prepared = [init.prepare(t) for t in tables]
            if w.op == "pull":
                clear(local)
            else:
                _ask(conn, "clear")
            for x in prepared[: w.warmup]:
                init.request(x)
            lat = []
            t0 = time.perf_counter()
            for x in prepared[w.warmup :]:
                t1 = time.perf_counter()
                init.request(x)
                lat.append(time.perf_counter() - t1)
            wall = time.perf_counter() - t0
            blocks = np.concatenate(tables)
            ok = verify(local, blocks) if w.op == "pull" else _ask(conn, "verify", blocks, False)
            verified = verified and bool(ok)
            gbps.append(w.requests * w.request_bytes / wall / 1e9)
            p50, p99 = np.percentile(np.asarray(lat) * 1e6, [50, 99]).tolist()
            p50s.append(p50)
            p99s.append(p99)
        row["verified"] = verified
        if verified:
            row.update(
                gbps=round(float(np.median(gbps)), 3),
                p50_us=round(float(np.median(p50s)), 1),
                p99_us=round(float(np.median(p99s)), 1),
                gbps_passes=[round(g, 3) for g in gbps],
                p50_us_passes=[round(v, 1) for v in p50s],
                p99_us_passes=[round(v, 1) for v in p99s],
            )
        else:
            row["error"] = "destination bytes differ from the source: UNVERIFIED"
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        if os.environ.get("KVPEER_DEBUG"):
            traceback.print_exc()
    finally:
        if init is not None:
            with contextlib.suppress(Exception):
                init.close()
        with contextlib.suppress(Exception):
            _ask(conn, "done")
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return row


def emit(row: dict[str, Any], as_json: bool) -> None:
    """Print one row: JSON, or a readable line (never a number for an unverified row)."""
    if as_json:
        print(json.dumps(row), flush=True)
        return
    name = f"{row['system']} {row['variant']} {row['op']} {format_size(row['block_bytes'])}"
    if row["gbps"] is None:
        unverified = str(row.get("error", "")).startswith("destination bytes differ")
        print(f"{name}: {'UNVERIFIED' if unverified else 'FAILED'}: {row['error']}", flush=True)
    else:
        print(
            f"{name} x {row['pieces_per_request']} pieces: {row['gbps']:.2f} GB/s, "
            f"p50 {row['p50_us'] / 1e3:.2f} ms, p99 {row['p99_us'] / 1e3:.2f} ms "
            f"(passes {row['gbps_passes']})",
            flush=True,
        )


def skip(system: str, reason: str, as_json: bool) -> int:
    """Report that a peer cannot run here (not installed, missing system library) and why."""
    if as_json:
        print(json.dumps({"system": system, "skipped": reason}), flush=True)
    else:
        print(f"SKIP {system}: {reason}", flush=True)
    return 0


def finish(code: int) -> None:
    """Leave without running library destructors (NIXL's bundled libnl crashes in them)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
