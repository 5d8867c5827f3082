"""n > 1 in the engine (engine/fork.py): a choice naming a sibling in `fork_from` waits for the sibling's prompt,
shares its full blocks, copies the last one, computes only the prompt's last token, and then samples exactly what
it would have sampled with a prompt of its own; blocks never leak."""

from __future__ import annotations

import dataclasses

import pytest

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import LLMEngine
from engine.request import SamplingParams

PROMPT = list(range(3, 40))  # 37 tokens: two full blocks of 16 and a partial one holding the last prompt token


def make(tiny_llama_dir: str, **kw) -> LLMEngine:  # noqa: ANN003 - EngineConfig fields
    cache = kw.pop("cache", CacheConfig(num_blocks=64, enable_prefix_caching=False))
    return LLMEngine(EngineConfig(model=tiny_llama_dir, cache=cache, **kw))


def choices(n: int, seed: int | None = 11, temperature: float = 0.9) -> dict[str, SamplingParams]:
    """Choice i of n as the router makes them: seed + i, and every choice after the first forks the first."""
    base = SamplingParams(max_tokens=12, temperature=temperature, seed=seed, ignore_eos=True)
    out = {"c0": base}
    for i in range(1, n):
        out[f"c{i}"] = dataclasses.replace(base, seed=None if seed is None else seed + i, fork_from="c0")
    return out


def run(engine: LLMEngine, reqs: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    free0 = engine.load().kv_blocks_free
    for rid, (prompt, params) in reqs.items():
        engine.add_request(rid, prompt, params)
    out: dict[str, list[int]] = {rid: [] for rid in reqs}
    while engine.has_unfinished():
        for so in engine.step():
            out[so.request_id].extend(so.new_token_ids)
    assert engine.load().kv_blocks_free == free0, "blocks leaked"
    return out


def alone(engine: LLMEngine, params: dict[str, SamplingParams]) -> dict[str, list[int]]:
    """Each choice as an ordinary request, one at a time."""
    return {rid: run(engine, {rid: (PROMPT, dataclasses.replace(p, fork_from=""))})[rid] for rid, p in params.items()}


def test_choices_share_the_prompt_and_sample_their_own(tiny_llama_dir: str) -> None:
    engine = make(tiny_llama_dir)
    params = choices(4)
    expected = alone(engine, params)
    prompt_tokens = engine.stats.prompt_tokens
    got = run(engine, {rid: (PROMPT, p) for rid, p in params.items()})
    assert got == expected
    assert len({tuple(t) for t in got.values()}) == 4  # seed + i: the choices differ
    # One prompt computed, plus the last prompt token once per forked choice.
    assert engine.stats.prompt_tokens - prompt_tokens == len(PROMPT) + 3
    assert engine._scheduler.forks.forked == 3


def test_forked_blocks_are_shared_and_the_last_one_copied(tiny_llama_dir: str) -> None:
    engine = make(tiny_llama_dir)
    params = choices(3, temperature=0)
    for rid, p in params.items():
        engine.add_request(rid, PROMPT, p)
    engine.step()  # the first choice's prompt; the others are held back
    kv = engine._kv
    assert kv.has("c0") and not kv.has("c1") and not kv.has("c2")
    engine.step()  # the others fork
    t0, t1, t2 = (kv.block_table(r) for r in ("c0", "c1", "c2"))
    assert t1[:2] == t2[:2] == t0[:2] and len({t0[2], t1[2], t2[2]}) == 3  # full blocks shared, the last copied
    assert [kv.pool.ref_count(b) for b in t0[:2]] == [3, 3]
    while engine.has_unfinished():
        engine.step()
    assert kv.num_free_blocks == kv.num_blocks


@pytest.mark.parametrize("scenario", ["overlap", "prefix caching", "preemption", "chunked prefill"])
def test_forks_change_no_output(tiny_llama_dir: str, scenario: str) -> None:
    kw = {
        "overlap": dict(overlap_steps=True),
        "prefix caching": dict(cache=CacheConfig(num_blocks=64, enable_prefix_caching=True)),
        "preemption": dict(cache=CacheConfig(num_blocks=9, enable_prefix_caching=False)),
        "chunked prefill": dict(scheduler=SchedulerConfig(max_num_batched_tokens=16)),
    }[scenario]
    params = choices(3)
    expected = alone(make(tiny_llama_dir), params)
    assert run(make(tiny_llama_dir, **kw), {rid: (PROMPT, p) for rid, p in params.items()}) == expected


def test_a_prompt_ending_on_a_block_boundary_needs_no_copy(tiny_llama_dir: str) -> None:
    engine = make(tiny_llama_dir)
    prompt = list(range(3, 36))  # 33 tokens: the 32 forked ones fill two blocks exactly
    params = {rid: p for rid, p in choices(2, temperature=0).items()}
    expected = {rid: run(engine, {rid: (prompt, dataclasses.replace(p, fork_from=""))})[rid] for rid, p in params.items()}
    assert run(engine, {rid: (prompt, p) for rid, p in params.items()}) == expected


def test_without_a_live_source_a_choice_computes_its_own_prompt(tiny_llama_dir: str) -> None:
    engine = make(tiny_llama_dir)
    params = choices(2)
    expected = alone(engine, params)
    assert run(engine, {"c1": (PROMPT, params["c1"])}) == {"c1": expected["c1"]}  # no c0 here
    # The source finished before the choice arrived (its first token ended it).
    short = dataclasses.replace(params["c0"], max_tokens=1)
    run(engine, {"c0": (PROMPT, short)})
    assert run(engine, {"c1": (PROMPT, params["c1"])}) == {"c1": expected["c1"]}
    # Another prompt under the same id: not a sibling.
    other = run(engine, {"c0": (PROMPT[1:], params["c0"]), "c1": (PROMPT, params["c1"])})
    assert other["c1"] == expected["c1"] and engine._scheduler.forks.forked == 0


def test_a_choice_waits_for_a_source_receiving_its_kv(tiny_llama_dir: str) -> None:
    """The first choice's KV arrives from a prefill worker: the others are held back until it has, then fork."""
    engine = make(tiny_llama_dir)
    params = choices(2, temperature=0)
    src = engine.make_request("c0", PROMPT, params["c0"], output_token_ids=[5])
    assert engine.receive_kv(src, len(PROMPT), timeout_s=30) is not None
    engine.add_request("c1", PROMPT, params["c1"])
    assert engine.step() == [] and not engine._kv.has("c1")  # held back: nothing ran
    engine.kv_received("c0")
    engine.step()
    assert engine._scheduler.forks.forked == 1
    assert engine._kv.block_table("c1")[:2] == engine._kv.block_table("c0")[:2]
    engine.abort("c0")
    engine.abort("c1")
    assert engine._kv.num_free_blocks == engine._kv.num_blocks
