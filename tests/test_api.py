"""The API vLLM users rely on, end to end through a real uvicorn router and fake gRPC workers (tests/test_router.py's):
vLLM's extensions, n > 1 and best_of, several prompts, echo, tool calls, structured-output parameters on the wire,
the OpenAI client's parse helper, the utility endpoints and the OpenAPI document.

Each fake worker plays a script per request: `ScriptedWorker.scripts` maps a seed to its tokens, so the choices of
one request (seed + i) say different things; the token logprob is the script's too (best_of ranks by it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pydantic
import pytest

from engine.grammar import GrammarSpec
from engine.loader import smollm2_gguf_path
from engine.tokenizer import Tokenizer
from proto import disagg_pb2
from tests.test_router import CONTEXT, MODEL, SCRIPT, FakeServer, FakeWorker, RouterServer, sse_payloads, wait_for

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                                "required": ["city"]}}}


class ScriptedWorker(FakeWorker):
    """A FakeWorker whose script (and token logprob) depends on the request's seed."""

    def __init__(self, role: str, tokens: list[int]) -> None:
        super().__init__(role, tokens)
        self.scripts: dict[int, tuple[list[int], float]] = {}

    def script(self, params: disagg_pb2.SamplingParams) -> tuple[list[int], float]:
        seed = params.seed if params.HasField("seed") else None
        return self.scripts.get(seed, (self.tokens, -0.5)) if seed is not None else (self.tokens, -0.5)

    async def Prefill(self, request: disagg_pb2.PrefillRequest, context: Any) -> disagg_pb2.PrefillResponse:
        tokens, lp = self.script(request.params)
        saved, self.tokens = self.tokens, tokens
        try:
            resp = await super().Prefill(request, context)
        finally:
            self.tokens = saved
        if request.params.HasField("logprobs"):
            resp.first_logprob.logprob = lp
        return resp

    async def _script(self, request: disagg_pb2.DecodeRequest) -> Any:
        p, produced = request.params, len(request.output_token_ids)
        tokens, lp = self.script(p)
        script = tokens[:-1] if p.ignore_eos else tokens
        while request.request_id not in self.aborts:
            await asyncio.sleep(self.delay_s)
            token = script[produced % len(script)]
            produced += 1
            finish = "length" if produced >= p.max_tokens else ""
            finish = finish or ("stop" if not p.ignore_eos and produced == len(script) else "")
            chunk = disagg_pb2.TokenChunk(token_ids=[token], finish_reason=finish)
            if p.HasField("logprobs"):
                chunk.logprobs.append(disagg_pb2.TokenLogprob(logprob=lp))
            yield chunk
            if finish:
                return


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def setup(tokenizer: Tokenizer) -> Iterator[tuple[RouterServer, ScriptedWorker, ScriptedWorker]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    script = tokenizer.encode(SCRIPT) + [tokenizer.eos_token_id]
    p, d = FakeServer(loop, ScriptedWorker("prefill", script)), FakeServer(loop, ScriptedWorker("decode", script))
    router = RouterServer(loop, tokenizer, [p.address, d.address], max_n=8)  # a configured limit (default 16)
    wait_for(lambda: httpx.get(router.url + "/ready").status_code == 200, 10)
    yield router, p.worker, d.worker  # type: ignore[misc]
    router.stop()
    for s in (p, d):
        s.stop()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.fixture()
def scripted(setup: tuple[RouterServer, ScriptedWorker, ScriptedWorker], tokenizer: Tokenizer
             ) -> Callable[..., None]:
    """Give both workers a script: `scripted(text)` for every request, `scripted(text, seed=s, logprob=x)` per seed."""
    _, p, d = setup
    made: list[tuple[ScriptedWorker, int | None]] = []

    def give(text: str, seed: int | None = None, logprob: float = -0.5, eos: bool = True) -> None:
        ids = tokenizer.encode(text, add_special_tokens=False) + ([tokenizer.eos_token_id] if eos else [])
        for w in (p, d):
            if seed is None:
                w.tokens = ids
            else:
                w.scripts[seed] = (ids, logprob)
            made.append((w, seed))

    yield give  # type: ignore[misc]
    default = tokenizer.encode(SCRIPT) + [tokenizer.eos_token_id]
    for w, _ in made:
        w.tokens, w.scripts = default, {}


def client(router: RouterServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=10)


def post(router: RouterServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(router.url + path, json=body, timeout=10)


def stream(router: RouterServer, path: str, body: dict[str, Any]) -> list[Any]:
    with httpx.stream("POST", router.url + path, json={**body, "stream": True}, timeout=10) as r:
        assert r.status_code == 200, r.read()
        return sse_payloads(r.iter_lines())


def decodes_of(worker: FakeWorker, rid: str) -> list[disagg_pb2.DecodeRequest]:
    return [r for r in worker.decodes if r.request_id == rid or r.request_id.startswith(rid + "-")]


# --- vLLM's extensions ----------------------------------------------------------------------------------------------


def test_guidellm_request_shape_streams_usage_in_every_chunk(setup: tuple[RouterServer, Any, Any]) -> None:
    """What guidellm 0.8.1 sends on every streamed request: stream_options.continuous_usage_stats and ignore_eos."""
    router, _, _ = setup
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 6, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = stream(router, "/v1/completions", body)
    chunks = [e for e in events[:-1] if e["choices"]]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 3, 4, 5, 6]
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 6 and events[-1] == "[DONE]"


def test_unknown_fields_are_ignored_with_a_warning(setup: tuple[RouterServer, Any, Any],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    router, _, _ = setup
    with caplog.at_level(logging.WARNING, logger="router.app"):
        r = post(router, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                  "frobnicate": 1, "service_tier": "auto",
                                                  "stream_options": {"include_usage": True, "new_option": 2}})
    assert r.status_code == 200, r.text
    assert "ignored: ['frobnicate', 'service_tier', 'stream_options.new_option']" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="router.app"):  # vLLM's fields are known, even when they change nothing
        r = post(router, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3,
                                             "spaces_between_special_tokens": False, "skip_special_tokens": True})
    assert r.status_code == 200 and "ignored" not in caplog.text, (r.text, caplog.text)


