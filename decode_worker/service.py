"""gRPC Decode: pull the KV (or prefill locally), join the running batch, stream tokens."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from decode_worker.kv_pull import KVPuller, TransferSetupError
from engine.engine import StepOutput
from engine.request import InvalidRequestError, SamplingParams
from proto import disagg_pb2
from proto.convert import logprob_to_proto
from worker.servicer import WorkerServicerBase, check_request

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
        finished, queued = False, True
        try:
            try:
                q, recomputed = await self._admit(rid, prompt, params, request, context)
            except InvalidRequestError as e:  # nothing was queued (a bad request, or a duplicate id)
                queued = False
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            first = True
            while not finished:
                so = await q.get()
                finished = so.finished
                if so.finish_reason == "error":
                    await context.abort(grpc.StatusCode.INTERNAL, f"engine failed: {so.stop_reason or 'see log'}")
                if so.finish_reason == "abort":
                    await context.abort(grpc.StatusCode.CANCELLED, f"request {rid} was aborted")
                yield disagg_pb2.TokenChunk(token_ids=so.new_token_ids, finish_reason=so.finish_reason or "",
                                            logprobs=[logprob_to_proto(lp) for lp in so.new_logprobs],
                                            kv_recomputed=recomputed and first)
                first = False
        finally:
            if queued and not finished:  # client went away (maybe mid-pull) or the stream broke: free its blocks
                self.aengine.abort(rid)

    async def _admit(self, rid: str, prompt: list[int], params: SamplingParams, request: disagg_pb2.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> tuple[asyncio.Queue[StepOutput], bool]:
        """Queue the request in the engine; returns (output queue, whether the prompt is recomputed)."""
        first = [request.first_token] if request.HasField("first_token") else []
        req = self.engine.make_request(rid, prompt, params, output_token_ids=first)
        if not first:
            return self.aengine.add(req), False
        if request.HasField("kv"):
            try:
                q, pulled = await self.puller.pull(req, request.kv)
            except TransferSetupError as e:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            if pulled:
                return q, False
        else:
            q = self.aengine.add(req)
        log.info("%s: recomputing %d prompt tokens locally", rid, len(prompt))
        return q, True
