"""Prompt logprobs in the engine (vLLM's `prompt_logprobs`): equal to transformers' log_softmax of a full forward on
the same weights, through a chunked prefill of several chunks, with vLLM's ranks and top-k; generated tokens are
unchanged; the prefix cache is not used for such a prompt; a preempted request records each position once."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import LLMEngine, StepOutput
from engine.request import InvalidRequestError, SamplingParams

PROMPT = [1, *range(40, 90, 3), *range(200, 230, 2), 7, 7, 7, 300, 5]  # 39 tokens: 3 chunks of 16 at most


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=tiny_llama_dir, dtype="float32", cache=CacheConfig(num_blocks=64),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=16)))


@pytest.fixture(scope="module")
def hf(tiny_llama_dir: str) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(hf: Any) -> torch.Tensor:
    return full_forward(hf, PROMPT)


def full_forward(hf: Any, prompt: list[int]) -> torch.Tensor:
    """[len(prompt), vocab] float32 log_softmax of transformers' forward over the whole prompt."""
    with torch.inference_mode():
        return hf(torch.tensor([prompt])).logits[0].float().log_softmax(dim=-1)


def run(engine: LLMEngine, reqs: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, dict[str, Any]]:
    """Every request to its end: its tokens, and the prompt logprobs of each output that carried some."""
    free0 = engine.load().kv_blocks_free
    for rid, (prompt, params) in reqs.items():
        engine.add_request(rid, prompt, params)
    out: dict[str, dict[str, Any]] = {rid: {"tokens": [], "prompt": [], "outputs": 0} for rid in reqs}
    while engine.has_unfinished():
        for so in engine.step():
            record(out[so.request_id], so)
    assert engine.load().kv_blocks_free == free0, "blocks leaked"
    return out


def record(into: dict[str, Any], so: StepOutput) -> None:
    if so.prompt_logprobs is not None:
        assert into["outputs"] == 0, "prompt logprobs come with the first output only"
        into["prompt"].append(so.prompt_logprobs)
    into["outputs"] += 1
    into["tokens"].extend(so.new_token_ids)


def check_against(ref: torch.Tensor, got: list, k: int, prompt: list[int] = PROMPT) -> None:
    """got[0] is None; got[i] scores prompt[i] from the logits at position i - 1 (the reference's row i - 1)."""
    assert len(got) == len(prompt) and got[0] is None
    for i, (logprob, rank, top) in enumerate(got[1:], start=1):
        row = ref[i - 1]
        assert logprob == pytest.approx(float(row[prompt[i]]), abs=1e-4)
        assert rank == int((row >= row[prompt[i]]).sum())  # vLLM's rank: 1 + tokens more likely
        ref_v, ref_i = row.topk(k)
        assert [t for t, _ in top] == ref_i.tolist() or k == 0
        assert [v for _, v in top] == pytest.approx(ref_v.tolist(), abs=1e-4)


def test_prompt_logprobs_equal_transformers_through_chunked_prefill(engine: LLMEngine, reference: torch.Tensor) -> None:
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    asked = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=5, logprobs=2)
    out = run(engine, {"plain": (PROMPT, greedy), "asked": (PROMPT, asked)})
    assert out["plain"]["prompt"] == [] and len(out["asked"]["prompt"]) == 1
    check_against(reference, out["asked"]["prompt"][0], 5)
    assert out["asked"]["tokens"] == out["plain"]["tokens"]  # asking changes nothing of what is generated
    ranks = [r for _, r, _ in out["asked"]["prompt"][0][1:]]
    assert min(ranks) >= 1 and max(ranks) > 5  # random weights: some prompt tokens are far down the list


def test_zero_alternatives_and_a_one_token_prompt(engine: LLMEngine, reference: torch.Tensor) -> None:
    out = run(engine, {"zero": (PROMPT, SamplingParams(max_tokens=2, prompt_logprobs=0)),
                       "one": ([PROMPT[0]], SamplingParams(max_tokens=2, prompt_logprobs=3))})
    check_against(reference, out["zero"]["prompt"][0], 0)
    assert all(top == [] for _, _, top in out["zero"]["prompt"][0][1:])
    assert out["one"]["prompt"] == [[None]]


