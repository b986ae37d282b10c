"""Engine options: the reference's ``LLMConfig`` builder and dxl's parsed ``EngineOptions``.

``LLMConfig`` (spec 4.1) turns properties into the ``Dict[str, str]`` that ``init`` takes;
``EngineOptions.from_options`` turns such a dict back into typed, validated settings.

Every option is written once, in the **option table**: the class body of :class:`LLMConfig`
(one :class:`Prop` per property) and :data:`KEY_ONLY_OPTIONS` right after it (keys that
have no property); :data:`OPTIONS` joins the two. An entry holds the option's key(s), its
one-line doc, the check of a value set on the property, how the value is rendered into the
option dict, its default, how an engine parses the key's text, and the
:class:`EngineOptions` field it fills; the hooks it names (``_check_*``, ``_render_*``,
``_parse_*``) are defined above the class. Everything else is driven by that table: the
properties themselves, ``generate_options``, ``__repr__`` and ``EngineOptions.from_options``.
An entry without a field is "accepted without effect": it is validated as the reference
documents, then only kept in ``EngineOptions.raw``, like the keys no entry knows
(Ascend-only ones, unknown ones).
"""

from __future__ import annotations

import copy
import json
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeAlias, TypeVar, overload

from dxl import _ffi
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
from dxl.transport.names import ALL as TRANSPORT_NAMES
from dxl.transport.names import AUTO as AUTO_TRANSPORT
from dxl.transport.names import AUTO_ORDER
from dxl.types import ipv6_or_none, parse_ip

__all__ = [
    "DEFAULT_HANDOFF_FETCH_TIMEOUT_S",
    "DEFAULT_HANDOFF_LEASE_S",
    "DEFAULT_HANDOFF_MAX_FETCHES",
    "DEFAULT_HEARTBEAT_INTERVAL_MS",
    "DEFAULT_MAX_REGISTERED_ADDRS",
    "DEFAULT_SYNC_KV_TIMEOUT_MS",
    "DEFAULT_TRANSFER_THREADS",
    "MAX_TRANSFER_THREADS",
    "OPTIONS",
    "TRANSPORTS",
    "EngineOptions",
    "HandoffSettings",
    "LLMConfig",
    "LlmConfig",
    "Option",
    "PoolConfig",
    "Prop",
    "listen_from_options",
    "parse_listen",
]

DEFAULT_SYNC_KV_TIMEOUT_MS = 1000
DEFAULT_MAX_REGISTERED_ADDRS = 240
DEFAULT_HEARTBEAT_INTERVAL_MS = 1000
DEFAULT_TRANSFER_THREADS = 2
# the native pool's bound (native/dxl.h DXL_MAX_THREADS: the calling thread plus at most 15 pool
# workers), read from the shim rather than restated: a larger value would be clamped silently
MAX_TRANSFER_THREADS: int = int(_ffi.lib.DXL_MAX_THREADS)
DEFAULT_INLINE_BYTES = 64 << 10
# the handoff's settings (dxl/handoff/defaults.py re-exports them under their old names)
DEFAULT_HANDOFF_LEASE_S = 30.0  # as vLLM's NIXL connector
DEFAULT_HANDOFF_FETCH_TIMEOUT_S = 30.0
DEFAULT_HANDOFF_MAX_FETCHES = 64  # fetches in flight per engine; more wait (renewing their leases)
MAX_HANDOFF_SECONDS = 86400.0  # a lease or a fetch timeout: at most a day, as offer(lease_s=)
_MAX_INLINE_BYTES = 1 << 30
_DEFAULT_MEM_UTILIZATION = 0.95
_MAX_LINK_RETRY_COUNT = 100

# Option keys (the reference's spelling). Other modules import these names.
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
OPT_NIXL_ALLOW_EMULATED = "dxl.NixlAllowEmulated"
OPT_SHARE_REGISTERED = "dxl.ShareRegistered"
OPT_AUTH_TOKEN = "dxl.AuthToken"
OPT_RANK_TABLE_BASE_PORT = "dxl.RankTableBasePort"
OPT_HANDOFF_LEASE_S = "dxl.HandoffLeaseS"
OPT_HANDOFF_FETCH_TIMEOUT_S = "dxl.HandoffFetchTimeoutS"
OPT_HANDOFF_MAX_FETCHES = "dxl.HandoffMaxFetches"
DEFAULT_RANK_TABLE_BASE_PORT = 27100
# what dxl.Transport accepts: "auto" and the name of every opener (dxl/transport/select.py)
TRANSPORTS: tuple[str, ...] = (AUTO_TRANSPORT, *TRANSPORT_NAMES)
ENV_TRANSPORT = "DXL_TRANSPORT"
ENV_AUTH_TOKEN = "DXL_AUTH_TOKEN"

