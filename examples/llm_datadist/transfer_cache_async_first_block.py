"""transfer_cache_async with no block indices pushes block 0 of each tensor, nothing else.

Reproduces the reference's ``transfer_cache_async_sample.py`` as it is (spec section 12.2):
both engines enable the cache manager and remote-cache-accessible mode and listen; both
register blocks caches of 2 tensors of ``shape=[3, 10]`` floats bound to their own
``BlocksCacheKey``; the prefill links to the decode and runs

    cache_task = cache_manager.transfer_cache_async(
        cache, LayerSynchronizerImpl(True), [TransferWithCacheKeyConfig(
            BlocksCacheKey(DECODER_CLUSTER_ID, 0), range(0, 1), range(0, 1))])
    cache_task.get_results()

with no block indices; both force-unlink, unregister, finalize. The reference's cache entry of a
blocks cache is one block wide, so this moves block 0 (row 0) of each tensor of layer 0: the
sample's decode, zeros before, ends with rows [1, 0, 0].

Besides what every flow here changes (see ``_common.py``): the decode's tensors hold a pattern
of their own (the sample's are zeros), and the decode checks that row 0 of each tensor holds the
prefill's row 0 and that rows 1 and 2 are untouched.

    python examples/llm_datadist/transfer_cache_async_first_block.py
"""

from __future__ import annotations

import sys

from _common import LOCALHOST, Flow, cluster_info, expect, expect_ok, host_kv, init_datadist

import dxl

NUM_TENSORS, BLOCKS_NUM, KV_SHAPE = 2, 3, 10
PROMPT_CLUSTER_ID, DECODER_CLUSTER_ID = 0, 1
PROMPT_SEED, DECODER_SEED = 1, 2  # stand for the sample's ones (prefill) and zeros (decode)
ALL = range(NUM_TENSORS)
CACHE_DESC = dxl.CacheDesc(
    num_tensors=NUM_TENSORS,
    shape=[BLOCKS_NUM, KV_SHAPE],  # 40-byte blocks (rows)
    data_type=dxl.DataType.DT_FLOAT,
    placement=dxl.Placement.HOST,
)


class LayerSynchronizerImpl(dxl.LayerSynchronizer):
    """The sample's synchronizer: every layer is ready (or refused) at once."""

    def __init__(self, ret: bool = True) -> None:
        self._ret = ret

    def synchronize_layer(self, layer_index: int, timeout_in_millis: int | None) -> bool:
        return self._ret


def init(role: dxl.LLMRole, cluster_id: int) -> dxl.LLMDataDist:
    return init_datadist(
        role,
        cluster_id,
        enable_cache_manager=True,
        enable_remote_cache_accessible=True,
        listen_ip_info=f"{LOCALHOST}:0",
    )


def run_prompt_sample(flow: Flow) -> None:
    datadist = init(dxl.LLMRole.PROMPT, PROMPT_CLUSTER_ID)
    cache_manager = datadist.cache_manager
    kv = host_kv(CACHE_DESC, PROMPT_SEED)
    cache = cache_manager.register_blocks_cache(
        CACHE_DESC, kv.addrs, dxl.BlocksCacheKey(PROMPT_CLUSTER_ID, 0)
    )
    decoder_address = flow.barrier("register end")["decoder"]

    cluster = cluster_info(DECODER_CLUSTER_ID, decoder_address)
    expect_ok(datadist.link_clusters([cluster], 5000), "link_clusters")
    transfer_config = dxl.TransferWithCacheKeyConfig(
        dxl.BlocksCacheKey(DECODER_CLUSTER_ID, 0), range(0, 1), range(0, 1)
    )
    cache_task = cache_manager.transfer_cache_async(
        cache, LayerSynchronizerImpl(True), [transfer_config]
    )
    results = cache_task.get_results()
    expect(results == [dxl.LLMStatusCode.LLM_SUCCESS], f"get_results: {results}")
    expect(kv.untouched(ALL, range(BLOCKS_NUM)), "the prefill cache changed")
    flow.barrier("transfer cache end")

    expect_ok(
        datadist.unlink_clusters([cluster_info(DECODER_CLUSTER_ID)], 5000, force=True),
        "unlink_clusters",
    )
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def run_decoder_sample(flow: Flow) -> None:
    datadist = init(dxl.LLMRole.DECODER, DECODER_CLUSTER_ID)
    cache_manager = datadist.cache_manager
    kv = host_kv(CACHE_DESC, DECODER_SEED)
    cache = cache_manager.register_blocks_cache(
        CACHE_DESC, kv.addrs, dxl.BlocksCacheKey(DECODER_CLUSTER_ID, 0), remote_accessible=True
    )
    flow.barrier("register end", datadist.engine.listen_address)
    flow.barrier("transfer cache end")  # the prompt's task has finished
    expect(kv.matches(ALL, [0], PROMPT_SEED, ALL, [0]), "row 0 does not hold the prefill's row 0")
    expect(kv.untouched(ALL, [1, 2]), "rows 1 and 2 were written")

    expect_ok(
        datadist.unlink_clusters([cluster_info(PROMPT_CLUSTER_ID)], 5000, force=True),
        "unlink_clusters",
    )
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    sys.exit(Flow.run(__doc__, prompt=run_prompt_sample, decoder=run_decoder_sample))
