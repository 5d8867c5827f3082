"""gRPC Decode: pull the KV (or prefill locally), join the running batch, stream tokens."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from decode_worker.kv_pull import KVPuller, TransferSetupError
from proto import disagg_pb2
from worker.servicer import WorkerServicerBase, check_request, logprob_to_proto

log = logging.getLogger(__name__)


class DecodeService(WorkerServicerBase):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.puller = KVPuller(self.agent, self.aengine, self.config.transfer, self.counters, self.layout)

    async def Decode(self, request: disagg_pb2.DecodeRequest, context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[disagg_pb2.TokenChunk]:
        params = await check_request(request.version, request.params, context)
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} is draining")
        try:
            self.aengine.engine.validate(prompt, params)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finished = False
        try:
            q, recomputed = await self._admit(rid, prompt, params, request, context)
            first = True
            while not finished:
                so = await q.get()
                finished = so.finished
                if so.finish_reason == "error":
                    await context.abort(grpc.StatusCode.INTERNAL, "engine failed")
                yield disagg_pb2.TokenChunk(token_ids=so.new_token_ids, finish_reason=so.finish_reason or "",
                                            logprobs=[logprob_to_proto(lp) for lp in so.new_logprobs],
                                            kv_recomputed=recomputed and first)
                first = False
        finally:
            if not finished:  # client went away or the stream broke: free the request's blocks now
                self.aengine.abort(rid)

    async def _admit(self, rid: str, prompt: list[int], params, request: disagg_pb2.DecodeRequest,  # noqa: ANN001
                     context: grpc.aio.ServicerContext):  # noqa: ANN202
        """Queue the request in the engine; returns (output queue, whether the prompt is recomputed)."""
        if not request.HasField("first_token"):
            return self.aengine.add_request(rid, prompt, params), False
        first = [request.first_token]
        if request.HasField("kv"):
            try:
                if await self.puller.pull(rid, request.kv, prompt):
                    return self.aengine.add_request(rid, prompt, params, output_token_ids=first,
                                                    num_computed_tokens=request.kv.num_tokens), False
            except TransferSetupError as e:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        self.counters.recomputes += 1
        log.info("%s: recomputing %d prompt tokens locally", rid, len(prompt))
        return self.aengine.add_request(rid, prompt, params, output_token_ids=first), True
