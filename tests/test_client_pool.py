"""benchmarks/client_pool.py: a trace sent from several client processes to a real HTTP server streaming SSE
arrives at its times, from every process, and comes back whole and in trace order."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from benchmarks.client_pool import ClientPool
from worker.ports import free_port


class Server:
    """/v1/completions streaming `max_tokens` chunks 5 ms apart; notes when each prompt arrived and from where."""

    def __init__(self) -> None:
        self.arrived: dict[int, tuple[float, int]] = {}  # the prompt's first id -> (time, client port)
        app = Starlette(routes=[Route("/v1/completions", self.completions, methods=["POST"])])
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, port=self.port, log_level="warning"))

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


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    thread = threading.Thread(target=s.server.run, daemon=True)
    thread.start()
    while not s.server.started:
        time.sleep(0.01)
    yield s
    s.server.should_exit = True
    thread.join(5)


@pytest.mark.parametrize("processes", [1, 3])
def test_a_trace_is_sent_at_its_times_from_every_process_and_returned_in_order(server: Server,
                                                                              processes: int) -> None:
    times = [0.0, 0.05, 0.1, 0.3, 0.3, 0.35]
    outs = [3, 4, 5, 6, 7, 8]
    prompts = [[100 + i, 1, 2] for i in range(len(times))]
    with ClientPool(processes) as pool:
        assert len(pool.pids) == (processes if processes > 1 else 0)
        results, duration = pool.replay(f"http://127.0.0.1:{server.port}", "m", (times, [3] * 6, outs), prompts)
    assert [r.ok for r in results] == [True] * 6 and [r.output_tokens for r in results] == outs
    assert [len(r.itls) for r in results] == [n - 1 for n in outs]  # in trace order: each its own stream
    # at its time, whichever process sent it: each arrival less its trace time is one offset (the pool's start),
    # read as their median, so that one late first request (a process still warming) does not shift the rest
    lags = [server.arrived[100 + i][0] - t for i, t in enumerate(times)]
    assert lags == pytest.approx([statistics.median(lags)] * len(times), abs=0.04)
    assert duration >= times[-1] + 0.04
    if processes > 1:  # requests i, i + 3 from one process: three processes' own connections
        ports = {server.arrived[100 + i][1] for i in range(len(times))}
        assert len(ports) >= processes


def test_a_pool_needs_a_process() -> None:
    with pytest.raises(ValueError, match="at least one process"):
        ClientPool(0)
