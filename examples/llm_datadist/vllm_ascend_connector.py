"""The LLM-DataDist calls of vLLM-Ascend's connector: rank-table link() per peer, then pulls.

Replays the call sequence of ``LLMDataDistCMgrConnectorWorker``, the LLM-DataDist connector
vLLM-Ascend shipped (``llmdatadist_c_mgr_connector.py``, spec section 12.4), non-MLA path:

- each worker: ``LLMDataDist(role, cluster_id)``; ``LLMConfig()`` with ``device_id``,
  ``sync_kv_timeout = 20000``, ``enable_switch_role``, ``enable_cache_manager`` and
  ``enable_remote_cache_accessible`` set; ``init(llm_config.generate_options())``;
- ``register_kv_caches``: one address per K and per V tensor of every layer, each 2 MiB aligned
  (the connector asserts it), ``CacheDesc(len(addrs), [num_blocks, block_size, num_heads,
  head_dim], DT_FLOAT16)`` and ``register_blocks_cache(desc, addrs,
  BlocksCacheKey(cluster_id=<own>))``;
- ``add_remote_agent``, on both sides once they have exchanged agent metadata (the decode in
  its transfer thread before its first pull, the prefill in its metadata-listener thread):
  ``link(f"pd_comm_{prefill_device_ip}_{decode_device_ip}", {prefill_cluster_id: 0,
  decode_cluster_id: 1}, json.dumps(rank_table))`` with the rank table it builds for peers on
  one server (``version`` "1.2", ``server_count`` "1", ``status`` "completed", one server whose
  ``server_id`` is the host IP and whose devices are ``{device_id, device_ip, rank_id}``, no
  ``host_ip``), then ``query_register_mem_status(comm_id=comm_id)`` once a second until ``OK``
  (``FAILED``: error); a peer already linked is skipped;
- ``_read_blocks``, per request on the decode's one transfer thread: the remote block ids cut to
  the last ``len(local_block_ids)`` (the decode computed the first ones itself), then
  ``pull_blocks(BlocksCacheKey(cluster_id=remote_cluster_id), cache, remote_block_ids,
  local_block_ids)``;
- ``remove_remote_agent``: ``unlink(comm_id)``; then ``finalize``.

Besides what every flow here changes (see ``_common.py``): ZMQ's metadata and "finished"
messages travel over the flow's barriers; the device IPs and the server id are 127.0.0.1 and
both sides set ``rank_table_base_port`` to a free base (dxl puts rank r at that port + r); the
KV tensors are 2 MiB-aligned HOST memory registered with ``remote_accessible=True``; the decode
checks every block of every request and that no other block changed.

    python examples/llm_datadist/vllm_ascend_connector.py
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import _common
from _common import LOCALHOST, Flow, expect

import dxl
from dxl.testing import KVBuffers

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_HEADS, HEAD_DIM = 2, 16, 128, 2, 64
BLOCK_BYTES = BLOCK_SIZE * NUM_HEADS * HEAD_DIM * dxl.DataType.DT_FLOAT16.itemsize  # 32 KiB
ALL = range(2 * NUM_LAYERS)  # K and V of each layer
ALIGNMENT = 2 * 1024 * 1024
PROMPT_CLUSTER_ID, DECODER_CLUSTER_ID = 4, 6  # from the deployment's rank table
PROMPT_SEED = 1
POLL_S = 1.0  # the connector's pause between query_register_mem_status calls
# request id -> (the prefill's block ids, the decode's block ids); req-1 hit 2 cached blocks
REQUESTS = {
    "req-0": ([3, 7, 1], [0, 1, 2]),
    "req-1": ([10, 11, 12, 13], [5, 9]),
    "req-2": ([4], [15]),
}


@dataclass
class AgentMetadata:
    """The connector's ``LLMDataDistCMgrAgentMetadata``."""

    super_pod_id: str | None
    server_id: str
    device_id: str
    device_ip: str
    super_device_id: str | None
    cluster_id: int


