"""The ``dxl`` command line: ``dxl bench ...`` and ``dxl info``.

``dxl bench`` measures every combination of ``--transport`` x ``--op`` x ``--api`` x
``--concurrency`` x ``--block-bytes`` (block size outermost), each in a fresh target +
initiator process pair, and prints a table at the end (``--json``: one JSON object per line and
configuration on stdout as each finishes, the table on stderr). Exit status: 0 when every
configuration produced a verified result, 1 when any failed or was not verified, 2 for usage
errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import sys
from typing import Any

from ..config import TRANSPORTS
from ..transport.names import AUTO_ORDER
from .workload import APIS, DEFAULT_CACHE_MIB, OPS, Workload, shape_for

DEFAULT_SIZES = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20)
OVERHEAD_BLOCK_BYTES = 4 << 10
OVERHEAD_BLOCKS = 256
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)(i?b)?\s*$", re.IGNORECASE)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30}


def parse_size(text: str) -> int:
    """``"4K"``, ``"16KiB"``, ``"1M"``, ``"65536"`` -> bytes (binary units; multiple of 8).

    Raises:
        argparse.ArgumentTypeError: not a size, zero, or not a multiple of 8 bytes.
    """
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096, 4K, 1M)")
    n = int(m.group(1)) << _SHIFT[m.group(2).lower()]
    if n <= 0 or n % 8:
        raise argparse.ArgumentTypeError(f"block size must be a positive multiple of 8, got {n}")
    return n


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {n}")
    return n


def _non_negative(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def bench_parser(prog: str = "dxl bench") -> argparse.ArgumentParser:
    """The ``dxl bench`` argument parser."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="KV-shaped transfer benchmark: dxl against same-run baselines "
        "(memcpy of the same pieces with one thread and with dxl's copy threads; raw TCP with "
        "one stream and with as many streams as dxl opens), the latter the limit each row is "
        "compared with. Lists of values run every combination.",
    )
    a = p.add_argument
    a(
        "--transport",
        nargs="+",
        choices=TRANSPORTS,
        default=list(AUTO_ORDER),
        help=f"dxl.Transport of both engines (default: {' '.join(AUTO_ORDER)})",
    )
    a("--op", nargs="+", choices=OPS, default=list(OPS), help="default: pull push")
    a(
        "--api",
        nargs="+",
        choices=APIS,
        default=["async"],
        help="async = dxl.Engine; sync = LLMDataDist/CacheManager facade (default: async)",
    )
    a(
        "--block-bytes",
        nargs="+",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="B, bytes per block: 4K 16K 64K 256K 1M (default) or plain integers",
    )
    a("--layers", type=_positive, default=32, help="L; the cache has 2L tensors (default 32)")
    a(
        "--blocks-per-request",
        type=_positive,
        default=None,
        metavar="K",
        help="k random distinct blocks per request (default 64, fewer to stay <= 256 MiB)",
    )
    a(
        "--cache-mib",
        type=_positive,
        default=DEFAULT_CACHE_MIB,
        help=f"least cache size per side in MiB (default {DEFAULT_CACHE_MIB})",
    )
    a(
        "--requests",
        type=_positive,
        default=None,
        help="timed requests per pass (default 20; --overhead: 2000)",
    )
    a(
        "--warmup",
        type=_non_negative,
        default=None,
        help="untimed requests before each pass (default 3; --overhead: 100)",
    )
    a("--passes", type=_positive, default=3, help="passes; results are medians (default 3)")
    a(
        "--concurrency",
        nargs="+",
        type=_positive,
        default=[1],
        help="requests in flight (async: tasks; sync: threads) (default 1)",
    )
    a(
        "--threads",
        type=_positive,
        default=None,
        help="LLMConfig.transfer_threads of both engines (default: the engine's)",
    )
    a(
        "--baselines",
        choices=("auto", "all"),
        default="auto",
        help="auto: memcpy, plus the raw socket when the link is tcp; all: both always "
        "(each with one thread or stream and with dxl's count)",
    )
    a(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop of the async API (uvloop when installed)",
    )
    a(
        "--huge-pages",
        action="store_true",
        help="allocate every KV tensor on transparent huge pages (default: 4 KiB pages)",
    )
    a(
        "--memory",
        choices=("registered", "private", "shared", "allocated"),
        default="registered",
        help="target KV memory: framework memory registered with dxl with default settings "
        "(default: dxl.ShareRegistered unset, which moves it onto memfds where nothing can "
        "have pinned it); the same with dxl.ShareRegistered off (private: process_vm_readv) or "
        "on (shared); or a cache dxl allocates from its memfd pool (same-host peers copy "
        "memfd-backed memory with memcpy)",
    )
    a(
        "--netns",
        action="store_true",
        help="root only: run the target in a network namespace of its own and the initiator "
        "in another, joined by a veth pair (addresses of a private /30); dxl's link and the "
        "raw TCP limit both cross it. Both are removed on every exit (namespaces a killed "
        "earlier run left are removed first). Not with --handoff, --vllm or --from-json",
    )
    a("--seed", type=_non_negative, default=0, help="request block ids seed (default 0)")
    a(
        "--overhead",
        action="store_true",
        help="measure a one-piece request (1 tensor, 1 block of 4K by default) end to end, "
        "and the planning time of a 128k-token, 64-layer request",
    )
    a(
        "--handoff",
        action="store_true",
        help="request handoff (dxl.handoff): offer -> ticket -> fetch -> done latency beside a "
        "plain pull_blocks of the same blocks, and the fan-in of --fan-in prefill engines "
        "fetched by one decode at once beside one link (default block size 16K)",
    )
    a(
        "--vllm",
        action="store_true",
        help="the vLLM connector's path: register_kv_caches of vLLM's CPU layout (one LBHNC "
        "view per layer, 16-token float16 blocks of B bytes per layer), then offer -> fetch of "
        "a request's blocks between a prefill and a decode worker, beside the same pieces' "
        "memcpy / raw TCP with dxl's threads / streams (default block size 8K 64K; --threads "
        "does not apply: the connector leaves it to the engine)",
    )
    a(
        "--fan-in",
        type=_non_negative,
        default=64,
        metavar="N",
        help="--handoff: prefill engines fetched at once by one decode (default 64; 0: skip)",
    )
    a(
        "--from-json",
        nargs="+",
        metavar="FILE",
        default=None,
        help="measure nothing: print the tables (and --plot) of saved --json output",
    )
    a(
        "--json",
        action="store_true",
        help="one JSON object per line and configuration on stdout (table on stderr)",
    )
    a("--plot", metavar="FILE.png", help="GB/s vs block size, dxl vs baselines (matplotlib)")
    a(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    a("--timeout", type=_positive, default=900, help="seconds per configuration (default 900)")
    a("--verbose", action="store_true", help="let dxl's log and tracebacks through to stderr")
    a("--debug-corrupt", action="store_true", help=argparse.SUPPRESS)
    return p


def workloads(args: argparse.Namespace) -> list[Workload]:
    """Every configuration the arguments ask for, block size outermost."""
    out = []
    overhead = args.overhead
    sizes = args.block_bytes or ([OVERHEAD_BLOCK_BYTES] if overhead else list(DEFAULT_SIZES))
    requests = args.requests or (2000 if overhead else 20)
    warmup = args.warmup if args.warmup is not None else (100 if overhead else 3)
    for bb in sizes:
        if overhead:
            layers, blocks, k = 1, OVERHEAD_BLOCKS, 1
        else:
            layers = args.layers
            blocks, k = shape_for(bb, layers, args.cache_mib, args.blocks_per_request)
            if k > blocks:
                raise SystemExit(
                    f"dxl bench: --blocks-per-request {k} exceeds the {blocks} "
                    f"blocks of a {args.cache_mib} MiB cache at B={bb}"
                )
        for transport in args.transport:
            for op in args.op:
                for api in args.api:
                    for conc in args.concurrency:
                        out.append(
                            Workload(
                                transport=transport,
                                op=op,
                                api=api,
                                block_bytes=bb,
                                layers=layers,
                                num_blocks=blocks,
                                blocks_per_request=k,
                                requests=requests,
                                warmup=warmup,
                                passes=args.passes,
                                concurrency=conc,
                                seed=args.seed,
                                transfer_threads=args.threads,
                                baselines=args.baselines,
                                loop=args.loop,
                                mode="overhead" if overhead else "bench",
                                debug_corrupt=args.debug_corrupt,
                                huge_pages=args.huge_pages,
                                memory=args.memory,
                                tensors_override=1 if overhead else None,
                            )
                        )
    return out


def bench_main(argv: list[str], prog: str = "dxl bench") -> int:
    """Run ``dxl bench`` with ``argv``; returns the exit status."""
    from .report import Progress, render
    from .runner import run_all, units_for

    parser = bench_parser(prog)
    args = parser.parse_args(argv)
    if args.netns:
        _check_netns(parser, args)
    if args.plot:
        from .plot import require_matplotlib

        require_matplotlib()
    if args.from_json:
        return _replay(args)
    if args.handoff:
        return _handoff(args, argv, prog)
    if args.vllm:
        return _vllm(args, argv, prog)
    todo = workloads(args)
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = Progress(sum(units_for(w) for w in todo), show)

    def emit(row: dict[str, Any]) -> None:
        if args.json:
            progress.close()
            print(json.dumps(row), flush=True)

    try:
        if args.netns:
            from .netns import bench_hosts

            with bench_hosts() as hosts:
                todo = [dataclasses.replace(w, hosts=hosts) for w in todo]
                rows = run_all(todo, progress, args.timeout, emit, args.verbose)
        else:
            rows = run_all(todo, progress, args.timeout, emit, args.verbose)
    finally:
        progress.close()
    if args.overhead:
        from .overhead import plan_timing

        for row in plan_timing():
            rows.append(row)
            emit(row)
    command = f"{prog} {shlex.join(argv)}".rstrip()
    text = render(rows, command)
    print(text, file=sys.stderr if args.json else sys.stdout, end="", flush=True)
    if args.plot:
        from .plot import plot

        n = plot(rows, args.plot)
        print(f"plot: {args.plot} ({n} dxl series)", file=sys.stderr)
    return 0 if all(r.get("verified") and not r.get("error") for r in rows) else 1


def _check_netns(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--netns`` only where it applies and where namespaces can be made (else exit 2)."""
    from .netns import netns_available

    other = [flag for flag in ("handoff", "vllm", "from_json") if getattr(args, flag)]
    if other:
        flag = "--" + other[0].replace("_", "-")
        parser.error(f"--netns applies to the transfer and --overhead runs, not to {flag}")
    why = netns_available()
    if why is not None:
        parser.error(f"--netns {why}")


def _handoff(args: argparse.Namespace, argv: list[str], prog: str) -> int:
    """``--handoff``: the latency and fan-in configurations (see :mod:`dxl.bench.handoff`)."""
    from . import handoff
    from .report import Progress, render

    def shape(bb: int) -> tuple[int, int]:
        blocks, k = shape_for(bb, args.layers, args.cache_mib, args.blocks_per_request)
        if k > blocks:
            raise SystemExit(
                f"dxl bench: --blocks-per-request {k} exceeds the {blocks} "
                f"blocks of a {args.cache_mib} MiB cache at B={bb}"
            )
        return blocks, k

    todo = handoff.workloads(
        args.transport,
        args.block_bytes or [16 << 10],
        args.layers,
        shape,
        args.requests or 20,
        args.warmup if args.warmup is not None else 3,
        args.passes,
        args.fan_in,
        args.seed,
        args.loop,
        args.threads,
        args.debug_corrupt,
    )
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = Progress(sum(handoff.units_for(w) for w in todo), show)

    def emit(row: dict[str, Any]) -> None:
        if args.json:
            progress.close()
            print(json.dumps(row), flush=True)

    try:
        rows = handoff.run_all(todo, progress, args.timeout, emit, args.verbose)
    finally:
        progress.close()
    text = render(rows, f"{prog} {shlex.join(argv)}".rstrip())
    print(text, file=sys.stderr if args.json else sys.stdout, end="", flush=True)
    return 0 if all(r.get("verified") and not r.get("error") for r in rows) else 1


VLLM_SIZES = (8 << 10, 64 << 10)  # one layer's 16-token block of a 0.5B- and an 8B-class model


def _vllm(args: argparse.Namespace, argv: list[str], prog: str) -> int:
    """``--vllm``: the connector's path (see :mod:`dxl.bench.vllm_path`)."""
    from . import vllm_path
    from .report import Progress, render

    if args.threads is not None:
        raise SystemExit("dxl bench: --threads does not apply to --vllm (the connector has none)")
    todo = vllm_path.workloads(
        args.transport,
        args.block_bytes or list(VLLM_SIZES),
        args.layers,
        args.cache_mib,
        args.blocks_per_request,
        args.requests or 20,
        args.warmup if args.warmup is not None else 3,
        args.passes,
        args.seed,
        args.debug_corrupt,
    )
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = Progress(sum(vllm_path.units_for(w) for w in todo), show)

    def emit(row: dict[str, Any]) -> None:
        if args.json:
            progress.close()
            print(json.dumps(row), flush=True)

    try:
        rows = vllm_path.run_all(todo, progress, args.timeout, emit, args.verbose)
    finally:
        progress.close()
    text = render(rows, f"{prog} {shlex.join(argv)}".rstrip())
    print(text, file=sys.stderr if args.json else sys.stdout, end="", flush=True)
    return 0 if all(r.get("verified") and not r.get("error") for r in rows) else 1


def _replay(args: argparse.Namespace) -> int:
    """``--from-json``: tables and plot of saved rows, exit status as if they were just run."""
    from .report import render

    rows = []
    for path in args.from_json:
        with open(path) as f:
            rows += [json.loads(ln) for ln in f if ln.lstrip().startswith("{")]
    rows = [r for r in rows if "mode" in r]  # dxl bench rows only (not peers' rows)
    machines = sorted({r["machine"] for r in rows if r.get("machine")})
    text = render(rows, "dxl bench --from-json " + " ".join(args.from_json))
    if machines:
        text = "measured on: " + "; ".join(machines) + "\n" + text
    print(text, end="", flush=True)
    if args.plot:
        from .plot import plot

        n = plot(rows, args.plot)
        print(f"plot: {args.plot} ({n} dxl series)", file=sys.stderr)
    return 0 if all(r.get("verified") and not r.get("error") for r in rows) else 1


def info_main() -> int:
    """``dxl info``: features of this build and machine, and versions."""
    import os
    import platform

    import numpy

    import dxl
    from dxl.transport.nixl import nixl_info

    print(
        json.dumps(
            {
                "dxl": dxl.__version__,
                "features": dxl.features(),
                "python": platform.python_version(),
                "numpy": numpy.__version__,
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "nixl": nixl_info(),
            },
            indent=2,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``dxl bench [options]`` or ``dxl info``; ``python -m dxl.bench [options]`` also works."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="dxl", description="dxl command line")
    top.add_argument(
        "command",
        choices=("bench", "info"),
        help="bench: run the benchmark (dxl bench --help); info: features and versions",
    )
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("bench", "info"):
        top.parse_args(argv[:1] or ["--help"])
    if argv[0] == "info":
        top.parse_args(argv)
        return info_main()
    return bench_main(argv[1:])
