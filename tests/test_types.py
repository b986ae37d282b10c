"""Behaviour of dxl.errors, dxl._validate and dxl.types against the spec (sections 2-4)."""

from __future__ import annotations

import concurrent.futures
import pickle
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest

from dxl._validate import (
    check_dict,
    check_int32,
    check_int64,
    check_isinstance,
    check_layer_range,
    check_uint16,
    check_uint32,
    check_uint64,
    check_uint64_list,
    ensure,
)
from dxl.errors import (
    LLMException,
    LLMStatusCode,
    Status,
    fail,
    param_invalid,
    status_from_code,
)
from dxl.types import (
    UINT64_MAX,
    BlocksCacheKey,
    Cache,
    CacheDesc,
    CacheKey,
    CacheKeyByIdAndIndex,
    CacheTask,
    DataType,
    LayerSynchronizer,
    LLMClusterInfo,
    LLMRole,
    MemInfo,
    Memtype,
    Placement,
    RegisterMemStatus,
    TransferConfig,
    TransferWithCacheKeyConfig,
)

S = LLMStatusCode
PARAM_INVALID = S.LLM_PARAM_INVALID


def _param_invalid(match: str) -> AbstractContextManager[pytest.ExceptionInfo[LLMException]]:
    return pytest.raises(LLMException, match=match)


def _assert_param_invalid(excinfo: pytest.ExceptionInfo[BaseException]) -> None:
    assert isinstance(excinfo.value, LLMException), excinfo.value
    assert excinfo.value.status_code == PARAM_INVALID


# ------------------------------------------------------------------------------------------
# Enums


STATUS_VALUES = {
    "LLM_SUCCESS": 0,
    "LLM_FAILED": 0xFFFFFFFF,
    "LLM_WAIT_PROCESS_TIMEOUT": 0x5010B001,
    "LLM_KV_CACHE_NOT_EXIST": 0x5010B002,
    "LLM_REPEAT_REQUEST": 0x5010B003,
    "LLM_REQUEST_ALREADY_COMPLETED": 0x5010B004,
    "LLM_PARAM_INVALID": 0x5010B005,
    "LLM_ENGINE_FINALIZED": 0x5010B006,
    "LLM_NOT_YET_LINK": 0x5010B007,
    "LLM_ALREADY_LINK": 0x5010B008,
    "LLM_LINK_FAILED": 0x5010B009,
    "LLM_UNLINK_FAILED": 0x5010B00A,
    "LLM_NOTIFY_PROMPT_UNLINK_FAILED": 0x5010B00B,
    "LLM_CLUSTER_NUM_EXCEED_LIMIT": 0x5010B00C,
    "LLM_PROCESSING_LINK": 0x5010B00D,
    "LLM_DEVICE_OUT_OF_MEMORY": 0x5010B00E,
    "LLM_PREFIX_ALREADY_EXIST": 0x5010B00F,
    "LLM_PREFIX_NOT_EXIST": 0x5010B010,
    "LLM_SEQ_LENOVERLIMIT": 0x5010B011,
    "LLM_NO_FREE_BLOCK": 0x5010B012,
    "LLM_BLOCKS_OUT_OF_MEMORY": 0x5010B013,
    "LLM_EXIST_LINK": 0x5010B018,
    "LLM_FEATURE_NOT_ENABLED": 0x5010B019,
    "LLM_TIMEOUT": 0x5010B01A,
    "LLM_LINK_BUSY": 0x5010B01B,
    "LLM_OUT_OF_MEMORY": 0x5010B01C,
    "LLM_DEVICE_MEM_ERROR": 507053,
    "LLM_SUSPECT_REMOTE_ERROR": 507057,
    "LLM_UNKNOWN_ERROR": -1,
}


def test_status_code_members_are_exactly_the_spec_list() -> None:
    assert {m.name: m.value for m in LLMStatusCode} == STATUS_VALUES


@pytest.mark.parametrize(
    ("member", "value"),
    [
        (S.LLM_FAILED, 4294967295),
        (S.LLM_TIMEOUT, 0x5010B01A),
        (S.LLM_EXIST_LINK, 0x5010B018),
        (S.LLM_UNKNOWN_ERROR, -1),
    ],
)
def test_status_code_spot_values(member: LLMStatusCode, value: int) -> None:
    assert member == value
    assert LLMStatusCode(value) is member


@pytest.mark.parametrize(
    ("member", "text"),
    [
        (S.LLM_TIMEOUT, "LLMStatusCode.LLM_TIMEOUT"),
        (S.LLM_SUCCESS, "LLMStatusCode.LLM_SUCCESS"),
        (LLMRole.PROMPT, "LLMRole.PROMPT"),
        (LLMRole.MIX, "LLMRole.MIX"),
        (Placement.DEVICE, "Placement.DEVICE"),
        (Placement.HOST, "Placement.HOST"),
        (DataType.DT_BF16, "DataType.DT_BF16"),
        (Memtype.MEM_TYPE_HOST, "Memtype.MEM_TYPE_HOST"),
        (RegisterMemStatus.PREPARING, "RegisterMemStatus.PREPARING"),
    ],
)
def test_enum_str_and_format_give_the_name(member: object, text: str) -> None:
    assert str(member) == text
    assert f"{member}" == text