DeviceIds: TypeAlias = int | list[int] | tuple[int, ...]
Rendered: TypeAlias = str | Mapping[str, str]
"""What a render hook returns: text for the entry's first key, or a whole key -> text map."""
ParseHook: TypeAlias = Callable[[str, str, Mapping[str, str]], Any]
"""``(text, key, options) -> field value``; raises ``LLMException`` naming ``key``."""
AbsentHook: TypeAlias = Callable[[Mapping[str, str]], Any]
"""``(options) -> field value`` for an option that was not given."""

S = TypeVar("S")  # what the property's setter accepts
V = TypeVar("V")  # what it stores once set (never None: None in the store means "unset")
D = TypeVar("D")  # what the getter returns while unset


# --------------------------------------------------------------------------------------------
# Table entries

_NO_VALUE: Any = object()  # Option.read's "not given": the EngineOptions field keeps its default


class Option:
    """One table entry: an option key and how an engine reads it.

    Entries with an ``LLMConfig`` property are :class:`Prop`; this class alone is for keys
    that have none (set through ``ge_options`` or the dict passed to ``init``).

    Args:
        keys: The option key(s). An engine parses the first one present in the dict.
        doc: One line: what the option does in dxl.
        parse: Validates and parses the key's text when an engine starts; None accepts
            any text unchecked.
        field: The :class:`EngineOptions` field that the parsed value fills; None means the
            option is accepted (and validated) without effect.
        absent: Computes the field when no key (nor ``env``) is given; None leaves the
            field's default.
        env: Environment variable read when the option is absent or empty.
        implies: Keys this option defaults when it is set (both in ``generate_options`` and
            at ``init``); a value given explicitly wins.
        secret: Never shown by ``repr`` or logs.
    """

    def __init__(
        self,
        *keys: str,
        doc: str,
        parse: ParseHook | None = None,
        field: str | None = None,
        absent: AbsentHook | None = None,
        env: str | None = None,
        implies: Mapping[str, str] | None = None,
        secret: bool = False,
    ) -> None:
        if field is not None and parse is None:
            raise TypeError(f"option {keys}: a field needs a parse hook")
        self.keys = keys
        self.doc = doc
        self.parse = parse
        self.field = field
        self.absent = absent
        self.env = env
        self.implies: Mapping[str, str] = implies or {}
        self.secret = secret

    def read(self, options: Mapping[str, str]) -> Any:
        """Parse this option out of ``options`` (or return ``_NO_VALUE``)."""
        key = next((k for k in self.keys if k in options), None)
        text = None if key is None else options[key]
        if not text and self.env is not None:
            text = os.environ.get(self.env) or text
        if text is None:
            return _NO_VALUE if self.absent is None else self.absent(options)
        if self.parse is None:
            return _NO_VALUE
        return self.parse(text, key or self.keys[0], options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.keys!r}"


class Prop(Option, Generic[S, V, D]):
    """A table entry with an ``LLMConfig`` property: a typed descriptor.

    Setting the property runs ``check``, which raises the reference's exception (TypeError,
    ValueError or ``LLMException``) or returns the value to store; returning None unsets the
    property (the reference's "None resets"). ``generate_options`` renders every set property
    with ``render``. Reading an unset property gives ``default``.

    Args:
        keys, doc, parse, field, absent, env, implies, secret: As for :class:`Option`.
        default: The getter's value while unset.
        check: ``(property name, value) -> value to store, or None to unset``.
        render: ``stored value -> text`` for ``keys[0]``, or a whole key -> text map.
        always: Render ``default`` even while unset.
        copy_default: Give each instance its own copy of a mutable ``default`` on first read,
            so in-place edits stick to that instance (the reference's ``ge_options``).
    """

    name: str

    def __init__(
        self,
        *keys: str,
        doc: str,
        default: D,
        check: Callable[[str, S], V | None],
        render: Callable[[V], Rendered],
        always: bool = False,
        copy_default: bool = False,
        parse: ParseHook | None = None,
        field: str | None = None,
        absent: AbsentHook | None = None,
        env: str | None = None,
        implies: Mapping[str, str] | None = None,
        secret: bool = False,
    ) -> None:
        super().__init__(
            *keys,
            doc=doc,
            parse=parse,
            field=field,
            absent=absent,
            env=env,
            implies=implies,
            secret=secret,
        )
        self.default = default
        self.check = check
        self.render = render
        self.always = always
        self.copy_default = copy_default
        self.__doc__ = doc

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Prop[S, V, D]: ...
    @overload
    def __get__(self, obj: LLMConfig, owner: type[Any]) -> V | D: ...
    def __get__(self, obj: LLMConfig | None, owner: type[Any]) -> Prop[S, V, D] | V | D:
        if obj is None:
            return self
        values = obj._values
        if self.name in values:
            stored: V = values[self.name]
            return stored
        if self.copy_default:
            values[self.name] = own = copy.copy(self.default)
            return own
        return self.default

    def __set__(self, obj: LLMConfig, value: S) -> None:
        stored = self.check(self.name, value)
        if stored is None:
            obj._values.pop(self.name, None)
        else:
            obj._values[self.name] = stored

    def write(self, opts: dict[str, str], value: V) -> None:
        """Render ``value`` into ``opts``."""
        rendered = self.render(value)
        if isinstance(rendered, str):
            opts[self.keys[0]] = rendered
        else:
            opts.update(rendered)

    def __repr__(self) -> str:
        return f"Prop({getattr(self, 'name', '?')}, {self.keys!r})"


