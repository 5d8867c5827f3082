"""The simulator against closed forms: an M/D/1 prefill queue, a saturated decode replica's throughput, the cost
model at its profile's points, and the planner's decisions equal to its unit tests' on the same metrics."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from deploy.config import ClusterConfig
from engine.config import ConfigError
from simulator.cluster import Cluster, chunk_lists
from simulator.config import SimConfig
from simulator.cost_model import CostModel
from simulator.events import EventLoop
from simulator.metrics import handoff_phases
from simulator.profile import (
    CoRunCosts,
    DecodeCosts,
    KVCosts,
    PrefillCosts,
    Profile,
    Provenance,
    ServingCosts,
    StartupCosts,
    SustainedCosts,
    TransferCosts,
)
from simulator.replica import Replica
from simulator.request import SimRequest


def profile(prefill_ms_per_token: float = 0.1, decode_ms: float = 10.0, kv_ms_per_token: float = 0.0,
            batch_ms: float = 0.05) -> Profile:
    """Linear costs: prefill n tokens = 5 + a*n ms; decode = base + batch_ms*B + kv_ms_per_token*B*context."""
    batches, contexts = (1, 8, 64, 256), (0, 1024, 4096)
    grid = tuple(tuple(decode_ms + batch_ms * b + kv_ms_per_token * b * c for c in contexts) for b in batches)
    tokens = (256, 1024, 4096, 16384)
    return Profile(
        name="linear", device="none", model={}, provenance=Provenance("analytic", "test"),
        prefill=PrefillCosts(tokens, tuple(5 + prefill_ms_per_token * n for n in tokens)),
        decode=DecodeCosts(batches, contexts, grid),
        kv=KVCosts(block_size=16, bytes_per_token=1024, capacity_tokens=10**6, memory_budget_bytes=2**30),
        transfer=TransferCosts("none", 1e6), startup=StartupCosts(engine_s=0.0))


def cluster_cfg(prefill: int, decode: int, max_seqs: int = 64, budget: int = 2048, **extra: object) -> ClusterConfig:
    return ClusterConfig.from_dict({"model": "smollm2", "engine": {
        "cache": {"memory_budget_bytes": 2**34}, "scheduler": {"max_num_seqs": max_seqs, "max_num_batched_tokens": budget}},
        "pools": {"prefill": {"replicas": prefill}, "decode": {"replicas": decode}}, **extra})


def poisson(rate: float, n: int, prompt: int, output: int, seed: int = 0) -> list[tuple[list[float], list[int], list[int]]]:
    rng, t, times = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        times.append(t)
    return chunk_lists(times, [prompt] * n, [output] * n)


# ---- M/D/1 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_one_prefill_replica_under_poisson_arrivals_waits_as_md1(rho: float) -> None:
    """One prompt per step (token budget = prompt length), deterministic step D: mean wait = rho D / (2 (1 - rho))."""
    prof, prompt = profile(), 1024
    service = CostModel(prof).prefill_ms(prompt) / 1e3
    rate = rho / service
    c = Cluster(cluster_cfg(1, 1, budget=prompt), SimConfig(hop_ms=0.0), prof)
    result = c.run(poisson(rate, 60_000, prompt, 1))
    assert result["summary"]["completed"] == 60_000
    wait = c.collector.ttft.mean - service
    expected = rho * service / (2 * (1 - rho))
    assert wait == pytest.approx(expected, rel=0.06), (wait, expected)


# ---- a saturated decode replica ------------------------------------------------------------------------------------
class Sink:
    """A listener that counts what a replica reports."""

    def __init__(self) -> None:
        self.finished: list[tuple[float, SimRequest]] = []

    def on_first_token(self, req: SimRequest, replica: Replica, t: float) -> None:
        req.t_first = t

    def on_second_token(self, req: SimRequest, t: float) -> None:
        req.t_second = t

    def on_finish(self, req: SimRequest, replica: Replica, t: float) -> None:
        self.finished.append((t, req))

    def on_steps(self, first_ms: float, last_ms: float, rows: int, steps: int, skip: int) -> None:
        pass


def saturated_decode(prof: Profile, batch: int, requests: int, prompt: int, output: int, fast: bool
                     ) -> tuple[float, list[tuple[float, SimRequest]]]:
    """Pulled requests (KV given, first token sampled) queued on one decode replica; (seconds to finish, finishes)."""
    from engine.config import SchedulerConfig

    loop, sink = EventLoop(), Sink()
    r = Replica("d", "decode", CostModel(prof), SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=4096),
                10**6, 16, loop, sink, fast_forward=fast)
    # a one-step request first, so the rest arrive while a step runs and join together when it ends
    for i, out in enumerate([2] + [output] * requests):
        req = SimRequest(i, 0.0, prompt, out)
        req.generated, req.t_first = 1, 0.0
        assert r.reserve(req)
        r.pulled(req)
    loop.run_until(1e9)
    start = min(t for t, _ in sink.finished)
    return max(t for t, _ in sink.finished) - start, [f for f in sink.finished if f[1].rid]


@pytest.mark.parametrize("batch", [8, 64])
def test_a_saturated_decode_replica_makes_the_profiles_tokens_per_second(batch: int) -> None:
    prof = profile(kv_ms_per_token=0.0)
    output, rounds = 200, 5
    seconds, done = saturated_decode(prof, batch, batch * rounds, 128, output, fast=True)
    assert len(done) == batch * rounds
    tokens = batch * rounds * (output - 1)  # the first token of each came from its prefill
    assert tokens / seconds == pytest.approx(batch / (CostModel(prof).decode_ms(batch, 0) / 1e3), rel=1e-9)


def test_decode_steps_that_grow_with_context_sum_as_the_profile_says() -> None:
    prof = profile(kv_ms_per_token=0.002)
    prompt, output, batch = 1000, 300, 32
    seconds, _ = saturated_decode(prof, batch, batch, prompt, output, fast=True)
    cost = CostModel(prof)
    expected = sum(cost.decode_ms(batch, prompt + j) for j in range(output - 1)) / 1e3
    assert seconds == pytest.approx(expected, rel=1e-9)


def test_fast_forward_finishes_every_request_when_step_by_step_does() -> None:
    prof = profile(kv_ms_per_token=0.001)
    rng = random.Random(1)
    outs = [rng.randint(2, 400) for _ in range(100)]

    def run(fast: bool) -> dict[int, float]:
        from engine.config import SchedulerConfig

        loop, sink = EventLoop(), Sink()
        r = Replica("d", "decode", CostModel(prof), SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=4096),
                    10**6, 16, loop, sink, fast_forward=fast)
        for i, o in enumerate(outs):
            req = SimRequest(i, 0.0, 100 + i, o)
            req.generated, req.t_first = 1, 0.0
            r.reserve(req)
            loop.at(i * 0.05, r.pulled, req)
        loop.run_until(1e9)
        return {req.rid: t for t, req in sink.finished}

    exact, fast = run(False), run(True)
    assert exact.keys() == fast.keys() == set(range(100))
    for rid in exact:
        assert fast[rid] == pytest.approx(exact[rid], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("prefill", [0, 1])
def test_the_routers_admission_time_adds_once_to_each_lone_requests_ttft_and_e2e(prefill: int) -> None:
    """`admit_ms` (the router's HTTP and tokenizing, sim_validate --calibrate) delays the first message, nothing
    after it: a lone request's TTFT and e2e move by exactly that, disaggregated or co-located."""
    def run(admit_ms: float) -> list[tuple]:
        c = Cluster(cluster_cfg(prefill, 1), SimConfig(keep_requests=True, fast_forward=False, admit_ms=admit_ms),
                    profile())
        c.run(chunk_lists([0.0, 5.0], [300, 600], [8, 8]))  # far apart: each runs alone
        return sorted(c.collector.requests or [])

    base, later = run(0.0), run(25.0)
    assert len(base) == len(later) == 2
    for a, b in zip(base, later, strict=True):
        assert b[3] == pytest.approx(a[3] + 0.025, abs=1e-9)  # TTFT
        assert b[4] == pytest.approx(a[4] + 0.025, abs=1e-9)  # e2e
        assert b[5] == pytest.approx(a[5], abs=1e-9)  # the request's p99 inter-token gap
    with pytest.raises(ConfigError, match="admit_ms"):
        SimConfig(admit_ms=-1.0)


# ---- the cost model ----------------------------------------------------------------------------------------------
def test_cost_model_returns_the_profiles_own_points() -> None:
    prof = profile(kv_ms_per_token=0.001)
    cost = CostModel(prof)
    for b, row in zip(prof.decode.batch, prof.decode.ms, strict=True):
        for c, ms in zip(prof.decode.context, row, strict=True):
            assert cost.step_ms(0, 0, b, c) == pytest.approx(ms)
    for n, ms in zip(prof.prefill.tokens, prof.prefill.ms, strict=True):
        assert cost.prefill_ms(n) == pytest.approx(ms)
    assert cost.decode_run_ms(8, 100, 0) == 0
    for elapsed in (0.0, 11.0, 500.0, 12345.6):
        n = cost.decode_steps_within(8, 100.0, elapsed)
        assert cost.decode_run_ms(8, 100.0, n) <= elapsed < cost.decode_run_ms(8, 100.0, n + 1)


def test_a_measured_gpu_replicas_short_prompt_costs_its_eager_floor() -> None:
    """Prompt steps run eagerly, decode-only steps in CUDA graphs: on a measured GPU profile a prompt shorter than
    the shortest profiled one costs at least that one's weights part, not the few ms the graph rows would give;
    decode-only steps and everything on a CPU or analytic profile are as before."""
    base = dataclasses.replace(profile(), prefill=PrefillCosts((128, 1024, 4096), (24.0, 25.0, 60.0)))
    cpu = CostModel(dataclasses.replace(base, provenance=Provenance("measured", "test"), gpus_per_replica=0))
    analytic = CostModel(base)
    gpu = CostModel(dataclasses.replace(base, provenance=Provenance("measured", "test")))
    assert gpu.prefill_ms(16) == pytest.approx(24.0) and gpu.prefill_ms(128) == pytest.approx(24.0)
    assert cpu.prefill_ms(16) == analytic.prefill_ms(16) < 12.0  # follows the decode rows down, as before
    assert gpu.prefill_ms(1024) == cpu.prefill_ms(1024) == pytest.approx(25.0)
    for b, c in [(1, 0), (8, 1024), (64, 4096)]:
        assert gpu.step_ms(0, 0, b, c) == cpu.step_ms(0, 0, b, c)
    assert gpu.step_ms(16, 136, 8, 1024) > cpu.step_ms(16, 136, 8, 1024)  # a mixed step runs eagerly too


def test_the_serving_loops_overhead_is_added_once_to_every_step_and_survives_a_save(tmp_path) -> None:  # noqa: ANN001
    plain = profile(kv_ms_per_token=0.001)
    served = dataclasses.replace(plain, serving=ServingCosts(step_overhead_ms=1.25, by_batch={"1": {"overhead_ms": 1.25}}))
    a, b = CostModel(plain), CostModel(served)
    for batch, ctx in [(1, 0), (8, 1024), (100, 3000)]:
        assert b.step_ms(0, 0, batch, ctx) == pytest.approx(a.step_ms(0, 0, batch, ctx) + 1.25)
        assert b.decode_slope(batch, ctx) == pytest.approx(a.decode_slope(batch, ctx))
        assert b.step_ms(512, 5000, batch, ctx) == pytest.approx(a.step_ms(512, 5000, batch, ctx) + 1.25)
    assert b.prefill_ms(1024) == pytest.approx(a.prefill_ms(1024) + 1.25)
    assert b.decode_run_ms(8, 100.0, 10) == pytest.approx(a.decode_run_ms(8, 100.0, 10) + 12.5)
    assert b.decode_at(0, 100.0) == (0.0, 0.0)
    served.save(str(tmp_path / "p.json"))
    assert Profile.load(str(tmp_path / "p.json")).serving == served.serving


def test_a_serving_workers_prompt_cost_is_added_to_steps_with_prompt_tokens_only(tmp_path) -> None:  # noqa: ANN001
    plain = profile(kv_ms_per_token=0.001)
    served = dataclasses.replace(plain, serving=ServingCosts(step_overhead_ms=0.5, prompt_step_ms=3.75))
    a, b = CostModel(plain), CostModel(served)
    for batch, ctx in [(1, 0), (8, 1024)]:
        assert b.step_ms(0, 0, batch, ctx) == pytest.approx(a.step_ms(0, 0, batch, ctx) + 0.5)
        assert b.step_ms(512, 5000, batch, ctx) == pytest.approx(a.step_ms(512, 5000, batch, ctx) + 4.25)
    assert b.prefill_ms(16) == pytest.approx(a.prefill_ms(16) + 4.25)
    assert served.scaled(3.0, 2.0).serving == ServingCosts(step_overhead_ms=1.5, prompt_step_ms=7.5)  # a prompt's
    more = CostModel(dataclasses.replace(served, serving=ServingCosts(0.5, prompt_step_ms=3.75, extra_prompt_ms=2.0)))
    assert more.step_ms(512, 5000, 8, 1024, prompts=3) == pytest.approx(b.step_ms(512, 5000, 8, 1024) + 4.0)
    assert more.step_ms(512, 5000, 8, 1024) == pytest.approx(b.step_ms(512, 5000, 8, 1024))  # one prompt
    assert more.step_ms(0, 0, 8, 1024, prompts=3) == pytest.approx(b.step_ms(0, 0, 8, 1024))  # no prompt tokens
    served.save(str(tmp_path / "p.json"))
    assert Profile.load(str(tmp_path / "p.json")).serving == served.serving
    with pytest.raises(ConfigError):
        ServingCosts(step_overhead_ms=0.0, prompt_step_ms=-1.0)


def test_a_scaled_profile_steps_k_times_slower_and_moves_no_faster() -> None:
    prof = dataclasses.replace(profile(kv_ms_per_token=0.001), serving=ServingCosts(step_overhead_ms=0.5))
    a, b = CostModel(prof), CostModel(prof.scaled(1.5))
    for batch, ctx in [(1, 0), (8, 1024), (100, 3000)]:
        assert b.step_ms(0, 0, batch, ctx) == pytest.approx(1.5 * a.step_ms(0, 0, batch, ctx))
        assert b.step_ms(512, 5000, batch, ctx) == pytest.approx(1.5 * a.step_ms(512, 5000, batch, ctx))
    assert prof.scaled(1.5).kv == prof.kv and prof.scaled(1.5).transfer == prof.transfer
    with pytest.raises(ConfigError):
        prof.scaled(0)
    with pytest.raises(ConfigError):
        prof.scaled(1.0, 0.0)


def test_prompts_and_decode_steps_scale_apart_when_asked() -> None:
    """A VM whose memory bandwidth fell (decode steps 3.3x) while its compute held (prompts 1.0x)."""
    prof = profile(kv_ms_per_token=0.001)
    a, b = CostModel(prof), CostModel(prof.scaled(3.3, 1.0))
    assert b.prefill_ms(512) == pytest.approx(a.prefill_ms(512))
    assert b.step_ms(0, 0, 8, 1024) == pytest.approx(3.3 * a.step_ms(0, 0, 8, 1024))
    assert prof.scaled(2.0, None) == prof.scaled(2.0, 2.0)


def test_kv_pressure_preempts_and_every_request_still_finishes() -> None:
    prof = profile()
    cfg = ClusterConfig.from_dict({"model": "smollm2", "engine": {"cache": {"num_blocks": 200}, "scheduler": {
        "max_num_seqs": 32, "max_num_batched_tokens": 2048}}, "pools": {"prefill": {"replicas": 0}}})
    c = Cluster(cfg, SimConfig(), prof)
    result = c.run(poisson(50.0, 300, 300, 200))
    assert result["summary"]["completed"] == 300
    assert c.pools["decode"].slots[0].replica.used_blocks() == pytest.approx(0.0, abs=1e-9)
    assert math.isfinite(result["summary"]["ttft_p99_ms"])


@pytest.mark.parametrize("fast", [False, True])
def test_work_handed_to_a_busy_replica_runs_where_its_step_ends(fast: bool) -> None:
    """A decode worker reserves a pull's blocks between two steps (worker/async_engine.py run_between_steps): handed
    over mid-step it waits for that step's end (a fast-forwarded run is cut there), and at once when idle."""
    from engine.config import SchedulerConfig

    prof = profile()
    loop, sink = EventLoop(), Sink()
    r = Replica("d", "decode", CostModel(prof), SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4096),
                10**6, 16, loop, sink, fast_forward=fast)
    req = SimRequest(0, 0.0, 100, 50)
    req.generated, req.t_first = 1, 0.0
    assert r.reserve(req)
    r.pulled(req)
    step_s = CostModel(prof).decode_ms(1, 0) / 1e3
    ran: list[float] = []
    loop.at(2.5 * step_s, lambda _=None: r.between_steps(lambda: ran.append(loop.now)))
    loop.run_until(1e9)
    assert ran == [pytest.approx(3 * step_s)]
    assert [t for t, _ in sink.finished] == [pytest.approx(49 * step_s)]  # the cut run changed nothing else
    r.between_steps(lambda: ran.append(loop.now))  # idle: now
    assert ran[1] == loop.now


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("overlap", [False, True])
def test_a_pull_joining_beside_a_queued_step_decodes_one_step_later_with_overlapped_steps(fast: bool,
                                                                                         overlap: bool) -> None:
    """engine/lookahead.py: a GPU engine queues each decode step before reading the last one's tokens, and a pulled
    request that joins while one is queued (nothing to launch beside it) sits it out. Joining an idle replica costs
    nothing extra either way."""
    from engine.config import SchedulerConfig

    prof = profile()
    loop, sink = EventLoop(), Sink()
    r = Replica("d", "decode", CostModel(prof), SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4096),
                10**6, 16, loop, sink, fast_forward=fast, overlap=overlap)
    first, second = SimRequest(0, 0.0, 100, 50), SimRequest(1, 0.0, 100, 50)
    for req in (first, second):
        req.generated, req.t_first = 1, 0.0

    def pull(req: SimRequest) -> None:
        assert r.reserve(req)
        r.pulled(req)

    one, two = CostModel(prof).decode_ms(1, 0) / 1e3, CostModel(prof).decode_ms(2, 0) / 1e3
    pull(first)
    loop.at(2.5 * one, lambda _=None: pull(second))
    loop.run_until(1e9)
    assert first.t_second == pytest.approx(one)
    # the step in flight ends at 3 steps; with overlap the one queued behind it runs without the new row
    assert second.t_second == pytest.approx(3 * one + (one if overlap else 0.0) + two)
    assert len(sink.finished) == 2 and r.idle()


