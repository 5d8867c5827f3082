"""Start one worker process: engine, KV transfer agent, gRPC server. `python -m worker --help`.

Stopping (SIGTERM or SIGINT) is a drain, so that no request is lost:
  1. the worker takes nothing new: Health reports `draining` (routers send it nothing more) and Prefill / Decode
     refuse new requests;
  2. it finishes what it runs - prefills in flight, decodes - and keeps its KV leases until a decode worker has
     pulled them, for `transfer.drain_timeout_s` (`--drain-timeout`) at most;
  3. then it aborts what is left: a decode request ends with finish reason "abort" on its router's token stream,
     and the router resumes it on another decode worker (migration); a prefill in flight fails its RPC and the
     router has a decode worker prefill it. Leases still held go with the process (their pulls fail and the decode
     side recomputes the prompt).
A second SIGTERM or SIGINT during the drain skips to step 3 at once.

A worker whose engine dies (a step raised; under tensor parallelism a rank process died, engine/parallel/ranks.py)
ends its requests with an error (routers move decode requests to other workers), answers Health with ok false and
refuses new requests for ENGINE_FAILED_EXIT_S, then exits 1 so that its supervisor starts it again. Every way out
stops the engine's other ranks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import faulthandler
import logging
import signal
import sys
import time

import grpc

from engine.engine import LLMEngine
from engine.gc_heap import freeze_heap
from engine.stats import EngineLoad
from proto import disagg_pb2_grpc
from worker.async_engine import AsyncEngine
from worker.config import WorkerConfig
from worker.kv_agents import WorkerAgents
from worker.servicer import WorkerServicerBase
from worker.step_log import StepLog

log = logging.getLogger("worker")

NIXL_IDLE_PROGRESS_S: float | None = 0.05  # NIXL poller period while no read is expected; None: every 1 ms.
TEARDOWN_S = 30.0  # after the drain, the longest stopping the server, the engine and the transfer agent may take
ENGINE_FAILED_EXIT_S = 5.0  # a worker whose engine died (a tensor-parallel rank lost, say) reports unhealthy this
# long - health polls and token streams see it - then exits 1, so its supervisor (disagg serve, Ray) starts it again
GRPC_OPTIONS = [("grpc.max_send_message_length", 64 * 2**20), ("grpc.max_receive_message_length", 64 * 2**20)]


def build_service(config: WorkerConfig, aengine: AsyncEngine, address: str) -> WorkerServicerBase:
    engine = aengine.engine
    opts = {"fault": config.transfer.fault} if config.role == "decode" else {}
    if config.transfer.backend == "tcp":
        opts["host"] = config.transfer.host
    if config.transfer.backend == "nixl":
        opts["progress_thread"] = config.transfer.nixl_progress_thread
        opts["idle_progress_s"] = NIXL_IDLE_PROGRESS_S
    agent = WorkerAgents.start(engine, config.transfer.backend, config.worker_id, opts)  # one per rank
    if config.role == "prefill":
        from prefill_worker.service import PrefillService

        return PrefillService(config, aengine, agent, address=address)
    from decode_worker.service import DecodeService

    return DecodeService(config, aengine, agent)


async def serve(config: WorkerConfig, ready_line: bool = True) -> int:
    """Run the worker until it is told to stop (returns 0) or its engine dies (returns 1). The engine's other
    tensor-parallel ranks are stopped on every way out."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    # The port is bound before the engine is built (seconds; tensor-parallel ranks open sockets of their own
    # meanwhile): with port 0 the OS's choice is ours at once, where a port found free and bound after the build
    # could be taken in between (a cluster test's worker failed so: "Address already in use").
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    address = f"{config.host}:{port}"
    if not config.worker_id:
        config = dataclasses.replace(config, worker_id=f"{config.role}@{port}")
    engine = LLMEngine(config.engine)
    try:
        return await _serve(config, engine, server, address, ready_line)
    finally:
        engine.close()  # ranks 1..N-1 exit (nothing to do for one rank)


async def _serve(config: WorkerConfig, engine: LLMEngine, server: grpc.aio.Server, address: str,
                 ready_line: bool) -> int:
    aengine = AsyncEngine(engine, StepLog.from_env(engine, config.worker_id))
    service = build_service(config, aengine, address)
    disagg_pb2_grpc.add_WorkerServicer_to_server(service, server)
    await aengine.start()
    await server.start()
    log.info("worker %s (%s) serving on %s, KV transfer %s, %d rank(s)", config.worker_id, config.role, address,
             config.transfer.backend, config.engine.tensor_parallel_size)
    freeze_heap(f"worker {config.worker_id}")  # start-up's objects (the model's, gRPC's) out of full collections
    service.gc_pauses.refresh_frozen()
    if ready_line:
        print(f"READY {address}", flush=True)
    stop, now = stop_signals(config.worker_id)
    failed = await stopped_or_failed(stop, aengine)
    if failed is None:
        await drain(config, service, now)
    else:  # its requests already ended with an error (their routers move them); nothing is left to drain
        log.error("worker %s: the engine failed (%r); unhealthy, exiting in %gs", config.worker_id, failed,
                  ENGINE_FAILED_EXIT_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), ENGINE_FAILED_EXIT_S)
    # A stopping worker must exit: if the teardown below blocks (a transfer or engine step that never returns),
    # every thread's stack goes to the log and the process exits with code 1 after TEARDOWN_S.
    faulthandler.dump_traceback_later(TEARDOWN_S, exit=True)
    # The abort chunks of step 3 are in the subscribers' outboxes: the grace lets the Subscribe streams send them
    # (a router that misses one still sees its stream end, and moves the request all the same).
    await server.stop(grace=1)
    await aengine.stop()
    service.agent.close()
    service.close()
    faulthandler.cancel_dump_traceback_later()
    log.info("worker %s stopped", config.worker_id)
    return 0 if failed is None else 1


