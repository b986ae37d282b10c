"""One decode pulls blocks [0, 1] into [0, 2] from each of two prefills (xPyD), then unlinks.

Reproduces the reference's ``pull_blocks_xpyd_sample.py`` (spec section 12.1, multi-prefill):
every engine's cluster id is ``(ipv4 << 16) | port`` of its ``ip:port``; each prefill listens,
registers a blocks cache bound to ``BlocksCacheKey(own id, 0)`` and waits; the decode
registers its cache, links to both prefills in one ``link_clusters`` call, pulls from each in
turn, unlinks (non-force), unregisters and finalizes; then the prefills unregister and
finalize.

Besides what every flow here changes (see ``_common.py``): the parent picks the free ports
the ids derive from; the decode checks its blocks after each pull, since the second pull
overwrites the first exactly as in the sample.

    python examples/llm_datadist/pull_blocks_xpyd.py
"""

from __future__ import annotations

import functools
import socket
import struct
import sys

import _common
from _common import LOCALHOST, Flow, cluster_info, expect, expect_ok, host_kv, init_datadist

import dxl

ALL = range(2)
CACHE_DESC = dxl.CacheDesc(
    num_tensors=len(ALL),
    shape=[3, 32 * 1024],  # 128 KiB blocks
    data_type=dxl.DataType.DT_FLOAT,
    placement=dxl.Placement.HOST,
)


def ip_port_to_int(ip_port: str) -> int:
    """The sample's cluster id: the IPv4 address (32 bits) above the port (16 bits)."""
    ip, port = ip_port.split(":")
    return (struct.unpack("!I", socket.inet_aton(ip))[0] << 16) | int(port)


def seed_of(cluster_id: int) -> int:
    return cluster_id & 0xFFFF  # each prefill fills its cache with its own pattern


def run_prompt_sample(local_ip_port: str, flow: Flow) -> None:
    cluster_id = ip_port_to_int(local_ip_port)
    datadist = init_datadist(
        dxl.LLMRole.PROMPT, cluster_id, local_comm_res="", listen_ip_info=local_ip_port
    )
    kv = host_kv(CACHE_DESC, seed_of(cluster_id))
    cache = datadist.cache_manager.register_blocks_cache(
        CACHE_DESC, kv.addrs, dxl.BlocksCacheKey(cluster_id, 0), remote_accessible=True
    )
    flow.barrier("registered")
    flow.barrier("decoder done")  # the sample sleeps 30 s here while the decode pulls
    expect(kv.untouched(ALL, range(3)), f"prefill {cluster_id}: its cache changed")
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def run_decoder_sample(local_ip_port: str, remote_ip_ports: list[str], flow: Flow) -> None:
    datadist = init_datadist(dxl.LLMRole.DECODER, ip_port_to_int(local_ip_port), local_comm_res="")
    cache_manager = datadist.cache_manager
    kv = host_kv(CACHE_DESC)
    cache = cache_manager.register_blocks_cache(
        CACHE_DESC, kv.addrs, dxl.BlocksCacheKey(ip_port_to_int(local_ip_port), 0)
    )
    flow.barrier("registered")

    cluster_list = []
    for remote in remote_ip_ports:
        ip, port = remote.split(":")
        cluster_list.append(cluster_info(ip_port_to_int(remote), (ip, int(port))))
    expect_ok(datadist.link_clusters(cluster_list, 5000), "link_clusters")

    for remote in remote_ip_ports:
        remote_id = ip_port_to_int(remote)
        cache_manager.pull_blocks(
            dxl.BlocksCacheKey(remote_id, 0), cache, src_blocks=[0, 1], dst_blocks=[0, 2]
        )
        expect(
            kv.matches(ALL, [0, 2], seed_of(remote_id), ALL, [0, 1]),
            f"blocks [0, 2] do not hold blocks [0, 1] of prefill {remote_id}",
        )
        expect(kv.untouched(ALL, [1]), "block 1 was written")

    expect_ok(datadist.unlink_clusters(cluster_list, 5000), "unlink_clusters")
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()
    flow.barrier("decoder done")


if __name__ == "__main__":
    *prompts, decoder = [f"{LOCALHOST}:{port}" for port in _common.free_ports(3)]
    sys.exit(
        Flow.run(
            __doc__,
            **{
                f"prompt{i}": functools.partial(run_prompt_sample, p) for i, p in enumerate(prompts)
            },
            decoder=functools.partial(run_decoder_sample, decoder, prompts),
        )
    )
