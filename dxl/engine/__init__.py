"""The async engine (:class:`Engine`) and the components it is composed of."""

from .engine import Engine

__all__ = ["Engine"]
