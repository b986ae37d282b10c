"""Two processes move KV blocks with dxl over the nixl transport, and every byte is verified.

Run by ``scripts/gpu_check.sh`` (which prepares the environment). ``--device cuda`` (the check
it exists for): the caches are CUDA tensors registered as ``Placement.DEVICE`` (NIXL: VRAM);
``--device cpu``: the same flow on host memory (how this script is tested without a GPU).

The prefill is a child process (its own engine and agent), the decode this process:
1. pull: the decode pulls blocks of the prefill's cache;
2. push: the decode pushes blocks into the prefill's cache (the prefill checks them);
3. handoff, fetch mode: the prefill offers blocks, the decode fetches them;
4. handoff, push mode: the decode offers destination blocks, the prefill pushes into them;
5. throughput: one large pull, GB/s beside a bulk copy of the same bytes on the same device
   (``torch`` ``copy_`` device to device), measured in the same run;
6. the vLLM connector: both sides hold KV caches as vLLM 0.33 makes them for FlashAttention
   (one int8 buffer, a ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` view per
   layer, NHD = ``LBNHC``), registered through the connector's worker side
   (``dxl.integrations.vllm``: layout, ``Placement.DEVICE``, ``auto`` forced to nixl), and a
   request's blocks move with the handoff as vLLM drives it (prefill offers, decode loads);
   every byte of every layer's blocks is compared, and the blocks outside the request stay zero.
Each block holds a pattern of (process seed, tensor, block), so a misplaced or stale block is
caught; the exit status is 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch

import dxl

P_ID, D_ID = 1, 2
PREFILL_SEED, DECODE_SEED = 11, 22


def options(listen: bool) -> dict[str, str]:
    opts = {
        "dxl.Transport": "nixl",
        # one host without InfiniBand: UCX moves VRAM by CUDA IPC (hardware-enforced) but host
        # memory by emulation; the check's two processes trust each other
        "dxl.NixlAllowEmulated": "1",
        "llm.SyncKvCacheWaitTime": "60000",
        "ge.exec.deviceId": "0",
    }
    if listen:
        opts["llm.listenIpInfo"] = "127.0.0.1:0"
    return opts


class KV:
    """``tensors`` tensors of ``blocks`` blocks of ``block_bytes`` on ``device``, filled with
    the pattern of ``seed``: int64 words ``seed << 40 | tensor << 24 | block << 16 | word``."""

    def __init__(self, tensors: int, blocks: int, block_bytes: int, device: str, seed: int):
        self.words = block_bytes // 8
        self.device = device
        self.t = [
            torch.empty((blocks, self.words), dtype=torch.int64, device=device)
            for _ in range(tensors)
        ]
        for i in range(tensors):
            self.fill(i, range(blocks), seed)

    def pattern(self, tensor: int, blocks: Any, seed: int) -> torch.Tensor:
        b = torch.as_tensor(list(blocks), dtype=torch.int64, device=self.device)[:, None]
        w = torch.arange(self.words, dtype=torch.int64, device=self.device)[None, :]
        return (seed << 40) | (tensor << 24) | (b << 16) | (w & 0xFFFF)

    def fill(self, tensor: int, blocks: Any, seed: int) -> None:
        blocks = list(blocks)
        self.t[tensor][blocks] = self.pattern(tensor, blocks, seed)

    def holds(self, dst: list[int], seed: int, src: list[int]) -> bool:
        return all(
            torch.equal(self.t[i][dst], self.pattern(i, src, seed)) for i in range(len(self.t))
        )

    def desc(self) -> dxl.CacheDesc:
        placement = dxl.Placement.DEVICE if self.device != "cpu" else dxl.Placement.HOST
        blocks, words = self.t[0].shape
        return dxl.CacheDesc(len(self.t), [blocks, words * 4], dxl.DataType.DT_FLOAT16, placement)

    @property
    def addrs(self) -> list[int]:
        return [t.data_ptr() for t in self.t]


# ------------------------------------------------------------------------------ the prefill
def prefill_main(conn: Any, shape: dict[str, Any]) -> None:
    asyncio.run(_prefill(conn, shape))


async def _prefill(conn: Any, shape: dict[str, Any]) -> None:
    kv = KV(seed=PREFILL_SEED, **shape)
    loop = asyncio.get_running_loop()
    async with dxl.Engine(P_ID, dxl.LLMRole.PROMPT, options(listen=True)) as eng:
        cache = await eng.register_blocks_cache(
            kv.desc(), kv.addrs, dxl.BlocksCacheKey(P_ID, 0), remote_accessible=True
        )
        conn.send({"address": list(eng.listen_address or ())})
        while True:
            cmd, kw = await loop.run_in_executor(None, conn.recv)
            try:
                if cmd == "stop":
                    conn.send({"ok": True})
                    return
                if cmd == "holds":
                    if kv.device != "cpu":
                        torch.cuda.synchronize()
                    conn.send({"ok": kv.holds(kw["dst"], kw["seed"], kw["src"])})
                elif cmd == "offer":
                    ticket = await eng.handoff.offer(kw["request_id"], cache, kw["blocks"])
                    conn.send({"ok": True, "ticket": ticket.to_json()})
                elif cmd == "push":
                    await eng.handoff.push(kw["ticket"], cache, kw["blocks"])
                    conn.send({"ok": True})
                else:
                    conn.send({"ok": False, "error": f"unknown command {cmd}"})
            except Exception as exc:  # reported to the decode, which fails the check
                conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


# ------------------------------------------------------------------------------ the decode
class Prefill:
    def __init__(self, shape: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=prefill_main, args=(child, shape), daemon=True)
        self.proc.start()
        self.address = self.reply(120)["address"]

    def reply(self, deadline_s: float = 120) -> dict[str, Any]:
        if not self.conn.poll(deadline_s):
            raise TimeoutError(f"the prefill gave no answer within {deadline_s} s")
        out: dict[str, Any] = self.conn.recv()
        return out

    async def call(self, cmd: str, **kw: Any) -> dict[str, Any]:
        self.conn.send((cmd, kw))
        out = await asyncio.get_running_loop().run_in_executor(None, self.reply)
        if not out.get("ok") and "error" in out:
            raise RuntimeError(f"prefill {cmd}: {out['error']}")
        return out

    def info(self) -> dxl.LLMClusterInfo:
        info = dxl.LLMClusterInfo()
        info.remote_cluster_id = P_ID
        info.append_local_ip_info("127.0.0.1", 0)
        info.append_remote_ip_info(self.address[0], self.address[1])
        return info


def sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


async def decode_main(args: argparse.Namespace) -> dict[str, Any]:
    shape = {
        "tensors": args.tensors,
        "blocks": args.blocks,
        "block_bytes": args.block_bytes,
        "device": args.device,
    }
    results: dict[str, Any] = {"device": args.device, "shape": shape}
    if args.device != "cpu":
        results["gpu"] = torch.cuda.get_device_name(0)
    prefill = Prefill(shape)
    kv = KV(seed=DECODE_SEED, **shape)
    key = dxl.BlocksCacheKey(P_ID, 0)
    checks: dict[str, bool] = {}
    try:
        async with dxl.Engine(D_ID, dxl.LLMRole.DECODER, options(listen=True)) as eng:
            cache = await eng.register_blocks_cache(kv.desc(), kv.addrs, remote_accessible=True)
            ret, rets = await eng.link_clusters([prefill.info()], timeout=60_000)
            if ret != dxl.LLMStatusCode.LLM_SUCCESS:
                raise RuntimeError(f"link_clusters: {ret} {rets}")
            results["transport"] = eng.stats()["links"][P_ID]["transport"]

            await eng.pull_blocks(key, cache, [5, 6, 7], [0, 1, 2])
            sync(args.device)
            checks["pull"] = kv.holds([0, 1, 2], PREFILL_SEED, [5, 6, 7])

            await eng.push_blocks(key, cache, [3, 4], [20, 21])
            sync(args.device)
            got = await prefill.call("holds", dst=[20, 21], seed=DECODE_SEED, src=[3, 4])
            checks["push"] = bool(got["ok"])

            offer = await prefill.call("offer", request_id="fetch-1", blocks=[8, 9])
            await eng.handoff.fetch(offer["ticket"], cache, [10, 11])
            sync(args.device)
            checks["handoff_fetch"] = kv.holds([10, 11], PREFILL_SEED, [8, 9])

            dest = await eng.handoff.offer_destination("push-1", cache, [12, 13])
            await prefill.call("push", ticket=dest.to_json(), blocks=[14, 15])
            sync(args.device)
            checks["handoff_push"] = kv.holds([12, 13], PREFILL_SEED, [14, 15])

            # throughput: every block of every tensor, pulled whole (after one warm-up pull)
            every = list(range(args.blocks))
            nbytes = args.tensors * args.blocks * args.block_bytes
            await eng.pull_blocks(key, cache, every, every)
            best = float("inf")
            for _ in range(args.passes):
                t0 = time.perf_counter()
                await eng.pull_blocks(key, cache, every, every)
                sync(args.device)
                best = min(best, time.perf_counter() - t0)
            others = [b for b in every if b not in (20, 21)]  # those hold what we pushed
            checks["bulk_pull"] = kv.holds(others, PREFILL_SEED, others) and kv.holds(
                [20, 21], DECODE_SEED, [3, 4]
            )
            results["dxl_nixl_pull_gbps"] = round(nbytes / best / 1e9, 2)
            results["bulk_copy_gbps"] = round(bulk_copy_gbps(kv, args.passes), 2)
            results["bytes_per_pull"] = nbytes
    finally:
        try:
            await prefill.call("stop")
        except Exception as exc:  # it may be gone already; the checks say what failed
            results["prefill_stop"] = str(exc)
        prefill.proc.join(30)
    results["checks"] = checks
    results["ok"] = bool(checks) and all(checks.values())
    return results


def bulk_copy_gbps(kv: KV, passes: int) -> float:
    """The same bytes copied device to device (or host to host) in bulk: one copy_ per tensor
    into a scratch tensor, timed like the pull."""
    scratch = [torch.empty_like(t) for t in kv.t]
    best = float("inf")
    for _ in range(passes + 1):
        sync(kv.device)
        t0 = time.perf_counter()
        for d, s in zip(scratch, kv.t, strict=True):
            d.copy_(s)
        sync(kv.device)
        best = min(best, time.perf_counter() - t0)
    nbytes = sum(t.numel() * 8 for t in kv.t)
    return nbytes / best / 1e9


# ------------------------------------------------------------------------------ the vLLM connector
LBNHC = (0, 1, 3, 2, 4)  # vLLM's KVCacheLayout for FlashAttention (NHD): physical [L, B, N, H, C]


@dataclass
class Request:
    """The part of vLLM's Request the connector's scheduler side reads."""

    request_id: str
    num_prompt_tokens: int
    kv_transfer_params: dict[str, Any] | None
    num_computed_tokens: int = 0
    status: str = "RUNNING"
    prompt_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.prompt_token_ids = [1000 + i for i in range(self.num_prompt_tokens)]


def vllm_kv(shape: dict[str, Any], device: str, seed: int | None) -> tuple[dict[str, Any], list]:
    """vLLM 0.33's KV caches (``create_kv_cache_views``): one int8 buffer on ``device`` (random
    bytes of ``seed``, or zeros), a float16 ``[B, H, N, C]`` view per layer in LBNHC; returns
    (the views vLLM registers, each layer's int8 view for comparing bytes)."""
    logical = (shape["layers"], shape["blocks"], shape["heads"], shape["block_size"], shape["c"])
    if seed is None:
        raw = torch.zeros(prod(logical), dtype=torch.int8, device=device)
    else:
        gen = torch.Generator().manual_seed(seed)
        raw = torch.randint(-128, 128, (prod(logical),), generator=gen, dtype=torch.int8)
        raw = raw.to(device)
    strides = [0] * 5
    step = 1
    for dim in reversed(LBNHC):
        strides[dim] = step
        step *= logical[dim]
    full = torch.as_strided(raw, logical, strides)
    layers = [full[i] for i in range(shape["layers"])]
    views = {
        f"model.layers.{i}.self_attn.attn": v.view(torch.float16) for i, v in enumerate(layers)
    }
    return views, layers


def vllm_config(device: str) -> Any:
    from dxl.integrations.vllm.config import DxlConnectorConfig

    # cuda: auto picks nixl for device memory; one host without InfiniBand: the pair trusts itself
    return DxlConnectorConfig(
        transport="auto" if device != "cpu" else "nixl", nixl_allow_emulated=True
    )


def vllm_prefill_main(conn: Any, shape: dict[str, Any]) -> None:
    """The prefill worker and its scheduler side: request r1 ends its prompt in blocks
    ``src`` and is offered; after the decode's load the offer is handed over."""
    from dxl.integrations.vllm.scheduler import SchedulerSide
    from dxl.integrations.vllm.worker import WorkerSide

    device, src = shape["device"], shape["src"]
    worker = WorkerSide(vllm_config(device))
    try:
        views, _ = vllm_kv(shape, device, PREFILL_SEED)
        if device != "cpu":
            torch.cuda.synchronize()
        handshake = worker.register(views, shape["blocks"])
        sched = SchedulerSide(vllm_config(device), shape["block_size"])
        sched.set_handshake({0: handshake})
        tokens = len(src) * shape["block_size"]
        req = Request("r1", tokens, {"do_remote_decode": True, "do_remote_prefill": False})
        sched.after_alloc(req, list, 0)
        plan = sched.build_plan({"r1": tokens}, (), {"r1": src}.__getitem__)
        req.num_computed_tokens = tokens
        worker.start(plan)
        worker.after_forward(plan)
        req.status = "FINISHED_LENGTH_CAPPED"
        delay, params = sched.request_finished(req, src)
        conn.send({"ok": bool(delay), "params": params, "layout": repr(worker.layout)})
        if conn.recv() == "handed":
            worker.start(sched.build_plan({}, (), {"r1": src}.__getitem__))
            deadline = time.monotonic() + 60
            sent: set[str] = set()
            while not sent and time.monotonic() < deadline:
                sent = worker.results().finished_sending
                time.sleep(0.01)
            conn.send({"ok": sent == {"r1"}})
            conn.recv()
    except Exception as exc:  # reported to the decode, which fails the check
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        worker.shutdown()


def vllm_step(args: argparse.Namespace) -> dict[str, Any]:
    """Step 6 (module docstring), with this process as the decode."""
    from dxl.integrations.vllm.scheduler import SchedulerSide
    from dxl.integrations.vllm.worker import WorkerSide

    blocks, take = args.vllm_blocks, args.vllm_blocks // 2
    shape = {
        "device": args.device,
        "layers": args.vllm_layers,
        "blocks": blocks,
        "heads": 8,
        "block_size": 16,
        "c": 2 * 128 * 2,  # K and V side by side, head_size 128, float16: bytes
        "src": list(range(blocks - take, blocks)),
    }
    dst = list(range(take))
    out: dict[str, Any] = {"layout": "FlashAttention NHD (LBNHC)", "layers": args.vllm_layers}
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=vllm_prefill_main, args=(child, shape), daemon=True)
    proc.start()
    decode = WorkerSide(vllm_config(args.device))

    def reply() -> dict[str, Any]:
        if not conn.poll(120):
            raise TimeoutError("the vLLM prefill gave no answer within 120 s")
        got: dict[str, Any] = conn.recv()
        if not got.get("ok"):
            raise RuntimeError(f"vLLM prefill: {got.get('error', got)}")
        return got

    try:
        views, got = vllm_kv(shape, args.device, None)
        decode.register(views, blocks)
        assert decode.layout is not None
        out["registered"] = {
            "placement": "DEVICE" if decode.layout.device is not None else "HOST",
            "device": decode.layout.device,
            "transport": decode.engine._opts.transport,
            "block_bytes": decode.layout.block_bytes,
            "tensors": len(decode.layout.addrs),
        }
        offered = reply()
        sched = SchedulerSide(vllm_config(args.device), shape["block_size"])
        tokens = take * shape["block_size"]
        req = Request("d1", tokens, dict(offered["params"]))
        count, _ = sched.num_new_matched_tokens(req, 0)
        sched.after_alloc(req, lambda: list(dst), count or 0)
        t0 = time.perf_counter()
        decode.start(sched.build_plan({}, (), lambda r: []))
        deadline = time.monotonic() + 120
        done = decode.results()
        while not done.finished_recving and time.monotonic() < deadline:
            time.sleep(0.001)
            done = decode.results()
        out["load_s_with_link"] = round(time.perf_counter() - t0, 4)
        out["bytes"] = take * decode.layout.block_bytes * len(decode.layout.addrs)
        loaded = done.finished_recving == {"d1"} and not done.failed_recving
        sync(args.device)
        _, want = vllm_kv(shape, args.device, PREFILL_SEED)
        others = [b for b in range(blocks) if b not in dst]
        same = all(
            torch.equal(got[i][dst], want[i][shape["src"]]) and not got[i][others].any()
            for i in range(args.vllm_layers)
        )
        conn.send("handed")
        handed = bool(reply()["ok"])
        out["checks"] = {"loaded": loaded, "every_byte": same, "handed_over": handed}
    finally:
        decode.shutdown()
        with contextlib.suppress(OSError):  # it may be gone already; the checks say what failed
            conn.send("stop")
        proc.join(30)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tensors", type=int, default=64)
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--block-bytes", type=int, default=256 << 10)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--vllm-layers", type=int, default=16)
    p.add_argument("--vllm-blocks", type=int, default=64)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "torch sees no CUDA device"}))
        return 2
    results = asyncio.run(decode_main(args))
    try:
        results["vllm"] = vllm_step(args)
        results["checks"].update({f"vllm_{k}": v for k, v in results["vllm"]["checks"].items()})
    except Exception as exc:  # the step failed as a whole: the check fails, saying why
        results["vllm"] = {"error": f"{type(exc).__name__}: {exc}"}
        results["checks"]["vllm"] = False
    results["ok"] = bool(results["checks"]) and all(results["checks"].values())
    print(json.dumps(results, indent=2))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
