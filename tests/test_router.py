"""The router end to end: real HTTP into a real uvicorn server, real gRPC out to fake workers.

The fake workers are `grpc.aio` servers on their own event loop thread. Prefill answers with the script's first
token and a KV handle; Decode starts the rest of the script (the SmolLM2 encoding of SCRIPT plus EOS), one token
per chunk on the router's Subscribe stream. With `ignore_eos` the fake decodes endlessly (until max_tokens),
which the slow-stream tests use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest
import uvicorn

from engine.loader import smollm2_gguf_path
from engine.tokenizer import Tokenizer
from proto import DRAINING, NO_SUBSCRIPTION, REASON_KEY, disagg_pb2, disagg_pb2_grpc
from router.app import create_app
from router.config import RouterConfig
from router.registry import WorkerRegistry

SCRIPT = "Hello world! The capital of France is Paris."
MODEL = "smollm2"
CONTEXT = 256


class FakeWorker(disagg_pb2_grpc.WorkerServicer):
    """Scripted worker; records what the router asked of it."""

    def __init__(self, role: str, tokens: list[int], delay_s: float = 0.005) -> None:
        self.role, self.tokens, self.delay_s = role, tokens, delay_s
        self.address = ""
        self.prefills: list[disagg_pb2.PrefillRequest] = []
        self.decodes: list[disagg_pb2.DecodeRequest] = []
        self.aborts: list[str] = []
        self.releases: list[str] = []
        self.cancelled: list[str] = []
        self.decode_error: grpc.StatusCode | None = None  # fail every Decode with this status
        self.prefill_error: grpc.StatusCode | None = None  # fail every Prefill with this status
        self.prefill_delay_s = 0.0  # how long Prefill takes
        self.hang_after: int | None = None  # Decode goes silent after this many output tokens
        self.load = disagg_pb2.LoadReport(role=role)
        self.frozen = False  # as if SIGSTOPped: Health does not answer, no token is produced
        self.refusal = ""  # with decode_error: the reason named in the trailing metadata (proto.REASON_KEY)
        self.draining = False  # Health says so; set by the first Decode refused for DRAINING, as a real worker's drain
        self.subscribers: dict[str, asyncio.Queue[disagg_pb2.TokenChunk]] = {}
        self.scripts: dict[str, asyncio.Task[None]] = {}

    async def Health(self, request: Any, context: Any) -> disagg_pb2.HealthResponse:
        while self.frozen:
            await asyncio.sleep(0.05)
        return disagg_pb2.HealthResponse(ok=True, worker_id=f"{self.role}@{self.address}", role=self.role,
                                         model=MODEL, max_model_len=CONTEXT, draining=self.draining)

    async def Load(self, request: Any, context: Any) -> disagg_pb2.LoadReport:
        return self.load

    async def Abort(self, request: disagg_pb2.AbortRequest, context: Any) -> disagg_pb2.AbortResponse:
        while self.frozen:  # a SIGSTOPped worker answers nothing (the caller's deadline runs out)
            await asyncio.sleep(0.05)
        self.aborts.append(request.request_id)
        task = self.scripts.pop(request.request_id, None)
        if task is not None:
            task.cancel()
        return disagg_pb2.AbortResponse(found=True)

    async def ReleaseKV(self, request: disagg_pb2.ReleaseKVRequest, context: Any) -> disagg_pb2.ReleaseKVResponse:
        self.releases.append(request.request_id)
        return disagg_pb2.ReleaseKVResponse(found=True)

    async def Prefill(self, request: disagg_pb2.PrefillRequest, context: Any) -> disagg_pb2.PrefillResponse:
        self.prefills.append(request)
        if self.prefill_error is not None:
            await context.abort(self.prefill_error, "injected failure")
        await asyncio.sleep(self.prefill_delay_s)
        while self.frozen:
            await asyncio.sleep(0.05)
        resp = disagg_pb2.PrefillResponse(request_id=request.request_id, first_token=self.tokens[0])
        if request.params.HasField("logprobs"):
            resp.first_logprob.CopyFrom(fake_logprob(self.tokens[0], request.params.logprobs))
        if request.params.max_tokens == 1:
            resp.finish_reason = "length"
        else:
            resp.kv.CopyFrom(disagg_pb2.KVHandle(worker_id="p", worker_address=self.address, backend="local",
                                                 block_ids=[0, 1], num_tokens=len(request.prompt_token_ids)))
        return resp

    async def Subscribe(self, request: disagg_pb2.SubscribeRequest, context: Any) -> Any:
        q = self.subscribers[request.subscriber] = asyncio.Queue()
        yield disagg_pb2.TokenBatch()
        try:
            while True:
                chunks = [await q.get()]
                while not q.empty():
                    chunks.append(q.get_nowait())
                yield disagg_pb2.TokenBatch(chunks=chunks)
        finally:
            self.subscribers.pop(request.subscriber, None)

    async def Decode(self, request: disagg_pb2.DecodeRequest, context: Any) -> disagg_pb2.DecodeResponse:
        self.decodes.append(request)
        if self.decode_error is not None:
            self.draining = self.draining or self.refusal == DRAINING
            await context.abort(self.decode_error, "injected failure",
                                trailing_metadata=((REASON_KEY, self.refusal),) if self.refusal else ())
        if request.request_id in self.scripts:  # as the real worker: an id it still runs is refused
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"duplicate request id {request.request_id!r}")
        q = self.subscribers[request.subscriber]
        self.scripts[request.request_id] = asyncio.create_task(self._run(request, q))
        return disagg_pb2.DecodeResponse()

    async def _run(self, request: disagg_pb2.DecodeRequest, q: asyncio.Queue[disagg_pb2.TokenChunk]) -> None:
        try:
            async for chunk in self._script(request):
                chunk.request_id = request.request_id
                q.put_nowait(chunk)
        except asyncio.CancelledError:
            self.cancelled.append(request.request_id)
            raise
        finally:
            self.scripts.pop(request.request_id, None)

    async def _script(self, request: disagg_pb2.DecodeRequest) -> Any:
        p, produced = request.params, len(request.output_token_ids)
        script = self.tokens[:-1] if p.ignore_eos else self.tokens
        aborted = self.aborts.count(request.request_id)  # a copy sent back after an Abort runs until the next one
        while self.aborts.count(request.request_id) == aborted:
            await asyncio.sleep(3600 if self.hang_after is not None and produced >= self.hang_after else self.delay_s)
            while self.frozen:
                await asyncio.sleep(0.05)
            token = script[produced % len(script)]
            produced += 1
            finish = "length" if produced >= p.max_tokens else ""
            finish = finish or ("stop" if not p.ignore_eos and produced == len(script) else "")
            chunk = disagg_pb2.TokenChunk(token_ids=[token], finish_reason=finish)
            if p.HasField("logprobs"):
                chunk.logprobs.append(fake_logprob(token, p.logprobs))
            yield chunk
            if finish:
                return


def fake_logprob(token: int, n: int) -> disagg_pb2.TokenLogprob:
    return disagg_pb2.TokenLogprob(logprob=-0.5, top_ids=[token + i for i in range(n)],
                                   top_logprobs=[-0.5 - i for i in range(n)])


class FakeServer:
    """A FakeWorker behind a grpc.aio server on the shared worker loop; can be stopped and restarted on its port."""

    def __init__(self, loop: asyncio.AbstractEventLoop, worker: FakeWorker) -> None:
        self.loop, self.worker, self.port = loop, worker, 0
        self.server: grpc.aio.Server | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def start(self) -> None:
        async def go() -> None:
            self.server = grpc.aio.server()
            disagg_pb2_grpc.add_WorkerServicer_to_server(self.worker, self.server)
            self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
            await self.server.start()

        self._run(go())
        self.worker.address = self.address

    def stop(self) -> None:
        if self.server is not None:
            self._run(self.server.stop(grace=0))
            self.server = None


class RouterServer:
    """create_app(...) served by uvicorn on a free port, on the test loop thread.

    The router shares the loop with the fake workers: grpc.aio misbehaves with several event loops in one process.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, tokenizer: Tokenizer, addresses: list[str],
                 **overrides: Any) -> None:
        settings = {"model_name": MODEL, "port": 0, "health_interval_s": 0.2, "rpc_timeout_s": 1.0,
                    "worker_timeout_s": 5.0, "no_worker_wait_s": 0.0, **overrides}
        self.config = RouterConfig(**settings)
        self.registry = WorkerRegistry(addresses, self.config.health_interval_s, self.config.rpc_timeout_s)
        app = create_app(self.config, tokenizer, self.registry)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.done = asyncio.run_coroutine_threadsafe(self.server.serve(), loop)
        wait_for(lambda: self.server.started or self.done.done(), 10)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.done.result(timeout=10)


