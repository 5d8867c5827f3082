"""The engine's remote-KV API (engine/remote_kv.py): receipts, quarantine, leases and their deadlines.

One engine plays both roles: a prompt prefilled under a lease is the "prefill worker"; another request of the
same engine receives that KV by copying the leased blocks into its reservation, as a pull would.
"""

from __future__ import annotations

import time

import pytest

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import LLMEngine
from engine.request import SamplingParams

PROMPT = list(range(30, 67))  # 37 tokens: 2 full blocks of 16 + 5
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def make(folder: str, num_blocks: int = 40) -> LLMEngine:
    return LLMEngine(EngineConfig(model=folder, cache=CacheConfig(num_blocks=num_blocks, enable_prefix_caching=False),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=64)))


def run(eng: LLMEngine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for so in eng.step():
            out.setdefault(so.request_id, []).extend(so.new_token_ids)
    return out


def prefill_leased(eng: LLMEngine, rid: str = "src") -> tuple[list[int], tuple[int, ...]]:
    """Prefill PROMPT under a lease; its first token and leased blocks."""
    eng.add_request(rid, PROMPT, GREEDY, lease_s=60.0)
    first = run(eng)[rid]
    lease = eng.lease(rid)
    assert lease is not None and len(first) == 1 and lease.num_tokens == len(PROMPT)
    return first, lease.block_ids


def copy_blocks(eng: LLMEngine, src: tuple[int, ...], dst: tuple[int, ...]) -> None:
    for s, d in zip(src, dst, strict=True):
        eng.kv_cache[d].copy_(eng.kv_cache[s])


@pytest.fixture(scope="module")
def local_output(tiny_llama_dir: str) -> list[int]:
    eng = make(tiny_llama_dir)
    eng.add_request("local", PROMPT, GREEDY)
    return run(eng)["local"]


def test_received_kv_continues_exactly_as_a_local_prefill(tiny_llama_dir: str, local_output: list[int]) -> None:
    eng = make(tiny_llama_dir)
    total = eng.load().kv_blocks_free
    first, blocks = prefill_leased(eng)
    assert eng.load().leased_requests == 1 and eng.load().kv_blocks_free == total - len(blocks)
    res = eng.receive_kv(eng.make_request("d", PROMPT, GREEDY, output_token_ids=first), len(PROMPT), timeout_s=30)
    assert res is not None and res.num_cached_blocks == 0 and len(res.blocks_to_fill) == len(blocks)
    assert eng.load().num_receiving_kv == 1 and not eng.has_unfinished()  # receiving never stalls a step
    copy_blocks(eng, blocks, res.blocks_to_fill)
    assert eng.release_lease("src") and not eng.release_lease("src")  # freed exactly once
    eng.kv_received("d", layers=[0])
    assert not eng.has_unfinished(), "a request joins only when every layer has arrived"
    eng.kv_received("d", layers=range(1, eng.model_config.num_layers))
    assert first + run(eng)["d"] == local_output
    load = eng.load()
    assert load.kv_blocks_free == total and load.num_receiving_kv == 0 and eng.stats.recomputes == 0


def test_abort_while_receiving_quarantines_blocks_until_the_transfer_ends(tiny_llama_dir: str) -> None:
    eng = make(tiny_llama_dir)
    total = eng.load().kv_blocks_free
    res = eng.receive_kv(eng.make_request("d", PROMPT, GREEDY, output_token_ids=[5]), len(PROMPT), timeout_s=30)
    assert res is not None
    assert eng.abort("d") and eng.num_requests == 0
    load = eng.load()
    assert load.kv_blocks_quarantined == len(res.block_ids) and load.kv_blocks_free == total - len(res.block_ids)
    eng.add_request("other", PROMPT, GREEDY)  # the quarantined blocks cannot be handed to it
    assert not set(res.block_ids) & set(eng._kv.block_table("other"))
    eng.kv_failed("d")  # the transfer has stopped: only now are they free
    run(eng)
    assert eng.load().kv_blocks_quarantined == 0 and eng.load().kv_blocks_free == total


def test_deadline_recomputes_on_fresh_blocks_and_a_late_report_frees_the_old(tiny_llama_dir: str,
                                                                               local_output: list[int]) -> None:
    eng = make(tiny_llama_dir)
    total = eng.load().kv_blocks_free
    first = local_output[:1]
    res = eng.receive_kv(eng.make_request("d", PROMPT, GREEDY, output_token_ids=first), len(PROMPT), timeout_s=0.05)
    assert res is not None
    time.sleep(0.1)
    eng.check_deadlines()  # what an idle worker's loop (and every step) does: the prompt is recomputed here
    out = run(eng)["d"]
    assert first + out == local_output
    assert eng.stats.remote_kv_timeouts == 1 and eng.stats.recomputes == 1
    assert eng.load().kv_blocks_quarantined == len(res.block_ids)  # the transfer may still write those
    eng.kv_received("d")  # it ends late: its blocks are freed, nothing else happens
    assert eng.load().kv_blocks_quarantined == 0 and eng.load().kv_blocks_free == total and not eng.has_unfinished()


def test_failed_receipt_recomputes_and_no_blocks_means_none(tiny_llama_dir: str, local_output: list[int]) -> None:
    eng = make(tiny_llama_dir, num_blocks=4)  # PROMPT + 6 tokens need 3 blocks
    total = eng.load().kv_blocks_free
    first = local_output[:1]
    res = eng.receive_kv(eng.make_request("d", PROMPT, GREEDY, output_token_ids=first), len(PROMPT), timeout_s=30)
    assert res is not None
    second = eng.make_request("e", PROMPT, GREEDY, output_token_ids=first)
    assert eng.receive_kv(second, len(PROMPT), timeout_s=30) is None  # 1 block left: nothing is held for it
    assert eng.load().kv_blocks_free == total - len(res.block_ids) and eng.num_requests == 1
    eng.kv_failed("d")
    assert first + run(eng)["d"] == local_output and eng.stats.recomputes == 1
    assert eng.load().kv_blocks_free == total


def test_lease_expires_and_abort_releases_a_lease(tiny_llama_dir: str) -> None:
    eng = make(tiny_llama_dir)
    total = eng.load().kv_blocks_free
    eng.add_request("a", PROMPT, GREEDY, lease_s=0.05)
    eng.add_request("b", PROMPT, GREEDY, lease_s=60)
    out = run(eng)
    assert len(out["a"]) == len(out["b"]) == 1 and eng.load().leased_requests == 2
    time.sleep(0.1)
    eng.check_deadlines()
    assert eng.lease("a") is None and eng.stats.leases_expired == 1 and eng.load().leased_requests == 1
    assert eng.abort("b") and eng.lease("b") is None and eng.load().kv_blocks_free == total


def test_a_first_token_that_stops_the_request_leases_nothing(tiny_llama_dir: str, local_output: list[int]) -> None:
    eng = make(tiny_llama_dir)
    stop = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, stop_token_ids=(local_output[0],))
    eng.add_request("s", PROMPT, stop, lease_s=60)
    eng.add_request("one", PROMPT, SamplingParams(max_tokens=1, temperature=0), lease_s=60)
    finish = {}
    while eng.has_unfinished():
        finish |= {so.request_id: so.finish_reason for so in eng.step() if so.finished}
    assert finish == {"s": "stop", "one": "length"}  # the shared stop rule, as a decode worker would apply it
    assert eng.lease("s") is None and eng.lease("one") is None and eng.load().leased_requests == 0


def test_progress_reports_each_layer_as_chunks_run_then_the_first_token(tiny_llama_dir: str) -> None:
    """Layer-wise streaming reads `kv_progress`: the whole prompt's blocks from admission on, per layer the tokens
    written after each chunk, and at the end the first token with every layer complete."""
    eng = LLMEngine(EngineConfig(model=tiny_llama_dir, cache=CacheConfig(num_blocks=40),
                                 scheduler=SchedulerConfig(max_num_batched_tokens=16)))
    assert eng.kv_progress("p") is None
    eng.add_request("p", PROMPT, GREEDY, lease_s=60.0)
    seen = []
    while eng.has_unfinished():
        eng.step()
        prog = eng.kv_progress("p")
        assert prog is not None and len(prog.block_ids) == 3 and prog.num_tokens == len(PROMPT)
        seen.append((prog.layer_tokens, prog.first_token))
    layers = eng.model_config.num_layers
    assert [s[0] for s in seen] == [(16,) * layers, (32,) * layers, (37,) * layers]  # 37 tokens in chunks of 16
    assert seen[-1][1] == eng.lease("p").first_token and seen[0][1] is None
    assert eng.release_lease("p") and eng.kv_progress("p") is None