def test_int_enum_format_spec_still_formats_the_number() -> None:
    assert f"{S.LLM_TIMEOUT:#x}" == "0x5010b01a"
    assert f"{LLMRole.DECODER:d}" == "2"


def test_role_placement_values() -> None:
    assert [(r.name, int(r)) for r in LLMRole] == [("PROMPT", 1), ("DECODER", 2), ("MIX", 3)]
    assert (int(Placement.HOST), int(Placement.DEVICE)) == (0, 1)
    assert [(m.name, m.value) for m in RegisterMemStatus] == [
        ("OK", 0),
        ("PREPARING", 1),
        ("FAILED", 2),
    ]
    assert [(m.name, m.value) for m in Memtype] == [("MEM_TYPE_DEVICE", 0), ("MEM_TYPE_HOST", 1)]


DATA_TYPES = [
    ("DT_FLOAT", 0, 4),
    ("DT_FLOAT16", 1, 2),
    ("DT_INT8", 2, 1),
    ("DT_INT32", 3, 4),
    ("DT_UINT8", 4, 1),
    ("DT_INT16", 6, 2),
    ("DT_UINT16", 7, 2),
    ("DT_UINT32", 8, 4),
    ("DT_INT64", 9, 8),
    ("DT_UINT64", 10, 8),
    ("DT_DOUBLE", 11, 8),
    ("DT_BOOL", 12, 1),
    ("DT_BF16", 27, 2),
]


@pytest.mark.parametrize(("name", "value", "itemsize"), DATA_TYPES)
def test_data_type_values_and_itemsize(name: str, value: int, itemsize: int) -> None:
    member = DataType[name]
    assert member.value == value
    assert member.itemsize == itemsize


def test_data_type_is_plain_enum_with_exact_members() -> None:
    assert not isinstance(DataType.DT_FLOAT, int)
    assert [m.name for m in DataType] == [n for n, _, _ in DATA_TYPES[:12]] + [
        "DT_STRING",
        "DT_BF16",
    ]
    with _param_invalid("DT_STRING") as excinfo:
        _ = DataType.DT_STRING.itemsize
    _assert_param_invalid(excinfo)


# ------------------------------------------------------------------------------------------
# Errors


def test_llm_exception_defaults_and_status() -> None:
    exc = LLMException("boom")
    assert isinstance(exc, RuntimeError)
    assert exc.status_code == S.LLM_SUCCESS
    assert str(exc) == "boom"
    exc = LLMException("a", "b", status_code=S.LLM_TIMEOUT)
    assert exc.args == ("a", "b")
    assert exc.status_code is S.LLM_TIMEOUT
    with pytest.raises(AttributeError):
        exc.status_code = S.LLM_FAILED  # type: ignore[misc]


def test_llm_exception_helpers_and_pickle() -> None:
    exc = fail(None, S.LLM_NOT_YET_LINK, "pull_blocks: cluster 3 is not linked")
    assert exc.status_code is S.LLM_NOT_YET_LINK
    assert str(exc) == "pull_blocks: cluster 3 is not linked"
    exc = fail("pull_blocks", S.LLM_NOT_YET_LINK, "cluster 3 is not linked")
    assert str(exc) == (
        "pull_blocks failed, error code is LLMStatusCode.LLM_NOT_YET_LINK, cluster 3 is not linked."
    )
    exc = param_invalid("pull_blocks", "dst_blocks must not be empty")
    assert exc.status_code is PARAM_INVALID
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is LLMException
    assert clone.status_code is PARAM_INVALID
    assert clone.args == exc.args
    assert "status_code=LLMStatusCode.LLM_PARAM_INVALID" in repr(exc)


@pytest.mark.parametrize(
    ("code", "expected"),
    [(0x5010B01A, S.LLM_TIMEOUT), (0x5010B014, S.LLM_FAILED), (12345, S.LLM_FAILED), (-1, -1)],
)
def test_status_from_code_maps_unknown_to_failed(code: int, expected: int) -> None:
    assert status_from_code(code) == expected
    assert isinstance(status_from_code(code), LLMStatusCode)


def test_status() -> None:
    assert Status(S.LLM_SUCCESS).is_ok()
    bad = Status(S.LLM_TIMEOUT)
    assert not bad.is_ok()
    assert bad.status_code is S.LLM_TIMEOUT
    assert bad == Status(S.LLM_TIMEOUT)
    assert bad != Status(S.LLM_SUCCESS)


# ------------------------------------------------------------------------------------------
# _validate


def test_check_isinstance() -> None:
    check_isinstance("x", None, int)
    check_isinstance("x", True, int)  # bool is an int, as in the reference
    check_isinstance("x", [1, 2], (list, tuple), inner=int)
    with pytest.raises(TypeError, match=r"^x must be int, got NoneType$"):
        check_isinstance("x", None, int, allow_none=False)
    with pytest.raises(TypeError, match=r"^addrs must be list or tuple, got str$"):
        check_isinstance("addrs", "ab", [list, tuple])
    with pytest.raises(TypeError, match=r"^addrs\[2\] must be int, got float$"):
        check_isinstance("addrs", [1, 2, 3.0], list, inner=int)
    with pytest.raises(TypeError, match=r"^The first param cluster_id must be int"):
        check_isinstance("cluster_id", "1", int, prefix="The first param ")