def wait_for(cond: Callable[[], Any], timeout_s: float, step_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"condition not met within {timeout_s}s")


def sse_payloads(lines: Iterator[str]) -> list[Any]:
    """Decoded `data:` payloads of an SSE stream; [DONE] stays the string '[DONE]'."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def script_ids(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode(SCRIPT) + [tokenizer.eos_token_id]


@pytest.fixture(scope="module")
def io_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The one event loop (on its own thread) for the router and the fake workers."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.fixture(scope="module")
def fakes(io_loop: asyncio.AbstractEventLoop, script_ids: list[int]) -> Iterator[Callable[[str], FakeServer]]:
    """Factory of fake worker servers, all stopped at the end of the module."""
    made: list[FakeServer] = []

    def make(role: str) -> FakeServer:
        made.append(FakeServer(io_loop, FakeWorker(role, script_ids)))
        return made[-1]

    yield make
    for s in made:
        s.stop()


@pytest.fixture(scope="module")
def routers(io_loop: asyncio.AbstractEventLoop, tokenizer: Tokenizer) -> Iterator[Callable[..., RouterServer]]:
    made: list[RouterServer] = []

    def make(addresses: list[str], **overrides: Any) -> RouterServer:
        made.append(RouterServer(io_loop, tokenizer, addresses, **overrides))
        wait_for(lambda: httpx.get(made[-1].url + "/ready").status_code == 200 or not addresses, 10)
        return made[-1]

    yield make
    for r in made:
        r.stop()


@pytest.fixture(scope="module")
def cluster(fakes: Callable[[str], FakeServer], routers: Callable[..., RouterServer]
            ) -> tuple[RouterServer, FakeWorker, FakeWorker]:
    """Router + one prefill + one decode fake, shared by the tests that leave the workers up."""
    p, d = fakes("prefill"), fakes("decode")
    return routers([p.address, d.address]), p.worker, d.worker


def client(router: RouterServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key=key, max_retries=0, timeout=10)


# --- happy paths ---------------------------------------------------------------------------------------------------


def test_openai_client_streams_chat_and_completion(cluster: tuple[RouterServer, FakeWorker, FakeWorker]) -> None:
    router, p, d = cluster
    chunks = list(client(router).chat.completions.create(model=MODEL, stream=True,
                                                          messages=[{"role": "user", "content": "hi"}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == SCRIPT
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[0].id.startswith("chatcmpl-")
    rid = chunks[0].id
    assert [r.request_id for r in p.prefills].count(rid) == 1
    decode = next(r for r in d.decodes if r.request_id == rid)
    assert len(decode.output_token_ids) == 1 and decode.HasField("kv") and decode.kv.block_ids == [0, 1]

    stream = client(router).completions.create(model=MODEL, prompt="Say hello", max_tokens=50, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == SCRIPT
    assert chunks[0].id.startswith("cmpl-") and chunks[-1].choices[0].finish_reason == "stop"


def test_non_streaming_with_usage(cluster: tuple[RouterServer, FakeWorker, FakeWorker], tokenizer: Tokenizer,
                                  script_ids: list[int]) -> None:
    router, _, d = cluster
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    resp = client(router).chat.completions.create(model=MODEL, messages=messages)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    decode = next(r for r in d.decodes if r.request_id == resp.id)
    assert list(decode.prompt_token_ids) == prompt and decode.params.max_tokens == CONTEXT - len(prompt)
    assert resp.object == "chat.completion" and resp.choices[0].message.content == SCRIPT
    assert resp.choices[0].finish_reason == "stop" and resp.choices[0].message.role == "assistant"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(prompt), len(script_ids))
    assert resp.usage.total_tokens == len(prompt) + len(script_ids)

    resp = client(router).completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=5)
    assert resp.object == "text_completion" and resp.choices[0].text == "Hello world! The capital"
    assert resp.choices[0].finish_reason == "length"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (3, 5)

    one = client(router).completions.create(model=MODEL, prompt="x", max_tokens=1)  # prefill alone finishes it
    assert one.choices[0].text == "Hello" and one.choices[0].finish_reason == "length"


def test_include_usage_adds_final_chunk(cluster: tuple[RouterServer, FakeWorker, FakeWorker],
                                       script_ids: list[int]) -> None:
    router, _, _ = cluster
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", router.url + "/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_payloads(r.iter_lines())
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(script_ids)
    assert all(e["usage"] is None and e["object"] == "chat.completion.chunk" for e in events[:-2])


def test_stop_string_across_tokens_cuts_text_and_aborts_decode(
        cluster: tuple[RouterServer, FakeWorker, FakeWorker]) -> None:
    router, _, d = cluster
    # " capital" and " of" are separate tokens: the stop string straddles them.
    resp = client(router).completions.create(model=MODEL, prompt="Say hello", max_tokens=50, stop=["ital of"])
    assert resp.choices[0].text == "Hello world! The cap" and resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == 6
    wait_for(lambda: resp.id in d.aborts, 1)

    chunks = list(client(router).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                          stop="France", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello world! The capital of "
    assert chunks[-1].choices[0].finish_reason == "stop"
    wait_for(lambda: chunks[0].id in d.aborts, 1)


def test_logprobs_shapes(cluster: tuple[RouterServer, FakeWorker, FakeWorker]) -> None:
    router, _, _ = cluster
    resp = client(router).completions.create(model=MODEL, prompt="hi", max_tokens=4, logprobs=2)
    lp = resp.choices[0].logprobs
    assert lp.tokens == ["Hello", " world", "!", " The"] and lp.token_logprobs == [-0.5] * 4
    assert lp.text_offset == [0, 5, 11, 12]
    assert all(len(t) == 2 and max(t.values()) == -0.5 for t in lp.top_logprobs)

    resp = client(router).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                  max_completion_tokens=3, logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert [c.token for c in content] == ["Hello", " world", "!"]
    assert content[1].bytes == list(b" world") and content[1].logprob == -0.5
    assert [len(c.top_logprobs) for c in content] == [2, 2, 2] and content[0].top_logprobs[1].logprob == -1.5

    chunks = list(client(router).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                          max_tokens=2, logprobs=True, stream=True))
    tokens = [t.token for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == ["Hello", " world"]


def test_conditional_disagg_sends_short_prompts_straight_to_decode(
        fakes: Callable[[str], FakeServer], routers: Callable[..., RouterServer], tokenizer: Tokenizer) -> None:
    p, d = fakes("prefill"), fakes("decode")
    router = routers([p.address, d.address], conditional_disagg_min_prompt_tokens=20)
    short = client(router).completions.create(model=MODEL, prompt="hi", max_tokens=3)
    long = client(router).completions.create(model=MODEL, prompt="hi " * 30, max_tokens=3)
    assert short.choices[0].text == long.choices[0].text == "Hello world!"
    assert [r.request_id for r in p.worker.prefills] == [long.id]
    by_id = {r.request_id: r for r in d.worker.decodes}
    assert not by_id[short.id].output_token_ids and not by_id[short.id].HasField("kv")
    assert by_id[long.id].HasField("kv")


# --- errors --------------------------------------------------------------------------------------------------------


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


BAD_REQUESTS = [
    ("malformed json", "/v1/chat/completions", b'{"model": "smollm2", "messages": [', 400, None),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("wrong type", "/v1/chat/completions", _chat(temperature="hot"), 400, "temperature"),
    ("bad role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "x", "content": "hi"}]}, 400, None),
    ("wrong type inside", "/v1/chat/completions", _chat(stream_options={"include_usage": "yes"}), 400,
     "stream_options.include_usage"),
    ("max_tokens 0", "/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens"),
    ("bad sampling", "/v1/chat/completions", _chat(top_p=0), 400, "top_p"),
    ("n above router.max_n", "/v1/chat/completions", _chat(n=17), 400, "n"),
    ("n=0", "/v1/chat/completions", _chat(n=0), 400, "n"),
    ("unknown model", "/v1/chat/completions", {**_chat(), "model": "gpt-9"}, 404, "model"),
    ("max_tokens beyond context", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1000}, 400, None),
    ("prompt too long", "/v1/completions", {"model": MODEL, "prompt": [5] * 300, "max_tokens": 1}, 400, None),
    ("an empty prompt among several", "/v1/completions", {"model": MODEL, "prompt": ["a", ""]}, 400, "prompt"),
    ("bad token id", "/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_openai_error(cluster: tuple[RouterServer, FakeWorker, FakeWorker], path: str,
                                     body: Any, status: int, param: str | None) -> None:
    router, _, _ = cluster
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(router.url + path, timeout=10, headers={"content-type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if status == 404:
        assert error["code"] == "model_not_found"
    if "context" in error["message"]:
        assert error["message"].startswith(f"This model's maximum context length is {CONTEXT} tokens.")


def test_context_error_message_like_vllm(cluster: tuple[RouterServer, FakeWorker, FakeWorker]) -> None:
    router, _, _ = cluster
    with pytest.raises(openai.BadRequestError) as e:
        client(router).completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=300)
    assert ("This model's maximum context length is 256 tokens. However, you requested 303 tokens (3 in the "
            "messages, 300 in the completion).") in e.value.message


def test_api_keys(fakes: Callable[[str], FakeServer], routers: Callable[..., RouterServer]) -> None:
    router = routers([fakes("decode").address], api_keys=("s3cret", "other"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(router, "nope").models.list()
    assert client(router, "s3cret").completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text
    assert [m.id for m in client(router, "other").models.list()] == [MODEL]
    assert all(httpx.get(router.url + p).status_code == 200 for p in ("/health", "/ready", "/metrics"))


# --- failures and disconnects --------------------------------------------------------------------------------------


def _endless(max_tokens: int = 200) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "count", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}


def test_client_disconnect_aborts_decode(cluster: tuple[RouterServer, FakeWorker, FakeWorker]) -> None:
    router, _, d = cluster
    with httpx.stream("POST", router.url + "/v1/completions", json=_endless(), timeout=10) as r:
        lines = r.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[len("data: "):])
        next(line for line in lines if line.startswith("data: "))
    closed = time.monotonic()
    wait_for(lambda: first["id"] in d.aborts, 1)
    assert time.monotonic() - closed < 1
    assert first["id"] in d.cancelled or wait_for(lambda: first["id"] in d.cancelled, 1)


def test_non_streaming_disconnect_aborts_decode(cluster: tuple[RouterServer, FakeWorker, FakeWorker]) -> None:
    router, _, d = cluster
    seen = len(d.decodes)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(router.url + "/v1/completions", json={**_endless(), "stream": False}, timeout=0.3)
    rid = d.decodes[seen].request_id
    wait_for(lambda: rid in d.aborts, 1)


def test_decode_worker_death_ends_stream_with_error_and_recovers(
        fakes: Callable[[str], FakeServer], routers: Callable[..., RouterServer]) -> None:
    d = fakes("decode")
    router = routers([d.address])
    with httpx.stream("POST", router.url + "/v1/completions", json=_endless(), timeout=10) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: "))
        d.stop()
        events = sse_payloads(lines)
    assert events[-1] == "[DONE]" and "error" in events[-2], events[-3:]
    assert events[-2]["error"]["type"] == "server_error"
    wait_for(lambda: httpx.get(router.url + "/ready").status_code == 503, 2)
    r = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_worker"
    d.start()  # same port
    wait_for(lambda: httpx.get(router.url + "/ready").status_code == 200, 5)
    assert client(router).completions.create(model=MODEL, prompt="hi", max_tokens=3).choices[0].text == "Hello world!"


def test_requests_wait_for_a_restarting_decode_worker(
        fakes: Callable[[str], FakeServer], routers: Callable[..., RouterServer]) -> None:
    """With `no_worker_wait_s`, a stream whose only decode worker dies resumes on it once it is back at its address
    (a new process: it turned healthy after the request left it), and a request arriving meanwhile waits for it."""
    d = fakes("decode")
    router = routers([d.address], no_worker_wait_s=8.0)
    with httpx.stream("POST", router.url + "/v1/completions", json=_endless(), timeout=20) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: "))
        d.stop()
        wait_for(lambda: httpx.get(router.url + "/ready").status_code == 503, 3)
        arriving = concurrent.futures.ThreadPoolExecutor(1).submit(
            httpx.post, router.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=20)
        time.sleep(0.5)
        d.start()  # same port
        events = sse_payloads(lines)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1] if isinstance(e, dict)), events[-3:]
    assert arriving.result(timeout=20).status_code == 200


def test_silent_decode_worker_times_out(fakes: Callable[[str], FakeServer],
                                        routers: Callable[..., RouterServer]) -> None:
    d = fakes("decode")
    d.worker.hang_after = 2
    router = routers([d.address], worker_timeout_s=0.5)
    started = time.monotonic()
    with httpx.stream("POST", router.url + "/v1/completions", json=_endless(), timeout=10) as r:
        events = sse_payloads(r.iter_lines())
    assert time.monotonic() - started < 3
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "worker_timeout"
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == "Hello world"
    wait_for(lambda: events[0]["id"] in d.worker.aborts, 1)


def test_unreachable_decode_releases_prefill_kv(fakes: Callable[[str], FakeServer],
                                                routers: Callable[..., RouterServer]) -> None:
    p, d = fakes("prefill"), fakes("decode")
    d.worker.decode_error = grpc.StatusCode.UNAVAILABLE
    router = routers([p.address, d.address])
    r = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "worker_unavailable"
    rid = p.worker.prefills[0].request_id
    wait_for(lambda: p.worker.releases == [rid], 1)
    assert d.worker.decodes[0].kv.block_ids == [0, 1]


def test_no_workers_is_503(routers: Callable[..., RouterServer]) -> None:
    router = routers([], max_model_len=CONTEXT)
    assert httpx.get(router.url + "/ready").status_code == 503
    with pytest.raises(openai.InternalServerError) as e:
        client(router).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 503


def test_disconnect_while_prefilling_aborts_prefill(fakes: Callable[[str], FakeServer],
                                                    routers: Callable[..., RouterServer]) -> None:
    p, d = fakes("prefill"), fakes("decode")
    p.worker.prefill_delay_s = 5.0
    router = routers([p.address, d.address])
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(router.url + "/v1/completions", json={**_endless(), "stream": True}, timeout=0.3)
    rid = p.worker.prefills[0].request_id
    wait_for(lambda: rid in p.worker.aborts, 1)
    assert d.worker.decodes == []


def test_failed_prefill_falls_back_to_local_prefill(fakes: Callable[[str], FakeServer],
                                                    routers: Callable[..., RouterServer]) -> None:
    p, d = fakes("prefill"), fakes("decode")
    p.worker.prefill_error = grpc.StatusCode.INTERNAL
    router = routers([p.address, d.address])
    out = client(router).completions.create(model=MODEL, prompt="hi", max_tokens=3)
    assert out.choices[0].text == "Hello world!" and len(p.worker.prefills) == 1
    assert not d.worker.decodes[0].output_token_ids


def test_unreachable_decode_worker_is_skipped(fakes: Callable[[str], FakeServer],
                                              routers: Callable[..., RouterServer]) -> None:
    good, bad = fakes("decode"), fakes("decode")
    bad.worker.decode_error = grpc.StatusCode.UNAVAILABLE
    router = routers([good.address, bad.address], decode_policy="round_robin")
    for _ in range(2):  # round-robin sends one of the two to the bad worker first
        assert client(router).completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text
    # Every request ended on the good worker; how often the bad one was tried depends on whether a health poll
    # (it answers Health) brought it back between the two requests.
    assert bad.worker.decodes and len(good.worker.decodes) == 2


# --- registry, metrics -----------------------------------------------------------------------------------


def test_registry_add_drain_remove_at_run_time(fakes: Callable[[str], FakeServer],
                                              io_loop: asyncio.AbstractEventLoop) -> None:
    d1, d2, p = fakes("decode"), fakes("decode"), fakes("prefill")

    async def scenario() -> None:
        reg = WorkerRegistry([d1.address], health_interval_s=0.1, rpc_timeout_s=1.0)
        await reg.start()
        assert [w.address for w in reg.candidates("decode")] == [d1.address]
        await reg.add(d2.address)
        await reg.add(p.address)
        assert {w.address for w in reg.candidates("decode")} == {d1.address, d2.address}
        assert [w.address for w in reg.candidates("prefill")] == [p.address]
        assert reg.get(p.address).role == "prefill" and reg.max_model_len() == CONTEXT
        reg.set_draining(d1.address)
        assert [w.address for w in reg.candidates("decode")] == [d2.address]
        await reg.remove(d2.address)
        assert reg.candidates("decode") == [] and reg.get(d2.address) is None
        reg.set_draining(d1.address, False)
        assert [w.address for w in reg.candidates("decode")] == [d1.address]
        await reg.stop()

    asyncio.run_coroutine_threadsafe(scenario(), io_loop).result(timeout=20)


def test_metrics_expose_latencies_counts_and_worker_gauges(
        cluster: tuple[RouterServer, FakeWorker, FakeWorker]) -> None:
    router, p, d = cluster
    d.load = disagg_pb2.LoadReport(role="decode", stats={"num_running": 3, "kv_usage": 0.25, "transfers": 7,
                                                         "overlap_steps_queued": 9, "overlap_steps_used": 8,
                                                         "overlap_steps_split": 3},
                                   stat_help={"overlap_steps_used": "Queued-ahead decode steps used"})
    client(router).completions.create(model=MODEL, prompt="hi", max_tokens=4)
    httpx.post(router.url + "/v1/chat/completions", json={"model": MODEL})
    running = f'disagg_worker_num_running{{role="decode",worker="{d.address}"}} 3.0'
    wait_for(lambda: running in httpx.get(router.url + "/metrics").text, 2)
    text = httpx.get(router.url + "/metrics").text
    for name in ("disagg_ttft_seconds_bucket", "disagg_inter_token_latency_seconds_bucket",
                 "disagg_e2e_latency_seconds_count", "disagg_prompt_tokens_total",
                 "disagg_generation_tokens_total"):
        assert name in text, name
    assert 'disagg_requests_total{endpoint="completions",status="200"}' in text
    assert 'disagg_requests_total{endpoint="chat",status="400"}' in text
    assert f'disagg_worker_transfers{{role="decode",worker="{d.address}"}} 7.0' in text
    assert f'disagg_worker_overlap_steps_used{{role="decode",worker="{d.address}"}} 8.0' in text
    assert f'disagg_worker_overlap_steps_split{{role="decode",worker="{d.address}"}} 3.0' in text
    assert "# HELP disagg_worker_overlap_steps_used Queued-ahead decode steps used" in text  # the worker's words
    assert f'disagg_worker_healthy{{role="prefill",worker="{p.address}"}} 1.0' in text


@pytest.mark.parametrize("include_usage", [False, True])
def test_templated_chunks_equal_the_models_they_stand_for(include_usage: bool) -> None:
    """The per-token SSE path renders chunks from a template (router/responder.py `_fast_chunk`): byte for byte
    what the pydantic models give, for text with quotes, backslashes, newlines and non-ASCII, empty text and
    every finish reason."""
    from engine.request import SamplingParams
    from router.generation import Output
    from router.job import GenerationJob, RequestPlan
    from router.responder import ChatResponder, CompletionResponder

    job = GenerationJob("cmpl-t", [1, 2], SamplingParams(), 0.0)
    plan = RequestPlan("cmpl-t", [job], [[1, 2]], 1, 1, [""], None, stream=True, include_usage=include_usage)
    outs = [Output([1], [], 'a "q" \\ é ✓\n', None), Output([], [], "", "stop"), Output([2], [], "x", "length")]
    for cls in (CompletionResponder, ChatResponder):
        r = cls(plan, "model/with\"quote", None)  # type: ignore[arg-type]
        assert r._plain
        for out in outs:
            chunk = r._chunk(job, out)
            assert chunk is not None and r._fast_chunk(out) == r._event(chunk)


# --- migration ------------------------------------------------------------------------------------------------------


def _migration_router(fakes: Callable[[str], FakeServer], routers: Callable[..., RouterServer], **overrides: Any
                      ) -> tuple[RouterServer, FakeServer, FakeServer]:
    first, second = fakes("decode"), fakes("decode")
    router = routers([first.address, second.address], decode_policy="round_robin", **overrides)
    return router, first, second


def _on(fake: FakeServer, rid: str) -> bool:
    return any(r.request_id == rid for r in fake.worker.decodes)


@pytest.mark.parametrize("failure", ["killed", "frozen"])
def test_lost_decode_worker_moves_the_stream_with_no_token_lost_or_repeated(
        failure: str, fakes: Callable[[str], FakeServer], routers: Callable[..., RouterServer]) -> None:
    """A decode worker killed (its stream breaks) or frozen (SIGSTOP: no answer to health polls) mid-stream: the
    request resumes on the other one with the tokens already streamed, and the client sees the same text as an
    uninterrupted run, no error, and the migration counted."""
    router, a, b = _migration_router(fakes, routers, rpc_timeout_s=0.5)
    body = _endless(24)
    whole = client(router).completions.create(model=MODEL, prompt="count", max_tokens=24,
                                              extra_body={"ignore_eos": True}).choices[0].text

    def fail() -> None:
        rid = events_holder[0]["id"]
        victim = a if _on(a, rid) else b
        if failure == "killed":
            victim.stop()
        else:
            victim.worker.frozen = True

    events_holder: list[Any] = []
    with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=20) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events_holder.append(json.loads(line[len("data: "):]))
                if len(events_holder) == 5:
                    break
        started = time.monotonic()
        fail()
        events = events_holder + sse_payloads(lines)
    assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1] if isinstance(e, dict)), events[-3:]
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole
    assert time.monotonic() - started < 5  # frozen: found within health_interval_s + rpc_timeout_s
    rid = events[0]["id"]
    moved = next(r for f in (a, b) for r in f.worker.decodes if r.request_id == rid and r.output_token_ids)
    assert len(moved.output_token_ids) >= 5  # resumed after what the client already had
    assert "disagg_router_migrations_total 1.0" in httpx.get(router.url + "/metrics").text
    for f in (a, b):
        f.worker.frozen = False


def test_a_frozen_decode_worker_that_answers_again_gets_its_request_back_cleanly(
        fakes: Callable[[str], FakeServer], routers: Callable[..., RouterServer]) -> None:
    """The only decode worker freezes mid-stream (no answers: the Abort sent when the request leaves it times out)
    and then answers again: same process, old copy still there. The request goes back to it only after that copy
    is aborted, so the worker does not refuse the resume as a duplicate id (seen in the 10,000-request chaos soak)
    and the client gets the uninterrupted text with no error."""
    d = fakes("decode")
    router = routers([d.address], rpc_timeout_s=0.5, no_worker_wait_s=8.0)
    whole = client(router).completions.create(model=MODEL, prompt="count", max_tokens=24,
                                              extra_body={"ignore_eos": True}).choices[0].text
    events: list[Any] = []
    with httpx.stream("POST", router.url + "/v1/completions", json=_endless(24), timeout=20) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
                if len(events) == 5:
                    break
        d.worker.frozen = True
        wait_for(lambda: httpx.get(router.url + "/ready").status_code == 503, 5)
        time.sleep(0.6)  # the Abort sent as the request left has timed out: the old copy is still there
        d.worker.frozen = False
        events += sse_payloads(lines)
    assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1] if isinstance(e, dict)), events[-3:]
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole
    rid = events[0]["id"]
    assert [r.request_id for r in d.worker.decodes].count(rid) == 2 and rid in d.worker.aborts


def test_migrations_are_limited(fakes: Callable[[str], FakeServer], routers: Callable[..., RouterServer]) -> None:
    router, a, b = _migration_router(fakes, routers, max_migrations=0)
    events_holder: list[Any] = []
    with httpx.stream("POST", router.url + "/v1/completions", json=_endless(40), timeout=20) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events_holder.append(json.loads(line[len("data: "):]))
                break
        (a if _on(a, events_holder[0]["id"]) else b).stop()
        events = events_holder + sse_payloads(lines)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "worker_unavailable"
    assert "moved 0 time(s) already" in events[-2]["error"]["message"]


@pytest.mark.parametrize("reason", [DRAINING, NO_SUBSCRIPTION])
def test_a_refused_decode_goes_elsewhere_without_marking_the_worker_dead(
        reason: str, fakes: Callable[[str], FakeServer], routers: Callable[..., RouterServer]) -> None:
    """A draining worker (or one whose token stream this router gave up on) refuses Decode: the request goes to
    another decode worker, and the refusing one is not marked unhealthy (a draining one finishes what it runs)."""
    good, refusing = fakes("decode"), fakes("decode")
    refusing.worker.decode_error, refusing.worker.refusal = grpc.StatusCode.UNAVAILABLE, reason
    if reason == NO_SUBSCRIPTION:
        refusing.worker.decode_error = grpc.StatusCode.FAILED_PRECONDITION
    router = routers([refusing.address, good.address], decode_policy="round_robin")
    for _ in range(2):
        assert client(router).completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text
    assert refusing.worker.decodes and len(good.worker.decodes) == 2
    w = router.registry.get(refusing.address)
    assert w is not None and w.healthy and w.remote_draining == (reason == DRAINING)


class _SlowHealthStub:
    """A worker's stub whose Health answers "not draining" after a pause, while a refusal lands meanwhile."""

    def __init__(self, during: Callable[[], None]) -> None:
        self.during = during

    async def Health(self, request: Any, timeout: float) -> disagg_pb2.HealthResponse:
        self.during()  # the refusal arrives while this poll's question is on its way
        await asyncio.sleep(0.01)
        return disagg_pb2.HealthResponse(ok=True, worker_id="d", role="decode", model=MODEL, max_model_len=CONTEXT)

    async def Load(self, request: Any, timeout: float) -> disagg_pb2.LoadReport:
        return disagg_pb2.LoadReport(role="decode")


