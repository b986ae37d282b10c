"""Both sides link to each other and both transfer: the prefill pulls while the decode pushes.

Reproduces the reference's ``hixl_transfer_backend_sample.py``: PROMPT_CLUSTER_ID=0 and
DECODER_CLUSTER_ID=1 both set ``local_comm_res=""`` and ``transfer_backend="hixl"`` and listen;
each registers a blocks cache of 2 tensors x 3 blocks bound to its own ``BlocksCacheKey``; after
a barrier BOTH call ``link_clusters`` to the other (at once); the prefill calls
``pull_blocks(BlocksCacheKey(1, 0), cache, src_blocks=[2], dst_blocks=[2])`` while the decode
calls ``push_blocks(BlocksCacheKey(0, 0), cache, src_blocks=[0, 1], dst_blocks=[0, 1])``; after
a barrier the prefill checks that its tensors now equal the decode's; each side
``unlink_clusters`` its own link (non-force, the peer named by cluster id only) and gets
LLM_SUCCESS; a barrier; unregister; finalize.

Besides what every flow here changes (see ``_common.py``): the decode's tensors hold a pattern
of their own (the sample's are zeros), so the prefill checks which block came from where:
blocks 0 and 1 by the decode's push, block 2 by its own pull. Before the sample's last round,
the flow also shows LLM-DataDist's per-side links in a first round: a repeated
``link_clusters`` to a linked cluster returns LLM_ALREADY_LINK; once the decode has unlinked its
own link, the prefill's link still carries transfers both ways (a pull and a push, checked
block by block) until the prefill unlinks too. The sample's round then links *in turn* (the
decode first, the prefill after a barrier), which works as well as linking at once.

    python examples/llm_datadist/mutual_link.py
"""

from __future__ import annotations

import sys

from _common import (
    LOCALHOST,
    Flow,
    cluster_info,
    expect,
    expect_ok,
    host_kv,
    init_datadist,
)

import dxl
from dxl.testing import KVBuffers

PROMPT_CLUSTER_ID, DECODER_CLUSTER_ID = 0, 1
PROMPT_SEED, DECODER_SEED = 1, 2  # stand for the sample's ones (prefill) and zeros (decode)
ROUND_2_SEED, ROUND_3_SEED = 3, 4  # fresh decode patterns for the later rounds
ALL = range(2)
NUM_BLOCKS = 3
CACHE_DESC = dxl.CacheDesc(
    num_tensors=len(ALL),
    shape=[NUM_BLOCKS, 64 * 1024],  # 256 KiB blocks
    data_type=dxl.DataType.DT_FLOAT,
    placement=dxl.Placement.HOST,
)
BLOCK_BYTES = CACHE_DESC.size // NUM_BLOCKS
S = dxl.LLMStatusCode


def init(role: dxl.LLMRole, cluster_id: int) -> dxl.LLMDataDist:
    return init_datadist(
        role,
        cluster_id,
        local_comm_res="",
        transfer_backend="hixl",
        listen_ip_info=f"{LOCALHOST}:0",
    )


def refill(kv: KVBuffers, seed: int) -> None:
    """Write the pattern of ``seed`` over ``kv``, in place (the model computed new KV)."""
    for mine, fresh in zip(kv.words, host_kv(CACHE_DESC, seed).words, strict=True):
        mine[:] = fresh
    kv.seed = seed


def link_to(datadist: dxl.LLMDataDist, remote_id: int, address: tuple[str, int]) -> None:
    expect_ok(datadist.link_clusters([cluster_info(remote_id, address)], 5000), "link_clusters")


def unlink_own(datadist: dxl.LLMDataDist, remote_id: int) -> None:
    """The sample's unlink: the peer named by its cluster id only, non-force."""
    expect_ok(datadist.unlink_clusters([cluster_info(remote_id)], 5000), "unlink_clusters")


