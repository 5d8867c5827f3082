"""Overlapped steps (engine/lookahead.py): queueing a guess of the next decode step before reading this one's
tokens changes nothing the engine outputs, whatever the schedule does meanwhile, and leaks no block."""

from __future__ import annotations

import math

import pytest

from engine.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig
from engine.engine import LLMEngine
from engine.request import SamplingParams

SCENARIOS = {
    "room for all": dict(cache=CacheConfig(num_blocks=128), scheduler=SchedulerConfig()),
    # requests join as others finish; prompts are prefilled in chunks beside decoding requests
    "joins and chunks": dict(cache=CacheConfig(num_blocks=128),
                             scheduler=SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=24)),
    "preemption": dict(cache=CacheConfig(num_blocks=9), scheduler=SchedulerConfig()),
    "prefix caching": dict(cache=CacheConfig(num_blocks=128, enable_prefix_caching=True), scheduler=SchedulerConfig()),
}


def workload() -> dict[str, tuple[list[int], SamplingParams]]:
    shared = list(range(40, 76))  # a 36-token prefix for the prefix-cache scenario
    return {
        "greedy": ([3, 4, 5, 6], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)),
        "short": ([7, 8], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)),
        "seeded": ([9, 10, 11], SamplingParams(max_tokens=18, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)),
        "logprobs": ([12, 13, 14, 15, 16], SamplingParams(max_tokens=12, temperature=0, logprobs=3, ignore_eos=True)),
        "stops": (shared + [1], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=(5, 9))),
        "shared": (shared + [2], SamplingParams(max_tokens=15, temperature=0, ignore_eos=True)),
        "one": ([20, 21, 22], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)),
    }


def run(engine: LLMEngine, reqs: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple]:
    free0 = engine.load().kv_blocks_free
    for rid, (prompt, params) in reqs.items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in reqs}
    logprobs: dict[str, list[float]] = {rid: [] for rid in reqs}
    reasons: dict[str, str | None] = {}
    while engine.has_unfinished():
        for so in engine.step():
            tokens[so.request_id].extend(so.new_token_ids)
            logprobs[so.request_id].extend(lp for lp, _ in so.new_logprobs)
            if so.finished:
                reasons[so.request_id] = so.finish_reason
    assert engine.load().kv_blocks_free == free0, "blocks leaked"
    return {rid: (tokens[rid], logprobs[rid], reasons[rid]) for rid in reqs}


def make(tiny_llama_dir: str, overlap: bool, **kw) -> LLMEngine:  # noqa: ANN003 - EngineConfig fields
    return LLMEngine(EngineConfig(model=tiny_llama_dir, overlap_steps=overlap, **kw))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_overlap_changes_no_output(tiny_llama_dir: str, name: str) -> None:
    plain = run(make(tiny_llama_dir, False, **SCENARIOS[name]), workload())
    eng = make(tiny_llama_dir, True, **SCENARIOS[name])
    overlapped = run(eng, workload())
    for rid, (tokens, lps, reason) in plain.items():
        o_tokens, o_lps, o_reason = overlapped[rid]
        assert o_tokens == tokens and o_reason == reason, rid
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(lps, o_lps, strict=True)), rid
    st = eng.stats
    assert st.overlap_steps_used > 0 and st.overlap_steps_queued >= st.overlap_steps_used
    if name == "preemption":
        assert st.preemptions > 0
    if name == "joins and chunks":
        assert st.overlap_steps_split > 0, "prompt chunks should have run beside a taken guess"
    assert eng._lookahead.queued is None or not eng.has_unfinished()


def test_guess_survives_a_stop_token(tiny_llama_dir: str) -> None:
    """A request that stops on a token sits in the queued guess; the rest of the guess is still taken."""
    probe = run(make(tiny_llama_dir, False), {"p": ([3, 4, 5], SamplingParams(max_tokens=12, temperature=0,
                                                                               ignore_eos=True))})["p"][0]
    stop = probe[4]
    reqs = {"stopper": ([3, 4, 5], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                  stop_token_ids=(stop,))),
            "runner": ([6, 7, 8], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))}
    plain = run(make(tiny_llama_dir, False), reqs)
    eng = make(tiny_llama_dir, True)
    assert run(eng, reqs) == plain
    assert plain["stopper"][0] == probe[: probe.index(stop) + 1] and plain["stopper"][2] == "stop"
    # every decode step after the first was taken from a guess, the stop included
    assert eng.stats.overlap_steps_queued - eng.stats.overlap_steps_used <= 1


def test_abort_while_a_guess_is_queued(tiny_llama_dir: str) -> None:
    eng = make(tiny_llama_dir, True)
    free0 = eng.load().kv_blocks_free
    p = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    eng.add_request("a", [3, 4, 5], p)
    eng.add_request("b", [6, 7, 8], p)
    for _ in range(4):
        eng.step()
    assert eng._lookahead.queued is not None
    assert eng.abort("a")
    rest = []
    while eng.has_unfinished():
        rest += [t for so in eng.step() for t in so.new_token_ids]
    assert eng.load().kv_blocks_free == free0
    alone = run(make(tiny_llama_dir, False), {"b": ([6, 7, 8], p)})["b"][0]
    assert rest == alone[len(alone) - len(rest):]


