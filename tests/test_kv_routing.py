"""KV-aware routing without servers: the worker's KV event log, the router's index fed by it (cursor, gaps,
restarts, removals), the kv_aware cost (prefix overlap against load), and the decode worker's partial pull."""

from __future__ import annotations

import asyncio
import pickle
import time
from typing import Any

import pytest

from decode_worker.kv_pull import KVPuller
from engine.config import CacheConfig, ConfigError, EngineConfig, ModelConfig
from engine.engine import LLMEngine
from engine.kv_cache_manager import KVCacheManager, prefix_hashes
from engine.request import Request, SamplingParams
from kvtransfer import KVLayout, LocalFabric, create_agent
from proto import disagg_pb2
from proto.convert import WorkerLoad, load_from_proto
from router.config import RouterConfig
from router.metrics import RouterMetrics
from router.policy import KVAware, make_policy
from router.registry import KVIndex, WorkerRegistry, WorkerState
from tests.kvtransfer_peer import make_cache
from worker.config import TransferConfig
from worker.kv_agents import LocalRank, WorkerAgents
from worker.servicer import KVEventLog, TransferCounters

BS = 4  # block size of the synthetic workers


def state(address: str, block_size: int = BS, **load: Any) -> WorkerState:
    return WorkerState(address, role="both", healthy=True, kv_block_size=block_size,
                       load=WorkerLoad(load))


def prompt(seed: int, n: int) -> list[int]:
    return [1000 * seed + i for i in range(n)]


def report(log: KVEventLog, w: WorkerState) -> disagg_pb2.KVEvents:
    """The KV events the worker's Load answers to the router's cursor for `w`."""
    rep = disagg_pb2.LoadReport()
    log.fill(rep, disagg_pb2.LoadRequest(want_kv_events=True, kv_epoch=w.kv_epoch, kv_events_after=w.kv_seq))
    return rep.kv_events


def cache_prompt(kv: KVCacheManager, rid: str, tokens: list[int]) -> None:
    """Run a prompt through the cache manager as the engine would (match, allocate, compute, register), then free."""
    req = Request(rid, tokens, SamplingParams(max_tokens=1))
    req.num_computed_tokens = kv.match_prefix(req)
    assert kv.allocate(rid, len(tokens))
    req.num_computed_tokens = len(tokens)
    kv.cache_full_blocks(req)
    kv.free(rid)


# --- the worker's event log ----------------------------------------------------------------------------------------


def test_event_log_cursor_snapshot_and_trim() -> None:
    log = KVEventLog(capacity=2, epoch=7)
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    cache_prompt(kv, "a", prompt(1, 12))  # 3 full blocks stored
    log.extend(kv.pool.drain_events())
    assert log.seq == 3 and log.since(7, 0) is None  # event 1 was trimmed: a snapshot is needed
    assert [h for _, h in log.since(7, 1)] == prefix_hashes(prompt(1, 12), BS)[1:]
    assert log.since(7, 3) == [] and log.since(8, 3) is None and log.since(7, 4) is None

    log, kv = KVEventLog(capacity=16, epoch=7), KVCacheManager(num_blocks=6, block_size=BS)
    cache_prompt(kv, "a", prompt(1, 12))
    cache_prompt(kv, "b", prompt(2, 16))  # 4 blocks in a pool of 6: one of prompt 1's cached blocks is evicted
    log.extend(kv.pool.drain_events())
    events = log.since(7, 0)
    assert events is not None and len(events) == 3 + 1 + 4 and [r for r, _ in events].count(True) == 1
    assert log.cached == set(kv.pool._cached) and len(log.cached) == 6  # the snapshot agrees with the pool
    rep = disagg_pb2.LoadReport()
    log.fill(rep, disagg_pb2.LoadRequest(want_kv_events=True))  # no cursor: a snapshot
    kv = rep.kv_events
    assert kv.snapshot and set(kv.cached_hashes) == log.cached and (kv.epoch, kv.seq) == (7, log.seq)
    rep = disagg_pb2.LoadReport()
    log.fill(rep, disagg_pb2.LoadRequest())  # a plain Load (tests, tools): no events, nothing consumed
    assert not rep.HasField("kv_events")
    rep.stats["num_running"] = 2
    assert pickle.loads(pickle.dumps(load_from_proto(rep))).num_running == 2  # Ray copies it


