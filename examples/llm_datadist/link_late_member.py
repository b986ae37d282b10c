"""A comm member that calls link() long after the other still meets it; then a second comm.

The reference's rank-table samples (``pull_sample_common.link()``, spec section 12.4) have every
member call ``link("link", {1: 0, 2: 1}, rank_table)`` and poll
``query_register_mem_status(comm_id)`` until ``OK``; members start at different times, and the
first keeps polling ``PREPARING`` until the others come. Here that wait is made long on purpose:

1. the prefill (cluster 1, with a keyed blocks cache) calls ``link()`` and polls, seeing only
   ``PREPARING`` for a second (the decode has not called ``link()`` yet, so nothing listens at
   its rank's endpoint); only then does the decode (cluster 2) call ``link()``; both reach
   ``OK``, and the decode pulls blocks;
2. both ``unlink(comm_id)``, and link again in a new comm (``comm_id`` 2 on both sides, ids count
   per process as in the reference), this time the decode first and the prefill after a
   barrier; the decode pulls other blocks; both unlink and finalize.

In dxl, ``OK`` says that this member's own links to the others are up. The prefill keeps
listening at its rank's endpoint after comm 1 (an engine's listener stays until finalize), so in
comm 2 the decode's link to it comes up before the prefill calls ``link()`` again: the decode
may see ``OK`` at once, where HCCL's collective comm would say ``PREPARING`` until every member
joined. The prefill still joins comm 2 with a link of its own.

What every flow here changes is in ``_common.py`` (the one-server rank table on 127.0.0.1, a
free ``rank_table_base_port`` on both sides).

    python examples/llm_datadist/link_late_member.py
"""

from __future__ import annotations

import functools
import sys
import time

import _common
from _common import Flow, expect, host_kv, init_datadist

import dxl

PROMPT_CLUSTER_ID, DECODER_CLUSTER_ID = 1, 2
CLUSTER_RANK_INFO = {PROMPT_CLUSTER_ID: 0, DECODER_CLUSTER_ID: 1}
PROMPT_SEED = 1
ALL = range(2)
BLOCKS = range(6)
CACHE_DESC = dxl.CacheDesc(
    num_tensors=len(ALL),
    shape=[len(BLOCKS), 32 * 1024],  # 128 KiB blocks
    data_type=dxl.DataType.DT_FLOAT,
    placement=dxl.Placement.HOST,
)
EARLY_WAIT_S = 1.0  # how long the first member polls PREPARING before the other links
FIRST_SRC, FIRST_DST = [0, 1], [4, 0]
SECOND_SRC, SECOND_DST = [5], [2]


def init(role: dxl.LLMRole, cluster_id: int, base_port: int) -> dxl.LLMDataDist:
    return init_datadist(
        role, cluster_id, enable_cache_manager=True, rank_table_base_port=base_port
    )


def link_early(datadist: dxl.LLMDataDist, comm_name: str) -> int:
    """``link()``, then poll for a while: the other member has not called it, so every poll
    says PREPARING. Returns the comm id, still PREPARING."""
    comm_id = datadist.link(comm_name, CLUSTER_RANK_INFO, _common.single_server_rank_table())
    until = time.monotonic() + EARLY_WAIT_S
    polls = 0
    while time.monotonic() < until:
        status = datadist.query_register_mem_status(comm_id)
        expect(status == dxl.RegisterMemStatus.PREPARING, f"alone in the comm, yet {status!r}")
        polls += 1
        time.sleep(0.05)
    expect(polls > 1, "polled once only")
    return comm_id


def link_late(datadist: dxl.LLMDataDist, comm_name: str) -> int:
    return _common.link(datadist, _common.single_server_rank_table(), CLUSTER_RANK_INFO, comm_name)


def run_prompt_sample(base_port: int, flow: Flow) -> None:
    datadist = init(dxl.LLMRole.PROMPT, PROMPT_CLUSTER_ID, base_port)
    cache_manager = datadist.cache_manager
    kv = host_kv(CACHE_DESC, PROMPT_SEED)
    cache = cache_manager.register_blocks_cache(
        CACHE_DESC, kv.addrs, dxl.BlocksCacheKey(PROMPT_CLUSTER_ID, 0), remote_accessible=True
    )
    # comm 1: we link first and wait; the decode links after the barrier
    comm_id = link_early(datadist, "early")
    flow.barrier("prompt polled PREPARING")
    _common.wait_registered(datadist, comm_id)
    expect(comm_id == 1, f"first comm id {comm_id}")
    flow.barrier("first pull done")
    datadist.unlink(comm_id)
    flow.barrier("comm 1 unlinked")

    # comm 2: the decode links first; we come after it
    flow.barrier("decoder linked")
    comm_id = link_late(datadist, "late")
    expect(comm_id == 2, f"second comm id {comm_id}")
    flow.barrier("second pull done")
    expect(kv.untouched(ALL, BLOCKS), "the prefill cache changed")
    datadist.unlink(comm_id)
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def run_decoder_sample(base_port: int, flow: Flow) -> None:
    datadist = init(dxl.LLMRole.DECODER, DECODER_CLUSTER_ID, base_port)
    cache_manager = datadist.cache_manager
    kv = host_kv(CACHE_DESC)
    cache = cache_manager.register_blocks_cache(CACHE_DESC, kv.addrs)
    prompt_key = dxl.BlocksCacheKey(PROMPT_CLUSTER_ID, 0)

    flow.barrier("prompt polled PREPARING")
    comm_id = link_late(datadist, "early")
    expect(comm_id == 1, f"first comm id {comm_id}")
    cache_manager.pull_blocks(prompt_key, cache, src_blocks=FIRST_SRC, dst_blocks=FIRST_DST)
    expect(kv.matches(ALL, FIRST_DST, PROMPT_SEED, ALL, FIRST_SRC), "first pull is wrong")
    flow.barrier("first pull done")
    datadist.unlink(comm_id)
    flow.barrier("comm 1 unlinked")

    comm_id = link_late(datadist, "late")  # the prefill still listens: OK comes at once
    expect(comm_id == 2, f"second comm id {comm_id}")
    flow.barrier("decoder linked")
    cache_manager.pull_blocks(prompt_key, cache, src_blocks=SECOND_SRC, dst_blocks=SECOND_DST)
    expect(kv.matches(ALL, SECOND_DST, PROMPT_SEED, ALL, SECOND_SRC), "second pull is wrong")
    expect(kv.matches(ALL, FIRST_DST, PROMPT_SEED, ALL, FIRST_SRC), "first pull was overwritten")
    others = sorted(set(BLOCKS) - set(FIRST_DST) - set(SECOND_DST))
    expect(kv.untouched(ALL, others), f"blocks {others} were written")
    flow.barrier("second pull done")
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