def test_check_dict() -> None:
    check_dict("opts", {"a": "b"}, str, str)
    check_dict("opts", None, str, str, allow_none=True)
    with pytest.raises(TypeError, match="opts must be dict, got list"):
        check_dict("opts", [], str, str)
    with pytest.raises(TypeError, match="opts keys must be str, got int"):
        check_dict("opts", {1: "b"}, str, str)
    with pytest.raises(TypeError, match=r"opts\['a'\] must be str, got int"):
        check_dict("opts", {"a": 1}, str, str)


@pytest.mark.parametrize(
    ("check", "low", "high"),
    [
        (check_uint16, 0, 2**16 - 1),
        (check_uint32, 0, 2**32 - 1),
        (check_int32, -(2**31), 2**31 - 1),
        (check_int64, -(2**63), 2**63 - 1),
        (check_uint64, 0, 2**64 - 1),
    ],
)
def test_width_checks(check: Callable[[str, object], None], low: int, high: int) -> None:
    check("v", low)
    check("v", high)
    check("v", True)
    for bad in (low - 1, high + 1):
        with pytest.raises(ValueError, match=rf"v must be a \w+ in \[{low}, {high}\], got {bad}"):
            check("v", bad)
    for wrong in (None, 1.0, "1"):
        with pytest.raises(TypeError, match="v must be int"):
            check("v", wrong)


def test_list_width_check_names_the_index() -> None:
    check_uint64_list("dst_addrs", [0, 1])
    with pytest.raises(ValueError, match=r"dst_addrs\[1\] must be a uint64"):
        check_uint64_list("dst_addrs", [0, -1])


def test_check_layer_range() -> None:
    check_layer_range("r", None)
    check_layer_range("r", range(0, 1))
    with pytest.raises(TypeError, match="r must be range, got NoneType"):
        check_layer_range("r", None, allow_none=False)
    with pytest.raises(TypeError, match="r must be range, got list"):
        check_layer_range("r", [0, 1])
    for bad in (range(0, 4, 2), range(2, 2), range(3, 1), range(-1, 2)):
        with _param_invalid("r must") as excinfo:
            check_layer_range("r", bad)
        _assert_param_invalid(excinfo)


def test_ensure() -> None:
    ensure(True, "never")
    with pytest.raises(LLMException, match=r"^nope$") as excinfo:
        ensure(False, "nope", S.LLM_FEATURE_NOT_ENABLED)
    assert excinfo.value.status_code is S.LLM_FEATURE_NOT_ENABLED


# ------------------------------------------------------------------------------------------
# CacheDesc


def test_cache_desc_defaults_and_properties() -> None:
    shape = [4, 16, 8]
    desc = CacheDesc(2, shape, DataType.DT_FLOAT16)
    assert desc.num_tensors == 2
    assert desc.shape is shape
    assert desc.data_type is DataType.DT_FLOAT16
    assert desc.placement is Placement.DEVICE
    assert (desc.batch_dim, desc.batch_size) == (0, 4)
    assert desc.seq_len_dim_index == -1
    assert desc.kv_tensor_format is None
    assert desc.size == 4 * 16 * 8 * 2


def test_cache_desc_batch_dim_and_repr() -> None:
    desc = CacheDesc(1, (3, 5), DataType.DT_INT8, Placement.HOST, 1, 0, "BSH")
    assert desc.batch_size == 5
    assert repr(desc) == (
        "CacheDesc(num_tensors=1, shape=(3, 5), data_type=DataType.DT_INT8, "
        "placement=Placement.HOST, batch_dim_index=1, seq_len_dim_index=0,"
        "kv_tensor_format=BSH)"
    )


def test_cache_desc_update_dim_invalidates_size() -> None:
    desc = CacheDesc(2, [4, 8], DataType.DT_FLOAT)
    assert desc.size == 128
    desc.update_dim(1, 2)
    assert desc.shape == [4, 2]
    assert desc.size == 32
    tup = CacheDesc(2, (4, 8), DataType.DT_FLOAT)
    tup.update_dim(0, 1)
    assert tup.shape == (1, 8)
    assert (tup.size, tup.batch_size) == (32, 1)
    with _param_invalid(r"update_dim: dim_index 2 out of range \[0, 2\)"):
        tup.update_dim(2, 1)
    with pytest.raises(ValueError, match="dim_value must be a int64"):
        tup.update_dim(0, 2**63)


@pytest.mark.parametrize(
    ("shape", "dtype", "match"),
    [
        ([2, -1], DataType.DT_FLOAT, "failed to calc tensor size"),
        ([2], DataType.DT_STRING, "DT_STRING has no fixed itemsize"),
    ],
)
def test_cache_desc_size_errors(shape: list[int], dtype: DataType, match: str) -> None:
    desc = CacheDesc(1, shape, dtype)
    with _param_invalid(match) as excinfo:
        _ = desc.size
    _assert_param_invalid(excinfo)