def test_extension_parameters_reach_the_workers(setup: tuple[RouterServer, Any, ScriptedWorker],
                                                tokenizer: Tokenizer) -> None:
    router, _, d = setup
    resp = client(router).completions.create(model=MODEL, prompt="one two three four", max_tokens=5, extra_body={
        "min_tokens": 2, "logit_bias": {"17": 150, "5": -3}, "allowed_token_ids": [17, 5, 9], "bad_words": ["Paris"],
        "truncate_prompt_tokens": 2, "guided_regex": "[a-z]+"})
    req = decodes_of(d, resp.id)[0]
    p = req.params
    assert p.min_tokens == 2 and dict(p.logit_bias) == {17: 100.0, 5: -3.0} and list(p.allowed_token_ids) == [17, 5, 9]
    paris = tokenizer.encode("Paris", add_special_tokens=False)
    assert [list(w.ids) for w in p.bad_words_ids][0] == paris
    assert list(req.prompt_token_ids) == tokenizer.encode("one two three four")[-2:]
    assert GrammarSpec.from_wire(p.structured_output) == GrammarSpec("regex", "[a-z]+")


def test_truncate_prompt_tokens_minus_one_keeps_what_the_context_allows(
        setup: tuple[RouterServer, ScriptedWorker, ScriptedWorker]) -> None:
    router, p, _ = setup
    long = [(i % 500) + 10 for i in range(CONTEXT + 40)]
    too_long = post(router, "/v1/completions", {"model": MODEL, "prompt": long, "max_tokens": 1})
    assert too_long.status_code == 400, too_long.text
    resp = client(router).completions.create(model=MODEL, prompt=long, max_tokens=1,
                                             extra_body={"truncate_prompt_tokens": -1})
    sent = [r for r in p.prefills if r.request_id == resp.id]  # one token: the prefill worker's is the whole output
    assert [list(r.prompt_token_ids) for r in sent] == [long[-(CONTEXT - 1):]]
    assert resp.usage.prompt_tokens == CONTEXT - 1


