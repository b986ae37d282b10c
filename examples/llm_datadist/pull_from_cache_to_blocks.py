"""Both sides link() by rank table; the decode pulls a keyed batch into four scattered blocks.

Reproduces the reference's ``pull_from_cache_to_blocks.py`` (spec section 12.4, contiguous to
blocks): both engines enable the cache manager; the decode registers its tensors with
``register_blocks_cache(desc, addrs)`` (no key) and then runs the sample's ``link()``
(``pull_sample_common.link``):

    comm_id = datadist.link("link", {1: 0, 2: 1}, json.dumps(rank_table))
    while datadist.query_register_mem_status(comm_id) != RegisterMemStatus.OK:  # FAILED: error
        time.sleep(1)

the prefill, with a memory pool, runs ``link()`` FIRST and only then calls
``allocate_cache(desc, [CacheKey(prompt_cluster_id=1, req_id=0, model_id=0)])`` (dxl tells
linked peers of a registration before the call returns); after a barrier the decode calls
``pull_blocks(CacheKey(1, 0, 0), cache, src_blocks=[], dst_blocks=[...])``, which cuts the
remote batch into local-block-sized chunks, chunk ``i`` landing in ``dst_blocks[i]``; both
``unlink(comm_id)``; after a barrier the prefill calls ``remove_cache_key`` (a no-op once the
pull consumed the key) and ``deallocate_cache``; both finalize.

Besides what every flow here changes (see ``_common.py``): the rank table is the sample's
one-server table with 127.0.0.1 as both devices' IP, and both sides set ``rank_table_base_port``
to a free base (dxl puts rank r at that port + r); the pool is ``host_mem_pool_cfg``, not a
DEVICE ``mem_pool_cfg``; a decode block is a quarter of a prefill batch (the sample's block is
the whole batch, ``dst_blocks=[0]``); the decode checks that the consumed key cannot be pulled
again.

    python examples/llm_datadist/pull_from_cache_to_blocks.py
"""

from __future__ import annotations

import functools
import sys

import _common
from _common import Flow, expect, host_kv, init_datadist

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


def run_prompt_sample(base_port: int, flow: Flow) -> None:
    datadist = init_datadist(
        dxl.LLMRole.PROMPT,
        PROMPT_CLUSTER_ID,
        enable_cache_manager=True,
        host_mem_pool_cfg='{"memory_size": 4194304}',
        rank_table_base_port=base_port,
    )
    comm_id = _common.link(datadist, _common.single_server_rank_table())
    cache_manager = datadist.cache_manager
    cache = cache_manager.allocate_cache(PROMPT_DESC, [CACHE_KEY])  # after link(), as the sample
    KVBuffers.over(cache.tensor_addrs, 2, PROMPT_DESC.size // 2, PROMPT_SEED)  # fill it
    flow.barrier("cache ready")
    flow.barrier("decoder pull_blocks end")
    datadist.unlink(comm_id)
    flow.barrier("wait peer unlink end")
    cache_manager.remove_cache_key(CACHE_KEY)  # a no-op: the pull consumed it
    cache_manager.deallocate_cache(cache)
    expect(cache.tensor_addrs == [], "deallocate_cache left tensor_addrs")
    datadist.finalize()


def run_decoder_sample(base_port: int, flow: Flow) -> None:
    datadist = init_datadist(
        dxl.LLMRole.DECODER,
        DECODER_CLUSTER_ID,
        enable_cache_manager=True,
        rank_table_base_port=base_port,
    )
    cache_manager = datadist.cache_manager
    kv = host_kv(DECODER_DESC)
    cache = cache_manager.register_blocks_cache(DECODER_DESC, kv.addrs)
    comm_id = _common.link(datadist, _common.single_server_rank_table())
    flow.barrier("cache ready")

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
    flow.barrier("decoder pull_blocks end")
    datadist.unlink(comm_id)
    flow.barrier("wait peer unlink end")
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    base = _common.free_port_base()
    sys.exit(
        Flow.run(
            __doc__,
            prompt=functools.partial(run_prompt_sample, base),
            decoder=functools.partial(run_decoder_sample, base),
        )
    )
