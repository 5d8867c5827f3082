"""gRPC Prefill and ReleaseKV on top of the engine in prefill role."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import grpc

from prefill_worker.lease import LeaseTable
from proto import disagg_pb2
from worker.servicer import WorkerServicerBase, check_request, layout_to_proto, logprob_to_proto

log = logging.getLogger(__name__)


class PrefillService(WorkerServicerBase):
    """Each prompt runs as an engine request with max_tokens=1 that keeps its blocks when it finishes."""

    def __init__(self, *args, address: str, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.address = address
        self.leases = LeaseTable(self.config.transfer.lease_s)
        self.aengine.add_hook(self._reclaim)

    def num_leased(self) -> int:
        return len(self.leases)

    async def Prefill(self, request: disagg_pb2.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> disagg_pb2.PrefillResponse:
        params = await check_request(request.version, request.params, context)
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} is draining")
        try:
            self.aengine.engine.validate(prompt, params)
            q = self.aengine.add_request(rid, prompt, dataclasses.replace(params, max_tokens=1),
                                         keep_blocks_on_finish=True)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            out = await q.get()
        except asyncio.CancelledError:
            self.aengine.abort(rid)  # the router gave up: its blocks must not wait for a lease
            raise
        if out.finish_reason == "error":
            await context.abort(grpc.StatusCode.INTERNAL, "engine failed")
        # No await between the engine finishing the request and the lease taking its blocks over, so an
        # Abort/ReleaseKV arriving now finds the lease and frees them.
        deadline = self.leases.grant(rid)
        token = out.new_token_ids[0]
        resp = disagg_pb2.PrefillResponse(request_id=rid, first_token=token)
        if out.new_logprobs:
            resp.first_logprob.CopyFrom(logprob_to_proto(out.new_logprobs[0]))
        finish = self._finish_reason(token, params)
        if finish:
            resp.finish_reason = finish
            await self.aengine.run_between_steps(lambda: self._free(rid))
            return resp
        # The finished request's table is no longer mutated, so reading it while a step runs is safe.
        table = list(self.aengine.engine.kv.block_table(rid))
        resp.kv.CopyFrom(disagg_pb2.KVHandle(
            worker_id=self.worker_id, worker_address=self.address, backend=self.agent.backend,
            agent_name=self.worker_id, block_ids=table, num_tokens=len(prompt), lease_deadline=deadline,
            layout=layout_to_proto(self.layout)))
        return resp

    def _finish_reason(self, token: int, params) -> str:  # noqa: ANN001
        eos = self.aengine.engine.model_config.eos_token_ids
        if token in params.stop_token_ids or (not params.ignore_eos and token in eos):
            return "stop"
        return "length" if params.max_tokens == 1 else ""

    async def ReleaseKV(self, request: disagg_pb2.ReleaseKVRequest, context: grpc.aio.ServicerContext
                        ) -> disagg_pb2.ReleaseKVResponse:
        found = await self.aengine.run_between_steps(lambda: self._free(request.request_id))
        return disagg_pb2.ReleaseKVResponse(found=found)

    async def Abort(self, request: disagg_pb2.AbortRequest, context: grpc.aio.ServicerContext
                    ) -> disagg_pb2.AbortResponse:
        leased = await self.aengine.run_between_steps(lambda: self._free(request.request_id))
        resp = await super().Abort(request, context)
        return disagg_pb2.AbortResponse(found=resp.found or leased)

    def _free(self, rid: str) -> bool:
        """Runs between steps. Frees a leased request's blocks once; False if it holds no lease."""
        if not self.leases.release(rid):
            return False
        self.aengine.engine.kv.free(rid)
        return True

    def _reclaim(self) -> None:
        """Engine-loop hook: free blocks whose pull completed (transfer notification) or whose lease ran out."""
        for tag in self.agent.notifications():
            self._free(tag)
        for rid in self.leases.expired():
            self.aengine.engine.kv.free(rid)
            self.counters.leases_expired += 1
            log.warning("lease of %s expired before its KV was pulled; blocks freed", rid)
