"""benchmarks/client_pool.py: a trace sent from several client processes to a real HTTP server streaming SSE
arrives at its times, from every process, and comes back whole and in trace order."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from benchmarks.client_pool import ClientPool
from worker.ports import free_port


class Server:
    """/v1/completions streaming `max_tokens` chunks 5 ms apart; notes when each prompt arrived and from where
    (GET /arrived). It runs in a process of its own: sharing the client's interpreter, its thread and the client's
    loop would take turns on one lock, and a busy two-core machine made one arrival 65 ms late that way."""

    def __init__(self, port: int) -> None:
        self.arrived: dict[int, tuple[float, int]] = {}  # the prompt's first id -> (time, client port)
        app = Starlette(routes=[Route("/v1/completions", self.completions, methods=["POST"]),
                                Route("/arrived", self.arrivals, methods=["GET"])])
        self.server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))

    async def completions(self, request: Request) -> StreamingResponse:
        body = await request.json()
        self.arrived[body["prompt"][0]] = (time.time(), request.client.port if request.client else 0)

        async def stream() -> AsyncIterator[str]:
            for i in range(body["max_tokens"]):
                await asyncio.sleep(0.005)
                yield f"data: {json.dumps({'choices': [{'text': f't{i}'}]})}\n\n"
            usage = {"completion_tokens": body["max_tokens"]}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def arrivals(self, request: Request) -> JSONResponse:
        return JSONResponse({str(k): v for k, v in self.arrived.items()})


def _serve(port: int) -> None:
    Server(port).server.run()


class ServerProcess:
    """A Server in a spawned process, on a free port, ready on construction."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process = mp.get_context("spawn").Process(target=_serve, args=(self.port,), daemon=True)
        self.process.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/arrived", timeout=1.0).raise_for_status()
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline or not self.process.is_alive():
                    raise RuntimeError("the test server did not start") from None
                time.sleep(0.05)

    def arrived(self) -> dict[int, tuple[float, int]]:
        got = httpx.get(f"http://127.0.0.1:{self.port}/arrived", timeout=5.0).json()
        return {int(k): (t, port) for k, (t, port) in got.items()}


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    s = ServerProcess()
    yield s
    s.process.terminate()
    s.process.join(5)


@pytest.mark.parametrize("processes", [1, 3])
def test_a_trace_is_sent_at_its_times_from_every_process_and_returned_in_order(server: ServerProcess,
                                                                              processes: int) -> None:
    times = [0.0, 0.1, 0.2, 0.6, 0.6, 0.7]  # 0.1 s apart or more: a request sent in another's slot is off by more
    # than the 0.08 s allowed below, which a busy two-core machine's scheduling needs (one CI run: 41 ms)
    outs = [3, 4, 5, 6, 7, 8]
    prompts = [[100 + i, 1, 2] for i in range(len(times))]
    with ClientPool(processes) as pool:
        assert len(pool.pids) == (processes if processes > 1 else 0)
        results, duration = pool.replay(f"http://127.0.0.1:{server.port}", "m", (times, [3] * 6, outs), prompts)
    assert [r.ok for r in results] == [True] * 6 and [r.output_tokens for r in results] == outs
    assert [len(r.itls) for r in results] == [n - 1 for n in outs]  # in trace order: each its own stream
    # at its time, whichever process sent it: each arrival less its trace time is one offset (the pool's start),
    # read as their median, so that one late first request (a process still warming) does not shift the rest
    arrived = server.arrived()
    lags = [arrived[100 + i][0] - t for i, t in enumerate(times)]
    assert lags == pytest.approx([statistics.median(lags)] * len(times), abs=0.08)
    assert duration >= times[-1] + 0.04
    if processes > 1:  # requests i, i + 3 from one process: three processes' own connections
        ports = {arrived[100 + i][1] for i in range(len(times))}
        assert len(ports) >= processes


def test_a_pool_needs_a_process() -> None:
    with pytest.raises(ValueError, match="at least one process"):
        ClientPool(0)
