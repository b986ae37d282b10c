"""Test tiers: which tests ``make test-fast`` leaves out, and the guard that proves the rest
start no child process.

The tier markers (pyproject.toml): ``multiproc`` (starts a child process: multiprocessing,
subprocess, fork), ``netns`` (network namespaces), ``soak`` (long soaks and fan-ins). A test
that uses the ``make_peer`` fixture starts peer processes, so it is marked ``multiproc`` here
at collection, whether or not its module says so.

``make test-fast`` runs ``-m "not multiproc and not netns and not soak and not vllm"`` with
DXL_TEST_FAST=1, and conftest.py then installs the guard: an audit hook that refuses the
events by which Python starts a process (fork, exec, posix_spawn, system, subprocess.Popen),
and a wrapper of ``_posixsubprocess.fork_exec``, which multiprocessing's spawn and forkserver
contexts call without raising an audit event. A refused attempt raises ChildProcessRefused
where it was made and is also recorded, so that the test fails even when it (or a thread of
it) caught the exception: conftest's autouse fixture asserts none was recorded.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

TIER_MARKERS = ("multiproc", "netns", "soak")

# The audit events of the calls that start a process. os.spawn* are fork + exec in Python,
# and pty.fork is os.forkpty; multiprocessing's "fork" context is os.fork.
CHILD_PROCESS_EVENTS = frozenset(
    {"os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.system", "subprocess.Popen"}
)

_attempts: list[str] = []
_lock = threading.Lock()
_installed = False


class ChildProcessRefused(RuntimeError):
    """A test of the fast tier tried to start a child process."""


def _refuse(what: str) -> None:
    with _lock:
        _attempts.append(what)
    raise ChildProcessRefused(
        f"{what}: make test-fast starts no child process; mark the test multiproc (tests/tiers.py)"
    )


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event in CHILD_PROCESS_EVENTS:
        _refuse(f"{event}{args[:1]!r}")


def install_child_process_guard() -> None:
    """Refuse every way of starting a child process from now on, in this process (an audit
    hook cannot be removed: only the fast tier installs it)."""
    global _installed
    if _installed:
        return
    import _posixsubprocess

    fork_exec: Callable[..., int] = _posixsubprocess.fork_exec

    def refusing_fork_exec(*args: Any, **kwargs: Any) -> int:
        _refuse(f"_posixsubprocess.fork_exec({args[0]!r})")
        return fork_exec(*args, **kwargs)  # not reached: _refuse raises

    _posixsubprocess.fork_exec = refusing_fork_exec
    sys.addaudithook(_audit)
    _installed = True


def take_child_process_attempts() -> list[str]:
    """The attempts refused since the last call (and forget them)."""
    with _lock:
        taken = list(_attempts)
        _attempts.clear()
    return taken


def mark_by_fixtures(items: list[pytest.Item]) -> None:
    """Mark ``multiproc`` the tests that start peer processes through ``make_peer``."""
    for item in items:
        if "make_peer" in getattr(item, "fixturenames", ()) and not item.get_closest_marker(
            "multiproc"
        ):
            item.add_marker(pytest.mark.multiproc)