def test_index_follows_events_gaps_and_restarts() -> None:
    reg = WorkerRegistry(["w1", "w2"])
    w1, w2 = reg.get("w1"), reg.get("w2")
    log1, log2 = KVEventLog(64, epoch=11), KVEventLog(64, epoch=22)
    kv1, kv2 = KVCacheManager(8, BS), KVCacheManager(8, BS)
    p = prompt(1, 17)
    hs = prefix_hashes(p, BS)
    for kv, log, w in ((kv1, log1, w1), (kv2, log2, w2)):
        reg._apply_kv(w, report(log, w))  # first poll: an (empty) snapshot sets the cursor
        assert (w.kv_epoch, w.kv_seq) == (log.epoch, 0)
        cache_prompt(kv, "a", p)
        log.extend(kv.pool.drain_events())
    rep = report(log1, w1)
    reg._apply_kv(w1, rep)
    assert not rep.snapshot and len(rep.events) == 4 and w1.kv_seq == 4
    assert reg.kv_index.match(hs, ["w1", "w2"]) == {"w1": 4, "w2": 0}
    reg._apply_kv(w1, rep)  # a duplicate (overlapping polls) changes nothing
    assert reg.kv_index.num_blocks("w1") == 4 and w1.kv_seq == 4
    reg._apply_kv(w2, report(log2, w2))
    assert reg.kv_index.match(hs, ["w1", "w2"]) == {"w1": 4, "w2": 4}

    # "removed" events drop the stale entries: w1 evicts the prompt's blocks for another prompt
    cache_prompt(kv1, "b", prompt(2, 32))
    log1.extend(kv1.pool.drain_events())
    reg._apply_kv(w1, report(log1, w1))
    assert reg.kv_index.match(hs, ["w1", "w2"]) == {"w1": 0, "w2": 4}
    assert reg.kv_index.match(prefix_hashes(prompt(2, 32), BS), ["w1"]) == {"w1": 8}

    # a report that skips events (cannot happen with one cursor, but must not corrupt the index): resync
    stale = disagg_pb2.KVEvents(epoch=log1.epoch, seq=w1.kv_seq + 5, events=[disagg_pb2.KVEvent(block_hash=1)])
    reg._apply_kv(w1, stale)
    assert (w1.kv_epoch, w1.kv_seq) == (0, 0)  # next poll asks for a snapshot
    reg._apply_kv(w1, report(log1, w1))
    assert reg.kv_index.num_blocks("w1") == 8 and w1.kv_epoch == log1.epoch

    # w2 restarts: new epoch, empty cache; its old entries go with the snapshot
    log2 = KVEventLog(64, epoch=23)
    rep = report(log2, w2)
    assert rep.snapshot
    reg._apply_kv(w2, rep)
    assert reg.kv_index.match(hs, ["w1", "w2"]) == {"w1": 0, "w2": 0} and reg.kv_index.num_blocks("w2") == 0

    # a removed worker leaves the index
    asyncio.run(reg.remove("w1"))
    assert reg.kv_index.num_blocks("w1") == 0
    assert reg.kv_index.match(prefix_hashes(prompt(2, 32), BS), ["w1"]) == {"w1": 0}


class _Stub:
    """A worker's Health and Load as the registry polls them (Load answered from a real KVEventLog)."""

    def __init__(self, log: KVEventLog) -> None:
        self.log = log

    async def Health(self, request: Any, timeout: float) -> disagg_pb2.HealthResponse:
        return disagg_pb2.HealthResponse(ok=True, worker_id="p", role="prefill", kv_block_size=BS)

    async def Load(self, request: disagg_pb2.LoadRequest, timeout: float) -> disagg_pb2.LoadReport:
        rep = disagg_pb2.LoadReport(role="prefill")
        self.log.fill(rep, request)
        return rep


