"""How many NIXL notifications a peer may send us: counted, dropped, and a flooder named.

NIXL lets an agent that holds our metadata send us notifications (``send_notif``, or the message
of a transfer it posts), which NIXL's UCX backend keeps in this process's memory until the agent
is asked for them (``get_new_notifs``). dxl uses none of them; left unread, they would let a
linked peer grow our memory at will. So the engine's agent is drained on a timer
(:data:`NOTIF_DRAIN_S`, :class:`dxl.engine.nixl_watch.NotifWatch`) and whenever a transfer
polls; what comes out is counted here and dropped (dxl holds only the counts), and a sender
past :data:`NOTIF_LIMIT` notifications or :data:`NOTIF_BYTES_LIMIT` bytes in one window is named
so its link can be closed. Nothing here imports nixl.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "MAX_SENDERS",
    "NOTIF_BYTES_LIMIT",
    "NOTIF_DRAIN_S",
    "NOTIF_LIMIT",
    "OTHERS",
    "NotifCounter",
]

NOTIF_DRAIN_S = 0.25  # the drain timer's period: one window of the count
NOTIF_LIMIT = 4096  # notifications one sender may send per window before its link is closed
NOTIF_BYTES_LIMIT = 16 << 20  # and bytes of them (NIXL caps no message's size)
MAX_SENDERS = 64  # distinct sender names counted per window; the rest count under OTHERS
OTHERS = ""  # the key of senders past MAX_SENDERS (a name NIXL never gives an agent)


class NotifCounter:
    """The notifications drained from one agent: totals, and per sender in the current window.
    Thread-safe (transfer threads drain while they poll, the engine's timer ends windows).

    Args:
        limit: notifications a sender may send per window; past it, :meth:`end_window` names
            it.
        bytes_limit: the same for their bytes.
    """

    def __init__(self, limit: int, bytes_limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if bytes_limit < 1:
            raise ValueError(f"bytes_limit must be at least 1, got {bytes_limit}")
        self._limit = limit
        self._bytes_limit = bytes_limit
        self._lock = threading.Lock()
        # sender -> [notifications, bytes] this window (at most MAX_SENDERS + 1 entries)
        self._window: dict[str, list[int]] = {}
        self._dropped = 0
        self._dropped_bytes = 0
        self._floods = 0

    def take(self, notifs: Mapping[str, Sequence[bytes]]) -> None:
        """Count ``notifs`` (sender -> messages, as ``get_new_notifs`` returns them); the
        caller drops them."""
        if not notifs:
            return
        with self._lock:
            for sender, messages in notifs.items():
                known = sender in self._window or len(self._window) < MAX_SENDERS
                key = sender if known else OTHERS
                nbytes = sum(len(m) for m in messages)
                count = self._window.setdefault(key, [0, 0])
                count[0] += len(messages)
                count[1] += nbytes
                self._dropped += len(messages)
                self._dropped_bytes += nbytes

    def end_window(self) -> set[str]:
        """Close the window: the senders that sent more than a limit in it (never OTHERS,
        which names no one); the next window starts empty."""
        with self._lock:
            window, self._window = self._window, {}
            flooders = {
                s
                for s, (n, nbytes) in window.items()
                if s != OTHERS and (n > self._limit or nbytes > self._bytes_limit)
            }
            self._floods += len(flooders)
        return flooders

    def snapshot(self) -> dict[str, Any]:
        """What was dropped so far, and what this counter holds now (senders in the window)."""
        with self._lock:
            return {
                "dropped": self._dropped,
                "dropped_bytes": self._dropped_bytes,
                "floods": self._floods,
                "senders_in_window": len(self._window),
                "limit_per_window": self._limit,
                "bytes_limit_per_window": self._bytes_limit,
                "window_s": NOTIF_DRAIN_S,
            }