def test_a_profiles_sustained_figure_survives_a_save_and_must_not_speed_steps_up(tmp_path) -> None:  # noqa: ANN001
    prof = dataclasses.replace(profile(), sustained=SustainedCosts(prompt=1.1, note="back to back"))
    prof.save(str(tmp_path / "p.json"))
    assert Profile.load(str(tmp_path / "p.json")).sustained == prof.sustained
    assert Profile.load(str(tmp_path / "p.json")).scaled(2.0).sustained == prof.sustained
    with pytest.raises(ConfigError, match="sustained.prompt"):
        SustainedCosts(prompt=0.9)


def test_a_profiles_co_run_by_decode_batch_and_prompt_length_survives_a_save(tmp_path) -> None:  # noqa: ANN001
    co = CoRunCosts(prefill=1.5, decode=1.6, decode_batch=(1, 4), decode_by_batch=(1.2, 1.6),
                    prefill_tokens=(1024, 2048), prefill_by_tokens=(1.7, 1.5), decode_spread=(0.5, 1.0, 1.5),
                    spread_batch=(1, 32), spread_by_batch=((0.5, 1.0, 1.5), (0.9, 1.0, 1.1)))
    dataclasses.replace(profile(), co_run=co).save(str(tmp_path / "p.json"))
    assert Profile.load(str(tmp_path / "p.json")).co_run == co


