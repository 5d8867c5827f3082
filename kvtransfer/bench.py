"""Bandwidth of one READ per backend: `python -m kvtransfer.bench [--mib 64] [--repeat 5] [backend ...]`.

The owner of the blocks is a spawned process (tcp, nixl, cuda_ipc) or an agent in this process (local). Blocks
are 2 MiB (32 layers x 2 x 16 tokens x 8 heads x 128 dims, fp16); one read moves `--mib` MiB of them, and the
time runs from start_read() until wait() returns DONE, split into the host time inside start_read() and the
wait() after it (medians). `--chunk-blocks N` also times a "streamed" pass: the same bytes as reads of N blocks
each, all started back to back, then all waited for (a 2,048-token Llama-3-8B prompt is 128 such blocks, and a
decode worker pulls several prompts at once).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import statistics
import time
from collections.abc import Iterator
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
    if cache.is_cuda:  # done before any read of it: cuda_ipc copies on a stream that does not wait for this one
        torch.cuda.synchronize()
    return cache


def _owner_main(conn: Connection, backend: str, num_blocks: int, device: str) -> None:
    agent = create_agent(backend, "bench-owner", make_cache(num_blocks, fill=True, device=device))
    try:
        conn.send(agent.metadata())
        conn.poll(WAIT_S)  # serve until told to stop, or at most WAIT_S
    finally:
        agent.close()


def time_read(agent: KVTransferAgent, remote: list[int], local: list[int], tag: str) -> tuple[float, float]:
    """One read: (host time inside start_read(), time of the wait() after it until DONE)."""
    t0 = time.perf_counter()
    handle = agent.start_read("owner", remote, local, tag=tag)
    t1 = time.perf_counter()
    status = agent.wait(handle, WAIT_S)  # as decode_worker/kv_pull.py waits, minus its hop to a worker thread
    t2 = time.perf_counter()
    agent.release(handle)
    if status is not TransferStatus.DONE:
        raise RuntimeError(f"read ended {status.name}: {handle.error}")
    return t1 - t0, t2 - t1


def time_streamed(agent: KVTransferAgent, remote: list[int], local: list[int], chunk: int, tag: str) -> float:
    """The same blocks as consecutive reads of `chunk` blocks (disjoint local blocks), all started back to back,
    then all waited for: as a decode worker pulls several prompts at once. Seconds until the last is DONE."""
    cuts = range(0, len(local), chunk)
    t0 = time.perf_counter()
    handles = [agent.start_read("owner", remote[i : i + chunk], local[i : i + chunk], tag=f"{tag}-{i}") for i in cuts]
    statuses = [agent.wait(h, WAIT_S) for h in handles]
    elapsed = time.perf_counter() - t0
    for h in handles:
        agent.release(h)
    failed = [h for h, st in zip(handles, statuses, strict=True) if st is not TransferStatus.DONE]
    if failed:
        raise RuntimeError(f"{len(failed)} streamed reads did not end DONE: {failed[0].error}")
    return elapsed


@contextlib.contextmanager
def owner_metadata(backend: str, num: int, device: str, options: dict[str, Any]) -> Iterator[bytes]:
    """An owner of `num` filled blocks, in this process (local) or a spawned one; yields its metadata."""
    if backend == "local":
        owner = create_agent(backend, "owner", make_cache(num, fill=True, device=device), **options)
        try:
            yield owner.metadata()
        finally:
            owner.close()
        return
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_owner_main, args=(child, backend, num, device), daemon=True)
    proc.start()
    try:
        if not conn.poll(WAIT_S):
            raise TimeoutError("owner process did not start")
        yield conn.recv()
    finally:
        conn.send("stop")
        proc.join(10)


def check_landed(reader_cache: torch.Tensor, backend: str, what: str) -> None:
    """Every block arrived byte-exact (read in reverse order), then the cache is zeroed for the next check."""
    expected = make_cache(reader_cache.shape[0], fill=True, device=str(reader_cache.device))
    if not torch.equal(reader_cache, expected.flip(0)):
        raise RuntimeError(f"{backend}: blocks of the {what} read did not arrive byte-exact")
    reader_cache.zero_()
    if reader_cache.is_cuda:  # start_read() does not wait for this stream's work (kvtransfer/base.py)
        torch.cuda.synchronize()


def measure(reader: KVTransferAgent, num: int, repeat: int, chunk: int) -> dict[str, Any]:
    """Warm-up reads checked byte-exact, then `repeat` timed single reads (and streamed passes if `chunk`)."""
    remote, local = list(range(num)), list(range(num))[::-1]
    time_read(reader, remote, local, "warmup")
    check_landed(reader.kv_cache, reader.backend, "single")
    times = [time_read(reader, remote, local, f"r{i}") for i in range(repeat)]
    out = {"start_s": statistics.median(t[0] for t in times), "wait_s": statistics.median(t[1] for t in times),
           "totals": [sum(t) for t in times]}
    if chunk:
        time_streamed(reader, remote, local, chunk, "swarmup")
        check_landed(reader.kv_cache, reader.backend, "streamed")
        out["streamed_s"] = statistics.median(time_streamed(reader, remote, local, chunk, f"s{i}") for i in range(repeat))
    return out


def bench(backend: str, mib: int, repeat: int, device: str = "cpu", chunk_blocks: int = 0) -> dict[str, Any]:
    block_bytes = make_cache(1, fill=False)[0].numel() * 2
    num = mib * 2**20 // block_bytes
    options: dict[str, Any] = {"fabric": LocalFabric()} if backend == "local" else {}
    with owner_metadata(backend, num, device, options) as metadata:
        reader = create_agent(backend, "bench-reader", make_cache(num, fill=False, device=device), **options)
        try:
            reader.add_remote("owner", metadata)
            m = measure(reader, num, repeat, chunk_blocks)
        finally:
            reader.close()
    nbytes, times = num * block_bytes, m.pop("totals")
    r = {"backend": backend, "bytes": nbytes, "blocks": num, "best_s": min(times), "median_s": statistics.median(times),
         "best_gib_s": nbytes / min(times) / 2**30, "median_gib_s": nbytes / statistics.median(times) / 2**30, **m}
    if "streamed_s" in m:
        r["streamed_gib_s"] = nbytes / m["streamed_s"] / 2**30
    return r


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


def report(r: dict[str, Any], device: str, chunk: int) -> None:
    line = (f"{r['backend']:6s} {device} {r['bytes'] / 2**20:.0f} MiB in {r['blocks']} blocks: "
            f"best {r['best_s'] * 1e3:.1f} ms ({r['best_gib_s']:.2f} GiB/s), "
            f"median {r['median_s'] * 1e3:.1f} ms ({r['median_gib_s']:.2f} GiB/s); "
            f"median start_read {r['start_s'] * 1e3:.3f} ms, median wait {r['wait_s'] * 1e3:.3f} ms")
    if chunk:
        line += f"; streamed in reads of {chunk} blocks: {r['streamed_s'] * 1e3:.1f} ms ({r['streamed_gib_s']:.2f} GiB/s)"
    print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backends", nargs="*", default=["local", "tcp", "nixl"])
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both KV caches live")
    p.add_argument("--chunk-blocks", type=int, default=0,
                   help="also time the same bytes as back-to-back reads of this many blocks each (0: off)")
    args = p.parse_args(argv)
    if args.mib < 2 or args.repeat < 1 or args.chunk_blocks < 0:
        p.error("need --mib >= 2 (one 2 MiB block), --repeat >= 1 and --chunk-blocks >= 0")
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
        report(bench(backend, args.mib, args.repeat, args.device, args.chunk_blocks), args.device, args.chunk_blocks)


if __name__ == "__main__":
    main()