def run_prompt_sample(flow: Flow) -> None:
    datadist = init(dxl.LLMRole.PROMPT, PROMPT_CLUSTER_ID)
    cache_manager = datadist.cache_manager
    kv = host_kv(CACHE_DESC, PROMPT_SEED)
    cache = cache_manager.register_blocks_cache(
        CACHE_DESC, kv.addrs, dxl.BlocksCacheKey(PROMPT_CLUSTER_ID, 0), remote_accessible=True
    )
    decoder_address = flow.barrier("register end", datadist.engine.listen_address)["decoder"]
    decoder_key = dxl.BlocksCacheKey(DECODER_CLUSTER_ID, 0)

    # round 1: both link at once; per-side links
    link_to(datadist, DECODER_CLUSTER_ID, decoder_address)
    ret, rets = datadist.link_clusters([cluster_info(DECODER_CLUSTER_ID, decoder_address)], 5000)
    expect(ret == S.LLM_ALREADY_LINK and rets == [S.LLM_ALREADY_LINK], f"relink: {ret}, {rets}")
    cache_manager.pull_blocks(decoder_key, cache, src_blocks=[2], dst_blocks=[2])
    flow.barrier("round 1 transferred")
    expect(kv.matches(ALL, [2], DECODER_SEED, ALL, [2]), "round 1: block 2 was not pulled")
    expect(kv.matches(ALL, [0, 1], DECODER_SEED, ALL, [0, 1]), "round 1: blocks 0, 1 not pushed")
    flow.barrier("decoder unlinked its link")
    # only the decode's link is gone: ours carries a pull (decode block 1 -> our block 1) ...
    cache_manager.pull_blocks(decoder_key, cache, src_blocks=[1], dst_blocks=[1])
    flow.barrier("pulled over the prefill's link")
    # ... and the decode's push (its block 0 -> our block 2)
    flow.barrier("pushed over the prefill's link")
    expect(kv.matches(ALL, [1], ROUND_2_SEED, ALL, [1]), "after one unlink: pull went wrong")
    expect(kv.matches(ALL, [2], ROUND_2_SEED, ALL, [0]), "after one unlink: push went wrong")
    expect(kv.matches(ALL, [0], DECODER_SEED, ALL, [0]), "after one unlink: block 0 changed")
    unlink_own(datadist, DECODER_CLUSTER_ID)
    flow.barrier("round 1 unlinked")

    # round 2 (the sample), linking in turn: the decode has linked, now we do
    refill(kv, PROMPT_SEED)
    flow.barrier("decoder linked")
    link_to(datadist, DECODER_CLUSTER_ID, decoder_address)
    flow.barrier("prompt linked")
    cache_manager.pull_blocks(decoder_key, cache, src_blocks=[2], dst_blocks=[2])
    flow.barrier("push and pull end")
    # the sample's check: our tensors now equal the decode's
    expect(
        kv.matches(ALL, range(NUM_BLOCKS), ROUND_3_SEED, ALL, range(NUM_BLOCKS)),
        "the prefill's tensors do not equal the decode's",
    )
    unlink_own(datadist, DECODER_CLUSTER_ID)
    flow.barrier("wait peer unlink end")
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def run_decoder_sample(flow: Flow) -> None:
    datadist = init(dxl.LLMRole.DECODER, DECODER_CLUSTER_ID)
    cache_manager = datadist.cache_manager
    kv = host_kv(CACHE_DESC, DECODER_SEED)
    cache = cache_manager.register_blocks_cache(
        CACHE_DESC, kv.addrs, dxl.BlocksCacheKey(DECODER_CLUSTER_ID, 0), remote_accessible=True
    )
    prompt_address = flow.barrier("register end", datadist.engine.listen_address)["prompt"]
    prompt_key = dxl.BlocksCacheKey(PROMPT_CLUSTER_ID, 0)

    # round 1: both link at once; per-side links
    link_to(datadist, PROMPT_CLUSTER_ID, prompt_address)
    ret, rets = datadist.link_clusters([cluster_info(PROMPT_CLUSTER_ID, prompt_address)], 5000)
    expect(ret == S.LLM_ALREADY_LINK and rets == [S.LLM_ALREADY_LINK], f"relink: {ret}, {rets}")
    cache_manager.push_blocks(prompt_key, cache, src_blocks=[0, 1], dst_blocks=[0, 1])
    flow.barrier("round 1 transferred")
    expect(kv.untouched(ALL, range(NUM_BLOCKS)), "round 1: the decode cache changed")
    unlink_own(datadist, PROMPT_CLUSTER_ID)  # our link only: the prefill's stays
    refill(kv, ROUND_2_SEED)
    flow.barrier("decoder unlinked its link")
    flow.barrier("pulled over the prefill's link")
    cache_manager.push_blocks(prompt_key, cache, src_blocks=[0], dst_blocks=[2])
    flow.barrier("pushed over the prefill's link")
    flow.barrier("round 1 unlinked")

    # round 2 (the sample), linking in turn: we link first
    refill(kv, ROUND_3_SEED)
    link_to(datadist, PROMPT_CLUSTER_ID, prompt_address)
    flow.barrier("decoder linked")
    flow.barrier("prompt linked")
    cache_manager.push_blocks(prompt_key, cache, src_blocks=[0, 1], dst_blocks=[0, 1])
    flow.barrier("push and pull end")
    expect(kv.untouched(ALL, range(NUM_BLOCKS)), "the decode cache changed")
    unlink_own(datadist, PROMPT_CLUSTER_ID)
    flow.barrier("wait peer unlink end")
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    sys.exit(Flow.run(__doc__, prompt=run_prompt_sample, decoder=run_decoder_sample))
