"""vLLM's `prompt_logprobs` through the router, with tests/test_api.py's fake workers (which send made-up prompt
logprobs when asked): the JSON shape on /v1/completions and /v1/chat/completions, the first streamed chunk, echo with
logprobs covering the prompt, and which worker is asked (the prefill worker; the decode worker only when it
computes the prompt itself)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest

from engine.loader import smollm2_gguf_path
from engine.tokenizer import Tokenizer
from proto import disagg_pb2
from tests.test_api import ScriptedWorker, decodes_of, post, stream
from tests.test_router import MODEL, SCRIPT, FakeServer, RouterServer, wait_for

PROMPT = "The capital of France is"


def fake_prompt_logprobs(prompt: list[int], k: int) -> list[disagg_pb2.TokenLogprob]:
    """Entry i scores prompt[i + 1]: logprob -0.25 (i + 1), rank i + 2; alternatives 10, 11, ... at -0.1, -0.2, ..."""
    return [disagg_pb2.TokenLogprob(logprob=-0.25 * (i + 1), rank=i + 2, top_ids=[10 + j for j in range(k)],
                                    top_logprobs=[-0.1 * (j + 1) for j in range(k)]) for i in range(len(prompt) - 1)]


class PromptWorker(ScriptedWorker):
    """Sends prompt logprobs when asked: in the Prefill answer, or in the first chunk of a Decode."""

    async def Prefill(self, request: disagg_pb2.PrefillRequest, context: Any) -> disagg_pb2.PrefillResponse:
        resp = await super().Prefill(request, context)
        if request.params.HasField("prompt_logprobs"):
            resp.prompt_logprobs.extend(fake_prompt_logprobs(list(request.prompt_token_ids),
                                                             request.params.prompt_logprobs))
        return resp

    async def _script(self, request: disagg_pb2.DecodeRequest) -> Any:
        first, p = True, request.params
        async for chunk in super()._script(request):
            if first and p.HasField("prompt_logprobs"):
                chunk.prompt_logprobs.extend(fake_prompt_logprobs(list(request.prompt_token_ids), p.prompt_logprobs))
            first = False
            yield chunk


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def setup(tokenizer: Tokenizer) -> Iterator[tuple[RouterServer, PromptWorker, PromptWorker]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    script = tokenizer.encode(SCRIPT) + [tokenizer.eos_token_id]
    p, d = FakeServer(loop, PromptWorker("prefill", script)), FakeServer(loop, PromptWorker("decode", script))
    router = RouterServer(loop, tokenizer, [p.address, d.address])
    wait_for(lambda: httpx.get(router.url + "/ready").status_code == 200, 10)
    yield router, p.worker, d.worker  # type: ignore[misc]
    router.stop()
    for s in (p, d):
        s.stop()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def expected(tokenizer: Tokenizer, k: int) -> list[Any]:
    """vLLM's prompt_logprobs for PROMPT as the fake workers score it."""
    ids = tokenizer.encode(PROMPT)
    out: list[Any] = [None]
    for i, t in enumerate(ids[1:]):
        entry = {str(t): {"logprob": pytest.approx(-0.25 * (i + 1)), "rank": i + 2,
                          "decoded_token": tokenizer.decode([t], skip_special_tokens=False)}}
        for j in range(k):
            entry[str(10 + j)] = {"logprob": pytest.approx(-0.1 * (j + 1)), "rank": j + 1,
                                  "decoded_token": tokenizer.decode([10 + j], skip_special_tokens=False)}
        out.append(entry)
    return out


def test_completions_carry_prompt_logprobs_computed_by_the_prefill_worker(
        setup: tuple[RouterServer, PromptWorker, PromptWorker], tokenizer: Tokenizer) -> None:
    router, p, d = setup
    r = post(router, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["prompt_logprobs"] == expected(tokenizer, 2) and choice["text"] == "Hello world!"
    rid = r.json()["id"]
    assert [x.params.prompt_logprobs for x in p.prefills if x.request_id == rid] == [2]
    assert not decodes_of(d, rid)[0].params.HasField("prompt_logprobs")  # the decode worker is not asked again
    plain = post(router, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 3}).json()
    assert "prompt_logprobs" not in plain["choices"][0]  # nobody else's response changes


