"""The packages stack up: the engine imports no layer, the handoff reaches the engine only
through its port (dxl/handoff/port.py), and ``dxl.Engine`` carries the handoff as a layer the
engine closes and reports."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

import dxl
from dxl.engine import Engine as CoreEngine
from dxl.engine.port import LayerPort
from dxl.handoff import Handoff

PACKAGE = Path(dxl.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the dxl modules a file imports (relative imports resolved)."""
    package = ["dxl", *path.parent.relative_to(PACKAGE).parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            names.add(".".join([*base, *(node.module or "").split(".")]).strip("."))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "dxl" or n.startswith("dxl.")}


def test_the_engine_imports_no_layer() -> None:
    for path in sorted((PACKAGE / "engine").glob("*.py")):
        layers = {m for m in _imported_modules(path) if m.startswith(("dxl.handoff", "dxl.layers"))}
        assert not layers, path


def test_the_handoff_reaches_the_engine_through_its_port_only() -> None:
    users = {
        path.name
        for path in (PACKAGE / "handoff").glob("*.py")
        if any(m.startswith("dxl.engine") for m in _imported_modules(path))
    }
    assert users == {"port.py"}


def test_dxl_engine_carries_the_handoff() -> None:
    eng = dxl.Engine(11, dxl.LLMRole.PROMPT)
    assert isinstance(eng, CoreEngine)
    assert isinstance(eng.handoff, Handoff)
    assert not hasattr(CoreEngine(12, dxl.LLMRole.PROMPT), "handoff")


class _Probe:
    """A layer that records what the engine does to it."""

    def __init__(self, name: str, port: LayerPort, log: list[tuple[str, str]]) -> None:
        self.name, self.port, self.log = name, port, log
        self.engine: CoreEngine | None = None

    async def close(self) -> None:
        assert self.engine is not None
        self.log.append((self.name, self.engine.stats()["state"]))

    def stats(self) -> dict[str, Any]:
        return {"probed": self.name}


async def test_layers_close_with_the_engine_and_report_their_stats() -> None:
    log: list[tuple[str, str]] = []
    eng = CoreEngine(13, dxl.LLMRole.PROMPT)
    first = eng.add_layer("first", lambda port: _Probe("first", port, log))
    second = eng.add_layer("second", lambda port: _Probe("second", port, log))
    first.engine = second.engine = eng
    assert first.port.cluster_id == 13 and first.port.incarnation == eng.incarnation
    async with eng:
        stats = eng.stats()
        assert (stats["first"], stats["second"]) == ({"probed": "first"}, {"probed": "second"})
        with pytest.raises(RuntimeError, match="before start"):
            eng.add_layer("late", lambda port: _Probe("late", port, log))
        assert "late" not in eng.stats()
        assert not log
    # the upper layer first, while the engine is closing (its links not closed yet)
    assert log == [("second", "closing"), ("first", "closing")]


@pytest.mark.parametrize("name", ["first", "links", "not a name", ""])
def test_a_layer_name_is_an_identifier_not_used_yet(name: str) -> None:
    eng = CoreEngine(14, dxl.LLMRole.PROMPT)
    eng.add_layer("first", lambda port: _Probe("first", port, []))
    built: list[LayerPort] = []

    def factory(port: LayerPort) -> _Probe:
        built.append(port)
        return _Probe(name, port, [])

    with pytest.raises(ValueError, match="layer name"):
        eng.add_layer(name, factory)
    assert not built  # refused before the factory ran
    assert set(eng._layers) == {"first"}
