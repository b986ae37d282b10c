"""The decode pushes batch 0 of its contiguous cache into the prefill's cache id 1, batch 0.

Reproduces the reference's ``push_cache_sample.py`` (spec section 12.2): both engines register
contiguous caches with ``register_cache(desc, [addr, addr2])``, the prefill listening on one
port and the decode on another; the decode links and calls
``push_cache(CacheKeyByIdAndIndex(cluster_id=PROMPT_CLUSTER_ID, cache_id=1, batch_index=0),
cache, src_batch_index=0)``, relying as the sample does on the prefill's first registration
getting cache id 1 (checked here); the decode unlinks (non-force); both unregister, finalize.

Nothing changes beyond what every flow here changes (see ``_common.py``).

    python examples/llm_datadist/push_cache.py
"""

from __future__ import annotations

import sys

from _common import LOCALHOST, Flow, cluster_info, expect, expect_ok, host_kv, init_datadist

import dxl

PROMPT_CLUSTER_ID, DECODER_CLUSTER_ID = 0, 1
PROMPT_SEED, DECODER_SEED = 1, 2  # stand for the sample's zeros (prefill) and ones (decode)
ALL = range(2)
# dim 0 of a contiguous cache is its batch: 3 batches of 256 KiB per tensor
CACHE_DESC = dxl.CacheDesc(
    num_tensors=len(ALL),
    shape=[3, 64 * 1024],
    data_type=dxl.DataType.DT_FLOAT,
    placement=dxl.Placement.HOST,
)


def init(role: dxl.LLMRole, cluster_id: int) -> dxl.LLMDataDist:
    return init_datadist(role, cluster_id, local_comm_res="", listen_ip_info=f"{LOCALHOST}:0")


def run_prompt_sample(flow: Flow) -> None:
    datadist = init(dxl.LLMRole.PROMPT, PROMPT_CLUSTER_ID)
    kv = host_kv(CACHE_DESC, PROMPT_SEED)
    cache = datadist.cache_manager.register_cache(CACHE_DESC, kv.addrs, remote_accessible=True)
    expect(cache.cache_id == 1, f"the first registration got cache id {cache.cache_id}")
    flow.barrier("register end", datadist.engine.listen_address)
    flow.barrier("decoder push cache end")
    expect(
        kv.matches(ALL, [0], DECODER_SEED, ALL, [0]), "prefill batch 0 does not hold decode batch 0"
    )
    expect(kv.untouched(ALL, [1, 2]), "prefill batches 1, 2 were written")
    flow.barrier("unlink end")
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def run_decoder_sample(flow: Flow) -> None:
    datadist = init(dxl.LLMRole.DECODER, DECODER_CLUSTER_ID)
    kv = host_kv(CACHE_DESC, DECODER_SEED)
    cache = datadist.cache_manager.register_cache(CACHE_DESC, kv.addrs)
    prompt_address = flow.barrier("register end")["prompt"]

    cluster = cluster_info(PROMPT_CLUSTER_ID, prompt_address)
    expect_ok(datadist.link_clusters([cluster], 5000), "link_clusters")
    datadist.cache_manager.push_cache(
        dxl.CacheKeyByIdAndIndex(cluster_id=PROMPT_CLUSTER_ID, cache_id=1, batch_index=0),
        cache,
        src_batch_index=0,
    )
    flow.barrier("decoder push cache end")

    expect_ok(datadist.unlink_clusters([cluster], 5000), "unlink_clusters")
    expect(kv.untouched(ALL, range(3)), "the decode cache changed")
    flow.barrier("unlink end")
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    sys.exit(Flow.run(__doc__, prompt=run_prompt_sample, decoder=run_decoder_sample))
