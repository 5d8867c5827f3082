"""The prefill worker's gRPC service in process (prefill_worker/service.py), driven as gRPC would drive it."""

from __future__ import annotations

import asyncio

import grpc

from engine.config import CacheConfig, EngineConfig
from engine.engine import LLMEngine
from engine.request import SamplingParams
from proto import PROTOCOL_VERSION, disagg_pb2
from proto.convert import params_to_proto
from worker.async_engine import AsyncEngine
from worker.config import TransferConfig, WorkerConfig
from worker.server import build_service

PROMPT = list(range(30, 67))


class Aborted(Exception):
    pass


class Context:
    """The part of grpc.aio.ServicerContext the handlers use: abort raises, as gRPC's does."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Aborted(f"{code.name}: {details}")


def test_the_first_token_is_answered_when_a_streamed_pull_freed_the_lease_first(tiny_llama_dir: str) -> None:
    """Layer-wise streaming: the decode worker learns the first token from WatchKV and may finish reading the KV
    before the Prefill handler wakes; its read's notification frees the lease in the engine loop's hook right
    after the step. The router must still get the first token (once, without a KV handle): the decode worker
    continues after it. Answering CANCELLED here lost the first token of the stream."""
    config = WorkerConfig(role="prefill", worker_id="prefill-t", transfer=TransferConfig(backend="tcp"),
                          engine=EngineConfig(model=tiny_llama_dir, cache=CacheConfig(num_blocks=40)))
    engine = LLMEngine(config.engine)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.add_request("local", PROMPT, params)
    expected = next(so.new_token_ids[0] for so in engine.step() if so.request_id == "local")
    engine.abort("local")

    async def scenario() -> tuple[disagg_pb2.PrefillResponse, list[bool]]:
        aengine = AsyncEngine(engine)
        service = build_service(config, aengine, "127.0.0.1:1")
        freed: list[bool] = []
        # Runs after the service's own hook, right after the step that granted the lease: as a read notification.
        aengine.add_hook(lambda: freed.append(engine.release_lease("r")) if engine.lease("r") else None)
        await aengine.start()
        try:
            req = disagg_pb2.PrefillRequest(version=PROTOCOL_VERSION, request_id="r", prompt_token_ids=PROMPT,
                                            params=params_to_proto(params))
            return await asyncio.wait_for(service.Prefill(req, Context()), 60), freed
        finally:
            await aengine.stop()
            service.agent.close()
            service.close()

    try:
        resp, freed = asyncio.run(scenario())
        assert freed == [True]
        assert resp.first_token == expected and not resp.HasField("kv") and not resp.finish_reason
        assert engine.load().kv_blocks_free == engine.load().kv_blocks_total
    finally:
        engine.close()