def test_a_cluster_overlaps_steps_as_its_engine_would_on_the_profiled_hardware() -> None:
    from engine.config import EngineConfig, SpeculativeConfig
    from simulator.cluster import overlap_steps

    gpu, cpu = dataclasses.replace(profile(), gpus_per_replica=1), dataclasses.replace(profile(), gpus_per_replica=0)
    assert overlap_steps(EngineConfig(), gpu) and not overlap_steps(EngineConfig(), cpu)
    assert not overlap_steps(EngineConfig(overlap_steps=False), gpu)
    assert overlap_steps(EngineConfig(overlap_steps=True), cpu)
    assert not overlap_steps(EngineConfig(speculative=SpeculativeConfig(method="ngram")), gpu)


@pytest.mark.parametrize("streaming", [False, True])
def test_layer_wise_streaming_leaves_only_the_last_layer_group_of_the_last_chunk_to_pull(streaming: bool) -> None:
    """A 4,096-token prompt over a link that moves it in 1 s (longer than its 0.41 s prefill): pulled whole after
    the prefill, the first gap holds all of it; streamed (router.kv_streaming), the link had the prefill's time
    already, so what is left is the rest of the bytes (more than the last group of the last 1,024-token chunk)."""
    prof = dataclasses.replace(profile(), transfer=TransferCosts("rdma", 4096 * 1024 / 1.0 / 2**30))
    prompt, budget = 4096, 1024
    cfg = cluster_cfg(1, 1, budget=budget, router={"kv_streaming": streaming}, transfer={"layer_groups": 4})
    c = Cluster(cfg, SimConfig(hop_ms=0.0, keep_requests=True), prof)
    c.run([([0.0], [prompt], [3])])
    (req,) = c.collector.requests
    first_gap = req[6]
    prefill_s = CostModel(prof).prefill_ms(prompt) / 1e3
    pull_s = 1.0 - prefill_s if streaming else 1.0
    step_s = CostModel(prof).decode_ms(1, prompt) / 1e3
    assert first_gap == pytest.approx(pull_s + step_s, rel=1e-3)
    assert all(s.replica.used_blocks() == 0 for pool in c.pools.values() for s in pool.slots)  # every block back


