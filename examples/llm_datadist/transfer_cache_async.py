"""Layer-wise push while the model computes: transfer_cache_async with a LayerSynchronizer.

Reproduces the reference's ``transfer_cache_async_sample.py`` (spec section 12.2): both engines
enable the cache manager and remote-cache-accessible mode and listen; the prefill links to the
decode and runs

    task = cache_manager.transfer_cache_async(
        cache, LayerSynchronizerImpl(), [TransferWithCacheKeyConfig(
            BlocksCacheKey(DECODER_CLUSTER_ID, 0), range(0, L), range(0, L))],
        src_block_indices, dst_block_indices)

then ``task.synchronize()`` / ``task.get_results()``; both force-unlink, unregister, finalize.
A second request uses ``TransferConfig(DECODER_CLUSTER_ID, decoder_kv_addrs, range(0, L), 0)``,
the decode's tensor addresses posted out of band (the sample's variant for engines without
remote-cache-accessible mode; dxl takes either kind of config in either mode).

Besides what every flow here changes (see ``_common.py``): the synchronizer releases layer
``l`` once a simulated model thread has written its K and V (the sample's returns True at
once; a real one waits on the layer's device event), so the bytes that arrive prove each layer
left after it was computed; the source is HOST memory, which the reference refuses (dxl
stance 2); ``L`` layers and explicit block indices replace the sample's one layer.

    python examples/llm_datadist/transfer_cache_async.py
"""

from __future__ import annotations

import sys
import threading

import _common
from _common import LOCALHOST, Flow, cluster_info, expect, expect_ok, host_kv, init_datadist

import dxl
from dxl.testing import KVBuffers

NUM_LAYERS = 4
PROMPT_CLUSTER_ID, DECODER_CLUSTER_ID = 0, 1
PROMPT_SEED = 1
ALL = range(2 * NUM_LAYERS)  # K and V of each layer
CACHE_DESC = dxl.CacheDesc(
    num_tensors=len(ALL),
    shape=[3, 32 * 1024],  # 128 KiB blocks
    data_type=dxl.DataType.DT_FLOAT,
    placement=dxl.Placement.HOST,
)
# request 1 (destination by key) and request 2 (by address): source -> destination blocks
KEY_SRC, KEY_DST = [0, 1], [2, 0]
ADDR_SRC, ADDR_DST = [2], [1]


class LayerSynchronizerImpl(dxl.LayerSynchronizer):
    """Releases a layer once the model has finished it (an event per layer)."""

    def __init__(self) -> None:
        self.layer_done = [threading.Event() for _ in range(NUM_LAYERS)]
        self.waited: list[int] = []

    def synchronize_layer(self, layer_index: int, timeout_in_millis: int | None) -> bool:
        self.waited.append(layer_index)
        return self.layer_done[layer_index].wait(_common.DEADLINE_S)


def model_forward(kv_cache: KVBuffers, synchronizer: LayerSynchronizerImpl) -> None:
    """The simulated forward pass: writes each layer's K and V, then records its event."""
    computed = host_kv(CACHE_DESC, PROMPT_SEED)  # what the model's layers produce
    for layer in range(NUM_LAYERS):
        for tensor in (2 * layer, 2 * layer + 1):
            kv_cache.words[tensor][:] = computed.words[tensor]
        synchronizer.layer_done[layer].set()


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
    kv = host_kv(CACHE_DESC)  # zero until the model writes it
    cache = cache_manager.register_blocks_cache(
        CACHE_DESC, kv.addrs, dxl.BlocksCacheKey(PROMPT_CLUSTER_ID, 0)
    )
    decoder_address, decoder_kv_addrs = flow.barrier("register end")["decoder"]
    cluster = cluster_info(DECODER_CLUSTER_ID, decoder_address)
    expect_ok(datadist.link_clusters([cluster], 5000), "link_clusters")

    # request 1: the task starts before the model; each layer goes once it is computed
    synchronizer = LayerSynchronizerImpl()
    transfer_config = dxl.TransferWithCacheKeyConfig(
        dxl.BlocksCacheKey(DECODER_CLUSTER_ID, 0), range(0, NUM_LAYERS), range(0, NUM_LAYERS)
    )
    cache_task = cache_manager.transfer_cache_async(
        cache, synchronizer, [transfer_config], KEY_SRC, KEY_DST
    )
    model = threading.Thread(target=model_forward, args=(kv, synchronizer))
    model.start()
    model.join(_common.DEADLINE_S)
    expect(cache_task.synchronize() == dxl.LLMStatusCode.LLM_SUCCESS, "task 1 failed")
    expect(
        cache_task.get_results() == [dxl.LLMStatusCode.LLM_SUCCESS],
        f"task 1: {cache_task.get_results()}",
    )
    expect(synchronizer.waited == list(range(NUM_LAYERS)), f"layers {synchronizer.waited}")

    # request 2: destination by raw addresses, 2 per layer (the layers are computed already)
    transfer_config = dxl.TransferConfig(
        DECODER_CLUSTER_ID, decoder_kv_addrs, range(0, NUM_LAYERS), 0
    )
    cache_task = cache_manager.transfer_cache_async(
        cache, synchronizer, [transfer_config], ADDR_SRC, ADDR_DST
    )
    expect(
        cache_task.get_results() == [dxl.LLMStatusCode.LLM_SUCCESS],
        f"task 2: {cache_task.get_results()}",
    )
    flow.barrier("transfer cache end")

    expect_ok(datadist.unlink_clusters([cluster], 5000, force=True), "unlink_clusters")
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def run_decoder_sample(flow: Flow) -> None:
    datadist = init(dxl.LLMRole.DECODER, DECODER_CLUSTER_ID)
    kv = host_kv(CACHE_DESC)
    cache = datadist.cache_manager.register_blocks_cache(
        CACHE_DESC, kv.addrs, dxl.BlocksCacheKey(DECODER_CLUSTER_ID, 0), remote_accessible=True
    )
    flow.barrier("register end", (datadist.engine.listen_address, kv.addrs))
    flow.barrier("transfer cache end")  # the prefill's tasks have finished
    expect(kv.matches(ALL, KEY_DST, PROMPT_SEED, ALL, KEY_SRC), "request 1 blocks are wrong")
    expect(kv.matches(ALL, ADDR_DST, PROMPT_SEED, ALL, ADDR_SRC), "request 2 blocks are wrong")

    cluster = cluster_info(PROMPT_CLUSTER_ID)
    expect_ok(datadist.unlink_clusters([cluster], 5000, force=True), "unlink_clusters")
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    sys.exit(Flow.run(__doc__, prompt=run_prompt_sample, decoder=run_decoder_sample))