# --------------------------------------------------------------------------------------------
# Setter checks: (property name, value) -> value to store, or None to unset. They raise the
# reference's exceptions (spec 3.3): TypeError for a type, ValueError for a C width,
# LLMException(LLM_PARAM_INVALID) for a rule.


def _text_or_unset(name: str, value: str | None) -> str | None:
    """str; ``""`` and None both mean unset (not emitted)."""
    check_isinstance(name, value, str)
    return value or None


def _text(name: str, value: str | None) -> str | None:
    """str; None unsets, but ``""`` is a value and is emitted."""
    check_isinstance(name, value, str)
    return value


def _bool_or_unset(name: str, value: bool | None) -> bool | None:
    check_isinstance(name, value, bool)
    return value


def _bool(name: str, value: bool) -> bool:
    check_isinstance(name, value, bool, allow_none=False)
    return value


def _true_or_unset(name: str, value: bool | None) -> bool | None:
    """bool or None; only True is kept (the reference emits the key only when True)."""
    check_isinstance(name, value, bool)
    return True if value else None


def _int_or_unset(name: str, value: int | None) -> int | None:
    check_isinstance(name, value, int)
    return value


def _uint32(name: str, value: int) -> int:
    check_uint32(name, value)
    return value


def _int_in(
    low: int, high: int | None, message: str, *, int32: bool = False
) -> Callable[[str, int], int]:
    """An int (None refused) with ``low <= value (<= high)``, else ``message`` formatted with
    ``name``, ``value``, ``low`` and ``high``; ``int32`` adds the int32 width check."""

    def check(name: str, value: int) -> int:
        check_isinstance(name, value, int, allow_none=False)
        ensure(
            low <= value and (high is None or value <= high),
            message.format(name=name, value=value, low=low, high=high),
        )
        if int32:
            check_int32(name, value)
        return value

    return check


def _check_ge_options(name: str, value: dict[str, str] | None) -> dict[str, str]:
    check_dict(name, value, str, str, allow_none=True)
    return {} if value is None else value


def _check_device_id(name: str, value: DeviceIds | None) -> DeviceIds | None:
    check_isinstance(name, value, (list, tuple, int))
    if isinstance(value, (list, tuple)):
        check_isinstance(name, value, (list, tuple), inner=int)
        ensure(len(value) > 0, f"{name} must not be an empty list")
        ids = list(value)
    else:
        ids = [] if value is None else [value]
    # All signs first, then all widths: the reference's order of errors.
    for dev in ids:
        ensure(dev >= 0, f"{name} should be greater than or equal to zero, got {dev}")
    for dev in ids:
        check_int32(name, dev)
    return value


def _check_sync_kv_timeout(name: str, value: int | str | None) -> int | str | None:
    check_isinstance(name, value, (int, str))
    if value is not None:
        if isinstance(value, str):
            ensure(_is_ascii_digits(value), f"{name} must be digit, got {value!r}")
        ensure(int(value) > 0, f"{name} should be greater than zero, got {value}")
        check_int32(name, int(value))
    return value


def _check_fraction(name: str, value: float) -> float:
    check_isinstance(name, value, float, allow_none=False)
    ensure(0.0 <= value <= 1.0, f"{name} must be in range [0,1], current:{value}")
    return value


def _check_cluster_info(name: str, value: str | None) -> str | None:
    """JSON object; dotted ips in ``listen_ip_info[*].ip`` become ints, as in the reference."""
    check_isinstance(name, value, str)
    if not value:
        return None
    try:
        info = json.loads(value)
    except json.JSONDecodeError as exc:
        raise param_invalid(None, f"{name} must be JSON: {exc}") from None
    ensure(isinstance(info, dict), f"{name} must be a JSON object")
    for entry in info.get("listen_ip_info", []):
        if isinstance(entry, dict) and isinstance(entry.get("ip"), str):
            entry["ip"] = parse_ip(entry["ip"])
    return json.dumps(info)


def _check_transport(name: str, value: str) -> str:
    check_isinstance(name, value, str, allow_none=False)
    ensure(value in TRANSPORTS, f"{name} must be one of {TRANSPORTS}, got {value!r}")
    return value


