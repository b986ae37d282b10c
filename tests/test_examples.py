"""The shipped examples run end to end (small sizes) and report verified bytes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.multiproc, pytest.mark.cma]


def run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_pd_link_and_pull_demo():
    out = run(
        "pd_link_and_pull.py",
        "--layers",
        "4",
        "--blocks",
        "64",
        "--requests",
        "16",
        "--max-blocks",
        "16",
    )
    assert "verified: every byte matches" in out
    assert "(cma)" in out


def test_pd_demo_with_shared_prefill_memory():
    out = run(
        "pd_link_and_pull.py",
        "--layers",
        "2",
        "--blocks",
        "32",
        "--requests",
        "8",
        "--max-blocks",
        "8",
        "--share",
    )
    assert "verified: every byte matches" in out
    assert "(cma+shm)" in out


def test_pd_demo_over_tcp():
    out = run(
        "pd_link_and_pull.py",
        "--layers",
        "2",
        "--blocks",
        "32",
        "--requests",
        "8",
        "--max-blocks",
        "8",
        "--transport",
        "tcp",
    )
    assert "verified: every byte matches" in out
    assert "(tcp)" in out


def test_asyncio_server_example():
    out = run(
        "asyncio_server.py",
        "--layers",
        "2",
        "--blocks",
        "64",
        "--requests",
        "8",
        "--max-blocks",
        "8",
    )
    assert out.count("verified") == 8
    assert "failures 0" in out


def test_handoff_metrics_example():
    pytest.importorskip(
        "prometheus_client", reason="the example serves Prometheus text: the metrics extra"
    )
    out = run("handoff_metrics.py", "--requests", "15", "--scrape")
    assert "ends: {'done': 10, 'failed': 0, 'aborted': 2, 'expired': 3}" in out
    assert 'dxl_handoff_offers_ended_total{engine="1",peer="2",reason="done"} 10.0' in out
    assert 'dxl_handoff_renewals_received_total{engine="1",peer="2"} 4.0' in out
    assert "failures 0" in out


def test_pd_handoff_example():
    out = run(
        "pd_handoff.py",
        "--requests",
        "24",
        "--concurrency",
        "4",
        "--layers",
        "2",
        "--blocks",
        "64",
        "--max-blocks",
        "8",
        "--abort-every",
        "5",
        "--expire-every",
        "7",
    )
    assert "verified: every byte matches (17 requests" in out
    # 4 aborted by the router, 3 too late for their lease: each ended once, as expected
    assert "prefill ends (each offer exactly once): done 17, aborted 4, expired 3, failed 0" in out
    assert "late decodes told why: LLM_KV_CACHE_NOT_EXIST" in out
    assert "prefill: offer -> done" in out and "PROBLEMS" not in out


def test_pd_handoff_example_over_tcp():
    out = run(
        "pd_handoff.py",
        "--requests",
        "12",
        "--concurrency",
        "4",
        "--layers",
        "2",
        "--blocks",
        "64",
        "--max-blocks",
        "8",
        "--transport",
        "tcp",
    )
    assert "(tcp, 4 at a time" in out and "verified: every byte matches" in out
