"""Engine options: the reference's ``LLMConfig`` builder and dxl's parsed ``EngineOptions``.

``LLMConfig`` (spec 4.1) turns properties into the ``Dict[str, str]`` that ``init`` takes.
``EngineOptions.from_options`` turns such a dict back into typed, validated settings for the
engine. Keys the engine does not use (Ascend-only ones, unknown ones) are kept in
``EngineOptions.raw`` and otherwise ignored.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from dxl._validate import (
    INT32_MAX,
    UINT16_MAX,
    UINT32_MAX,
    check_dict,
    check_int32,
    check_isinstance,
    check_uint32,
    ensure,
)
from dxl.errors import param_invalid
from dxl.types import ipv6_or_none, parse_ip

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL_MS",
    "DEFAULT_MAX_REGISTERED_ADDRS",
    "DEFAULT_SYNC_KV_TIMEOUT_MS",
    "DEFAULT_TRANSFER_THREADS",
    "MAX_TRANSFER_THREADS",
    "EngineOptions",
    "LLMConfig",
    "LlmConfig",
    "PoolConfig",
    "listen_from_options",
    "parse_listen",
]

DEFAULT_SYNC_KV_TIMEOUT_MS = 1000
DEFAULT_MAX_REGISTERED_ADDRS = 240
DEFAULT_HEARTBEAT_INTERVAL_MS = 1000
DEFAULT_TRANSFER_THREADS = 2
MAX_TRANSFER_THREADS = 64
_DEFAULT_MEM_UTILIZATION = 0.95
_MAX_LINK_RETRY_COUNT = 100

# Option keys (the reference's spelling).
OPT_DEVICE_ID = "ge.exec.deviceId"
OPT_SESSION_DEVICE_ID = "ge.session_device_id"
OPT_LISTEN_IP_INFO = "llm.listenIpInfo"
OPT_SYNC_KV_TIMEOUT = "llm.SyncKvCacheWaitTime"
OPT_ENABLE_CACHE_MANAGER = "llm.EnableCacheManager"
OPT_ENABLE_REMOTE_CACHE_ACCESSIBLE = "llm.EnableRemoteCacheAccessible"
OPT_MEM_POOL = "llm.MemPoolConfig"
OPT_HOST_MEM_POOL = "llm.HostMemPoolConfig"
OPT_BUF_POOL = "llm.BufPoolCfg"
OPT_RDMA_TRAFFIC_CLASS = "llm.RdmaTrafficClass"
OPT_RDMA_SERVICE_LEVEL = "llm.RdmaServiceLevel"
OPT_LINK_TOTAL_TIME = "llm.LinkTotalTime"
OPT_LINK_RETRY_COUNT = "llm.LinkRetryCount"
OPT_LOCAL_COMM_RES = "llm.LocalCommRes"
OPT_TRANSFER_BACKEND = "llm.TransferBackend"
OPT_GLOBAL_RESOURCE_CONFIG = "llm.GlobalResourceConfig"
OPT_ENABLE_SWITCH_ROLE = "llm.EnableSwitchRole"
OPT_MEM_UTILIZATION = "llm.MemoryUtilization"
OPT_DEPLOY_RES_PATH = "llm.deployResPath"
OPT_OUTPUT_MAX_SIZE = "llm.OutputMaxSize"
OPT_CLUSTER_INFO = "llm.ClusterInfo"
OPT_FLOW_GRAPH_MEM_MAX_SIZE = "ge.flowGraphMemMaxSize"
# dxl extensions.
OPT_MAX_REGISTER_ADDRS = "dxl.MaxRegisterAddrs"
OPT_HEARTBEAT_INTERVAL_MS = "dxl.HeartbeatIntervalMs"
OPT_TRANSFER_THREADS = "dxl.TransferThreads"
OPT_ALLOW_REMOTE_LISTEN = "dxl.AllowRemoteListen"
OPT_TRANSPORT = "dxl.Transport"
OPT_INLINE_BYTES = "dxl.InlineBytes"
OPT_SHARE_REGISTERED = "dxl.ShareRegistered"
DEFAULT_INLINE_BYTES = 64 << 10
OPT_AUTH_TOKEN = "dxl.AuthToken"
TRANSPORTS = ("auto", "cma", "tcp")
ENV_TRANSPORT = "DXL_TRANSPORT"
ENV_AUTH_TOKEN = "DXL_AUTH_TOKEN"
SECRET_OPTIONS = frozenset({OPT_AUTH_TOKEN})  # never shown by repr or logs


def _flag(value: bool) -> str:
    return "1" if value else "0"


class LLMConfig:
    """Builder of the option dict for ``LLMDataDist.init`` (reference ``LLMConfig``).

    Set properties, then call :meth:`generate_options`. Only options that were set are
    emitted, except ``llm.MemoryUtilization`` (always, default ``"0.95"``). Setting a
    property to None (where the reference's type check allows it) makes it "unset" again,
    but a key already emitted stays in :attr:`options`.
    """

    def __init__(self) -> None:
        self._options: dict[str, str] = {}
        self._ge_options: dict[str, str] = {}
        self._device_id: int | list[int] | tuple[int, ...] | None = None
        self._listen_ip_info = ""
        self._sync_kv_timeout: int | str | None = None
        self._enable_cache_manager: bool | None = None
        self._enable_remote_cache_accessible: bool | None = None
        self._mem_pool_cfg = ""
        self._host_mem_pool_cfg = ""
        self._buf_pool_cfg = ""
        self._rdma_traffic_class: int | None = None
        self._rdma_service_level: int | None = None
        self._link_total_time: int | None = None
        self._link_retry_count: int | None = None
        self._local_comm_res: str | None = None
        self._transfer_backend: str | None = None
        self._global_resource_config: str | None = None
        self._enable_switch_role = False
        self._mem_utilization = _DEFAULT_MEM_UTILIZATION
        self._deploy_res_path = ""
        self._output_max_size: int | None = None
        self._cluster_info = ""
        self._max_registered_addrs: int | None = None
        self._heartbeat_interval_ms: int | None = None
        self._transfer_threads: int | None = None
        self._allow_remote_listen: bool | None = None
        self._transport: str | None = None
        self._share_registered: bool | None = None
        self._auth_token: str | None = None

    # -- option dict ----------------------------------------------------------------------

    @property
    def options(self) -> dict[str, str]:
        """The accumulated option dict (the object :meth:`generate_options` returns)."""
        return self._options

    def generate_options(self) -> dict[str, str]:
        """Write every set property into :attr:`options` and return it.

        ``ge_options`` go in first, so the named properties override them. Setting
        ``local_comm_res`` implies ``llm.EnableCacheManager`` and
        ``llm.EnableRemoteCacheAccessible`` = ``"1"`` unless those were set explicitly.

        Returns:
            The option dict; the same object on every call.
        """
        return self._build(self._options)

    gen_options = generate_options

    def _build(self, opts: dict[str, str]) -> dict[str, str]:
        opts.update(self._ge_options)
        if self._device_id is not None:
            if isinstance(self._device_id, int):
                opts[OPT_DEVICE_ID] = str(int(self._device_id))
                opts[OPT_SESSION_DEVICE_ID] = str(int(self._device_id))
            else:
                opts[OPT_SESSION_DEVICE_ID] = str(int(self._device_id[0]))
                opts[OPT_DEVICE_ID] = ";".join(str(int(d)) for d in self._device_id)
        if self._sync_kv_timeout is not None:
            timeout = self._sync_kv_timeout
            opts[OPT_SYNC_KV_TIMEOUT] = timeout if isinstance(timeout, str) else str(int(timeout))
        if self._deploy_res_path:
            opts[OPT_DEPLOY_RES_PATH] = self._deploy_res_path
        self._add_memory_options(opts)
        self._add_connect_options(opts)
        if self._cluster_info:
            opts[OPT_CLUSTER_INFO] = self._cluster_info
        if self._output_max_size is not None:
            opts[OPT_OUTPUT_MAX_SIZE] = str(int(self._output_max_size))
        if self._enable_switch_role:
            opts[OPT_ENABLE_SWITCH_ROLE] = "1"
        opts[OPT_MEM_UTILIZATION] = str(self._mem_utilization)
        self._add_dxl_options(opts)
        return opts

    def _add_memory_options(self, opts: dict[str, str]) -> None:
        if self._buf_pool_cfg:
            opts[OPT_BUF_POOL] = self._buf_pool_cfg
        if self._mem_pool_cfg:
            opts[OPT_MEM_POOL] = self._mem_pool_cfg
        if self._host_mem_pool_cfg:
            opts[OPT_HOST_MEM_POOL] = self._host_mem_pool_cfg
        implied = self._local_comm_res is not None
        if self._enable_cache_manager is not None:
            opts[OPT_ENABLE_CACHE_MANAGER] = _flag(self._enable_cache_manager)
        elif implied:
            opts[OPT_ENABLE_CACHE_MANAGER] = "1"
        if self._enable_remote_cache_accessible is not None:
            opts[OPT_ENABLE_REMOTE_CACHE_ACCESSIBLE] = _flag(self._enable_remote_cache_accessible)
        elif implied:
            opts[OPT_ENABLE_REMOTE_CACHE_ACCESSIBLE] = "1"

    def _add_connect_options(self, opts: dict[str, str]) -> None:
        if self._listen_ip_info:
            opts[OPT_LISTEN_IP_INFO] = self._listen_ip_info
        if self._link_total_time is not None:
            opts[OPT_LINK_TOTAL_TIME] = str(int(self._link_total_time))
        if self._link_retry_count is not None:
            opts[OPT_LINK_RETRY_COUNT] = str(int(self._link_retry_count))
        if self._rdma_traffic_class is not None:
            opts[OPT_RDMA_TRAFFIC_CLASS] = str(int(self._rdma_traffic_class))
        if self._rdma_service_level is not None:
            opts[OPT_RDMA_SERVICE_LEVEL] = str(int(self._rdma_service_level))
        if self._local_comm_res is not None:
            opts[OPT_LOCAL_COMM_RES] = self._local_comm_res
        if self._transfer_backend is not None:
            opts[OPT_TRANSFER_BACKEND] = self._transfer_backend
        if self._global_resource_config is not None:
            opts[OPT_GLOBAL_RESOURCE_CONFIG] = self._global_resource_config

    def _add_dxl_options(self, opts: dict[str, str]) -> None:
        if self._max_registered_addrs is not None:
            opts[OPT_MAX_REGISTER_ADDRS] = str(int(self._max_registered_addrs))
        if self._heartbeat_interval_ms is not None:
            opts[OPT_HEARTBEAT_INTERVAL_MS] = str(int(self._heartbeat_interval_ms))
        if self._transfer_threads is not None:
            opts[OPT_TRANSFER_THREADS] = str(int(self._transfer_threads))
        if self._allow_remote_listen is not None:
            opts[OPT_ALLOW_REMOTE_LISTEN] = _flag(self._allow_remote_listen)
        if self._transport is not None:
            opts[OPT_TRANSPORT] = self._transport
        if self._share_registered is not None:
            opts[OPT_SHARE_REGISTERED] = _flag(self._share_registered)
        if self._auth_token is not None:
            opts[OPT_AUTH_TOKEN] = self._auth_token

    # -- reference properties -------------------------------------------------------------

    @property
    def device_id(self) -> int | list[int] | tuple[int, ...] | None:
        """Device of this process (CUDA ordinal in dxl); None until set."""
        return self._device_id

    @device_id.setter
    def device_id(self, value: int | list[int] | tuple[int, ...] | None) -> None:
        check_isinstance("device_id", value, (list, tuple, int))
        if isinstance(value, (list, tuple)):
            check_isinstance("device_id", value, (list, tuple), inner=int)
            ensure(len(value) > 0, "device_id must not be an empty list")
            ids = list(value)
        else:
            ids = [] if value is None else [value]
        for dev in ids:
            ensure(dev >= 0, f"device_id should be greater than or equal to zero, got {dev}")
        for dev in ids:
            check_int32("device_id", dev)
        self._device_id = value

    @property
    def listen_ip_info(self) -> str:
        """``"ip:port"`` (or ``"[ipv6]:port"``) this instance listens on; ``""`` = client."""
        return self._listen_ip_info

    @listen_ip_info.setter
    def listen_ip_info(self, value: str | None) -> None:
        check_isinstance("listen_ip_info", value, str)
        self._listen_ip_info = value or ""

    @property
    def sync_kv_timeout(self) -> int | str | None:
        """Timeout of pull/push in ms (int or digit string); None = engine default 1000."""
        return self._sync_kv_timeout

    @sync_kv_timeout.setter
    def sync_kv_timeout(self, value: int | str | None) -> None:
        check_isinstance("sync_kv_timeout", value, (int, str))
        if value is not None:
            if isinstance(value, str):
                ensure(_is_ascii_digits(value), f"sync_kv_timeout must be digit, got {value!r}")
            ensure(int(value) > 0, f"sync_kv_timeout should be greater than zero, got {value}")
            check_int32("sync_kv_timeout", int(value))
        self._sync_kv_timeout = value

    @property
    def ge_options(self) -> dict[str, str]:
        """Extra engine options, emitted first and overridable by named properties."""
        return self._ge_options

    @ge_options.setter
    def ge_options(self, value: dict[str, str] | None) -> None:
        check_dict("ge_options", value, str, str, allow_none=True)
        self._ge_options = {} if value is None else value

    @property
    def enable_cache_manager(self) -> bool:
        """Select v2 (CacheManager) mode; dxl always runs v2."""
        return bool(self._enable_cache_manager)

    @enable_cache_manager.setter
    def enable_cache_manager(self, value: bool | None) -> None:
        check_isinstance("enable_cache_manager", value, bool)
        self._enable_cache_manager = value

    @property
    def enable_remote_cache_accessible(self) -> bool:
        """Remote-cache-accessible mode (affects ``pull_cache`` key types and consumption)."""
        return bool(self._enable_remote_cache_accessible)

    @enable_remote_cache_accessible.setter
    def enable_remote_cache_accessible(self, value: bool | None) -> None:
        check_isinstance("enable_remote_cache_accessible", value, bool)
        self._enable_remote_cache_accessible = value

    @property
    def mem_pool_cfg(self) -> str:
        """Device pool JSON ``{"memory_size": int, "page_shift": int}``."""
        return self._mem_pool_cfg

    @mem_pool_cfg.setter
    def mem_pool_cfg(self, value: str | None) -> None:
        check_isinstance("mem_pool_cfg", value, str)
        self._mem_pool_cfg = value or ""

    @property
    def host_mem_pool_cfg(self) -> str:
        """Host pool JSON, same schema as :attr:`mem_pool_cfg`."""
        return self._host_mem_pool_cfg

    @host_mem_pool_cfg.setter
    def host_mem_pool_cfg(self, value: str | None) -> None:
        check_isinstance("host_mem_pool_cfg", value, str)
        self._host_mem_pool_cfg = value or ""

    @property
    def buf_pool_cfg(self) -> str:
        """v1 buffer pool JSON (accepted, no effect in dxl)."""
        return self._buf_pool_cfg

    @buf_pool_cfg.setter
    def buf_pool_cfg(self, value: str | None) -> None:
        check_isinstance("buf_pool_cfg", value, str)
        self._buf_pool_cfg = value or ""

    @property
    def rdma_traffic_class(self) -> int | None:
        """RDMA traffic class (accepted, no effect in dxl)."""
        return self._rdma_traffic_class

    @rdma_traffic_class.setter
    def rdma_traffic_class(self, value: int) -> None:
        check_uint32("rdma_traffic_class", value)
        self._rdma_traffic_class = value

    @property
    def rdma_service_level(self) -> int | None:
        """RDMA service level (accepted, no effect in dxl)."""
        return self._rdma_service_level

    @rdma_service_level.setter
    def rdma_service_level(self, value: int) -> None:
        check_uint32("rdma_service_level", value)
        self._rdma_service_level = value

    @property
    def link_total_time(self) -> int:
        """Total link-setup timeout in seconds; 0 = default."""
        return 0 if self._link_total_time is None else self._link_total_time

    @link_total_time.setter
    def link_total_time(self, value: int) -> None:
        check_isinstance("link_total_time", value, int, allow_none=False)
        ensure(
            0 <= value <= UINT32_MAX,
            f"link_total_time should be an integer between [0, 2^32-1], given value is {value}",
        )
        self._link_total_time = value

    @property
    def link_retry_count(self) -> int:
        """Link-setup retries, 1..100."""
        return 1 if self._link_retry_count is None else self._link_retry_count

    @link_retry_count.setter
    def link_retry_count(self, value: int) -> None:
        check_isinstance("link_retry_count", value, int, allow_none=False)
        ensure(
            1 <= value <= _MAX_LINK_RETRY_COUNT,
            f"link_retry_count should be an integer between [1, 100], given value is {value}",
        )
        self._link_retry_count = value

    @property
    def local_comm_res(self) -> str:
        """Local communication resources JSON; setting it (even to "") implies v2 options."""
        return "" if self._local_comm_res is None else self._local_comm_res

    @local_comm_res.setter
    def local_comm_res(self, value: str | None) -> None:
        check_isinstance("local_comm_res", value, str)
        self._local_comm_res = value

    @property
    def transfer_backend(self) -> str:
        """Transfer backend (reference: only "hixl")."""
        return "" if self._transfer_backend is None else self._transfer_backend

    @transfer_backend.setter
    def transfer_backend(self, value: str | None) -> None:
        check_isinstance("transfer_backend", value, str)
        self._transfer_backend = value

    @property
    def global_resource_config(self) -> str:
        """HIXL resource JSON (accepted, no effect in dxl)."""
        return "" if self._global_resource_config is None else self._global_resource_config

    @global_resource_config.setter
    def global_resource_config(self, value: str | None) -> None:
        check_isinstance("global_resource_config", value, str)
        self._global_resource_config = value

    @property
    def enable_switch_role(self) -> bool:
        """Emit ``llm.EnableSwitchRole=1`` (v1 requirement; harmless in v2)."""
        return self._enable_switch_role

    @enable_switch_role.setter
    def enable_switch_role(self, value: bool | None) -> None:
        check_isinstance("enable_switch_role", value, bool)
        self._enable_switch_role = bool(value)

    @property
    def mem_utilization(self) -> float:
        """v1 pool utilisation fraction in [0, 1] (always emitted, default 0.95)."""
        return self._mem_utilization

    @mem_utilization.setter
    def mem_utilization(self, value: float) -> None:
        check_isinstance("mem_utilization", value, float, allow_none=False)
        ensure(
            0.0 <= value <= 1.0,
            f"mem_utilization must be in range [0,1], current:{value}",
        )
        self._mem_utilization = value

    @property
    def deploy_res_path(self) -> str:
        """v1 offline option (accepted, no effect in dxl)."""
        return self._deploy_res_path

    @deploy_res_path.setter
    def deploy_res_path(self, value: str | None) -> None:
        check_isinstance("deploy_res_path", value, str)
        self._deploy_res_path = value or ""

    @property
    def output_max_size(self) -> int | None:
        """v1 offline option (accepted, no effect in dxl)."""
        return self._output_max_size

    @output_max_size.setter
    def output_max_size(self, value: int | None) -> None:
        check_isinstance("output_max_size", value, int)
        self._output_max_size = value

    @property
    def cluster_info(self) -> str:
        """v1 offline cluster JSON; dotted ips in ``listen_ip_info[*].ip`` become ints."""
        return self._cluster_info

    @cluster_info.setter
    def cluster_info(self, value: str | None) -> None:
        check_isinstance("cluster_info", value, str)
        if not value:
            self._cluster_info = ""
            return
        try:
            info = json.loads(value)
        except json.JSONDecodeError as exc:
            raise param_invalid(None, f"cluster_info must be JSON: {exc}") from None
        ensure(isinstance(info, dict), "cluster_info must be a JSON object")
        for entry in info.get("listen_ip_info", []):
            if isinstance(entry, dict) and isinstance(entry.get("ip"), str):
                entry["ip"] = parse_ip(entry["ip"])
        self._cluster_info = json.dumps(info)

    # -- dxl extensions -------------------------------------------------------------------

    @property
    def max_registered_addrs(self) -> int:
        """dxl extension: cap on registered addresses (default 240), ``dxl.MaxRegisterAddrs``."""
        if self._max_registered_addrs is None:
            return DEFAULT_MAX_REGISTERED_ADDRS
        return self._max_registered_addrs

    @max_registered_addrs.setter
    def max_registered_addrs(self, value: int) -> None:
        check_isinstance("max_registered_addrs", value, int, allow_none=False)
        ensure(value >= 1, f"max_registered_addrs must be >= 1, got {value}")
        self._max_registered_addrs = value

    @property
    def heartbeat_interval_ms(self) -> int:
        """dxl extension: link heartbeat period in ms (default 1000),
        ``dxl.HeartbeatIntervalMs``."""
        if self._heartbeat_interval_ms is None:
            return DEFAULT_HEARTBEAT_INTERVAL_MS
        return self._heartbeat_interval_ms

    @heartbeat_interval_ms.setter
    def heartbeat_interval_ms(self, value: int) -> None:
        check_isinstance("heartbeat_interval_ms", value, int, allow_none=False)
        ensure(value > 0, f"heartbeat_interval_ms must be > 0, got {value}")
        check_int32("heartbeat_interval_ms", value)
        self._heartbeat_interval_ms = value

    @property
    def transfer_threads(self) -> int:
        """dxl extension: transfer worker threads, 1..64 (default 2), ``dxl.TransferThreads``."""
        return (
            DEFAULT_TRANSFER_THREADS if self._transfer_threads is None else self._transfer_threads
        )

    @transfer_threads.setter
    def transfer_threads(self, value: int) -> None:
        check_isinstance("transfer_threads", value, int, allow_none=False)
        ensure(
            1 <= value <= MAX_TRANSFER_THREADS,
            f"transfer_threads must be in [1, {MAX_TRANSFER_THREADS}], got {value}",
        )
        self._transfer_threads = value

    @property
    def allow_remote_listen(self) -> bool:
        """dxl extension: allow listening on a non-loopback address without a shared secret,
        ``dxl.AllowRemoteListen``."""
        return bool(self._allow_remote_listen)

    @allow_remote_listen.setter
    def allow_remote_listen(self, value: bool) -> None:
        check_isinstance("allow_remote_listen", value, bool, allow_none=False)
        self._allow_remote_listen = value

    @property
    def share_registered(self) -> bool:
        """dxl extension: move registered HOST memory onto shared memory in place, so same-host
        peers copy it with memcpy, ``dxl.ShareRegistered`` (off by default: see
        docs/performance.md for when it is safe)."""
        return bool(self._share_registered)

    @share_registered.setter
    def share_registered(self, value: bool) -> None:
        check_isinstance("share_registered", value, bool, allow_none=False)
        self._share_registered = value

    @property
    def transport(self) -> str:
        """dxl extension: ``"auto"`` (cma on one host, tcp otherwise), ``"cma"`` or ``"tcp"``,
        ``dxl.Transport``; the environment variable ``DXL_TRANSPORT`` applies when unset."""
        return self._transport or "auto"

    @transport.setter
    def transport(self, value: str) -> None:
        check_isinstance("transport", value, str, allow_none=False)
        ensure(value in TRANSPORTS, f"transport must be one of {TRANSPORTS}, got {value!r}")
        self._transport = value

    @property
    def auth_token(self) -> str | None:
        """dxl extension: shared secret that authenticates links and data connections,
        ``dxl.AuthToken``; ``DXL_AUTH_TOKEN`` applies when unset. Never logged."""
        return self._auth_token

    @auth_token.setter
    def auth_token(self, value: str) -> None:
        check_isinstance("auth_token", value, str, allow_none=False)
        ensure(bool(value), "auth_token must not be empty")
        self._auth_token = value

    def __repr__(self) -> str:
        # Built on a copy: repr must not change what generate_options has accumulated.
        shown = {
            k: ("***" if k in SECRET_OPTIONS else v)
            for k, v in self._build(dict(self._options)).items()
        }
        return f"LLMConfig({shown!r})"


LlmConfig = LLMConfig


# --------------------------------------------------------------------------------------------
# Parsing an option dict


def _is_ascii_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _parse_uint(opts: dict[str, str], key: str, default: int, low: int, high: int) -> int:
    """Parse a decimal option in ``[low, high]``; absent -> ``default``."""
    text = opts.get(key)
    if text is None:
        return default
    ensure(_is_ascii_digits(text), f"option {key} must be a decimal integer, got {text!r}")
    value = int(text)
    ensure(low <= value <= high, f"option {key} must be in [{low}, {high}], got {value}")
    return value


def _parse_flag(opts: dict[str, str], key: str, default: bool) -> bool:
    text = opts.get(key)
    if text is None:
        return default
    ensure(text in ("0", "1"), f'option {key} must be "0" or "1", got {text!r}')
    return text == "1"


@dataclass(frozen=True)
class PoolConfig:
    """A memory pool option (``llm.MemPoolConfig`` / ``llm.HostMemPoolConfig``).

    Attributes:
        memory_size: Pool size in bytes, > 0.
        page_shift: log2 of the allocation granule, in [10, 31); default 16 (64 KiB).
    """

    memory_size: int
    page_shift: int = 16

    @property
    def page_size(self) -> int:
        """Allocation granule in bytes."""
        return 1 << self.page_shift

    @classmethod
    def from_json(cls, text: str, option: str) -> PoolConfig:
        """Parse ``{"memory_size": int > 0, "page_shift": int in [10, 31)}``.

        Args:
            text: The option value.
            option: Option name, used in messages.

        Raises:
            LLMException: ``LLM_PARAM_INVALID`` naming ``option`` for bad JSON or values.
        """
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as exc:
            raise param_invalid(None, f"option {option} must be JSON: {exc}") from None
        ensure(isinstance(cfg, dict), f"option {option} must be a JSON object, got {text!r}")
        size = cfg.get("memory_size")
        ensure(
            isinstance(size, int) and not isinstance(size, bool) and size > 0,
            f"option {option}: memory_size must be an integer > 0, got {size!r}",
        )
        shift = cfg.get("page_shift", 16)
        ensure(
            isinstance(shift, int) and not isinstance(shift, bool) and 10 <= shift < 31,
            f"option {option}: page_shift must be an integer in [10, 31), got {shift!r}",
        )
        return cls(memory_size=size, page_shift=shift)


def parse_listen(text: str, name: str = "listen_ip_info") -> tuple[str, int]:
    """Parse ``"ip:port"`` or ``"[ipv6]:port"`` into ``(ip, port)``.

    Args:
        text: The address. The ip must be a literal IPv4 or IPv6 address.
        name: Argument name used in messages.

    Returns:
        The ip (IPv4 dotted, or canonical IPv6 without brackets) and port (0..65535).

    Raises:
        LLMException: ``LLM_PARAM_INVALID`` naming ``name`` if the text is malformed.
    """
    host, sep, port_text = text.rpartition(":")
    ensure(
        bool(sep) and bool(host),
        f"{name} must be 'ip:port' or '[ipv6]:port', got {text!r}",
    )
    if host.startswith("["):
        ensure(host.endswith("]"), f"{name}: unbalanced brackets in {text!r}")
        ip = ipv6_or_none(host)
        ensure(ip is not None, f"{name}: {host!r} is not an IPv6 address")
    else:
        try:
            socket.inet_pton(socket.AF_INET, host)
        except OSError:
            raise param_invalid(
                None,
                f"{name}: {host!r} is not an IPv4 address (write IPv6 as '[addr]:port')"
            ) from None
        ip = host
    ensure(_is_ascii_digits(port_text), f"{name}: port must be decimal, got {port_text!r}")
    port = int(port_text)
    ensure(port <= UINT16_MAX, f"{name}: port must be in [0, 65535], got {port}")
    return ip, port  # type: ignore[return-value]


def listen_from_options(opts: dict[str, Any]) -> tuple[str, int] | None:
    """Read ``llm.listenIpInfo`` from ``init`` or ``switch_role`` options.

    Returns:
        ``(ip, port)``, or None if the key is absent or empty (a pure client).

    Raises:
        TypeError: If the value is not a str.
        LLMException: ``LLM_PARAM_INVALID`` if it is malformed.
    """
    text = opts.get(OPT_LISTEN_IP_INFO)
    if text is None:
        return None
    check_isinstance(OPT_LISTEN_IP_INFO, text, str)
    if not text:
        return None
    return parse_listen(text)


def _parse_device_id(opts: dict[str, str]) -> int | None:
    text = opts.get(OPT_DEVICE_ID, opts.get(OPT_SESSION_DEVICE_ID))
    if text is None or text == "":
        return None
    key = OPT_DEVICE_ID if OPT_DEVICE_ID in opts else OPT_SESSION_DEVICE_ID
    ensure(
        ";" not in text,
        f"option {key}: one device per process is supported, got {text!r}",
    )
    return _parse_uint(opts, key, 0, 0, INT32_MAX)


def _parse_pool(opts: dict[str, str], key: str) -> PoolConfig | None:
    text = opts.get(key)
    if not text:
        return None
    return PoolConfig.from_json(text, key)


def _check_ascend_options(opts: dict[str, str], has_listen: bool) -> None:
    """Validate options that have no effect in dxl, as the reference documents them."""
    mem_max = opts.get(OPT_FLOW_GRAPH_MEM_MAX_SIZE)
    if mem_max is not None:
        ensure(
            _is_ascii_digits(mem_max),
            f"option {OPT_FLOW_GRAPH_MEM_MAX_SIZE} must be one decimal integer, got {mem_max!r}",
        )
    for key in (OPT_RDMA_TRAFFIC_CLASS, OPT_RDMA_SERVICE_LEVEL):
        _parse_uint(opts, key, 0, 0, UINT32_MAX)
    util = opts.get(OPT_MEM_UTILIZATION)
    if util is not None:
        try:
            value = float(util)
        except ValueError:
            raise param_invalid(
                None,
                f"option {OPT_MEM_UTILIZATION} must be a number, got {util!r}"
            ) from None
        ensure(0.0 <= value <= 1.0, f"option {OPT_MEM_UTILIZATION} must be in [0, 1], got {util}")
    backend = opts.get(OPT_TRANSFER_BACKEND)
    if backend:
        ensure(backend == "hixl", f'option {OPT_TRANSFER_BACKEND} must be "hixl", got {backend!r}')
        ensure(
            opts.get(OPT_ENABLE_REMOTE_CACHE_ACCESSIBLE) != "0",
            f"option {OPT_TRANSFER_BACKEND}=hixl requires {OPT_ENABLE_REMOTE_CACHE_ACCESSIBLE}=1",
        )
        ensure(has_listen, f"option {OPT_TRANSFER_BACKEND}=hixl requires {OPT_LISTEN_IP_INFO}")


def _parse_transport(opts: dict[str, str]) -> str:
    value = opts.get(OPT_TRANSPORT) or os.environ.get(ENV_TRANSPORT) or "auto"
    ensure(
        value in TRANSPORTS,
        f"option {OPT_TRANSPORT} (or ${ENV_TRANSPORT}) must be one of {TRANSPORTS}, got {value!r}",
    )
    return value


@dataclass(frozen=True)
class EngineOptions:
    """Typed engine settings parsed from an ``init`` option dict.

    Attributes:
        device_id: CUDA ordinal, or None when only host memory is used.
        listen: ``(ip, port)`` of the control listener, or None (client only).
        sync_kv_timeout_ms: Timeout of each pull/push.
        enable_cache_manager: ``llm.EnableCacheManager`` (dxl always runs v2).
        enable_remote_cache_accessible: ``llm.EnableRemoteCacheAccessible``.
        mem_pool: Device pool, if configured.
        host_mem_pool: Host pool, if configured.
        max_registered_addrs: dxl: cap on registered addresses.
        heartbeat_interval_ms: dxl: link heartbeat period.
        transfer_threads: dxl: transfer worker threads.
        allow_remote_listen: dxl: listen on non-loopback without a shared secret.
        transport: dxl: ``auto``, ``cma`` or ``tcp`` (option, else ``DXL_TRANSPORT``).
        inline_bytes: dxl: same-host requests up to this size run on the loop thread (0: never).
        share_registered: dxl: move remotely accessible registered HOST memory onto memfds.
        auth_token: dxl: shared secret (option, else ``DXL_AUTH_TOKEN``); never shown.
        link_total_time_s: ``llm.LinkTotalTime`` (0 = default).
        link_retry_count: ``llm.LinkRetryCount``.
        raw: A copy of every option, unknown ones included.
    """

    device_id: int | None = None
    listen: tuple[str, int] | None = None
    sync_kv_timeout_ms: int = DEFAULT_SYNC_KV_TIMEOUT_MS
    enable_cache_manager: bool = False
    enable_remote_cache_accessible: bool = False
    mem_pool: PoolConfig | None = None
    host_mem_pool: PoolConfig | None = None
    max_registered_addrs: int = DEFAULT_MAX_REGISTERED_ADDRS
    heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS
    transfer_threads: int = DEFAULT_TRANSFER_THREADS
    allow_remote_listen: bool = False
    transport: str = "auto"
    inline_bytes: int = DEFAULT_INLINE_BYTES
    share_registered: bool = False
    auth_token: str | None = field(default=None, repr=False)
    link_total_time_s: int = 0
    link_retry_count: int = 1
    raw: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_options(cls, options: dict[str, str]) -> EngineOptions:
        """Validate and parse an option dict (the caller's dict is not modified).

        Setting ``llm.LocalCommRes`` (or ``llm.TransferBackend=hixl`` for the
        remote-accessible flag) defaults the cache-manager flags to on, as ``init`` does.

        Raises:
            TypeError: ``options`` not a dict, or a key or value not a str.
            LLMException: ``LLM_PARAM_INVALID`` naming the option for a bad value.
        """
        check_dict("options", options, str, str)
        opts = dict(options)
        listen = listen_from_options(opts)
        _check_ascend_options(opts, listen is not None)
        implied = OPT_LOCAL_COMM_RES in opts
        hixl = opts.get(OPT_TRANSFER_BACKEND) == "hixl"
        return cls(
            device_id=_parse_device_id(opts),
            listen=listen,
            sync_kv_timeout_ms=_parse_uint(
                opts, OPT_SYNC_KV_TIMEOUT, DEFAULT_SYNC_KV_TIMEOUT_MS, 1, INT32_MAX
            ),
            enable_cache_manager=_parse_flag(opts, OPT_ENABLE_CACHE_MANAGER, implied),
            enable_remote_cache_accessible=_parse_flag(
                opts, OPT_ENABLE_REMOTE_CACHE_ACCESSIBLE, implied or hixl
            ),
            mem_pool=_parse_pool(opts, OPT_MEM_POOL),
            host_mem_pool=_parse_pool(opts, OPT_HOST_MEM_POOL),
            max_registered_addrs=_parse_uint(
                opts, OPT_MAX_REGISTER_ADDRS, DEFAULT_MAX_REGISTERED_ADDRS, 1, INT32_MAX
            ),
            heartbeat_interval_ms=_parse_uint(
                opts, OPT_HEARTBEAT_INTERVAL_MS, DEFAULT_HEARTBEAT_INTERVAL_MS, 1, INT32_MAX
            ),
            transfer_threads=_parse_uint(
                opts, OPT_TRANSFER_THREADS, DEFAULT_TRANSFER_THREADS, 1, MAX_TRANSFER_THREADS
            ),
            allow_remote_listen=_parse_flag(opts, OPT_ALLOW_REMOTE_LISTEN, False),
            transport=_parse_transport(opts),
            inline_bytes=_parse_uint(opts, OPT_INLINE_BYTES, DEFAULT_INLINE_BYTES, 0, 1 << 30),
            share_registered=_parse_flag(opts, OPT_SHARE_REGISTERED, False),
            auth_token=opts.get(OPT_AUTH_TOKEN) or os.environ.get(ENV_AUTH_TOKEN) or None,
            link_total_time_s=_parse_uint(opts, OPT_LINK_TOTAL_TIME, 0, 0, UINT32_MAX),
            link_retry_count=_parse_uint(opts, OPT_LINK_RETRY_COUNT, 1, 1, _MAX_LINK_RETRY_COUNT),
            raw=opts,
        )
