"""Start one worker process: engine, KV transfer agent, gRPC server. `python -m worker --help`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket

import grpc

from engine.engine import LLMEngine
from kvtransfer import create_agent
from proto import disagg_pb2_grpc
from worker.async_engine import AsyncEngine
from worker.config import WorkerConfig
from worker.servicer import WorkerServicerBase

log = logging.getLogger("worker")

GRPC_OPTIONS = [("grpc.max_send_message_length", 64 * 2**20), ("grpc.max_receive_message_length", 64 * 2**20)]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def build_service(config: WorkerConfig, aengine: AsyncEngine, address: str) -> WorkerServicerBase:
    engine = aengine.engine
    opts = {"fault": config.transfer.fault} if config.role == "decode" else {}
    if config.transfer.backend == "tcp":
        opts["host"] = config.transfer.host
    if config.transfer.backend == "nixl":
        opts["progress_thread"] = config.transfer.nixl_progress_thread
    agent = create_agent(config.transfer.backend, config.worker_id, engine.kv_cache, **opts)
    if config.role == "prefill":
        from prefill_worker.service import PrefillService

        return PrefillService(config, aengine, agent, address=address)
    from decode_worker.service import DecodeService

    return DecodeService(config, aengine, agent)


async def serve(config: WorkerConfig, ready_line: bool = True) -> None:
    port = config.port or free_port(config.host)
    address = f"{config.host}:{port}"
    if not config.worker_id:
        import dataclasses

        config = dataclasses.replace(config, worker_id=f"{config.role}@{port}")
    engine = LLMEngine(config.engine)
    aengine = AsyncEngine(engine)
    service = build_service(config, aengine, address)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    disagg_pb2_grpc.add_WorkerServicer_to_server(service, server)
    server.add_insecure_port(address)
    await aengine.start()
    await server.start()
    log.info("worker %s (%s) serving on %s, KV transfer %s", config.worker_id, config.role, address,
             config.transfer.backend)
    if ready_line:
        print(f"READY {address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("worker %s stopping", config.worker_id)
    service.draining = True
    await server.stop(grace=2)
    await aengine.stop()
    service.agent.close()


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
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> WorkerConfig:
    from deploy.config import ClusterConfig

    cluster = ClusterConfig.load(a.config) if a.config else ClusterConfig()
    return cluster.worker_config(a.role, host=a.host, port=a.port, worker_id=a.worker_id, model=a.model,
                                 transfer_backend=a.transfer_backend)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config_from_args(a)))
