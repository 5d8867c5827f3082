"""The vLLM-compatible API against a real cluster (router + prefill + decode processes, SmolLM2, KV over NIXL):
the OpenAI client's parse helper with a pydantic model, tool calls with tool_choice="required", guided choices, a
grammar that leaves no legal token, and n > 1 choices forked on the decode worker and prompt logprobs equal to the
single-process engine's; no block is left held."""

from __future__ import annotations

import json

import openai
import pydantic
import pytest

from engine.llm import LLM
from engine.request import SamplingParams
from tests.cluster_util import start_cluster, wait_blocks_free, worker_load

pytestmark = pytest.mark.cluster  # starts real router/worker processes: not in the fast tier

QUESTION = [{"role": "user", "content": "What is the capital of France? Reply in JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"], "additionalProperties": False}}}


class Capital(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=24)  # bounded, so a 135M model cannot ramble past max_tokens
    country: str = pydantic.Field(max_length=24)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):  # noqa: ANN001, ANN201
    c = start_cluster(tmp_path_factory.mktemp("api_cluster"), "api")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def reference() -> LLM:
    return LLM("smollm2", num_blocks=256)


def client(c) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=f"{c.url}/v1", api_key="unused", max_retries=0, timeout=180)


def no_blocks_held(c) -> None:  # noqa: ANN001
    for name in ("prefill-0", "decode-0"):
        rep = wait_blocks_free(c.procs[name].address)
        assert rep.kv_blocks_free == rep.kv_blocks_total, f"{name} still holds blocks"


def test_parse_helper_returns_the_pydantic_model(cluster) -> None:  # noqa: ANN001
    done = client(cluster).chat.completions.parse(model="smollm2", messages=QUESTION, response_format=Capital,
                                                  temperature=0, max_tokens=80)
    parsed = done.choices[0].message.parsed
    assert isinstance(parsed, Capital) and done.choices[0].finish_reason == "stop", done
    sampled = client(cluster).chat.completions.parse(model="smollm2", messages=QUESTION, response_format=Capital,
                                                     temperature=1.0, seed=3, max_tokens=80, n=2)
    assert all(isinstance(c.message.parsed, Capital) for c in sampled.choices)
    no_blocks_held(cluster)


def test_tool_choice_required_always_parses(cluster) -> None:  # noqa: ANN001
    messages = [{"role": "user", "content": "What's the weather like in Paris today?"}]
    for seed in (1, 2):
        resp = client(cluster).chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER],
                                                       tool_choice="required", temperature=0.8, seed=seed,
                                                       max_tokens=80)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, resp
        for call in choice.message.tool_calls:
            assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    named = client(cluster).chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER],
                                                    tool_choice={"type": "function",
                                                                 "function": {"name": "get_weather"}},
                                                    temperature=0, max_tokens=60, stream=True)
    calls = [tc for ch in named for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices]
    assert calls[0].function.name == "get_weather"
    assert "city" in json.loads("".join(tc.function.arguments or "" for tc in calls))


def test_guided_choice_and_regex(cluster) -> None:  # noqa: ANN001
    cl = client(cluster)
    pick = cl.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Is Paris in France?"}],
                                      extra_body={"guided_choice": ["yes", "no"]}, max_tokens=5, temperature=0)
    assert pick.choices[0].message.content in ("yes", "no")
    date = cl.completions.create(model="smollm2", prompt="The date today is", max_tokens=20, temperature=0.7, seed=1,
                                 extra_body={"guided_regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"})
    assert len(date.choices[0].text) == 10 and date.choices[0].text[4] == "-"


def test_a_grammar_that_leaves_no_legal_token_ends_with_stop(cluster) -> None:  # noqa: ANN001
    """guided_regex "yes" with min_tokens past its end: once "yes" is out only EOS is legal, and min_tokens bans it.
    Every choice ends with finish_reason "stop" (no hang), streamed or not, with n > 1, and no block is held after."""
    cl = client(cluster)
    body = {"guided_regex": "yes", "min_tokens": 8}
    out = cl.completions.create(model="smollm2", prompt="Is Paris in France?", max_tokens=16, temperature=0.8, seed=1,
                                n=2, extra_body=body)
    assert [(c.text, c.finish_reason) for c in out.choices] == [("yes", "stop")] * 2, out
    chat = cl.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Is Paris in France?"}],
                                      max_tokens=16, temperature=0, stream=True, extra_body=body)
    chunks = [ch for ch in chat if ch.choices]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "yes"
    assert chunks[-1].choices[0].finish_reason == "stop"
    no_blocks_held(cluster)


def test_n_choices_fork_one_prompt_and_equal_the_engine(cluster, reference: LLM) -> None:  # noqa: ANN001
    prompt = "Once upon a time, in a kingdom far away, there lived a"
    cl = client(cluster)
    dec = cluster.procs["decode-0"].address
    before = worker_load(dec).prompt_tokens
    out = cl.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0.9, seed=5, n=3)
    refs = [reference.generate(prompt, SamplingParams(max_tokens=16, temperature=0.9, seed=5 + i))[0].text
            for i in range(3)]
    assert [c.text for c in out.choices] == refs
    # The prompt went to the prefill worker once; the decode worker computed only each sibling's last prompt token.
    assert worker_load(dec).prompt_tokens - before == 2
    streamed: dict[int, str] = {}
    for ch in cl.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0, n=2, stream=True):
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    greedy = reference.generate(prompt, SamplingParams(max_tokens=16, temperature=0))[0].text
    assert streamed == {0: greedy, 1: greedy}
    no_blocks_held(cluster)


def test_prompt_logprobs_equal_the_engine(cluster, reference: LLM) -> None:  # noqa: ANN001
    """The prefill worker computes them and the router returns them in vLLM's shape: equal to the single-process
    engine's; echo with logprobs shows the same numbers over the prompt; the greedy text is unchanged."""
    prompt = "The quick brown fox jumps over the lazy dog. In the beginning, there was a small village where"
    ref = reference.generate(prompt, SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=3))[0]
    ids = ref.prompt_token_ids
    pre, dec = (cluster.procs[name].address for name in ("prefill-0", "decode-0"))
    before = worker_load(pre).prompt_tokens, worker_load(dec).prompt_tokens
    out = client(cluster).completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0,
                                             extra_body={"prompt_logprobs": 3})
    got = out.choices[0].model_extra["prompt_logprobs"]
    assert out.choices[0].text == ref.text and len(got) == len(ids) and got[0] is None and ref.prompt_logprobs
    for i, (entry, (logprob, rank, top)) in enumerate(zip(got[1:], ref.prompt_logprobs[1:], strict=True), start=1):
        assert entry[str(ids[i])]["logprob"] == pytest.approx(logprob, abs=1e-4) and entry[str(ids[i])]["rank"] == rank
        assert {int(t) for t in entry} == {ids[i], *(t for t, _ in top)}
        assert all(entry[str(t)]["logprob"] == pytest.approx(v, abs=1e-4) for t, v in top)
    echo = client(cluster).completions.create(model="smollm2", prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                              logprobs=1)
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text.startswith(prompt) and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx([r[0] for r in ref.prompt_logprobs[1:]], abs=1e-4)
    # The prefill worker computed the whole prompt both times (no prefix-cache hit); the decode worker none of it.
    assert (worker_load(pre).prompt_tokens - before[0], worker_load(dec).prompt_tokens - before[1]) == (2 * len(ids), 0)
    no_blocks_held(cluster)
