"""The chaos soak's clients: a fixed mix of requests, each with what the client does and what it must get back.

Kinds of request (shares in `Mix`):
  greedy      temperature 0; must return exactly the single-process engine's text, streamed or not
  seeded      temperature 0.8, top_p 0.95, a seed; must also equal the single-process engine (same seed)
  abort       streamed; the client closes the stream after a few chunks (the router must let the workers go)
  disconnect  the client gives up after a random delay, possibly before any answer
  bad         invalid input; must get a 4xx with an OpenAI error body, never a 5xx
Every stream the client did not cut itself must end with `data: [DONE]`; an `error` event before it is an error
surfaced to the client.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

WORDS = ["alpha", "beta", "gamma", "delta", "river", "mountain", "city", "history", "music", "science", "ocean",
         "forest", "engine", "winter", "garden", "silver", "planet", "story", "window", "thunder"]
BAD_BODIES: list[Any] = [
    b"{not json",
    {"model": "smollm2"},
    {"model": "smollm2", "prompt": "hi", "max_tokens": "many"},
    {"model": "smollm2", "prompt": "hi", "max_tokens": 0},
    {"model": "smollm2", "prompt": "hi", "max_tokens": 10**6},
    {"model": "smollm2", "prompt": "word " * 9000, "max_tokens": 4},
    {"model": "gpt-9", "prompt": "hi"},
    {"model": "smollm2", "prompt": "hi", "temperature": -1},
    {"model": "smollm2", "prompt": "hi", "top_p": 0},
]


@dataclass(frozen=True)
class Mix:
    """What share of requests is of each kind; the rest are greedy."""

    seeded: float = 0.10  # seeded sampling, compared with the single-process engine
    abort: float = 0.08  # streams the client closes early
    disconnect: float = 0.05  # requests the client abandons after a random delay
    bad: float = 0.07  # invalid inputs
    stream: float = 0.75  # share of greedy / seeded requests that stream

    def __post_init__(self) -> None:
        if min(self.seeded, self.abort, self.disconnect, self.bad) < 0 or \
                self.seeded + self.abort + self.disconnect + self.bad > 1 or not 0 <= self.stream <= 1:
            raise ValueError("mix shares must be >= 0 and add up to at most 1")


@dataclass(frozen=True)
class Spec:
    """One request of the soak."""

    index: int
    kind: str  # greedy | seeded | abort | disconnect | bad
    prompt: str
    max_tokens: int
    stream: bool
    seed: int | None = None
    cut_after: int = 0  # abort: chunks read before closing; disconnect: 0
    give_up_s: float = 0.0  # disconnect: seconds before the client gives up
    bad_body: Any = None  # bad: what is sent

    def body(self) -> dict[str, Any]:
        b: dict[str, Any] = {"model": "smollm2", "prompt": self.prompt, "max_tokens": self.max_tokens,
                             "stream": self.stream, "temperature": 0.0}
        if self.seed is not None:
            b.update(temperature=0.8, top_p=0.95, seed=self.seed)
        return b

    @property
    def reference_key(self) -> tuple[str, int, int | None]:
        return self.prompt, self.max_tokens, self.seed


@dataclass
class Result:
    """What the client saw."""

    spec: Spec
    status: int = 0
    text: str = ""
    done: bool = False  # the stream ended with [DONE] (or the non-streamed answer was complete)
    error: str = ""  # an error event, a 5xx, a broken connection: what the client was told or saw
    cut: bool = False  # the client cut the request itself (abort / disconnect)
    connection_lost: bool = False  # the error is the TCP connection dying (refused, reset, closed mid-answer)
    start: float = 0.0
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk (monotonic)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


def make_specs(n: int, seed: int, mix: Mix, prompts: int = 12, lengths: tuple[int, ...] = (4, 8, 16)
               ) -> list[Spec]:
    """`n` requests drawn from `prompts` distinct prompts and `lengths` max_tokens (so references are few)."""
    rng = random.Random(seed)
    pool = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60))) for _ in range(prompts)]
    specs = []
    for i in range(n):
        prompt, max_tokens, u = rng.choice(pool), rng.choice(lengths), rng.random()
        stream = rng.random() < mix.stream
        if u < mix.bad:
            specs.append(Spec(i, "bad", prompt, max_tokens, rng.random() < 0.5, bad_body=rng.choice(BAD_BODIES)))
        elif u < mix.bad + mix.abort:
            specs.append(Spec(i, "abort", prompt, max(lengths), True, cut_after=rng.randint(1, 4)))
        elif u < mix.bad + mix.abort + mix.disconnect:
            specs.append(Spec(i, "disconnect", prompt, max(lengths), stream, give_up_s=rng.uniform(0.0, 1.5)))
        elif u < mix.bad + mix.abort + mix.disconnect + mix.seeded:
            specs.append(Spec(i, "seeded", prompt, max_tokens, stream, seed=rng.randrange(2)))
        else:
            specs.append(Spec(i, "greedy", prompt, max_tokens, stream))
    return specs


async def run_one(client: httpx.AsyncClient, url: str, spec: Spec) -> Result:
    """Send one request as its kind says; never raises (what went wrong is in the result)."""
    res = Result(spec, start=time.monotonic())
    try:
        if spec.kind == "disconnect":
            try:
                await asyncio.wait_for(_send(client, url, spec, res), spec.give_up_s)
            except TimeoutError:
                res.cut = True
        else:
            await _send(client, url, spec, res)
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        # What a client sees when the router process serving its connection dies (chaos_faults.py router_kill):
        # no HTTP answer at all, unlike a 5xx or an error event, which a live router sent.
        res.connection_lost = isinstance(e, httpx.NetworkError | httpx.RemoteProtocolError)
    res.end = time.monotonic()
    return res


async def _send(client: httpx.AsyncClient, url: str, spec: Spec, res: Result) -> None:
    if spec.kind == "bad":
        raw = spec.bad_body
        kw: dict[str, Any] = {"content": raw, "headers": {"Content-Type": "application/json"}} \
            if isinstance(raw, bytes) else {"json": {**raw, "stream": spec.stream}}
        r = await client.post(f"{url}/v1/completions", **kw)
        res.status, res.done = r.status_code, True
        if r.status_code >= 500 or r.status_code < 400 or "error" not in r.json():
            res.error = f"bad input got {r.status_code}: {r.text[:200]}"
        return
    if not spec.stream:
        r = await client.post(f"{url}/v1/completions", json=spec.body())
        res.status = r.status_code
        if r.status_code != 200:
            res.error = f"HTTP {r.status_code}: {r.text[:300]}"
            return
        res.text, res.done = r.json()["choices"][0]["text"], True
        res.chunk_times.append(time.monotonic())
        return
    async with client.stream("POST", f"{url}/v1/completions", json=spec.body()) as r:
        res.status = r.status_code
        if r.status_code != 200:
            res.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
            return
        await _read_events(r, spec, res)


async def _read_events(r: httpx.Response, spec: Spec, res: Result) -> None:
    parts: list[str] = []
    chunks = 0
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            res.done = True
            break
        event = json.loads(line[6:])
        if "error" in event:
            res.error = f"error event: {event['error'].get('message', event['error'])}"
            continue
        text = event["choices"][0]["text"] if event.get("choices") else ""
        if text:
            parts.append(text)
            res.chunk_times.append(time.monotonic())
        chunks += 1
        if spec.kind == "abort" and chunks >= spec.cut_after:
            res.cut = True
            break
    res.text = "".join(parts)


async def run_all(url: str, specs: list[Spec], concurrency: int, timeout_s: float = 300.0,
                  progress: Any = None) -> list[Result]:
    """Every spec, `concurrency` at a time (a closed loop), in order of index."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    queue: asyncio.Queue[Spec] = asyncio.Queue()
    for s in specs:
        queue.put_nowait(s)
    results: list[Result] = []
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                results.append(await run_one(client, url, queue.get_nowait()))
                if progress is not None:
                    progress(len(results))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sorted(results, key=lambda r: r.spec.index)
