"""The facades stay one implementation: every Engine operation has the signature of the component
that implements it, and every sync CacheManager / LLMDataDist operation that mirrors an Engine
coroutine has the Engine's signature (so an API change is made once)."""

from __future__ import annotations

import inspect

import pytest

import dxl
from dxl.datadist import CacheManager, LLMDataDist, SyncHandoff
from dxl.engine import Engine
from dxl.handoff import Handoff

# What the sync facade mirrors from the async Engine, by class.
CACHE_MANAGER_OPS = [
    "register_cache",
    "register_blocks_cache",
    "unregister_cache",
    "allocate_cache",
    "allocate_blocks_cache",
    "deallocate_cache",
    "deallocate_blocks_cache",
    "pull_blocks",
    "push_blocks",
    "pull_cache",
    "push_cache",
    "transfer_cache_async",
    "remove_cache_key",
    "check_cache_key",
    "copy_cache",
    "copy_blocks",
    "swap_blocks",
]
DATADIST_OPS = [
    "link_clusters",
    "unlink_clusters",
    "switch_role",
    "link",
    "unlink",
    "query_register_mem_status",
]

# The sync handoff mirrors every coroutine of Handoff but these: an async iterator has no
# blocking form (poll_finished / wait_finished are), and close belongs to the engine's.
HANDOFF_ASYNC_ONLY = {"finished", "close"}


def _public_coroutines(cls: type) -> set[str]:
    return {
        name
        for name, member in vars(cls).items()
        if not name.startswith("_") and inspect.iscoroutinefunction(member)
    }


def _params(fn: object) -> list[tuple[str, object, object]]:
    """Parameters after ``self`` (static methods have none to drop)."""
    params = list(inspect.signature(fn).parameters.values())  # type: ignore[arg-type]
    if params and params[0].name == "self":
        params = params[1:]
    return [(p.name, p.kind, p.default) for p in params]


@pytest.mark.parametrize(
    ("facade", "names"), [(CacheManager, CACHE_MANAGER_OPS), (LLMDataDist, DATADIST_OPS)]
)
def test_sync_facade_has_the_engines_signatures(facade: type, names: list[str]) -> None:
    for name in names:
        sync, engine = getattr(facade, name), getattr(Engine, name)
        assert _params(sync) == _params(engine), name
        assert inspect.getdoc(sync) == inspect.getdoc(engine), name


def test_sync_handoff_has_the_handoffs_signatures() -> None:
    names = _public_coroutines(Handoff) - HANDOFF_ASYNC_ONLY
    assert {"offer", "fetch", "push", "abort", "wait_finished"} <= names
    for name in names:
        sync, engine = getattr(SyncHandoff, name), getattr(Handoff, name)
        assert _params(sync) == _params(engine), name
        assert inspect.getdoc(sync) == inspect.getdoc(engine), name
    plain = {"poll_finished", "live", "stats"}  # plain methods, run on the loop thread
    for name in plain:
        assert _params(getattr(SyncHandoff, name)) == _params(getattr(Handoff, name)), name


def test_every_engine_operation_reaches_the_sync_facade() -> None:
    """A coroutine added to the Engine must be mirrored (or listed as async-only here)."""
    async_only: set[str] = set()
    mirrored = set(CACHE_MANAGER_OPS) | set(DATADIST_OPS)
    assert _public_coroutines(Engine) - {"start", "close"} - async_only <= mirrored


def test_engine_operations_are_their_components() -> None:
    """The facade forwards: the signature and docstring are the implementing component's."""
    for name in _public_coroutines(Engine) - {"start", "close"}:
        method = getattr(Engine, name)
        implementation = inspect.unwrap(method)
        assert implementation is not method, f"{name} is not forwarded"
        assert implementation.__name__ == name
        assert inspect.getdoc(method), f"{name} has no docstring"


def test_handoff_operations_are_their_components() -> None:
    """The handoff facade forwards too: each operation's signature and docstring are written
    once, on the component (Offering, Fetching, Pushing, Aborts, OfferTable)."""
    names = (_public_coroutines(Handoff) - {"close"}) | {"finished", "poll_finished"}
    assert {"offer", "offer_destination", "fetch", "push", "complete", "renew"} <= names
    for name in names:
        method = getattr(Handoff, name)
        implementation = inspect.unwrap(method)
        assert implementation is not method, f"{name} is not forwarded"
        assert implementation.__qualname__.split(".")[0] != "Handoff", name
        assert implementation.__name__ == name
        assert inspect.getdoc(method), f"{name} has no docstring"


@pytest.mark.parametrize("name", ["pull_blocks", "pull_cache"])
async def test_pull_layer_arguments_are_explicit_keywords(name: str) -> None:
    """The reference's ``**kwargs`` of pull_blocks / pull_cache are keyword-only parameters:
    visible to help() and type checkers, an unknown one refused by Python itself."""
    for fn in (getattr(Engine, name), getattr(CacheManager, name)):
        params = inspect.signature(fn).parameters
        assert not [p for p in params.values() if p.kind is p.VAR_KEYWORD], name
        layer_args = {k: (params[k].kind, params[k].default) for k in list(params)[-3:]}
        assert layer_args == {
            "src_layer_range": (inspect.Parameter.KEYWORD_ONLY, None),
            "dst_layer_range": (inspect.Parameter.KEYWORD_ONLY, None),
            "tensor_num_per_layer": (inspect.Parameter.KEYWORD_ONLY, 2),
        }
    eng = Engine(6, dxl.LLMRole.DECODER)
    key = dxl.BlocksCacheKey(1, 0) if name == "pull_blocks" else dxl.CacheKey(1, 1)
    with pytest.raises(TypeError, match="src_cache_offset"):  # a v1-only keyword
        await getattr(eng, name)(key, None, src_cache_offset=0)


async def test_a_sync_call_before_init_creates_no_coroutine(
    recwarn: pytest.WarningsRecorder,
) -> None:
    dd = LLMDataDist(dxl.LLMRole.DECODER, 5)
    with pytest.raises(RuntimeError, match="not initialized"):
        dd.link_clusters([], 1000)
    assert not [w for w in recwarn if "never awaited" in str(w.message)]
