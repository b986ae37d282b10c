"""The handoff soak (benchmarks/handoff_soak.py) at CI size: 300 handoffs between 1 decode
and 3 prefills with random aborts from either side, expiries, and one prefill SIGKILLed and
restarted mid-run. Full size (10,000 handoffs, 16 prefills): ``python
benchmarks/handoff_soak.py --full``, or ``DXL_SOAK_FULL=1`` for this test."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiproc, pytest.mark.soak, pytest.mark.cma]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "handoff_soak.py"
FULL = os.environ.get("DXL_SOAK_FULL") == "1"


def load_soak():
    spec = importlib.util.spec_from_file_location("handoff_soak", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(3600 if FULL else 240)
def test_soak_every_offer_ends_once_on_both_sides(capsys):
    soak = load_soak()
    cfg = soak.Config()
    if FULL:
        cfg.handoffs, cfg.prefills = soak.FULL["handoffs"], soak.FULL["prefills"]
    out = soak.run(cfg)
    with capsys.disabled():
        soak.print_report(out)
    assert out["problems"] == [] and out["ok"]
    assert out["handoffs"] == cfg.handoffs
    assert out["live_at_end"] == [0] * cfg.prefills
    outcomes = out["outcomes"]
    # every kind of end happened: done, aborted by either side, expired; and the kill hit
    for kind in (
        "fetch: done / done",
        "decode_abort: failed / aborted",
        "prefill_abort: failed / aborted",
        "expire: never / expired",
    ):
        assert outcomes.get(kind), (kind, outcomes)
    assert out["lost_with_killed_prefill"] > 0 and out["old_ticket_refused"] is True
    assert out["verified"] == sum(n for k, n in outcomes.items() if ": done /" in k)
    # the decode's resources are flat: the same fds and threads, private memory within a few
    # MiB (RSS also counts the prefills' shared memory it maps, resident as it is read)
    used = out["decode_usage"]
    registered, first, last = used["registered"], used["after the first wave"], used["at the end"]
    shared = soak.SHARED_MEMORY
    kinds = {k: n for k, n in last["fd_kinds"].items() if k != shared}
    assert kinds == {k: n for k, n in first["fd_kinds"].items() if k != shared}, used
    # shared memory: the decode's own memfds, and one descriptor per prefill window mapped
    # here (a window maps when a link first meets a cache, so their count varies with timing);
    # every one is accounted for at the end, and only live prefills' (the killed one's went)
    windows = out["windows_at_end"]
    assert sorted(windows) == sorted(out["prefill_ids"]), windows
    own = registered["fd_kinds"].get(shared, 0)
    assert last["fd_kinds"].get(shared, 0) == own + sum(windows.values()), (windows, used)
    assert last["os_threads"] == first["os_threads"], out["decode_usage"]
    assert last["private_kib"] - first["private_kib"] < 32 << 10, out["decode_usage"]