def test_registry_poll_feeds_the_index() -> None:
    reg = WorkerRegistry(["p"])
    w = reg.get("p")
    log, kv = KVEventLog(64, epoch=5), KVCacheManager(16, BS)
    w.stub = _Stub(log)
    cache_prompt(kv, "a", prompt(1, 16))
    log.extend(kv.pool.drain_events())
    asyncio.run(reg.poll_once())
    assert w.healthy and w.kv_block_size == BS and (w.kv_epoch, w.kv_seq) == (5, 4)
    assert reg.kv_index.num_blocks("p") == 4  # applied; the stored load keeps only figures
    cache_prompt(kv, "b", prompt(2, 8))
    log.extend(kv.pool.drain_events())
    asyncio.run(reg.poll_once())
    assert w.kv_seq == 6 and reg.kv_index.num_blocks("p") == 6
    w.stub = _Stub(KVEventLog(64, epoch=6))  # restarted: empty cache, new epoch
    asyncio.run(reg.poll_once())
    assert w.kv_epoch == 6 and reg.kv_index.num_blocks("p") == 0


def test_index_match_is_a_leading_run_and_expectations_expire() -> None:
    idx = KVIndex()
    hs = prefix_hashes(prompt(3, 20), BS)  # 5 blocks
    idx.stored("a", [hs[0], hs[1], hs[3]])  # block 2 evicted: only 2 usable
    idx.stored("b", hs[:1])
    assert idx.match(hs, ["a", "b", "c"]) == {"a": 2, "b": 1, "c": 0}
    idx.expect("c", hs, ttl_s=0.05)
    assert idx.match(hs, ["c"]) == {"c": 5}
    idx.stored("c", hs[:2])  # confirmed ones stay
    time.sleep(0.06)
    assert idx.match(hs, ["c"]) == {"c": 2}
    idx.expect("c", hs, ttl_s=10)
    idx.removed("c", [hs[1]])  # an eviction also cancels the expectation
    assert idx.match(hs, ["c"]) == {"c": 1}
    idx.expect("d", hs, ttl_s=0)  # 0: expectations off
    assert idx.match(hs, ["d"]) == {"d": 0}


# --- the kv_aware cost ---------------------------------------------------------------------------------------------


def test_kv_aware_prefill_overlap_beats_load_up_to_the_weight() -> None:
    p = prompt(4, 64)  # 16 full blocks
    for overlap_weight in (1.0, 2.0):
        idx = KVIndex()
        idx.stored("a", prefix_hashes(p, BS))  # a holds the whole prompt, b nothing
        pol = make_policy("kv_aware", "prefill", idx, 0.0, overlap_weight=overlap_weight, load_weight=1.0)
        # score(a) = w_o * 1 - queued / 64, score(b) = 0: a wins while queued < w_o * 64 tokens
        limit = int(overlap_weight * 64)
        for queued, winner in ((0, "a"), (limit - 8, "a"), (limit + 8, "b")):
            a, b = state("a", queued_prefill_tokens=queued), state("b")
            for _ in range(2):  # whatever the rotation
                assert pol.choose([a, b], p).address == winner, (overlap_weight, queued)
        a, b = state("a", queued_prefill_tokens=limit - 8), state("b")
        assert pol.choose([a, b], p).address == "a"
        with a.dispatched(limit + 8):  # this router's own burst counts before the next Load report shows it
            assert pol.choose([a, b], p).address == "b"
        with a.dispatched(10 * limit, new_tokens=limit - 8):  # ... as the tokens it has to compute, not cached ones
            assert pol.choose([a, b], p).address == "a"
    # half the prompt cached: half the weight
    idx = KVIndex()
    idx.stored("a", prefix_hashes(p, BS)[:8])
    pol = make_policy("kv_aware", "prefill", idx)
    assert pol.choose([state("a", queued_prefill_tokens=24), state("b")], p).address == "a"
    assert pol.choose([state("a", queued_prefill_tokens=40), state("b")], p).address == "b"
    assert pol.last.matched_blocks == 0 and pol.last.prompt_blocks == 16


def test_kv_aware_decode_weighs_kv_usage_and_ties_go_round_robin() -> None:
    p = prompt(5, 40)  # 10 full blocks
    idx = KVIndex()
    idx.stored("a", prefix_hashes(p, BS))
    pol = KVAware("decode", idx, 0.0, overlap_weight=1.0, load_weight=2.0)
    # score(a) = 1 - 2 * usage(a), score(b) = -2 * usage(b): a wins while usage(a) - usage(b) < 0.5
    assert pol.choose([state("a", kv_usage=0.6), state("b", kv_usage=0.2)], p).address == "a"
    assert pol.choose([state("a", kv_usage=0.8), state("b", kv_usage=0.2)], p).address == "b"
    # no overlap anywhere, equal load: round-robin
    idle = [state("x"), state("y")]
    assert {pol.choose(idle, prompt(6, 40)).address for _ in range(2)} == {"x", "y"}
    # a worker with no known block size gets no overlap: load alone decides
    assert pol.choose([state("a", block_size=0, kv_usage=0.1), state("b", kv_usage=0.0)], p).address == "b"


