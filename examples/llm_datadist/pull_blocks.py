"""Both sides link() by rank table; the decode pulls blocks [0, 1], swaps them out and back in.

Reproduces the reference's ``pull_blocks_sample.py`` (spec sections 12.4, 12.5): both engines
enable the cache manager; the prefill (cluster 1) registers one tensor ``shape=[2, 1024 * 1024]``
floats with ``register_blocks_cache(desc, [addr], BlocksCacheKey(1, 0))``, the decode (cluster
2) the same shape with no key; both then run the sample's ``link()``:

    comm_id = datadist.link("link", {1: 0, 2: 1}, json.dumps(rank_table))
    while datadist.query_register_mem_status(comm_id) != RegisterMemStatus.OK:  # FAILED: error
        time.sleep(1)

the decode calls ``pull_blocks(BlocksCacheKey(1, 0), cache, src_blocks=[0, 1], dst_blocks=[0,
1])``, swaps both blocks out to a CPU cache (``Cache.create_cpu_cache``) with
``swap_blocks(cache, cpu_cache, {0: 0, 1: 1})`` and back in with ``swap_blocks(cpu_cache, cache,
{0: 0, 1: 1})``; both ``unlink(comm_id)`` and finalize.

Besides what every flow here changes (see ``_common.py``): the rank table is the sample's
one-server table with 127.0.0.1 as both devices' IP, and both sides set ``rank_table_base_port``
to a free base (dxl puts rank r at that port + r); barriers replace the sample's sleeps (the
decode's 5 s "wait prompt prepared", the prefill's 30 s); the prefill's tensor holds a pattern,
the decode's another (both are ones in the sample), and between the swaps the decode overwrites
blocks 0 and 1, so the swap-in is seen to restore the pulled bytes.

    python examples/llm_datadist/pull_blocks.py
"""

from __future__ import annotations

import functools
import sys

import _common
from _common import Flow, expect, host_kv, init_datadist

import dxl

PROMPT_CLUSTER_ID, DECODER_CLUSTER_ID = 1, 2
PROMPT_SEED, DECODER_SEED, CPU_SEED, REUSE_SEED = 1, 2, 3, 4
ALL, BLOCKS = range(1), [0, 1]
CACHE_DESC = dxl.CacheDesc(
    num_tensors=len(ALL),
    shape=[len(BLOCKS), 1024 * 1024],  # 4 MiB blocks
    data_type=dxl.DataType.DT_FLOAT,
    placement=dxl.Placement.HOST,
)


def init(role: dxl.LLMRole, cluster_id: int, base_port: int) -> dxl.LLMDataDist:
    return init_datadist(
        role, cluster_id, enable_cache_manager=True, rank_table_base_port=base_port
    )


def run_prompt_sample(base_port: int, flow: Flow) -> None:
    datadist = init(dxl.LLMRole.PROMPT, PROMPT_CLUSTER_ID, base_port)
    cache_manager = datadist.cache_manager
    kv = host_kv(CACHE_DESC, PROMPT_SEED)
    cache = cache_manager.register_blocks_cache(
        CACHE_DESC, kv.addrs, dxl.BlocksCacheKey(1, 0), remote_accessible=True
    )
    comm_id = _common.link(datadist, _common.single_server_rank_table())
    flow.barrier("prompt prepared")  # the decode's "wait prompt prepared"
    flow.barrier("decoder done")  # the prefill's 30 s wait
    expect(kv.untouched(ALL, BLOCKS), "the prefill cache changed")
    datadist.unlink(comm_id)
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def run_decoder_sample(base_port: int, flow: Flow) -> None:
    datadist = init(dxl.LLMRole.DECODER, DECODER_CLUSTER_ID, base_port)
    cache_manager = datadist.cache_manager
    kv = host_kv(CACHE_DESC, DECODER_SEED)
    cache = cache_manager.register_blocks_cache(CACHE_DESC, kv.addrs)
    comm_id = _common.link(datadist, _common.single_server_rank_table())
    flow.barrier("prompt prepared")

    cache_manager.pull_blocks(dxl.BlocksCacheKey(1, 0), cache, src_blocks=[0, 1], dst_blocks=[0, 1])
    expect(kv.matches(ALL, BLOCKS, PROMPT_SEED, ALL, BLOCKS), "blocks 0, 1 were not pulled")
    # swap blocks: out to a CPU cache, and back in
    cpu_tensors = host_kv(CACHE_DESC, CPU_SEED)  # the sample's torch.rand CPU tensors
    cpu_cache = dxl.Cache.create_cpu_cache(CACHE_DESC, cpu_tensors.addrs)
    cache_manager.swap_blocks(cache, cpu_cache, {0: 0, 1: 1})
    expect(cpu_tensors.matches(ALL, BLOCKS, PROMPT_SEED, ALL, BLOCKS), "swap-out is wrong")
    reuse = host_kv(CACHE_DESC, REUSE_SEED)  # another request takes the blocks meanwhile
    for tensor in ALL:
        kv.words[tensor][:] = reuse.words[tensor]
    cache_manager.swap_blocks(cpu_cache, cache, {0: 0, 1: 1})
    expect(kv.matches(ALL, BLOCKS, PROMPT_SEED, ALL, BLOCKS), "swap-in did not restore blocks")
    flow.barrier("decoder done")

    datadist.unlink(comm_id)
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
