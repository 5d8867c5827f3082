"""gRPC Subscribe and Decode: pull the KV (or prefill locally), join the running batch, stream tokens.

A router process opens one Subscribe stream per decode worker and sends each request with Decode, naming its
subscription; the request's tokens travel on that stream, batched with every other request of the same router
(decode_worker/subscriber.py). Decode answers once the request is in the engine.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from decode_worker.kv_pull import KVPuller, TransferSetupError
from decode_worker.kv_stream import KVStreamPuller
from decode_worker.subscriber import Subscriber
from engine.request import InvalidRequestError
from proto import NO_SUBSCRIPTION, PROTOCOL_VERSION, disagg_pb2
from worker.servicer import WorkerServicerBase, check_request, refuse

log = logging.getLogger(__name__)


class DecodeService(WorkerServicerBase):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.puller = KVPuller(self.agent, self.aengine, self.config.transfer, self.counters, self.layout,
                               self.kv_heads)
        self.streamer = KVStreamPuller(self.puller)
        self.subscribers: dict[str, Subscriber] = {}

    async def Subscribe(self, request: disagg_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[disagg_pb2.TokenBatch]:
        if request.version != PROTOCOL_VERSION:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"protocol version {request.version} not supported (this worker speaks {PROTOCOL_VERSION})")
        if not request.subscriber or request.subscriber in self.subscribers:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"subscriber name {request.subscriber!r} is empty "
                                "or already streaming")
        sub = self.subscribers[request.subscriber] = Subscriber(
            request.subscriber, self.aengine.note if self.aengine.noting else None)
        log.info("router %s subscribed", sub.name)
        try:
            async for batch in sub.batches():
                yield batch
        finally:
            del self.subscribers[sub.name]
            if sub.requests:
                log.warning("router %s went away with %d request(s) running here; aborting them", sub.name,
                            len(sub.requests))
            sub.close(self._abort)

    async def Decode(self, request: disagg_pb2.DecodeRequest, context: grpc.aio.ServicerContext
                     ) -> disagg_pb2.DecodeResponse:
        params = await check_request(request.version, request.params, context)
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        await self.refuse_unless_serving(context)
        sub = self.subscribers.get(request.subscriber)
        if sub is None:
            await refuse(context, grpc.StatusCode.FAILED_PRECONDITION, NO_SUBSCRIPTION,
                         f"no Subscribe stream named {request.subscriber!r}: subscribe first")
        generated = list(request.output_token_ids)
        try:
            req = self.engine.make_request(rid, prompt, params, output_token_ids=generated)
            if request.HasField("kv_source") and not generated:  # layer-wise: pull while the prefill runs
                sub.own(rid)
                self.streamer.start(req, request.kv_source, sub.push)
                return disagg_pb2.DecodeResponse()
            if not request.HasField("kv"):
                self.aengine.add(req, sub.push)
                sub.own(rid)
                if generated:  # moved here from a lost decode worker (or its prefill's KV is gone)
                    log.info("%s: resuming after %d generated token(s); recomputing its context", rid, len(generated))
                return disagg_pb2.DecodeResponse(kv_recomputed=bool(generated))
            sub.own(rid)  # before the pull: a router that goes away mid-pull aborts it
            pulled = await self.puller.pull(req, request.kv, sub.push)
        except InvalidRequestError as e:  # nothing was queued (a bad request, or a duplicate id)
            sub.requests.discard(rid)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except TransferSetupError as e:
            sub.requests.discard(rid)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except BaseException:  # the router gave up on this call (cancelled mid-pull): nothing must keep running
            self.aengine.abort(rid)
            raise
        if not pulled:
            log.info("%s: recomputing %d prompt tokens locally", rid, len(prompt))
        return disagg_pb2.DecodeResponse(kv_recomputed=not pulled)

    async def Abort(self, request: disagg_pb2.AbortRequest, context: grpc.aio.ServicerContext
                    ) -> disagg_pb2.AbortResponse:
        self.streamer.cancel(request.request_id)  # a layer-wise pull in flight stops (and frees what it held)
        return await super().Abort(request, context)

    def _abort(self, request_id: str) -> None:
        self.streamer.cancel(request_id)
        self.aengine.abort(request_id)
