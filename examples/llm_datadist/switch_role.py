"""Pull blocks, switch roles (the listener moves), then push all blocks back with layer ranges.

Reproduces the reference's ``switch_role_sample.py`` (spec section 12.3):

1. the prefill (listening) and the decode register blocks caches bound to their own
   ``BlocksCacheKey``; the decode links, pulls blocks ``[0, 1]`` into ``[0, 2]`` and unlinks
   (non-force);
2. the prefill calls ``switch_role(LLMRole.DECODER)`` (its listener closes); the decode calls
   ``switch_role(LLMRole.PROMPT, options)``, ``options`` built by
   ``LLMConfig().listen_ip_info = ...; generate_options()`` (it starts listening);
3. the former prefill links to the former decode, which pushes blocks ``[0, 1, 2]`` with
   ``src_layer_range=range(0, 2), dst_layer_range=range(0, 2), tensor_num_per_layer=1``;
   both force-unlink, unregister and finalize.

Besides what every flow here changes (see ``_common.py``): the former decode listens on a new
ephemeral port, not on the sample's fixed 26000, and posts it; both engines check that their
listeners closed and opened.

    python examples/llm_datadist/switch_role.py
"""

from __future__ import annotations

import sys

from _common import LOCALHOST, Flow, cluster_info, expect, expect_ok, host_kv, init_datadist

import dxl

PROMPT_CLUSTER_ID, DECODER_CLUSTER_ID = 0, 1
PROMPT_SEED, DECODER_SEED = 1, 2  # stand for the sample's ones (prefill) and zeros (decode)
ALL = range(2)  # 2 tensors, one per "layer" for the push (tensor_num_per_layer=1)
BLOCKS = range(3)
CACHE_DESC = dxl.CacheDesc(
    num_tensors=len(ALL),
    shape=[len(BLOCKS), 64 * 1024],
    data_type=dxl.DataType.DT_FLOAT,
    placement=dxl.Placement.HOST,
)


def force_unlink(datadist: dxl.LLMDataDist, remote_cluster_id: int) -> None:
    expect_ok(
        datadist.unlink_clusters([cluster_info(remote_cluster_id)], 5000, force=True),
        "unlink_clusters(force=True)",
    )


def run_prompt_sample(flow: Flow) -> None:
    datadist = init_datadist(
        dxl.LLMRole.PROMPT, PROMPT_CLUSTER_ID, local_comm_res="", listen_ip_info=f"{LOCALHOST}:0"
    )
    kv = host_kv(CACHE_DESC, PROMPT_SEED)
    cache = datadist.cache_manager.register_blocks_cache(
        CACHE_DESC, kv.addrs, dxl.BlocksCacheKey(PROMPT_CLUSTER_ID, 0), remote_accessible=True
    )
    flow.barrier("register end", datadist.engine.listen_address)
    flow.barrier("decoder unlink")
    expect(kv.untouched(ALL, BLOCKS), "the prefill cache changed during the pull")

    datadist.switch_role(dxl.LLMRole.DECODER)
    expect(datadist.engine.listen_address is None, "the listener is still open")
    flow.barrier("prompt switch role end, close listen")
    decoder_address = flow.barrier("decoder switch role end, listen")["decoder"]

    cluster = cluster_info(DECODER_CLUSTER_ID, decoder_address)
    expect_ok(datadist.link_clusters([cluster], 5000), "link_clusters")
    flow.barrier("prompt link end")
    flow.barrier("decoder push blocks end")
    # the former decode held our blocks [0, 1] in its blocks [0, 2], and its own block 1
    expect(kv.matches(ALL, [0, 2], PROMPT_SEED, ALL, [0, 1]), "blocks [0, 2] are wrong")
    expect(kv.matches(ALL, [1], DECODER_SEED, ALL, [1]), "block 1 is wrong")

    force_unlink(datadist, DECODER_CLUSTER_ID)
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def run_decoder_sample(flow: Flow) -> None:
    datadist = init_datadist(dxl.LLMRole.DECODER, DECODER_CLUSTER_ID, local_comm_res="")
    cache_manager = datadist.cache_manager
    kv = host_kv(CACHE_DESC, DECODER_SEED)
    cache = cache_manager.register_blocks_cache(
        CACHE_DESC, kv.addrs, dxl.BlocksCacheKey(DECODER_CLUSTER_ID, 0)
    )
    prompt_address = flow.barrier("register end")["prompt"]

    cluster = cluster_info(PROMPT_CLUSTER_ID, prompt_address)
    expect_ok(datadist.link_clusters([cluster], 5000), "link_clusters")
    cache_manager.pull_blocks(
        dxl.BlocksCacheKey(PROMPT_CLUSTER_ID, 0), cache, src_blocks=[0, 1], dst_blocks=[0, 2]
    )
    expect(kv.matches(ALL, [0, 2], PROMPT_SEED, ALL, [0, 1]), "pulled blocks [0, 2] are wrong")
    expect(kv.untouched(ALL, [1]), "block 1 was written by the pull")
    expect_ok(datadist.unlink_clusters([cluster], 5000), "unlink_clusters")

    flow.barrier("decoder unlink")
    flow.barrier("prompt switch role end, close listen")
    llm_config = dxl.LLMConfig()
    llm_config.listen_ip_info = f"{LOCALHOST}:0"
    datadist.switch_role(dxl.LLMRole.PROMPT, llm_config.generate_options())
    expect(datadist.engine.listen_address is not None, "no listener after switch_role")
    flow.barrier("decoder switch role end, listen", datadist.engine.listen_address)

    flow.barrier("prompt link end")
    cache_manager.push_blocks(
        dxl.BlocksCacheKey(PROMPT_CLUSTER_ID, 0),
        cache,
        src_blocks=[0, 1, 2],
        dst_blocks=[0, 1, 2],
        src_layer_range=range(0, 2),
        dst_layer_range=range(0, 2),
        tensor_num_per_layer=1,
    )
    flow.barrier("decoder push blocks end")

    force_unlink(datadist, PROMPT_CLUSTER_ID)
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    sys.exit(Flow.run(__doc__, prompt=run_prompt_sample, decoder=run_decoder_sample))
