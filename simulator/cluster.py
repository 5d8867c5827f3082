"""A simulated cluster: router, prefill and decode pools, KV pulls and the planner, driven by a workload.

A request's path is router/generation.py's. The router picks a prefill worker (its policy, `dispatch` counts it in
flight there) unless the prompt is shorter than `conditional_disagg_min_prompt_tokens` or there is no prefill pool;
the prefill replica computes the prompt and samples the first token, which reaches the router one hop later (TTFT);
its KV stays leased there. The router then picks a decode worker; that replica reserves blocks for the prompt
(none free: the lease is dropped and it recomputes the prompt itself) and pulls the KV over its link, one pull at a
time at the profile's rate (on one machine's CPU cores, as work beside the steps: simulator/link.py), releasing the
lease when done; the request joins the decode batch and finishes there.
Without a prefill worker the decode replica prefills locally (co-located). Every worker's Load is polled each
`router.health_interval_s`; the planner ticks each `autoscaling.interval_s`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from deploy.config import ClusterConfig
from engine.config import EngineConfig
from simulator.autoscaler import Autoscaler
from simulator.collector import Collector
from simulator.config import SimConfig
from simulator.cost_model import CostModel
from simulator.device import CpuCores, SharedDevice
from simulator.events import EventLoop
from simulator.link import Link
from simulator.metrics import SLO, request_itl_p99
from simulator.pool import Pool
from simulator.profile import Profile
from simulator.replica import Replica
from simulator.request import SimRequest
from simulator.router import SimRouter

Chunk = tuple[list[float], list[int], list[int]]  # arrival times, prompt lengths, output lengths


class Cluster:
    """One cluster YAML on simulated hardware."""

    def __init__(self, cluster: ClusterConfig, sim: SimConfig, prefill: Profile, decode: Profile | None = None) -> None:
        self.cfg, self.sim = cluster, sim
        self.profiles = {"prefill": prefill, "decode": decode or prefill}
        self.costs = {r: CostModel(p) for r, p in self.profiles.items()}
        engine = self.engine = cluster.engine_config()
        self.sched, self.block_size = engine.scheduler, engine.cache.block_size
        self.num_blocks = {r: engine.cache.num_blocks or max(1, engine.cache.memory_budget_bytes // (
            p.kv.bytes_per_token * self.block_size)) for r, p in self.profiles.items()}
        self.router_cfg = cluster.router_config()
        self.loop = EventLoop()
        self.router = SimRouter(self.router_cfg, sim.route_sample, sim.seed)
        self.collector = Collector(SLO(sim.slo_ttft_ms / 1e3, sim.slo_itl_ms / 1e3), sim.keep_requests)
        self.device = shared_device(self.loop, prefill, sim.cpu_oversubscription, sim.cpu_share) if sim.shared_device else None
        self.hop = sim.hop_ms / 1e3
        self.admit = sim.admit_ms / 1e3
        self.links: dict[str, Link] = {}  # decode replica -> its link (the pulls it makes, one at a time)
        self.streaming, self.layer_groups = self.router_cfg.kv_streaming, cluster.transfer.layer_groups
        self.pools = {r: self._pool(r) for r in ("prefill", "decode") if cluster.pool(r).replicas > 0}
        for role, pool in self.pools.items():
            for _ in range(cluster.pool(role).replicas):
                pool.start(ready_now=True)
        auto = cluster.autoscaling
        self.autoscaler = Autoscaler(auto, self.pools, {r: cluster.pool(r).replicas for r in self.pools}) \
            if any(auto.pool(r) is not None for r in self.pools) else None
        self.in_flight = 0
        self.arrivals_done = False
        self.end_time = 0.0

    def _pool(self, role: str) -> Pool:
        p = self.profiles[role]
        startup = self.sim.startup_s if self.sim.startup_s is not None else self.sim.node_startup_s + p.startup.total_s

        def make(name: str) -> Replica:
            return Replica(name, role, self.costs[role], self.sched, self.num_blocks[role], self.block_size, self.loop,
                           self, self.sim.fast_forward, self.device, overlap_steps(self.engine, p))

        return Pool(role, make, startup, p.gpus_per_replica, self.loop, self.router, self.sim.drain_timeout_s)

    # ---- the request path ----------------------------------------------------------------------------------------
    def arrive(self, req: SimRequest) -> None:
        self.collector.arrival(req.prompt, req.output)
        if self.sim.keep_requests:
            req.marks = {}
        self.in_flight += 1
        if not self.router.candidates("decode"):
            self._fail(req)  # the router answers 503: no healthy decode worker
            return
        p = None
        if req.prompt >= self.router_cfg.conditional_disagg_min_prompt_tokens:
            p = self.router.choose("prefill", req.prompt)
        sent = self.loop.now + self.admit + self.hop
        if p is None:
            self.loop.at(sent, self._to_decode, req)
            return
        req.prefill_ctx = self.router.dispatch(p, req.prompt)
        self.loop.at(sent, p.add, req)
        if self.streaming and req.output > 1:  # Decode goes out with Prefill (router/generation.py)
            d = self.router.choose("decode", req.prompt)
            if d is not None:
                req.stream, req.decode_ctx = d, self.router.dispatch(d, req.prompt)
                self.loop.at(sent, lambda _: d.between_steps(lambda: self._stream_reserve(req)), None)

    def on_first_token(self, req: SimRequest, replica: Replica, t: float) -> None:
        req.t_first = t + self.hop
        self.collector.first_token(req.t_first - req.arrival)
        if replica.role != "prefill":
            return  # prefilled where it decodes: it goes on there
        req.prefill_ctx.__exit__(None, None, None)
        req.prefill_ctx, req.prefill_at = None, replica
        self._mark(req, "prefill_answered")
        if req.output <= 1:
            self.loop.at(req.t_first, self._release, req)
            self._done(req, req.t_first, 0.0)
            return
        if req.stream is not None:
            req.stream_end = t
            if req.stream_blocks:
                self._stream_tail(req)
            return
        self.loop.at(req.t_first + self.hop, self._to_decode, req)

    def _to_decode(self, req: SimRequest) -> None:
        """Pick a decode worker and hand it the request. Runs when the request reaches that worker (one hop after
        the router has it); the choice is made then too, which moves it by one hop (1 ms) and saves an event."""
        d = self.router.choose("decode", req.prompt)
        if d is None:
            if req.prefill_at is not None:
                self._release(req)
            self._fail(req)
            return
        req.decode_ctx = self.router.dispatch(d, req.prompt)
        self._pull(req, d)

    def _pull(self, req: SimRequest, d: Replica) -> None:
        if req.prefill_at is None:
            d.add(req)  # no KV anywhere: the decode worker prefills locally
            return
        self._mark(req, "pull_received")
        d.between_steps(lambda: self._reserve(req, d))  # the worker reserves the blocks between two steps

    def _reserve(self, req: SimRequest, d: Replica) -> None:
        if not d.reserve(req):  # no free blocks for the pull: recompute here (decode_worker/kv_pull.py)
            self._release(req)
            req.recomputes += 1
            self.collector.recomputes += 1
            d.add(req)
            return
        self._mark(req, "pull_reserved")
        link = self.links.get(d.name)
        if link is None:
            link = self.links[d.name] = Link(d.name, self.loop, self.profiles["decode"].transfer, self.device)
        link.pull(req.prompt * self.profiles["decode"].kv.bytes_per_token, self._pulled, (req, d))

    # Layer-wise streaming (decode_worker/kv_stream.py): the decode replica reserves the blocks when Decode reaches it
    # and reads each layer group as the prefill writes it, so what is left after the prefill's last step is the
    # last layer group of the last chunk, or the bytes the link could not move while the prompt was computed
    # (taken as the prompt's profiled prefill time), whichever is more. Not modelled: the reads' share of the
    # link with other pulls, and the prefill compute they take on a shared CPU. No blocks at the reservation:
    # the request is pulled whole after its prefill instead (the real worker ends it, and the router re-sends it).
    def _stream_reserve(self, req: SimRequest) -> None:
        req.stream_blocks = req.stream.hold(req.prompt)
        if req.stream_blocks:
            if req.stream_end >= 0:  # the prefill ended first (a short prompt)
                self._stream_tail(req)
            return
        req.decode_ctx.__exit__(None, None, None)
        req.stream = req.decode_ctx = None
        if req.stream_end >= 0:
            self.loop.at(req.t_first + self.hop, self._to_decode, req)

    def _stream_tail(self, req: SimRequest) -> None:
        t = self.profiles["decode"].transfer
        bpt, chunk = self.profiles["decode"].kv.bytes_per_token, self.sched.max_num_batched_tokens
        last_chunk = req.prompt - (req.prompt - 1) // chunk * chunk
        hidden = t.gib_s * 2**30 * self.costs["prefill"].prefill_ms(req.prompt) / 1e3
        left = max(last_chunk * bpt / self.layer_groups, req.prompt * bpt - hidden)
        start = max(self.loop.now, req.stream_end)
        self.loop.at(start + left / (t.gib_s * 2**30) + t.latency_ms / 1e3, self._streamed, req)

    def _streamed(self, req: SimRequest) -> None:
        req.blocks = req.stream_blocks  # the prefill replica let go of its count at the first token
        self._pulled((req, req.stream))

    def _pulled(self, arg: tuple[SimRequest, Replica]) -> None:
        req, d = arg
        self._mark(req, "pull_read")
        self._release(req)
        d.pulled(req)

    def _mark(self, req: SimRequest, name: str) -> None:
        if req.marks is not None:
            req.marks[name] = self.loop.now

    def _release(self, req: SimRequest) -> None:
        if req.prefill_at is not None:
            req.prefill_at.release(req)
            req.prefill_at = None

    def on_second_token(self, req: SimRequest, t: float) -> None:
        req.t_second = t
        if req.marks is not None and "pull_read" in req.marks:
            req.marks["join_end"] = t
            self.collector.handoffs.append(req.marks)
        req.first_gap = t + self.hop - req.t_first
        self.collector.gaps(req.first_gap, 1)

    def on_steps(self, first_ms: float, last_ms: float, rows: int, steps: int, skip: int) -> None:
        self.collector.steps(first_ms, last_ms, rows, steps, skip)

    def on_finish(self, req: SimRequest, replica: Replica, t: float) -> None:
        if req.decode_ctx is not None:
            req.decode_ctx.__exit__(None, None, None)
            req.decode_ctx = None
        gaps = req.output - 1
        itl = request_itl_p99(req.first_gap, replica.since_join(req), gaps, not self.sim.fast_forward) if gaps else 0.0
        self._done(req, t + self.hop, itl)

    def _done(self, req: SimRequest, t: float, itl_p99: float) -> None:
        self.in_flight -= 1
        self.collector.finish(req.arrival, req.prompt, req.output, req.t_first - req.arrival, t - req.arrival, itl_p99,
                              req.first_gap)

    def _fail(self, req: SimRequest) -> None:
        self.in_flight -= 1
        self.collector.fail()

    # ---- running ---------------------------------------------------------------------------------------------
    def run(self, chunks: Iterable[Chunk], duration: float | None = None, progress: Any = None) -> dict[str, Any]:
        """Feed the workload's arrivals in, run to `duration` (default: the last arrival), then let requests in
        flight finish (at most `drain_grace_s` more). `progress`: a tqdm bar advanced in simulated seconds."""
        self._every(self.router_cfg.health_interval_s, self._poll)
        if self.autoscaler is not None:
            self._every(self.cfg.autoscaling.interval_s, self._plan)
        self._every(self.sim.sample_s, self._sample)
        loop, rid, shown = self.loop, 0, 0.0
        for times, prompts, outputs in chunks:
            for t, p, o in zip(times, prompts, outputs, strict=True):
                if loop.heap and loop.heap[0][0] <= t:
                    loop.run_until(t)
                else:
                    loop.now = t
                self.arrive(SimRequest(rid, t, p, o))
                rid += 1
            if progress is not None and times:
                progress.update(int(times[-1] - shown))
                shown += int(times[-1] - shown)
        self.end_time = max(duration or 0.0, loop.now)
        loop.run_until(self.end_time)
        deadline = self.end_time + self.sim.drain_grace_s
        while self.in_flight > 0 and loop.next_time() <= deadline:
            loop.run_one()
        self.arrivals_done = True
        return self.result()

    def _every(self, period: float, fn: Any) -> None:
        def tick(_: object) -> None:
            if self.arrivals_done:
                return
            fn()
            self.loop.at(self.loop.now + period, tick)

        self.loop.at(self.loop.now + period, tick)

    def _poll(self) -> None:
        self.router.poll()

    def _plan(self) -> None:
        assert self.autoscaler is not None
        hist = {name: h.cumulative() for name, h in self.collector.router.items()}
        self.autoscaler.tick(self.loop.now, self.router.snapshot(hist))

    def _sample(self) -> None:
        extra: dict[str, Any] = {}
        gpus = 0
        for role, pool in self.pools.items():
            c = pool.counts()
            extra[role] = {**c, "desired": self.autoscaler.desired.get(role) if self.autoscaler else None}
            gpus += (c["ready"] + c["starting"] + c["draining"]) * pool.gpus
        extra["gpus"] = gpus
        self.collector.sample(self.loop.now, self.sim.sample_s, extra)

    def result(self) -> dict[str, Any]:
        t = self.end_time
        pools = {}
        for role, pool in self.pools.items():
            hours = pool.replica_seconds(t) / 3600
            pools[role] = {"started": len(pool.slots), "now": pool.counts(), "replica_hours": round(hours, 4),
                           "gpu_hours": round(hours * pool.gpus, 4), "gpus_per_replica": pool.gpus,
                           "kv_blocks_per_replica": self.num_blocks[role], "startup_s": pool.startup_s,
                           "steps": sum(s.replica.steps for s in pool.slots)}
        profiles = {r: {"name": p.name, "device": p.device, "kind": p.provenance.kind} for r, p in self.profiles.items()}
        return {"summary": self.collector.summary(t), "pools": pools, "profiles": profiles,
                "decisions": self.autoscaler.decisions if self.autoscaler else [], "timeline": self.collector.timeline,
                "gpu_hours": round(sum(p["gpu_hours"] for p in pools.values()), 4),
                "still_in_flight": self.in_flight, "end_s": round(self.loop.now, 3)}


def chunk_lists(times: Iterable[float], prompts: Iterable[int], outputs: Iterable[int]) -> list[Chunk]:
    """One chunk of plain lists (what `Cluster.run` takes) from any sequences."""
    return [([float(x) for x in times], [int(x) for x in prompts], [int(x) for x in outputs])]


def overlap_steps(engine: EngineConfig, profile: Profile) -> bool:
    """The engine's overlapped steps (EngineConfig.overlaps_steps) on the profiled hardware; never with speculative
    decoding, whose rows verify drafts and are left out of every queued step."""
    if engine.speculative is not None and engine.speculative.method:
        return False
    return engine.overlaps_steps(profile.gpus_per_replica > 0)


def shared_device(loop: EventLoop, profile: Profile, oversubscription: str = "fair", cpu_share: bool = True
                  ) -> SharedDevice:
    """The one machine or device every replica runs on: a CPU profile measured with adaptive threads (every core
    alone) shares its cores the way engine/cpu_threads.py does; anything else by the profile's co-run multipliers."""
    cores = int(profile.extra.get("threads_alone") or 0)
    if profile.gpus_per_replica == 0 and profile.extra.get("cpu_threads") == "adaptive" and cores > 0:
        return CpuCores(loop, profile.co_run, cores, measured_oversubscription=oversubscription == "measured",
                        share=cpu_share)
    return SharedDevice(loop, profile.co_run, profile.sustained)

