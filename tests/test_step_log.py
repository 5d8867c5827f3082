"""A worker's step log (worker/step_log.py, $DISAGG_STEP_LOG): one line per step that ran the model, with its shape
and time, for benchmarks/sim_validate.py; and the overlap of two workers' steps it computes from them."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from benchmarks.calibration import STREAM_PROMPT, co_run_probe
from benchmarks.step_costs import (
    brief_co_run,
    by_tokens,
    decode_beside_ms,
    join_steps,
    overlaps,
    prompt_beside_ms,
    pull_phases,
    serving_path,
)
from benchmarks.token_delivery import delivery
from engine.config import CacheConfig, EngineConfig
from engine.engine import LLMEngine
from engine.request import SamplingParams
from worker.step_log import STEP_LOG_ENV, StepLog, read_step_events, read_step_log


def test_a_worker_engine_logs_each_step_it_runs(tiny_llama_dir: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    engine = LLMEngine(EngineConfig(model=tiny_llama_dir, cache=CacheConfig(num_blocks=32)))
    assert StepLog.from_env(engine, "decode@1") is None  # off unless asked for
    monkeypatch.setenv(STEP_LOG_ENV, str(tmp_path / "steps"))
    log = StepLog.from_env(engine, "decode@1")
    assert log is not None
    engine.add_request("a", list(range(10, 30)), SamplingParams(max_tokens=3, temperature=0.0))
    while engine.has_unfinished():
        log.step()
    engine.add_request("b", list(range(40, 52)), SamplingParams(max_tokens=1, temperature=0.0))
    engine.add_request("c", list(range(60, 69)), SamplingParams(max_tokens=1, temperature=0.0))
    log.step()  # two prompts in one step
    log.step()  # nothing to run: no line
    log.note("pull_read", "a", nbytes=64)
    log.close()
    log.note("late", "a")  # after close (a pull ending as the worker stops): dropped, not an error
    rows = read_step_log(str(tmp_path / "steps" / "decode-1.jsonl"))
    assert [(r["prompt_tokens"], r["decode_rows"], r["decode_context"], r["prompts"]) for r in rows] == [
        (20, 0, 0, 1), (0, 1, 20, 0), (0, 1, 21, 0), (21, 0, 0, 2)]
    assert all(r["ms"] > 0 for r in rows) and rows[0]["t"] < rows[1]["t"] < rows[2]["t"] < rows[3]["t"]
    # where each step's time went: scheduled first, the stepping thread's CPU no more than the step's wall time
    # (plus the clocks' grain); the log's maker (this thread) was the stepping thread, so its CPU is the same
    for r in rows:
        assert 0 <= r["sched_ms"] <= r["ms"] and 0 < r["cpu_ms"] <= r["ms"] + 1.0
        assert r["launch_ms"] > 0 and r["wait_ms"] >= 0 and r["sched_ms"] + r["launch_ms"] + r["wait_ms"] <= r["ms"]
        assert r["loop_cpu_ms"] == pytest.approx(r["cpu_ms"], abs=1.0) and r["gc_ms"] >= 0
    [event] = read_step_events(str(tmp_path / "steps" / "decode-1.jsonl"))
    assert (event["event"], event["rid"], event["nbytes"]) == ("pull_read", "a", 64) and event["t"] >= rows[3]["t"]


def test_a_handoff_splits_into_relay_reserve_read_join_wait_and_the_step(tmp_path: Path) -> None:
    def write(name: str, rows: list[dict]) -> None:
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("prefill-0", [{"t": 9.9, "ms": 95.0, "prompt_tokens": 100, "pairs": 5050, "decode_rows": 0},
                        {"t": 10.0, "event": "prefill_answered", "rid": "a", "tokens": 100},
                        {"t": 20.0, "event": "prefill_answered", "rid": "b", "tokens": 100}])  # b: never pulled
    write("decode-0", [{"t": 9.95, "ms": 40.0, "prompt_tokens": 0, "pairs": 0, "decode_rows": 2},
                       {"t": 10.003, "event": "pull_received", "rid": "a", "tokens": 100},
                       {"t": 10.0, "ms": 40.0, "prompt_tokens": 0, "pairs": 0, "decode_rows": 2},
                       {"t": 10.04, "event": "pull_reserved", "rid": "a"},
                       {"t": 10.045, "event": "pull_read", "rid": "a", "nbytes": 4096},
                       {"t": 10.06, "ms": 30.0, "prompt_tokens": 0, "pairs": 0, "decode_rows": 3}])
    got = pull_phases(str(tmp_path), 0.0, 100.0)
    assert got["pulls"] == 1
    want = {"relay_ms": 3, "reserve_wait_ms": 37, "read_ms": 5, "join_wait_ms": 15, "join_step_ms": 30,
            "worker_gap_ms": 90}
    assert {k: round(got[k]["p50"]) for k in want} == want
    # With overlapped steps the row decodes in the step after (its first output marks it): that step counts
    with (tmp_path / "decode-0.jsonl").open("a") as f:
        f.write(json.dumps({"t": 10.09, "ms": 30.0, "prompt_tokens": 0, "pairs": 0, "decode_rows": 3}) + "\n")
        f.write(json.dumps({"t": 10.1205, "event": "pull_first_output", "rid": "a"}) + "\n")
    got = pull_phases(str(tmp_path), 0.0, 100.0)
    assert {k: round(got[k]["p50"], 1) for k in ("join_wait_ms", "join_step_ms", "worker_gap_ms")} == \
        {"join_wait_ms": 45.0, "join_step_ms": 30.5, "worker_gap_ms": 120.5}
    decode = str(tmp_path / "decode-0.jsonl")
    assert [r["t"] for r in join_steps(read_step_log(decode), read_step_events(decode))] == [10.06]


def test_overlap_is_the_share_of_a_step_another_worker_was_in_a_step() -> None:
    logs = {"prefill": [{"t": 10.0, "ms": 1000.0}],
            "decode": [{"t": 9.9, "ms": 100.0}, {"t": 10.5, "ms": 100.0}, {"t": 10.95, "ms": 100.0}]}
    overlaps(logs)
    assert [r["overlap"] for r in logs["decode"]] == [0.0, 1.0, 0.5]
    assert logs["prefill"][0]["overlap"] == pytest.approx(0.15)


def test_decode_steps_beside_another_workers_steps_are_timed_apart(tmp_path: Path) -> None:
    """`decode_beside_ms`: the one-row decode steps that ran >= 50% beside the other worker's steps, inside the
    window; those alone, of other rows, or outside it are left out."""
    prefill = [{"t": 10.0, "ms": 1000.0, "prompt_tokens": 256, "decode_rows": 0}]
    decode = [{"t": 9.0, "ms": 100.0, "decode_rows": 1},  # alone
              {"t": 10.1, "ms": 150.0, "decode_rows": 1}, {"t": 10.3, "ms": 170.0, "decode_rows": 1},
              {"t": 10.5, "ms": 160.0, "decode_rows": 2},  # two rows
              {"t": 10.95, "ms": 200.0, "decode_rows": 1},  # a quarter beside
              {"t": 30.0, "ms": 500.0, "decode_rows": 1}]  # outside the window
    for name, rows in (("prefill-0", prefill), ("decode-0", decode)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt_tokens": 0, **r, "pairs": 0,
                                                                    "decode_context": 300.0}) + "\n" for r in rows))
    assert decode_beside_ms(str(tmp_path), 0.0, 20.0, 1) == (160.0, 300.0)
    assert decode_beside_ms(str(tmp_path), 0.0, 20.0, 4) is None
    assert prompt_beside_ms(str(tmp_path), 0.0, 20.0, 256) == 1000.0  # the decode worker was in a step 53% of it
    assert prompt_beside_ms(str(tmp_path), 0.0, 20.0, 128) is None


def test_prompts_beside_another_workers_steps_are_binned_by_length() -> None:
    """The co-run multiplier a prompt ran at, by its length (CoRunCosts.prefill_by_tokens is checked against it)."""
    rows = [{"kind": "prompt", "prompt_tokens": n, "ms": ms, "model_ms": 10.0}
            for n, ms in ((1030, 23.0), (1100, 22.0), (1200, 24.0), (2048, 20.0), (2100, 21.0))]
    rows.append({"kind": "decode", "prompt_tokens": 0, "ms": 30.0, "model_ms": 10.0})  # not a prompt step
    assert by_tokens(rows) == {"1024-1279": {"steps": 3, "ratio_p50": 2.3},
                               "2048-2303": {"steps": 2, "ratio_p50": 2.05}}


def test_the_profiles_prompt_co_run_is_printed_beside_what_each_length_ran() -> None:
    from simulator.profile import Profile

    prof = Profile.load("benchmarks/profiles/h200_llama3_8b_v49k_corun_table.json")  # 2.032x at 1,024, 1.956x at 2,048
    steps = {"decode-0": {}, "prefill-0": {"prompts_beside_by_tokens": {
        "1024-1279": {"steps": 35, "ratio_p50": 2.36}, "1792-2047": {"steps": 24, "ratio_p50": 2.033},
        "2304-2559": {"steps": 2, "ratio_p50": 2.088}}}}  # too few steps to show
    assert brief_co_run(prof, steps) == "1024-1279 2.02x / 2.36x (35), 1792-2047 1.97x / 2.03x (24) " \
                                        "(profile / real, steps)"
    assert brief_co_run(prof, {"decode-0": {}}) == ""


def test_an_unwritable_step_log_folder_stops_the_worker_with_a_reason(tiny_llama_dir: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = LLMEngine(EngineConfig(model=tiny_llama_dir, cache=CacheConfig(num_blocks=32)))
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(STEP_LOG_ENV, str(tmp_path / "file" / "steps"))  # a folder under a plain file
    with pytest.raises(SystemExit, match="cannot write the step log"):
        StepLog.from_env(engine, "decode@1")


@pytest.mark.cluster
def test_a_real_1p1d_clusters_workers_mark_each_handoff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real router, prefill and decode workers with step logs (as sim_validate runs them): a request's handoff
    leaves every mark, and its phases add up to the time from the prefill's answer to the decode worker's output."""
    import httpx

    from tests.cluster_util import start_cluster

    monkeypatch.setenv(STEP_LOG_ENV, str(tmp_path / "steps"))  # the workers inherit it
    c = start_cluster(tmp_path, "steps", transfer={"backend": "tcp"})
    try:
        r = httpx.post(f"{c.url}/v1/completions", timeout=60, json={"model": "smollm2", "prompt": "The capital of France",
                                                                     "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200, r.text
        metrics = _wait_for_gc_gauges(c.url)
        probe_since = time.time()
        sent = asyncio.run(_co_run_probe(c.url))
    finally:
        c.__exit__(None, None, None)
    # The co-run probe: one stream's one-row decode steps beside the prefill worker's prompts, which (one token
    # each) finished there: one pull more, the stream's.
    assert sent >= 2 and pull_phases(str(tmp_path / "steps"), probe_since, 1e10)["pulls"] == 1
    beside = decode_beside_ms(str(tmp_path / "steps"), probe_since, 1e10, 1)
    assert beside is not None and beside[0] > 0 and beside[1] > STREAM_PROMPT
    assert (prompt_beside_ms(str(tmp_path / "steps"), probe_since, 1e10, STREAM_PROMPT) or 0) > 0
    got = pull_phases(str(tmp_path / "steps"), 0.0, probe_since)
    assert got["pulls"] == 1
    parts = sum(got[k]["p50"] for k in ("relay_ms", "reserve_wait_ms", "read_ms", "join_wait_ms", "join_step_ms"))
    assert got["worker_gap_ms"]["p50"] == pytest.approx(parts, abs=0.05) and got["read_ms"]["p50"] > 0
    # Both workers froze their start-up heap and report their collections; the router exports its own pauses.
    frozen = [v for k, v in metrics.items() if k.startswith("disagg_worker_gc_frozen_objects")]
    assert len(frozen) == 2 and min(frozen) > 10_000, metrics
    assert "disagg_router_gc_pause_seconds_count[]" in metrics
    # The decode worker noted each output batch it sent: its first output (the pulled row's token) and the rest.
    path = serving_path(str(tmp_path / "steps"), 0.0, 1e10)
    decode = [w for w in path.values() if "batches" in w]
    assert len(decode) == 1 and decode[0]["batches"] >= 1 and decode[0]["wait_ms"]["p50"] >= 0, path
    assert not any(name.startswith("router-") for name in path)  # the router's arrival log is no worker's
    # The router noted each of those batches as it arrived, paired one to one: delivery takes no time travel.
    tokens = delivery(str(tmp_path / "steps"), 0.0, 1e10)
    assert tokens is not None and tokens["batches"] == decode[0]["batches"], (tokens, path)
    assert 0 <= tokens["delivery_ms"]["p50"] <= tokens["delivery_ms"]["max"] < 1000, tokens
    assert tokens["gaps"] > 0 and len(tokens["received_share_over"]) == len(tokens["bound_ms"])
    # ... and, as each request ended, when its outputs were handed on to its response: the 4-token completion's
    # and the probe stream's, each a gap figure beside the reader's
    relayed = [json.loads(line) for f in (tmp_path / "steps").glob("router-*.jsonl")
               for line in f.read_text().splitlines() if '"tokens_relayed"' in line]
    assert len(relayed) >= 2 and len(relayed[0]["times"]) == 4 and relayed[0]["times"] == sorted(relayed[0]["times"])
    assert tokens["own_p99_gap_ms"]["relayed"]["requests"] >= 2


async def _co_run_probe(url: str) -> int:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        return await co_run_probe(client, url, "smollm2")


def _wait_for_gc_gauges(url: str) -> dict[str, float]:
    """The router's /metrics once both workers' Load reports (polled every health interval) carry GC figures."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        got = {f"{s.name}{sorted(s.labels.items())}": s.value for fam in text_string_to_metric_families(text)
               for s in fam.samples}
        if sum(k.startswith("disagg_worker_gc_frozen_objects") for k in got) == 2 or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_the_log_times_its_makers_thread_while_another_thread_steps(tiny_llama_dir: str, tmp_path: Path) -> None:
    """`loop_cpu_ms` is the CPU the serving loop's thread (the log's maker) burnt during a step on the executor
    thread: the GIL it held is time the step could not run Python."""
    from concurrent.futures import ThreadPoolExecutor

    engine = LLMEngine(EngineConfig(model=tiny_llama_dir, cache=CacheConfig(num_blocks=32)))
    log = StepLog(engine, str(tmp_path / "steps.jsonl"))
    engine.add_request("a", list(range(10, 200)), SamplingParams(max_tokens=1, temperature=0.0))
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(log.step)
        spun = 0
        while not fut.done():  # this thread keeps busy while the other one steps
            spun += sum(range(1000))
        fut.result()
    log.close()
    [row] = read_step_log(str(tmp_path / "steps.jsonl"))
    assert row["loop_cpu_ms"] > 0 and row["cpu_ms"] > 0
