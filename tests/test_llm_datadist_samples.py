"""The reference's sample flows (examples/llm_datadist, spec section 12) run end to end: every
script exits 0 and reports that every byte it moved was verified."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "examples" / "llm_datadist"
SCRIPTS = sorted(p.name for p in SAMPLES.glob("*.py") if not p.name.startswith("_"))

pytestmark = [pytest.mark.multiproc, pytest.mark.cma]


def test_every_sample_flow_is_here():
    assert set(SCRIPTS) >= {
        "host_swap.py",
        "pull_blocks_xpyd.py",
        "pull_cache.py",
        "pull_from_cache_to_blocks.py",
        "push_blocks.py",
        "push_cache.py",
        "switch_role.py",
        "transfer_cache_async.py",
    }


@pytest.mark.parametrize("script", SCRIPTS)
def test_sample_flow(script: str):
    proc = subprocess.run(
        [sys.executable, str(SAMPLES / script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    name = script.removesuffix(".py")
    assert proc.stdout.startswith(f"{name}: "), out
    assert proc.stdout.rstrip().endswith("; every byte verified"), out
