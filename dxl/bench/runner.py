"""The parent side: one fresh target + initiator process pair (spawn) per configuration.

A configuration that fails (a transport that does not link, a crash, a timeout) becomes a
row with an ``error`` and no numbers; the run goes on with the next one.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Iterable
from typing import Any

from .initiator import initiator_main
from .report import Progress
from .rows import failed_row
from .target import target_main
from .workload import Workload

JOIN_TIMEOUT_S = 30


def units_for(w: Workload) -> int:
    """Progress units one configuration reports: set-up, then dxl + baselines per pass."""
    return 1 + (w.passes if w.mode == "overhead" else 2 * w.passes)


def run_one(
    w: Workload, progress: Progress, timeout_s: float, verbose: bool = False
) -> dict[str, Any]:
    """Measure one configuration in a fresh process pair and return its row."""
    ctx = mp.get_context("spawn")
    to_target, target_end = ctx.Pipe()
    from_initiator, initiator_end = ctx.Pipe(duplex=False)
    target = ctx.Process(target=target_main, args=(w, target_end, verbose), name="dxl-target")
    initiator = ctx.Process(
        target=initiator_main, args=(w, to_target, initiator_end, verbose), name="dxl-initiator"
    )
    progress.label(f"{w.label}: starting")
    target.start()
    initiator.start()
    for end in (to_target, target_end, initiator_end):
        end.close()
    done = 0
    row: dict[str, Any] | None = None
    deadline = time.monotonic() + timeout_s
    try:
        while row is None:
            if from_initiator.poll(0.5):
                try:
                    msg = from_initiator.recv()
                except EOFError:
                    row = failed_row(w, f"the initiator exited with code {initiator.exitcode}")
                    break
                if msg[0] == "progress":
                    done += msg[1]
                    progress.advance(msg[1], msg[2])
                else:
                    row = msg[1]
            elif not initiator.is_alive():
                initiator.join()
                row = failed_row(w, f"the initiator exited with code {initiator.exitcode}")
            elif time.monotonic() > deadline:
                row = failed_row(w, f"timed out after {timeout_s:.0f} s")
    finally:
        progress.advance(max(0, units_for(w) - done), w.label)
        for proc in (initiator, target):
            proc.join(JOIN_TIMEOUT_S if row is not None and row.get("error") is None else 5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        from_initiator.close()
    return row


def run_all(
    workloads: Iterable[Workload],
    progress: Progress,
    timeout_s: float,
    on_row: Callable[[dict[str, Any]], None],
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Run every configuration in order, handing each row to ``on_row`` as it completes."""
    rows = []
    for w in workloads:
        row = run_one(w, progress, timeout_s, verbose)
        rows.append(row)
        on_row(row)
    return rows
