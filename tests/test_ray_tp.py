"""A tensor-parallel worker replica on a real Ray cluster (one node on 127.0.0.1, CPU bundles): a placement group of
one bundle per rank packed on one node (STRICT_PACK), the worker actor in bundle 0 and a slot holding each other
bundle, the worker serving with its ranks; stopping the replica stops its ranks and gives every bundle back."""

from __future__ import annotations

import os

from deploy.ray.head import LOOPBACK_ENV, LocalRayHead

os.environ.update(LOOPBACK_ENV)  # before Ray is imported: this test process is a Ray driver on 127.0.0.1 too

import asyncio  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
from ray.util.placement_group import placement_group_table  # noqa: E402

from deploy.config import ClusterConfig  # noqa: E402
from deploy.placement import Resources  # noqa: E402
from deploy.ray.rank_bundles import actor_options, group_name, rank_bundles, remove_group  # noqa: E402
from deploy.ray.worker_actor import WorkerActor  # noqa: E402
from proto import disagg_pb2, disagg_pb2_grpc  # noqa: E402
from tests.cluster_util import rank_pids  # noqa: E402
from tests.test_tp_engine import wait_gone  # noqa: E402

NS = "disagg-tp-test"


def test_rank_bundles() -> None:
    """Per rank its CPUs and GPUs, custom resources once; a rank that asks for nothing still reserves a little."""
    res = Resources(num_cpus=2, num_gpus=1, custom={"decode_node": 1})
    assert rank_bundles(res, 3) == [{"CPU": 2, "GPU": 1, "decode_node": 1}, {"CPU": 2, "GPU": 1}, {"CPU": 2, "GPU": 1}]
    assert rank_bundles(Resources(num_cpus=0), 2) == [{"CPU": 0.01}, {"CPU": 0.01}]
    assert rank_bundles(Resources(num_cpus=0, num_gpus=1), 2) == [{"GPU": 1}, {"GPU": 1}]
    cfg = ClusterConfig.from_dict({"pools": {"decode": {"tensor_parallel_size": 4}}})
    assert (cfg.tensor_parallel_size("decode"), cfg.tensor_parallel_size("prefill")) == (4, 1)


def metadata(address: str) -> disagg_pb2.TransferMetadataResponse:
    async def call() -> disagg_pb2.TransferMetadataResponse:
        async with grpc.aio.insecure_channel(address) as ch:
            return await disagg_pb2_grpc.WorkerStub(ch).GetTransferMetadata(disagg_pb2.TransferMetadataRequest(),
                                                                             timeout=10)

    return asyncio.run(call())


def group_state(name: str) -> dict[str, Any]:
    return next((g for g in placement_group_table().values() if g["name"] == group_name(name)), {})


@pytest.mark.cluster
def test_a_replica_of_two_ranks_is_a_packed_placement_group(tiny_llama_dir: str) -> None:
    cluster = {"model": tiny_llama_dir, "engine": {"cache": {"num_blocks": 32}},
               "transfer": {"backend": "tcp"},
               "pools": {"prefill": {"replicas": 0}, "decode": {"replicas": 1, "tensor_parallel_size": 2,
                                                                 "resources": {"num_cpus": 1}}}}
    with LocalRayHead(num_cpus=2) as head:
        ray.init(address=head.address, namespace=NS, log_to_driver=False)
        try:
            options = actor_options("decode-0", Resources(num_cpus=1), 2)
            actor = WorkerActor.options(name="decode-0", lifetime="detached", max_restarts=0, **options).remote(
                "decode-0", "decode", cluster)
            address = ray.get(actor.wait_ready.remote(180), timeout=240)
            g = group_state("decode-0")
            assert g["strategy"] == "STRICT_PACK" and g["state"] == "CREATED"
            assert [b for _, b in sorted(g["bundles"].items())] == [{"CPU": 1.0}, {"CPU": 1.0}]
            assert ray.available_resources().get("CPU", 0) == 0, "both bundles are held"
            md = metadata(address)
            assert len(md.kv_heads.heads) == 2 and [a.rank for a in md.rank_agents] == [1]
            ranks = rank_pids(ray.get(actor.info.remote(), timeout=30)["pid"])
            assert len(ranks) == 1
            assert ray.get(actor.stop.remote(10), timeout=60) == 0  # SIGTERM: a drain, then the ranks stop too
            wait_gone(ranks, 30)
            ray.kill(actor, no_restart=True)
            remove_group("decode-0")
            deadline = time.monotonic() + 30
            while ray.available_resources().get("CPU", 0) < 2:
                assert time.monotonic() < deadline, "the replica's bundles were not given back"
                time.sleep(0.2)
        finally:
            ray.shutdown()