def test_a_decode_worker_that_computes_the_prompt_sends_them_in_its_first_chunk(
        setup: tuple[RouterServer, PromptWorker, PromptWorker], tokenizer: Tokenizer) -> None:
    router, p, d = setup
    p.prefill_error = grpc.StatusCode.INTERNAL  # the prefill fails: the decode worker prefills locally
    try:
        r = post(router, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "prompt_logprobs": 0})
    finally:
        p.prefill_error = None
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["prompt_logprobs"] == expected(tokenizer, 0)
    assert decodes_of(d, r.json()["id"])[0].params.prompt_logprobs == 0


def test_streamed_in_each_choices_first_chunk(setup: tuple[RouterServer, PromptWorker, PromptWorker],
                                              tokenizer: Tokenizer) -> None:
    router, _, _ = setup
    events = stream(router, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "n": 2,
                                                "prompt_logprobs": 1})
    seen: dict[int, list[bool]] = {}
    for e in events[:-1]:
        for c in e["choices"]:
            seen.setdefault(c["index"], []).append("prompt_logprobs" in c)
            if "prompt_logprobs" in c:
                assert c["prompt_logprobs"] == expected(tokenizer, 1)
    assert seen == {0: [True, False, False, False], 1: [True, False, False, False]}
    n = len(tokenizer.encode(PROMPT))
    one = stream(router, "/v1/completions", {"model": MODEL, "prompt": [tokenizer.encode(PROMPT)[0]],
                                             "max_tokens": 2, "prompt_logprobs": 3})
    assert one[0]["choices"][0]["prompt_logprobs"] == [None] and n > 1  # a one-token prompt: nothing to score


def test_echo_with_logprobs_covers_the_prompt(setup: tuple[RouterServer, PromptWorker, PromptWorker],
                                              tokenizer: Tokenizer) -> None:
    router, p, _ = setup
    ids = tokenizer.encode(PROMPT)
    texts = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "echo": True, "logprobs": 1}
    r = post(router, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == PROMPT + "Hello world!"
    lp = choice["logprobs"]
    assert lp["tokens"][: len(ids)] == texts and len(lp["tokens"]) == len(ids) + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx([-0.25 * (i + 1) for i in range(len(ids) - 1)])
    alternative = tokenizer.decode([10], skip_special_tokens=False)
    assert lp["top_logprobs"][1] == {texts[1]: pytest.approx(-0.25), alternative: pytest.approx(-0.1)}
    offsets = [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert lp["text_offset"] == offsets
    assert choice["prompt_logprobs"] == expected(tokenizer, 1)  # implied by echo with logprobs, as in vLLM
    assert p.prefills[-1].params.prompt_logprobs == 1
    events = stream(router, "/v1/completions", body)
    first = events[0]["choices"][0]
    assert first["text"].startswith(PROMPT) and first["logprobs"]["tokens"][: len(ids)] == texts
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == PROMPT + "Hello world!"
    streamed = [t for e in events[:-1] for t in e["choices"][0]["logprobs"]["text_offset"]]
    assert streamed == offsets


def test_chat_returns_them_at_the_top_level(setup: tuple[RouterServer, PromptWorker, PromptWorker],
                                            tokenizer: Tokenizer) -> None:
    router, p, _ = setup
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "prompt_logprobs": 1}
    r = post(router, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    got = r.json()["prompt_logprobs"]
    prompt = list(p.prefills[-1].prompt_token_ids)
    assert len(got) == len(prompt) and got[0] is None and got[1][str(prompt[1])]["rank"] == 2
    events = stream(router, "/v1/chat/completions", body)
    carrying = [e for e in events[:-1] if "prompt_logprobs" in e]
    assert len(carrying) == 1 and carrying[0]["prompt_logprobs"] == got and carrying[0]["choices"][0]["delta"]
    assert "prompt_logprobs" not in post(router, "/v1/chat/completions", {**body, "prompt_logprobs": None}).json()


def test_out_of_range_is_a_400(setup: tuple[RouterServer, PromptWorker, PromptWorker]) -> None:
    router, _, _ = setup
    r = post(router, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "prompt_logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