def test_cache_desc_zero_tensors_is_accepted() -> None:
    assert CacheDesc(0, [1], DataType.DT_FLOAT).num_tensors == 0


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"num_tensors": "2"}, TypeError, "num_tensors must be int"),
        ({"num_tensors": -1}, ValueError, r"num_tensors must be a uint32"),
        ({"num_tensors": 2**32}, ValueError, r"num_tensors must be a uint32"),
        ({"shape": {4: 1}}, TypeError, "shape must be tuple or list, got dict"),
        ({"shape": None}, TypeError, "shape must be tuple or list, got NoneType"),
        ({"shape": [4, 2.0]}, TypeError, r"shape\[1\] must be int, got float"),
        ({"data_type": 1}, TypeError, "data_type must be DataType, got int"),
        ({"data_type": None}, TypeError, "data_type must be DataType"),
        ({"placement": 1}, TypeError, "placement must be Placement, got int"),
        ({"batch_dim_index": "0"}, TypeError, "batch_dim_index must be int"),
        ({"seq_len_dim_index": 2**31}, ValueError, "seq_len_dim_index must be a int32"),
        ({"kv_tensor_format": 1}, TypeError, "kv_tensor_format must be str, got int"),
        ({"shape": [4, 2**63]}, ValueError, r"shape\[1\] must be a int64"),
    ],
)
def test_cache_desc_type_and_width_errors(kwargs: dict, exc: type, match: str) -> None:
    args = {"num_tensors": 2, "shape": [4, 8], "data_type": DataType.DT_FLOAT, **kwargs}
    with pytest.raises(exc, match=match):
        CacheDesc(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": []}, r"batch_dim_index 0 out of range \[0, 0\)"),
        ({"batch_dim_index": 2}, r"batch_dim_index 2 out of range \[0, 2\)"),
        ({"batch_dim_index": -1}, "batch_dim_index -1 out of range"),
        ({"seq_len_dim_index": 2}, "seq_len_dim_index 2 must be -1 or in"),
        ({"seq_len_dim_index": -2}, "seq_len_dim_index -2 must be -1 or in"),
        ({"shape": [1] * 33}, r"len\(shape\) must be in \[1, 32\], got 33"),
    ],
)
def test_cache_desc_param_invalid(kwargs: dict, match: str) -> None:
    args = {"num_tensors": 2, "shape": [4, 8], "data_type": DataType.DT_FLOAT, **kwargs}
    with _param_invalid(match) as excinfo:
        CacheDesc(**args)
    _assert_param_invalid(excinfo)


def test_cache_desc_validation_order_matches_reference() -> None:
    # A bad shape element type is reported before a bad data_type.
    with pytest.raises(TypeError, match="shape"):
        CacheDesc(1, [1.0], "x")  # type: ignore[arg-type, list-item]
    # Index range (LLMException) is checked before dimension width (ValueError).
    with _param_invalid("batch_dim_index"):
        CacheDesc(1, [2**63], DataType.DT_FLOAT, batch_dim_index=1)
    assert len(CacheDesc(1, [1] * 32, DataType.DT_FLOAT).shape) == 32


# ------------------------------------------------------------------------------------------
# Keys


