"""A decode worker without a model, for router benchmarks: `python -m benchmarks.fake_worker --port P --pace-ms 10`.

It answers Health and Load like a real decode worker and "steps" at a fixed pace: every step each running request
gets one token (one token per request per step: the router coalesces nothing unless it falls behind), so what a
benchmark measures is the router.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from proto import disagg_pb2, disagg_pb2_grpc

# Token ids of common SmolLM2 pieces, so the router's detokenizer sees ordinary text.
TOKENS = list(range(1000, 1200))


class FakeDecodeWorker(disagg_pb2_grpc.WorkerServicer):
    """Steps every `pace_s`: each running request gets one token, and each router's requests of that step go
    out as one TokenBatch on its Subscribe stream, as a real decode worker's engine steps do."""

    def __init__(self, pace_s: float, worker_id: str) -> None:
        self.pace_s, self.worker_id = pace_s, worker_id
        self.running: dict[str, tuple[str, int, int]] = {}  # request id -> (subscriber, produced, max_tokens)
        self.outboxes: dict[str, asyncio.Queue[disagg_pb2.TokenBatch]] = {}
        self.tokens = 0
        self._stepper: asyncio.Task[None] | None = None

    async def Health(self, request: disagg_pb2.HealthRequest, context: grpc.aio.ServicerContext
                     ) -> disagg_pb2.HealthResponse:
        return disagg_pb2.HealthResponse(ok=True, worker_id=self.worker_id, role="decode", model="fake",
                                         max_model_len=1 << 20, kv_block_size=16)

    async def Load(self, request: disagg_pb2.LoadRequest, context: grpc.aio.ServicerContext) -> disagg_pb2.LoadReport:
        return disagg_pb2.LoadReport(worker_id=self.worker_id, role="decode",
                                     stats={"num_running": len(self.running), "generation_tokens": self.tokens})

    async def Abort(self, request: disagg_pb2.AbortRequest, context: grpc.aio.ServicerContext
                    ) -> disagg_pb2.AbortResponse:
        return disagg_pb2.AbortResponse(found=self.running.pop(request.request_id, None) is not None)

    async def Subscribe(self, request: disagg_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[disagg_pb2.TokenBatch]:
        q = self.outboxes[request.subscriber] = asyncio.Queue()
        if self._stepper is None:
            self._stepper = asyncio.create_task(self._steps())
        yield disagg_pb2.TokenBatch()
        try:
            while True:
                yield await q.get()
        finally:
            del self.outboxes[request.subscriber]

    async def Decode(self, request: disagg_pb2.DecodeRequest, context: grpc.aio.ServicerContext
                     ) -> disagg_pb2.DecodeResponse:
        self.running[request.request_id] = (request.subscriber, 0, request.params.max_tokens)
        return disagg_pb2.DecodeResponse()

    async def _steps(self) -> None:
        next_step = time.monotonic()
        while True:
            next_step += self.pace_s
            await asyncio.sleep(max(0.0, next_step - time.monotonic()))
            batches: dict[str, disagg_pb2.TokenBatch] = {}
            for rid, (sub, produced, limit) in list(self.running.items()):
                done = produced + 1 >= limit
                batch = batches.setdefault(sub, disagg_pb2.TokenBatch())
                batch.chunks.add(request_id=rid, token_ids=[TOKENS[produced % len(TOKENS)]],
                                 finish_reason="length" if done else "")
                if done:
                    del self.running[rid]
                else:
                    self.running[rid] = (sub, produced + 1, limit)
                self.tokens += 1
            for sub, batch in batches.items():
                if sub in self.outboxes:
                    self.outboxes[sub].put_nowait(batch)


async def serve(port: int, pace_s: float) -> None:
    server = grpc.aio.server()
    disagg_pb2_grpc.add_WorkerServicer_to_server(FakeDecodeWorker(pace_s, f"fake@{port}"), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"READY 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fake_worker", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True, help="gRPC port to listen on (127.0.0.1)")
    p.add_argument("--pace-ms", type=float, default=10.0, help="milliseconds between a stream's tokens (default 10)")
    a = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(a.port, a.pace_ms / 1000))


if __name__ == "__main__":
    main()
