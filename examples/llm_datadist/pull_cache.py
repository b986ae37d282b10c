"""The decode pulls CacheKey(1, 0) and (1, 1) of a pool-allocated cache, consuming the keys.

Reproduces the reference's ``pull_cache_sample.py`` (spec section 12.4): both engines enable
the cache manager with a memory pool; the prefill calls ``allocate_cache(desc,
[CacheKey(prompt_cluster_id=1, req_id=0), CacheKey(1, req_id=1), ...])`` and fills the cache;
the decode calls ``allocate_cache(desc)``, ``pull_cache(CacheKey(1, 0), cache,
batch_index=0)`` and ``pull_cache(CacheKey(1, 1), cache, batch_index=1)``; the prefill then
calls ``remove_cache_key`` for each key and ``deallocate_cache``; the decode deallocates too.

Besides what every flow here changes (see ``_common.py``): ``link_clusters`` replaces the
rank-table ``link()`` / ``query_register_mem_status`` / ``unlink(comm_id)`` steps, which dxl
does not have yet (the prefill listens, the decode links); the pools are
``host_mem_pool_cfg``, not the sample's DEVICE ``mem_pool_cfg``; the prefill binds a third key
the decode never pulls, for ``remove_cache_key`` to unbind, and the decode checks that a
consumed and a removed key can no longer be pulled (``LLM_KV_CACHE_NOT_EXIST``).

    python examples/llm_datadist/pull_cache.py
"""

from __future__ import annotations

import sys

import _common
from _common import LOCALHOST, Flow, cluster_info, expect, expect_ok, init_datadist

import dxl
from dxl.testing import KVBuffers

PROMPT_CLUSTER_ID, DECODER_CLUSTER_ID = 1, 2
PROMPT_SEED = 1
ALL = range(4)
BATCHES = range(3)  # the sample's 2 batches, plus one whose key is never pulled
CACHE_DESC = dxl.CacheDesc(
    num_tensors=len(ALL),
    shape=[len(BATCHES), 64 * 1024],
    data_type=dxl.DataType.DT_FLOAT16,
    placement=dxl.Placement.HOST,
)
BATCH_BYTES = CACHE_DESC.size // len(BATCHES)  # 128 KiB
CACHE_KEYS = [dxl.CacheKey(prompt_cluster_id=PROMPT_CLUSTER_ID, req_id=i) for i in BATCHES]


def init(role: dxl.LLMRole, cluster_id: int, **config: str) -> dxl.LLMDataDist:
    # 8 MiB pools (the sample's is 1 GiB of device memory); allocations round to 64 KiB pages
    return init_datadist(
        role,
        cluster_id,
        enable_cache_manager=True,
        host_mem_pool_cfg='{"memory_size": 8388608}',
        **config,
    )


def run_prompt_sample(flow: Flow) -> None:
    datadist = init(dxl.LLMRole.PROMPT, PROMPT_CLUSTER_ID, listen_ip_info=f"{LOCALHOST}:0")
    cache_manager = datadist.cache_manager
    cache = cache_manager.allocate_cache(CACHE_DESC, CACHE_KEYS)
    KVBuffers.over(cache.tensor_addrs, len(BATCHES), BATCH_BYTES, PROMPT_SEED)  # fill it
    flow.barrier("prompt prepared", datadist.engine.listen_address)
    flow.barrier("decoder pulled")
    # keys 0 and 1 were consumed by the pulls (no-ops here); key 2 was never pulled
    for cache_key in CACHE_KEYS:
        cache_manager.remove_cache_key(cache_key)
    flow.barrier("keys removed")
    flow.barrier("decoder checked")
    cache_manager.deallocate_cache(cache)
    expect(cache.tensor_addrs == [], "deallocate_cache left tensor_addrs")
    flow.barrier("prompt deallocated")  # while linked, as the sample (it unlinks after)
    flow.barrier("unlink end")
    datadist.finalize()


def run_decoder_sample(flow: Flow) -> None:
    datadist = init(dxl.LLMRole.DECODER, DECODER_CLUSTER_ID)
    cache_manager = datadist.cache_manager
    cache = cache_manager.allocate_cache(CACHE_DESC)
    kv = KVBuffers.over(cache.tensor_addrs, len(BATCHES), BATCH_BYTES, fill=False)
    prompt_address = flow.barrier("prompt prepared")["prompt"]

    cluster = cluster_info(PROMPT_CLUSTER_ID, prompt_address)
    expect_ok(datadist.link_clusters([cluster], 5000), "link_clusters")
    cache_key_0, cache_key_1, cache_key_2 = CACHE_KEYS
    cache_manager.pull_cache(cache_key_0, cache, batch_index=0)
    cache_manager.pull_cache(cache_key_1, cache, batch_index=1)
    expect(kv.matches(ALL, [0, 1], PROMPT_SEED, ALL, [0, 1]), "batches 0, 1 are wrong")
    not_exist = dxl.LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    _common.expect_status(not_exist, cache_manager.pull_cache, cache_key_0, cache, 2)  # consumed
    flow.barrier("decoder pulled")
    flow.barrier("keys removed")
    _common.expect_status(not_exist, cache_manager.pull_cache, cache_key_2, cache, 2)  # removed
    expect(kv.untouched(ALL, [2]), "batch 2 was written")
    flow.barrier("decoder checked")
    flow.barrier("prompt deallocated")

    cache_manager.deallocate_cache(cache)
    expect_ok(datadist.unlink_clusters([cluster], 5000), "unlink_clusters")
    flow.barrier("unlink end")
    datadist.finalize()


if __name__ == "__main__":
    sys.exit(Flow.run(__doc__, prompt=run_prompt_sample, decoder=run_decoder_sample))