def test_stop_strings_and_stop_tokens_in_the_text(setup: tuple[RouterServer, Any, Any], scripted: Callable[..., None],
                                                  tokenizer: Tokenizer) -> None:
    router, _, _ = setup
    c = client(router)
    cut = c.completions.create(model=MODEL, prompt="x", max_tokens=50, stop=["ital of"],
                               extra_body={"include_stop_str_in_output": True})
    assert cut.choices[0].text == "Hello world! The capital of" and cut.choices[0].finish_reason == "stop"
    late = c.completions.create(model=MODEL, prompt="x", max_tokens=50, stop=["world"], extra_body={"min_tokens": 3})
    assert late.choices[0].text == SCRIPT  # "world" came out before min_tokens: not a stop
    scripted("Hello world", eos=False)  # the worker stops on " world" (as on a stop token)
    world = tokenizer.encode(" world", add_special_tokens=False)[0]
    kept = c.completions.create(model=MODEL, prompt="x", max_tokens=50, extra_body={"stop_token_ids": [world]})
    shown = c.completions.create(model=MODEL, prompt="x", max_tokens=50, extra_body={
        "stop_token_ids": [world], "include_stop_str_in_output": True})
    assert (kept.choices[0].text, shown.choices[0].text) == ("Hello", "Hello world")
    special = c.completions.create(model=MODEL, prompt="x", max_tokens=50, extra_body={"skip_special_tokens": False})
    assert special.choices[0].text == "Hello world"


def test_echo_prepends_the_prompt(setup: tuple[RouterServer, Any, Any]) -> None:
    router, _, _ = setup
    whole = client(router).completions.create(model=MODEL, prompt="Say:", max_tokens=3, echo=True)
    assert whole.choices[0].text == "Say:Hello world!"
    events = stream(router, "/v1/completions", {"model": MODEL, "prompt": "Say:", "max_tokens": 3, "echo": True})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Say:Hello world!"
    chat = client(router).chat.completions.create(model=MODEL, max_tokens=2, extra_body={"echo": True}, messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well, "}])
    assert chat.choices[0].message.content == "Well, Hello world"


# --- n > 1, best_of, several prompts --------------------------------------------------------------------------------


def test_n_streams_each_choice_with_its_index_and_forks_the_prompt(
        setup: tuple[RouterServer, ScriptedWorker, ScriptedWorker], scripted: Callable[..., None]) -> None:
    router, p, d = setup
    for i, text in enumerate(["Paris.", "Rome is not it.", "Lyon?"]):
        scripted(text, seed=40 + i)
    events = stream(router, "/v1/chat/completions", {"model": MODEL, "n": 3, "seed": 40,
                                                     "messages": [{"role": "user", "content": "capital?"}]})
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "")
            if c["finish_reason"]:
                finishes[c["index"]] = c["finish_reason"]
    assert texts == {0: "Paris.", 1: "Rome is not it.", 2: "Lyon?"} and finishes == {0: "stop", 1: "stop", 2: "stop"}
    rid = events[0]["id"]
    assert [r.request_id for r in p.prefills if r.request_id.startswith(rid)] == [f"{rid}-0"]  # one prefill
    sent = {r.request_id: r for r in decodes_of(d, rid)}
    assert sorted(sent) == [f"{rid}-0", f"{rid}-1", f"{rid}-2"]
    assert [sent[f"{rid}-{i}"].params.fork_from for i in (1, 2)] == [f"{rid}-0"] * 2
    assert [sent[f"{rid}-{i}"].params.seed for i in range(3)] == [40, 41, 42]
    assert not sent[f"{rid}-1"].HasField("kv") and not sent[f"{rid}-1"].output_token_ids


def test_n_and_best_of_without_streaming(setup: tuple[RouterServer, Any, Any], scripted: Callable[..., None],
                                         tokenizer: Tokenizer) -> None:
    router, _, _ = setup
    for i, (text, lp) in enumerate([("bad answer", -2.0), ("best answer", -0.1), ("good answer", -0.5)]):
        scripted(text, seed=7 + i, logprob=lp)
    c = client(router)
    two = c.chat.completions.create(model=MODEL, n=2, seed=7, messages=[{"role": "user", "content": "q"}])
    assert [ch.message.content for ch in two.choices] == ["bad answer", "best answer"]
    assert two.usage.completion_tokens == sum(len(tokenizer.encode(t, add_special_tokens=False)) + 1
                                              for t in ("bad answer", "best answer"))
    best = c.completions.create(model=MODEL, prompt="q", n=2, best_of=3, seed=7, max_tokens=10)
    assert [(ch.index, ch.text) for ch in best.choices] == [(0, "best answer"), (1, "good answer")]
    assert best.choices[0].logprobs is None  # ranked by logprobs the client did not ask to see