def stop_signals(worker_id: str) -> tuple[asyncio.Event, asyncio.Event]:
    """(stop, now): SIGTERM or SIGINT sets `stop` (drain); a second one sets `now` too (end the drain)."""
    stop, now = asyncio.Event(), asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("worker %s: %s again: ending the drain now", worker_id, sig.name)
            now.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop, now


async def stopped_or_failed(stop: asyncio.Event, aengine: AsyncEngine) -> BaseException | None:
    """Wait for a stop signal (None) or the engine loop's death (its error)."""
    signalled = asyncio.ensure_future(stop.wait())
    died = asyncio.ensure_future(aengine.failed())
    await asyncio.wait({signalled, died}, return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    if stop.is_set():
        died.cancel()
        return None
    return died.result()


async def drain(config: WorkerConfig, service: WorkerServicerBase, now: asyncio.Event) -> None:
    """Steps 1-3 of the module docstring: refuse new work, wait until idle or the deadline (or `now`), abort the
    rest."""
    service.draining = True
    deadline = time.monotonic() + config.transfer.drain_timeout_s
    left = await held(service, deadline)
    log.info("worker %s draining: %s request(s) to finish within %gs", config.worker_id,
             "?" if left is None else left, config.transfer.drain_timeout_s)
    while left != 0 and not now.is_set() and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(now.wait(), 0.1)
        seen = await held(service, deadline)
        left = left if seen is None and left is not None else seen  # a read cut by the deadline keeps the count
    began = deadline - config.transfer.drain_timeout_s
    if left == 0:
        log.info("worker %s drained in %.1fs", config.worker_id, time.monotonic() - began)
        return
    aborted = [rid for sub in getattr(service, "subscribers", {}).values() for rid in list(sub.requests)]
    for rid in aborted:
        service.aengine.abort(rid)  # its router gets finish "abort" and resumes the request elsewhere
    log.warning("worker %s: drain ended after %.1fs with %s request(s) left; aborted %d decode request(s) (their "
                "routers move them); prefills in flight and leases end with the process", config.worker_id,
                time.monotonic() - began, "?" if left is None else left, len(aborted))


async def held(service: WorkerServicerBase, deadline: float) -> int | None:
    """Requests the worker still holds: queued, running, receiving their KV, leased, or owned by a router stream;
    None when the engine cannot tell by `deadline` (its loop died or is stuck in a step).

    The load is read between engine steps, after every add queued before the call, so a request accepted just
    before the drain began is counted."""
    aengine = service.aengine
    if not aengine.healthy:
        return None
    try:
        load: EngineLoad = await asyncio.wait_for(aengine.run_between_steps(service.engine.load),
                                                  max(0.01, deadline - time.monotonic()))
    except (TimeoutError, RuntimeError):
        return None
    owned = sum(len(s.requests) for s in getattr(service, "subscribers", {}).values())
    return max(owned, load.num_waiting + load.num_running + load.num_receiving_kv) + load.leased_requests


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker", description="Run one prefill or decode worker.")
    p.add_argument("--config", help="cluster YAML (deploy/configs/*.yaml); its engine and transfer sections apply")
    p.add_argument("--role", choices=["prefill", "decode"], required=True, help="prefill: run prompts and lease "
                   "their KV; decode: pull KV (or prefill locally) and generate")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="gRPC port (default: a free one, printed as READY host:port)")
    p.add_argument("--worker-id", default="", help="name in logs and metrics (default role@port)")
    p.add_argument("--model", help="override the model: smollm2, an HF folder or a .gguf file")
    p.add_argument("--transfer-backend", choices=["nixl", "tcp"], help="override the KV transfer backend")
    p.add_argument("--tensor-parallel-size", type=int, metavar="N", help="split the model across N ranks (this "
                   "process and N - 1 it starts, one device each; docs/parallel.md) (default: the config's pool "
                   "tensor_parallel_size, else engine.tensor_parallel_size, else 1)")
    p.add_argument("--drain-timeout", type=float, metavar="SECONDS", help="on SIGTERM, the longest the worker "
                   "finishes its running requests and keeps its KV leases before aborting the rest, which routers "
                   "move to other workers (default: the config's transfer.drain_timeout_s, else 60; 0: at once)")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> WorkerConfig:
    from deploy.config import ClusterConfig

    cluster = ClusterConfig.load(a.config) if a.config else ClusterConfig()
    config = cluster.worker_config(a.role, host=a.host, port=a.port, worker_id=a.worker_id, model=a.model,
                                   transfer_backend=a.transfer_backend, tensor_parallel_size=a.tensor_parallel_size)
    if a.drain_timeout is not None:
        config = dataclasses.replace(config, transfer=dataclasses.replace(config.transfer,
                                                                          drain_timeout_s=a.drain_timeout))
    return config


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(serve(config_from_args(a))))
