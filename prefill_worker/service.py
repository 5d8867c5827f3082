"""gRPC Prefill and ReleaseKV on top of the engine in prefill role.

Each prompt runs as an engine request with a lease (`lease_s`): the engine samples its first token and, unless
that token ends the request, finishes it with the KV kept under a lease (engine/remote_kv.py). The answer carries
the lease as a KVHandle. The blocks are freed exactly once, by whichever comes first: the decode side's transfer
notification, ReleaseKV, Abort, or the lease deadline (the engine's `check_deadlines`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from engine.remote_kv import KVProgress
from engine.request import FinishReason
from proto import PROTOCOL_VERSION, disagg_pb2
from proto.convert import layout_to_proto, logprob_to_proto, prompt_logprobs_to_proto
from worker.servicer import WorkerServicerBase, check_request

log = logging.getLogger(__name__)

PROGRESS_POLL_S = 0.001  # how often WatchKV looks at a prompt's progress (a layer of a chunk takes longer)
MAX_WATCH_WAIT_S = 60.0


class PrefillService(WorkerServicerBase):
    def __init__(self, *args, address: str, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.address = address
        self.aengine.add_hook(self._release_pulled)

    async def Prefill(self, request: disagg_pb2.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> disagg_pb2.PrefillResponse:
        params = await check_request(request.version, request.params, context)
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        await self.refuse_unless_serving(context)
        try:
            q = self.aengine.add_request(rid, prompt, params, lease_s=self.config.transfer.lease_s)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            out = await q.get()
        except asyncio.CancelledError:
            self.aengine.abort(rid)  # the router gave up: its blocks must not wait for a lease
            raise
        if out.finish_reason in ("error", "abort"):
            await context.abort(grpc.StatusCode.INTERNAL if out.finish_reason == "error" else
                                grpc.StatusCode.CANCELLED, f"prefill of {rid} ended: {out.finish_reason}")
        resp = disagg_pb2.PrefillResponse(request_id=rid, first_token=out.new_token_ids[0])
        if out.new_logprobs:
            resp.first_logprob.CopyFrom(logprob_to_proto(out.new_logprobs[0]))
        if out.prompt_logprobs is not None:  # asked for: this worker computed the whole prompt
            resp.prompt_logprobs.extend(prompt_logprobs_to_proto(out.prompt_logprobs))
        if out.finish_reason != FinishReason.HANDOFF:  # the first token ended it: no KV is kept
            resp.finish_reason = out.finish_reason or ""
            return resp
        # The lease was granted inside the step that finished the request; Abort/ReleaseKV from now on find it.
        lease = self.engine.lease(rid)
        if lease is None:
            # Freed between that step and this answer. Streaming layer-wise, the decode worker learnt the first
            # token from WatchKV and its last read's notification released the lease first: the router must still
            # get the token (the decode worker continues after it). Else an Abort raced with this answer (nobody
            # listens) or the lease expired (the decode worker recomputes the prompt). No handle either way.
            log.debug("%s: the KV lease ended before the answer (pulled by a layer-wise stream, or aborted)", rid)
            return resp
        self.agent.expect_read(rid, time.monotonic() + max(0.0, lease.deadline - time.time()))
        self.aengine.note("prefill_answered", rid, tokens=lease.num_tokens)
        resp.kv.CopyFrom(disagg_pb2.KVHandle(
            worker_id=self.worker_id, worker_address=self.address, backend=self.agent.backend,
            agent_name=self.worker_id, block_ids=lease.block_ids, num_tokens=lease.num_tokens,
            lease_deadline=lease.deadline, layout=layout_to_proto(self.layout)))
        return resp

    async def ReleaseKV(self, request: disagg_pb2.ReleaseKVRequest, context: grpc.aio.ServicerContext
                        ) -> disagg_pb2.ReleaseKVResponse:
        found = await self.aengine.run_between_steps(lambda: self.engine.release_lease(request.request_id))
        self.agent.expect_read(request.request_id, 0.0)  # freed: no read of those blocks comes any more
        return disagg_pb2.ReleaseKVResponse(found=found)

    def _release_pulled(self) -> None:
        """Engine-loop hook: free the leases whose pull completed (the transfer's notification)."""
        for tag in self.agent.notifications():
            self.engine.release_lease(tag)

    async def WatchKV(self, request: disagg_pb2.WatchKVRequest, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[disagg_pb2.KVProgress]:
        """Layer-wise streaming: the prompt's KV progress each time it moves, until the first token."""
        if request.version != PROTOCOL_VERSION:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"protocol version {request.version} not supported (this worker speaks {PROTOCOL_VERSION})")
        rid = request.request_id
        admitted_by = time.monotonic() + min(max(request.wait_s, 0.0), MAX_WATCH_WAIT_S)
        # the decode worker reads each layer group as it is written, while the prompt still runs
        self.agent.expect_read(rid, admitted_by + self.config.transfer.lease_s)
        last: KVProgress | None = None
        while True:
            prog = self.engine.kv_progress(rid)
            if prog is None and (last is not None or time.monotonic() > admitted_by):
                await context.abort(grpc.StatusCode.NOT_FOUND, f"{rid}: no prefill here holds its KV (not admitted, "
                                    "ended by its first token, aborted, or released)")
            if prog is not None and prog != last:
                yield _progress_to_proto(prog, self.engine.lease(rid))
                if prog.first_token is not None:
                    return
                last = prog
            await asyncio.sleep(PROGRESS_POLL_S)


def _progress_to_proto(prog: KVProgress, lease) -> disagg_pb2.KVProgress:  # noqa: ANN001 - KVLease | None
    msg = disagg_pb2.KVProgress(block_ids=prog.block_ids, num_tokens=prog.num_tokens, layer_tokens=prog.layer_tokens)
    if prog.first_token is not None:
        msg.first_token = prog.first_token
        msg.lease_deadline = lease.deadline if lease is not None else 0.0
    return msg