def test_no_guess_with_penalties(tiny_llama_dir: str) -> None:
    eng = make(tiny_llama_dir, True)
    reqs = {"pen": ([3, 4, 5], SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.3, ignore_eos=True)),
            "g": ([6, 7], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))}
    assert run(eng, reqs) == run(make(tiny_llama_dir, False), reqs)
    assert eng.stats.overlap_steps_queued == 0


def test_overlap_config() -> None:
    with pytest.raises(ConfigError, match="overlap_steps"):
        EngineConfig(overlap_steps="yes")  # type: ignore[arg-type]
    assert EngineConfig.from_dict({"overlap_steps": None}).overlap_steps is None


def joins(eng: LLMEngine) -> dict[str, list[int]]:
    """Two decoding requests; a prompt prefilled under a lease (prefill role) whose KV is then received by
    another request of the same engine (decode role: the lease's blocks copied into the reservation, as a pull
    would); a one-token prompt joins too. Every join has one token to compute."""
    free0 = eng.load().kv_blocks_free
    p = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    out: dict[str, list[int]] = {"a": [], "b": [], "src": [], "pulled": [], "tiny": []}
    eng.add_request("a", [3, 4, 5], p)
    eng.add_request("b", [6, 7, 8, 9], SamplingParams(max_tokens=14, temperature=0.8, seed=3, ignore_eos=True))
    prompt = list(range(30, 50))
    eng.add_request("src", prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), lease_s=60.0)

    def collect(results: list) -> None:  # noqa: ANN001 - StepOutput list
        for so in results:
            out[so.request_id].extend(so.new_token_ids)

    for _ in range(3):
        collect(eng.step())
    lease = eng.lease("src")
    assert lease is not None and out["src"]
    req = eng.make_request("pulled", prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                           output_token_ids=out["src"])
    res = eng.receive_kv(req, lease.num_tokens, timeout_s=60.0)
    assert res is not None
    for src, dst in zip(lease.block_ids[res.num_cached_blocks:], res.blocks_to_fill, strict=True):
        eng.kv_cache[dst].copy_(eng.kv_cache[src])
    assert eng.release_lease("src")
    eng.kv_received("pulled")
    out["pulled"] = list(out["src"])
    collect(eng.step())
    eng.add_request("tiny", [11], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    while eng.has_unfinished():
        collect(eng.step())
    assert eng.load().kv_blocks_free == free0, "blocks leaked"
    return out


def test_joining_requests_wait_one_step_in_the_next_guess(tiny_llama_dir: str) -> None:
    """A request joining with one known token does not waste the queued step: it is postponed into the next
    guess, and every output is still the synchronous engine's."""
    plain = joins(make(tiny_llama_dir, False))
    eng = make(tiny_llama_dir, True)
    assert joins(eng) == plain
    assert eng.stats.overlap_joins_delayed == 2
    assert len(plain["pulled"]) == 8 and len(plain["tiny"]) == 5


def test_fence_before_blocks_of_a_guessed_request_go_back(tiny_llama_dir: str, monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """The block rule of engine/lookahead.py: when a request in the queued guess ends (stop token, abort), the
    engine waits for the guess before handing control back; in steady decoding it never waits."""
    from engine.lookahead import QueuedStep

    fences: list[list[str]] = []
    monkeypatch.setattr(QueuedStep, "fence", lambda self: fences.append([r.request_id for r in self.requests]))
    eng = make(tiny_llama_dir, True)
    probe = run(make(tiny_llama_dir, False), {"p": ([3, 4, 5], SamplingParams(max_tokens=12, temperature=0,
                                                                               ignore_eos=True))})["p"][0]
    p = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    eng.add_request("stopper", [3, 4, 5], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                         stop_token_ids=(probe[6],)))
    eng.add_request("aborted", [6, 7, 8], p)
    eng.add_request("long", [9, 10], p)
    finished = []
    while "stopper" not in finished:
        finished += [so.request_id for so in eng.step() if so.finished]
    assert fences and "stopper" in fences[-1], "a stop inside the guess must fence"
    n = len(fences)
    for _ in range(3):
        eng.step()
    assert len(fences) == n, "no fence while every guessed request keeps running"
    assert eng._lookahead.queued is not None and eng.abort("aborted")
    assert len(fences) == n + 1 and "aborted" in fences[-1]
    while eng.has_unfinished():
        eng.step()


def test_guesses_go_on_while_the_queue_cannot_move(tiny_llama_dir: str) -> None:
    """A waiting request does not stop the guesses; once blocks free up it is admitted, its prompt launched
    beside the queued step, and every output is the synchronous engine's."""
    p = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    reqs = {"a": (list(range(3, 40)), p), "b": (list(range(40, 77)), p),
            "late": (list(range(80, 180)), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))}
    kw = dict(cache=CacheConfig(num_blocks=11, enable_prefix_caching=False), scheduler=SchedulerConfig())

    def go(eng: LLMEngine) -> tuple[dict, list[bool]]:
        for rid, (prompt, params) in reqs.items():
            eng.add_request(rid, prompt, params)
        out: dict[str, list[int]] = {rid: [] for rid in reqs}
        queued = []
        while eng.has_unfinished():
            for so in eng.step():
                out[so.request_id].extend(so.new_token_ids)
            queued.append(bool(eng._scheduler.waiting) and eng._lookahead.queued is not None)
        return out, queued

    plain, _ = go(make(tiny_llama_dir, False, **kw))
    eng = make(tiny_llama_dir, True, **kw)
    overlapped, queued = go(eng)
    assert overlapped == plain
    assert sum(queued) >= 5, "guesses should continue while 'late' waits for blocks"
    assert eng.load().kv_blocks_free == 11


