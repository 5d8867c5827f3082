"""Bandwidth of one READ per backend: `python -m kvtransfer.bench [--mib 64] [--repeat 5] [backend ...]`.

The owner of the blocks is a spawned process (tcp, nixl) or an agent in this process (local). Blocks are
2 MiB (32 layers x 2 x 16 tokens x 8 heads x 128 dims, fp16); one read moves `--mib` MiB of them, and the
time runs from start_read() until wait() returns DONE.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

from kvtransfer.base import KVTransferAgent, TransferStatus
from kvtransfer.local import LocalFabric
from kvtransfer.registry import create_agent

SHAPE_TAIL = (32, 2, 16, 8, 128)  # one Llama-3-8B block: 2 MiB in fp16
WAIT_S = 120.0


def make_cache(num_blocks: int, fill: bool, device: str = "cpu") -> torch.Tensor:
    cache = torch.zeros((num_blocks, *SHAPE_TAIL), dtype=torch.float16, device=device)
    if fill:  # deterministic, so the reader can check every byte it got
        g = torch.Generator(device=device).manual_seed(1234)
        cache.uniform_(-1, 1, generator=g)
    return cache


def _owner_main(conn: Connection, backend: str, num_blocks: int, device: str) -> None:
    agent = create_agent(backend, "bench-owner", make_cache(num_blocks, fill=True, device=device))
    try:
        conn.send(agent.metadata())
        conn.poll(WAIT_S)  # serve until told to stop, or at most WAIT_S
    finally:
        agent.close()


def time_read(agent: KVTransferAgent, num: int, tag: str) -> float:
    blocks = list(range(num))
    t0 = time.perf_counter()
    handle = agent.start_read("owner", blocks, blocks[::-1], tag=tag)
    status = agent.wait(handle, WAIT_S)  # as decode_worker/kv_pull.py waits, minus its hop to a worker thread
    elapsed = time.perf_counter() - t0
    agent.release(handle)
    if status is not TransferStatus.DONE:
        raise RuntimeError(f"read ended {status.name}: {handle.error}")
    return elapsed


def bench(backend: str, mib: int, repeat: int, device: str = "cpu") -> dict[str, Any]:
    reader_cache = make_cache(1, fill=False)
    block_bytes = reader_cache[0].numel() * reader_cache.element_size()
    num = mib * 2**20 // block_bytes
    reader_cache = make_cache(num, fill=False, device=device)
    options: dict[str, Any] = {}
    proc, conn, owner = None, None, None
    if backend == "local":
        options["fabric"] = LocalFabric()
        owner = create_agent(backend, "owner", make_cache(num, fill=True, device=device), **options)
        metadata = owner.metadata()
    else:
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_owner_main, args=(child, backend, num, device), daemon=True)
        proc.start()
        if not conn.poll(WAIT_S):
            raise TimeoutError("owner process did not start")
        metadata = conn.recv()
    reader = create_agent(backend, "bench-reader", reader_cache, **options)
    try:
        reader.add_remote("owner", metadata)
        time_read(reader, num, "warmup")
        expected = make_cache(num, fill=True, device=device)
        if not torch.equal(reader_cache, expected.flip(0)):  # blocks were read in reverse order
            raise RuntimeError(f"{backend}: blocks did not arrive byte-exact")
        del expected
        times = [time_read(reader, num, f"r{i}") for i in range(repeat)]
    finally:
        reader.close()
        if owner is not None:
            owner.close()
        if conn is not None and proc is not None:
            conn.send("stop")
            proc.join(10)
    nbytes = num * block_bytes
    return {"backend": backend, "bytes": nbytes, "blocks": num, "best_s": min(times),
            "median_s": statistics.median(times), "best_gib_s": nbytes / min(times) / 2**30,
            "median_gib_s": nbytes / statistics.median(times) / 2**30}


def kernel_sweep(mib: int) -> None:
    """The gather-scatter kernel alone (one process, CUDA events) for a few tile shapes, same bytes."""
    from kvtransfer.gpu_copy import copy_blocks

    num = mib * 2**20 // (make_cache(1, fill=False)[0].numel() * 2)
    src, dst = make_cache(num, fill=False, device="cuda"), make_cache(num, fill=False, device="cuda")
    ids = torch.arange(num, device="cuda")
    for block, warps in [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 16)]:
        copy_blocks(src, dst, ids, ids.flip(0), block=block, num_warps=warps)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(5):
            copy_blocks(src, dst, ids, ids.flip(0), block=block, num_warps=warps)
        b.record()
        b.synchronize()
        ms = a.elapsed_time(b) / 5
        print(f"copy_blocks kernel block={block} warps={warps}: {ms:.2f} ms ({mib / 1024 / ms * 1e3:.0f} GiB/s)", flush=True)
    del src, dst


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backends", nargs="*", default=["local", "tcp", "nixl"])
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default="cpu", help="where both KV caches live: cpu or cuda")
    args = p.parse_args(argv)
    if args.device == "cuda":  # the baseline: a plain device-to-device copy of the same bytes, same run
        x = torch.randn(args.mib * 2**20 // 4, device="cuda")
        y = torch.empty_like(x)
        y.copy_(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            y.copy_(x)
        torch.cuda.synchronize()
        t = (time.perf_counter() - t0) / args.repeat
        print(f"device copy {args.mib} MiB: {t * 1e3:.2f} ms ({args.mib / 1024 / t:.2f} GiB/s moved)", flush=True)
        del x, y
        kernel_sweep(args.mib)
    for backend in args.backends:
        r = bench(backend, args.mib, args.repeat, args.device)
        print(f"{r['backend']:6s} {args.device} {r['bytes'] / 2**20:.0f} MiB in {r['blocks']} blocks: "
              f"best {r['best_s'] * 1e3:.1f} ms ({r['best_gib_s']:.2f} GiB/s), "
              f"median {r['median_s'] * 1e3:.1f} ms ({r['median_gib_s']:.2f} GiB/s)", flush=True)


if __name__ == "__main__":
    main()