@pytest.mark.parametrize(
    ("args", "kwargs", "fields"),
    [
        ((1, 2), {}, (1, 2, 0, UINT64_MAX)),
        ((1, 2, 3, 4), {}, (1, 2, 3, 4)),
        ((), {"prompt_cluster_id": 1, "req_id": 2}, (1, 2, 0, UINT64_MAX)),
        ((), {"cluster_id": 1, "req_id": 2, "model_id": 5}, (1, 2, 5, UINT64_MAX)),
        ((7,), {"req_id": UINT64_MAX, "prefix_id": 9}, (7, UINT64_MAX, 0, 9)),
        ((1, 2), {"prefix_id": 3}, (1, 2, 0, 3)),
    ],
)
def test_cache_key_forms(args: tuple, kwargs: dict, fields: tuple) -> None:
    key = CacheKey(*args, **kwargs)
    assert (key.cluster_id, key.req_id, key.model_id, key.prefix_id) == fields
    assert key.prompt_cluster_id == key.cluster_id


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((1, 2, 3, 4), {"prefix_id": 5}, "Param num is over limit"),
        ((1, 2, 3, 4, 5), {}, "Param num is over limit"),
        ((), {"req_id": 1}, "Param prompt_cluster_id or cluster_id is required"),
        ((1,), {}, "Param req_id is required"),
        ((1, 2), {"foo": 1}, "Unsupported param: foo"),
        ((1, 2), {"cluster_id": 3}, "cluster_id given both by position and by keyword"),
        ((), {"cluster_id": 1, "prompt_cluster_id": 1, "req_id": 2}, "only one of cluster_id"),
    ],
)
def test_cache_key_param_errors(args: tuple, kwargs: dict, match: str) -> None:
    with _param_invalid(match) as excinfo:
        CacheKey(*args, **kwargs)
    _assert_param_invalid(excinfo)


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        (("1", 2), TypeError, "cluster_id must be int, got str"),
        ((1, None), TypeError, "req_id must be int, got NoneType"),
        ((1, 2, -1), ValueError, "model_id must be a uint64"),
        ((1, 2, 0, 2**64), ValueError, "prefix_id must be a uint64"),
    ],
)
def test_cache_key_value_errors(args: tuple, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        CacheKey(*args)


def test_keys_are_hashable_and_compare_by_value() -> None:
    assert CacheKey(1, 2) == CacheKey(prompt_cluster_id=1, req_id=2, model_id=0)
    assert CacheKey(1, 2) != CacheKey(1, 3)
    assert len({CacheKey(1, 2), CacheKey(1, 2), CacheKey(1, 2, 1)}) == 2
    assert BlocksCacheKey(1) == BlocksCacheKey(prompt_cluster_id=1, model_id=0)
    assert BlocksCacheKey(1, 1) != BlocksCacheKey(1, 2)
    assert len({BlocksCacheKey(1), BlocksCacheKey(cluster_id=1)}) == 1
    assert CacheKeyByIdAndIndex(1, 2, 3) == CacheKeyByIdAndIndex(1, 2, 3)
    assert CacheKeyByIdAndIndex(1, 2) != CacheKeyByIdAndIndex(1, 2, 1)
    assert len({CacheKeyByIdAndIndex(1, 2), CacheKeyByIdAndIndex(1, 2, 0)}) == 1
    assert CacheKey(1, 0) != BlocksCacheKey(1, 0)
    assert CacheKeyByIdAndIndex(1, 0) != CacheKey(1, 0)


def test_key_reprs() -> None:
    assert repr(CacheKey(1, 2, 3, 4)) == "CacheKey(cluster_id=1, req_id=2, model_id=3, prefix_id=4)"
    assert (
        repr(BlocksCacheKey(prompt_cluster_id=1))
        == "BlocksCacheKey(prompt_cluster_id=1, model_id=0)"
    )
    assert repr(BlocksCacheKey(2, 3)) == "BlocksCacheKey(cluster_id=2, model_id=3)"
    assert repr(CacheKeyByIdAndIndex(1, 2, 3)) == (
        "CacheKeyByIdAndIndex(cluster_id=1, cache_id=2, batch_index=3)"
    )


def test_cache_key_by_id_and_index() -> None:
    key = CacheKeyByIdAndIndex(1, -5)
    assert (key.cluster_id, key.cache_id, key.batch_index) == (1, -5, 0)
    with pytest.raises(ValueError, match="cluster_id must be a uint64"):
        CacheKeyByIdAndIndex(-1, 1)
    with pytest.raises(ValueError, match="cache_id must be a int64"):
        CacheKeyByIdAndIndex(1, 2**63)
    with pytest.raises(ValueError, match="batch_index must be a uint32"):
        CacheKeyByIdAndIndex(1, 1, 2**32)
    with pytest.raises(TypeError, match="cache_id must be int, got NoneType"):
        CacheKeyByIdAndIndex(1, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "kwargs", "fields"),
    [
        ((5,), {}, (5, 0)),
        ((5, 2), {}, (5, 2)),
        ((), {"prompt_cluster_id": 5, "model_id": 1}, (5, 1)),
        ((), {"cluster_id": -3}, (-3, 0)),  # no range check, as in the reference
    ],
)
def test_blocks_cache_key_forms(args: tuple, kwargs: dict, fields: tuple) -> None:
    key = BlocksCacheKey(*args, **kwargs)
    assert (key.cluster_id, key.model_id) == fields
    assert key.prompt_cluster_id == key.cluster_id


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((1, 2, 3), {}, "Param num is over limit"),
        ((1, 2), {"prompt_cluster_id": 1}, "Param num is over limit"),
        ((), {"model_id": 1}, "Param prompt_cluster_id or cluster_id is required"),
        ((1,), {"req_id": 1}, "Unsupported param: req_id"),
    ],
)
def test_blocks_cache_key_param_errors(args: tuple, kwargs: dict, match: str) -> None:
    with _param_invalid(match) as excinfo:
        BlocksCacheKey(*args, **kwargs)
    _assert_param_invalid(excinfo)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("1",), r"^The first param cluster_id must be int, got str$"),
        ((None,), r"^The first param cluster_id must be int, got NoneType$"),
        ((1, 1.5), r"^The second param model_id must be int, got float$"),
    ],
)
def test_blocks_cache_key_type_errors(args: tuple, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        BlocksCacheKey(*args)


def test_keys_are_read_only() -> None:
    key = CacheKey(1, 2)
    with pytest.raises(AttributeError):
        key.req_id = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        key.extra = 1  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------
# Cache


def _host_desc(num_tensors: int = 2) -> CacheDesc:
    return CacheDesc(num_tensors, [4, 8], DataType.DT_FLOAT16, Placement.HOST)


def test_cache_properties_and_invalidate() -> None:
    addrs = [0x1000, 0x2000]
    desc = _host_desc()
    cache = Cache(3, desc, addrs, remote_accessible=True)
    assert (cache.cache_id, cache.cache_desc) == (3, desc)
    assert cache.tensor_addrs == addrs
    assert (cache.is_registered, cache.is_blocks_cache, cache.remote_accessible) == (
        True,
        False,
        True,
    )
    assert "cache_id=3" in repr(cache)
    cache._invalidate()
    assert cache.tensor_addrs == []
    assert addrs == [0x1000, 0x2000]  # the caller's list is untouched
    with pytest.raises(AttributeError):
        cache.remote_accessible = False  # type: ignore[misc]
    with pytest.raises(ValueError, match="cache_id must be a int64"):
        Cache(2**63, desc, addrs)


def test_create_cpu_cache() -> None:
    desc = _host_desc()
    cache = Cache.create_cpu_cache(desc, [1, 2])
    assert cache.cache_id == -1
    assert cache.is_blocks_cache
    assert not cache.is_registered
    assert not cache.remote_accessible
    assert cache.tensor_addrs == [1, 2]
    assert cache._cache_manager is None


@pytest.mark.parametrize(
    ("desc", "addrs", "exc", "match"),
    [
        (None, [1, 2], AttributeError, "cache_desc is None"),
        ("desc", [1, 2], TypeError, "cache_desc must be CacheDesc, got str"),
        (_host_desc(), (1, 2), TypeError, "addrs must be list, got tuple"),
        (_host_desc(), [1, "2"], TypeError, r"addrs\[1\] must be int, got str"),
        (_host_desc(), None, TypeError, "addrs must be list, got NoneType"),
        (CacheDesc(2, [4], DataType.DT_FLOAT), [1, 2], LLMException, "must be Placement.HOST"),
        (_host_desc(), [1], LLMException, r"len\(addrs\) \(1\) must equal .*num_tensors \(2\)"),
    ],
)
def test_create_cpu_cache_errors(desc: object, addrs: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match) as excinfo:
        Cache.create_cpu_cache(desc, addrs)  # type: ignore[arg-type]
    if exc is LLMException:
        _assert_param_invalid(excinfo)


# ------------------------------------------------------------------------------------------
# LLMClusterInfo


def test_cluster_info_defaults() -> None:
    info = LLMClusterInfo()
    assert info.remote_cluster_id is None
    assert info.remote_role_type is None
    assert info.local_ip_info_list == []
    assert info.remote_ip_info_list == []


def test_cluster_info_ipv4_parsing_is_little_endian() -> None:
    info = LLMClusterInfo()
    info.append_local_ip_info("1.2.3.4", 0)
    info.append_remote_ip_info("10.0.0.5", 26000)
    assert info.local_ip_info_list == [(0x04030201, 0)]
    assert info.remote_ip_info_list == [(0x0500000A, 26000)]
    assert info.remote_endpoint() == ("10.0.0.5", 26000)


def test_cluster_info_int_and_ipv6() -> None:
    info = LLMClusterInfo()
    info.append_remote_ip_info(0x0100007F, 1)
    assert info.remote_endpoint() == ("127.0.0.1", 1)
    info6 = LLMClusterInfo()
    info6.append_remote_ip_info("2001:db8:0:0::1", 65535)
    info6.append_local_ip_info("[::1]", 5)
    assert info6.remote_ip_info_list == [("2001:db8::1", 65535)]
    assert info6.local_ip_info_list == [("::1", 5)]
    assert info6.remote_endpoint() == ("2001:db8::1", 65535)


@pytest.mark.parametrize(
    ("ip", "port", "exc", "match"),
    [
        ("1.2.3.400", 1, RuntimeError, r"^Can not parse ip str:1\.2\.3\.400$"),
        ("host.example", 1, RuntimeError, "Can not parse ip str:host.example"),
        (1.5, 1, TypeError, "ip must be str or int, got float"),
        (None, 1, TypeError, "ip must be str or int, got NoneType"),
        ("1.2.3.4", 65536, ValueError, "port must be a uint16"),
        ("1.2.3.4", -1, ValueError, "port must be a uint16"),
        ("1.2.3.4", "80", TypeError, "port must be int, got str"),
        (2**32, 1, ValueError, "ip must be a uint32"),
    ],
)
def test_cluster_info_ip_errors(ip: object, port: object, exc: type, match: str) -> None:
    info = LLMClusterInfo()
    with pytest.raises(exc, match=match):
        info.append_remote_ip_info(ip, port)  # type: ignore[arg-type]
    with pytest.raises(exc, match=match):
        info.append_local_ip_info(ip, port)  # type: ignore[arg-type]
    assert info.remote_ip_info_list == info.local_ip_info_list == []


def test_cluster_info_properties() -> None:
    info = LLMClusterInfo()
    info.remote_cluster_id = UINT64_MAX
    assert info.remote_cluster_id == UINT64_MAX
    with pytest.raises(ValueError, match="remote_cluster_id must be a uint64"):
        info.remote_cluster_id = -1
    with pytest.raises(TypeError, match="remote_cluster_id must be int, got NoneType"):
        info.remote_cluster_id = None  # type: ignore[assignment]
    info.remote_role_type = LLMRole.PROMPT
    assert info.remote_role_type is LLMRole.PROMPT
    info.remote_role_type = 2
    with pytest.raises(TypeError, match="remote_role_type must be LLMRole or int, got str"):
        info.remote_role_type = "PROMPT"  # type: ignore[assignment]
    with pytest.raises(AttributeError):
        info.remote_ip_info_list = []  # type: ignore[misc]


def test_cluster_info_remote_endpoint_needs_an_entry() -> None:
    info = LLMClusterInfo()
    info.remote_cluster_id = 9
    with _param_invalid("remote_cluster_id=9.*remote_ip_info_list is empty") as excinfo:
        info.remote_endpoint()
    _assert_param_invalid(excinfo)


def test_cluster_info_keyword_constructor() -> None:
    info = LLMClusterInfo(remote_cluster_id=1, remote_ip="10.0.0.5", remote_port=26000)
    assert info.remote_cluster_id == 1
    assert info.remote_endpoint() == ("10.0.0.5", 26000)
    with _param_invalid("remote_ip and remote_port"):
        LLMClusterInfo(remote_ip="10.0.0.5")
    with pytest.raises(ValueError, match="remote_cluster_id must be a uint64"):
        LLMClusterInfo(remote_cluster_id=-2)


# ------------------------------------------------------------------------------------------
# MemInfo, LayerSynchronizer


def test_mem_info() -> None:
    info = MemInfo(Memtype.MEM_TYPE_DEVICE, 0x1000, 64)
    assert (info.mem_type, info.addr, info.size) == (Memtype.MEM_TYPE_DEVICE, 0x1000, 64)
    assert repr(info) == "MemInfo(mem_type=Memtype.MEM_TYPE_DEVICE, addr=4096, size=64)"
    with pytest.raises(TypeError, match="mem_type must be Memtype, got int"):
        MemInfo(0, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="addr must be int, got str"):
        MemInfo(Memtype.MEM_TYPE_HOST, "1", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="size must be int, got NoneType"):
        MemInfo(Memtype.MEM_TYPE_HOST, 1, None)  # type: ignore[arg-type]


def test_layer_synchronizer_is_abstract() -> None:
    with pytest.raises(TypeError):
        LayerSynchronizer()  # type: ignore[abstract]

    class Ready(LayerSynchronizer):
        def synchronize_layer(self, layer_index: int, timeout_in_millis: int | None) -> bool:
            return layer_index < 2

    sync = Ready()
    assert sync.synchronize_layer(1, None)
    assert not sync.synchronize_layer(2, None)


# ------------------------------------------------------------------------------------------
# TransferConfig / TransferWithCacheKeyConfig


def test_transfer_config_defaults_and_setters() -> None:
    cfg = TransferConfig(1, [10, 20])
    assert (cfg.dst_cluster_id, cfg.dst_addrs, cfg.src_layer_range, cfg.src_batch_index) == (
        1,
        [10, 20],
        None,
        0,
    )
    assert cfg.dst_layer_range is None
    cfg.src_layer_range = range(1, 2)
    cfg.src_batch_index = 3
    cfg.dst_addrs = (1, 2)
    cfg.dst_cluster_id = 7
    assert (cfg.dst_cluster_id, cfg.dst_addrs, cfg.src_layer_range, cfg.src_batch_index) == (
        7,
        (1, 2),
        range(1, 2),
        3,
    )
    cfg.src_layer_range = None
    assert cfg.src_layer_range is None
    assert "dst_cluster_id=7" in repr(cfg)


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((-1, [1]), ValueError, "dst_cluster_id must be a uint64"),
        ((1, None), TypeError, "dst_addrs must be list or tuple, got NoneType"),
        ((1, [1, "2"]), TypeError, r"dst_addrs\[1\] must be int, got str"),
        ((1, [1, -2]), ValueError, r"dst_addrs\[1\] must be a uint64"),
        ((1, [1], [0, 1]), TypeError, "src_layer_range must be range, got list"),
        ((1, [1], range(0, 4, 2)), LLMException, "src_layer_range must have step 1"),
        ((1, [1], range(3, 3)), LLMException, "src_layer_range must satisfy 0 <= start < stop"),
        ((1, [1], None, -1), ValueError, "src_batch_index must be a uint32"),
    ],
)
def test_transfer_config_errors(args: tuple, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match) as excinfo:
        TransferConfig(*args)
    if exc is LLMException:
        _assert_param_invalid(excinfo)