def test_a_streamed_pull_never_takes_less_than_its_last_layer_group() -> None:
    prof = dataclasses.replace(profile(), transfer=TransferCosts("rdma", 1024 * 1024 / 0.1 / 2**30))  # 0.1 s per 1 k
    cfg = cluster_cfg(1, 1, budget=1024, router={"kv_streaming": True}, transfer={"layer_groups": 4})
    c = Cluster(cfg, SimConfig(hop_ms=0.0, keep_requests=True), prof)
    c.run([([0.0], [2048], [3])])
    step_s = CostModel(prof).decode_ms(1, 2048) / 1e3
    assert c.collector.requests[0][6] == pytest.approx(0.1 / 4 + step_s, rel=1e-3)  # a quarter of the last 1,024


def test_a_lone_pulls_handoff_splits_into_the_relay_the_read_and_one_decode_step() -> None:
    """The marks a simulated handoff leaves (as the workers' step logs mark a real one): a lone request's KV is
    reserved at once (the decode replica is idle), read in the profile's time, and decoded by the next step."""
    prof = dataclasses.replace(profile(), transfer=TransferCosts("tcp", 300 * 1024 / 0.004 / 2**30, latency_ms=1.0))
    c = Cluster(cluster_cfg(1, 1), SimConfig(hop_ms=1.0, keep_requests=True, fast_forward=False), prof)
    c.run(chunk_lists([0.0], [300], [4]))
    got = handoff_phases(c.collector.handoffs)
    step_ms = CostModel(prof).decode_ms(1, 300)
    want = {"relay_ms": 2.0, "reserve_wait_ms": 0.0, "read_ms": 5.0, "join_wait_ms": 0.0, "join_step_ms": step_ms,
            "worker_gap_ms": 7.0 + step_ms}
    assert got["pulls"] == 1 and {k: got[k]["p50"] for k in want} == pytest.approx(want, abs=0.01)
    assert c.collector.requests[0][6] * 1e3 == pytest.approx(want["worker_gap_ms"], abs=0.01)  # + no client legs