def test_split_step_keeps_each_request_its_own_row() -> None:
    """A step taken from a guess with rows launched beside it: results and next-step input ids come back in
    the order of the schedule, whichever launch computed each request."""
    import torch

    from engine.lookahead import SplitStep
    from engine.model_runner import LaunchedStep
    from engine.sampler import DeviceSamples

    p = [SamplingParams(temperature=0)] * 3
    guess = LaunchedStep([0, 1, 2], DeviceSamples(torch.tensor([10, 11, 12]), p))
    side = LaunchedStep([None, 0], DeviceSamples(torch.tensor([20]), p[:1]))  # a chunk, then a prompt's last chunk
    # schedule: guess row 0, the chunk, guess row 2, the finished prompt, guess row 1
    step = SplitStep((guess.select([0, 2, 1]), side), [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)])
    assert [None if r is None else r[0].token_id for r in step.wait()] == [10, None, 12, 20, 11]
    assert step.input_ids_for([0, 2, 3, 4]).tolist() == [10, 12, 20, 11]
    assert step.input_ids_for([3, 0]).tolist() == [20, 10]
    assert step.input_ids_for([4, 2]).tolist() == [11, 12]


def test_a_prompt_arriving_mid_decode_runs_beside_the_guess(tiny_llama_dir: str) -> None:
    """Co-located serving: requests arriving while others decode are prefilled beside the queued step (taken,
    not dropped), and every output equals the synchronous engine's."""
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    kw = dict(scheduler=SchedulerConfig(max_num_batched_tokens=16))  # the 30-token prompt takes two chunks

    def go(eng: LLMEngine) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        eng.add_request("first", [3, 4, 5], p)
        for i, prompt in enumerate([[6, 7], list(range(8, 38)), [40, 41, 42]] * 2):
            for _ in range(2):
                for so in eng.step():
                    out.setdefault(so.request_id, []).extend(so.new_token_ids)
            eng.add_request(f"late{i}", prompt, p)
        while eng.has_unfinished():
            for so in eng.step():
                out.setdefault(so.request_id, []).extend(so.new_token_ids)
        return out

    plain = go(make(tiny_llama_dir, False, **kw))
    eng = make(tiny_llama_dir, True, **kw)
    assert go(eng) == plain and all(len(t) == 16 for t in plain.values())
    st = eng.stats
    assert st.overlap_steps_split >= 6 and st.overlap_steps_used == st.overlap_steps_queued, st  # no guess was wasted


def test_a_step_that_samples_nothing_still_waits_for_its_forward() -> None:
    """The block rule's premise: wait() returns after the step's own kernels, also for a step of prompt chunks
    that samples nothing (on CUDA an event after its forward), and select() keeps that wait."""
    from engine.model_runner import LaunchedStep

    class Event:
        waited = 0

        def synchronize(self) -> None:
            Event.waited += 1

    step = LaunchedStep([None, None], done=Event())  # type: ignore[arg-type]
    assert step.wait() == [None, None] and Event.waited == 1
    assert step.select([1]).wait() == [None] and Event.waited == 2


def test_a_prefill_role_prompt_queues_no_guess(tiny_llama_dir: str) -> None:
    """A request under a lease ends at its first token (the KV moves on): no decode pass may be queued after its
    prompt step, whatever its max_tokens (a prefill worker ran, then waited for, a wasted one after every prompt)."""
    eng = make(tiny_llama_dir, True, cache=CacheConfig(num_blocks=64))
    eng.add_request("lease", list(range(10, 40)), SamplingParams(max_tokens=128, temperature=0, ignore_eos=True),
                    lease_s=30.0)
    [out] = eng.step()
    assert out.finished and out.finish_reason == "handoff" and len(out.new_token_ids) == 1
    assert eng.stats.overlap_steps_queued == 0 and eng.lease("lease") is not None
    eng.add_request("plain", list(range(50, 60)), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    eng.step()
    assert eng.stats.overlap_steps_queued == 1  # a decoding request is still guessed
    eng.release_lease("lease")