def test_expectation_keeps_a_burst_of_one_prefix_together() -> None:
    """Requests sharing a long prefix that arrive before any Load poll reports it still meet on one worker."""
    idx = KVIndex()
    pol = make_policy("kv_aware", "prefill", idx, expect_ttl_s=10.0)
    a, b = state("a"), state("b")
    shared = prompt(7, 256)
    first = pol.choose([a, b], shared + prompt(8, 16))
    assert pol.last.matched_blocks == 0
    for i in range(4):
        assert pol.choose([a, b], shared + prompt(9 + i, 16)) is first
        assert pol.last.matched_blocks == 64
    # another prefix goes to the other (idle by rotation) worker, then sticks there too
    other = pol.choose([a, b], prompt(20, 256))
    assert other is not first and pol.choose([a, b], prompt(20, 260)) is other


def test_other_policies_report_predicted_overlap() -> None:
    idx = KVIndex()
    p = prompt(10, 32)
    idx.stored("b", prefix_hashes(p, BS)[:4])
    pol = make_policy("round_robin", "prefill", idx, 0.0)
    got = {pol.choose([state("a"), state("b")], p).address: pol.last.overlap for _ in range(2)}
    assert got == {"a": 0.0, "b": 0.5}
    metrics = RouterMetrics(WorkerRegistry())
    metrics.observe_placement("prefill", pol.last)
    text = metrics.render()[0].decode()
    assert "disagg_router_predicted_hit_blocks_total" in text and "disagg_router_predicted_overlap_bucket" in text


def test_router_config_kv_weights() -> None:
    cfg = RouterConfig.from_dict({"prefill_policy": "kv_aware", "decode_policy": "kv_aware",
                                  "prefill_overlap_weight": 2.0, "decode_load_weight": 0.5})
    assert cfg.prefill_overlap_weight == 2.0 and cfg.decode_load_weight == 0.5 and cfg.kv_expect_ttl_s > 0
    for bad in ({"prefill_load_weight": -1}, {"kv_expect_ttl_s": -1}, {"decode_overlap_weight": "x"}):
        with pytest.raises(ConfigError):
            RouterConfig.from_dict(bad)


# --- the decode worker pulls only what it does not cache -----------------------------------------------------------


class _Loop:
    """The part of AsyncEngine a KVPuller uses, over a real engine that is never stepped: each call is applied at
    once, as the engine loop applies it between steps."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine

    def add(self, req: Request, sink: Any) -> None:
        self.engine.add(req)

    async def receive_kv(self, req: Request, num_tokens: int, timeout_s: float, sink: Any,
                         recompute_if_short: bool = True) -> Any:
        res = self.engine.receive_kv(req, num_tokens, timeout_s)
        if res is None:
            self.engine.add(req)
        return res

    def kv_received(self, rid: str) -> None:
        self.engine.kv_received(rid)

    def kv_failed(self, rid: str) -> None:
        self.engine.kv_failed(rid)

    noting = False  # no step log is kept here

    def note(self, event: str, rid: str, **fields: float) -> None:
        """No step log is kept here."""


def _engine() -> LLMEngine:
    """Dummy weights; KV cache laid out as make_cache's (2 layers, 2 KV heads of 32, float16, 48 blocks of BS)."""
    shape = ModelConfig(vocab_size=16384, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=2,
                        num_kv_heads=2, head_dim=32, max_position_embeddings=256)
    return LLMEngine(EngineConfig(model="kv", load_format="dummy", dummy_model=shape, dtype="float16",
                                  cache=CacheConfig(block_size=BS, num_blocks=48)))


