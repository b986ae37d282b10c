"""``dxl.Engine``: the async engine with the layers dxl puts above it (the request handoff).

The packages stack up, each knowing only the ones below it::

    dxl.integrations.vllm    the vLLM KV connector, on the handoff
    dxl.handoff              request handoff, on the engine's port (dxl/handoff/port.py)
    dxl.engine               the transfer engine and its components; imports no layer

so the engine cannot name the handoff's type, and yet users write ``engine.handoff`` and type
checkers know what it is. The simplest design that keeps both: the engine carries layers
generically (:meth:`dxl.engine.Engine.add_layer` builds one from its
:class:`~dxl.engine.port.LayerPort`, closes it with the engine and reports its stats), and this
module, above both packages, is the one place that adds the handoff and gives it a typed
property. Alternatives were worse: a registry keyed by name returns an untyped layer, a
``TYPE_CHECKING`` import of the handoff in the engine is still a dependency, and an engine that
wraps instead of extending the core would forward every operation a second time.
"""

from __future__ import annotations

from .config import LLMConfig
from .engine import engine as core
from .handoff.handoff import Handoff
from .transport.select import TransportBackend
from .types import LLMRole

__all__ = ["Engine"]


class Engine(core.Engine):
    """An async KV-cache transfer engine with request handoff (``handoff``); ``dxl.Engine``.

    The operations and arguments are :class:`dxl.engine.Engine`'s (LLM-DataDist's
    ``LLMDataDist`` and ``CacheManager`` operations, same names, arguments and errors); use as
    ``async with Engine(cluster_id, role, config) as eng: ...``.
    """

    def __init__(
        self,
        cluster_id: int,
        role: LLMRole,
        config: LLMConfig | dict[str, str] | None = None,
        *,
        transport_backend: TransportBackend | None = None,
    ) -> None:
        super().__init__(cluster_id, role, config, transport_backend=transport_backend)
        self._handoff = self.add_layer("handoff", Handoff)

    @property
    def handoff(self) -> Handoff:
        """Request handoff: offer, fetch, push, abort, finished offers (docs/handoff.md)."""
        return self._handoff
