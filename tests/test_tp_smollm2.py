"""The real SmolLM2-135M (9 heads, 3 KV heads, the packaged Q4_1 GGUF dequantized to float32) over 3 ranks:
greedy tokens equal the one-rank engine's, KV moves between a 3-rank and a 1-rank engine by the head plan (both
ways: what a prefill TP=3 -> decode TP=1 cluster and the reverse move), and each rank holds a third of the weights
(the resident memory per rank is printed with -s; benchmarks/RESULTS.md records it). Slow tier: three processes
load the model on a small machine."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import LLMEngine
from engine.loader import resolve_source
from engine.parallel.rank import resident_memory
from engine.request import SamplingParams
from engine.tokenizer import Tokenizer
from tests.test_tp_engine import move_kv

pytestmark = pytest.mark.slow

TEXTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,",
         "Water boils at a temperature of 100 degrees Celsius at sea level. " * 6]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def make(tp: int) -> LLMEngine:
    return LLMEngine(EngineConfig(model="smollm2", tensor_parallel_size=tp, cache=CacheConfig(num_blocks=96),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=64)))


@pytest.fixture(scope="module")
def engines() -> tuple[LLMEngine, LLMEngine]:
    one, three = make(1), make(3)
    yield one, three
    three.close()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tok = Tokenizer.from_model_path(resolve_source("smollm2", "auto")[1])
    return [tok.encode(t) for t in TEXTS]


def run(eng: LLMEngine, prompts: list[list[int]], tag: str) -> list[list[int]]:
    out: dict[str, list[int]] = {f"{tag}{i}": [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        eng.add_request(f"{tag}{i}", p, GREEDY)
    while eng.has_unfinished():
        for so in eng.step():
            out[so.request_id] += so.new_token_ids
    return list(out.values())


def test_three_ranks_equal_one_token_for_token(engines: tuple[LLMEngine, LLMEngine], prompts: list[list[int]]) -> None:
    one, three = engines
    assert len(prompts[3]) > 64, "one prompt is chunked"
    assert [r[0] for r in three.kv_layout().heads] == [0, 1, 2]
    assert run(three, prompts, "tp3") == run(one, prompts, "tp1")


def test_kv_moves_between_three_ranks_and_one(engines: tuple[LLMEngine, LLMEngine]) -> None:
    one, three = engines
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    one.add_request("local", list(range(3, 67)), params)
    local: list[int] = []
    while one.has_unfinished():
        for so in one.step():
            local += so.new_token_ids
    # move_kv prefills tests.test_tp_engine.PROMPTS[3] = range(3, 67)
    assert move_kv(three, one) == local, "prefill TP=3 -> decode TP=1"
    assert move_kv(one, three) == local, "prefill TP=1 -> decode TP=3"


def test_each_rank_holds_a_third_of_the_weights(engines: tuple[LLMEngine, LLMEngine]) -> None:
    """Parameters per rank are a third of the model's; resident memory per rank is that of a one-rank process less
    two thirds of the weights (the rest, imports and loader residue, is the same in both)."""
    one, three = engines
    full = one._runner.shard.param_bytes
    per_rank = [three._runner.shard.param_bytes] + [r["param_bytes"] for r in three._runner.ranks.ready]
    assert all(0.32 < b / full < 0.36 for b in per_rank), (per_rank, full)  # a third, plus replicated norms
    mem = three.run_on_ranks(resident_memory)[1:]  # rank 0 is this test process
    load_one_rank = ("import ctypes, torch; from engine.config import EngineConfig; from engine.model_shard import "
                     "load_model; from engine.parallel.rank import resident_memory as m; "
                     "x = load_model(EngineConfig(), torch.device('cpu')); ctypes.CDLL('libc.so.6').malloc_trim(0); "
                     "print(m()['RssAnon'])")
    whole = subprocess.run([sys.executable, "-c", load_one_rank], capture_output=True, text=True, check=True)
    one_rank, kv = int(whole.stdout), three.kv_cache.numel() * three.kv_cache.element_size()
    print(f"\nSmolLM2 float32 weights {full >> 20} MiB, TP=3 parameters per rank "
          f"{[b >> 20 for b in per_rank]} MiB; RssAnon: a one-rank process after loading {one_rank >> 20} MiB, "
          f"ranks 1-2 of TP=3 {[m['RssAnon'] >> 20 for m in mem]} MiB (VmRSS {[m['VmRSS'] >> 20 for m in mem]}), "
          f"of which KV shard {kv >> 20} MiB")
    for m in mem:
        saved = one_rank - (m["RssAnon"] - kv)
        assert 0.6 < saved / full < 0.75, f"a rank should hold a third of the weights; it saves {saved / full:.2f}"