def test_the_prefix_cache_is_not_used_for_such_a_prompt(engine: LLMEngine, reference: torch.Tensor) -> None:
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    run(engine, {"warm": (PROMPT, params)})  # its full blocks are now cached
    before = engine.load()
    hit = run(engine, {"hit": (PROMPT, params)})
    assert engine.load().prefix_hit_tokens > before.prefix_hit_tokens  # a plain request uses the cache
    computed = engine.stats.prompt_tokens
    hits = engine.load().prefix_hit_tokens
    out = run(engine, {"asked": (PROMPT, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                                                        prompt_logprobs=2))})
    assert engine.load().prefix_hit_tokens == hits and engine.stats.prompt_tokens - computed == len(PROMPT)
    check_against(reference, out["asked"]["prompt"][0], 2)
    assert out["asked"]["tokens"] == hit["hit"]["tokens"]


def test_a_sibling_asking_for_them_computes_its_prompt_instead_of_forking(engine: LLMEngine,
                                                                          reference: torch.Tensor) -> None:
    first = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=2)
    sibling = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=2, fork_from="first")
    forked = engine._scheduler.forks.forked  # white-box: the fork counter (engine/fork.py)
    out = run(engine, {"first": (PROMPT, first), "sibling": (PROMPT, sibling)})
    assert engine._scheduler.forks.forked == forked
    for rid in ("first", "sibling"):
        check_against(reference, out[rid]["prompt"][0], 2)
    assert out["sibling"]["tokens"] == out["first"]["tokens"]


def test_a_request_preempted_mid_prompt_records_each_position_once(tiny_llama_dir: str, hf: Any) -> None:
    """Five blocks: `a` (3 blocks of prompt) needs its 4th while `b` is in its prompt's second block, so `b` is
    preempted there and computes its prompt again; its records are those of one pass."""
    small = LLMEngine(EngineConfig(model=tiny_llama_dir, dtype="float32", cache=CacheConfig(num_blocks=5),
                                   scheduler=SchedulerConfig(max_num_batched_tokens=8)))
    a, b = [*PROMPT, *range(100, 109)], list(range(310, 340))
    pa = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, prompt_logprobs=1)
    pb = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=3)
    out = run(small, {"a": (a, pa), "b": (b, pb)})
    assert small.stats.preemptions > 0
    check_against(full_forward(hf, a), out["a"]["prompt"][0], 1, a)
    check_against(full_forward(hf, b), out["b"]["prompt"][0], 3, b)
    assert out["b"]["tokens"] == run(small, {"b2": (b, pb)})["b2"]["tokens"]


def test_with_overlapped_steps_the_chunks_run_beside_the_guess(tiny_llama_dir: str, reference: torch.Tensor) -> None:
    """A decoding request keeps the engine guessing ahead; the prompt's chunks then run beside the taken guess
    (engine/lookahead.py SplitStep) and their prompt logprobs are the same."""
    eng = LLMEngine(EngineConfig(model=tiny_llama_dir, dtype="float32", overlap_steps=True,
                                 cache=CacheConfig(num_blocks=64), scheduler=SchedulerConfig(max_num_batched_tokens=16)))
    eng.add_request("decoding", [3, 4, 5], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    for _ in range(3):
        eng.step()
    eng.add_request("asked", PROMPT, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=4))
    out: dict[str, Any] = {"tokens": [], "prompt": [], "outputs": 0}
    while eng.has_unfinished():
        for so in eng.step():
            if so.request_id == "asked":
                record(out, so)
    assert eng.stats.overlap_steps_split > 0 and eng.load().kv_blocks_free == eng.num_kv_blocks
    check_against(reference, out["prompt"][0], 4)


def test_prompt_logprobs_are_checked() -> None:
    with pytest.raises(InvalidRequestError, match="prompt_logprobs must be in"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(InvalidRequestError, match="prompt_logprobs must be in"):
        SamplingParams(prompt_logprobs=-1)
