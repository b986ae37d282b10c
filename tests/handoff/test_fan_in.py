"""Fan-in (benchmarks/handoff_fan_in.py) at CI size: one decode fetching from 8 prefill
processes at once (and from 3 network-namespace "hosts" over tcp, as root), with
``max_fetches`` 4. Full size (64 prefills, then 8 netns hosts): ``python
benchmarks/handoff_fan_in.py --full``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dxl.bench.netns import netns_available

pytestmark = [pytest.mark.multiproc, pytest.mark.soak]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "handoff_fan_in.py"
CAP = 4
RSS_GROWTH_MIB = 32  # what many fetches at once may add to the decode; its buffers come before


def fan_in(*args: str) -> dict:
    """Run the script in a process of its own (netns moves its process into the hub)."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "--max-fetches", str(CAP), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.stdout.strip(), proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=1))
    assert proc.returncode == (0 if out["ok"] else 1)
    return out


def check(out: dict) -> None:
    assert out["problems"] == [] and out["ok"]
    assert out["completed"] == out["handoffs"] == out["prefills"] * out["config"]["per_prefill"]
    # the cap did the limiting, and was never exceeded
    assert out["max_in_flight"] == CAP, out
    # every prefill progressed: none starved at the half-way point
    half = out["at_half"]
    assert half["min"] >= 1 and half["min"] * 4 >= half["median"], half
    rss = out["rss_mib"]
    assert rss["peak"] - rss["before"] < RSS_GROWTH_MIB, rss
    assert rss["after"] - rss["before"] < RSS_GROWTH_MIB, rss


@pytest.mark.cma
@pytest.mark.timeout(300)
def test_fan_in_from_prefills_on_this_host():
    out = fan_in("--scenario", "local", "--prefills", "8", "--per-prefill", "6")
    assert out["links"] == 8
    check(out)


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.timeout(300)
@pytest.mark.skipif(netns_available() is not None, reason=netns_available() or "")
def test_fan_in_from_network_namespace_hosts_over_tcp():
    out = fan_in("--scenario", "netns", "--prefills", "3", "--per-prefill", "6")
    assert out["links"] == 3
    check(out)