def test_transfer_config_setters_validate() -> None:
    cfg = TransferConfig(1, [10, 20])
    with pytest.raises(TypeError, match="dst_addrs must be list or tuple"):
        cfg.dst_addrs = None  # type: ignore[assignment]
    with pytest.raises(ValueError, match="dst_cluster_id must be a uint64"):
        cfg.dst_cluster_id = 2**64
    with _param_invalid("src_layer_range must satisfy"):
        cfg.src_layer_range = range(-1, 1)
    with pytest.raises(TypeError, match="src_batch_index must be int"):
        cfg.src_batch_index = None  # type: ignore[assignment]
    assert (cfg.dst_cluster_id, cfg.dst_addrs, cfg.src_layer_range) == (  # type: ignore[comparison-overlap]
        1,
        [10, 20],
        None,
    )


def test_transfer_with_cache_key_config() -> None:
    key = CacheKeyByIdAndIndex(4, 1, 0)
    cfg = TransferWithCacheKeyConfig(key, range(0, 2), range(2, 4), 1)
    assert cfg.cache_key is key
    assert cfg.dst_cluster_id == 4
    assert (cfg.src_layer_range, cfg.dst_layer_range, cfg.src_batch_index) == (
        range(0, 2),
        range(2, 4),
        1,
    )
    cfg.cache_key = CacheKeyByIdAndIndex(5, 1)
    assert cfg.dst_cluster_id == 5
    cfg.src_layer_range = range(1, 3)
    cfg.dst_layer_range = range(0, 2)
    cfg.src_batch_index = 2
    assert (cfg.src_layer_range, cfg.dst_layer_range, cfg.src_batch_index) == (
        range(1, 3),
        range(0, 2),
        2,
    )
    blocks = TransferWithCacheKeyConfig(BlocksCacheKey(6), range(0, 1), range(0, 1))
    assert blocks.dst_cluster_id == 6
    assert "BlocksCacheKey(cluster_id=6" in repr(blocks)


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((None, range(1), range(1)), TypeError, "cache_key must be BlocksCacheKey or"),
        ((CacheKey(1, 1), range(1), range(1)), TypeError, "got CacheKey"),
        ((BlocksCacheKey(1), None, range(1)), TypeError, "src_layer_range must be range"),
        ((BlocksCacheKey(1), range(1), None), TypeError, "dst_layer_range must be range"),
        ((BlocksCacheKey(1), range(0, 2, 2), range(1)), LLMException, "src_layer_range must"),
        ((BlocksCacheKey(1), range(1), range(2, 1)), LLMException, "dst_layer_range must"),
        ((BlocksCacheKey(1), range(0, 2), range(0, 3)), LLMException, "same length"),
        ((BlocksCacheKey(1), range(2, 4), range(0, 3)), LLMException, "same length"),
        ((CacheKeyByIdAndIndex(1, 1), range(1), range(1), -1), ValueError, "src_batch_index"),
        ((BlocksCacheKey(1), range(1), range(1), 1), LLMException, "must be 0 when cache_key"),
    ],
)
def test_transfer_with_cache_key_config_errors(args: tuple, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match) as excinfo:
        TransferWithCacheKeyConfig(*args)
    if exc is LLMException:
        _assert_param_invalid(excinfo)