def test_several_prompts_make_several_choices(setup: tuple[RouterServer, Any, Any], tokenizer: Tokenizer) -> None:
    router, _, _ = setup
    resp = client(router).completions.create(model=MODEL, prompt=["a b", "c"], n=2, max_tokens=2)
    assert [ch.index for ch in resp.choices] == [0, 1, 2, 3] and {ch.text for ch in resp.choices} == {"Hello world"}
    assert resp.usage.prompt_tokens == len(tokenizer.encode("a b")) + len(tokenizer.encode("c"))
    ids = client(router).completions.create(model=MODEL, prompt=[[1, 2], [3]], max_tokens=1)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 3


# --- tool calls and structured outputs -------------------------------------------------------------------------------


def test_auto_tool_calls_parse_and_stream(setup: tuple[RouterServer, Any, ScriptedWorker], tokenizer: Tokenizer,
                                          scripted: Callable[..., None]) -> None:
    router, _, d = setup
    scripted('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    resp = client(router).chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [("get_weather",
                                                                                               {"city": "Paris"})]
    prompt = tokenizer.decode(decodes_of(d, resp.id)[0].prompt_token_ids, skip_special_tokens=False)
    assert "<tools>" in prompt and '"get_weather"' in prompt  # SmolLM2's template has no tools: Hermes prompt
    chunks = list(client(router).chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                                         stream=True))
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks)


def test_required_and_named_tool_choices_use_a_grammar(setup: tuple[RouterServer, Any, ScriptedWorker],
                                                       scripted: Callable[..., None]) -> None:
    router, _, d = setup
    messages = [{"role": "user", "content": "Weather?"}]
    scripted('[{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    req = client(router).chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                                 tool_choice="required")
    assert req.choices[0].finish_reason == "tool_calls"
    assert json.loads(req.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    grammar = GrammarSpec.from_wire(decodes_of(d, req.id)[0].params.structured_output)
    assert grammar.kind == "json" and json.loads(grammar.value)["type"] == "array"
    scripted('{"city": "Rome"}')
    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(client(router).chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                                         tool_choice=named, stream=True))
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and len(calls) > 2  # the arguments stream as they come
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Rome"}
    assert chunks[-1].choices[0].finish_reason == "stop"


class City(pydantic.BaseModel):
    name: str
    population: int


def test_openai_parse_helper_with_a_pydantic_model(setup: tuple[RouterServer, Any, ScriptedWorker],
                                                   scripted: Callable[..., None]) -> None:
    router, _, d = setup
    scripted('{"name": "Paris", "population": 2102650}')
    done = client(router).chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                                 response_format=City)
    assert done.choices[0].message.parsed == City(name="Paris", population=2102650)
    grammar = GrammarSpec.from_wire(decodes_of(d, done.id)[0].params.structured_output)
    assert grammar.kind == "json" and json.loads(grammar.value)["required"] == ["name", "population"]


HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
           {"role": "user", "content": "And tomorrow?"}]
