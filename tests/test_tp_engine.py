"""Tensor parallelism end to end on the CPU: real rank processes talking through gloo.

- a small random Llama (8 heads, 2 KV heads) at 2 and 4 ranks (KV heads replicated at 4) gives the one-rank
  engine's greedy tokens under chunked prefill, overlapped steps, prefix caching and self-speculation;
- KV moves between engines of different sizes by the head plan (prefill 2 ranks -> decode 1, and 1 -> 2) and the
  decode side continues exactly as a local prefill;
- kill -9 of a rank fails the engine's step at once (no hang), takes the other ranks down, frees nothing twice and
  turns the worker's requests into errors; a killed rank 0 takes its ranks with it.
The real SmolLM2 at 3 ranks is in tests/test_tp_smollm2.py (slow tier).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig, SpeculativeConfig
from engine.engine import LLMEngine
from engine.parallel.group import RankFailedError
from engine.parallel.kv_heads import read_blocks, regroup, write_blocks
from engine.request import SamplingParams
from tests.hf_reference import compare_greedy

pytestmark = pytest.mark.slow  # real rank processes (gloo): not in the fast tier

PROMPTS = [list(range(3, 3 + n)) for n in (5, 17, 40, 64)]
GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=2)


def make(folder: str, tp: int, **kw) -> LLMEngine:  # noqa: ANN003
    kw.setdefault("cache", CacheConfig(num_blocks=64))
    kw.setdefault("scheduler", SchedulerConfig(max_num_batched_tokens=48))  # the longer prompts are chunked
    return LLMEngine(EngineConfig(model=folder, tensor_parallel_size=tp, **kw))


def generate(eng: LLMEngine, prompts: list[list[int]], params: SamplingParams = GREEDY, tag: str = ""
             ) -> tuple[list[list[int]], list[list]]:
    """Tokens and logprob entries (chosen logprob, top alternatives) per prompt."""
    toks: dict[str, list[int]] = {f"{tag}{i}": [] for i in range(len(prompts))}
    lps: dict[str, list] = {k: [] for k in toks}
    for i, p in enumerate(prompts):
        eng.add_request(f"{tag}{i}", p, params)
    while eng.has_unfinished():
        for so in eng.step():
            toks[so.request_id] += so.new_token_ids
            lps[so.request_id] += so.new_logprobs
    return list(toks.values()), list(lps.values())


@pytest.fixture(scope="module")
def one_rank(tiny_llama_dir: str) -> tuple[list[list[int]], list[list[float]]]:
    eng = make(tiny_llama_dir, 1)
    return generate(eng, PROMPTS)


@pytest.mark.parametrize("tp", [2, 4])
def test_small_llama_equals_one_rank(tiny_llama_dir: str, one_rank: tuple, tp: int) -> None:
    ref_toks, ref_lps = one_rank
    eng = make(tiny_llama_dir, tp, overlap_steps=True)  # steps launched ahead broadcast their device token ids
    try:
        assert eng.kv_layout().tp_size == tp and eng.kv_cache.shape[4] == 1, "one KV head per rank"
        free = eng.load().kv_blocks_free
        toks, lps = generate(eng, PROMPTS)
        assert toks == ref_toks
        assert max(abs(a[0] - b[0]) for x, y in zip(lps, ref_lps, strict=True) for a, b in zip(x, y, strict=True)) < 1e-4
        assert eng.stats.overlap_steps_used > 0
        hits = eng.load().prefix_hit_tokens
        assert generate(eng, PROMPTS, tag="again")[0] == ref_toks and eng.load().prefix_hit_tokens > hits
        eng.set_speculative(SpeculativeConfig(method="self", num_speculative_tokens=3, self_draft_layers=1))
        assert generate(eng, PROMPTS, tag="spec")[0] == ref_toks and eng.stats.spec_proposed_tokens > 0
        assert eng.load().kv_blocks_free == free
    finally:
        eng.close()


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "qwen2_moe"])
def test_families_at_two_ranks_equal_one(family: str, tmp_path: Path) -> None:
    """QK-norm and a head_dim apart from hidden/heads (qwen3); soft-caps, scaled embeddings and (1 + w) norms
    (gemma2); experts, a shared expert reduced together with them, and q/k/v biases (qwen2_moe)."""
    from tests.test_models_families import build_hf

    build_hf(family, tmp_path)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
    ref, ref_lp = generate(make(str(tmp_path), 1), PROMPTS, params)
    eng = make(str(tmp_path), 2)
    try:
        ours, ours_lp = generate(eng, PROMPTS, params)
    finally:
        eng.close()
    assert compare_greedy(ours, ours_lp, ref, [[top for _, top in row] for row in ref_lp]) <= 1, "one near-tie at most"


def test_block_copies_reach_every_rank(tiny_llama_dir: str) -> None:
    eng = make(tiny_llama_dir, 2)
    try:
        generate(eng, PROMPTS[:1])
        eng._runner.copy_blocks([(0, 9)])  # what an n > 1 fork does with a prompt's last block
        for shard in eng.run_on_ranks(read_blocks, [0, 9]):
            assert shard[0].abs().sum() > 0 and (shard[0] == shard[1]).all()
    finally:
        eng.close()


def move_kv(src: LLMEngine, dst: LLMEngine) -> list[int]:
    """Prefill PROMPTS[3] on `src` under a lease, pull its KV into `dst` rank by rank through the head plan, decode
    there; returns the whole output."""
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    src.add_request("p", PROMPTS[3], params, lease_s=60)
    first: list[int] = []
    while src.has_unfinished():
        for so in src.step():
            first += so.new_token_ids
    lease = src.lease("p")
    assert lease is not None and len(first) == 1
    res = dst.receive_kv(dst.make_request("d", PROMPTS[3], params, output_token_ids=first), len(PROMPTS[3]), 30)
    assert res is not None
    blocks = src.run_on_ranks(read_blocks, lease.block_ids[res.num_cached_blocks :])
    dst.run_on_ranks(write_blocks, res.blocks_to_fill, regroup(src.kv_layout(), dst.kv_layout(), blocks))
    assert src.release_lease("p")
    dst.kv_received("d")
    out: list[int] = []
    while dst.has_unfinished():
        for so in dst.step():
            out += so.new_token_ids
    return first + out


def test_kv_moves_between_engines_of_different_sizes(tiny_llama_dir: str) -> None:
    one, two = make(tiny_llama_dir, 1), make(tiny_llama_dir, 2)
    try:
        local = generate(one, [PROMPTS[3]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0][0]
        assert move_kv(two, one) == local, "prefill 2 ranks -> decode 1"
        assert move_kv(one, two) == local, "prefill 1 rank -> decode 2"
        assert one.load().kv_blocks_free == two.load().kv_blocks_free == 64
    finally:
        two.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited (its parent has not reaped it yet)
    except (FileNotFoundError, ProcessLookupError):  # reaped between the signal and the read
        return False


def wait_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"rank processes still alive: {[p for p in pids if alive(p)]}"
        time.sleep(0.1)


def test_kill_9_of_a_rank_fails_the_step_and_ends_the_other_ranks(tiny_llama_dir: str) -> None:
    eng = make(tiny_llama_dir, 4, parallel=ParallelConfig(collective_timeout_s=30))
    pids = eng._runner.ranks.pids
    try:
        for i, p in enumerate(PROMPTS):
            eng.add_request(str(i), p, GREEDY)
        eng.step()
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RankFailedError, match="rank 2"):
            for _ in range(100):
                eng.step()
        assert time.monotonic() - t0 < 10, "a dead rank must fail the step long before the collective timeout"
        wait_gone(pids, 15)
        with pytest.raises(RankFailedError):
            eng.check_deadlines()  # what an idle worker's loop calls: it goes unhealthy
    finally:
        eng.close()


def test_a_dead_rank_makes_the_worker_unhealthy_and_ends_its_requests(tiny_llama_dir: str) -> None:
    from worker.async_engine import AsyncEngine

    eng = make(tiny_llama_dir, 2)

    async def scenario() -> tuple[str | None, bool]:
        aengine = AsyncEngine(eng)
        await aengine.start()
        q = aengine.add_request("r", PROMPTS[1], SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
        await asyncio.wait_for(q.get(), 60)  # running
        os.kill(eng._runner.ranks.pids[0], signal.SIGKILL)
        out = await asyncio.wait_for(q.get(), 30)
        while not out.finished:
            out = await asyncio.wait_for(q.get(), 30)
        healthy = aengine.healthy
        await aengine.stop()
        return out.finish_reason, healthy

    try:
        assert asyncio.run(scenario()) == ("error", False)
    finally:
        eng.close()


def test_killing_rank_0_ends_the_other_ranks(tiny_llama_dir: str) -> None:
    script = ("import sys, time\nfrom engine.config import EngineConfig\nfrom engine.engine import LLMEngine\n"
              f"eng = LLMEngine(EngineConfig(model={tiny_llama_dir!r}, tensor_parallel_size=2))\n"
              "print(*eng._runner.ranks.pids, flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        pids = [int(p) for p in line.split()]
        assert len(pids) == 1 and alive(pids[0]), line
        proc.kill()
        wait_gone(pids, 10)
    finally:
        proc.kill()
        proc.wait()