def test_transfer_with_cache_key_config_setters_validate() -> None:
    cfg = TransferWithCacheKeyConfig(CacheKeyByIdAndIndex(1, 1), range(1), range(1), 3)
    with pytest.raises(TypeError, match="src_layer_range must be range, got NoneType"):
        cfg.src_layer_range = None  # type: ignore[assignment]
    with _param_invalid("dst_layer_range must have step 1"):
        cfg.dst_layer_range = range(0, 4, 2)
    with pytest.raises(TypeError, match="cache_key must be"):
        cfg.cache_key = None  # type: ignore[assignment]
    with _param_invalid("must be 0 when cache_key"):
        cfg.cache_key = BlocksCacheKey(1)
    cfg.src_batch_index = 0
    cfg.cache_key = BlocksCacheKey(1)
    with _param_invalid("must be 0 when cache_key"):
        cfg.src_batch_index = 1
    assert (cfg.src_batch_index, cfg.cache_key) == (0, BlocksCacheKey(1))


# ------------------------------------------------------------------------------------------
# CacheTask


def _done(result: object = None, exc: BaseException | None = None) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
    return fut


@pytest.mark.parametrize(
    ("results", "first"),
    [
        ([S.LLM_SUCCESS, S.LLM_SUCCESS], S.LLM_SUCCESS),
        ([None, S.LLM_SUCCESS], S.LLM_SUCCESS),
        ([S.LLM_SUCCESS, S.LLM_PARAM_INVALID, S.LLM_TIMEOUT], S.LLM_PARAM_INVALID),
        ([None, S.LLM_NOT_YET_LINK], S.LLM_NOT_YET_LINK),
    ],
)
def test_cache_task_done(results: list, first: LLMStatusCode) -> None:
    task = CacheTask(len(results), _done(results))
    assert task.synchronize() is first
    assert task.synchronize(0) is first
    assert task.get_results() == results
    assert task.get_results(10) == results
    assert task.get_results() is not task.get_results()  # callers get their own list


