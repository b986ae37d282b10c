"""Facade methods that forward to the component implementing them, signature and all.

An operation is written once, on the component that does it (its signature, checks and
docstring); the :class:`~dxl.engine.Engine` facade exposes it with :func:`forward`, and the
synchronous facade (:mod:`dxl.datadist`) with :func:`blocking`. Both keep the component's
signature for type checkers (``ParamSpec``) and for ``inspect.signature``/``help``
(``__wrapped__``), so an API change is made in one place.
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
