"""The router, simulated around the real routing code: router/policy.py policies choosing among router/registry.py
`WorkerState`s, whose in-flight counts move through `WorkerState.dispatched` and whose `load` is a
proto.convert.WorkerLoad refreshed by a periodic poll, as the real registry's Health + Load poll does.

Not simulated: prefix caching (no KV index is given to the policies, so `kv_aware` routes by load alone) and
worker failures. `sample` > 0 hands the policy `sample` candidates drawn at random instead of the whole pool
(power-of-d choices); 0, the default, is what the real router does.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

from proto.convert import WorkerLoad
from router.config import RouterConfig
from router.policy import Policy, make_policy
from router.registry import WorkerState
from simulator.replica import Replica


class SimRouter:
    """Worker states by address, one policy per phase, and the replicas behind the addresses."""

    def __init__(self, cfg: RouterConfig, sample: int = 0, seed: int = 0) -> None:
        self.cfg = cfg
        self.policies: dict[str, Policy] = {
            "prefill": make_policy(cfg.prefill_policy, "prefill", None, cfg.kv_expect_ttl_s, cfg.prefill_overlap_weight,
                                   cfg.prefill_load_weight),
            "decode": make_policy(cfg.decode_policy, "decode", None, cfg.kv_expect_ttl_s, cfg.decode_overlap_weight,
                                  cfg.decode_load_weight)}
        self.sample = sample
        self.rng = random.Random(seed)
        self.workers: dict[str, WorkerState] = {}
        self.replicas: dict[str, Replica] = {}
        self._routable: dict[str, list[WorkerState]] = {"prefill": [], "decode": []}

    def add(self, replica: Replica) -> WorkerState:
        """A replica that became ready: healthy, polled once, routable."""
        w = WorkerState(replica.name, role=replica.role, healthy=True, kv_block_size=replica.bs,
                        max_model_len=1 << 30)
        w.load = WorkerLoad(replica.load_stats())
        self.workers[w.address], self.replicas[w.address] = w, replica
        self._routable[replica.role].append(w)
        return w

    def drain(self, address: str) -> None:
        """No new requests to it (the router's `set_draining`); what runs there goes on."""
        w = self.workers[address]
        w.draining = True
        self._routable[w.role] = [x for x in self._routable[w.role] if x.address != address]

    def remove(self, address: str) -> None:
        self.workers.pop(address, None)
        self.replicas.pop(address, None)

    def candidates(self, phase: str) -> list[WorkerState]:
        return self._routable[phase]

    def choose(self, phase: str, prompt_tokens: int) -> Replica | None:
        """The replica the phase's policy picks for a prompt of this length; None when the pool has none."""
        cands = self._routable[phase]
        if not cands:
            return None
        if 0 < self.sample < len(cands):
            cands = self._draw(cands)
        return self.replicas[self.policies[phase].choose(cands).address]

    def _draw(self, cands: list[WorkerState]) -> list[WorkerState]:
        """`sample` distinct candidates at random (two drawn directly: the common case, and 5x faster)."""
        if self.sample != 2:
            return self.rng.sample(cands, self.sample)
        n, r = len(cands), self.rng.random
        i, j = int(r() * n), int(r() * (n - 1))
        return [cands[i], cands[j + (j >= i)]]

    def dispatch(self, replica: Replica, prompt_tokens: int) -> AbstractContextManager[None]:
        """Count a request in flight on the replica's worker (WorkerState.dispatched); exit the result to undo."""
        cm = self.workers[replica.name].dispatched(prompt_tokens)
        cm.__enter__()
        return cm

    def poll(self) -> None:
        """Every worker's Load report, as the registry's poll fetches them."""
        for address, w in self.workers.items():
            w.load = WorkerLoad(self.replicas[address].load_stats())

    def snapshot(self, histograms: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
        """What RouterActor.snapshot returns (deploy/ray/router_actor.py worker_view), for deploy/pool_metrics.py."""
        return {"workers": list(self._views()), "histograms": histograms}

    def _views(self) -> Iterator[dict[str, Any]]:
        for w in self.workers.values():
            yield {"address": w.address, "worker_id": w.address, "role": w.role, "healthy": w.healthy,
                   "draining": w.draining, "in_flight": w.in_flight, "in_flight_tokens": w.in_flight_tokens,
                   "load": dict(w.load.stats) if w.load is not None else None, "error": ""}
