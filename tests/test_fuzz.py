"""Property-based tests: the control-plane decoder and the transfer APIs under arbitrary input.

The decoder must turn any bytes into either a schema-valid message or FrameError, nothing else;
transfer calls must raise only their documented exception types for any argument values,
and leave every byte of registered memory and every registration as it was.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dxl
from dxl.control import wire
from dxl.control.messages import RegAdd, to_wire
from dxl.testing import KVBuffers

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=256))
def test_decoder_accepts_only_schema_valid_frames(body):
    try:
        msg = wire.decode(body)
    except wire.FrameError:
        return
    assert msg.KIND in wire.SCHEMAS


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(sorted(wire.SCHEMAS)),
    st.dictionaries(
        st.sampled_from(sorted({f for s in wire.SCHEMAS.values() for f in s} | {"x"})),
        JSONISH,
        max_size=10,
    ),
)
def test_decoder_on_structured_garbage(kind, fields):
    body = json.dumps({"t": kind, **fields}).encode()
    try:
        msg = wire.decode(body)
    except wire.FrameError:
        return
    schema = wire.SCHEMAS[msg.KIND]
    assert set(to_wire(msg)) == set(schema) | {"t"}  # nothing extra, nothing missing
    assert to_wire(msg) == json.loads(body)  # the message holds exactly what was sent


@given(st.binary(min_size=4, max_size=4))
def test_frame_length_is_bounded(header):
    (n,) = struct.unpack(">I", header)
    if 0 < n <= wire.MAX_FRAME:
        assert wire.frame_length(header) == n
    else:
        with pytest.raises(wire.FrameError):
            wire.frame_length(header)


def test_encode_then_decode_round_trips():
    entry = {
        "id": 1,
        "gen": 2,
        "blocks": True,
        "num_tensors": 1,
        "tensor_size": 64,
        "units": 2,
        "placement": 0,
        "device": 0,
        "addrs": [4096],
        "model_id": 0,
        "keys": [],
        "shm": [[7, 0, 4096, 4096, 12]],
    }
    frame = wire.encode("reg_add", rid=5, cache=entry)
    assert wire.frame_length(frame[:4]) == len(frame) - 4
    assert wire.decode(frame[4:]) == RegAdd(rid=5, cache=entry)
    assert wire.encode(RegAdd(rid=5, cache=entry)) == frame
    for window in (
        [7, 0, 4096, 0, 12],
        [7, 0, 2**64 - 4096, 8192, 12],
        [1 << 40, 0, 1, 1, 1],
        [7, 0, 4096, 4096],
        [-1, 0, 4096, 4096, 12],
    ):
        bad = json.dumps({"t": "reg_add", "rid": 5, "cache": {**entry, "shm": [window]}})
        with pytest.raises(wire.FrameError, match="shm window"):
            wire.decode(bad.encode())
    for device, rule in ((-1, "device index"), (1 << 16, "device index"), (True, "type")):
        bad = json.dumps({"t": "reg_add", "rid": 5, "cache": {**entry, "device": device}})
        with pytest.raises(wire.FrameError, match=rule):
            wire.decode(bad.encode())
    no_device = {k: v for k, v in entry.items() if k != "device"}  # a v4 peer's entry
    with pytest.raises(wire.FrameError, match="lacks field 'device'"):
        wire.decode(json.dumps({"t": "reg_add", "rid": 5, "cache": no_device}).encode())


ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.floats(allow_nan=False),
    st.text(max_size=3),
    st.lists(st.integers(-5, 70), max_size=6),
    st.tuples(st.integers(-5, 70)),
    st.builds(range, st.integers(-2, 5), st.integers(-2, 5), st.sampled_from([1, 2, -1])),
)
DOCUMENTED = (TypeError, ValueError, AttributeError, dxl.LLMException)
SHARED_FIXTURE = [HealthCheck.function_scoped_fixture]  # module-scoped: state is checked anyway


@pytest.fixture(scope="module")
def engine_with_cache():
    """One engine on a private loop (the sync facade's machinery) reused by many examples."""
    dd = dxl.LLMDataDist(dxl.LLMRole.DECODER, 3)
    dd.init({"dxl.MaxRegisterAddrs": "240"})
    buf = KVBuffers(4, 64, 256, seed=2)
    cache = dd.cache_manager.register_blocks_cache(buf.desc(), buf.addrs, dxl.BlocksCacheKey(3, 0))
    yield dd, cache, buf
    dd.finalize()


@settings(max_examples=150, deadline=None, suppress_health_check=SHARED_FIXTURE)
@given(
    src=ANY,
    dst=ANY,
    key_cluster=st.integers(0, 5),
    extra=st.dictionaries(
        st.sampled_from(["src_layer_range", "dst_layer_range", "tensor_num_per_layer"]),
        ANY,
        max_size=3,
    ),
)
def test_pull_blocks_raises_only_documented_errors(engine_with_cache, src, dst, key_cluster, extra):
    dd, cache, buf = engine_with_cache
    before = dd.engine.stats()["registered_addrs"]
    with pytest.raises(DOCUMENTED):
        dd.cache_manager.pull_blocks(dxl.BlocksCacheKey(key_cluster, 0), cache, src, dst, **extra)
    assert dd.engine.stats()["registered_addrs"] == before
    assert buf.untouched(range(4), np.arange(64))


@settings(max_examples=100, deadline=None, suppress_health_check=SHARED_FIXTURE)
@given(shape=st.lists(st.integers(-3, 70), max_size=4), num=st.integers(-2, 300), addrs=ANY, ra=ANY)
def test_register_raises_only_documented_errors(engine_with_cache, shape, num, addrs, ra):
    dd, _, _ = engine_with_cache
    before = dd.engine.stats()["caches"]
    try:
        desc = dxl.CacheDesc(num, shape, dxl.DataType.DT_UINT8, dxl.Placement.HOST)
    except DOCUMENTED:
        return
    with pytest.raises(DOCUMENTED):  # addresses from hypothesis are never mapped memory
        dd.cache_manager.register_blocks_cache(desc, addrs, None, ra)
    assert dd.engine.stats()["caches"] == before