# A chat template that speaks tools (its `tools` variable) and writes a call's arguments as the object they are.
TOOLS_TEMPLATE = ("{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
                  "{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}{% for c in m.tool_calls or [] %}"
                  "[call {{ c.function.name }} city={{ c.function.arguments.city }}]{% endfor %}</{{ m.role }}>"
                  "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def test_earlier_tool_calls_and_results_reach_the_prompt(setup: tuple[RouterServer, Any, ScriptedWorker],
                                                         tokenizer: Tokenizer) -> None:
    """SmolLM2's template has no tools: calls and results are written Hermes-style, with the tools in a system
    prompt. A template that speaks tools gets them as its `tools` variable and the arguments as objects."""
    router, _, d = setup
    resp = client(router).chat.completions.create(model=MODEL, messages=HISTORY, tools=[WEATHER_TOOL], max_tokens=3)
    prompt = tokenizer.decode(decodes_of(d, resp.id)[0].prompt_token_ids, skip_special_tokens=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<tool_response>\n{"celsius": 21}\n</tool_response>' in prompt and "<tools>" in prompt
    assert prompt.index("<tools>") < prompt.index("Weather in Paris?") < prompt.index("And tomorrow?")

    from router.config import RouterConfig
    from router.job import JobBuilder
    from router.protocol import ChatCompletionRequest

    native = Tokenizer(tokenizer.backend, tokenizer.special_tokens, {"default": TOOLS_TEMPLATE})
    builder = JobBuilder(RouterConfig(model_name=MODEL, max_model_len=CONTEXT), native, None)  # type: ignore[arg-type]
    req = ChatCompletionRequest(model=MODEL, messages=HISTORY, tools=[WEATHER_TOOL], max_tokens=3)
    text = native.decode(builder.chat(req, 0.0).prompts[0], skip_special_tokens=False)
    assert text == ("<tools>get_weather;</tools><user>Weather in Paris?</user>"
                    "<assistant>[call get_weather city=Paris]</assistant><tool>{\"celsius\": 21}</tool>"
                    "<user>And tomorrow?</user><assistant>")
    none = ChatCompletionRequest(model=MODEL, messages=HISTORY, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=3)
    assert not native.decode(builder.chat(none, 0.0).prompts[0]).startswith("<tools>")


def test_the_tool_call_parser() -> None:
    """Hermes-style blocks become calls; text around them is the content; a block that is not a call of a known
    tool (bad JSON, an unknown name, cut off) stays in the content; arguments or parameters, both as OpenAI text."""
    from router.protocol import ToolDef
    from router.tools import ToolPlan, parse_output

    plan = ToolPlan("auto", (ToolDef.model_validate(WEATHER_TOOL),))

    def parsed(text: str) -> tuple[str | None, list[tuple[str, Any]]]:
        content, calls = parse_output(text, plan)
        return content, [(c.function.name, json.loads(c.function.arguments)) for c in calls]

    two = ('Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
           '<tool_call>\n{"name": "get_weather", "parameters": {"city": "Rome"}}\n</tool_call> Done.')
    assert parsed(two) == ("Checking. \n Done.", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})])
    bad = '<tool_call>{"name": "get_weather", "arguments": {</tool_call>'
    unknown = '<tool_call>{"name": "launch", "arguments": {}}</tool_call>'
    cut = 'ok <tool_call>{"name": "get_weather", "argu'
    for text in (bad, unknown, cut):
        assert parsed(text) == (text.strip(), []), text
    assert parsed("plain") == ("plain", []) and parsed("") == (None, [])
    required = ToolPlan("required", plan.tools)
    assert [c.function.name for c in parse_output('[{"name": "get_weather", "parameters": {}}]', required)[1]] == [
        "get_weather"]
    assert parse_output('[{"name": "get_weather", "param', required) == ('[{"name": "get_weather", "param', [])


