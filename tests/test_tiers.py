"""The test tiers: the fast tier's guard refuses every way a test could start a child process,
and tests that start peers are marked for the slower tiers wherever they are."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import pytest
from tiers import ChildProcessRefused, mark_by_fixtures, take_child_process_attempts

FAST_TIER = os.environ.get("DXL_TEST_FAST") == "1"
guarded = pytest.mark.skipif(
    not FAST_TIER, reason="the guard is installed by make test-fast only (DXL_TEST_FAST=1)"
)


def _noop() -> None:  # a spawn child's target (must be importable: module level)
    pass


def _fork() -> None:
    if os.fork() == 0:  # only if the guard failed: the child must not go on running tests
        os._exit(0)


STARTS = {
    "subprocess.run": lambda: subprocess.run([sys.executable, "-c", "pass"], check=True),
    "os.system": lambda: os.system("true"),
    "os.fork": _fork,
    "os.posix_spawn": lambda: os.posix_spawn(sys.executable, [sys.executable, "-V"], {}),
    "os.execv": lambda: os.execv(sys.executable, [sys.executable, "-V"]),
    "multiprocessing spawn": lambda: (
        multiprocessing.get_context("spawn").Process(target=_noop).start()
    ),
    "multiprocessing forkserver": lambda: (
        multiprocessing.get_context("forkserver").Process(target=_noop).start()
    ),
    "multiprocessing fork": lambda: (
        multiprocessing.get_context("fork").Process(target=_noop).start()
    ),
}


@guarded
@pytest.mark.parametrize("how", sorted(STARTS))
def test_the_fast_tier_refuses_every_way_to_start_a_process(how: str) -> None:
    before = set(multiprocessing.active_children())
    with pytest.raises(ChildProcessRefused, match="mark the test multiproc"):
        STARTS[how]()
    assert set(multiprocessing.active_children()) == before
    # the attempt was recorded too: the autouse fixture fails a test that swallowed the error
    attempts = take_child_process_attempts()
    assert len(attempts) >= 1, attempts


class _Item:
    def __init__(self, fixturenames: list[str], marked: bool = False) -> None:
        self.fixturenames = fixturenames
        self.markers = ["multiproc"] if marked else []

    def get_closest_marker(self, name: str) -> object:
        return name if name in self.markers else None

    def add_marker(self, marker: pytest.MarkDecorator) -> None:
        self.markers.append(marker.name)


def test_tests_that_start_peers_are_marked_multiproc() -> None:
    peers, plain, marked = (
        _Item(["make_peer", "tmp_path"]),
        _Item(["tmp_path"]),
        _Item(["make_peer"], marked=True),
    )
    mark_by_fixtures([peers, plain, marked])  # type: ignore[list-item]
    assert peers.markers == ["multiproc"]
    assert plain.markers == []
    assert marked.markers == ["multiproc"]  # not twice
