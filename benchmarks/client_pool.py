"""A trace's requests sent from several client processes, so that the load generator's own event loop does not
make the inter-token gaps it measures.

A decode worker sends the tokens of one step together, one per running request (~17 on an H100 at 7 request/s);
one asyncio client reads them one after another, each through httpx's stream and a JSON parse, and stamps each
when it reaches it. A stream whose token is read last in one step and first in the next gets a gap shorter by
that spread, and the other way round a longer one. At the p99 of the gaps, where 0.2% of them decide the figure,
that moves it by 10-25%: one H100 run's client saw 1.39% of gaps over 20 ms where the router had sent 1.07%
(benchmarks/RESULTS.md). Load generators spread their streams over processes for this (guidellm's workers);
`ClientPool(n)` does: request i goes to process i % n, each process runs its share on its own event loop from
one shared start time, and the results come back in trace order. `n` = 1 runs in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import time
from multiprocessing.connection import Connection
from types import TracebackType

import httpx

from benchmarks import serving

START_LEAD_S = 0.5  # from handing every process its share to the shared start (each warms its client, then waits)
Job = tuple[str, str, list[tuple[int, float, list[int], int]], float]  # url, model, (index, at, prompt, out), start


async def _send(url: str, model: str, items: list[tuple[int, float, list[int], int]], start: float
                ) -> list[tuple[int, serving.RequestResult]]:
    """Each item's request at `start` (Unix seconds) + its time, on one client; (index, result) each."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=256)) as client:
        await _warm(client, url, start)
        await asyncio.sleep(max(0.0, start - time.time()))
        t0 = time.perf_counter()

        async def fire(i: int, at: float, prompt: list[int], out: int) -> tuple[int, serving.RequestResult]:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            return i, await serving.one_request(client, url, model, prompt, out, {})

        return list(await asyncio.gather(*(fire(*item) for item in items)))


async def _warm(client: httpx.AsyncClient, url: str, start: float) -> None:
    """One GET before the start, so that a fresh process's first request does not also pay its client's first use
    (lazy imports, the first connection): a CI run saw a process's first request 41 ms late. Any answer will do;
    none is waited for past the start."""
    with contextlib.suppress(httpx.HTTPError, TimeoutError):
        await asyncio.wait_for(client.get(f"{url}/health"), timeout=max(0.01, start - time.time()))


def _child(conn: Connection) -> None:
    """A client process: runs each job it is sent and sends back its results and when its last one ended."""
    conn.send("ready")
    while (job := conn.recv()) is not None:
        url, model, items, start = job
        results = asyncio.run(_send(url, model, items, start))
        conn.send((results, time.time()))


class ClientPool:
    """`processes` client processes (started on entry, stopped on exit; 1: none, this process sends)."""

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"a client pool needs at least one process, got {processes}")
        self.processes = processes
        self._children: list[tuple[mp.process.BaseProcess, Connection]] = []

    @property
    def pids(self) -> list[int]:
        """The client processes' pids (a machine-load meter counts them as the run's own)."""
        return [p.pid for p, _ in self._children if p.pid is not None]

    def __enter__(self) -> ClientPool:
        if self.processes > 1:
            ctx = mp.get_context("spawn")  # not fork: this process may hold threads (a cluster's log readers)
            for _ in range(self.processes):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_child, args=(child,), daemon=True)
                proc.start()
                self._children.append((proc, parent))
            for proc, conn in self._children:
                if not conn.poll(60) or conn.recv() != "ready":
                    raise RuntimeError(f"client process {proc.pid} did not start")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for proc, conn in self._children:
            with contextlib.suppress(OSError):  # it died already
                conn.send(None)
            proc.join(5)
            if proc.is_alive():
                proc.kill()
        self._children = []

    def replay(self, url: str, model: str, trace: tuple[list[float], list[int], list[int]],
               prompts: list[list[int]]) -> tuple[list[serving.RequestResult], float]:
        """Send request i (prompts[i], trace[2][i] tokens out) at trace[0][i] seconds from a shared start; (results
        in trace order, seconds from the start to the last completion)."""
        items = [(i, at, prompts[i], out) for i, (at, out) in enumerate(zip(trace[0], trace[2], strict=True))]
        start = time.time() + START_LEAD_S
        if not self._children:
            got = asyncio.run(_send(url, model, items, start))
            return [r for _, r in sorted(got, key=lambda x: x[0])], time.time() - start
        n = len(self._children)
        for k, (_, conn) in enumerate(self._children):
            conn.send((url, model, items[k::n], start))
        got, ends = [], []
        for proc, conn in self._children:
            if not conn.poll(24 * 3600):
                raise RuntimeError(f"client process {proc.pid} sent no results")
            results, end = conn.recv()
            got += results
            ends.append(end)
        return [r for _, r in sorted(got, key=lambda x: x[0])], max(ends) - start