CITY = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
TAG_FORMAT = {"type": "tag", "begin": "<f>", "content": {"type": "json_schema", "json_schema": CITY}, "end": "</f>"}
VLLM_TAG = {"structures": [{"begin": "<f>", "schema": CITY, "end": "</f>"}], "triggers": ["<f"]}
STRUCTURED = [
    ("response_format json_object", {"response_format": {"type": "json_object"}}, GrammarSpec("json_object")),
    ("response_format json_schema strict",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": CITY}}},
     GrammarSpec("json", json.dumps(CITY))),
    ("response_format structural_tag", {"response_format": {"type": "structural_tag", "format": TAG_FORMAT}},
     GrammarSpec("structural_tag", json.dumps({"type": "structural_tag", "format": TAG_FORMAT}))),
    ("response_format structural_tag, vLLM's older form", {"response_format": {"type": "structural_tag", **VLLM_TAG}},
     GrammarSpec("structural_tag", json.dumps(VLLM_TAG))),
    ("guided_json as text", {"guided_json": json.dumps(CITY)}, GrammarSpec("json", json.dumps(CITY))),
    ("guided_choice", {"guided_choice": ["yes", "no"]}, GrammarSpec("choice", '["yes", "no"]')),
    ("guided_grammar GBNF", {"guided_grammar": 'root ::= "yes" | "no"'}, GrammarSpec("grammar", 'root ::= "yes" | "no"')),
    ("guided_grammar Lark", {"guided_grammar": 'start: "yes" | "no"'}, GrammarSpec("grammar", 'start: "yes" | "no"')),
    ("structured_outputs json", {"structured_outputs": {"json": CITY}}, GrammarSpec("json", json.dumps(CITY))),
    ("structured_outputs choice", {"structured_outputs": {"choice": ["a", "b"]}}, GrammarSpec("choice", '["a", "b"]')),
    ("structured_outputs grammar", {"structured_outputs": {"grammar": 'root ::= "a"'}},
     GrammarSpec("grammar", 'root ::= "a"')),
    ("structured_outputs json_object", {"structured_outputs": {"json_object": True}}, GrammarSpec("json_object")),
    ("structured_outputs structural_tag",
     {"structured_outputs": {"structural_tag": json.dumps({"type": "structural_tag", "format": TAG_FORMAT})}},
     GrammarSpec("structural_tag", json.dumps({"type": "structural_tag", "format": TAG_FORMAT}))),
]


@pytest.mark.parametrize(("extra", "grammar"), [s[1:] for s in STRUCTURED], ids=[s[0] for s in STRUCTURED])
def test_every_structured_output_field_becomes_the_grammar_on_the_wire(
        setup: tuple[RouterServer, Any, ScriptedWorker], extra: dict[str, Any], grammar: GrammarSpec) -> None:
    router, p, d = setup
    r = post(router, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra})
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    assert [GrammarSpec.from_wire(q.params.structured_output) for q in p.prefills if q.request_id == rid] == [grammar]
    assert GrammarSpec.from_wire(decodes_of(d, rid)[0].params.structured_output) == grammar


