"""The decode pushes its blocks [0, 1] into blocks [0, 2] of the prefill's keyed cache.

Reproduces the reference's ``push_blocks_sample.py`` (spec section 12.2): both engines register
blocks caches bound to their own ``BlocksCacheKey``; the prefill listens; the decode links and
calls ``push_blocks(BlocksCacheKey(PROMPT_CLUSTER_ID, 0), cache, src_blocks=[0, 1],
dst_blocks=[0, 2])`` (in v2 either side may push); both force-unlink, unregister, finalize.

Nothing changes beyond what every flow here changes (see ``_common.py``).

    python examples/llm_datadist/push_blocks.py
"""

from __future__ import annotations

import sys

from _common import LOCALHOST, Flow, cluster_info, expect, expect_ok, host_kv, init_datadist

import dxl

PROMPT_CLUSTER_ID, DECODER_CLUSTER_ID = 0, 1
PROMPT_SEED, DECODER_SEED = 1, 2  # stand for the sample's ones (prefill) and zeros (decode)
ALL = range(2)
CACHE_DESC = dxl.CacheDesc(
    num_tensors=len(ALL),
    shape=[3, 64 * 1024],  # 256 KiB blocks
    data_type=dxl.DataType.DT_FLOAT,
    placement=dxl.Placement.HOST,
)


def run_prompt_sample(flow: Flow) -> None:
    datadist = init_datadist(
        dxl.LLMRole.PROMPT, PROMPT_CLUSTER_ID, local_comm_res="", listen_ip_info=f"{LOCALHOST}:0"
    )
    cache_manager = datadist.cache_manager
    kv = host_kv(CACHE_DESC, PROMPT_SEED)
    cache = cache_manager.register_blocks_cache(
        CACHE_DESC, kv.addrs, dxl.BlocksCacheKey(PROMPT_CLUSTER_ID, 0), remote_accessible=True
    )
    flow.barrier("register end", datadist.engine.listen_address)
    flow.barrier("decoder push blocks end")
    expect(
        kv.matches(ALL, [0, 2], DECODER_SEED, ALL, [0, 1]),
        "prefill blocks [0, 2] do not hold decode blocks [0, 1]",
    )
    expect(kv.untouched(ALL, [1]), "prefill block 1 was written")

    unlink = datadist.unlink_clusters([cluster_info(DECODER_CLUSTER_ID)], 5000, force=True)
    expect_ok(unlink, "unlink_clusters(force=True)")
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def run_decoder_sample(flow: Flow) -> None:
    datadist = init_datadist(dxl.LLMRole.DECODER, DECODER_CLUSTER_ID, local_comm_res="")
    kv = host_kv(CACHE_DESC, DECODER_SEED)
    cache = datadist.cache_manager.register_blocks_cache(
        CACHE_DESC, kv.addrs, dxl.BlocksCacheKey(DECODER_CLUSTER_ID, 0)
    )
    prompt_address = flow.barrier("register end")["prompt"]

    cluster = cluster_info(PROMPT_CLUSTER_ID, prompt_address)
    expect_ok(datadist.link_clusters([cluster], 5000), "link_clusters")
    datadist.cache_manager.push_blocks(
        dxl.BlocksCacheKey(PROMPT_CLUSTER_ID, 0), cache, src_blocks=[0, 1], dst_blocks=[0, 2]
    )
    flow.barrier("decoder push blocks end")

    unlink = datadist.unlink_clusters([cluster_info(PROMPT_CLUSTER_ID)], 5000, force=True)
    expect_ok(unlink, "unlink_clusters(force=True)")
    expect(kv.untouched(ALL, range(3)), "the decode cache changed")
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    sys.exit(Flow.run(__doc__, prompt=run_prompt_sample, decoder=run_decoder_sample))