def _check_secret(name: str, value: str) -> str:
    check_isinstance(name, value, str, allow_none=False)
    ensure(bool(value), f"{name} must not be empty")
    return value


# --------------------------------------------------------------------------------------------
# Renderers: stored value -> option text (or a key -> text map).


def _as_is(value: str) -> str:
    return value


def _decimal(value: int) -> str:
    return str(int(value))  # int(): a bool passes the int checks and must render as 0/1


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _merged(value: Mapping[str, str]) -> Mapping[str, str]:
    return value


def _render_device_id(value: DeviceIds) -> Mapping[str, str]:
    # The reference emits both keys; for a list, the session id is the first device.
    if isinstance(value, int):
        return {OPT_DEVICE_ID: str(int(value)), OPT_SESSION_DEVICE_ID: str(int(value))}
    return {
        OPT_DEVICE_ID: ";".join(str(int(d)) for d in value),
        OPT_SESSION_DEVICE_ID: str(int(value[0])),
    }


def _render_timeout(value: int | str) -> str:
    return value if isinstance(value, str) else str(int(value))  # digit strings kept verbatim


# --------------------------------------------------------------------------------------------
# Parse hooks: (text, key, options) -> field value, when an engine starts.


def _is_ascii_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _decimal_in(low: int, high: int) -> ParseHook:
    """A decimal integer in ``[low, high]``."""

    def parse(text: str, key: str, options: Mapping[str, str]) -> int:
        ensure(_is_ascii_digits(text), f"option {key} must be a decimal integer, got {text!r}")
        value = int(text)
        ensure(low <= value <= high, f"option {key} must be in [{low}, {high}], got {value}")
        return value

    return parse


def _seconds_up_to(high: float) -> ParseHook:
    """A finite number of seconds in ``(0, high]``."""

    def parse(text: str, key: str, options: Mapping[str, str]) -> float:
        try:
            value = float(text)
        except ValueError:
            raise param_invalid(None, f"option {key} must be a number, got {text!r}") from None
        # "not <=" also refuses nan
        ensure(0 < value <= high, f"option {key} must be in (0, {high:g}] seconds, got {text}")
        return value

    return parse


def _parse_flag(text: str, key: str, options: Mapping[str, str]) -> bool:
    ensure(text in ("0", "1"), f'option {key} must be "0" or "1", got {text!r}')
    return text == "1"


def _parse_device_id(text: str, key: str, options: Mapping[str, str]) -> int | None:
    if not text:
        return None
    ensure(";" not in text, f"option {key}: one device per process is supported, got {text!r}")
    value: int = _decimal_in(0, INT32_MAX)(text, key, options)
    return value


def _parse_listen(text: str, key: str, options: Mapping[str, str]) -> tuple[str, int] | None:
    return parse_listen(text) if text else None  # "" = a pure client


def _parse_pool(text: str, key: str, options: Mapping[str, str]) -> PoolConfig | None:
    return PoolConfig.from_json(text, key) if text else None


def _parse_fraction(text: str, key: str, options: Mapping[str, str]) -> float:
    try:
        value = float(text)
    except ValueError:
        raise param_invalid(None, f"option {key} must be a number, got {text!r}") from None
    ensure(0.0 <= value <= 1.0, f"option {key} must be in [0, 1], got {text}")
    return value


def _parse_single_decimal(text: str, key: str, options: Mapping[str, str]) -> str:
    ensure(_is_ascii_digits(text), f"option {key} must be one decimal integer, got {text!r}")
    return text


def _parse_transfer_backend(text: str, key: str, options: Mapping[str, str]) -> str:
    # Spec 4.1: only "hixl", which needs remote-cache access (defaulted on, see
    # _hixl_backend) and a listener.
    if text:
        ensure(text == "hixl", f'option {key} must be "hixl", got {text!r}')
        ensure(
            options.get(OPT_ENABLE_REMOTE_CACHE_ACCESSIBLE) != "0",
            f"option {key}=hixl requires {OPT_ENABLE_REMOTE_CACHE_ACCESSIBLE}=1",
        )
        ensure(
            bool(options.get(OPT_LISTEN_IP_INFO)),
            f"option {key}=hixl requires {OPT_LISTEN_IP_INFO}",
        )
    return text


def _hixl_backend(options: Mapping[str, str]) -> bool:
    """``init`` turns remote-cache access on for the hixl backend unless it is set."""
    return options.get(OPT_TRANSFER_BACKEND) == "hixl"


def _parse_transport(text: str, key: str, options: Mapping[str, str]) -> str:
    value = text or AUTO_TRANSPORT
    ensure(
        value in TRANSPORTS,
        f"option {key} (or ${ENV_TRANSPORT}) must be one of {TRANSPORTS}, got {value!r}",
    )
    return value


