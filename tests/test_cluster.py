"""The disaggregated cluster as users run it: real router, prefill and decode processes, real gRPC,
real HTTP, real KV transfer (NIXL over UCX on CPU memory). Greedy output must equal the single-process engine's.
"""

from __future__ import annotations

import concurrent.futures as cf
import random
import signal
import time

import httpx
import openai
import pytest

from engine.llm import LLM
from engine.request import SamplingParams
from tests.cluster_util import start_cluster, wait_blocks_free, worker_load

pytestmark = pytest.mark.cluster  # starts real router/worker processes (or Ray): not in the fast tier

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def reference() -> LLM:
    return LLM("smollm2", num_blocks=256)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):  # noqa: ANN001, ANN201
    c = start_cluster(tmp_path_factory.mktemp("cluster"), "nixl")
    yield c
    c.stop()


def client(c) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=f"{c.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_and_completion_equal_single_process_engine(cluster, reference: LLM) -> None:  # noqa: ANN001
    cl = client(cluster)
    ref_chat = reference.chat(CHAT, SamplingParams(max_tokens=40, temperature=0))[0].text
    stream = cl.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=40, temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == ref_chat and "Paris" in text
    full = cl.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=40, temperature=0)
    assert full.choices[0].message.content == ref_chat
    assert full.usage.completion_tokens == len(reference.tokenizer.encode(ref_chat)) + (
        1 if full.choices[0].finish_reason == "stop" else 0)

    prompt = "The three primary colors are"
    ref = reference.generate(prompt, SamplingParams(max_tokens=24, temperature=0))[0].text
    stream = cl.completions.create(model="smollm2", prompt=prompt, max_tokens=24, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == ref
    assert cl.completions.create(model="smollm2", prompt=prompt, max_tokens=24, temperature=0).choices[0].text == ref


def test_seeded_sampling_equals_single_process(cluster, reference: LLM) -> None:  # noqa: ANN001
    """Token 0 is sampled on the prefill worker, the rest on decode: same seed, same text as one process."""
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=7)
    ref = reference.generate("Once upon a time", params)[0].text
    out = client(cluster).completions.create(model="smollm2", prompt="Once upon a time", max_tokens=24,
                                             temperature=0.9, top_p=0.95, seed=7)
    assert out.choices[0].text == ref


def test_32_concurrent_streams_then_no_blocks_held(cluster, reference: LLM) -> None:  # noqa: ANN001
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "mountain", "city", "history", "music", "science", "ocean", "forest"]
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 120))) for _ in range(32)]
    lens = [rng.randint(4, 40) for _ in range(32)]
    refs = reference.generate(prompts, [SamplingParams(max_tokens=n, temperature=0) for n in lens])
    cl = client(cluster)

    def one(i: int) -> str:
        s = cl.completions.create(model="smollm2", prompt=prompts[i], max_tokens=lens[i], temperature=0, stream=True)
        return "".join(ch.choices[0].text for ch in s if ch.choices)

    with cf.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(32)))
    assert got == [r.text for r in refs]
    for name in ("prefill-0", "decode-0"):
        rep = wait_blocks_free(cluster.procs[name].address)
        assert rep.kv_blocks_free == rep.kv_blocks_total, f"{name} still holds blocks"
    dec = worker_load(cluster.procs["decode-0"].address)
    assert dec.transfers >= 32 and dec.recomputes == 0 and dec.transfer_bytes > 0


def test_client_disconnect_frees_decode_blocks(cluster) -> None:  # noqa: ANN001
    body = {"model": "smollm2", "prompt": "Tell me a long story about a dragon.", "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    dec = cluster.procs["decode-0"].address
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 5:
                break
        assert worker_load(dec).kv_blocks_free < worker_load(dec).kv_blocks_total
    t0 = time.monotonic()
    rep = wait_blocks_free(dec, timeout_s=1.0)
    assert rep.kv_blocks_free == rep.kv_blocks_total, f"blocks not freed {time.monotonic() - t0:.2f}s after disconnect"


def test_metrics_expose_transfers(cluster) -> None:  # noqa: ANN001
    text = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    for name in ("ttft", "inter_token", "e2e", "kv_usage", "transfer_bytes", "recomputes"):
        assert name in text, name


def test_kill_decode_worker_mid_stream(cluster, reference: LLM) -> None:  # noqa: ANN001
    """kill -9 of the decode worker: open streams end with an error event, the router stays up, marks the
    worker unhealthy, and takes it back when it restarts on the same port."""
    body = {"model": "smollm2", "prompt": "Count slowly:", "max_tokens": 500, "ignore_eos": True, "stream": True}
    port = int(cluster.procs["decode-0"].address.rsplit(":", 1)[1])
    events: list[str] = []
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 3:
                cluster.kill("decode-0", signal.SIGKILL)
    assert events[-1] == "data: [DONE]" and any('"error"' in e for e in events[-3:])
    assert httpx.get(f"{cluster.url}/health", timeout=5).status_code == 200
    deadline = time.monotonic() + 10
    while httpx.get(f"{cluster.url}/ready", timeout=5).status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(f"{cluster.url}/ready", timeout=5).status_code == 503
    cluster.start_worker("decode-0", port=port)
    cluster.wait_worker("decode-0")
    cluster.wait_ready(timeout_s=30)
    out = client(cluster).completions.create(model="smollm2", prompt="The three primary colors are", max_tokens=8,
                                             temperature=0)
    ref = reference.generate("The three primary colors are", SamplingParams(max_tokens=8, temperature=0))[0].text
    assert out.choices[0].text == ref


def test_bad_input_gets_4xx_and_leaks_nothing(cluster) -> None:  # noqa: ANN001
    url = f"{cluster.url}/v1/completions"
    cases = [
        (httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"}, timeout=10), 400),
        (httpx.post(url, json={"model": "smollm2"}, timeout=10), 400),
        (httpx.post(url, json={"model": "smollm2", "prompt": "hi", "max_tokens": "many"}, timeout=10), 400),
        (httpx.post(url, json={"model": "smollm2", "prompt": "hi", "max_tokens": 0}, timeout=10), 400),
        (httpx.post(url, json={"model": "smollm2", "prompt": "hi", "max_tokens": 10**6}, timeout=10), 400),
        (httpx.post(url, json={"model": "smollm2", "prompt": "word " * 9000, "max_tokens": 4}, timeout=30), 400),
        (httpx.post(url, json={"model": "gpt-9", "prompt": "hi"}, timeout=10), 404),
    ]
    for resp, status in cases:
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert err["message"] and err["type"]
    for name in ("prefill-0", "decode-0"):
        rep = wait_blocks_free(cluster.procs[name].address)
        assert rep.kv_blocks_free == rep.kv_blocks_total and rep.num_running == 0
