"""LLMConfig option building (spec 4.1) and EngineOptions parsing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dxl.config import (
    EngineOptions,
    LLMConfig,
    LlmConfig,
    PoolConfig,
    listen_from_options,
    parse_listen,
)
from dxl.errors import LLMException, LLMStatusCode

PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
UTIL = {"llm.MemoryUtilization": "0.95"}


def _raises_param_invalid(fn: Any, match: str) -> None:
    with pytest.raises(LLMException, match=match) as excinfo:
        fn()
    assert excinfo.value.status_code == PARAM_INVALID


# ------------------------------------------------------------------------------------------
# LLMConfig


def test_alias_and_defaults() -> None:
    assert LlmConfig is LLMConfig
    cfg = LLMConfig()
    assert cfg.device_id is None
    assert cfg.listen_ip_info == ""
    assert cfg.sync_kv_timeout is None
    assert cfg.ge_options == {}
    assert cfg.enable_cache_manager is False
    assert cfg.enable_remote_cache_accessible is False
    assert (cfg.mem_pool_cfg, cfg.host_mem_pool_cfg, cfg.buf_pool_cfg) == ("", "", "")
    assert (cfg.rdma_traffic_class, cfg.rdma_service_level) == (None, None)
    assert (cfg.link_total_time, cfg.link_retry_count) == (0, 1)
    assert (cfg.local_comm_res, cfg.transfer_backend, cfg.global_resource_config) == ("", "", "")
    assert cfg.enable_switch_role is False
    assert cfg.mem_utilization == 0.95
    assert (cfg.deploy_res_path, cfg.output_max_size, cfg.cluster_info) == ("", None, "")
    assert (cfg.max_registered_addrs, cfg.heartbeat_interval_ms) == (240, 1000)
    assert (cfg.transfer_threads, cfg.allow_remote_listen) == (2, False)
    assert cfg.options == {}
    assert cfg.generate_options() == UTIL


def test_generate_options_returns_the_same_accumulating_dict() -> None:
    cfg = LLMConfig()
    first = cfg.generate_options()
    cfg.device_id = 3
    second = cfg.gen_options()
    assert second is first is cfg.options
    assert second == {"ge.exec.deviceId": "3", "ge.session_device_id": "3", **UTIL}
    with pytest.raises(AttributeError):
        cfg.options = {}  # type: ignore[misc]


def test_repr_does_not_emit_options() -> None:
    cfg = LLMConfig()
    cfg.device_id = 1
    assert "'ge.exec.deviceId': '1'" in repr(cfg)
    assert cfg.options == {}


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        ({"device_id": 0}, {"ge.exec.deviceId": "0", "ge.session_device_id": "0"}),
        (
            {"device_id": [1, 2]},
            {"ge.exec.deviceId": "1;2", "ge.session_device_id": "1"},
        ),
        ({"device_id": (5,)}, {"ge.exec.deviceId": "5", "ge.session_device_id": "5"}),
        ({"listen_ip_info": "10.0.0.1:26000"}, {"llm.listenIpInfo": "10.0.0.1:26000"}),
        ({"listen_ip_info": ""}, {}),
        ({"sync_kv_timeout": 5000}, {"llm.SyncKvCacheWaitTime": "5000"}),
        ({"sync_kv_timeout": "0200"}, {"llm.SyncKvCacheWaitTime": "0200"}),
        ({"enable_cache_manager": True}, {"llm.EnableCacheManager": "1"}),
        ({"enable_cache_manager": False}, {"llm.EnableCacheManager": "0"}),
        ({"enable_remote_cache_accessible": False}, {"llm.EnableRemoteCacheAccessible": "0"}),
        ({"mem_pool_cfg": '{"memory_size": 1}'}, {"llm.MemPoolConfig": '{"memory_size": 1}'}),
        ({"host_mem_pool_cfg": "{}"}, {"llm.HostMemPoolConfig": "{}"}),
        ({"buf_pool_cfg": "{}"}, {"llm.BufPoolCfg": "{}"}),
        ({"rdma_traffic_class": 132}, {"llm.RdmaTrafficClass": "132"}),
        ({"rdma_service_level": 4}, {"llm.RdmaServiceLevel": "4"}),
        ({"link_total_time": 0}, {"llm.LinkTotalTime": "0"}),
        ({"link_retry_count": 100}, {"llm.LinkRetryCount": "100"}),
        ({"transfer_backend": "hixl"}, {"llm.TransferBackend": "hixl"}),
        ({"global_resource_config": ""}, {"llm.GlobalResourceConfig": ""}),
        ({"enable_switch_role": True}, {"llm.EnableSwitchRole": "1"}),
        ({"enable_switch_role": False}, {}),
        ({"deploy_res_path": "/x"}, {"llm.deployResPath": "/x"}),
        ({"output_max_size": 7}, {"llm.OutputMaxSize": "7"}),
        ({"max_registered_addrs": 1000}, {"dxl.MaxRegisterAddrs": "1000"}),
        ({"heartbeat_interval_ms": 250}, {"dxl.HeartbeatIntervalMs": "250"}),
        ({"transfer_threads": 16}, {"dxl.TransferThreads": "16"}),
        ({"allow_remote_listen": True}, {"dxl.AllowRemoteListen": "1"}),
        ({"allow_remote_listen": False}, {"dxl.AllowRemoteListen": "0"}),
        ({"share_registered": True}, {"dxl.ShareRegistered": "1"}),
        ({"share_registered": False}, {"dxl.ShareRegistered": "0"}),
        ({"share_registered": None}, {}),
    ],
)
def test_generate_options_per_property(props: dict[str, Any], expected: dict[str, str]) -> None:
    cfg = LLMConfig()
    for name, value in props.items():
        setattr(cfg, name, value)
    assert cfg.generate_options() == {**expected, **UTIL}


def test_mem_utilization_is_always_emitted() -> None:
    cfg = LLMConfig()
    cfg.mem_utilization = 0.5
    assert cfg.generate_options() == {"llm.MemoryUtilization": "0.5"}


def test_bool_ints_are_emitted_as_numbers() -> None:
    cfg = LLMConfig()
    cfg.device_id = True  # bool passes the int check, as in the reference
    cfg.sync_kv_timeout = True
    opts = cfg.generate_options()
    assert (opts["ge.exec.deviceId"], opts["llm.SyncKvCacheWaitTime"]) == ("1", "1")


def test_local_comm_res_implies_cache_manager_options() -> None:
    cfg = LLMConfig()
    cfg.local_comm_res = ""
    assert cfg.generate_options() == {
        "llm.LocalCommRes": "",
        "llm.EnableCacheManager": "1",
        "llm.EnableRemoteCacheAccessible": "1",
        **UTIL,
    }
    explicit = LLMConfig()
    explicit.local_comm_res = '{"version": "1.3"}'
    explicit.enable_remote_cache_accessible = False
    assert explicit.generate_options() == {
        "llm.LocalCommRes": '{"version": "1.3"}',
        "llm.EnableCacheManager": "1",
        "llm.EnableRemoteCacheAccessible": "0",
        **UTIL,
    }


def test_ge_options_go_first_and_are_overridden() -> None:
    cfg = LLMConfig()
    cfg.ge_options = {"ge.exec.deviceId": "9", "ge.flowGraphMemMaxSize": "1024", "x": "y"}
    cfg.device_id = 1
    assert cfg.generate_options() == {
        "ge.exec.deviceId": "1",
        "ge.session_device_id": "1",
        "ge.flowGraphMemMaxSize": "1024",
        "x": "y",
        **UTIL,
    }


def test_representative_full_config() -> None:
    cfg = LLMConfig()
    cfg.device_id = 0
    cfg.listen_ip_info = "127.0.0.1:26000"
    cfg.sync_kv_timeout = 3000
    cfg.enable_cache_manager = True
    cfg.enable_remote_cache_accessible = True
    cfg.mem_pool_cfg = '{"memory_size": 104857600}'
    cfg.enable_switch_role = True
    cfg.transfer_threads = 4
    assert cfg.generate_options() == {
        "ge.exec.deviceId": "0",
        "ge.session_device_id": "0",
        "llm.listenIpInfo": "127.0.0.1:26000",
        "llm.SyncKvCacheWaitTime": "3000",
        "llm.EnableCacheManager": "1",
        "llm.EnableRemoteCacheAccessible": "1",
        "llm.MemPoolConfig": '{"memory_size": 104857600}',
        "llm.EnableSwitchRole": "1",
        "llm.MemoryUtilization": "0.95",
        "dxl.TransferThreads": "4",
    }
    opts = EngineOptions.from_options(cfg.generate_options())
    assert opts.device_id == 0
    assert opts.listen == ("127.0.0.1", 26000)
    assert opts.sync_kv_timeout_ms == 3000
    assert opts.enable_cache_manager and opts.enable_remote_cache_accessible
    # llm.MemPoolConfig is validated but fills no field: DEVICE pools wait for the cuda transport.
    assert opts.raw["llm.MemPoolConfig"] == '{"memory_size": 104857600}'
    assert opts.transfer_threads == 4


def test_cluster_info_converts_ips() -> None:
    cfg = LLMConfig()
    cfg.cluster_info = json.dumps(
        {"cluster_id": 1, "listen_ip_info": [{"ip": "1.2.3.4", "port": 1}]}
    )
    assert json.loads(cfg.cluster_info)["listen_ip_info"] == [{"ip": 0x04030201, "port": 1}]
    assert "llm.ClusterInfo" in cfg.generate_options()
    with pytest.raises(RuntimeError, match="Can not parse ip str:bad"):
        cfg.cluster_info = json.dumps({"listen_ip_info": [{"ip": "bad", "port": 1}]})
    _raises_param_invalid(lambda: setattr(cfg, "cluster_info", "{"), "cluster_info must be JSON")


def test_none_resets_reference_optional_properties() -> None:
    cfg = LLMConfig()
    cfg.enable_cache_manager = True
    cfg.enable_cache_manager = None
    cfg.local_comm_res = "x"
    cfg.local_comm_res = None
    cfg.device_id = 2
    cfg.device_id = None
    assert (cfg.enable_cache_manager, cfg.local_comm_res, cfg.device_id) == (False, "", None)
    assert cfg.generate_options() == UTIL


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("device_id", "0", "device_id must be list or tuple or int, got str"),
        ("device_id", [0, "1"], r"device_id\[1\] must be int, got str"),
        ("listen_ip_info", 26000, "listen_ip_info must be str, got int"),
        ("sync_kv_timeout", 1.5, "sync_kv_timeout must be int or str, got float"),
        ("ge_options", [("a", "b")], "ge_options must be dict, got list"),
        ("ge_options", {"a": 1}, r"ge_options\['a'\] must be str, got int"),
        ("ge_options", {1: "a"}, "ge_options keys must be str, got int"),
        ("enable_cache_manager", 1, "enable_cache_manager must be bool, got int"),
        ("enable_remote_cache_accessible", "1", "enable_remote_cache_accessible must be bool"),
        ("mem_pool_cfg", {}, "mem_pool_cfg must be str, got dict"),
        ("host_mem_pool_cfg", 1, "host_mem_pool_cfg must be str"),
        ("buf_pool_cfg", 1, "buf_pool_cfg must be str"),
        ("rdma_traffic_class", None, "rdma_traffic_class must be int, got NoneType"),
        ("rdma_service_level", "4", "rdma_service_level must be int, got str"),
        ("link_total_time", "1", "link_total_time must be int, got str"),
        ("link_retry_count", None, "link_retry_count must be int, got NoneType"),
        ("local_comm_res", {}, "local_comm_res must be str"),
        ("transfer_backend", 1, "transfer_backend must be str"),
        ("global_resource_config", 1, "global_resource_config must be str"),
        ("enable_switch_role", 1, "enable_switch_role must be bool, got int"),
        ("mem_utilization", 1, "mem_utilization must be float, got int"),
        ("deploy_res_path", 1, "deploy_res_path must be str"),
        ("output_max_size", "1", "output_max_size must be int"),
        ("cluster_info", {}, "cluster_info must be str"),
        ("max_registered_addrs", None, "max_registered_addrs must be int, got NoneType"),
        ("heartbeat_interval_ms", 1.0, "heartbeat_interval_ms must be int, got float"),
        ("transfer_threads", "2", "transfer_threads must be int, got str"),
        ("allow_remote_listen", None, "allow_remote_listen must be bool, got NoneType"),
        ("share_registered", 1, "share_registered must be bool, got int"),
    ],
)
def test_setter_type_errors(name: str, value: Any, match: str) -> None:
    cfg = LLMConfig()
    with pytest.raises(TypeError, match=match):
        setattr(cfg, name, value)


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("device_id", 2**31, "device_id must be a int32"),
        ("device_id", [0, 2**31], "device_id must be a int32"),
        ("sync_kv_timeout", 2**31, "sync_kv_timeout must be a int32"),
        ("sync_kv_timeout", str(2**31), "sync_kv_timeout must be a int32"),
        ("rdma_traffic_class", 2**32, "rdma_traffic_class must be a uint32"),
        ("rdma_service_level", -1, "rdma_service_level must be a uint32"),
        ("heartbeat_interval_ms", 2**31, "heartbeat_interval_ms must be a int32"),
    ],
)
def test_setter_value_errors(name: str, value: Any, match: str) -> None:
    cfg = LLMConfig()
    with pytest.raises(ValueError, match=match):
        setattr(cfg, name, value)


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("device_id", -1, "device_id should be greater than or equal to zero"),
        ("device_id", [0, -1], "device_id should be greater than or equal to zero"),
        ("device_id", [], "device_id must not be an empty list"),
        ("sync_kv_timeout", "12a", "sync_kv_timeout must be digit"),
        ("sync_kv_timeout", "", "sync_kv_timeout must be digit"),
        ("sync_kv_timeout", "-5", "sync_kv_timeout must be digit"),
        ("sync_kv_timeout", 0, "sync_kv_timeout should be greater than zero"),
        ("sync_kv_timeout", "0", "sync_kv_timeout should be greater than zero"),
        ("link_total_time", -1, r"link_total_time should be an integer between \[0, 2\^32-1\]"),
        ("link_total_time", 2**32, "link_total_time should be an integer between"),
        ("link_retry_count", 0, r"link_retry_count should be an integer between \[1, 100\]"),
        ("link_retry_count", 101, "link_retry_count should be an integer between"),
        ("mem_utilization", 1.5, r"mem_utilization must be in range \[0,1\]"),
        ("mem_utilization", -0.1, "mem_utilization must be in range"),
        ("max_registered_addrs", 0, "max_registered_addrs must be >= 1, got 0"),
        ("heartbeat_interval_ms", 0, "heartbeat_interval_ms must be > 0, got 0"),
        ("transfer_threads", 0, r"transfer_threads must be in \[1, 16\], got 0"),
        ("transfer_threads", 17, r"transfer_threads must be in \[1, 16\], got 17"),
    ],
)
def test_setter_param_invalid(name: str, value: Any, match: str) -> None:
    cfg = LLMConfig()
    _raises_param_invalid(lambda: setattr(cfg, name, value), match)
    assert cfg.generate_options() == UTIL  # nothing was stored


def test_transfer_threads_bound_is_the_native_pools() -> None:
    """The documented and enforced bound is what the native pool provides (the calling thread
    plus its workers), read from the shim: a larger value would be clamped there silently."""
    from dxl import _ffi
    from dxl.config import MAX_TRANSFER_THREADS

    assert MAX_TRANSFER_THREADS == _ffi.lib.DXL_MAX_THREADS == 16
    assert f"1..{MAX_TRANSFER_THREADS}" in (LLMConfig.transfer_threads.doc or "")
    cfg = LLMConfig()
    cfg.transfer_threads = MAX_TRANSFER_THREADS
    assert EngineOptions.from_options(cfg.generate_options()).transfer_threads == 16
    _raises_param_invalid(
        lambda: EngineOptions.from_options({"dxl.TransferThreads": str(MAX_TRANSFER_THREADS + 1)}),
        r"option dxl.TransferThreads must be in \[1, 16\], got 17",
    )


def test_handoff_settings_are_engine_options() -> None:
    """The handoff's user settings live in the option table; the handoff gets only them, and
    dxl/handoff/defaults.py's names are the table's defaults."""
    from dxl.config import HandoffSettings
    from dxl.handoff import defaults

    assert EngineOptions().handoff == HandoffSettings(30.0, 30.0, 64)
    assert (defaults.DEFAULT_LEASE_S, defaults.DEFAULT_FETCH_TIMEOUT_S) == (30.0, 30.0)
    assert defaults.DEFAULT_MAX_FETCHES == 64
    opts = EngineOptions.from_options(
        {
            "dxl.HandoffLeaseS": "12.5",
            "dxl.HandoffFetchTimeoutS": "3",
            "dxl.HandoffMaxFetches": "8",
        }
    )
    assert opts.handoff == HandoffSettings(lease_s=12.5, fetch_timeout_s=3.0, max_fetches=8)


# ------------------------------------------------------------------------------------------
# EngineOptions


def test_engine_options_defaults() -> None:
    opts = EngineOptions.from_options({})
    assert opts == EngineOptions()
    assert opts.device_id is None
    assert opts.listen is None
    assert opts.sync_kv_timeout_ms == 1000
    assert not opts.enable_cache_manager
    assert not opts.enable_remote_cache_accessible
    assert opts.host_mem_pool is None
    assert (opts.max_registered_addrs, opts.heartbeat_interval_ms) == (240, 1000)
    assert (opts.transfer_threads, opts.allow_remote_listen) == (2, False)
    assert opts.share_registered is None  # unset: automatic, see dxl/memory/pins.py
    assert opts.raw == {}


def test_engine_options_parse_everything() -> None:
    options = {
        "ge.exec.deviceId": "3",
        "ge.session_device_id": "3",
        "llm.listenIpInfo": "[2001:db8::0:1]:26000",
        "llm.SyncKvCacheWaitTime": "2500",
        "llm.EnableCacheManager": "1",
        "llm.EnableRemoteCacheAccessible": "0",
        "llm.MemPoolConfig": '{"memory_size": 104857600, "page_shift": 21}',
        "llm.HostMemPoolConfig": '{"memory_size": 4096}',
        "dxl.MaxRegisterAddrs": "1000",
        "dxl.HeartbeatIntervalMs": "200",
        "dxl.TransferThreads": "8",
        "dxl.AllowRemoteListen": "1",
        "llm.LinkTotalTime": "30",
        "llm.LinkRetryCount": "3",
        "llm.RdmaTrafficClass": "132",
        "ge.flowGraphMemMaxSize": "1073741824",
        "some.unknown.Key": "kept",
    }
    opts = EngineOptions.from_options(options)
    assert opts.device_id == 3
    assert opts.listen == ("2001:db8::1", 26000)
    assert opts.sync_kv_timeout_ms == 2500
    assert opts.enable_cache_manager and not opts.enable_remote_cache_accessible
    # llm.MemPoolConfig, llm.LinkTotalTime and llm.LinkRetryCount are validated (see
    # test_engine_options_param_invalid) but fill no field: dxl does not use them.
    assert opts.host_mem_pool == PoolConfig(memory_size=4096, page_shift=16)
    assert PoolConfig.from_json(options["llm.MemPoolConfig"], "k").page_size == 2 * 1024 * 1024
    assert (opts.max_registered_addrs, opts.heartbeat_interval_ms) == (1000, 200)
    assert (opts.transfer_threads, opts.allow_remote_listen) == (8, True)
    assert opts.raw == options
    assert opts.raw is not options
    with pytest.raises(AttributeError):
        opts.device_id = 1  # type: ignore[misc]


def test_engine_options_does_not_modify_the_callers_dict() -> None:
    options = {"llm.listenIpInfo": "127.0.0.1:1"}
    EngineOptions.from_options(options).raw["x"] = "y"
    assert options == {"llm.listenIpInfo": "127.0.0.1:1"}


@pytest.mark.parametrize(
    ("options", "cache_manager", "remote_accessible"),
    [
        ({"llm.LocalCommRes": ""}, True, True),
        ({"llm.LocalCommRes": "", "llm.EnableRemoteCacheAccessible": "0"}, True, False),
        (
            {"llm.TransferBackend": "hixl", "llm.listenIpInfo": "127.0.0.1:5"},
            False,
            True,
        ),
        ({"llm.EnableCacheManager": "1"}, True, False),
    ],
)
def test_engine_options_implied_flags(
    options: dict[str, str], cache_manager: bool, remote_accessible: bool
) -> None:
    opts = EngineOptions.from_options(options)
    assert (opts.enable_cache_manager, opts.enable_remote_cache_accessible) == (
        cache_manager,
        remote_accessible,
    )


def test_engine_options_session_device_id_fallback() -> None:
    assert EngineOptions.from_options({"ge.session_device_id": "2"}).device_id == 2


@pytest.mark.parametrize(
    ("options", "exc", "match"),
    [
        ([("a", "b")], TypeError, "options must be dict, got list"),
        ({"llm.SyncKvCacheWaitTime": 1000}, TypeError, r"options\['llm.SyncKvCacheWaitTime'\]"),
        ({1: "x"}, TypeError, "options keys must be str, got int"),
        ({"llm.listenIpInfo": None}, TypeError, r"options\['llm.listenIpInfo'\] must be str"),
    ],
)
def test_engine_options_type_errors(options: Any, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        EngineOptions.from_options(options)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"llm.SyncKvCacheWaitTime": "abc"}, "llm.SyncKvCacheWaitTime must be a decimal"),
        ({"llm.SyncKvCacheWaitTime": "0"}, r"llm.SyncKvCacheWaitTime must be in \[1, "),
        ({"llm.SyncKvCacheWaitTime": "-1"}, "llm.SyncKvCacheWaitTime must be a decimal"),
        ({"llm.SyncKvCacheWaitTime": str(2**31)}, "llm.SyncKvCacheWaitTime must be in"),
        ({"ge.exec.deviceId": "0;1"}, "ge.exec.deviceId: one device per process"),
        ({"ge.exec.deviceId": "x"}, "ge.exec.deviceId must be a decimal"),
        ({"llm.EnableCacheManager": "true"}, 'llm.EnableCacheManager must be "0" or "1"'),
        ({"dxl.AllowRemoteListen": "yes"}, 'dxl.AllowRemoteListen must be "0" or "1"'),
        ({"dxl.ShareRegistered": "on"}, 'dxl.ShareRegistered must be "0" or "1"'),
        ({"dxl.TransferThreads": "17"}, r"dxl.TransferThreads must be in \[1, 16\], got 17"),
        ({"dxl.TransferThreads": "0"}, r"dxl.TransferThreads must be in \[1, 16\]"),
        ({"dxl.HandoffLeaseS": "0"}, r"dxl.HandoffLeaseS must be in \(0, 86400\] seconds"),
        ({"dxl.HandoffLeaseS": "86400.5"}, r"dxl.HandoffLeaseS must be in \(0, 86400\]"),
        ({"dxl.HandoffLeaseS": "nan"}, r"dxl.HandoffLeaseS must be in \(0, 86400\]"),
        ({"dxl.HandoffLeaseS": "soon"}, "dxl.HandoffLeaseS must be a number"),
        ({"dxl.HandoffFetchTimeoutS": "-1"}, r"dxl.HandoffFetchTimeoutS must be in \(0, 86400\]"),
        ({"dxl.HandoffFetchTimeoutS": "inf"}, r"dxl.HandoffFetchTimeoutS must be in \(0, 86400\]"),
        ({"dxl.HandoffMaxFetches": "-1"}, "dxl.HandoffMaxFetches must be a decimal"),
        (
            {"dxl.HandoffMaxFetches": str(2**32)},
            r"dxl.HandoffMaxFetches must be in \[0, 4294967295\]",
        ),
        ({"dxl.MaxRegisterAddrs": "0"}, "dxl.MaxRegisterAddrs must be in"),
        ({"dxl.HeartbeatIntervalMs": "0"}, "dxl.HeartbeatIntervalMs must be in"),
        ({"llm.LinkRetryCount": "101"}, r"llm.LinkRetryCount must be in \[1, 100\]"),
        ({"llm.LinkTotalTime": str(2**32)}, "llm.LinkTotalTime must be in"),
        ({"llm.RdmaTrafficClass": "x"}, "llm.RdmaTrafficClass must be a decimal"),
        ({"llm.MemoryUtilization": "x"}, "llm.MemoryUtilization must be a number"),
        ({"llm.MemoryUtilization": "1.5"}, r"llm.MemoryUtilization must be in \[0, 1\]"),
        ({"ge.flowGraphMemMaxSize": "1,2"}, "ge.flowGraphMemMaxSize must be one decimal"),
        ({"llm.TransferBackend": "ucx"}, 'llm.TransferBackend must be "hixl"'),
        ({"llm.TransferBackend": "hixl"}, "hixl requires llm.listenIpInfo"),
        (
            {
                "llm.TransferBackend": "hixl",
                "llm.listenIpInfo": "127.0.0.1:1",
                "llm.EnableRemoteCacheAccessible": "0",
            },
            "hixl requires llm.EnableRemoteCacheAccessible=1",
        ),
        ({"llm.listenIpInfo": "127.0.0.1"}, "listen_ip_info must be 'ip:port'"),
    ],
)
def test_engine_options_param_invalid(options: dict[str, str], match: str) -> None:
    _raises_param_invalid(lambda: EngineOptions.from_options(options), match)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("not json", "llm.MemPoolConfig must be JSON"),
        ("[1]", "llm.MemPoolConfig must be a JSON object"),
        ("{}", "llm.MemPoolConfig: memory_size must be an integer > 0, got None"),
        ('{"memory_size": 0}', "memory_size must be an integer > 0, got 0"),
        ('{"memory_size": -5}', "memory_size must be an integer > 0"),
        ('{"memory_size": "1024"}', "memory_size must be an integer > 0"),
        ('{"memory_size": true}', "memory_size must be an integer > 0, got True"),
        ('{"memory_size": 1.5}', "memory_size must be an integer > 0"),
        ('{"memory_size": 1024, "page_shift": 9}', r"page_shift must be an integer in \[10, 31\)"),
        ('{"memory_size": 1024, "page_shift": 31}', "page_shift must be an integer in"),
        ('{"memory_size": 1024, "page_shift": "16"}', "page_shift must be an integer in"),
    ],
)
def test_pool_config_errors(text: str, match: str) -> None:
    _raises_param_invalid(lambda: EngineOptions.from_options({"llm.MemPoolConfig": text}), match)


def test_pool_config_bounds_and_host_pool_name() -> None:
    assert PoolConfig.from_json('{"memory_size": 1, "page_shift": 10}', "k").page_size == 1024
    assert PoolConfig.from_json('{"memory_size": 1, "page_shift": 30}', "k").page_shift == 30
    _raises_param_invalid(
        lambda: EngineOptions.from_options({"llm.HostMemPoolConfig": "{}"}),
        "llm.HostMemPoolConfig: memory_size",
    )
    assert EngineOptions.from_options({"llm.HostMemPoolConfig": ""}).host_mem_pool is None
    EngineOptions.from_options({"llm.MemPoolConfig": ""})  # "" = no pool, not a JSON error


# ------------------------------------------------------------------------------------------
# Listen address parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:26000", ("127.0.0.1", 26000)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("10.1.2.3:65535", ("10.1.2.3", 65535)),
        ("[::1]:80", ("::1", 80)),
        ("[fe80:0:0:0::1]:1", ("fe80::1", 1)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected
    assert listen_from_options({"llm.listenIpInfo": text}) == expected


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1",
        ":80",
        "127.0.0.1:",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:8a",
        "localhost:80",
        "1.2.3:80",
        "::1:80",
        "[::1:80",
        "[zz::1]:80",
        "[127.0.0.1]:80",
    ],
)
def test_parse_listen_rejects(text: str) -> None:
    _raises_param_invalid(lambda: parse_listen(text), "listen_ip_info")
    _raises_param_invalid(lambda: listen_from_options({"llm.listenIpInfo": text}), "listen_ip_info")


def test_listen_from_options_absent_or_empty() -> None:
    assert listen_from_options({}) is None
    assert listen_from_options({"llm.listenIpInfo": ""}) is None
    assert listen_from_options({"other": "1.2.3.4:5"}) is None
    with pytest.raises(TypeError, match=r"llm\.listenIpInfo must be str, got int"):
        listen_from_options({"llm.listenIpInfo": 5})


def test_transport_and_secret_options(monkeypatch):
    cfg = LLMConfig()
    cfg.transport = "tcp"
    cfg.auth_token = "s3cret"
    opts = cfg.generate_options()
    assert opts["dxl.Transport"] == "tcp" and opts["dxl.AuthToken"] == "s3cret"
    assert "s3cret" not in repr(cfg)
    parsed = EngineOptions.from_options(opts)
    assert (parsed.transport, parsed.auth_token) == ("tcp", "s3cret")
    assert "s3cret" not in repr(parsed)
    with pytest.raises(LLMException, match="transport"):
        cfg.transport = "rdma"
    monkeypatch.setenv("DXL_TRANSPORT", "cma")
    monkeypatch.setenv("DXL_AUTH_TOKEN", "from-env")
    parsed = EngineOptions.from_options({})
    assert (parsed.transport, parsed.auth_token) == ("cma", "from-env")
    monkeypatch.setenv("DXL_TRANSPORT", "bogus")
    with pytest.raises(LLMException, match="DXL_TRANSPORT"):
        EngineOptions.from_options({})
