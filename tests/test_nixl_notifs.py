"""The count behind the NIXL notification bound (dxl/transport/nixl_notifs.py), without NIXL:
what a drain hands it is counted and named per window, and what it holds stays bounded however
many senders a peer makes up."""

from __future__ import annotations

import pytest

from dxl.transport.nixl_notifs import MAX_SENDERS, OTHERS, NotifCounter


def test_a_sender_past_either_limit_in_one_window_is_named_once():
    c = NotifCounter(limit=10, bytes_limit=1000)
    c.take({"a": [b"x"] * 10, "b": [b"y" * 600]})
    c.take({"b": [b"y" * 401], "c": [b"z"] * 11})
    assert c.end_window() == {"b", "c"}  # a: at the limit, not past it
    assert c.end_window() == set()  # the next window starts empty
    c.take({"a": [b"x"] * 10})
    assert c.end_window() == set()  # a rate, not a total: 20 in two windows is fine
    snap = c.snapshot()
    assert (snap["dropped"], snap["dropped_bytes"], snap["floods"]) == (33, 1032, 2)
    assert snap["senders_in_window"] == 0


def test_made_up_sender_names_count_together_and_are_never_named():
    c = NotifCounter(limit=1, bytes_limit=1 << 20)
    c.take({f"agent-{i}": [b"m", b"m"] for i in range(10 * MAX_SENDERS)})
    assert c.snapshot()["senders_in_window"] == MAX_SENDERS + 1  # the rest under OTHERS
    flooders = c.end_window()
    assert len(flooders) == MAX_SENDERS and OTHERS not in flooders
    assert c.snapshot()["dropped"] == 20 * MAX_SENDERS


@pytest.mark.parametrize(("limit", "bytes_limit", "name"), [(0, 1, "limit"), (1, 0, "bytes_limit")])
def test_limits_must_be_positive(limit, bytes_limit, name):
    with pytest.raises(ValueError, match=f"{name} must be at least 1"):
        NotifCounter(limit, bytes_limit)
