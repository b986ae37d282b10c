"""The initiator's control pipe to the target, and the destination wherever it lives.

For a pull the destination is the initiator's own registered cache; for a push it is the
target's, which clears, corrupts (``--debug-corrupt``) and verifies itself when asked over the
pipe (see :mod:`dxl.bench.target`).
"""

from __future__ import annotations

from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from ..testing import KVBuffers
from .measure import BenchFailure
from .workload import Workload, clear, corrupt, verify

READY_TIMEOUT_S = 300


class TargetControl:
    """The initiator's end of the control pipe to the target."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def ready(self) -> dict[str, Any]:
        if not self.conn.poll(READY_TIMEOUT_S):
            raise BenchFailure(f"the target process did not start within {READY_TIMEOUT_S} s")
        kind, value = self._recv()
        if kind != "ready":
            raise BenchFailure(str(value))
        ready: dict[str, Any] = value
        return ready

    def ask(self, *msg: Any) -> Any:
        self.conn.send(msg)
        kind, value = self._recv()
        if kind != "ok":
            raise BenchFailure(str(value))
        return value

    def _recv(self) -> tuple[str, Any]:
        try:
            reply: tuple[str, Any] = self.conn.recv()
            return reply
        except EOFError:
            raise BenchFailure("the target process exited unexpectedly") from None


class Destination:
    """Clear, corrupt and verify the destination, wherever it lives."""

    def __init__(self, w: Workload, local: KVBuffers, target: TargetControl) -> None:
        self._pull = w.op == "pull"
        self._local = local
        self._target = target

    def clear(self) -> None:
        if self._pull:
            clear(self._local)
        else:
            self._target.ask("clear")

    def corrupt(self, block: int) -> None:
        if self._pull:
            corrupt(self._local, block)
        else:
            self._target.ask("corrupt", block)

    def verify(self, blocks: np.ndarray, strict: bool = False) -> bool:
        if self._pull:
            return verify(self._local, blocks, strict)
        return bool(self._target.ask("verify", blocks, strict))
