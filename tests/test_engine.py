"""Engine behaviour beyond HF parity: seeds, stop conditions, aborts, bad input, block accounting."""

from __future__ import annotations

import random

import pytest

from engine.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig
from engine.engine import LLMEngine
from engine.loader import WeightLoadError
from engine.request import InvalidRequestError, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=tiny_llama_dir, cache=CacheConfig(num_blocks=64),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=64)))


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


def test_seeded_sampling_independent_of_batch(engine: LLMEngine) -> None:
    p = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run(engine, {"a": ([5, 6, 7, 8], p)})["a"]
    others = {f"o{i}": (list(range(10 + i, 40 + 3 * i)), SamplingParams(max_tokens=30, temperature=0.8,
                                                                        ignore_eos=True)) for i in range(5)}
    crowded = run(engine, {**others, "a": ([5, 6, 7, 8], p)})["a"]
    assert alone == crowded
    other_seed = run(engine, {"b": ([5, 6, 7, 8], SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9,
                                                                  seed=99, ignore_eos=True))})["b"]
    assert other_seed != alone


def test_stop_token_and_max_tokens(engine: LLMEngine) -> None:
    greedy = run(engine, {"g": ([3, 4, 5], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))})["g"]
    assert len(greedy) == 12
    stop_at = greedy[5]
    first = greedy.index(stop_at)
    out = run(engine, {"s": ([3, 4, 5], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                        stop_token_ids=(stop_at,)))})["s"]
    assert out == greedy[: first + 1]


def test_abort_frees_blocks(engine: LLMEngine) -> None:
    free0 = engine.load().kv_blocks_free
    engine.add_request("x", [9] * 100, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.load().kv_blocks_free < free0
    assert engine.abort("x")
    assert not engine.abort("x")
    assert engine.load().kv_blocks_free == free0 and not engine.has_unfinished()


@pytest.mark.parametrize("prompt, params, match", [
    ([], SamplingParams(), "prompt is empty"),
    ([7] * 1000, SamplingParams(max_tokens=100), "maximum context length is 1024"),
    ([1, 2, 99999], SamplingParams(), "outside the vocabulary"),
])
def test_bad_requests(engine: LLMEngine, prompt: list[int], params: SamplingParams, match: str) -> None:
    free0 = engine.load().kv_blocks_free
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request("bad", prompt, params)
    assert engine.load().kv_blocks_free == free0 and not engine.has_unfinished()


def test_request_that_can_never_fit(tiny_llama_dir: str) -> None:
    small = LLMEngine(EngineConfig(model=tiny_llama_dir, cache=CacheConfig(num_blocks=4)))
    with pytest.raises(InvalidRequestError, match="needs 5 KV blocks but the cache only has 4"):
        small.add_request("big", list(range(60)), SamplingParams(max_tokens=10))


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(best_of=3), "unknown sampling option.*best_of"),
])
def test_bad_sampling_params(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams.from_kwargs(**kwargs)


def test_missing_and_corrupt_weights(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(WeightLoadError, match="nope"):
        LLMEngine(EngineConfig(model=str(tmp_path / "nope")))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(WeightLoadError, match="bad.gguf"):
        LLMEngine(EngineConfig(model=str(bad)))


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        EngineConfig.from_dict({"modle": "x"})
    with pytest.raises(ConfigError, match="block_size"):
        EngineConfig.from_dict({"cache": {"block_size": 10}})


def test_observed_step_shapes(engine: LLMEngine) -> None:
    # What benchmarks/step_replay.py holds against the cost model: prompt chunks with their attention pairs, decode
    # rows with the context they attend over.
    from engine.stats import StepShape

    shapes: list[StepShape] = []
    engine.observe_steps(shapes.append)
    try:
        rng = random.Random(7)  # prompts no earlier test cached (a prefix-cache hit makes a shorter chunk)
        engine.add_request("a", [rng.randrange(3, 384) for _ in range(40)], SamplingParams(max_tokens=3,
                                                                                           temperature=0.0))
        engine.step()
        engine.step()
        engine.add_request("b", [rng.randrange(3, 384) for _ in range(30)], SamplingParams(max_tokens=1,
                                                                                           temperature=0.0))
        engine.step()
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.observe_steps(None)
    assert shapes[:3] == [StepShape(40, 40 * 41 / 2, 0, 0.0, 1), StepShape(0, 0.0, 1, 40.0, 0),
                          StepShape(30, 30 * 31 / 2, 1, 41.0, 1)]
    assert len(shapes) == 3