def _parse_secret(text: str, key: str, options: Mapping[str, str]) -> str | None:
    return text or None


# --------------------------------------------------------------------------------------------
# The option table


class LLMConfig:
    """Builder of the option dict for ``LLMDataDist.init`` (reference ``LLMConfig``).

    Set properties, then call :meth:`generate_options`. Only options that were set are
    emitted, except ``llm.MemoryUtilization`` (always, default ``"0.95"``). Setting a
    property to None (where the reference's type check allows it) makes it "unset" again,
    but a key already emitted stays in :attr:`options`.

    The class body below is the option table: one :class:`Prop` per property, in the
    reference's order (spec 4.1), dxl's extensions last.
    """

    # Emitted first, so that every named property below overrides it.
    ge_options: Prop[dict[str, str] | None, dict[str, str], dict[str, str]] = Prop(
        doc="Extra engine options, emitted first and overridable by named properties.",
        default={},
        copy_default=True,
        check=_check_ge_options,
        render=_merged,
    )
    device_id: Prop[DeviceIds | None, DeviceIds, None] = Prop(
        OPT_DEVICE_ID,
        OPT_SESSION_DEVICE_ID,
        doc="Device of this process (CUDA ordinal in dxl); None until set.",
        default=None,
        check=_check_device_id,
        render=_render_device_id,
        parse=_parse_device_id,
        field="device_id",
    )
    listen_ip_info = Prop(
        OPT_LISTEN_IP_INFO,
        doc='``"ip:port"`` (or ``"[ipv6]:port"``) this instance listens on; ``""`` = client.',
        default="",
        check=_text_or_unset,
        render=_as_is,
        parse=_parse_listen,
        field="listen",
    )
    sync_kv_timeout: Prop[int | str | None, int | str, None] = Prop(
        OPT_SYNC_KV_TIMEOUT,
        doc="Timeout of pull/push in ms (int or digit string); None = engine default 1000.",
        default=None,
        check=_check_sync_kv_timeout,
        render=_render_timeout,
        parse=_decimal_in(1, INT32_MAX),
        field="sync_kv_timeout_ms",
    )
    enable_cache_manager = Prop(
        OPT_ENABLE_CACHE_MANAGER,
        doc="Select v2 (CacheManager) mode; dxl always runs v2.",
        default=False,
        check=_bool_or_unset,
        render=_flag,
        parse=_parse_flag,
        field="enable_cache_manager",
    )
    enable_remote_cache_accessible = Prop(
        OPT_ENABLE_REMOTE_CACHE_ACCESSIBLE,
        doc="Remote-cache-accessible mode (affects ``pull_cache`` key types and consumption).",
        default=False,
        check=_bool_or_unset,
        render=_flag,
        parse=_parse_flag,
        absent=_hixl_backend,
        field="enable_remote_cache_accessible",
    )
    mem_pool_cfg = Prop(
        OPT_MEM_POOL,
        doc='Device pool JSON ``{"memory_size": int, "page_shift": int}`` (validated, no effect).',
        default="",
        check=_text_or_unset,
        render=_as_is,
        parse=_parse_pool,  # DEVICE pools wait for the cuda transport
    )
    host_mem_pool_cfg = Prop(
        OPT_HOST_MEM_POOL,
        doc="Host pool JSON, same schema as :attr:`mem_pool_cfg`; backs HOST ``allocate_*``.",
        default="",
        check=_text_or_unset,
        render=_as_is,
        parse=_parse_pool,
        field="host_mem_pool",
    )
    buf_pool_cfg = Prop(
        OPT_BUF_POOL,
        doc="v1 buffer pool JSON (accepted, no effect in dxl).",
        default="",
        check=_text_or_unset,
        render=_as_is,
    )
    rdma_traffic_class = Prop(
        OPT_RDMA_TRAFFIC_CLASS,
        doc="RDMA traffic class (accepted, no effect in dxl).",
        default=None,
        check=_uint32,
        render=_decimal,
        parse=_decimal_in(0, UINT32_MAX),
    )
    rdma_service_level = Prop(
        OPT_RDMA_SERVICE_LEVEL,
        doc="RDMA service level (accepted, no effect in dxl).",
        default=None,
        check=_uint32,
        render=_decimal,
        parse=_decimal_in(0, UINT32_MAX),
    )
    link_total_time = Prop(
        OPT_LINK_TOTAL_TIME,
        doc="Rank-table ``link()`` setup timeout in s, 0 = default (120 s, the reference's "
        "HCCL_CONNECT_TIMEOUT); ``link_clusters`` uses its own ``timeout``.",
        default=0,
        check=_int_in(
            0, UINT32_MAX, "{name} should be an integer between [0, 2^32-1], given value is {value}"
        ),
        render=_decimal,
        parse=_decimal_in(0, UINT32_MAX),
        field="link_total_time_s",
    )
    link_retry_count = Prop(
        OPT_LINK_RETRY_COUNT,
        doc="HCCL link-setup retries, 1..100 (accepted, no effect in dxl).",
        default=1,
        check=_int_in(
            1,
            _MAX_LINK_RETRY_COUNT,
            "{name} should be an integer between [{low}, {high}], given value is {value}",
        ),
        render=_decimal,
        parse=_decimal_in(1, _MAX_LINK_RETRY_COUNT),
    )
    local_comm_res = Prop(
        OPT_LOCAL_COMM_RES,
        doc='Local communication resources JSON; setting it (even to "") implies v2 options.',
        default="",
        check=_text,
        render=_as_is,
        implies={OPT_ENABLE_CACHE_MANAGER: "1", OPT_ENABLE_REMOTE_CACHE_ACCESSIBLE: "1"},
    )
    transfer_backend = Prop(
        OPT_TRANSFER_BACKEND,
        doc='Transfer backend; only "hixl", with its preconditions (no effect in dxl).',
        default="",
        check=_text,
        render=_as_is,
        parse=_parse_transfer_backend,
    )
    global_resource_config = Prop(
        OPT_GLOBAL_RESOURCE_CONFIG,
        doc="HIXL resource JSON (accepted, no effect in dxl).",
        default="",
        check=_text,
        render=_as_is,
    )
    enable_switch_role = Prop(
        OPT_ENABLE_SWITCH_ROLE,
        doc='Emit ``llm.EnableSwitchRole="1"`` (v1 requirement; harmless in v2).',
        default=False,
        check=_true_or_unset,
        render=_flag,
    )
    mem_utilization = Prop(
        OPT_MEM_UTILIZATION,
        doc="v1 pool utilisation fraction in [0, 1] (always emitted, no effect in dxl).",
        default=_DEFAULT_MEM_UTILIZATION,
        always=True,
        check=_check_fraction,
        render=str,
        parse=_parse_fraction,
    )
    deploy_res_path = Prop(
        OPT_DEPLOY_RES_PATH,
        doc="v1 offline option (accepted, no effect in dxl).",
        default="",
        check=_text_or_unset,
        render=_as_is,
    )
    output_max_size = Prop(
        OPT_OUTPUT_MAX_SIZE,
        doc="v1 offline option (accepted, no effect in dxl).",
        default=None,
        check=_int_or_unset,
        render=_decimal,
    )
    cluster_info = Prop(
        OPT_CLUSTER_INFO,
        doc="v1 offline cluster JSON; dotted ips in ``listen_ip_info[*].ip`` become ints.",
        default="",
        check=_check_cluster_info,
        render=_as_is,
    )

    # -- dxl extensions -------------------------------------------------------------------

    rank_table_base_port = Prop(
        OPT_RANK_TABLE_BASE_PORT,
        doc="dxl: rank-table ``link()``: rank r listens on its device (or host) IP at this port "
        f"plus r (default {DEFAULT_RANK_TABLE_BASE_PORT}).",
        default=DEFAULT_RANK_TABLE_BASE_PORT,
        check=_int_in(1, UINT16_MAX, "{name} must be in [1, 65535], got {value}"),
        render=_decimal,
        parse=_decimal_in(1, UINT16_MAX),
        field="rank_table_base_port",
    )
    max_registered_addrs = Prop(
        OPT_MAX_REGISTER_ADDRS,
        doc="dxl: cap on registered addresses (default 240; spec stance 4).",
        default=DEFAULT_MAX_REGISTERED_ADDRS,
        check=_int_in(1, None, "{name} must be >= 1, got {value}"),
        render=_decimal,
        parse=_decimal_in(1, INT32_MAX),
        field="max_registered_addrs",
    )
    heartbeat_interval_ms = Prop(
        OPT_HEARTBEAT_INTERVAL_MS,
        doc="dxl: link heartbeat period in ms (default 1000); a silent peer is dropped after 3.",
        default=DEFAULT_HEARTBEAT_INTERVAL_MS,
        check=_int_in(1, None, "{name} must be > 0, got {value}", int32=True),
        render=_decimal,
        parse=_decimal_in(1, INT32_MAX),
        field="heartbeat_interval_ms",
    )
    transfer_threads = Prop(
        OPT_TRANSFER_THREADS,
        doc=f"dxl: threads that split one large request, 1..{MAX_TRANSFER_THREADS} (the native "
        "pool's bound, ``MAX_TRANSFER_THREADS``; default 2).",
        default=DEFAULT_TRANSFER_THREADS,
        check=_int_in(1, MAX_TRANSFER_THREADS, "{name} must be in [{low}, {high}], got {value}"),
        render=_decimal,
        parse=_decimal_in(1, MAX_TRANSFER_THREADS),
        field="transfer_threads",
    )
    allow_remote_listen = Prop(
        OPT_ALLOW_REMOTE_LISTEN,
        doc="dxl: allow listening on a non-loopback address without a shared secret.",
        default=False,
        check=_bool,
        render=_flag,
        parse=_parse_flag,
        field="allow_remote_listen",
    )
    transport = Prop(
        OPT_TRANSPORT,
        doc=f"dxl: one of {TRANSPORTS}: auto tries {AUTO_ORDER} in order (same-host "
        "first), never nixl; ``DXL_TRANSPORT`` applies when unset.",
        default=AUTO_TRANSPORT,
        check=_check_transport,
        render=_as_is,
        env=ENV_TRANSPORT,
        parse=_parse_transport,
        field="transport",
    )
    nixl_allow_emulated = Prop(
        OPT_NIXL_ALLOW_EMULATED,
        doc="dxl: let dxl.Transport=nixl link on a host without RDMA hardware, where UCX "
        "emulates RMA over tcp/cma/shared memory and a linked NIXL peer can read and write any "
        "address of this process (docs/security.md); off by default.",
        default=False,
        check=_bool,
        render=_flag,
        parse=_parse_flag,
        field="nixl_allow_emulated",
    )
    share_registered = Prop(
        OPT_SHARE_REGISTERED,
        doc="dxl: move registered HOST memory onto shared memory in place, so same-host peers "
        "memcpy it. Unset (the default): only where nothing can have pinned the memory (no "
        "GPU/RDMA runtime mapped, VmPin 0) and the transport may be cma; False: never; True: "
        "always (docs/api.md says when that is safe).",
        default=None,
        check=_bool_or_unset,
        render=_flag,
        parse=_parse_flag,
        field="share_registered",
    )
    auth_token = Prop(
        OPT_AUTH_TOKEN,
        doc="dxl: shared secret that authenticates links and data connections; "
        "``DXL_AUTH_TOKEN`` applies when unset. Never logged.",
        default=None,
        check=_check_secret,
        render=_as_is,
        env=ENV_AUTH_TOKEN,
        parse=_parse_secret,
        field="auth_token",
        secret=True,
    )

    # -- the builder ----------------------------------------------------------------------

    def __init__(self) -> None:
        self._options: dict[str, str] = {}
        self._values: dict[str, Any] = {}  # property name -> stored value; absent = unset

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
        for prop in _PROPERTIES:
            if prop.name in self._values:
                prop.write(opts, self._values[prop.name])
            elif prop.always:
                prop.write(opts, prop.default)
        for prop in _PROPERTIES:
            if prop.name in self._values:
                for key, text in prop.implies.items():
                    if _BY_KEY[key].name not in self._values:  # explicitly set wins
                        opts[key] = text
        return opts

    def __repr__(self) -> str:
        # Built on a copy: repr must not change what generate_options has accumulated.
        shown = {
            k: ("***" if k in SECRET_OPTIONS else v)
            for k, v in self._build(dict(self._options)).items()
        }
        return f"LLMConfig({shown!r})"


