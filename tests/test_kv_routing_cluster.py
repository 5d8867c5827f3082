"""KV-aware routing in a real cluster (router, 2 prefill workers, 1 decode worker as processes, SmolLM2 on the CPU).

Four multi-turn conversations, their turns interleaved and sent one at a time. Each later turn must go to the
prefill worker that prefilled the conversation's earlier turns (it holds the prefix: its Load counters show the
hit), the decode worker must pull only the blocks past what it already caches, and every answer must equal the
single-process engine's.
"""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from engine.llm import LLM
from engine.request import SamplingParams
from tests.cluster_util import start_cluster, worker_load

pytestmark = pytest.mark.cluster  # starts real router/worker processes (or Ray): not in the fast tier

BLOCK = 16
MAX_TOKENS = 16
NAMES = ["Ada", "Boris", "Chloe", "Dmitri"]  # first words of the system prompts: no block in common
QUESTIONS = ["What is the capital of France?", "And of Germany?", "Which of the two cities is larger?"]


def system(name: str) -> dict[str, str]:
    return {"role": "system", "content": f"{name} is your name. You answer in one short sentence."}


@pytest.fixture(scope="module")
def expected() -> list[list[str]]:
    """Every turn's answer from the single-process engine, computed before the cluster takes the CPU."""
    reference = LLM("smollm2", num_blocks=256)
    convs: list[list[dict[str, str]]] = [[system(n)] for n in NAMES]
    answers: list[list[str]] = [[] for _ in NAMES]
    for question in QUESTIONS:
        for conv in convs:
            conv.append({"role": "user", "content": question})
        for i, out in enumerate(reference.chat(convs, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))):
            convs[i].append({"role": "assistant", "content": out.text})
            answers[i].append(out.text)
    return answers


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):  # noqa: ANN001, ANN201
    c = start_cluster(tmp_path_factory.mktemp("kv"), "kv", pools={"prefill": {"replicas": 2}},
                      router={"prefill_policy": "kv_aware", "decode_policy": "kv_aware"})
    yield c
    c.stop()


def test_conversations_stick_to_their_prefix_and_decode_pulls_less(expected: list[list[str]], cluster) -> None:  # noqa: ANN001
    cl = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=120)
    prefill = {name: cluster.procs[name].address for name in ("prefill-0", "prefill-1")}
    decode = cluster.procs["decode-0"].address
    convs = [[system(n)] for n in NAMES]
    home: dict[int, str] = {}  # conversation -> prefill worker of its first turn
    block_bytes = 0
    for turn, question in enumerate(QUESTIONS):  # turns interleaved: every conversation's turn 1, then turn 2, ...
        for i, conv in enumerate(convs):
            conv.append({"role": "user", "content": question})
            before = {n: worker_load(a) for n, a in prefill.items()}
            dec0 = worker_load(decode)
            resp = cl.chat.completions.create(model="smollm2", messages=conv, max_tokens=MAX_TOKENS, temperature=0)
            text = resp.choices[0].message.content
            assert text == expected[i][turn], (i, turn)
            conv.append({"role": "assistant", "content": text})
            n_prompt = resp.usage.prompt_tokens
            after = {n: worker_load(a) for n, a in prefill.items()}
            served = [n for n in prefill if after[n].prefix_query_tokens > before[n].prefix_query_tokens]
            assert len(served) == 1, served
            w = served[0]
            hit = after[w].prefix_hit_tokens - before[w].prefix_hit_tokens
            dec1 = worker_load(decode)
            pulled = dec1.transfer_bytes - dec0.transfer_bytes
            reused = dec1.pull_cached_blocks - dec0.pull_cached_blocks
            blocks = -(-n_prompt // BLOCK)
            if turn == 0:
                home[i] = w
                assert hit == 0 and reused == 0  # a new system prompt: nothing cached anywhere
                block_bytes = pulled // blocks
                assert pulled == blocks * block_bytes > 0
            else:
                assert w == home[i], f"conversation {i} turn {turn} went to {w}, its prefix is on {home[i]}"
                assert hit >= 2 * BLOCK, (i, turn, hit)  # at least the system prompt and the first question
                assert reused >= 2 and pulled == (blocks - reused) * block_bytes, (i, turn, reused, pulled)
    assert set(home.values()) == set(prefill)  # the first turns spread over both prefill workers

    metrics = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    rates = {m[2]: float(m[3]) for m in re.finditer(
        r'disagg_worker_prefix_cache_hit_rate\{role="(\w+)",worker="([^"]+)"\} ([0-9.e+-]+)', metrics)}
    assert all(rates[a] > 0.2 for a in prefill.values()), rates
    predicted = sum(float(v) for v in re.findall(
        r'disagg_router_predicted_hit_blocks_total\{phase="prefill",worker="[^"]+"\} ([0-9.e+-]+)', metrics))
    real = sum(worker_load(a).prefix_hit_tokens for a in prefill.values()) / BLOCK
    assert predicted >= real > 0  # predicted leading blocks (full blocks) vs blocks the engines reused