def test_cache_task_timeout_then_completion() -> None:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    task = CacheTask(3, fut)
    assert task.synchronize(0) is S.LLM_TIMEOUT
    assert task.synchronize(20) is S.LLM_TIMEOUT
    assert task.get_results(1) == [S.LLM_TIMEOUT] * 3
    assert "done=False" in repr(task)
    timer = threading.Timer(0.05, fut.set_result, [[S.LLM_SUCCESS, None, S.LLM_SUCCESS]])
    timer.start()
    try:
        assert task.synchronize() is S.LLM_SUCCESS  # None waits until done
    finally:
        timer.join()
    assert task.get_results() == [S.LLM_SUCCESS, None, S.LLM_SUCCESS]


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (LLMException("x", status_code=S.LLM_LINK_BUSY), S.LLM_LINK_BUSY),
        (RuntimeError("x"), S.LLM_FAILED),
        (IndexError("x"), S.LLM_FAILED),
        (TimeoutError("x"), S.LLM_FAILED),
    ],
)
def test_cache_task_exception(exc: BaseException, code: LLMStatusCode) -> None:
    task = CacheTask(2, _done(exc=exc))
    assert task.synchronize() is code
    assert task.get_results(5) == [code, code]


def test_cache_task_cancelled() -> None:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.cancel()
    task = CacheTask(1, fut)
    assert task.synchronize() is S.LLM_FAILED
    assert task.get_results() == [S.LLM_FAILED]


@pytest.mark.parametrize(
    ("timeout", "exc", "match"),
    [
        (-1, ValueError, "timeout_in_millis must be a uint32"),
        (2**32, ValueError, "timeout_in_millis must be a uint32"),
        (1.5, TypeError, "timeout_in_millis must be int, got float"),
        ("10", TypeError, "timeout_in_millis must be int, got str"),
    ],
)
def test_cache_task_timeout_validation(timeout: object, exc: type, match: str) -> None:
    task = CacheTask(1, _done([S.LLM_SUCCESS]))
    with pytest.raises(exc, match=match):
        task.synchronize(timeout)  # type: ignore[arg-type]
    with pytest.raises(exc, match=match):
        task.get_results(timeout)  # type: ignore[arg-type]
