"""Prefix caching: shared prompts are computed once, outputs never change, eviction is safe."""

from __future__ import annotations

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import LLMEngine
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def engine(folder: str, caching: bool, num_blocks: int = 256) -> LLMEngine:
    return LLMEngine(EngineConfig(model=folder, cache=CacheConfig(num_blocks=num_blocks, enable_prefix_caching=caching),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=512)))


def run(eng: LLMEngine, prompts: list[list[int]], rid: str = "r", params: SamplingParams = GREEDY) -> list[list[int]]:
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        eng.add_request(f"{rid}{i}", p, params)
        out[f"{rid}{i}"] = []
    while eng.has_unfinished():
        for so in eng.step():
            out[so.request_id].extend(so.new_token_ids)
    return [out[f"{rid}{i}"] for i in range(len(prompts))]


def test_shared_system_prompt_computed_once(tiny_llama_dir: str) -> None:
    rng = random.Random(0)
    system = [rng.randrange(384) for _ in range(512)]
    prompts = [system + [rng.randrange(384) for _ in range(rng.randint(5, 30))] for _ in range(32)]
    cached, plain = engine(tiny_llama_dir, True), engine(tiny_llama_dir, False)
    first = run(cached, prompts[:1], "a")
    after_first = cached.stats.prompt_tokens
    rest = run(cached, prompts[1:], "b")
    computed_rest = cached.stats.prompt_tokens - after_first
    assert computed_rest <= 0.1 * sum(len(p) for p in prompts[1:]), computed_rest
    assert first + rest == run(plain, prompts)
    assert cached.load().prefix_hit_tokens >= 31 * 512
    assert cached.load().kv_blocks_free == cached.num_kv_blocks


def test_eviction_under_small_budget_keeps_outputs(tiny_llama_dir: str) -> None:
    rng = random.Random(1)
    bases = [[rng.randrange(384) for _ in range(100)] for _ in range(6)]
    prompts = [rng.choice(bases) + [rng.randrange(384) for _ in range(rng.randint(1, 40))] for _ in range(24)]
    small = engine(tiny_llama_dir, True, num_blocks=40)
    got = [run(small, prompts[i : i + 4], f"c{i}") for i in range(0, 24, 4)]
    assert small._kv.pool.num_evictions > 0 and small.load().prefix_hit_tokens > 0
    assert [t for g in got for t in g] == run(engine(tiny_llama_dir, False), prompts)
    small._kv.pool.check_invariants()


class CacheMachine(RuleBasedStateMachine):
    """Shadow memory: each block remembers the tokens written to it. A cache hit must return blocks whose
    content equals the request's prefix (no stale hit after eviction), and no referenced block is reused."""

    BS = 4

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(num_blocks=16, block_size=self.BS)
        self.content: dict[int, tuple[int, ...]] = {}
        self.live: dict[str, Request] = {}
        self.n = 0

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=20))
    def admit(self, tokens: list[int]) -> None:
        rid = f"q{self.n}"
        self.n += 1
        req = Request(rid, tokens, SamplingParams())
        hit = self.kv.match_prefix(req)
        for i, b in enumerate(self.kv.block_table(rid)):
            assert self.content.get(b) == tuple(tokens[i * self.BS : (i + 1) * self.BS]), "stale or wrong cache hit"
        if not self.kv.allocate(rid, len(tokens)):
            self.kv.free(rid)
            return
        req.num_computed_tokens = hit
        self._compute(req, len(tokens))
        self.live[rid] = req

    def _compute(self, req: Request, upto: int) -> None:
        table = self.kv.block_table(req.request_id)
        for pos in range(req.num_computed_tokens, upto):
            b = table[pos // self.BS]
            assert self.kv.pool.ref_count(b) == 1, "writing into a shared block"
            self.content[b] = self.content.get(b, ())[: pos % self.BS] + (req.all_token_ids[pos],)
        req.num_computed_tokens = upto
        self.kv.cache_full_blocks(req)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), tok=st.integers(0, 2))
    def extend(self, data: st.DataObject, tok: int) -> None:
        req = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        req.output_token_ids.append(tok)
        if self.kv.allocate(req.request_id, req.num_tokens):
            self._compute(req, req.num_tokens)
        else:
            req.output_token_ids.pop()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        del self.live[rid]
        self.kv.free(rid)

    @invariant()
    def consistent(self) -> None:
        self.kv.pool.check_invariants()
        refs: dict[int, int] = {}
        for rid in self.live:
            for b in self.kv.block_table(rid):
                refs[b] = refs.get(b, 0) + 1
        for b, n in refs.items():
            assert self.kv.pool.ref_count(b) == n, f"block {b}: ref count {self.kv.pool.ref_count(b)} != owners {n}"

    def teardown(self) -> None:
        for rid in list(self.live):
            self.kv.free(rid)
        assert self.kv.num_free_blocks == 16


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=80, stateful_step_count=50, deadline=None)


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_with_caching_matches(tiny_llama_dir: str, caching: bool) -> None:
    rng = random.Random(2)
    prompts = [[rng.randrange(384) for _ in range(rng.randint(20, 120))] for _ in range(8)]
    long = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    tight = engine(tiny_llama_dir, caching, num_blocks=20)
    assert run(tight, prompts, params=long) == run(engine(tiny_llama_dir, False), prompts, params=long)
    assert tight.stats.preemptions > 0
