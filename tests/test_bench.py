"""``dxl bench``: argument parsing, shapes, verification, and tiny end-to-end smoke runs.

Nothing here asserts a speed: benchmarks measure speed, tests only check that every number
printed is a verified one and that a corrupted destination never yields a number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
from waiting import wait_until

from dxl.bench import baselines, cli, report
from dxl.bench.runner import run_all
from dxl.bench.workload import (
    Workload,
    clear,
    corrupt,
    destination_buffers,
    pass_tables,
    shape_for,
    source_buffers,
    thp_mib,
    verify,
)

SMOKE = ["--cache-mib", "8", "--layers", "4", "--requests", "3", "--warmup", "1", "--passes", "1"]


def run_bench(*args: str, timeout: float = 120) -> tuple[int, list[dict], str]:
    """Run ``python -m dxl.bench`` and return (exit code, JSON rows, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dxl.bench", *args, "--json", "--no-progress"],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, rows, proc.stderr


# ---------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4K", 4096),
        ("4k", 4096),
        ("16KiB", 16384),
        ("64KB", 65536),
        ("256K", 262144),
        ("1M", 1 << 20),
        ("2G", 2 << 30),
        ("4096", 4096),
        (" 8 ", 8),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert cli.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "K", "4X", "-4K", "0", "12", "1.5M", "4KK"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_size(text)


def test_block_bytes_flag_takes_several_sizes() -> None:
    args = cli.bench_parser().parse_args(["--block-bytes", "4K", "16K", "65536", "1M"])
    assert args.block_bytes == [4096, 16384, 65536, 1 << 20]
    with pytest.raises(SystemExit):
        cli.bench_parser().parse_args(["--block-bytes", "4Q"])


def test_defaults_cover_cma_tcp_pull_push_and_five_sizes() -> None:
    todo = cli.workloads(cli.bench_parser().parse_args([]))
    assert {(w.transport, w.op) for w in todo} == {
        ("cma", "pull"),
        ("cma", "push"),
        ("tcp", "pull"),
        ("tcp", "push"),
    }
    assert sorted({w.block_bytes for w in todo}) == [
        4 << 10,
        16 << 10,
        64 << 10,
        256 << 10,
        1 << 20,
    ]
    assert all(w.requests == 20 and w.passes == 3 and w.api == "async" for w in todo)


def test_shapes_follow_the_anchors() -> None:
    # N = max(4k, 512 MiB / (2L * B)), k = 64 cut to keep a request <= 256 MiB (L = 32)
    assert shape_for(4 << 10, 32) == (2048, 64)
    assert shape_for(16 << 10, 32) == (512, 64)
    assert shape_for(64 << 10, 32) == (256, 64)
    assert shape_for(256 << 10, 32) == (64, 16)
    assert shape_for(1 << 20, 32) == (16, 4)
    assert shape_for(4 << 10, 32, k=8) == (2048, 8)
    blocks, k = shape_for(64 << 10, 4, cache_mib=8)  # a shrunk cache shrinks the request too
    assert k * 8 * (64 << 10) <= 4 << 20 and blocks >= 4 * k


def test_request_ids_are_seeded_distinct_and_fresh() -> None:
    a = pass_tables(0, 0, 100, 10, 5)
    assert all(len(set(t.tolist())) == 10 for t in a)
    assert [t.tolist() for t in a] == [t.tolist() for t in pass_tables(0, 0, 100, 10, 5)]
    assert a[0].tolist() != a[1].tolist()
    assert a[0].tolist() != pass_tables(0, 1, 100, 10, 1)[0].tolist()


# ------------------------------------------------------------------------------ verification


def _small() -> Workload:
    return Workload("cma", "pull", "async", 64, 2, num_blocks=16, blocks_per_request=4)


def _copy(dst, src, blocks) -> None:
    for t in range(dst.num_tensors):
        dst.blocks(t)[blocks] = src.blocks(t)[blocks]


def test_verify_accepts_a_correct_copy() -> None:
    w = _small()
    src, dst = source_buffers(w), destination_buffers(w)
    blocks = np.array([3, 9, 1])
    _copy(dst, src, blocks)
    assert verify(dst, blocks)
    assert verify(dst, blocks, strict=True)
    assert thp_mib(src, dst) == 0  # 4 KiB pages unless --huge-pages


def test_verify_rejects_corruption_missing_and_stray_blocks() -> None:
    w = _small()
    src, dst = source_buffers(w), destination_buffers(w)
    blocks = np.array([3, 9, 1])
    _copy(dst, src, blocks)
    corrupt(dst, 9)
    assert not verify(dst, blocks)
    clear(dst)
    _copy(dst, src, blocks[:2])  # block 1 never arrived
    assert not verify(dst, blocks)
    clear(dst)
    _copy(dst, src, np.array([3, 9, 1, 5]))  # block 5 written although not asked for
    assert verify(dst, blocks)
    assert not verify(dst, blocks, strict=True)


def test_report_never_prints_a_number_for_an_unverified_row() -> None:
    row = {
        "mode": "bench",
        "transport": "cma",
        "link_transport": "cma",
        "op": "pull",
        "api": "async",
        "block_bytes": 4096,
        "blocks_per_request": 64,
        "pieces_per_request": 4096,
        "request_bytes": 16 << 20,
        "concurrency": 1,
        "gbps": 1.234,
        "ratio": 0.567,
        "p50_us": 8888.0,
        "p99_us": 9999.0,
        "baseline": "memcpy",
        "baselines": {},
        "verified": False,
        "error": "bytes differ",
    }
    text = report.render([row], "dxl bench")
    assert "UNVERIFIED" in text
    assert "1.23" not in text and "0.57" not in text and "8.89" not in text


def _overhead_row(**kw: object) -> dict:
    row = {
        "mode": "overhead",
        "transport": "cma",
        "link_transport": "cma",
        "op": "pull",
        "api": "async",
        "loop": "uvloop",
        "block_bytes": 4096,
        "concurrency": 1,
        "p50_us": 50.0,
        "p99_us": 90.0,
        "verified": True,
        "error": None,
        "loop_burst": 256,
        "loop_tick_ms": 1.0,
        "loop_dxl_stall_max_us": 7340.0,
        "loop_dxl_stall_p99_us": 6120.0,
        "loop_baseline_stall_max_us": 3670.0,
        "loop_baseline_stall_p99_us": 3060.0,
        "loop_idle_stall_max_us": 1110.0,
        "loop_stall_max_ratio": 2.0,
        "loop_stall_p99_ratio": 2.0,
    }
    row.update(kw)
    return row


def test_report_shows_the_loop_stall_beside_its_baselines_and_only_when_verified() -> None:
    text = report.render([_overhead_row()], "dxl bench --overhead")
    assert "Event-loop stall while bursts" in text and "1.0 ms timer" in text
    assert "| uvloop |   256 |       7.34 |       6.12 |         3.67 |" in text
    assert "2.00" in text
    bad = _overhead_row(verified=False, error="bytes differ", op="push")
    text = report.render([bad], "dxl bench --overhead")
    assert "UNVERIFIED" in text and "7.34" not in text and "6.12" not in text
    sync = _overhead_row(api="sync", loop=None, loop_burst=None)
    assert "Event-loop stall" not in report.render([sync], "dxl bench --overhead")


# --------------------------------------------------------------------------- command line


@pytest.mark.multiproc  # platform.platform() runs `uname -p` in a child process
def test_info_prints_features_and_versions(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["features"]) >= {"version", "cma", "tcp", "cuda"}
    assert out["dxl"] and out["python"]


def test_plot_without_matplotlib_fails_before_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    with pytest.raises(SystemExit, match=r"dxl\[bench\]"):
        cli.bench_main(["--plot", "x.png"])


# ------------------------------------------------------------------------------- the limit


def test_the_limit_uses_dxls_copy_threads_and_tcp_streams() -> None:
    from dxl import _ffi
    from dxl.config import DEFAULT_TRANSFER_THREADS
    from dxl.transport.tcp import DEFAULT_STREAMS

    assert baselines.copy_threads(None) == DEFAULT_TRANSFER_THREADS
    assert baselines.copy_threads(3) == 3
    per_stream = int(_ffi.lib.dxl_tcp_stream_threshold(0))
    assert baselines.tcp_streams(per_stream - 1) == 1  # small requests use one stream
    assert baselines.tcp_streams(2 * per_stream) == min(2, DEFAULT_STREAMS)
    assert baselines.tcp_streams(1000 * per_stream) == DEFAULT_STREAMS


@pytest.mark.parametrize(("nbytes", "parts"), [(4096, 4), (1 << 20, 3), (5 * 4096 + 8, 2)])
def test_cut_covers_the_request_in_aligned_contiguous_parts(nbytes: int, parts: int) -> None:
    cuts = baselines.cut(nbytes, parts)
    assert 1 <= len(cuts) <= parts
    assert sum(n for _, n in cuts) == nbytes
    assert [off for off, _ in cuts] == [sum(n for _, n in cuts[:i]) for i in range(len(cuts))]
    assert all(off % 4096 == 0 and n > 0 for off, n in cuts)


def test_memcpy_with_dxls_threads_copies_the_same_pieces() -> None:
    w = _small()
    src, dst = source_buffers(w), destination_buffers(w)
    tables = [np.array([3, 9, 1]), np.array([12, 0])]
    plans = baselines.plan_requests(dst.addrs, src.addrs, tables, w.block_bytes)
    wall, lat = baselines.memcpy_requests(plans, threads=2)
    assert wall > 0 and len(lat) == 2
    assert verify(dst, np.concatenate(tables), strict=True)


@pytest.mark.parametrize("streams", [1, 3])
def test_raw_tcp_streams_move_every_byte_to_its_place(streams: int) -> None:
    nbytes = 5 * 4096 + 64  # three streams get 8K, 8K and the rest
    server = baselines.RawSocketServer(nbytes)
    client = baselines.RawSocketClient(server.port, nbytes, streams)
    try:
        pattern = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
        client._buf[:] = pattern
        client.request("push", nbytes)  # the target's buffer now holds the pattern
        client._buf[:] = 0
        wall, lat = client.requests("pull", nbytes, 2)
        assert wall > 0 and len(lat) == 2
        assert np.array_equal(client._buf, pattern)
    finally:
        client.close()
        server.close()


def _limit_ok(r: dict, kind: str, parallel: int) -> None:
    assert r["limit"] == kind and r["limit_parallel"] == parallel, r
    for key in ("limit_gbps", "limit_ratio"):
        assert math.isfinite(r[key]) and r[key] > 0, r
    assert r["limit_ratio"] == pytest.approx(r["gbps"] / r["limit_gbps"], rel=0.01)
    assert len(r["limit_passes"]) == r["passes"]


# ---------------------------------------------------------------------------- end to end


@pytest.mark.multiproc
@pytest.mark.cma
def test_smoke_cma_pull_and_push_are_verified() -> None:
    rc, rows, err = run_bench(
        "--transport", "cma", "--op", "pull", "push", "--block-bytes", "4K", "64K", *SMOKE
    )
    assert rc == 0, err
    assert [(r["op"], r["block_bytes"]) for r in rows] == [
        ("pull", 4096),
        ("push", 4096),
        ("pull", 65536),
        ("push", 65536),
    ]
    for r in rows:
        assert r["verified"] is True and r["error"] is None, r
        # default settings: the target's registered memory is shared (nothing pinned here)
        assert r["link_transport"] == "cma+shm" and r["baseline"] == "memcpy"
        assert r["gbps"] > 0 and r["baseline_gbps"] > 0 and r["ratio"] > 0
        assert 0 < r["p50_us"] <= r["p99_us"]
        assert len(r["gbps_passes"]) == len(r["baseline_passes"]) == 1
        assert r["pieces_per_request"] == r["blocks_per_request"] * 8
        _limit_ok(r, "memcpy", baselines.copy_threads(None))
        assert r["baselines"]["memcpy_limit"]["threads"] == baselines.copy_threads(None)
    assert "| 64K |" in err  # the table goes to stderr with --json
    assert "vs limit" in err and "memcpy x2" in err


@pytest.mark.multiproc
@pytest.mark.cma
@pytest.mark.parametrize(
    ("memory", "link"),
    [("shared", "cma+shm"), ("allocated", "cma+shm"), ("private", "cma")],
)
def test_smoke_memory_kinds_are_verified_over_their_path(memory: str, link: str) -> None:
    rc, rows, err = run_bench(
        "--transport",
        "cma",
        "--op",
        "pull",
        "push",
        "--block-bytes",
        "16K",
        "--memory",
        memory,
        *SMOKE,
    )
    assert rc == 0, err
    assert [r["op"] for r in rows] == ["pull", "push"]
    for r in rows:
        assert r["verified"] is True and r["error"] is None, r
        assert r["memory"] == memory and r["link_transport"] == link


@pytest.mark.multiproc
@pytest.mark.cma
def test_corrupted_destination_gives_no_number() -> None:
    rc, rows, err = run_bench(
        "--transport",
        "cma",
        "--op",
        "pull",
        "push",
        "--block-bytes",
        "4K",
        "--debug-corrupt",
        *SMOKE,
    )
    assert rc == 1
    assert len(rows) == 2
    for r in rows:
        assert r["verified"] is False
        assert r["gbps"] is None and r["ratio"] is None and r["p50_us"] is None
        assert r["gbps_passes"] is None
    assert err.count("UNVERIFIED") >= 2


@pytest.mark.multiproc
def test_smoke_tcp_pull_is_verified_against_the_raw_socket() -> None:
    rc, rows, err = run_bench("--transport", "tcp", "--op", "pull", "--block-bytes", "4K", *SMOKE)
    assert rc == 0, err
    [tcp] = rows
    assert tcp["verified"] is True and tcp["error"] is None, tcp
    assert tcp["link_transport"] == "tcp" and tcp["baseline"] == "raw_socket"
    assert tcp["gbps"] > 0 and tcp["baselines"]["raw_socket"]["gbps"] > 0 and tcp["ratio"] > 0
    streams = baselines.tcp_streams(tcp["request_bytes"])
    _limit_ok(tcp, "raw_socket", streams)
    assert tcp["baselines"]["raw_socket_limit"]["streams"] == streams
    assert f"tcp x{streams}" in err


@pytest.mark.multiproc
@pytest.mark.cma
def test_a_failed_configuration_does_not_stop_the_run() -> None:
    """The first configuration fails (its engines refuse the transport); the next one still
    runs and is verified, and the failure is reported without a number."""
    args = ["--transport", "cma", "--op", "pull", "--block-bytes", "4K", *SMOKE]
    [good] = cli.workloads(cli.bench_parser().parse_args(args))
    bad = dataclasses.replace(good, transport="bogus")
    rows: list[dict] = []
    run_all([bad, good], report.Progress(2, enabled=False), 120, rows.append)
    failed, ok = rows
    assert "transport must be one of" in failed["error"], failed
    assert failed["verified"] is False and failed["gbps"] is None and failed["ratio"] is None
    assert ok["verified"] is True and ok["error"] is None and ok["gbps"] > 0
    assert "FAILED: bogus pull async c1 4K: " in report.render(rows, "dxl bench")


@pytest.mark.multiproc
@pytest.mark.cma
def test_overhead_mode_reports_one_piece_latency_and_planning() -> None:
    rc, rows, err = run_bench(
        "--overhead",
        "--transport",
        "cma",
        "--op",
        "pull",
        "--api",
        "async",
        "sync",
        "--requests",
        "30",
        "--warmup",
        "3",
        "--passes",
        "1",
        "--memory",  # the bare native call is the floor of a process_vm_readv link
        "private",
    )
    assert rc == 0, err
    over = [r for r in rows if r["mode"] == "overhead"]
    plan = [r for r in rows if r["mode"] == "plan"]
    assert [r["api"] for r in over] == ["async", "sync"]
    for r in over:
        assert r["verified"] and r["pieces_per_request"] == 1
        assert 0 < r["p50_us"] <= r["p99_us"] and r["native_p50_us"] > 0
    assert {r["ids"] for r in plan} == {"random", "consecutive"}
    assert all(r["pieces_in"] == 8192 * 128 and r["median_ms"] > 0 for r in plan)
    # the event loop's stall under bursts of 30 concurrent requests, beside its same-run
    # baselines (async API only: the sync facade's loop is not the application's)
    stall, sync = over
    assert stall["loop_burst"] == 30 and stall["loop_tick_ms"] == 1.0
    for phase in ("dxl", "baseline", "idle"):
        worst, p99 = stall[f"loop_{phase}_stall_max_us"], stall[f"loop_{phase}_stall_p99_us"]
        assert 0 <= p99 <= worst, (phase, stall)
        assert len(stall[f"loop_{phase}_stall_max_us_passes"]) == 1
    for stat in ("max", "p99"):
        base = stall[f"loop_baseline_stall_{stat}_us"]
        expect = round(stall[f"loop_dxl_stall_{stat}_us"] / base, 2) if base else None
        assert stall[f"loop_stall_{stat}_ratio"] == expect
    assert all(v is None for k, v in sync.items() if k.startswith("loop_")), sync
    assert "Event-loop stall while bursts of concurrent one-piece requests run" in err
    assert "| uvloop |    30 |" in err or "| asyncio |    30 |" in err  # the async row only


def _row(**kw: object) -> dict:
    row = {
        "mode": "bench",
        "transport": "cma",
        "link_transport": "cma",
        "op": "pull",
        "api": "async",
        "block_bytes": 4096,
        "blocks_per_request": 64,
        "pieces_per_request": 4096,
        "request_bytes": 16 << 20,
        "concurrency": 1,
        "gbps": 2.5,
        "ratio": 0.5,
        "p50_us": 6000.0,
        "p99_us": 7000.0,
        "baseline": "memcpy",
        "baseline_gbps": 5.0,
        "baselines": {"memcpy": {"gbps": 5.0, "passes": [5.0]}},
        "verified": True,
        "error": None,
    }
    row.update(kw)
    return row


def test_from_json_replays_tables_without_measuring(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(_row()) + "\n" + json.dumps(_row(block_bytes=65536)) + "\n")
    assert cli.bench_main(["--from-json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "|  4K |" in out and "| 64K |" in out and "2.50" in out
    # rows saved before the bench measured a limit: no limit, no ratio to it
    assert "vs limit" in out and "| memcpy |     - |          - |        - |" in out
    path.write_text(
        json.dumps(_row(limit="memcpy", limit_parallel=2, limit_gbps=6.25, limit_ratio=0.4)) + "\n"
    )
    assert cli.bench_main(["--from-json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| memcpy x2 |       6.25 |     0.40 |" in out
    path.write_text(json.dumps(_row(verified=False, error="bytes differ")) + "\n")
    assert cli.bench_main(["--from-json", str(path)]) == 1


@pytest.mark.multiproc  # matplotlib's font cache runs fc-list in a child process
def test_plot_writes_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from dxl.bench.plot import plot

    out = tmp_path / "bench.png"
    rows = [_row(), _row(block_bytes=65536, gbps=8.0), _row(verified=False, gbps=None)]
    assert plot(rows, str(out)) == 1
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------- --handoff


def _handoff_workloads(*args: str) -> list:
    from dxl.bench import handoff

    parsed = cli.bench_parser().parse_args(["--handoff", *args])
    return handoff.workloads(
        parsed.transport,
        parsed.block_bytes or [16 << 10],
        parsed.layers,
        lambda bb: shape_for(bb, parsed.layers, parsed.cache_mib, parsed.blocks_per_request),
        20,
        3,
        parsed.passes,
        parsed.fan_in,
        parsed.seed,
        parsed.loop,
        parsed.threads,
    )


def test_handoff_defaults_are_the_full_size() -> None:
    """64 blocks x 32 layers x 16 KiB per request; fan-in of 64 prefill engines, 4 GiB."""
    lat, fan = _handoff_workloads("--transport", "cma")
    assert (lat.kind, lat.block_bytes, lat.layers, lat.blocks_per_request) == (
        "latency",
        16 << 10,
        32,
        64,
    )
    assert lat.request_bytes == 64 << 20 and lat.prefills == 1
    assert (fan.kind, fan.prefills, fan.blocks_per_request) == ("fanin", 64, 64)
    assert fan.prefills * fan.request_bytes == 4 << 30
    engines = [i for h in range(fan.hosts) for i in fan.engines_of(h)]
    assert engines == list(range(64))  # every prefill engine runs in exactly one host process
    assert [w.kind for w in _handoff_workloads("--fan-in", "0")] == ["latency", "latency"]
    [_, big] = _handoff_workloads("--transport", "tcp", "--block-bytes", "1M")
    assert big.prefills * big.request_bytes <= 4 << 30  # k is cut to keep fan-in in 4 GiB


def test_report_shows_handoff_and_fanin_only_when_verified() -> None:
    base = {
        "transport": "cma",
        "link_transport": "cma",
        "block_bytes": 4096,
        "blocks_per_request": 8,
    }
    lat = {
        **base,
        "mode": "handoff",
        "request_bytes": 1 << 20,
        "handoff_p50_us": 1234.0,
        "handoff_p99_us": 2345.0,
        "fetch_p50_us": 1200.0,
        "pull_p50_us": 1000.0,
        "pull_p99_us": 2000.0,
        "ratio_p50": 1.234,
        "ratio_p99": 1.1725,
        "verified": True,
        "error": None,
    }
    fan = {
        **base,
        "mode": "fanin",
        "prefills": 4,
        "request_bytes": 1 << 20,
        "fanin_gbps": 3.21,
        "single_gbps": 4.32,
        "ratio": 0.743,
        "fanin_fetch_p50_us": 5000.0,
        "fanin_fetch_p99_us": 6000.0,
        "verified": True,
        "error": None,
    }
    text = report.render([lat, fan], "dxl bench --handoff")
    assert "Request handoff latency" in text and "Handoff fan-in" in text
    assert "|      1.23 |" in text and "1.17" in text and "3.21" in text and "0.74" in text
    bad = dict(lat, verified=False, error="bytes differ", label="cma handoff 4K")
    text = report.render([bad], "dxl bench --handoff")
    assert "UNVERIFIED" in text and "1.23" not in text and "2.35" not in text
    assert "UNVERIFIED: cma handoff 4K: bytes differ" in text


def _check_handoff_rows(rows: list[dict], transport: str, prefills: int) -> None:
    lat, fan = rows
    assert (lat["mode"], fan["mode"]) == ("handoff", "fanin")
    for r in rows:
        assert r["verified"] is True and r["error"] is None, r
        assert r["link_transport"] == transport
    assert 0 < lat["handoff_p50_us"] <= lat["handoff_p99_us"]
    assert 0 < lat["pull_p50_us"] <= lat["pull_p99_us"] and lat["fetch_p50_us"] > 0
    assert lat["ratio_p50"] == pytest.approx(lat["handoff_p50_us"] / lat["pull_p50_us"], 0.01)
    offerer = lat["offerer"]  # the prefill's own account: every offer ended done, once
    assert offerer["offers"] == offerer["ended"]["done"] == 1 + 3 * 1 + 1  # probe + passes
    assert offerer["offers_live"] == 0
    assert lat["fetcher"]["fetch"]["ops"] == offerer["offers"]
    assert fan["prefills"] == prefills and fan["fanin_gbps"] > 0 and fan["single_gbps"] > 0
    assert fan["ratio"] == pytest.approx(fan["fanin_gbps"] / fan["single_gbps"], 0.01)
    # warm-up and one pass: a fan-in round and a single-link run of N offers each
    assert fan["fetcher"]["fetch"]["ops"] == 4 * prefills


@pytest.mark.multiproc
@pytest.mark.cma
def test_handoff_smoke_cma_is_verified() -> None:
    rc, rows, err = run_bench(
        "--handoff", "--transport", "cma", "--fan-in", "3", "--block-bytes", "4K", *SMOKE
    )
    assert rc == 0, err
    _check_handoff_rows(rows, "cma+shm", 3)  # the prefills' memory is shared by default
    assert "Request handoff latency" in err and "Handoff fan-in" in err


@pytest.mark.multiproc
def test_handoff_smoke_tcp_is_verified() -> None:
    rc, rows, err = run_bench(
        "--handoff", "--transport", "tcp", "--fan-in", "2", "--block-bytes", "4K", *SMOKE
    )
    assert rc == 0, err
    _check_handoff_rows(rows, "tcp", 2)


@pytest.mark.multiproc
@pytest.mark.cma
def test_handoff_corrupted_destination_gives_no_number() -> None:
    rc, rows, err = run_bench(
        "--handoff",
        "--transport",
        "cma",
        "--fan-in",
        "2",
        "--block-bytes",
        "4K",
        "--debug-corrupt",
        *SMOKE,
    )
    assert rc == 1
    lat, fan = rows
    assert lat["verified"] is False and lat["handoff_p50_us"] is None and lat["ratio_p50"] is None
    assert fan["verified"] is False and fan["fanin_gbps"] is None and fan["ratio"] is None
    assert err.count("UNVERIFIED") >= 2


# --------------------------------------------------------------------------------- --vllm


def test_vllm_caches_are_what_the_connector_registers_for_vllms_cpu_layout() -> None:
    from dxl.bench import vllm_path
    from dxl.integrations.vllm.layout import kv_layout

    [w] = vllm_path.workloads(["cma"], [8 << 10], 3, 1, None, 2, 1, 1, 0)
    caches = vllm_path.KVCaches(w, fill=True)
    t = caches.tensors["model.layers.1.self_attn.attn"]
    assert t.shape == (w.num_blocks, 2, vllm_path.BLOCK_TOKENS, 128)  # [B, H, N, C], 2 heads
    layout = kv_layout(caches.tensors, w.num_blocks)
    assert layout.tensors_per_layer == 1 and layout.block_bytes == 8 << 10
    assert list(layout.addrs) == caches.kv.addrs  # one tensor per layer, layer-major
    with pytest.raises(SystemExit, match="multiple of 32 bytes"):
        vllm_path.workloads(["cma"], [40], 3, 1, None, 2, 1, 1, 0)


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "transport", [pytest.param("cma", marks=pytest.mark.cma), pytest.param("tcp")]
)
def test_vllm_connector_path_smoke_is_verified_against_the_limit(transport: str) -> None:
    rc, rows, err = run_bench(
        "--vllm", "--transport", transport, "--block-bytes", "4K", *SMOKE, timeout=240
    )
    assert rc == 0, err
    [r] = rows
    assert r["mode"] == "vllm" and r["verified"] is True and r["error"] is None, r
    assert r["link_transport"].split("+")[0] == transport
    assert r["gbps"] > 0 and r["ratio"] > 0 and 0 < r["p50_us"] <= r["p99_us"]
    assert r["offer_p50_us"] > 0
    kind = "raw_socket" if transport == "tcp" else "memcpy"
    n = (
        baselines.tcp_streams(r["request_bytes"])
        if transport == "tcp"
        else baselines.copy_threads(None)
    )
    _limit_ok(r, kind, n)
    assert "vLLM connector path" in err and "vs limit" in err


@pytest.mark.multiproc
@pytest.mark.cma
def test_vllm_corrupted_destination_gives_no_number() -> None:
    rc, rows, err = run_bench(
        "--vllm", "--transport", "cma", "--block-bytes", "4K", "--debug-corrupt", *SMOKE
    )
    assert rc == 1
    [r] = rows
    assert r["verified"] is False and r["error"], r
    assert r["gbps"] is None and r["ratio"] is None and r["limit_ratio"] is None
    assert r["p50_us"] is None and r["gbps_passes"] is None
    assert "UNVERIFIED" in err


def test_vllm_refuses_threads() -> None:
    with pytest.raises(SystemExit, match="--threads does not apply"):
        cli.bench_main(["--vllm", "--threads", "2"])


# -------------------------------------------------------------------------------------- netns

NETNS_SMOKE = ["--netns", "--transport", "tcp", "--block-bytes", "64K", *SMOKE]


def test_netns_is_refused_without_root_and_beside_other_modes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A clear usage error (exit 2) before anything is measured or created."""
    from dxl.bench import netns

    monkeypatch.setattr(netns, "netns_available", lambda: "needs root to create namespaces")
    with pytest.raises(SystemExit) as exc:
        cli.bench_main(NETNS_SMOKE)
    assert exc.value.code == 2
    assert "--netns needs root to create namespaces" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.bench_main(["--netns", "--handoff"])
    assert exc.value.code == 2
    assert "--netns applies to the transfer and --overhead runs, not to --handoff" in (
        capsys.readouterr().err
    )


def _netns_why() -> str | None:
    from dxl.bench.netns import netns_available

    return netns_available()


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return {ln.split(":")[1].strip().split("@")[0] for ln in out.stdout.splitlines()}


def _dead_pid() -> int:
    """The pid of a process that has exited (as a SIGKILLed bench's is)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def needs_netns(test: Callable[..., None]) -> Callable[..., None]:
    why = _netns_why()
    for mark in (
        pytest.mark.root,
        pytest.mark.multiproc,
        pytest.mark.netns,
        pytest.mark.skipif(why is not None, reason=why or ""),
    ):
        test = mark(test)
    return test


@needs_netns
def test_netns_smoke_crosses_a_veth_verified_and_leaves_nothing() -> None:
    """tcp pull and push between two namespaces: every byte verified, dxl and the raw TCP limit
    both over the veth; the namespaces a killed earlier run left are swept first; afterwards
    neither namespace nor either veth end is left anywhere."""
    from dxl.bench.netns import TwoHosts, netns_names, owned_prefix

    stale = TwoHosts(owned_prefix(_dead_pid())).__enter__()  # what a SIGKILLed run leaves
    try:
        rc, rows, err = run_bench(*NETNS_SMOKE, "--op", "pull", "push", timeout=300)
        left = set(netns_names())
        links = _root_links()
    finally:
        stale.__exit__()
    assert rc == 0, err
    assert [r["op"] for r in rows] == ["pull", "push"]
    for r in rows:
        assert r["verified"] is True and r["error"] is None, r
        assert r["link_transport"] == "tcp" and r["limit"] == "raw_socket" and r["gbps"] > 0
        assert r["limit_gbps"] > 0
        cpu = r["cpu_ms_per_gb"]  # both processes' CPU over the timed requests, dxl and limit
        assert cpu["dxl"] > 0 and ((cpu["limit"] or 0) > 0) == (r["limit_parallel"] > 1), r
        where = r["netns"]
        assert where["target_ns"] != where["initiator_ns"], where
        assert where["target_ip"] != "127.0.0.1" and where["initiator_ip"] != "127.0.0.1"
        assert "auth_token" not in where
    made = {rows[0]["netns"]["target_ns"], rows[0]["netns"]["initiator_ns"]}
    tag = rows[0]["netns"]["target_ns"].split("-")[1]
    assert not (made | {stale.ns_a, stale.ns_b}) & left, left
    assert not {f"dxa{tag}", f"dxb{tag}", stale.veth_a, stale.veth_b} & links, links


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_netns_is_removed_when_the_run_is_interrupted(sig: signal.Signals) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or a SIGTERM to the
    bench mid-run: both namespaces go with it."""
    from dxl.bench.netns import netns_names, owned_prefix

    args = [*NETNS_SMOKE, "--op", "pull", "--requests", "100000", "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dxl.bench", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    prefix = owned_prefix(proc.pid) + "-"
    try:
        mine = wait_until(
            lambda: [n for n in netns_names() if n.startswith(prefix)] or proc.poll() is not None,
            120,
            "the bench's namespaces exist",
        )
        assert mine is not True and len(mine) == 2, mine
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert not [n for n in netns_names() if n.startswith(prefix)]