def test_a_poll_asked_before_a_draining_refusal_does_not_clear_it() -> None:
    """The race CI found: a health poll asked before a worker's DRAINING refusal answers after it; its older
    "not draining" must not clear what the refusal said. The first poll asked after the refusal decides."""
    reg = WorkerRegistry(["d"])
    w = reg.get("d")
    assert w is not None
    w.stub = _SlowHealthStub(lambda: reg.mark_draining(w))  # type: ignore[assignment]
    asyncio.run(reg.poll_once())
    assert w.healthy and w.remote_draining
    w.stub = _SlowHealthStub(lambda: None)  # type: ignore[assignment]
    asyncio.run(reg.poll_once())  # asked after the refusal: the worker's own word (it no longer drains) stands
    assert w.healthy and not w.remote_draining


def test_a_frozen_prefill_worker_is_given_up_on_and_the_decode_worker_prefills(
        fakes: Callable[[str], FakeServer], routers: Callable[..., RouterServer]) -> None:
    p, d = fakes("prefill"), fakes("decode")
    router = routers([p.address, d.address], rpc_timeout_s=0.5)
    p.worker.frozen = True  # its Prefill never answers, nor do its health polls
    started = time.monotonic()
    out = client(router).completions.create(model=MODEL, prompt="hi", max_tokens=3)
    assert out.choices[0].text == "Hello world!" and time.monotonic() - started < 4
    assert not d.worker.decodes[-1].output_token_ids  # prefilled locally
    p.worker.frozen = False


def test_histogram_tally_equals_observe() -> None:
    """A request's tallied ITLs land in the histogram exactly as one observe per token would put them."""
    from prometheus_client import CollectorRegistry, Histogram

    from router.metrics import ITL_BUCKETS, BulkHistogram, HistogramTally

    values = [0.0, 0.001, 0.0011, 0.01, 0.0099, 0.5, 3.0, 1e9] * 20
    direct = Histogram("direct", "d", buckets=ITL_BUCKETS, registry=CollectorRegistry())
    tallied = BulkHistogram("tallied", "t", buckets=ITL_BUCKETS, registry=CollectorRegistry())
    tally = HistogramTally(tallied, flush_every=7)
    for v in values:
        direct.observe(v)
        tally.observe(v)
    tally.flush()

    def samples(h: Histogram) -> list[tuple[str, float]]:
        return [(s.name.split("_", 1)[1], s.labels.get("le", ""), s.value) for m in h.collect() for s in m.samples
                if not s.name.endswith("_created")]
    got, want = samples(tallied), samples(direct)
    assert [s[:2] for s in got] == [s[:2] for s in want]
    assert [s[2] for s in got] == pytest.approx([s[2] for s in want])  # the sum is added in another order