def test_tool_choice_none_and_parallel_tool_calls_false(setup: tuple[RouterServer, Any, ScriptedWorker],
                                                        tokenizer: Tokenizer, scripted: Callable[..., None]) -> None:
    router, _, d = setup
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    scripted(text)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    none = client(router).chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                                  tool_choice="none")
    # none: the tools are not in the prompt, no grammar, and the output is content even when it looks like a call
    assert none.choices[0].message.content == text and not none.choices[0].message.tool_calls
    assert none.choices[0].finish_reason == "stop"
    sent = decodes_of(d, none.id)[0]
    assert "get_weather" not in tokenizer.decode(sent.prompt_token_ids, skip_special_tokens=False)
    assert not sent.params.structured_output
    scripted('[{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    one = client(router).chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                                 tool_choice="required", parallel_tool_calls=False)
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
    array = json.loads(GrammarSpec.from_wire(decodes_of(d, one.id)[0].params.structured_output).value)
    assert (array["minItems"], array["maxItems"]) == (1, 1)


BAD = [
    ("n above the configured limit", {"n": 9}, "n", r"n must be between 1 and 8 \(router.max_n\), got 9"),
    ("best_of below n", {"n": 2, "best_of": 1}, "best_of", "best_of must be between n"),
    ("best_of above the configured limit", {"best_of": 9}, "best_of", r"and 8 \(router.max_n\), got 9"),
    ("best_of streamed", {"best_of": 2, "stream": True}, "best_of", "cannot be streamed"),
    ("logit_bias key", {"logit_bias": {"x": 1}}, "logit_bias", "keys must be token ids"),
    ("logit_bias token", {"logit_bias": {"999999": 1}}, "logit_bias", "outside the vocabulary"),
    ("allowed_token_ids empty", {"allowed_token_ids": []}, "allowed_token_ids", "must not be empty"),
    ("min_tokens above max_tokens", {"min_tokens": 50, "max_tokens": 5}, "min_tokens", "min_tokens"),
    ("invalid JSON schema", {"guided_json": {"type": "frobnicate"}}, "guided_json", "invalid JSON schema"),
    ("invalid JSON schema in response_format",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
     "response_format", "invalid JSON schema"),
    ("guided_json not JSON", {"guided_json": "{nope"}, "guided_json", "not valid JSON"),
    ("regex that does not compile", {"guided_regex": "(ab"}, "guided_regex", "invalid regex"),
    ("regex in structured_outputs that does not compile", {"structured_outputs": {"regex": "[a-"}},
     "structured_outputs", "invalid regex"),
    ("grammar that does not compile", {"guided_grammar": "root ::= nothing"}, "guided_grammar",
     "invalid grammar: .*nothing"),
    ("empty guided_choice", {"guided_choice": []}, "guided_choice", "non-empty list"),
    ("two structured outputs", {"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex",
     "only one structured output"),
    ("unknown tool", {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope', which is not among the tools"),
    ("required without tools", {"tool_choice": "required"}, "tool_choice", "requires tools"),
    ("tool parameters not an object schema",
     {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools",
     "parameters must be a JSON schema of an object"),
    ("prompt_logprobs out of range", {"prompt_logprobs": 21}, "prompt_logprobs", "prompt_logprobs"),
    ("truncate_prompt_tokens 0", {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "-1 or at least 1, got 0"),
    ("wrong type", {"min_tokens": "3"}, "min_tokens", "min_tokens"),
]


@pytest.mark.parametrize(("extra", "param", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_400_saying_what_is_wrong(setup: tuple[RouterServer, Any, Any], extra: dict[str, Any],
                                                 param: str, message: str) -> None:
    router, p, d = setup
    before = len(p.prefills), len(d.decodes)
    r = post(router, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert re.search(message, error["message"]), error
    assert (len(p.prefills), len(d.decodes)) == before  # refused before any worker was asked


def test_bad_input_on_completions_and_through_the_client(setup: tuple[RouterServer, Any, Any]) -> None:
    """The same checks on /v1/completions; the openai client raises BadRequestError carrying the message."""
    router, _, _ = setup
    for extra, message in [({"n": 9}, "router.max_n"), ({"guided_regex": "(ab"}, "invalid regex"),
                           ({"guided_grammar": "root ::= nothing"}, "invalid grammar")]:
        with pytest.raises(openai.BadRequestError, match=message) as e:
            client(router).completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body=extra)
        assert e.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client(router).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               tools=[WEATHER_TOOL],
                                               tool_choice={"type": "function", "function": {"name": "nope"}})


# --- endpoints ------------------------------------------------------------------------------------------------------


def test_openapi_docs_and_models(setup: tuple[RouterServer, Any, Any]) -> None:
    router, _, _ = setup
    doc = httpx.get(router.url + "/openapi.json").json()
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    schemas = doc["components"]["schemas"]
    assert {"tools", "response_format", "guided_json", "min_tokens"} <= set(schemas["ChatCompletionRequest"]["properties"])
    assert "/tokenize" in doc["paths"] and "/v1/completions" in doc["paths"]
    docs = httpx.get(router.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    models = client(router).models.list()
    assert [(m.id, m.model_extra["max_model_len"]) for m in models] == [(MODEL, CONTEXT)]
    assert client(router).models.retrieve(MODEL).id == MODEL
    assert httpx.get(router.url + "/version").json()["version"]


def test_the_generation_front_keeps_fastapis_answers(setup: tuple[RouterServer, Any, Any]) -> None:
    """The generation endpoints are answered by router/fast_path.py ahead of FastAPI: what FastAPI answered for
    their edges (a wrong method, a bad body, an unknown path under /v1, a handler bug) stays as it was."""
    router, _, _ = setup
    r = httpx.get(router.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(router.url + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(router.url + "/v1/completions/", json={"model": MODEL, "prompt": "hi"})  # not the route itself
    assert r.status_code in (307, 404)
    r = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_tokenize_and_detokenize(setup: tuple[RouterServer, Any, Any], tokenizer: Tokenizer) -> None:
    router, _, _ = setup
    r = post(router, "/tokenize", {"model": MODEL, "prompt": "Hello world", "return_token_strs": True}).json()
    assert r["tokens"] == tokenizer.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == CONTEXT and r["token_strs"] == tokenizer.convert_ids_to_tokens(r["tokens"])
    chat = post(router, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert post(router, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    bad = post(router, "/detokenize", {"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