def _puller(eng: LLMEngine, fault: str | None = None) -> tuple[KVPuller, Any, TransferCounters]:
    fabric = LocalFabric()
    remote_cache = make_cache(seed=1, block_size=BS)
    remote = create_agent("local", "prefill", remote_cache, fabric=fabric)
    local = create_agent("local", "decode", eng.kv_cache, fabric=fabric, fault=fault)
    agents = WorkerAgents([LocalRank(local)], eng.kv_layout(), "local")
    agents.add_peer("prefill", eng.kv_layout(), [("prefill", remote.metadata())])
    counters = TransferCounters()
    puller = KVPuller(agents, _Loop(eng), TransferConfig(timeout_s=5, lease_s=30), counters,
                      KVLayout.from_cache(eng.kv_cache), eng.kv_layout())
    puller._known_agents.add("prefill")
    puller.release_remote = lambda h, rid: None  # no prefill worker to tell
    return puller, (remote_cache, eng.kv_cache, remote, local), counters


def _handle(block_ids: list[int], num_tokens: int) -> disagg_pb2.KVHandle:
    return disagg_pb2.KVHandle(worker_id="prefill", agent_name="prefill", block_ids=block_ids, num_tokens=num_tokens,
                               lease_deadline=time.time() + 30)


def _pull(puller: KVPuller, eng: LLMEngine, rid: str, h: disagg_pb2.KVHandle, tokens: list[int]) -> bool:
    req = eng.make_request(rid, tokens, SamplingParams(max_tokens=4), output_token_ids=[7])
    return asyncio.run(puller.pull(req, h, lambda so: None))


def test_decode_pull_reads_only_blocks_past_its_cached_prefix() -> None:
    eng = _engine()
    kv = eng._kv
    puller, (remote_cache, local_cache, *agents), counters = _puller(eng)
    block_bytes = puller.layout.block_bytes
    turn1 = prompt(11, 14)  # 3 full blocks + 2 tokens
    assert _pull(puller, eng, "t1", _handle([5, 9, 2, 30], 14), turn1)
    t1 = kv.block_table("t1")
    assert len(t1) == 4 and counters.transfer_bytes == 4 * block_bytes and counters.pull_cached_blocks == 0
    assert all(local_cache[t1[i]].equal(remote_cache[r]) for i, r in enumerate([5, 9, 2, 30]))
    assert eng.abort("t1")  # turn 1 ends: its full blocks (registered when the KV arrived) stay cached

    # turn 2 extends turn 1: its first 3 blocks are shared, only blocks 3..5 come over the wire
    turn2 = turn1[:12] + prompt(12, 10)  # 22 tokens: 5 full blocks + 2
    remote2 = [40, 41, 42, 13, 14, 15]
    assert _pull(puller, eng, "t2", _handle(remote2, 22), turn2)
    t2 = kv.block_table("t2")
    assert t2[:3] == t1[:3] and len(t2) == 6 and len(set(t2)) == 6
    assert counters.transfer_bytes == (4 + 3) * block_bytes and counters.pull_cached_blocks == 3
    assert counters.transfers == 2
    assert all(local_cache[t2[i]].equal(remote_cache[r]) for i, r in enumerate([5, 9, 2, 13, 14, 15]))
    assert kv.query_tokens == 14 + 22 and kv.hit_tokens == 12

    # a prompt all of whose blocks are cached here is not read at all
    assert _pull(puller, eng, "t3", _handle([40, 41, 42], 12), turn1[:12])
    assert kv.block_table("t3") == t1[:3] and counters.transfer_bytes == 7 * block_bytes and counters.transfers == 3
    for rid in ("t2", "t3"):
        assert eng.abort(rid)
    kv.pool.check_invariants()
    assert eng.load().kv_blocks_free == eng.num_kv_blocks
    for a in agents:
        a.close()


def test_failed_partial_pull_gives_back_shared_and_new_blocks() -> None:
    eng = _engine()
    kv = eng._kv
    cache_prompt(kv, "old", prompt(13, 12))  # 3 cached blocks
    puller, (*_, remote, local), counters = _puller(eng, fault="fail")
    ok = _pull(puller, eng, "x", _handle([1, 2, 3, 4, 5], 18), prompt(13, 12) + prompt(14, 6))
    assert not ok and counters.transfer_failures == 1 and not kv.has("x")
    assert eng.stats.recomputes == 1 and eng.load().num_waiting == 1  # queued to recompute its prompt here
    kv.pool.check_invariants()
    assert eng.load().kv_blocks_free == eng.num_kv_blocks and kv.pool.num_cached == 3  # the prefix is still cached
    remote.close()
    local.close()
