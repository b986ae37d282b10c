"""Facade methods that forward to the component implementing them, signature and all.

An operation is written once, on the component that does it (its signature, checks and
docstring); a facade (:class:`~dxl.engine.Engine`, :class:`~dxl.handoff.Handoff`) exposes it
with :func:`forward` (a coroutine) or :func:`delegate` (a plain method), and the synchronous
facade (:mod:`dxl.datadist`) with :func:`blocking`. All keep the component's signature for type
checkers (``ParamSpec``) and for ``inspect.signature``/``help`` (``__wrapped__``), so an API
change is made in one place.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C")


def forward(
    component: str, method: Callable[Concatenate[C, P], Awaitable[R]]
) -> Callable[Concatenate[Any, P], Coroutine[Any, Any, R]]:
    """A method of the facade that awaits ``method`` on ``getattr(self, component)``."""
    name = method.__name__

    async def call(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        bound: Callable[P, Awaitable[R]] = getattr(getattr(self, component), name)
        return await bound(*args, **kwargs)

    functools.update_wrapper(call, method)
    return call


def delegate(
    component: str, method: Callable[Concatenate[C, P], R]
) -> Callable[Concatenate[Any, P], R]:
    """A plain method of the facade that returns ``method`` called on ``getattr(self,
    component)`` (e.g. an async iterator, or a value read on the loop thread)."""
    name = method.__name__

    def call(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        bound: Callable[P, R] = getattr(getattr(self, component), name)
        return bound(*args, **kwargs)

    functools.update_wrapper(call, method)
    return call
