"""Swap blocks {0: 0, 1: 1} out to a CPU cache, overwrite them, and swap them back in.

Reproduces the swap step of the reference's ``pull_blocks_sample.py`` (spec section 12.5):
``Cache.create_cpu_cache(CacheDesc(..., placement=Placement.HOST), addrs)`` wraps host tensors;
``swap_blocks(cache, cpu_cache, {0: 0, 1: 1})`` swaps out and ``swap_blocks(cpu_cache, cache,
{0: 0, 1: 1})`` swaps back in.

Besides what every flow here changes (see ``_common.py``): a single process, with no pull
first; the registered cache is HOST memory, not the sample's DEVICE cache (dxl swaps HOST to
HOST, stance 2); between the swaps a "new request" overwrites blocks 0 and 1, so the swap-in
is seen to restore every byte.

    python examples/llm_datadist/host_swap.py
"""

from __future__ import annotations

import sys

from _common import Flow, expect, host_kv, init_datadist

import dxl

CLUSTER_ID = 2
DECODER_SEED, CPU_SEED, REUSE_SEED = 2, 3, 4
ALL, BLOCKS = range(2), range(4)
SWAPPED, KEPT = [0, 1], [2, 3]


def run_decoder_sample(flow: Flow) -> None:
    datadist = init_datadist(dxl.LLMRole.DECODER, CLUSTER_ID, enable_cache_manager=True)
    cache_manager = datadist.cache_manager
    cache_desc = dxl.CacheDesc(
        num_tensors=len(ALL),
        shape=[len(BLOCKS), 64 * 1024],
        data_type=dxl.DataType.DT_FLOAT,
        placement=dxl.Placement.HOST,
    )
    kv = host_kv(cache_desc, DECODER_SEED)
    cache = cache_manager.register_blocks_cache(cache_desc, kv.addrs)

    cpu_cache_desc = dxl.CacheDesc(
        num_tensors=len(ALL),
        shape=[len(BLOCKS), 64 * 1024],
        data_type=dxl.DataType.DT_FLOAT,
        placement=dxl.Placement.HOST,
    )
    cpu_tensors = host_kv(cpu_cache_desc, CPU_SEED)  # the sample's torch.rand tensors
    cpu_cache = dxl.Cache.create_cpu_cache(cpu_cache_desc, cpu_tensors.addrs)

    # swap out
    cache_manager.swap_blocks(cache, cpu_cache, {0: 0, 1: 1})
    expect(cpu_tensors.matches(ALL, SWAPPED, DECODER_SEED, ALL, SWAPPED), "swap-out is wrong")
    expect(cpu_tensors.untouched(ALL, KEPT), "swap-out wrote CPU blocks 2, 3")
    expect(kv.untouched(ALL, BLOCKS), "swap-out changed the cache")
    reuse = host_kv(cache_desc, REUSE_SEED)  # another request takes blocks 0 and 1
    for tensor in ALL:
        kv.blocks(tensor)[SWAPPED] = reuse.blocks(tensor)[SWAPPED]
    # swap in
    cache_manager.swap_blocks(cpu_cache, cache, {0: 0, 1: 1})
    expect(kv.untouched(ALL, BLOCKS), "swap-in did not restore blocks 0, 1")
    expect(cpu_tensors.matches(ALL, SWAPPED, DECODER_SEED, ALL, SWAPPED), "swap-in changed CPU")
    expect(cpu_tensors.untouched(ALL, KEPT), "swap-in changed CPU blocks 2, 3")

    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    sys.exit(Flow.run(__doc__, decoder=run_decoder_sample))