LlmConfig = LLMConfig

# Keys with no LLMConfig property (the reference has none for them): set them in
# ``ge_options`` or in the dict given to ``init``.
KEY_ONLY_OPTIONS: tuple[Option, ...] = (
    Option(
        OPT_FLOW_GRAPH_MEM_MAX_SIZE,
        doc="v1 bound on total KV memory: one decimal integer (validated, no effect in dxl).",
        parse=_parse_single_decimal,
    ),
    Option(
        OPT_HANDOFF_LEASE_S,
        doc="dxl: handoff offers' lease in s when offer() names none, in (0, 86400] "
        f"(default {DEFAULT_HANDOFF_LEASE_S:g}).",
        parse=_seconds_up_to(MAX_HANDOFF_SECONDS),
        field="handoff_lease_s",
    ),
    Option(
        OPT_HANDOFF_FETCH_TIMEOUT_S,
        doc="dxl: handoff fetches' and pushes' timeout in s when the call names none, in "
        f"(0, 86400] (default {DEFAULT_HANDOFF_FETCH_TIMEOUT_S:g}).",
        parse=_seconds_up_to(MAX_HANDOFF_SECONDS),
        field="handoff_fetch_timeout_s",
    ),
    Option(
        OPT_HANDOFF_MAX_FETCHES,
        doc="dxl: the handoff's fetches in flight at once (``Handoff.max_fetches``'s start "
        f"value), 0..2^32-1; 0 holds every fetch (default {DEFAULT_HANDOFF_MAX_FETCHES}).",
        parse=_decimal_in(0, UINT32_MAX),
        field="handoff_max_fetches",
    ),
    Option(
        OPT_INLINE_BYTES,
        doc="dxl: same-host requests up to this many bytes run on the loop thread "
        "(default 65536; 0: never).",
        parse=_decimal_in(0, _MAX_INLINE_BYTES),
        field="inline_bytes",
    ),
)

