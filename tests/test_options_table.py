"""The option table in dxl/config.py agrees with LLMConfig, EngineOptions and the docs."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import pytest

from dxl.config import OPTIONS, EngineOptions, LLMConfig, PoolConfig, Prop

NO_FIELD = object()  # the option is accepted (and validated) without effect

# One case per table entry, by its first key: what to set on an LLMConfig (properties, or
# ge_options for keys without one), and the EngineOptions field value it must come back as.
# Each field value differs from the field's default, so the value really travelled.
ROUND_TRIP: dict[str, tuple[dict[str, Any], Any]] = {
    "ge.flowGraphMemMaxSize": ({"ge_options": {"ge.flowGraphMemMaxSize": "1024"}}, NO_FIELD),
    "dxl.InlineBytes": ({"ge_options": {"dxl.InlineBytes": "0"}}, 0),
    "dxl.HandoffLeaseS": ({"ge_options": {"dxl.HandoffLeaseS": "2.5"}}, 2.5),
    "dxl.HandoffFetchTimeoutS": ({"ge_options": {"dxl.HandoffFetchTimeoutS": "86400"}}, 86400.0),
    "dxl.HandoffMaxFetches": ({"ge_options": {"dxl.HandoffMaxFetches": "0"}}, 0),
    "ge.exec.deviceId": ({"device_id": 3}, 3),
    "llm.listenIpInfo": ({"listen_ip_info": "[::1]:26000"}, ("::1", 26000)),
    "llm.SyncKvCacheWaitTime": ({"sync_kv_timeout": "0250"}, 250),
    "llm.EnableCacheManager": ({"enable_cache_manager": True}, True),
    "llm.EnableRemoteCacheAccessible": ({"enable_remote_cache_accessible": True}, True),
    "llm.MemPoolConfig": ({"mem_pool_cfg": '{"memory_size": 4096}'}, NO_FIELD),
    "llm.HostMemPoolConfig": (
        {"host_mem_pool_cfg": '{"memory_size": 8192, "page_shift": 12}'},
        PoolConfig(memory_size=8192, page_shift=12),
    ),
    "llm.BufPoolCfg": ({"buf_pool_cfg": '{"buf_cfg": []}'}, NO_FIELD),
    "llm.RdmaTrafficClass": ({"rdma_traffic_class": 132}, NO_FIELD),
    "llm.RdmaServiceLevel": ({"rdma_service_level": 4}, NO_FIELD),
    "llm.LinkTotalTime": ({"link_total_time": 30}, 30),
    "llm.LinkRetryCount": ({"link_retry_count": 3}, NO_FIELD),
    "llm.LocalCommRes": ({"local_comm_res": ""}, NO_FIELD),
    "llm.TransferBackend": (
        {"transfer_backend": "hixl", "listen_ip_info": "127.0.0.1:0"},
        NO_FIELD,
    ),
    "llm.GlobalResourceConfig": ({"global_resource_config": "{}"}, NO_FIELD),
    "llm.EnableSwitchRole": ({"enable_switch_role": True}, NO_FIELD),
    "llm.MemoryUtilization": ({"mem_utilization": 0.5}, NO_FIELD),
    "llm.deployResPath": ({"deploy_res_path": "/x"}, NO_FIELD),
    "llm.OutputMaxSize": ({"output_max_size": 7}, NO_FIELD),
    "llm.ClusterInfo": ({"cluster_info": '{"cluster_id": 1}'}, NO_FIELD),
    "dxl.MaxRegisterAddrs": ({"max_registered_addrs": 1000}, 1000),
    "dxl.HeartbeatIntervalMs": ({"heartbeat_interval_ms": 250}, 250),
    "dxl.TransferThreads": ({"transfer_threads": 8}, 8),
    "dxl.AllowRemoteListen": ({"allow_remote_listen": True}, True),
    "dxl.Transport": ({"transport": "tcp"}, "tcp"),
    "dxl.ShareRegistered": ({"share_registered": True}, True),
    "dxl.NixlAllowEmulated": ({"ge_options": {"dxl.NixlAllowEmulated": "1"}}, True),
    "dxl.AuthToken": ({"auth_token": "s3cret"}, "s3cret"),
    "dxl.RankTableBasePort": ({"rank_table_base_port": 31000}, 31000),
}

PROPS = [opt for opt in OPTIONS if isinstance(opt, Prop)]
ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineOptions)}


def test_table_fields_are_engine_option_fields() -> None:
    table_fields = [opt.field for opt in OPTIONS if opt.field is not None]
    assert len(table_fields) == len(set(table_fields)), "two entries fill one field"
    assert set(table_fields) <= ENGINE_FIELDS
    assert ENGINE_FIELDS - {"raw"} <= set(table_fields), "a field no option fills"


def test_every_property_is_a_table_entry() -> None:
    public = {n for n in vars(LLMConfig) if not n.startswith("_")}
    methods = {"options", "generate_options", "gen_options"}
    assert public - methods == {p.name for p in PROPS}


def test_keys_belong_to_one_entry_and_implied_keys_to_properties() -> None:
    keys = [k for opt in OPTIONS for k in opt.keys]
    assert len(keys) == len(set(keys))
    prop_keys = {k for p in PROPS for k in p.keys}
    for opt in OPTIONS:
        assert set(opt.implies) <= prop_keys, opt


@pytest.mark.parametrize("first_key", list(ROUND_TRIP))
def test_round_trip(first_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DXL_TRANSPORT", raising=False)
    monkeypatch.delenv("DXL_AUTH_TOKEN", raising=False)
    (entry,) = [opt for opt in OPTIONS if opt.keys[:1] == (first_key,)]
    settings, expected = ROUND_TRIP[first_key]
    cfg = LLMConfig()
    for name, value in settings.items():
        setattr(cfg, name, value)
    emitted = cfg.generate_options()
    assert set(entry.keys) <= set(emitted)
    parsed = EngineOptions.from_options(emitted)
    assert parsed.raw == emitted
    if expected is NO_FIELD:
        assert entry.field is None
    else:
        assert entry.field is not None
        assert getattr(parsed, entry.field) == expected
        assert getattr(EngineOptions(), entry.field) != expected


def test_round_trip_covers_every_key() -> None:
    assert set(ROUND_TRIP) == {opt.keys[0] for opt in OPTIONS if opt.keys}
    keyless = [opt for opt in OPTIONS if not opt.keys]
    assert [getattr(opt, "name", None) for opt in keyless] == ["ge_options"]


def test_secrets_are_masked() -> None:
    secrets = [p for p in PROPS if p.secret]
    assert secrets
    cfg = LLMConfig()
    for prop in secrets:
        setattr(cfg, prop.name, "hunter2-" + prop.name)
    text = repr(cfg)
    for prop in secrets:
        assert "hunter2-" + prop.name not in text
        assert f"'{prop.keys[0]}': '***'" in text


def test_properties_have_their_doc() -> None:
    for prop in PROPS:
        assert prop.doc and "\n" not in prop.doc, prop
        assert LLMConfig.__dict__[prop.name].__doc__ == prop.doc


DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def test_compatibility_doc_lists_every_option() -> None:
    text = (DOCS / "compatibility.md").read_text()
    for opt in OPTIONS:
        for key in opt.keys:
            assert f"`{key}`" in text, key
        if isinstance(opt, Prop):
            assert f"`{opt.name}`" in text, opt.name


def test_transport_names_come_from_the_openers() -> None:
    """dxl.Transport accepts "auto" and exactly the transports select.py can open: a new
    opener is accepted by the option without a second list to edit."""
    from dxl.config import TRANSPORTS
    from dxl.transport.select import AUTO_ORDER, OPENERS

    assert ("auto", *AUTO_ORDER) == TRANSPORTS[: len(AUTO_ORDER) + 1]
    assert set(TRANSPORTS) - {"auto"} == set(OPENERS)
    assert "nixl" in OPENERS and "nixl" not in AUTO_ORDER  # only when named
    for name in TRANSPORTS:
        assert EngineOptions.from_options({"dxl.Transport": name}).transport == name