class Worker:
    """The LLM-DataDist calls of ``LLMDataDistCMgrConnectorWorker``, in its order."""

    def __init__(self, role: dxl.LLMRole, metadata: AgentMetadata, base_port: int) -> None:
        self.llm_datadist_role = role
        self.local_agent_metadata = metadata
        self.linked_cluster: dict[int, int] = {}  # remote cluster id -> comm id
        self.llm_datadist = dxl.LLMDataDist(role, metadata.cluster_id)
        self.init_llm_datadist(base_port)

    def init_llm_datadist(self, base_port: int) -> None:
        llm_config = dxl.LLMConfig()
        llm_config.device_id = int(self.local_agent_metadata.device_id)
        llm_config.sync_kv_timeout = 20000
        llm_config.enable_switch_role = True
        llm_config.enable_cache_manager = True
        llm_config.enable_remote_cache_accessible = True
        llm_config.rank_table_base_port = base_port  # dxl: where rank r listens (base + r)
        self.llm_datadist.init(llm_config.generate_options())
        self.cache_manager = self.llm_datadist.cache_manager

    def register_kv_caches(self, kv: KVBuffers) -> None:
        self.cache_addr: list[int] = []
        for base_addr in kv.addrs:  # K and V of every layer
            expect(base_addr % ALIGNMENT == 0, "the KV cache must be aligned to 2M")
            self.cache_addr.append(base_addr)
        self.cache_desc = dxl.CacheDesc(
            len(self.cache_addr),
            [NUM_BLOCKS, BLOCK_SIZE, NUM_HEADS, HEAD_DIM],
            dxl.DataType.DT_FLOAT16,
            placement=dxl.Placement.HOST,
        )
        self.cache_key = dxl.BlocksCacheKey(cluster_id=int(self.local_agent_metadata.cluster_id))
        self.cache = self.cache_manager.register_blocks_cache(
            self.cache_desc, self.cache_addr, self.cache_key, remote_accessible=True
        )

    def add_remote_agent(self, metadata: AgentMetadata) -> int:
        remote_cluster_id = metadata.cluster_id
        if remote_cluster_id in self.linked_cluster:
            return remote_cluster_id  # already linked with this server
        is_same_server = metadata.server_id == self.local_agent_metadata.server_id
        expect(is_same_server, "this flow runs both workers on one server")
        if self.llm_datadist_role == dxl.LLMRole.PROMPT:
            prefill_metadata, decode_metadata = self.local_agent_metadata, metadata
        else:
            prefill_metadata, decode_metadata = metadata, self.local_agent_metadata
        comm_name = f"pd_comm_{prefill_metadata.device_ip}_{decode_metadata.device_ip}"
        cluster_rank_info = {prefill_metadata.cluster_id: 0, decode_metadata.cluster_id: 1}
        rank_table: dict[str, Any] = {
            "version": "1.2",
            "server_count": "1" if is_same_server else "2",
            "status": "completed",
            "server_list": [
                {
                    "device": [
                        _device_info(prefill_metadata, "0"),
                        _device_info(decode_metadata, "1"),
                    ],
                    "server_id": prefill_metadata.server_id,
                }
            ],
        }
        comm_id = self.llm_datadist.link(comm_name, cluster_rank_info, json.dumps(rank_table))
        deadline = time.monotonic() + _common.DEADLINE_S
        while True:
            ret = self.llm_datadist.query_register_mem_status(comm_id=comm_id)
            if ret == dxl.RegisterMemStatus.OK:
                break
            expect(ret != dxl.RegisterMemStatus.FAILED, f"linking failed, comm id: {comm_id}")
            expect(time.monotonic() < deadline, f"comm {comm_id} still {ret!r}")
            time.sleep(POLL_S)
        self.linked_cluster[remote_cluster_id] = comm_id
        return remote_cluster_id

    def remove_remote_agent(self, cluster_id: int) -> None:
        self.llm_datadist.unlink(self.linked_cluster.pop(cluster_id))

    def read_blocks(
        self, local_block_ids: list[int], remote_block_ids: list[int], remote: AgentMetadata
    ) -> None:
        """``_read_blocks``: link on first use, then pull the request's blocks."""
        remote_cluster_id = self.add_remote_agent(remote)  # connect_to_remote_agent
        num_local_blocks = len(local_block_ids)
        if num_local_blocks == 0:
            return
        expect(num_local_blocks <= len(remote_block_ids), "more local than remote blocks")
        if num_local_blocks < len(remote_block_ids):
            remote_block_ids = remote_block_ids[-num_local_blocks:]
        remote_cache_key = dxl.BlocksCacheKey(cluster_id=remote_cluster_id)
        self.cache_manager.pull_blocks(
            remote_cache_key, self.cache, remote_block_ids, local_block_ids
        )