_PROPERTIES: tuple[Prop[Any, Any, Any], ...] = tuple(
    v for v in vars(LLMConfig).values() if isinstance(v, Prop)
)
# Key-only entries go first: init checks ge.flowGraphMemMaxSize before anything else (spec 5.2).
OPTIONS: tuple[Option, ...] = (*KEY_ONLY_OPTIONS, *_PROPERTIES)
"""The whole option table, in the order an engine reads it."""
_BY_KEY: dict[str, Prop[Any, Any, Any]] = {k: p for p in _PROPERTIES for k in p.keys}
SECRET_OPTIONS = frozenset(k for opt in OPTIONS if opt.secret for k in opt.keys)


# --------------------------------------------------------------------------------------------
# Parsing an option dict


@dataclass(frozen=True)
class EngineOptions:
    """Typed engine settings parsed from an ``init`` option dict.

    Each field is filled by the table entry that names it (see that entry's doc); an absent
    option leaves the default below. ``raw`` is a copy of every option, unknown ones
    included. ``auth_token`` is never shown.
    """

    device_id: int | None = None
    listen: tuple[str, int] | None = None
    sync_kv_timeout_ms: int = DEFAULT_SYNC_KV_TIMEOUT_MS
    enable_cache_manager: bool = False
    enable_remote_cache_accessible: bool = False
    host_mem_pool: PoolConfig | None = None
    max_registered_addrs: int = DEFAULT_MAX_REGISTERED_ADDRS
    heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS
    transfer_threads: int = DEFAULT_TRANSFER_THREADS
    allow_remote_listen: bool = False
    transport: str = AUTO_TRANSPORT
    inline_bytes: int = DEFAULT_INLINE_BYTES
    nixl_allow_emulated: bool = False
    share_registered: bool | None = None  # None: automatic (docs/api.md)
    auth_token: str | None = field(default=None, repr=False)
    link_total_time_s: int = 0
    rank_table_base_port: int = DEFAULT_RANK_TABLE_BASE_PORT
    handoff_lease_s: float = DEFAULT_HANDOFF_LEASE_S
    handoff_fetch_timeout_s: float = DEFAULT_HANDOFF_FETCH_TIMEOUT_S
    handoff_max_fetches: int = DEFAULT_HANDOFF_MAX_FETCHES
    raw: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def handoff(self) -> HandoffSettings:
        """The settings of the handoff layer, and only those."""
        return HandoffSettings(
            lease_s=self.handoff_lease_s,
            fetch_timeout_s=self.handoff_fetch_timeout_s,
            max_fetches=self.handoff_max_fetches,
        )

    @classmethod
    def from_options(cls, options: dict[str, str]) -> EngineOptions:
        """Validate and parse an option dict (the caller's dict is not modified).

        Options are read in table order. Setting ``llm.LocalCommRes`` (or
        ``llm.TransferBackend=hixl`` for the remote-accessible flag) defaults the
        cache-manager flags to on, as ``init`` does.

        Raises:
            TypeError: ``options`` not a dict, or a key or value not a str.
            LLMException: ``LLM_PARAM_INVALID`` naming the option for a bad value.
        """
        check_dict("options", options, str, str)
        raw = dict(options)
        # What init sees: the caller's options plus the keys that set ones imply.
        seen = dict(raw)
        for opt in OPTIONS:
            if any(k in raw for k in opt.keys):
                for key, text in opt.implies.items():
                    seen.setdefault(key, text)
        fields: dict[str, Any] = {}
        for opt in OPTIONS:
            value = opt.read(seen)
            if opt.field is not None and value is not _NO_VALUE:
                fields[opt.field] = value
        return cls(**fields, raw=raw)


@dataclass(frozen=True)
class HandoffSettings:
    """What the handoff layer reads of the engine's options (``EngineOptions.handoff``).

    Attributes:
        lease_s: an offer's lease when ``offer()`` names none (``dxl.HandoffLeaseS``).
        fetch_timeout_s: a fetch's or push's timeout when the call names none
            (``dxl.HandoffFetchTimeoutS``).
        max_fetches: fetches in flight at once, the start value of ``Handoff.max_fetches``
            (``dxl.HandoffMaxFetches``).
    """

    lease_s: float = DEFAULT_HANDOFF_LEASE_S
    fetch_timeout_s: float = DEFAULT_HANDOFF_FETCH_TIMEOUT_S
    max_fetches: int = DEFAULT_HANDOFF_MAX_FETCHES


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
                None, f"{name}: {host!r} is not an IPv4 address (write IPv6 as '[addr]:port')"
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
    return _parse_listen(text, OPT_LISTEN_IP_INFO, opts)
