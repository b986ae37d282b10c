"""``dxl bench``: KV-shaped transfer benchmark with same-run baselines.

A target process owns L layers x (K, V) host tensors of N blocks of B bytes; an initiator
process links to it through dxl and pulls (or pushes) k random, distinct blocks of every tensor
per request. Each configuration is timed over interleaved passes against the baselines that
bound it (single-thread memcpy of the same pieces; one raw TCP stream of the same bytes), and
every configuration verifies the destination bytes before a number is reported.

Modules, one job each: ``cli`` (arguments, entry point), ``workload`` (shapes, request ids,
verification), ``target`` and ``initiator`` (the two processes), ``control`` (the pipe between
them), ``engines`` (engine options, event loop), ``measure`` (timing through the async or sync
API), ``baselines`` (memcpy, raw socket), ``overhead`` (one-piece latency, planning time),
``runner`` (spawns and collects), ``rows`` (JSON rows), ``report`` (tables, progress bar),
``plot``, and ``handoff`` (``--handoff``: request handoff latency beside ``pull_blocks``, and the
fan-in of many prefill engines into one decode, in processes of its own).
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """The ``dxl`` console script (``dxl bench ...``, ``dxl info``)."""
    from .cli import main as cli_main

    return cli_main(argv)