def _device_info(metadata: AgentMetadata, rank_id: str) -> dict[str, str]:
    fields = [
        ("device_id", metadata.device_id),
        ("device_ip", metadata.device_ip),
        ("super_device_id", metadata.super_device_id),
        ("rank_id", rank_id),
    ]
    return {k: v for k, v in fields if v is not None}


def agent_metadata(cluster_id: int, device_id: int) -> AgentMetadata:
    return AgentMetadata(
        super_pod_id=None,
        server_id=LOCALHOST,  # the host IP (vllm.utils.get_ip())
        device_id=str(device_id),
        device_ip=LOCALHOST,
        super_device_id=None,
        cluster_id=cluster_id,
    )


def kv_caches(seed: int | None) -> KVBuffers:
    """The worker's KV tensors: 2 per layer, each its own 2 MiB-aligned allocation."""
    return KVBuffers(
        len(ALL), NUM_BLOCKS, BLOCK_BYTES, seed=seed or 0, fill=seed is not None, huge_pages=True
    )


def run_prefill_worker(base_port: int, flow: Flow) -> None:
    worker = Worker(dxl.LLMRole.PROMPT, agent_metadata(PROMPT_CLUSTER_ID, 0), base_port)
    kv = kv_caches(PROMPT_SEED)
    worker.register_kv_caches(kv)
    # ReqForMetadata: the decode asks for our metadata; we answer, then link to it
    metadata = flow.barrier("metadata", asdict(worker.local_agent_metadata))["decoder"]
    errors: list[BaseException] = []

    def metadata_listener() -> None:
        try:
            worker.add_remote_agent(AgentMetadata(**metadata))
        except BaseException as exc:
            errors.append(exc)

    listener = threading.Thread(target=metadata_listener, name="metadata_agent_listener")
    listener.start()
    listener.join(_common.DEADLINE_S)
    expect(not listener.is_alive() and not errors, f"add_remote_agent: {errors}")
    finished = flow.barrier("requests finished")["decoder"]  # ReqForFinished
    expect(sorted(finished) == sorted(REQUESTS), f"finished {finished}")
    expect(kv.untouched(ALL, range(NUM_BLOCKS)), "the prefill KV cache changed")
    worker.remove_remote_agent(DECODER_CLUSTER_ID)
    flow.barrier("unlinked")
    worker.cache_manager.unregister_cache(worker.cache.cache_id)
    worker.llm_datadist.finalize()


def run_decode_worker(base_port: int, flow: Flow) -> None:
    worker = Worker(dxl.LLMRole.DECODER, agent_metadata(DECODER_CLUSTER_ID, 1), base_port)
    kv = kv_caches(None)
    worker.register_kv_caches(kv)
    remote = AgentMetadata(
        **flow.barrier("metadata", asdict(worker.local_agent_metadata))["prompt"]
    )

    with ThreadPoolExecutor(1) as executor:  # start_load_kv: one transfer thread
        futures = [
            executor.submit(worker.read_blocks, local_ids, remote_ids, remote)
            for remote_ids, local_ids in REQUESTS.values()
        ]
        for future in futures:
            future.result(_common.DEADLINE_S)
    written: set[int] = set()
    for req_id, (remote_ids, local_ids) in REQUESTS.items():
        pulled = remote_ids[-len(local_ids) :]
        expect(kv.matches(ALL, local_ids, PROMPT_SEED, ALL, pulled), f"{req_id}: wrong blocks")
        written.update(local_ids)
    others = sorted(set(range(NUM_BLOCKS)) - written)
    expect(kv.untouched(ALL, others), f"blocks {others} were written")
    flow.barrier("requests finished", list(REQUESTS))
    worker.remove_remote_agent(PROMPT_CLUSTER_ID)
    flow.barrier("unlinked")
    worker.cache_manager.unregister_cache(worker.cache.cache_id)
    worker.llm_datadist.finalize()


if __name__ == "__main__":
    base = _common.free_port_base()
    sys.exit(
        Flow.run(
            __doc__,
            prompt=functools.partial(run_prefill_worker, base),
            decoder=functools.partial(run_decode_worker, base),
        )
    )
