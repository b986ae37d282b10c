"""Who an engine is, and where it is in its life: shared, read-mostly state of the components."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field

import numpy as np

from ..types import LLMRole


@dataclass(slots=True)
class Identity:
    """This engine as peers see it. ``role`` changes with ``switch_role``; the rest is fixed."""

    cluster_id: int
    role: LLMRole
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex)
    # 8 bytes a peer reads through its transport at link time, to prove the transport reaches
    # this process: the token is random, so no other process holds it at that address.
    probe: np.ndarray = field(
        default_factory=lambda: np.array([secrets.randbits(63) + 1], dtype=np.uint64)
    )

    @property
    def probe_wire(self) -> list[int]:
        return [int(self.probe.ctypes.data), int(self.probe[0])]


class RunState:
    """``new`` -> ``running`` -> ``closing`` -> ``closed``; operations run only while running."""

    __slots__ = ("_cluster_id", "value")

    def __init__(self, cluster_id: int) -> None:
        self._cluster_id = cluster_id
        self.value = "new"

    @property
    def running(self) -> bool:
        return self.value == "running"

    def require(self, op: str) -> None:
        """Raise RuntimeError unless the engine is running."""
        if self.value != "running":
            raise RuntimeError(f"{op}: engine {self._cluster_id} is not running ({self.value})")
