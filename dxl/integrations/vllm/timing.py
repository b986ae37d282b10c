"""Timestamps of a request's way through the connector, for breaking down time to first token
(benchmarks/ttft_pair.py reads them from the servers' logs).

At DEBUG on the logger ``dxl.vllm.timing`` (``DXL_LOG_LEVEL=DEBUG`` in a vLLM process), each
event is one line ``dxl: timing EVENT REQUEST_ID t=WALL_CLOCK_S [key=value ...]``: wall-clock
time, so that stamps of the prefill, the decode and the proxy compare on one host. Off (the
default), a stamp costs one level check.

Events: prefill ``prefill-scheduled`` (the step that finishes its prompt is planned),
``offered`` (after that step's forward, its blocks offered), ``tickets-built`` (request
finished, tickets in its params); decode ``ticket-checked`` (first look, ``s=`` the check's
seconds), ``load-planned`` (blocks allocated, fetch planned), ``load-started`` (the worker has
the step's plan), ``fetch-start`` (``link=warm|cold``), ``fetch-end``, ``load-returned`` (in
the worker's transfer results to vLLM), ``load-noticed`` (the scheduler has it),
``decode-scheduled`` (its first step planned), ``first-step-done`` (that step's forward ran).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("dxl.vllm.timing")

__all__ = ["enabled", "stamp"]


def enabled() -> bool:
    return log.isEnabledFor(logging.DEBUG)


def stamp(event: str, request_id: str, **extra: object) -> None:
    """One event of ``request_id`` now (a no-op unless DEBUG is on for this logger)."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    tail = "".join(f" {k}={v}" for k, v in extra.items())
    log.debug("dxl: timing %s %s t=%.6f%s", event, request_id, time.time(), tail)
