"""Layer-wise streaming: pull a prompt's KV while the prefill worker is still computing it.

The router sends Decode with a `kv_source` (the prefill worker now running the prompt) at the same time as it
sends Prefill. The decode worker reserves the request's blocks at once (`receive_kv`), then follows the prompt's
progress on the prefill worker (its WatchKV stream: per layer, how many leading prompt tokens have their KV
written) and reads each group of layers (`transfer.layer_groups`) of the blocks that are ready as soon as they
are, while the prefill computes the later layers and chunks. The last progress message carries the first token;
once every group has arrived the request joins the batch with that token, as after a whole-prompt pull. So the
transfer hides behind the prefill, and what is left exposed is at most the last layer group of the last chunk.

Block ownership is the whole pull's (decode_worker/kv_pull.py): every read is released before the next step of
the protocol, and the engine hears `kv_received` or the failure only then.

Tensor parallelism: each group read is one part per decode rank (worker/kv_agents.py), each reading its heads of the
group from the prefill rank that holds them. The progress comes from the prefill's rank 0 only, and that is enough:
rank 0 finishes layer l only after that layer's row-parallel all-reduce, which needs every rank to have run its
attention for layer l, i.e. written its KV of that layer.

Failure: the decode worker does not know the first token until the end, so it never recomputes on its own (it
could sample a different first token than the one the router already streamed). Any failure (the prefill worker
gone, its request ended or preempted, a read failed or timed out, no free blocks) ends the request here with
finish reason "kv_lost", freeing its blocks; the router then sends it again with the tokens it has (router/
generation.py), to be recomputed.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from decode_worker.kv_pull import KVPuller
from engine.engine import StepOutput
from engine.kv_cache_manager import cdiv
from engine.remote_kv import KVReservation
from engine.request import Request
from kvtransfer import TransferStatus
from proto import PROTOCOL_VERSION, disagg_pb2
from worker.async_engine import Sink

log = logging.getLogger(__name__)


class KVLost(Exception):
    """The streamed KV cannot arrive (why is the message)."""


def layer_groups(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """`groups` contiguous layer ranges covering [0, num_layers), as even as they can be."""
    groups = max(1, min(groups, num_layers))
    edges = [round(i * num_layers / groups) for i in range(groups + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


class KVStreamPuller:
    """Runs one layer-wise pull per request, as a task that Abort can cancel."""

    def __init__(self, puller: KVPuller) -> None:
        self.puller = puller
        self.groups = layer_groups(puller.layout.num_layers, puller.cfg.layer_groups)
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, req: Request, src: disagg_pb2.KVSource, sink: Sink) -> None:
        task = asyncio.get_running_loop().create_task(self._run(req, src, sink), name=f"kv-stream-{req.request_id}")
        self.tasks[req.request_id] = task
        task.add_done_callback(lambda _t, rid=req.request_id: self.tasks.pop(rid, None))

    def cancel(self, request_id: str) -> None:
        task = self.tasks.pop(request_id, None)
        if task is not None:
            task.cancel()

    async def _run(self, req: Request, src: disagg_pb2.KVSource, sink: Sink) -> None:
        p, rid = self.puller, req.request_id
        t0, res, first, moved = time.monotonic(), None, None, 0
        try:
            await p.ensure_remote(src)
            res = await p.reserve(req, req.num_prompt_tokens, p.cfg.stream_timeout_s, sink, recompute_if_short=False)
            if res is None:
                raise KVLost(f"no free blocks for {req.num_prompt_tokens} tokens")
            first, moved = await self._follow(rid, src, res, t0 + p.cfg.stream_timeout_s)
        except asyncio.CancelledError:
            raise  # aborted: the engine already ended it; the finally frees what it held
        except Exception as e:  # noqa: BLE001 - any failure ends the request as kv_lost, never a dead stream
            log.warning("%s: layer-wise KV pull failed after %.2fs: %s", rid, time.monotonic() - t0, e)
            p.forget_agent(src.agent_name)
        finally:
            p.release_remote(src, rid)
            self._end(rid, res, first, moved, time.monotonic() - t0, sink)

    def _end(self, rid: str, res: KVReservation | None, first: int | None, moved: int, seconds: float,
             sink: Sink) -> None:
        p = self.puller
        if res is not None and first is not None:
            p.counters.transfers += 1
            p.counters.transfer_bytes += moved
            p.counters.transfer_seconds += seconds
            p.counters.pull_cached_blocks += res.num_cached_blocks
            p.aengine.kv_received(rid, [first])
            return
        p.counters.transfer_failures += 1
        if res is None:  # nothing registered in the engine: only the router needs telling
            sink(StepOutput(rid, [], True, "kv_lost"))
            return
        p.aengine.abort(rid, reason="kv_lost")  # the request ends; its blocks wait in quarantine ...
        p.aengine.kv_failed(rid)  # ... until now: every read was released, so they are free

    async def _follow(self, rid: str, src: disagg_pb2.KVSource, res: KVReservation, deadline: float
                      ) -> tuple[int, int]:
        """Read each layer group as it becomes ready; returns the first token and the bytes moved."""
        p, bs = self.puller, self.puller.layout.block_size
        cached = res.num_cached_blocks * bs
        pulled = [cached] * len(self.groups)  # per group: leading tokens already here
        remote_blocks: list[int] | None = None
        moved = 0
        call = p.stub(src.worker_address).WatchKV(
            disagg_pb2.WatchKVRequest(version=PROTOCOL_VERSION, request_id=rid, wait_s=p.cfg.timeout_s),
            timeout=max(0.1, deadline - time.monotonic()))
        try:
            async for prog in call:
                if remote_blocks is None:
                    remote_blocks = list(prog.block_ids)
                elif list(prog.block_ids) != remote_blocks:
                    raise KVLost("the prefill was preempted: its blocks changed")
                finished = time.monotonic() if prog.HasField("first_token") else None  # the prefill is done
                for g, (l0, l1) in enumerate(self.groups):
                    ready = min(prog.layer_tokens[l0:l1])
                    if ready > pulled[g]:
                        moved += await self._read(rid, src, remote_blocks, res, (pulled[g], ready), (l0, l1), deadline)
                        pulled[g] = ready
                if finished is not None:
                    if min(pulled) < res.num_tokens:
                        raise KVLost("the prefill finished but not every layer was reported")
                    p.counters.stream_exposed_seconds += time.monotonic() - finished
                    return prog.first_token, moved
        except grpc.aio.AioRpcError as e:
            raise KVLost(f"progress stream from {src.worker_id}: {e.code().name}: {e.details()}") from None
        finally:
            call.cancel()
        raise KVLost(f"{src.worker_id} ended the progress stream before the first token")

    async def _read(self, rid: str, src: disagg_pb2.KVSource, remote_blocks: list[int], res: KVReservation,
                    tokens: tuple[int, int], layers: tuple[int, int], deadline: float) -> int:
        """READ layers [l0, l1) of the blocks holding tokens [t0, t1) (blocks already here skipped)."""
        p, bs = self.puller, self.puller.layout.block_size
        b0, b1 = max(tokens[0] // bs, res.num_cached_blocks), cdiv(tokens[1], bs)
        if b0 >= b1:
            return 0
        # Tags other than the request id: the prefill worker frees the lease only on the request's own tag
        # (or ReleaseKV, sent once every read is done).
        t0 = time.monotonic()
        handle = p.agent.start_read(src.agent_name, remote_blocks[b0:b1], res.block_ids[b0:b1],
                                    tag=f"{rid}#{layers[0]}.{b1}", layers=layers)
        try:
            st = await asyncio.to_thread(p.wait_until, handle, deadline)
        finally:
            p.agent.release(handle)  # after this, no write of this read lands in our blocks
        if st is not TransferStatus.DONE:
            raise KVLost(f"read of layers {layers} of blocks {b0}..{b1 - 1} {st.value}: {handle.error or 'timeout'}")
        p.counters.stream_reads += 1
        p.counters.stream_read_seconds += time.monotonic() - t0
        return handle.nbytes
