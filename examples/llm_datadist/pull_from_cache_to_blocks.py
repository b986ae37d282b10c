"""The decode pulls batch 0 of a CacheKey-bound contiguous cache into four scattered blocks.

Reproduces the reference's ``pull_from_cache_to_blocks.py`` (spec section 12.4, contiguous to
blocks): the prefill, with a memory pool, calls ``allocate_cache(desc,
[CacheKey(prompt_cluster_id=1, req_id=0, model_id=0)])`` and fills it; the decode registers
its tensors with ``register_blocks_cache(desc, addrs)`` (no key) and calls
``pull_blocks(CacheKey(1, 0, 0), cache, src_blocks=[], dst_blocks=[...])``, which cuts the
remote batch into local-block-sized chunks, chunk ``i`` landing in ``dst_blocks[i]``; the
prefill then calls ``remove_cache_key`` (a no-op once a pull consumed the key) and
``deallocate_cache``.

Besides what every flow here changes (see ``_common.py``): ``link_clusters`` replaces the
rank-table ``link()``, which dxl does not have yet; the pool is ``host_mem_pool_cfg``, not a
DEVICE ``mem_pool_cfg``; a decode block is a quarter of a prefill batch (the sample's block is
the whole batch, ``dst_blocks=[0]``); the decode checks that the consumed key cannot be pulled
again.

    python examples/llm_datadist/pull_from_cache_to_blocks.py
"""

from __future__ import annotations

import sys

import _common
from _common import LOCALHOST, Flow, cluster_info, expect, expect_ok, host_kv, init_datadist

import dxl
from dxl.testing import KVBuffers

PROMPT_CLUSTER_ID, DECODER_CLUSTER_ID = 1, 2
PROMPT_SEED = 1
ALL = range(4)
PROMPT_DESC = dxl.CacheDesc(
    num_tensors=len(ALL),
    shape=[2, 128 * 1024],  # 256 KiB batches
    data_type=dxl.DataType.DT_FLOAT16,
    placement=dxl.Placement.HOST,
)
BLOCKS = range(8)  # of a quarter batch each
DECODER_DESC = dxl.CacheDesc(
    num_tensors=len(ALL),
    shape=[len(BLOCKS), 32 * 1024],
    data_type=dxl.DataType.DT_FLOAT16,
    placement=dxl.Placement.HOST,
)
DST_BLOCKS = [5, 2, 7, 0]  # quarter i of the prefill's batch 0 -> decode block DST_BLOCKS[i]
CACHE_KEY = dxl.CacheKey(prompt_cluster_id=PROMPT_CLUSTER_ID, req_id=0, model_id=0)


def run_prompt_sample(flow: Flow) -> None:
    datadist = init_datadist(
        dxl.LLMRole.PROMPT,
        PROMPT_CLUSTER_ID,
        enable_cache_manager=True,
        host_mem_pool_cfg='{"memory_size": 4194304}',
        listen_ip_info=f"{LOCALHOST}:0",
    )
    cache_manager = datadist.cache_manager
    cache = cache_manager.allocate_cache(PROMPT_DESC, [CACHE_KEY])
    KVBuffers.over(cache.tensor_addrs, 2, PROMPT_DESC.size // 2, PROMPT_SEED)  # fill it
    flow.barrier("prompt prepared", datadist.engine.listen_address)
    flow.barrier("decoder pulled")
    cache_manager.remove_cache_key(CACHE_KEY)  # a no-op: the pull consumed it
    cache_manager.deallocate_cache(cache)
    flow.barrier("prompt deallocated")  # while linked, as the sample (it unlinks after)
    flow.barrier("unlink end")
    datadist.finalize()


def run_decoder_sample(flow: Flow) -> None:
    datadist = init_datadist(dxl.LLMRole.DECODER, DECODER_CLUSTER_ID, enable_cache_manager=True)
    cache_manager = datadist.cache_manager
    kv = host_kv(DECODER_DESC)
    cache = cache_manager.register_blocks_cache(DECODER_DESC, kv.addrs)
    prompt_address = flow.barrier("prompt prepared")["prompt"]

    cluster = cluster_info(PROMPT_CLUSTER_ID, prompt_address)
    expect_ok(datadist.link_clusters([cluster], 5000), "link_clusters")
    cache_manager.pull_blocks(CACHE_KEY, cache, src_blocks=[], dst_blocks=DST_BLOCKS)
    # the prefill's batch 0 is its first four decode-sized blocks
    expect(
        kv.matches(ALL, DST_BLOCKS, PROMPT_SEED, ALL, range(4)),
        f"blocks {DST_BLOCKS} do not hold the quarters of batch 0",
    )
    others = sorted(set(BLOCKS) - set(DST_BLOCKS))
    expect(kv.untouched(ALL, others), f"blocks {others} were written")
    _common.expect_status(
        dxl.LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
        cache_manager.pull_blocks,
        CACHE_KEY,
        cache,
        [],
        [1],
    )  # the key was consumed
    flow.barrier("decoder pulled")
    flow.barrier("prompt deallocated")

    expect_ok(datadist.unlink_clusters([cluster], 5000), "unlink_clusters")
    cache_manager.unregister_cache(cache.cache_id)
    flow.barrier("unlink end")
    datadist.finalize()


if __name__ == "__main__":
    sys.exit(Flow.run(__doc__, prompt=run_prompt_sample, decoder=run_decoder_sample))
