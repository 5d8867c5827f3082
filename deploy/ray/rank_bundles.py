"""A tensor-parallel worker replica on Ray: one placement group of N bundles, one per rank, packed on one node.

    pools:
      decode: {replicas: 2, tensor_parallel_size: 4, resources: {num_gpus: 1, num_cpus: 2}}

A replica of a pool whose workers have N > 1 ranks is a placement group of N bundles, each `num_cpus` CPUs and
`num_gpus` GPUs (the pool's `resources` are per rank; custom resources are asked for once, in bundle 0), with the
STRICT_PACK strategy: all on one node, since the ranks talk through NCCL (or gloo) on loopback and the worker
spawns them as its own child processes. Ray reserves the whole group at once or not at all, so a replica never
starts with some of its ranks' GPUs. The worker actor runs in bundle 0; a `RankSlot` actor holds each other bundle
for as long as the worker lives and says which GPUs Ray gave it, so the worker's process sees all N GPUs
(CUDA_VISIBLE_DEVICES in rank order: rank r uses the r-th). The planner starts and stops whole replicas: the group
is named after the replica and removed with it (also by a planner that restarted and adopted the replica).
One rank (tensor_parallel_size 1) needs no group: the actor reserves its resources as before.
"""

from __future__ import annotations

import contextlib
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.util.placement_group import get_current_placement_group, get_placement_group, placement_group
from ray.util.placement_group import remove_placement_group as _remove_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deploy.placement import Resources

MIN_CPU = 0.01  # a bundle must reserve something: a rank asked for no CPU and no GPU reserves this much CPU
SLOT_TIMEOUT_S = 60.0  # the other bundles are reserved with bundle 0, so their slots start at once


def group_name(replica: str) -> str:
    return f"{replica}-ranks"


def rank_bundles(res: Resources, tp: int) -> list[dict[str, float]]:
    """One bundle per rank: its CPUs and GPUs; custom resources in bundle 0 only."""
    bundles = []
    for r in range(tp):
        b = {"CPU": res.num_cpus or (MIN_CPU if not res.num_gpus else 0.0), "GPU": res.num_gpus}
        if r == 0:
            b.update(res.custom)
        bundles.append({k: v for k, v in b.items() if v})
    return bundles


def actor_options(replica: str, res: Resources, tp: int) -> dict[str, Any]:
    """Keyword arguments for `WorkerActor.options(...)`: its resources, and with N > 1 ranks a new placement group
    for the replica with the actor in bundle 0 (the actor pends until Ray has reserved the whole group)."""
    if tp == 1:
        return res.ray_options()
    bundles = rank_bundles(res, tp)
    group = placement_group(bundles, strategy="STRICT_PACK", name=group_name(replica), lifetime="detached")
    first = bundles[0]
    return {"num_cpus": first.get("CPU", 0.0), "num_gpus": first.get("GPU", 0.0),
            "resources": {k: v for k, v in first.items() if k not in ("CPU", "GPU")},
            "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)}


def remove_group(replica: str) -> None:
    """Give back the replica's placement group, if it has one (idempotent; its actors must be gone or going)."""
    with contextlib.suppress(ValueError, RuntimeError):
        _remove_group(get_placement_group(group_name(replica)))


@ray.remote
class RankSlot:
    """Holds one rank's bundle while its worker lives (an actor dies with the actor that created it)."""

    def gpu_ids(self) -> list[str]:
        return [str(g) for g in ray.get_gpu_ids()]


def reserve_ranks(res: Resources, tp: int) -> tuple[list[ActorHandle], list[str]]:
    """Inside the worker actor (bundle 0 of its group): a RankSlot on every other bundle; every rank's GPU ids, in
    rank order (empty without GPUs)."""
    group = get_current_placement_group()
    if group is None:
        raise RuntimeError(f"a worker of {tp} ranks must run in its replica's placement group")
    bundles = rank_bundles(res, tp)
    slots = [RankSlot.options(num_cpus=b.get("CPU", 0.0), num_gpus=b.get("GPU", 0.0),
                              scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=r)
                              ).remote() for r, b in enumerate(bundles) if r > 0]
    gpus = [str(g) for g in ray.get_gpu_ids()]
    for ids in ray.get([s.gpu_ids.remote() for s in slots], timeout=SLOT_TIMEOUT_S):
        gpus += ids
    return slots, gpus
